//! permessage-deflate: the client offers it, and a node that accepts it
//! sends its larger frames compressed; the client hands them on intact.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::json;
use support::{config, until};
use wsgate_client::{Client, Event};
use wsgate_testkit::{Node, Ws};

/// A dashboard-like payload well above `--compression-min-bytes` (256).
fn payload() -> serde_json::Value {
    let rows: Vec<_> = (0..40)
        .map(|i| json!({"id": i, "name": format!("sensor-{i}"), "value": i * 3, "ok": true}))
        .collect();
    json!({ "rows": rows })
}

async fn receive_large_and_small(node: &Node, compression: bool) -> bool {
    let mut cfg = config(&[node.ws_url()], "alice");
    cfg.compression = compression;
    let (client, mut events) = Client::connect(cfg).await.unwrap();
    let compressed = match until(&mut events, "connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await
    {
        Event::Connected { compressed, .. } => compressed,
        other => panic!("{other:?}"),
    };
    client.join("dash").await.unwrap();
    let (mut bob, _) = Ws::open(&node.ws_url(), "bob").await;
    let big = payload();
    bob.publish("dash", big.clone()).await;
    bob.publish("dash", json!("small")).await;
    for want in [big, json!("small")] {
        match until(&mut events, "message", |e| matches!(e, Event::Message(_))).await {
            Event::Message(m) => {
                let got: serde_json::Value = serde_json::from_str(m.data.get()).unwrap();
                assert_eq!(got, want);
            }
            other => panic!("{other:?}"),
        }
    }
    client.close().await;
    compressed
}

#[tokio::test]
async fn compressed_frames_arrive_intact_when_the_node_accepts_the_offer() {
    let node = Node::start(&[]).await;
    assert!(
        receive_large_and_small(&node, true).await,
        "the node (compression on by default) accepted the offer"
    );
}

#[tokio::test]
async fn nothing_is_offered_when_compression_is_off_in_the_client() {
    let node = Node::start(&[]).await;
    assert!(!receive_large_and_small(&node, false).await);
}

#[tokio::test]
async fn a_node_with_compression_off_sends_plain_frames() {
    let node = Node::start(&["--compression", "off"]).await;
    assert!(!receive_large_and_small(&node, true).await);
}
