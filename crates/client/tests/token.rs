//! Tokens: a 4001 close (token expired) makes the client ask its callback
//! for a new token and resume; with early refresh on, the client sends
//! `refresh` before `exp` and the connection outlives the first token.
//! Nodes run with `--jwt-leeway 0s` and tokens live about 2 s.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use support::{collect_until, seqs};
use wsgate_client::{
    jwt_exp, Backoff, BoxError, Client, ClientConfig, ClientError, Event, TokenSource,
};
use wsgate_testkit::{eventually, token, Node, Ws};

/// A callback minting a fresh `lifetime` token per call, counting calls.
fn counting_source(sub: &'static str, lifetime: Duration) -> (TokenSource, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let source = TokenSource::callback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(token(sub, &["*"], &["*"], lifetime)) }
    });
    (source, calls)
}

fn fast(config: &mut ClientConfig) {
    config.backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    config.rng_seed = Some(3);
}

#[tokio::test]
async fn expired_token_4001_calls_the_callback_then_resumes() {
    let node = Node::start(&["--jwt-leeway", "0s"]).await;
    let (source, calls) = counting_source("shortlived", Duration::from_secs(2));
    let mut config = ClientConfig::new([node.ws_url()], source);
    config.refresh_margin = None; // let it expire
    fast(&mut config);
    let (client, mut events) = Client::connect(config).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "called at connect");
    client.join("t").await.unwrap();
    let (mut publisher, _) = Ws::open(&node.ws_url(), "pub").await;
    publisher.publish("t", json!(1)).await;
    publisher.publish("t", json!(2)).await;

    let mut seen = collect_until(&mut events, "close 4001", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    assert!(
        matches!(
            seen.last(),
            Some(Event::Disconnected {
                code: Some(4001),
                ..
            })
        ),
        "{seen:?}"
    );
    // Published while the client is out.
    publisher.publish("t", json!(3)).await;
    publisher.publish("t", json!(4)).await;
    let mut resumed = false;
    let mut last = 0;
    seen.extend(
        collect_until(&mut events, "resume and seq 4", |e| {
            match e {
                Event::Resumed { recovered, .. } => {
                    assert!(recovered);
                    resumed = true;
                }
                Event::Message(m) => last = m.seq,
                _ => {}
            }
            resumed && last == 4
        })
        .await,
    );
    assert!(
        calls.load(Ordering::SeqCst) >= 2,
        "the callback gave a new token before reconnecting"
    );
    assert_eq!(seqs(&seen, "t"), [1, 2, 3, 4]);
    assert!(!seen.iter().any(|e| matches!(e, Event::Gap(_))));
    // The new connection works.
    assert_eq!(client.publish("t", json!(5)).await.unwrap(), 5);
    client.close().await;
}

#[tokio::test]
async fn refresh_before_exp_keeps_the_connection() {
    let node = Node::start(&["--jwt-leeway", "0s"]).await;
    let (source, calls) = counting_source("refresher", Duration::from_secs(2));
    let mut config = ClientConfig::new([node.ws_url()], source);
    config.refresh_margin = Some(Duration::from_secs(60)); // capped at half the life
    fast(&mut config);
    let first_exp = jwt_exp(&token("x", &[], &[], Duration::from_secs(2))).unwrap();
    let (client, mut events) = Client::connect(config).await.unwrap();
    client.join("r").await.unwrap();

    let seen = collect_until(&mut events, "a refreshed token", |e| {
        matches!(e, Event::TokenRefreshed { .. })
    })
    .await;
    match seen.last() {
        Some(Event::TokenRefreshed { exp }) => assert!(*exp >= first_exp),
        other => panic!("{other:?}"),
    }
    // Wait (bounded) until the first token is a second past its expiry:
    // without the refresh the node would have closed with 4001 by now.
    eventually("first token expired", || async {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        (now > first_exp + 1).then_some(())
    })
    .await;
    assert_eq!(client.publish("r", json!("alive")).await.unwrap(), 1);
    let mut later = Vec::new();
    while let Some(e) = events.try_next() {
        later.push(e);
    }
    assert!(
        !seen
            .iter()
            .chain(&later)
            .any(|e| matches!(e, Event::Disconnected { .. })),
        "the connection never dropped: {seen:?} {later:?}"
    );
    assert!(calls.load(Ordering::SeqCst) >= 2);
    client.close().await;
}

#[tokio::test]
async fn a_failing_token_callback_is_reported_and_retried() {
    let node = Node::start(&[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let source = TokenSource::callback(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err::<String, BoxError>("auth service down".into())
            } else {
                Ok(token("retry", &["*"], &["*"], Duration::from_secs(60)))
            }
        }
    });
    // `connect` reports the first round's failure...
    let mut config = ClientConfig::new([node.ws_url()], source.clone());
    fast(&mut config);
    let err = Client::connect(config.clone()).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Connect { reason, .. } if reason.contains("auth service down")),
        "{err:?}"
    );
    // ...while a started client keeps trying and gets through.
    calls.store(0, Ordering::SeqCst);
    let (client, mut events) = Client::start(config).unwrap();
    let seen = collect_until(&mut events, "connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await;
    assert!(matches!(
        &seen[0],
        Event::ConnectFailed { reason, .. } if reason.contains("auth service down")
    ));
    assert!(matches!(seen[1], Event::Reconnecting { attempt: 1, .. }));
    client.close().await;
}
