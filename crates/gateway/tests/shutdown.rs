//! Graceful shutdown (OPERATING.md "Signals", PROTOCOL.md 1001 and the 503
//! while draining): in-process through the stop token, and on the built
//! binary with SIGTERM and SIGINT.
//!
//! A raw client that never reads keeps each drain open for a moment (the
//! server lingers for its Close reply), so that the draining state can be
//! observed without racing the exit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use serde_json::json;
use wsgate_testkit::{
    any_token, eventually, header, http_get, BinNode, Ended, Node, RawWs, Ws, WAIT,
};

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// Poll `/ready` until it answers 503.
async fn wait_not_ready(ops_url: &str) {
    let url = format!("{ops_url}/ready");
    eventually("/ready turns 503", || {
        let url = url.clone();
        async move { matches!(http_get(&url).await, Ok((503, _, _))).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn draining_node_closes_with_1001_fails_ready_and_refuses_upgrades() {
    let node = Node::start(&["--drain-timeout", "5s"]).await;
    let (mut a, _) = Ws::open(&node.ws_url(), "alice").await;
    a.join("lobby").await;
    let mut lingering = RawWs::connect(node.addr, &any_token("silent")).await;
    node.begin_stop();
    assert_eq!(a.ended().await, Ended::Close(1001));
    wait_not_ready(&node.ops_url()).await;
    // Liveness is unaffected while draining.
    let (status, _, _) = http_get(&format!("{}/health", node.ops_url()))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let r = Ws::connect(&node.ws_url(), Some(&any_token("late")), None)
        .await
        .err()
        .expect("an upgrade was accepted while draining");
    assert_eq!(r.status, 503);
    assert!(
        r.headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("retry-after") && !v.is_empty()),
        "{r:?}"
    );
    // The silent client got its 1001 too.
    assert_eq!(lingering.ended().await, Ended::Close(1001));
    node.stop().await;
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let mut node = BinNode::start_with(Path::new(BIN), &["--drain-timeout", "4s"]).await;
    let (mut a, _) = Ws::open(&node.ws_url(), "alice").await;
    let (mut b, _) = Ws::open(&node.ws_url(), "bob").await;
    a.join("lobby").await;
    b.join("lobby").await;
    let mut lingering = RawWs::connect(node.addr, &any_token("silent")).await;
    node.signal("TERM");
    assert_eq!(a.ended().await, Ended::Close(1001));
    assert_eq!(b.ended().await, Ended::Close(1001));
    wait_not_ready(&node.ops_url()).await;
    let refused = Ws::connect(&node.ws_url(), Some(&any_token("late")), None).await;
    assert_eq!(refused.err().map(|r| r.status), Some(503));
    assert_eq!(lingering.ended().await, Ended::Close(1001));
    let status = node.wait_exit(WAIT).await.expect("exited");
    assert!(status.success(), "exit status {status}: {}", node.logs());
    assert!(!node.logs().contains("panicked"));
}

#[tokio::test]
async fn sigint_drains_the_same_way() {
    let mut node = BinNode::start_with(Path::new(BIN), &["--drain-timeout", "2s"]).await;
    let (mut a, _) = Ws::open(&node.ws_url(), "alice").await;
    a.send(json!({"type":"ping"})).await;
    assert_eq!(a.json().await["type"], "pong");
    node.signal("INT");
    assert_eq!(a.ended().await, Ended::Close(1001));
    let status = node.wait_exit(WAIT).await.expect("exited");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn a_client_that_never_answers_does_not_hold_the_exit() {
    // Drain budget shorter than the server's wait for a Close reply: the
    // process still exits 0, on its own.
    let mut node = BinNode::start_with(Path::new(BIN), &["--drain-timeout", "1s"]).await;
    let _silent: Vec<RawWs> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(RawWs::connect(node.addr, &any_token(&format!("s{i}"))).await);
        }
        v
    };
    node.signal("TERM");
    let status = node.wait_exit(WAIT).await.expect("exited");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn idle_node_exits_0_on_sigterm() {
    let mut node = BinNode::start_with(Path::new(BIN), &[]).await;
    let resp = http_get(&format!("{}/ready", node.ops_url()))
        .await
        .unwrap();
    assert_eq!(resp.0, 200);
    assert!(header(&resp, "retry-after").is_none());
    node.signal("TERM");
    let status = node.wait_exit(WAIT).await.expect("exited");
    assert!(status.success(), "exit status {status}");
}
