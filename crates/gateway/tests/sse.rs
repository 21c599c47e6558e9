//! PROTOCOL.md section 7: the fallback transport, Server-Sent Events plus
//! POST, against real nodes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use wsgate_testkit::{any_token, http, Node, Sse, Ws};

#[tokio::test]
async fn a_stream_gets_welcome_then_answers_and_messages_in_order() {
    let node = Node::start(&[]).await;
    let (mut sse, welcome) = Sse::open(node.addr, "alice").await;
    assert_eq!(welcome["transport"], "sse");
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["node"], node.node_id.as_str());
    assert_eq!(welcome["heartbeat_ms"], 30_000);
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    assert_eq!(sse.header("cache-control"), Some("no-cache"));
    assert_eq!(sse.header("x-accel-buffering"), Some("no"));

    let joined = sse.join("lobby").await;
    assert_eq!(
        (joined["type"].as_str(), joined["seq"].as_u64()),
        (Some("joined"), Some(0))
    );

    // A WebSocket member publishes; the stream gets the message.
    let (mut ws, _) = Ws::open(&node.ws_url(), "bob").await;
    ws.join("lobby").await;
    ws.publish("lobby", json!({"n": 1})).await;
    let m = sse.json().await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64(), m["from"].as_str()),
        (Some("message"), Some(1), Some("bob"))
    );

    // Publishing over POST: message and ack on the stream, in order.
    sse.send(json!({"type": "publish", "room": "lobby", "data": {"n": 2}, "id": "p"}))
        .await;
    let m = sse.json().await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64()),
        (Some("message"), Some(2))
    );
    let ack = sse.json().await;
    assert_eq!(
        (
            ack["type"].as_str(),
            ack["id"].as_str(),
            ack["seq"].as_u64()
        ),
        (Some("ack"), Some("p"), Some(2))
    );
    assert_eq!(ws.json().await["seq"], 2);
    node.stop().await;
}

#[tokio::test]
async fn a_post_answers_202_400_401_403_404_413() {
    let node = Node::start(&["--max-message-bytes", "1024"]).await;
    let (mut sse, _) = Sse::open(node.addr, "alice").await;
    let url = format!("{}/sse/{}", node.http_url(), sse.conn);
    let bearer = |sub: &str| format!("Bearer {}", any_token(sub));
    let post = |url: String, auth: String, body: Vec<u8>| async move {
        http("POST", &url, &[("authorization", &auth)], &body)
            .await
            .unwrap()
            .0
    };
    // An array, handled in order: the errors carry their ids.
    let frames = json!([{"type": "ping", "id": 1}, {"type": "nope", "id": 2}, 3]);
    assert_eq!(
        post(url.clone(), bearer("alice"), frames.to_string().into()).await,
        202
    );
    assert_eq!(sse.json().await, json!({"type": "pong", "id": 1}));
    let e = sse.json().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["id"].as_u64()),
        (Some("error"), Some("bad_request"), Some(2))
    );
    assert_eq!(sse.json().await["code"], "bad_request");

    assert_eq!(
        post(url.clone(), bearer("alice"), b"not json".to_vec()).await,
        400
    );
    assert_eq!(
        post(url.clone(), bearer("alice"), b"42".to_vec()).await,
        400
    );
    assert_eq!(
        post(url.clone(), "Bearer nope".into(), b"{}".to_vec()).await,
        401
    );
    assert_eq!(
        post(url.clone(), bearer("mallory"), b"{}".to_vec()).await,
        403
    );
    let big = format!("{{\"type\":\"ping\",\"id\":\"{}\"}}", "x".repeat(2000));
    assert_eq!(post(url.clone(), bearer("alice"), big.into()).await, 413);
    let missing = format!("{}/sse/c-0.{}", node.http_url(), "bm9uZQ");
    assert_eq!(post(missing, bearer("alice"), b"{}".to_vec()).await, 404);
    // The stream still works, and the refused POSTs left nothing on it.
    sse.send(json!({"type": "ping", "id": "after"})).await;
    assert_eq!(sse.json().await, json!({"type": "pong", "id": "after"}));
    node.stop().await;
}
