//! Fail-over against real nodes and a real redis-server: a node SIGKILLed
//! mid-stream, a node drained (1001), a resume the history cannot cover,
//! and a Redis that restarts empty. The client must deliver every seq
//! once, resume on the other node, and report every gap.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::json;
use support::{
    collect_until, config, drained_node_closes_1001_and_the_client_resumes, node_killed_mid_stream,
    seqs, until, wait_ready,
};
use wsgate_client::{Client, Event, GapReason, Transport};
use wsgate_testkit::{any_token, eventually, http, Node, Redis, TcpProxy, Ws};

/// Publish `data` to `room` through a node's HTTP API; the seq.
async fn http_publish(http_url: &str, room: &str, data: serde_json::Value) -> Option<u64> {
    let auth = format!("Bearer {}", any_token("backend"));
    let (status, _, body) = http(
        "POST",
        &format!("{http_url}/api/rooms/{room}/messages"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        data.to_string().as_bytes(),
    )
    .await
    .ok()?;
    if status != 200 {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(&body).ok()?["seq"].as_u64()
}

#[tokio::test]
async fn node_killed_mid_stream_client_resumes_on_another_node_with_every_seq_once() {
    let seen = node_killed_mid_stream(Transport::WebSocket, 400).await;
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Disconnected { code: None, .. })),
        "a kill is a drop without a Close frame: {seen:?}"
    );
}

#[tokio::test]
async fn drained_node_closes_1001_and_the_client_resumes_elsewhere() {
    drained_node_closes_1001_and_the_client_resumes(Transport::WebSocket).await;
}

#[tokio::test]
async fn a_resume_the_history_cannot_cover_is_reported_as_a_gap() {
    let node = Node::start(&["--history", "5"]).await;
    let proxy = TcpProxy::start(node.addr).await;
    let via_proxy = format!("ws://127.0.0.1:{}/ws", proxy.port);
    let (sub, mut events) = Client::connect(config(&[via_proxy], "sub")).await.unwrap();
    sub.join("h").await.unwrap();
    let (mut publisher, _) = Ws::open(&node.ws_url(), "pub").await;
    publisher.publish("h", json!(1)).await;
    until(&mut events, "seq 1", |e| matches!(e, Event::Message(_))).await;

    // The network between client and node breaks; 50 messages go by.
    proxy.cut();
    until(&mut events, "disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    for i in 2..=51 {
        publisher.publish("h", json!(i)).await;
    }
    proxy.restore();
    let seen = collect_until(&mut events, "resumed", |e| {
        matches!(e, Event::Resumed { .. })
    })
    .await;
    let gap = seen
        .iter()
        .find_map(|e| match e {
            Event::Gap(g) => Some(g.clone()),
            _ => None,
        })
        .expect("a gap is reported, not hidden");
    assert_eq!(gap.room, "h");
    assert_eq!(gap.reason, GapReason::NotRecovered);
    assert_eq!((gap.expected_after, gap.got), (1, 51));
    assert!(matches!(
        seen.last(),
        Some(Event::Resumed {
            recovered: false,
            ..
        })
    ));
    assert!(seqs(&seen, "h").is_empty(), "nothing replayed");
    // Live messages follow.
    publisher.publish("h", json!(52)).await;
    match until(&mut events, "live", |e| matches!(e, Event::Message(_))).await {
        Event::Message(m) => assert_eq!(m.seq, 52),
        _ => unreachable!(),
    }
    sub.close().await;
}

#[tokio::test]
async fn redis_restarting_empty_is_an_epoch_change_gap() {
    let mut redis = Redis::start();
    let node = Node::start(&["--redis-url", &redis.url()]).await;
    wait_ready(&node.ops_url()).await;
    let (sub, mut events) = Client::connect(config(&[node.ws_url()], "sub"))
        .await
        .unwrap();
    let before = sub.join("f").await.unwrap();
    for i in 1..=3 {
        assert_eq!(sub.publish("f", json!(i)).await.unwrap(), i);
    }
    collect_until(
        &mut events,
        "seq 3",
        |e| matches!(e, Event::Message(m) if m.seq == 3),
    )
    .await;

    redis.restart();
    wait_ready(&node.ops_url()).await;
    let http_url = node.http_url();
    eventually("publish accepted again", || async {
        http_publish(&http_url, "f", json!("new epoch")).await
    })
    .await;
    let seen = collect_until(&mut events, "first message of the new epoch", |e| {
        matches!(e, Event::Message(_))
    })
    .await;
    let gap = seen
        .iter()
        .find_map(|e| match e {
            Event::Gap(g) => Some(g.clone()),
            _ => None,
        })
        .expect("epoch change reported");
    assert_eq!(gap.reason, GapReason::EpochChanged);
    assert_eq!(gap.expected_after, 3);
    assert_eq!(gap.previous_epoch.as_deref(), Some(before.epoch.as_str()));
    assert_ne!(gap.epoch, before.epoch);
    // Seq 1 of the new epoch is delivered, not dropped as a duplicate.
    match seen.last() {
        Some(Event::Message(m)) => {
            assert_eq!(m.seq, 1);
            assert_eq!(m.data.get(), r#""new epoch""#);
        }
        other => panic!("{other:?}"),
    }
    let (seq, epoch) = sub.position("f").await.unwrap();
    assert_eq!((seq, epoch), (1, gap.epoch.clone()));
    sub.close().await;
}
