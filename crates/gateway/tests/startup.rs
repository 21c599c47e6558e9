//! OPERATING.md: the `wsgate` binary's start-up. Bad configuration (a bad
//! flag or value, no key, an unreadable key or certificate, a listener that
//! cannot be bound, a malformed Redis URL) stops the start with one clear
//! line on stderr and a non-zero exit, never a panic. Also `wsgate token`,
//! environment variables, and `--dev` mode.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use wsgate_testkit::{http_get, BinNode, Ws, SECRET, WAIT};

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// Run the binary to completion (bounded), with extra environment.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Never inherit configuration from the test environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("WSGATE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "wsgate {args:?} did not exit: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `serve` on free loopback ports with `extra`; must fail with one line.
fn assert_refused(extra: &[&str], env: &[(&str, &str)], mentions: &str) {
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--ops-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let out = run(&args, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{extra:?} started: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stdout.contains("panicked"),
        "{extra:?} panicked: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{extra:?}: one line on stderr, got {stderr:?}"
    );
    assert!(
        lines[0].contains(mentions),
        "{extra:?}: the line should mention {mentions:?}: {}",
        lines[0]
    );
}

#[test]
fn no_jwt_key_outside_dev_mode() {
    assert_refused(&[], &[], "JWT key");
}

#[test]
fn exactly_one_key_source_and_usable_jwks_flags() {
    let jwks = "http://127.0.0.1:9/jwks.json";
    assert_refused(&[], &[], "--jwt-jwks-url");
    for other in [["--jwt-secret", "s"], ["--jwt-public-key", "/tmp/k.pem"]] {
        let mut args = other.to_vec();
        args.extend(["--jwt-jwks-url", jwks]);
        assert_refused(&args, &[], "--jwt-jwks-url");
    }
    // A key source from the environment counts too.
    assert_refused(
        &["--jwt-jwks-url", jwks],
        &[("WSGATE_JWT_SECRET", "s")],
        "--jwt-jwks-url",
    );
    assert_refused(
        &["--jwt-jwks-url", "ftp://idp.example/jwks"],
        &[],
        "http://",
    );
    assert_refused(
        &["--jwt-jwks-url", jwks, "--jwks-refresh", "soon"],
        &[],
        "--jwks-refresh",
    );
    assert_refused(
        &[
            "--jwt-jwks-url",
            jwks,
            "--jwks-ca-cert",
            "/nonexistent/ca.pem",
        ],
        &[],
        "/nonexistent/ca.pem",
    );
}

#[test]
fn bad_flags_and_values() {
    assert_refused(
        &["--jwt-secret", "s", "--heartbeat", "soon"],
        &[],
        "--heartbeat",
    );
    assert_refused(
        &["--jwt-secret", "s", "--drain-timeout", "10"],
        &[],
        "--drain-timeout",
    );
    assert_refused(
        &["--jwt-secret", "s", "--no-such-flag"],
        &[],
        "--no-such-flag",
    );
    assert_refused(
        &["--jwt-secret", "s", "--max-connections", "many"],
        &[],
        "--max-connections",
    );
    assert_refused(
        &["--jwt-secret", "s", "--max-message-bytes", "0"],
        &[],
        "--max-message-bytes",
    );
    assert_refused(&["--jwt-secret", "s", "--log", "wsgate=[[["], &[], "--log");
    assert_refused(
        &["--jwt-secret", "s", "--tls-cert", "/tmp/x.pem"],
        &[],
        "--tls-key",
    );
    assert_refused(
        &["--jwt-secret", "s", "--listen", "nowhere"],
        &[],
        "--listen",
    );
    assert_refused(
        &["--jwt-secret", "s", "--jwt-public-key", "/tmp/k.pem"],
        &[],
        "--jwt-public-key",
    );
}

#[test]
fn bad_values_from_the_environment() {
    assert_refused(
        &[],
        &[("WSGATE_JWT_SECRET", "s"), ("WSGATE_HEARTBEAT", "soon")],
        "soon",
    );
    assert_refused(&[], &[("WSGATE_JWT_SECRET", "")], "--jwt-secret");
}

