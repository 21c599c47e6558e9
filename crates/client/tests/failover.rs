//! Fail-over against real nodes and a real redis-server: a node SIGKILLed
//! mid-stream, a node drained (1001), a resume the history cannot cover,
//! and a Redis that restarts empty. The client must deliver every seq
//! once, resume on the other node, and report every gap.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::json;
use support::{collect_until, config, seqs, until, wait_ready};
use wsgate_client::{Client, Event, GapReason};
use wsgate_testkit::{any_token, eventually, http, BinNode, Node, Redis, TcpProxy, Ws};

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

fn no_gaps(events: &[Event]) {
    let gaps: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Gap(_)))
        .collect();
    assert!(gaps.is_empty(), "unexpected gaps: {gaps:?}");
}

#[tokio::test]
async fn node_killed_mid_stream_client_resumes_on_another_node_with_every_seq_once() {
    let redis = Redis::start();
    let url = redis.url();
    let flags = |id: &'static str| {
        vec![
            "--redis-url".to_owned(),
            url.clone(),
            "--node-id".into(),
            id.into(),
            "--publish-rate".into(),
            "100000".into(),
            "--publish-burst".into(),
            "100000".into(),
            "--log".into(),
            "warn".into(),
        ]
    };
    let args_a = flags("node-a");
    let args_b = flags("node-b");
    let mut a = BinNode::start(&args_a.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let b = BinNode::start(&args_b.iter().map(String::as_str).collect::<Vec<_>>()).await;
    wait_ready(&a.ops_url()).await;
    wait_ready(&b.ops_url()).await;

    // The subscriber lists both nodes and lands on the first.
    let (sub, mut events) = Client::connect(config(&[a.ws_url(), b.ws_url()], "sub"))
        .await
        .unwrap();
    match until(&mut events, "connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await
    {
        Event::Connected { node, .. } => assert_eq!(node, "node-a"),
        _ => unreachable!(),
    }
    sub.join("stream").await.unwrap();

    // A publisher on the other node streams N messages, each after the
    // previous ack.
    const N: u64 = 400;
    let (publisher, _pub_events) = Client::connect(config(&[b.ws_url()], "pub")).await.unwrap();
    let streaming = tokio::spawn(async move {
        for i in 1..=N {
            let seq = publisher
                .publish("stream", json!({ "i": i }))
                .await
                .unwrap();
            assert_eq!(seq, i);
        }
        publisher
    });

    // Kill the subscriber's node once part of the stream has arrived.
    let mut seen = Vec::new();
    while seqs(&seen, "stream").len() < 50 {
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
        resumed && last == N
    })
    .await;
    seen.extend(more);
    let publisher = streaming.await.unwrap();
    assert_eq!(seqs(&seen, "stream"), (1..=N).collect::<Vec<_>>());
    no_gaps(&seen);
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Disconnected { code: None, .. })),
        "a kill is a drop without a Close frame: {seen:?}"
    );
    assert!(seen
        .iter()
        .any(|e| matches!(e, Event::Connected { node, .. } if node == "node-b")));

    // Live messages keep coming on the new node, still once.
    assert_eq!(
        publisher.publish("stream", json!("after")).await.unwrap(),
        N + 1
    );
    match until(&mut events, "live message", |e| {
        matches!(e, Event::Message(_))
    })
    .await
    {
        Event::Message(m) => assert_eq!(m.seq, N + 1),
        _ => unreachable!(),
    }
    sub.close().await;
    publisher.close().await;
}

#[tokio::test]
async fn drained_node_closes_1001_and_the_client_resumes_elsewhere() {
    let redis = Redis::start();
    let a = Node::start(&["--redis-url", &redis.url(), "--drain-timeout", "2s"]).await;
    let b = Node::start(&["--redis-url", &redis.url()]).await;
    wait_ready(&a.ops_url()).await;
    wait_ready(&b.ops_url()).await;
    let (sub, mut events) = Client::connect(config(&[a.ws_url(), b.ws_url()], "sub"))
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
    a.stop().await;
    sub.close().await;
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
