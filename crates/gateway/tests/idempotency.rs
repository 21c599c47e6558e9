//! Idempotent publish (PROTOCOL.md section 11): a key used again in the same
//! room within 5 minutes is answered with the first seq and not published
//! again, on any node, over WebSocket and HTTP. Real nodes, real redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use wsgate_testkit::{any_token, eventually, http, http_get, messages, Node, Redis, Ws};

async fn ready(node: &Node) {
    let url = format!("{}/ready", node.ops_url());
    eventually("node ready", || async {
        matches!(http_get(&url).await, Ok((200, _, _))).then_some(())
    })
    .await;
}

async fn http_publish(node: &Node, room: &str, key: Option<&str>, data: Value) -> (u16, Value) {
    let auth = format!("Bearer {}", any_token("backend"));
    let mut headers = vec![("authorization", auth.as_str())];
    if let Some(k) = key {
        headers.push(("idempotency-key", k));
    }
    let (status, _, body) = http(
        "POST",
        &format!("{}/api/rooms/{room}/messages", node.http_url()),
        &headers,
        data.to_string().as_bytes(),
    )
    .await
    .unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn ws_publish(ws: &mut Ws, room: &str, key: &str, data: Value) -> Value {
    ws.send(json!({"type":"publish","room":room,"data":data,"key":key,"id":"p"}))
        .await;
    loop {
        let v = ws.json().await;
        if v["id"] == "p" {
            return v;
        }
    }
}

/// The same key twice, from `first` then `second`, gives one message.
async fn once_across(first: &Node, second: &Node) {
    let (mut member, _) = Ws::open(&second.ws_url(), "member").await;
    member.join("idem").await;
    let (mut p, _) = Ws::open(&first.ws_url(), "p").await;
    let ack = ws_publish(&mut p, "idem", "order-17", json!("once")).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let seq = ack["seq"].as_u64().unwrap();
    // A retry over WebSocket on the other node, and over HTTP on both.
    let (mut q, _) = Ws::open(&second.ws_url(), "p").await;
    let retry = ws_publish(&mut q, "idem", "order-17", json!("once")).await;
    assert_eq!(
        (retry["type"].as_str(), retry["seq"].as_u64()),
        (Some("ack"), Some(seq))
    );
    for node in [first, second] {
        let (status, body) = http_publish(node, "idem", Some("order-17"), json!("once")).await;
        assert_eq!((status, body["seq"].as_u64()), (200, Some(seq)), "{body}");
    }
    // A different room with the same key is a different message.
    let other = ws_publish(&mut p, "idem-2", "order-17", json!("other")).await;
    assert_eq!(other["seq"], 1);
    // The member got the message once: the next message it sees is the next seq.
    let next = ws_publish(&mut p, "idem", "order-18", json!("next")).await;
    assert_eq!(next["seq"].as_u64(), Some(seq + 1));
    let got: Vec<u64> = messages(&mut member, 2)
        .await
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(got, [seq, seq + 1]);
    let dups = |m: wsgate_testkit::Metrics| m.value("wsgate_publish_duplicates_total", &[]);
    let mut m = dups(first.metrics().await);
    if second.ops_url() != first.ops_url() {
        m += dups(second.metrics().await);
    }
    assert_eq!(m, 3.0, "three retries answered from the key");
}

#[tokio::test]
async fn a_key_publishes_once_in_process() {
    let node = Node::start(&[]).await;
    once_across(&node, &node).await;
}

#[tokio::test]
async fn a_key_publishes_once_across_nodes_on_redis() {
    let redis = Redis::start();
    let a = Node::start(&["--redis-url", &redis.url()]).await;
    let b = Node::start(&["--redis-url", &redis.url()]).await;
    ready(&a).await;
    ready(&b).await;
    once_across(&a, &b).await;
    // The key lives for the window, then the same key publishes again.
    let ttl: i64 = redis.query(redis::cmd("TTL").arg("wsgate:{idem}:idem:order-17"));
    assert!(ttl > 290 && ttl <= 300, "5-minute window: {ttl}");
    let _: i64 = redis.query(redis::cmd("DEL").arg("wsgate:{idem}:idem:order-17"));
    let (status, body) = http_publish(&a, "idem", Some("order-17"), json!("again")).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["seq"], 3,
        "a key past its window publishes again: {body}"
    );
}

#[tokio::test]
async fn bad_keys_are_refused() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "u").await;
    for bad in [json!(""), json!("a b"), json!(5), json!("k".repeat(65))] {
        ws.send(json!({"type":"publish","room":"r","data":1,"key":bad,"id":"b"}))
            .await;
        let v = ws.json().await;
        assert_eq!(
            (v["code"].as_str(), v["id"].as_str()),
            (Some("bad_request"), Some("b")),
            "{v}"
        );
    }
    for bad in ["", "a b", &"k".repeat(65)] {
        let (status, body) = http_publish(&node, "r", Some(bad), json!(1)).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
    }
}
