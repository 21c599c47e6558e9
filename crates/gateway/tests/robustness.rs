//! A session survives what a client can throw at it and ends cleanly
//! however the client goes (issue 9 items 4 and 8, issue 17 item 7):
//! a killed client is "closed by client", not a 1002 protocol error; a
//! token with `exp` = 2^64-1 neither panics nor breaks the connection; a
//! `refresh` that takes away a room's grant leaves that room.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use wsgate_testkit::{
    any_token, claims, eventually, metrics, sign_hs256, token, BinNode, Node, RawWs, Redis, Ws,
};

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

async fn bin_node() -> BinNode {
    BinNode::start_with(Path::new(BIN), &["--log", "info", "--log-format", "json"]).await
}

fn count(logs: &str, needle: &str) -> usize {
    logs.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test]
async fn a_killed_client_is_closed_by_client_not_a_1002() {
    let node = bin_node().await;
    // One peer ends with EOF (FIN), one with a reset (RST, SO_LINGER 0):
    // what a `kill -9` of the client process leaves the server.
    for reset in [false, true] {
        let mut ws = RawWs::connect(node.addr, &any_token("killed")).await;
        assert_eq!(ws.json().await["type"], "welcome");
        ws.send_text(r#"{"type":"join","room":"lobby","id":1}"#)
            .await;
        assert_eq!(ws.json().await["type"], "joined");
        if reset {
            ws.stream.set_zero_linger().unwrap();
        }
        drop(ws);
    }
    let ops = node.ops_url();
    eventually("both connections released", || {
        let ops = ops.clone();
        async move {
            let m = metrics(&ops).await;
            (m.value("wsgate_connections_active", &[("transport", "ws")]) == 0.0
                && m.value("wsgate_rooms_active", &[]) == 0.0)
                .then_some(())
        }
    })
    .await;
    let logs = eventually("two close lines logged", || {
        let logs = node.logs();
        async move { (count(&logs, "connection closed by client") == 2).then_some(logs) }
    })
    .await;
    assert_eq!(count(&logs, "connection closed by server"), 0, "{logs}");
    let m = metrics(&ops).await;
    assert_eq!(
        m.value("wsgate_connection_closes_total", &[("code", "1002")]),
        0.0
    );
}

/// A token for `alice` that expires at the end of time.
fn endless_token() -> String {
    let mut c = claims("alice");
    c["exp"] = json!(u64::MAX);
    sign_hs256(&c)
}

#[tokio::test]
async fn a_token_with_the_largest_exp_connects_and_refreshes_without_panic() {
    let node = bin_node().await;
    let (mut ws, w) = Ws::open_with(&node.ws_url(), &endless_token()).await;
    assert_eq!(w.user, "alice");
    ws.join("lobby").await;
    assert_eq!(ws.publish("lobby", json!(1)).await["type"], "ack");

    ws.send(json!({"type":"refresh","token":endless_token(),"id":"r"}))
        .await;
    let v = ws.json().await;
    assert_eq!(v["type"], "refreshed", "{v}");
    assert_eq!(v["exp"], json!(u64::MAX));
    // Still up and still a member after the refresh.
    assert_eq!(ws.publish("lobby", json!(2)).await["type"], "ack");
    ws.send(json!({"type":"ping","id":"p"})).await;
    let v = ws.json().await;
    assert_eq!(
        (v["type"].as_str(), v["id"].as_str()),
        (Some("pong"), Some("p"))
    );
    assert!(!node.logs().contains("panicked"), "{}", node.logs());
}

#[tokio::test]
async fn absurd_heartbeat_and_pong_timeout_do_not_overflow() {
    let huge = "500000000000y";
    let node = Node::start(&["--heartbeat", huge, "--pong-timeout", huge]).await;
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &endless_token()).await;
    // Not a member yet: the ack is the only answer.
    assert_eq!(ws.publish("lobby", json!(1)).await["type"], "ack");
    // A resume with a replay (the paced path, patience = heartbeat + pong timeout).
    ws.send(json!({"type":"join","room":"lobby","since":0,"id":"s"}))
        .await;
    assert_eq!(ws.json().await["recovered"], true);
    assert_eq!(ws.json().await["seq"], 1);
}

