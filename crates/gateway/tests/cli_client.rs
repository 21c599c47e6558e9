//! `wsgate client` in the real binary: join, publish stdin lines, print
//! events as JSON lines.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use wsgate_testkit::{any_token, BinNode};

#[tokio::test]
async fn wsgate_client_publishes_stdin_and_prints_events() {
    let node = BinNode::start_with(std::path::Path::new(env!("CARGO_BIN_EXE_wsgate")), &[]).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args([
            "client",
            "--url",
            &node.ws_url(),
            "--room",
            "lobby",
            "--exit-on-eof",
        ])
        .env("WSGATE_TOKEN", any_token("carol"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"text\":\"hi\"}\n")
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["connected", "joined", "message", "ack"],
        "{events:?}"
    );
    assert_eq!(events[0]["user"], "carol");
    assert_eq!(events[2]["data"], serde_json::json!({"text": "hi"}));
    assert_eq!(events[2]["from"], "carol");
    assert_eq!(events[3]["seq"], 1);
}
