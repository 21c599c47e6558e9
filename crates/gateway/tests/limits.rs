//! Rate limits beyond one connection's publish bucket (issue 9 item 6): a
//! join rate per connection, and a publish rate per user that every
//! connection of the same `sub` on the node and the HTTP API share.
//!
//! Rates are tiny (0.01/s: one token per 100 s) so that no refill happens
//! during a test, however slow the machine: only the bursts count.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use wsgate_testkit::{any_token, header, http, HttpResponse, Node, Ws};

async fn api_publish(node: &Node, sub: &str) -> HttpResponse {
    let auth = format!("Bearer {}", any_token(sub));
    let url = format!("{}/api/rooms/lobby/messages", node.http_url());
    http("POST", &url, &[("authorization", &auth)], b"1")
        .await
        .unwrap()
}

fn code(v: &Value) -> &str {
    v["code"].as_str().or(v["type"].as_str()).unwrap_or("")
}

#[tokio::test]
async fn joins_beyond_the_join_burst_are_rate_limited() {
    let node = Node::start(&["--join-rate", "0.01", "--join-burst", "3"]).await;
    let (mut a, _) = Ws::open(&node.ws_url(), "alice").await;
    for room in ["r1", "r2", "r3"] {
        a.join(room).await;
    }
    a.send(json!({"type":"join","room":"r4","id":"j4"})).await;
    let v = a.json().await;
    assert_eq!(
        (code(&v), v["id"].as_str()),
        ("rate_limited", Some("j4")),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("join rate"), "{v}");
    // Leaving is never limited, and the refused join left no membership.
    a.send(json!({"type":"leave","room":"r1","id":"l"})).await;
    assert_eq!(a.json().await["type"], "left");
    assert_eq!(node.metrics().await.value("wsgate_rooms_active", &[]), 2.0);
    // The limit is per connection: another one of the same user joins.
    let (mut b, _) = Ws::open(&node.ws_url(), "alice").await;
    b.join("r4").await;
}

#[tokio::test]
async fn one_users_connections_and_http_calls_share_one_publish_bucket() {
    let node = Node::start(&[
        "--publish-rate",
        "0.01",
        "--publish-burst",
        "3",
        "--user-publish-rate",
        "0.01",
        "--user-publish-burst",
        "3",
    ])
    .await;
    let (mut a1, _) = Ws::open(&node.ws_url(), "alice").await;
    let (mut a2, _) = Ws::open(&node.ws_url(), "alice").await;
    let (mut bob, _) = Ws::open(&node.ws_url(), "bob").await;

    assert_eq!(code(&a1.publish("lobby", json!(1)).await), "ack");
    assert_eq!(code(&a2.publish("lobby", json!(2)).await), "ack");
    let (status, _, body) = api_publish(&node, "alice").await;
    assert_eq!(status, 200, "{body}");
    // Alice's three are spent, whichever way she publishes.
    let v = a2.publish("lobby", json!(3)).await;
    assert_eq!(code(&v), "rate_limited", "{v}");
    assert!(v["message"].as_str().unwrap().contains("user"), "{v}");
    assert_eq!(code(&a1.publish("lobby", json!(4)).await), "rate_limited");
    let resp = api_publish(&node, "alice").await;
    assert_eq!(resp.0, 429, "{}", resp.2);
    let retry: u64 = header(&resp, "retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
    let v: Value = serde_json::from_str(&resp.2).unwrap();
    assert_eq!(v["error"], "rate_limited");

    // Another user is not affected, over either path.
    assert_eq!(code(&bob.publish("lobby", json!(5)).await), "ack");
    assert_eq!(api_publish(&node, "bob").await.0, 200);
    // Only accepted messages were published: 3 of alice's, 2 of bob's.
    let m = node.metrics().await;
    assert_eq!(m.value("wsgate_messages_published_total", &[]), 5.0);
}

#[tokio::test]
async fn the_user_bucket_can_be_set_apart_from_the_connection_bucket() {
    let node = Node::start(&[
        "--publish-rate",
        "0.01",
        "--publish-burst",
        "2",
        "--user-publish-rate",
        "0.01",
        "--user-publish-burst",
        "5",
    ])
    .await;
    let (mut a1, _) = Ws::open(&node.ws_url(), "alice").await;
    let (mut a2, _) = Ws::open(&node.ws_url(), "alice").await;
    for ws in [&mut a1, &mut a2] {
        assert_eq!(code(&ws.publish("lobby", json!(1)).await), "ack");
        assert_eq!(code(&ws.publish("lobby", json!(2)).await), "ack");
        // The connection's own bucket (2) is the limit here.
        let v = ws.publish("lobby", json!(3)).await;
        assert_eq!(v["message"], "publish rate limit exceeded; message dropped");
    }
    // A connection refused by its own bucket took nothing from the user's:
    // one of the five is left, for the HTTP API.
    assert_eq!(api_publish(&node, "alice").await.0, 200);
    assert_eq!(api_publish(&node, "alice").await.0, 429);
}