#[test]
fn wsgate_token_refuses_an_absurd_ttl() {
    let out = std::process::Command::new(BIN)
        .args([
            "token",
            "--jwt-secret",
            "s",
            "--sub",
            "a",
            "--ttl",
            "500000000000y",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no token printed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ttl too large: at most 100 years"),
        "{stderr}"
    );
}

/// A refresh to a token without the room's grant: `left` (no id) before
/// `refreshed`, and nothing of the room afterwards, while another member
/// still gets it; a room whose only member was refreshed out is released.
async fn refresh_with_fewer_grants_leaves(node: &Node) {
    let (mut a, _) = Ws::open(&node.ws_url(), "alice").await;
    let (mut b, _) = Ws::open(&node.ws_url(), "bob").await;
    a.join("lobby").await;
    a.join("solo").await;
    a.join("team.1").await;
    b.join("lobby").await;

    let narrower = token("alice", &["team.*"], &["*"], Duration::from_secs(3600));
    a.send(json!({"type":"refresh","token":narrower,"id":9}))
        .await;
    let mut left = [a.json().await, a.json().await];
    left.sort_by_key(|v| v["room"].as_str().map(str::to_owned));
    assert_eq!(
        left,
        [
            json!({"type":"left","room":"lobby"}),
            json!({"type":"left","room":"solo"})
        ]
    );
    let v = a.json().await;
    assert_eq!(
        (v["type"].as_str(), &v["id"]),
        (Some("refreshed"), &json!(9))
    );

    // Bob is in `lobby`: his own message and its ack, in either order.
    b.send(json!({"type":"publish","room":"lobby","data":"after"}))
        .await;
    let mut kinds = [b.json().await, b.json().await];
    kinds.sort_by_key(|v| v["type"].as_str().map(str::to_owned));
    assert_eq!(
        (&kinds[0]["type"], &kinds[1]["data"]),
        (&json!("ack"), &json!("after"))
    );
    assert_eq!(b.publish("team.1", json!("kept")).await["type"], "ack");
    // `team.1` is still granted: alice gets its message, and nothing of
    // `lobby` came before it (bob got that one first, from the same node).
    let v = a.json().await;
    assert_eq!(
        (v["room"].as_str(), &v["data"]),
        (Some("team.1"), &json!("kept"))
    );
    a.send(json!({"type":"ping","id":"p"})).await;
    assert_eq!(a.json().await["type"], "pong");
    // Joining it again is refused under the new grants.
    a.send(json!({"type":"join","room":"lobby","id":"j"})).await;
    assert_eq!(a.json().await["code"], "forbidden");

    // `lobby` (bob) and `team.1` (alice) remain; `solo` is gone.
    let m = node.metrics().await;
    assert_eq!(m.value("wsgate_rooms_active", &[]), 2.0);
}

#[tokio::test]
async fn refresh_with_fewer_grants_leaves_the_rooms_in_process() {
    let node = Node::start(&[]).await;
    refresh_with_fewer_grants_leaves(&node).await;
}

#[tokio::test]
async fn refresh_with_fewer_grants_leaves_the_rooms_with_redis() {
    let redis = Redis::start();
    let url = redis.url();
    let node = Node::start(&["--redis-url", &url]).await;
    refresh_with_fewer_grants_leaves(&node).await;
    let ops = node.ops_url();
    eventually("the node unsubscribed from the room it left", || {
        let ops = ops.clone();
        async move {
            let m = metrics(&ops).await;
            (m.value("wsgate_broker_subscriptions", &[]) == 2.0).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn numeric_ids_come_back_as_the_client_wrote_them() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    for id in ["1e3", "-0", "1.50", "18446744073709551616"] {
        ws.send_text(&format!(r#"{{"type":"ping","id":{id}}}"#))
            .await;
        assert_eq!(ws.text().await, format!(r#"{{"type":"pong","id":{id}}}"#));
        ws.send_text(&format!(r#"{{"type":"join","room":"bad room","id":{id}}}"#))
            .await;
        let text = ws.text().await;
        assert!(text.ends_with(&format!(r#","id":{id}}}"#)), "{text}");
    }
}

#[tokio::test]
async fn deeply_nested_data_is_refused_over_websocket_and_http() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    ws.join("lobby").await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    ws.send_text(&format!(
        r#"{{"type":"publish","room":"lobby","data":{deep},"id":"d"}}"#
    ))
    .await;
    let v = ws.json().await;
    assert_eq!(
        (v["code"].as_str(), v["id"].as_str()),
        (Some("bad_request"), Some("d")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("nested deeper than 64"),
        "{v}"
    );

    let auth = format!("Bearer {}", any_token("backend"));
    let url = format!("{}/api/rooms/lobby/messages", node.http_url());
    let (status, _, body) =
        wsgate_testkit::http("POST", &url, &[("authorization", &auth)], deep.as_bytes())
            .await
            .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("nested deeper than 64"), "{body}");

    // 64 levels are fine, and nothing deeper was relayed before them.
    let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
    assert_eq!(
        ws.publish("lobby", serde_json::from_str(&ok).unwrap())
            .await["seq"],
        1
    );
}
