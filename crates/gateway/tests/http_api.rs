//! PROTOCOL.md section 4: `POST /api/rooms/{room}/messages`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{json, Value};
use wsgate_testkit::{any_token, header, http, sign, token, HttpResponse, Node, Ws};

async fn post(node: &Node, room: &str, auth: Option<&str>, body: &[u8]) -> HttpResponse {
    let bearer = auth.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b.as_str()));
    }
    http(
        "POST",
        &format!("{}/api/rooms/{room}/messages", node.http_url()),
        &headers,
        body,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn publish_answers_room_and_seq_and_reaches_members_with_from() {
    let node = Node::start(&[]).await;
    let (mut member, _) = Ws::open(&node.ws_url(), "member").await;
    member.join("lobby").await;
    let backend = token("billing-service", &[], &["lobby"], Duration::from_secs(600));
    let bodies = [
        json!({"text": "invoice paid", "n": [1, 2]}),
        json!("a string"),
        json!(42),
        json!(null),
        json!([true, false]),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let (status, _, text) =
            post(&node, "lobby", Some(&backend), body.to_string().as_bytes()).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v, json!({"room": "lobby", "seq": i + 1}));
    }
    for (i, body) in bodies.iter().enumerate() {
        let m = member.json().await;
        assert_eq!(m["type"], "message");
        assert_eq!(m["seq"], i as u64 + 1);
        assert_eq!(m["from"], "billing-service");
        assert_eq!(&m["data"], body);
        assert!(m["ts"].as_u64().is_some());
    }
    // The same seq counter as WebSocket publishes.
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    assert_eq!(ws.publish("lobby", json!(1)).await["seq"], 6);
    let (status, _, text) = post(&node, "lobby", Some(&backend), b"{}").await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["seq"], 7);
    // Whitespace around the JSON body is fine.
    let (status, _, _) = post(&node, "lobby", Some(&backend), b"  {\"a\":1}\n").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn no_or_bad_token_is_401_with_a_bearer_challenge() {
    let node = Node::start(&[]).await;
    let other = sign("HS256", b"other-secret", &wsgate_testkit::claims("x"));
    for (what, auth) in [
        ("missing", None),
        ("malformed", Some("nope")),
        ("bad signature", Some(other.as_str())),
    ] {
        let resp = post(&node, "lobby", auth, b"{}").await;
        assert_eq!(resp.0, 401, "{what}: {resp:?}");
        assert!(
            header(&resp, "www-authenticate").is_some_and(|v| v.starts_with("Bearer")),
            "{what}: {resp:?}"
        );
    }
}

#[tokio::test]
async fn no_publish_grant_is_403() {
    let node = Node::start(&[]).await;
    let t = token("reader", &["*"], &["news.*"], Duration::from_secs(600));
    let resp = post(&node, "lobby", Some(&t), b"{}").await;
    assert_eq!(resp.0, 403, "{resp:?}");
    let resp = post(&node, "news.today", Some(&t), b"{}").await;
    assert_eq!(resp.0, 200, "{resp:?}");
}

#[tokio::test]
async fn bad_json_or_bad_room_is_400() {
    let node = Node::start(&[]).await;
    let t = any_token("svc");
    for body in [&b"{"[..], b"", b"hello", b"{\"a\":1} trailing", b"\xff\xfe"] {
        let resp = post(&node, "lobby", Some(&t), body).await;
        assert_eq!(resp.0, 400, "body {body:?}: {resp:?}");
    }
    let long = "r".repeat(129);
    for room in ["bad%20room", "%C3%A4", long.as_str(), "a%2Fb"] {
        let resp = post(&node, room, Some(&t), b"{}").await;
        assert_eq!(resp.0, 400, "room {room}: {resp:?}");
    }
    // Nothing was published.
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    assert_eq!(ws.join("lobby").await["seq"], 0);
}

#[tokio::test]
async fn body_over_the_maximum_is_413() {
    let node = Node::start(&["--max-message-bytes", "1024"]).await;
    let t = any_token("svc");
    let exact = format!("\"{}\"", "x".repeat(1022));
    assert_eq!(exact.len(), 1024);
    let resp = post(&node, "lobby", Some(&t), exact.as_bytes()).await;
    assert_eq!(resp.0, 200, "exactly the maximum: {resp:?}");
    let over = format!("\"{}\"", "x".repeat(1023));
    let resp = post(&node, "lobby", Some(&t), over.as_bytes()).await;
    assert_eq!(resp.0, 413, "{resp:?}");
    let big = format!("\"{}\"", "x".repeat(100_000));
    let resp = post(&node, "lobby", Some(&t), big.as_bytes()).await;
    assert_eq!(resp.0, 413);
}