#[test]
fn unbindable_listeners() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(
        &[
            "serve",
            "--jwt-secret",
            "s",
            "--listen",
            &addr,
            "--ops-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
    let out = run(
        &[
            "serve",
            "--jwt-secret",
            "s",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            &addr,
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--ops-listen"), "{stderr}");
    drop(taken);
}

#[test]
fn malformed_redis_url() {
    for url in ["nope://x", "redis://[::1", "not a url"] {
        assert_refused(
            &["--jwt-secret", "s", "--redis-url", url],
            &[],
            "--redis-url",
        );
    }
    // The password of a malformed URL is not echoed.
    let out = run(
        &[
            "serve",
            "--jwt-secret",
            "s",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
            "--redis-url",
            "rediss://user:hunter2@[::1",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
}

#[test]
fn unreadable_or_unusable_keys_and_certificates() {
    let dir = std::env::temp_dir().join(format!("wsgate-startup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "this is not a key\n").unwrap();
    let garbage = garbage.to_str().unwrap();
    let private = format!("{FIXTURES}/rsa_private.pem");
    for key in ["/nonexistent/key.pem", garbage, private.as_str()] {
        assert_refused(&["--jwt-public-key", key], &[], key);
    }
    // A directory is unreadable as a key file.
    assert_refused(
        &["--jwt-public-key", dir.to_str().unwrap()],
        &[],
        "JWT public key",
    );
    let cert = format!("{FIXTURES}/rsa_public.pem");
    assert_refused(
        &[
            "--jwt-secret",
            "s",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ],
        &[],
        "/nonexistent/cert.pem",
    );
    assert_refused(
        &[
            "--jwt-secret",
            "s",
            "--tls-cert",
            garbage,
            "--tls-key",
            &private,
        ],
        &[],
        "certificate",
    );
    assert_refused(
        &[
            "--jwt-secret",
            "s",
            "--tls-cert",
            &cert,
            "--tls-key",
            garbage,
        ],
        &[],
        "TLS",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_and_version_still_work() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("serve") && help.contains("token"), "{help}");
    let out = run(&["serve", "--help"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--max-outbound-bytes"));
    let out = run(&["--version"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("wsgate"));
}

#[tokio::test]
async fn token_subcommand_mints_a_working_token() {
    let out = run(
        &[
            "token",
            "--jwt-secret",
            SECRET,
            "--sub",
            "alice",
            "--rooms",
            "lobby,team.*",
            "--publish",
            "lobby",
            "--ttl",
            "1h",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let node = wsgate_testkit::Node::start(&[]).await;
    let (mut ws, w) = Ws::open_with(&node.ws_url(), &token).await;
    assert_eq!(w.user, "alice");
    ws.join("lobby").await;
    ws.join("team.7").await;
    ws.send(json!({"type":"join","room":"admin","id":1})).await;
    assert_eq!(ws.json().await["code"], "forbidden");
    assert_eq!(ws.publish("lobby", json!(1)).await["type"], "ack");
    assert_eq!(ws.publish("team.7", json!(1)).await["code"], "forbidden");
    // The secret may come from the environment.
    let out = run(&["token", "--sub", "bob"], &[("WSGATE_JWT_SECRET", SECRET)]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    Ws::open_with(&node.ws_url(), &token).await;
}

#[tokio::test]
async fn flags_can_come_from_the_environment() {
    let ops = wsgate_testkit::free_port();
    let public = wsgate_testkit::free_port();
    let mut child = Command::new(BIN)
        .env("WSGATE_LISTEN", format!("127.0.0.1:{public}"))
        .env("WSGATE_OPS_LISTEN", format!("127.0.0.1:{ops}"))
        .env("WSGATE_JWT_SECRET", SECRET)
        .env("WSGATE_NODE_ID", "from-env")
        .env("WSGATE_HEARTBEAT", "1500ms")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let health = format!("http://127.0.0.1:{ops}/health");
    let deadline = Instant::now() + WAIT;
    while !matches!(http_get(&health).await, Ok((200, _, _))) {
        assert!(Instant::now() < deadline, "node from env did not come up");
        assert!(child.try_wait().unwrap().is_none(), "node from env exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, w) = Ws::open(&format!("ws://127.0.0.1:{public}/ws"), "alice").await;
    assert_eq!(w.node, "from-env");
    assert_eq!(w.heartbeat_ms, 1500);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn dev_mode_prints_a_token_on_stderr_and_serves_the_page() {
    // A `--jwt-*` flag keeps BinNode from adding the test secret: this is
    // dev mode with no key configured, so a random secret.
    let mut node = BinNode::start_with(Path::new(BIN), &["--dev", "--jwt-leeway", "5s"]).await;
    let (status, headers, page) = http_get(&format!("http://{}/", node.addr)).await.unwrap();
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/html")));
    assert!(page.to_lowercase().contains("<html"), "{page}");
    let (status, _, js) = http_get(&format!("http://{}/wsgate.js", node.addr))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(!js.is_empty());
    let (status, _, body) = http_get(&format!("http://{}/dev/token?sub=bob", node.addr))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let bob = v["token"].as_str().unwrap().to_owned();
    let (mut ws, w) = Ws::open_with(&node.ws_url(), &bob).await;
    assert_eq!(w.user, "bob");
    ws.join("anything").await;
    assert_eq!(ws.publish("anything", json!(1)).await["type"], "ack");

    // The printed token: on stderr, not in the stdout log stream; sub "dev".
    node.signal("TERM");
    assert!(node.wait_exit(WAIT).await.is_some_and(|s| s.success()));
    let stderr = std::fs::read_to_string(&node.stderr).unwrap();
    let stdout = std::fs::read_to_string(&node.stdout).unwrap();
    let printed = stderr
        .split_whitespace()
        .find(|w| w.split('.').count() == 3 && w.starts_with("eyJ"))
        .expect("a token on stderr");
    assert!(
        !stdout.contains(printed),
        "the dev token leaked into the logs"
    );
    assert!(!stdout.contains(&bob), "a dev token leaked into the logs");
}

#[tokio::test]
async fn dev_token_endpoint_only_in_dev_mode() {
    let node = wsgate_testkit::Node::start(&[]).await;
    let (status, _, _) = http_get(&format!("{}/dev/token?sub=bob", node.http_url()))
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, _, _) = http_get(&format!("{}/", node.http_url())).await.unwrap();
    assert_eq!(status, 404);
}

/// The URL dev mode prints on stderr (`chat page at URL`), once it is there.
async fn printed_page_url(node: &BinNode) -> String {
    wsgate_testkit::eventually("the chat page URL on stderr", || async {
        let stderr = std::fs::read_to_string(&node.stderr).unwrap_or_default();
        stderr
            .split("chat page at ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    })
    .await
}

#[tokio::test]
async fn dev_mode_prints_a_page_url_whose_origin_it_accepts() {
    // The recipe of issue 17: another port, another origin given; the
    // printed URL's origin is allowed too, and so is the IP form.
    let node = BinNode::start_with(
        Path::new(BIN),
        &["--dev", "--allowed-origins", "https://app.example"],
    )
    .await;
    let url = printed_page_url(&node).await;
    let port = node.addr.port();
    assert_eq!(url, format!("http://localhost:{port}/"));
    let token = wsgate_testkit::any_token("dev");
    for origin in [
        url.trim_end_matches('/').to_owned(),
        format!("http://127.0.0.1:{port}"),
        "https://app.example".to_owned(),
    ] {
        let ws = Ws::connect(&node.ws_url(), Some(&token), Some(&origin)).await;
        assert!(ws.is_ok(), "origin {origin} refused: {:?}", ws.err());
    }
    let refused = Ws::connect(&node.ws_url(), Some(&token), Some("http://0.0.0.0:8080"))
        .await
        .err()
        .expect("another origin is refused");
    assert_eq!(refused.status, 403);

    // The page's probe says why a WebSocket would be refused.
    let check = |query: String| {
        let url = format!("http://{}/dev/check?{query}", node.addr);
        async move { http_get(&url).await.unwrap() }
    };
    let (status, headers, body) = check("origin=http%3A%2F%2F0.0.0.0%3A8080".into()).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("origin http://0.0.0.0:8080 not allowed"),
        "{body}"
    );
    assert!(headers
        .iter()
        .any(|(k, v)| k == "access-control-allow-origin" && v == "*"));
    let (status, _, body) = check(format!("origin=http://localhost:{port}&token=nope")).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("malformed token"), "{body}");
    let (status, _, body) = check(format!("origin=http://localhost:{port}&token={token}")).await;
    assert_eq!(status, 200, "{body}");
}
