//! The basic path: welcome, join, publish, fan-out, ack.

use serde_json::json;
use wsgate_testkit::{Node, Ws};

#[tokio::test]
async fn publish_reaches_every_member_once_with_ack() {
    let node = Node::start(&[]).await;
    let (mut alice, welcome) = Ws::open(&node.ws_url(), "alice").await;
    assert_eq!(welcome.user, "alice");
    assert_eq!(welcome.node, node.node_id);
    assert_eq!(welcome.heartbeat_ms, 30_000);
    let (mut bob, _) = Ws::open(&node.ws_url(), "bob").await;
    let joined = alice.join("lobby").await;
    assert_eq!(joined["seq"], 0);
    assert!(joined.get("recovered").is_none());
    bob.join("lobby").await;

    let ack = alice.publish("lobby", json!({"text": "hi"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["seq"], 1);
    // The ack came after the message for alice (skipped by publish()); bob
    // gets exactly the message.
    let m = bob.json().await;
    assert_eq!(m["type"], "message");
    assert_eq!(m["room"], "lobby");
    assert_eq!(m["seq"], 1);
    assert_eq!(m["from"], "alice");
    assert_eq!(m["data"], json!({"text": "hi"}));
    assert!(m["ts"].as_u64().unwrap() > 1_700_000_000_000);
    node.stop().await;
}
