//! Helpers shared by the client's integration tests: client configurations
//! for test nodes, bounded waits on the event stream, and a node on a chosen
//! port (to bring "the same node" back after it was down).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use wsgate_client::{Backoff, Client, ClientConfig, Event, EventStream, Transport};
use wsgate_testkit::{any_token, eventually, http_get, BinNode, Node, Redis, Ws, WAIT};

/// A config for `urls` with a token that may do everything, a fast backoff
/// and a fixed jitter seed.
pub fn config(urls: &[String], sub: &str) -> ClientConfig {
    let mut c = ClientConfig::new(urls.iter().cloned(), any_token(sub));
    c.backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    c.rng_seed = Some(7);
    c
}

/// The next event matching `pred`, skipping others; panics after [`WAIT`].
pub async fn until<F>(events: &mut EventStream, what: &str, mut pred: F) -> Event
where
    F: FnMut(&Event) -> bool,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Every event until (and including) the first matching `pred`.
pub async fn collect_until<F>(events: &mut EventStream, what: &str, mut pred: F) -> Vec<Event>
where
    F: FnMut(&Event) -> bool,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(e)) => {
                let done = pred(&e);
                seen.push(e);
                if done {
                    return seen;
                }
            }
            Ok(None) => panic!("event stream ended while waiting for {what}: {seen:#?}"),
            Err(_) => panic!("timed out waiting for {what}: {seen:#?}"),
        }
    }
}

/// The seqs of the `Message` events of `room` in `events`.
pub fn seqs(events: &[Event], room: &str) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if m.room == room => Some(m.seq),
            _ => None,
        })
        .collect()
}

/// A gateway node served in this process from a listener the test bound
/// itself (so it can come back on the same port): the test kit's node.
pub struct PortNode;

impl PortNode {
    /// Serve on `public` with the test secret, `node_id` and `extra` flags.
    pub async fn start(public: TcpListener, node_id: &str, extra: &[&str]) -> Node {
        let mut args = vec!["--node-id", node_id];
        args.extend_from_slice(extra);
        Node::start_on(public, &args).await
    }
}

/// Wait until a node's `/ready` answers 200 (its broker is up).
pub async fn wait_ready(ops_url: &str) {
    let url = format!("{ops_url}/ready");
    eventually("node ready", || async {
        matches!(http_get(&url).await, Ok((200, _, _))).then_some(())
    })
    .await;
}

/// Two `wsgate` processes, `node-a` and `node-b`, on `redis_url`, with
/// publish limits out of the way, both ready (for tests that SIGKILL one).
async fn two_bin_nodes(redis_url: &str) -> (BinNode, BinNode) {
    let flags = |id: &'static str| {
        [
            "--redis-url",
            redis_url,
            "--node-id",
            id,
            "--publish-rate",
            "100000",
            "--publish-burst",
            "100000",
            "--log",
            "warn",
        ]
    };
    let a = BinNode::start(&flags("node-a")).await;
    let b = BinNode::start(&flags("node-b")).await;
    wait_ready(&a.ops_url()).await;
    wait_ready(&b.ops_url()).await;
    (a, b)
}

/// Panics when `events` hold a gap.
pub fn no_gaps(events: &[Event]) {
    let gaps: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Gap(_)))
        .collect();
    assert!(gaps.is_empty(), "unexpected gaps: {gaps:?}");
}

