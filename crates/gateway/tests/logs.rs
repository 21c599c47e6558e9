//! Logs (OPERATING.md "Logs", PROTOCOL.md section 1): JSON lines on stdout,
//! and no token or secret in any line, even at `--log trace`, whichever way
//! the token came (header, `?token=`, `refresh`, HTTP API) and whether it
//! was accepted or refused; nor the server API key, right or wrong.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use wsgate_testkit::{
    any_token, claims, http, now_secs, sign, sign_hs256, BinNode, Ws, SECRET, WAIT,
};

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");
const API_KEY: &str = "server-api-key-5f1e9a";

/// A distinct valid token for `sub`.
fn fresh(sub: &str) -> String {
    let mut c = claims(sub);
    c["jti"] = json!(format!("{sub}-{}", wsgate_testkit::free_port()));
    sign_hs256(&c)
}

#[tokio::test]
async fn tokens_and_secrets_never_appear_in_logs() {
    let mut node = BinNode::start_with(
        Path::new(BIN),
        &[
            "--jwt-secret",
            SECRET,
            "--log",
            "trace",
            "--log-format",
            "json",
            "--heartbeat",
            "200ms",
            "--api-key",
            API_KEY,
        ],
    )
    .await;
    let mut tokens = Vec::new();

    // Header token, accepted; refresh with a good and a bad token.
    let header_token = fresh("alice");
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &header_token).await;
    ws.join("lobby").await;
    ws.publish("lobby", json!({"text": "hi"})).await;
    let good_refresh = fresh("alice");
    ws.send(json!({"type":"refresh","token":good_refresh,"id":1}))
        .await;
    assert_eq!(ws.json().await["type"], "refreshed");
    let bad_refresh = sign("HS256", b"wrong-secret", &claims("alice"));
    ws.send(json!({"type":"refresh","token":bad_refresh,"id":2}))
        .await;
    assert_eq!(ws.json().await["code"], "invalid_token");
    let other_sub = fresh("mallory");
    ws.send(json!({"type":"refresh","token":other_sub,"id":3}))
        .await;
    assert_eq!(ws.json().await["code"], "invalid_token");
    // A malformed frame that carries a token.
    let in_junk = fresh("alice");
    ws.send_text(&format!("{{\"type\":\"refresh\",\"token\":\"{in_junk}\""))
        .await;
    assert_eq!(ws.json().await["code"], "bad_request");
    tokens.extend([header_token, good_refresh, bad_refresh, other_sub, in_junk]);

    // Query-string token, accepted.
    let query_token = fresh("bob");
    let url = format!("{}?token={query_token}", node.ws_url());
    let mut q = Ws::connect(&url, None, None).await.unwrap();
    assert_eq!(q.json().await["type"], "welcome");
    tokens.push(query_token);

    // Refused tokens, in the header and in the query.
    let now = now_secs();
    let mut expired = claims("carol");
    expired["exp"] = json!(now - 3600);
    expired["iat"] = json!(now - 7200);
    let expired = sign_hs256(&expired);
    assert_eq!(
        Ws::connect(&node.ws_url(), Some(&expired), None)
            .await
            .err()
            .unwrap()
            .status,
        401
    );
    let forged = sign("HS256", b"wrong-secret", &claims("carol"));
    let url = format!("{}?token={forged}&x=1", node.ws_url());
    assert_eq!(
        Ws::connect(&url, None, None).await.err().unwrap().status,
        401
    );
    tokens.extend([expired, forged]);

    // The HTTP API, with the header and with a refused token.
    let api_token = fresh("svc");
    let bearer = format!("Bearer {api_token}");
    let (status, _, _) = http(
        "POST",
        &format!("http://{}/api/rooms/lobby/messages", node.addr),
        &[("authorization", &bearer)],
        b"{}",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let api_bad = sign("HS256", b"wrong-secret", &claims("svc"));
    let (status, _, _) = http(
        "POST",
        &format!(
            "http://{}/api/rooms/lobby/messages?token={api_bad}",
            node.addr
        ),
        &[],
        b"{}",
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    tokens.extend([api_token, api_bad, any_token("unused")]);

    // The server API key, right and wrong, in both headers.
    let wrong_key = "wrong-key-0d6e5b1c";
    for (header, value, path, want) in [
        (
            "x-api-key",
            API_KEY.to_owned(),
            "/api/users/nobody/disconnect",
            202,
        ),
        (
            "authorization",
            format!("apikey {API_KEY}"),
            "/api/rooms/lobby/history",
            200,
        ),
        (
            "x-api-key",
            wrong_key.to_owned(),
            "/api/users/nobody/disconnect",
            401,
        ),
    ] {
        let url = format!("http://{}{path}", node.addr);
        let body = if path.ends_with("disconnect") {
            &br#"{"revoke":true}"#[..]
        } else {
            b""
        };
        let method = if body.is_empty() { "GET" } else { "POST" };
        let (status, _, _) = http(method, &url, &[(header, &value)], body).await.unwrap();
        assert_eq!(status, want, "{path}");
    }

    // Let a heartbeat or two go by, then stop so that every line is written.
    let m = ws.json().await;
    assert_eq!((&m["type"], &m["from"]), (&json!("message"), &json!("svc")));
    let mut pings = 0;
    while pings < 2 {
        ws.send(json!({"type":"ping"})).await;
        assert_eq!(ws.json().await["type"], "pong");
        pings += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(ws);
    drop(q);
    node.signal("TERM");
    assert!(node.wait_exit(WAIT).await.is_some_and(|s| s.success()));

    let stdout = std::fs::read_to_string(&node.stdout).unwrap();
    let stderr = std::fs::read_to_string(&node.stderr).unwrap();
    let all = format!("{stdout}{stderr}");
    assert!(
        stdout.lines().count() > 10,
        "trace logging produced too little to be a test: {stdout}"
    );
    for line in stdout.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v.is_object(), "{line}");
    }
    // The logs did see the requests that carried the tokens.
    assert!(all.contains("/ws"), "no request was logged");
    assert!(
        all.contains("/api/rooms/lobby/messages"),
        "no API request logged"
    );
    for t in &tokens {
        let signature = t.rsplit('.').next().unwrap();
        assert!(!all.contains(t.as_str()), "a token appears in the logs");
        assert!(
            !all.contains(signature),
            "a token's signature appears in the logs"
        );
    }
    assert!(!all.contains(SECRET), "the secret appears in the logs");
    assert!(
        all.contains("/api/users/nobody/disconnect"),
        "no server API call logged"
    );
    assert!(!all.contains(API_KEY), "the API key appears in the logs");
    assert!(
        !all.contains("wrong-key-0d6e5b1c"),
        "a presented key appears in the logs"
    );
}
