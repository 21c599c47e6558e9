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
    // PROTOCOL.md defines no order between a publisher's `ack` and its own
    // `message`: the CLI prints them as they come.
    assert_eq!(kinds[..2], ["connected", "joined"], "{events:?}");
    let mut rest = kinds[2..].to_vec();
    rest.sort_unstable();
    assert_eq!(rest, ["ack", "message"], "{events:?}");
    assert_eq!(events[0]["user"], "carol");
    let event = |kind: &str| events.iter().find(|e| e["event"] == kind).unwrap();
    assert_eq!(event("message")["data"], serde_json::json!({"text": "hi"}));
    assert_eq!(event("message")["from"], "carol");
    assert_eq!(event("ack")["seq"], 1);
}