/// A subscriber connected to `node-a` (listing both nodes) and a publisher
/// on `node-b`, both over `transport`, streaming `n` messages, each after
/// the previous ack; `node-a` is SIGKILLed once part of the stream has
/// arrived. Checks that the subscriber gets every seq once, in order, with
/// a recovered resume on `node-b` and no gap, and that live messages keep
/// coming; the subscriber's events.
pub async fn node_killed_mid_stream(transport: Transport, n: u64) -> Vec<Event> {
    let redis = Redis::start();
    let (mut a, b) = two_bin_nodes(&redis.url()).await;
    let (sub, mut events) =
        Client::connect(config(&[a.ws_url(), b.ws_url()], "sub").transport(transport))
            .await
            .unwrap();
    assert_eq!(
        connected_over(&mut events).await,
        (transport, "node-a".to_owned())
    );
    sub.join("stream").await.unwrap();
    let (publisher, _pub_events) =
        Client::connect(config(&[b.ws_url()], "pub").transport(transport))
            .await
            .unwrap();
    let streaming = tokio::spawn(async move {
        for i in 1..=n {
            let seq = publisher
                .publish("stream", json!({ "i": i }))
                .await
                .unwrap();
            assert_eq!(seq, i);
        }
        publisher
    });

    let mut seen = Vec::new();
    while seqs(&seen, "stream").len() < 50.min(n as usize / 2) {
        seen.push(
            until(&mut events, "first messages", |e| {
                matches!(e, Event::Message(_))
            })
            .await,
        );
    }
    a.kill();

    // Everything else arrives, through the other node, and the room was
    // resumed there with a full replay.
    let mut resumed = false;
    let mut last = *seqs(&seen, "stream").last().unwrap();
    let more = collect_until(&mut events, "the rest of the stream and a resume", |e| {
        match e {
            Event::Message(m) => last = m.seq,
            Event::Resumed { room, recovered } => {
                assert_eq!(room, "stream");
                assert!(*recovered, "resume after a kill is recovered");
                resumed = true;
            }
            _ => {}
        }
        resumed && last == n
    })
    .await;
    seen.extend(more);
    let publisher = streaming.await.unwrap();
    assert_eq!(seqs(&seen, "stream"), (1..=n).collect::<Vec<_>>());
    no_gaps(&seen);
    assert!(seen.iter().any(|e| matches!(
        e,
        Event::Connected { node, transport: t, .. } if node == "node-b" && *t == transport
    )));

    // Live messages keep coming on the new node, still once.
    assert_eq!(
        publisher.publish("stream", json!("after")).await.unwrap(),
        n + 1
    );
    match until(&mut events, "live message", |e| {
        matches!(e, Event::Message(_))
    })
    .await
    {
        Event::Message(m) => assert_eq!(m.seq, n + 1),
        _ => unreachable!(),
    }
    sub.close().await;
    publisher.close().await;
    seen
}

/// A client over `transport` on a node that is drained (`begin_stop`): the
/// connection ends with 1001, the client resumes both its rooms on the other
/// node with the messages published meanwhile, once, without a gap.
pub async fn drained_node_closes_1001_and_the_client_resumes(transport: Transport) {
    let redis = Redis::start();
    let a = Node::start(&["--redis-url", &redis.url(), "--drain-timeout", "2s"]).await;
    let b = Node::start(&["--redis-url", &redis.url()]).await;
    wait_ready(&a.ops_url()).await;
    wait_ready(&b.ops_url()).await;
    let (sub, mut events) =
        Client::connect(config(&[a.ws_url(), b.ws_url()], "sub").transport(transport))
            .await
            .unwrap();
    sub.join("d").await.unwrap();
    sub.join("e").await.unwrap();
    let (mut publisher, _) = Ws::open(&b.ws_url(), "pub").await;
    for i in 0..5 {
        publisher.publish("d", json!(i)).await;
    }
    let before = collect_until(
        &mut events,
        "five messages",
        |e| matches!(e, Event::Message(m) if m.seq == 5),
    )
    .await;
    assert_eq!(seqs(&before, "d"), [1, 2, 3, 4, 5]);

    a.begin_stop();
    let dropped = until(&mut events, "disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    assert!(
        matches!(
            &dropped,
            Event::Disconnected {
                code: Some(1001),
                ..
            }
        ),
        "{dropped:?}"
    );
    // Published while the client is between nodes.
    for i in 5..10 {
        publisher.publish("d", json!(i)).await;
    }
    publisher.publish("e", json!("e1")).await;
    let mut resumed = Vec::new();
    let mut got_last = false;
    let after = collect_until(&mut events, "both rooms resumed and seq 10", |e| {
        match e {
            Event::Resumed { room, recovered } => {
                assert!(recovered, "{room} not recovered");
                resumed.push(room.clone());
            }
            Event::Message(m) if m.room == "d" && m.seq == 10 => got_last = true,
            _ => {}
        }
        resumed.len() == 2 && got_last
    })
    .await;
    resumed.sort();
    assert_eq!(resumed, ["d", "e"]);
    assert_eq!(seqs(&after, "d"), [6, 7, 8, 9, 10]);
    no_gaps(&after);
    assert!(after.iter().any(|e| matches!(
        e,
        Event::Connected { node, transport: t, .. } if *node == b.node_id && *t == transport
    )));
    a.stop().await;
    sub.close().await;
}

/// The transport and node of the next `Connected` event.
pub async fn connected_over(events: &mut EventStream) -> (Transport, String) {
    match until(events, "connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await
    {
        Event::Connected {
            transport, node, ..
        } => (transport, node),
        _ => unreachable!(),
    }
}
