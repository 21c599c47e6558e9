//! A resume whose replay is larger than the outbound limit is paced, not
//! refused: the client gets every message it asked for.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use wsgate_testkit::{messages, Node, Ws};

#[tokio::test]
async fn a_replay_larger_than_the_outbound_queue_is_delivered_whole() {
    let node = Node::start(&["--max-outbound-bytes", "4096", "--publish-burst", "500"]).await;
    let (mut publisher, _) = Ws::open(&node.ws_url(), "pub").await;
    let text = "x".repeat(500);
    for k in 0..60 {
        let ack = publisher
            .publish("big", json!({"k": k, "text": text}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let (mut late, _) = Ws::open(&node.ws_url(), "late").await;
    late.send(json!({"type":"join","room":"big","since":0,"id":"j"}))
        .await;
    let joined = late.json().await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["seq"], 60);
    // About 33 KB of replay through a 4 KB queue.
    let got = messages(&mut late, 60).await;
    assert_eq!(
        got.iter().map(|m| m.0).collect::<Vec<_>>(),
        (1..=60).collect::<Vec<u64>>()
    );
    late.send(json!({"type":"ping","id":"after"})).await;
    assert_eq!(late.json().await, json!({"type":"pong","id":"after"}));
    let m = node.metrics().await;
    assert_eq!(m.value("wsgate_slow_consumer_closes_total", &[]), 0.0);
}
