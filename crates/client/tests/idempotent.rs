//! Idempotent publish from the client's side (PROTOCOL.md section 11), with
//! real nodes and a real redis-server: a publish whose `ack` is lost in a
//! dropped connection is sent again, with the same key, after the reconnect,
//! and the room holds it once; over the WebSocket and over SSE.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::json;
use support::{collect_until, config, seqs, wait_ready};
use wsgate_client::{Client, Event, Transport};
use wsgate_testkit::{http, messages, Node, Redis, TcpProxy, Ws};

const API_KEY: &str = "idempotent-test-api-key";

/// The room's history as (seq, data), through a node's server API.
async fn history(node: &Node, room: &str) -> Vec<(u64, serde_json::Value)> {
    let auth = format!("apikey {API_KEY}");
    let (status, _, body) = http(
        "GET",
        &format!("{}/api/rooms/{room}/history", node.http_url()),
        &[("authorization", &auth)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["seq"].as_u64().unwrap(), m["data"].clone()))
        .collect()
}

#[tokio::test]
async fn a_publish_whose_ack_was_lost_in_a_drop_is_retried_with_its_key_and_stored_once() {
    ack_lost_then_retried(Transport::WebSocket).await;
}

#[tokio::test]
async fn the_same_over_sse() {
    ack_lost_then_retried(Transport::Sse).await;
}

/// A client over `transport` whose ack node a's proxy holds back, then
/// cuts: it reconnects to node b, re-joins, sends the publish again with
/// its key, gets the first seq, and the room holds the message once.
async fn ack_lost_then_retried(transport: Transport) {
    let redis = Redis::start();
    let flags = ["--redis-url", &redis.url(), "--api-key", API_KEY];
    let a = Node::start(&flags).await;
    let b = Node::start(&flags).await;
    wait_ready(&a.ops_url()).await;
    wait_ready(&b.ops_url()).await;

    // A member on node b sees every message of the room.
    let (mut member, _) = Ws::open(&b.ws_url(), "member").await;
    member.join("r").await;

    // The client reaches node a through a proxy, and node b directly (its
    // next URL after a drop). It is in the room too.
    let proxy = TcpProxy::start(a.addr).await;
    let via_proxy = format!("ws://127.0.0.1:{}/ws", proxy.port);
    let (client, mut events) =
        Client::connect(config(&[via_proxy, b.ws_url()], "pub").transport(transport))
            .await
            .unwrap();
    client.join("r").await.unwrap();

    // Node a's answers stop reaching the client: the publish gets through,
    // its ack does not.
    proxy.hold();
    let publishing = {
        let client = client.clone();
        tokio::spawn(async move { client.publish("r", json!("once")).await })
    };
    let first = messages(&mut member, 1).await;
    assert_eq!(first[0].0, 1);
    assert_eq!(first[0].2, json!("once"));
    assert!(!publishing.is_finished(), "the ack was held back");

    // The connection drops; the client reconnects to node b, re-joins, and
    // sends the publish again with the same key: node b answers with the
    // first seq and publishes nothing.
    proxy.cut();
    assert_eq!(publishing.await.unwrap().unwrap(), 1);
    let dups = b
        .metrics()
        .await
        .value("wsgate_publish_duplicates_total", &[]);
    assert_eq!(dups, 1.0, "the retry carried the first key");

    // The next message is seq 2: nothing was published in between.
    assert_eq!(client.publish("r", json!("next")).await.unwrap(), 2);
    let next = messages(&mut member, 1).await;
    assert_eq!((next[0].0, &next[0].2), (2, &json!("next")));
    assert_eq!(
        history(&b, "r").await,
        [(1, json!("once")), (2, json!("next"))]
    );

    // The client itself saw each message once: seq 1 (held back on node a)
    // replayed by its resume on node b, then seq 2.
    let seen = collect_until(
        &mut events,
        "seq 2",
        |e| matches!(e, Event::Message(m) if m.seq == 2),
    )
    .await;
    assert_eq!(seqs(&seen, "r"), [1, 2]);
    assert!(seen
        .iter()
        .any(|e| matches!(e, Event::Connected { node, transport: t, .. } if *node == b.node_id && *t == transport)));
    client.close().await;
}

#[tokio::test]
async fn every_publish_carries_a_distinct_key() {
    // Two clients with the same jitter seed, publishing to the same room on
    // one node: no publish is taken for another's (keys never collide).
    let node = Node::start(&[]).await;
    let (one, _) = Client::connect(config(&[node.ws_url()], "one"))
        .await
        .unwrap();
    let (two, _) = Client::connect(config(&[node.ws_url()], "two"))
        .await
        .unwrap();
    let mut got = Vec::new();
    for i in 0..3 {
        got.push(one.publish("k", json!(i)).await.unwrap());
        got.push(two.publish("k", json!(i)).await.unwrap());
    }
    assert_eq!(got, [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        node.metrics()
            .await
            .value("wsgate_publish_duplicates_total", &[]),
        0.0
    );
    one.close().await;
    two.close().await;
}
