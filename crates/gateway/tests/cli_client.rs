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

/// Run `cmd` to completion, killed (and the test failed) after `WAIT`.
async fn finish(mut child: std::process::Child) -> std::process::Output {
    let deadline = std::time::Instant::now() + wsgate_testkit::WAIT;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {:?}: {}",
                wsgate_testkit::WAIT,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.wait_with_output().unwrap()
}

fn client(url: &str, token: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.args(["client", "--url", url, "--room", "lobby", "--token", token])
        .args(["--backoff-base", "10ms", "--backoff-cap", "50ms"])
        .env_remove("WSGATE_TOKEN_COMMAND")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[tokio::test]
async fn a_refused_static_token_stops_with_the_servers_reason() {
    let node = BinNode::start_with(std::path::Path::new(env!("CARGO_BIN_EXE_wsgate")), &[]).await;
    let claims = wsgate_testkit::claims("mallory");
    let wrong = wsgate_testkit::sign("HS256", b"not-the-secret", &claims);
    let out = finish(client(&node.ws_url(), &wrong).spawn().unwrap()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad token signature"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn an_expired_static_token_stops_with_a_hint_instead_of_retrying() {
    // Leeway 0: the node closes 4001 at `exp`, about a second from now.
    let node = BinNode::start_with(
        std::path::Path::new(env!("CARGO_BIN_EXE_wsgate")),
        &["--jwt-secret", wsgate_testkit::SECRET, "--jwt-leeway", "0s"],
    )
    .await;
    let token = wsgate_testkit::token("dave", &["*"], &["*"], std::time::Duration::from_secs(2));
    let out = finish(client(&node.ws_url(), &token).spawn().unwrap()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stdout.contains("\"event\":\"connected\""), "{stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("--token-command"), "{stderr}");
}

#[tokio::test]
async fn a_closed_pipe_ends_the_client_quietly() {
    let node = BinNode::start_with(std::path::Path::new(env!("CARGO_BIN_EXE_wsgate")), &[]).await;
    // `wsgate client ... 2>&1 | head -0`: both outputs go to a pipe whose
    // reader is gone before the first line.
    // (A socket pair: writing to it after the peer closed is EPIPE too.)
    let (reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(reader);
    let mut cmd = client(&node.ws_url(), &any_token("erin"));
    let out_fd = std::os::fd::OwnedFd::from(writer.try_clone().unwrap());
    cmd.stdout(out_fd)
        .stderr(std::os::fd::OwnedFd::from(writer));
    let out = finish(cmd.spawn().unwrap()).await;
    assert_eq!(out.status.code(), Some(0), "{:?}", out.status);
}

#[test]
fn token_with_a_zero_ttl_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["token", "--jwt-secret", "s", "--sub", "a", "--ttl", "0s"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ttl"));
    assert!(out.stdout.is_empty());
}
