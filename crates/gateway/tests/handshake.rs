//! PROTOCOL.md section 1: the checks before the upgrade (Origin, token,
//! capacity, upgrade validity), where the token may come from, the time
//! claims' leeway, and what the `rooms` / `publish` claims grant.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use wsgate_protocol::ServerFrame;
use wsgate_testkit::{
    any_token, claims, eventually, http, now_secs, sign, sign_hs256, token, unsigned, Node,
    Refused, Ws, SECRET,
};

const RSA_PUBLIC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rsa_public.pem");
const RSA_PRIVATE: &[u8] = include_bytes!("fixtures/rsa_private.pem");
const RSA_PUBLIC_PEM: &[u8] = include_bytes!("fixtures/rsa_public.pem");
const EC_PUBLIC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ec_public.pem");
const EC_PRIVATE: &[u8] = include_bytes!("fixtures/ec_private.pem");

fn header_of<'a>(r: &'a Refused, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Connect with `token` (header) and expect a `welcome`.
async fn accepted(node: &Node, token: &str) -> Ws {
    let (ws, _) = Ws::open_with(&node.ws_url(), token).await;
    ws
}

/// Connect with `token` (header) and expect 401 with a Bearer challenge.
async fn assert_401(node: &Node, token: Option<&str>, what: &str) {
    let r = Ws::connect(&node.ws_url(), token, None)
        .await
        .err()
        .unwrap_or_else(|| panic!("{what}: upgrade was accepted"));
    assert_eq!(r.status, 401, "{what}: {r:?}");
    let challenge = header_of(&r, "www-authenticate")
        .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate: {r:?}"));
    assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
}

#[tokio::test]
async fn origin_not_on_the_allow_list_is_refused_with_403() {
    let node = Node::start(&[]).await;
    let t = any_token("alice");
    let r = Ws::connect(&node.ws_url(), Some(&t), Some("https://evil.example"))
        .await
        .err()
        .expect("foreign origin accepted");
    assert_eq!(r.status, 403);
    // The default allow-list of OPERATING.md.
    for origin in ["http://localhost:8080", "http://127.0.0.1:8080"] {
        let mut ws = Ws::connect(&node.ws_url(), Some(&t), Some(origin))
            .await
            .unwrap_or_else(|r| panic!("{origin} refused: {r:?}"));
        assert!(matches!(ws.frame().await, ServerFrame::Welcome(_)));
    }
    // No Origin header: a non-browser client, accepted.
    accepted(&node, &t).await;
    let m = node.metrics().await;
    assert_eq!(
        m.value("wsgate_handshake_rejections_total", &[("reason", "origin")]),
        1.0
    );
}

#[tokio::test]
async fn configured_origins_and_the_wildcard() {
    let node = Node::start(&["--allowed-origins", "https://app.example"]).await;
    let t = any_token("alice");
    assert!(
        Ws::connect(&node.ws_url(), Some(&t), Some("https://app.example"))
            .await
            .is_ok()
    );
    let r = Ws::connect(&node.ws_url(), Some(&t), Some("http://localhost:8080"))
        .await
        .err()
        .expect("an origin no longer on the list was accepted");
    assert_eq!(r.status, 403);

    let any = Node::start(&["--allowed-origins", "*"]).await;
    for origin in ["https://evil.example", "null", "http://localhost:1"] {
        let mut ws = Ws::connect(&any.ws_url(), Some(&t), Some(origin))
            .await
            .unwrap_or_else(|r| panic!("{origin} refused with '*': {r:?}"));
        assert!(matches!(ws.frame().await, ServerFrame::Welcome(_)));
    }
}

#[tokio::test]
async fn require_origin_refuses_clients_without_one() {
    let node = Node::start(&["--require-origin"]).await;
    let t = any_token("alice");
    let r = Ws::connect(&node.ws_url(), Some(&t), None)
        .await
        .err()
        .expect("no Origin accepted with --require-origin");
    assert_eq!(r.status, 403);
    let mut ws = Ws::connect(&node.ws_url(), Some(&t), Some("http://localhost:8080"))
        .await
        .unwrap();
    assert!(matches!(ws.frame().await, ServerFrame::Welcome(_)));
}

#[tokio::test]
async fn origin_is_checked_before_the_token() {
    let node = Node::start(&[]).await;
    let r = Ws::connect(&node.ws_url(), None, Some("https://evil.example"))
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 403);
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_and_a_bearer_challenge() {
    let node = Node::start(&[]).await;
    let now = now_secs();
    assert_401(&node, None, "missing").await;
    assert_401(&node, Some("not-a-jwt"), "malformed").await;
    assert_401(&node, Some("a.b.c"), "malformed parts").await;
    assert_401(
        &node,
        Some(&sign("HS256", b"another-secret", &claims("alice"))),
        "bad signature",
    )
    .await;
    let mut c = claims("alice");
    c["exp"] = json!(now - 60);
    c["iat"] = json!(now - 120);
    assert_401(&node, Some(&sign_hs256(&c)), "expired").await;
    let mut c = claims("alice");
    c["nbf"] = json!(now + 60);
    assert_401(&node, Some(&sign_hs256(&c)), "nbf in the future").await;
    let mut c = claims("alice");
    c["iat"] = json!(now + 60);
    assert_401(&node, Some(&sign_hs256(&c)), "iat in the future").await;
    assert_401(&node, Some(&unsigned(&claims("alice"))), "alg none").await;
    assert_401(
        &node,
        Some(&sign("RS256", RSA_PRIVATE, &claims("alice"))),
        "RS256 on an HMAC node",
    )
    .await;
    let mut c = claims("alice");
    c.as_object_mut().unwrap().remove("exp");
    assert_401(&node, Some(&sign_hs256(&c)), "no exp").await;
    let mut c = claims("alice");
    c.as_object_mut().unwrap().remove("sub");
    assert_401(&node, Some(&sign_hs256(&c)), "no sub").await;
    let m = node.metrics().await;
    assert_eq!(
        m.value("wsgate_handshake_rejections_total", &[("reason", "auth")]),
        11.0
    );
    // The HMAC family is accepted with the shared secret.
    for alg in ["HS256", "HS384", "HS512"] {
        accepted(&node, &sign(alg, SECRET.as_bytes(), &claims("alice"))).await;
    }
}

#[tokio::test]
async fn time_claims_get_the_leeway() {
    let node = Node::start(&["--jwt-leeway", "30s"]).await;
    let now = now_secs();
    let mut c = claims("alice");
    c["exp"] = json!(now - 10);
    c["iat"] = json!(now - 20);
    accepted(&node, &sign_hs256(&c)).await;
    let mut c = claims("alice");
    c["nbf"] = json!(now + 10);
    c["iat"] = json!(now + 10);
    accepted(&node, &sign_hs256(&c)).await;
    let mut c = claims("alice");
    c["exp"] = json!(now - 60);
    c["iat"] = json!(now - 120);
    assert_401(&node, Some(&sign_hs256(&c)), "expired beyond the leeway").await;
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let node = Node::start(&["--jwt-issuer", "auth.example", "--jwt-audience", "wsgate"]).await;
    let good = || {
        let mut c = claims("alice");
        c["iss"] = json!("auth.example");
        c["aud"] = json!("wsgate");
        c
    };
    accepted(&node, &sign_hs256(&good())).await;
    let mut c = good();
    c["aud"] = json!(["other", "wsgate"]);
    accepted(&node, &sign_hs256(&c)).await;

    let mut c = good();
    c["iss"] = json!("evil.example");
    assert_401(&node, Some(&sign_hs256(&c)), "wrong iss").await;
    let mut c = good();
    c["aud"] = json!("other");
    assert_401(&node, Some(&sign_hs256(&c)), "wrong aud").await;
    let mut c = good();
    c.as_object_mut().unwrap().remove("iss");
    assert_401(&node, Some(&sign_hs256(&c)), "missing iss").await;
    let mut c = good();
    c.as_object_mut().unwrap().remove("aud");
    assert_401(&node, Some(&sign_hs256(&c)), "missing aud").await;

    // Without configuration, iss and aud are not checked.
    let plain = Node::start(&[]).await;
    let mut c = claims("alice");
    c["iss"] = json!("whoever");
    c["aud"] = json!("whatever");
    accepted(&plain, &sign_hs256(&c)).await;
}

#[tokio::test]
async fn rsa_key_accepts_rs256_only_no_hs_rs_confusion() {
    let node = Node::start(&["--jwt-public-key", RSA_PUBLIC]).await;
    let mut ws = accepted(&node, &sign("RS256", RSA_PRIVATE, &claims("alice"))).await;
    ws.join("lobby").await;
    // HS256 "signed" with the public key as the HMAC secret: the classic
    // algorithm confusion attack.
    assert_401(
        &node,
        Some(&sign("HS256", RSA_PUBLIC_PEM, &claims("alice"))),
        "HS256 with the public key as secret",
    )
    .await;
    assert_401(
        &node,
        Some(&any_token("alice")),
        "HS256 with the test secret",
    )
    .await;
    assert_401(&node, Some(&unsigned(&claims("alice"))), "alg none").await;
    assert_401(
        &node,
        Some(&sign("ES256", EC_PRIVATE, &claims("alice"))),
        "ES256 on an RSA node",
    )
    .await;
}

#[tokio::test]
async fn ec_key_accepts_es256_only() {
    let node = Node::start(&["--jwt-public-key", EC_PUBLIC]).await;
    accepted(&node, &sign("ES256", EC_PRIVATE, &claims("alice"))).await;
    assert_401(
        &node,
        Some(&sign("RS256", RSA_PRIVATE, &claims("alice"))),
        "RS256 on an EC node",
    )
    .await;
    let ec_public_pem = std::fs::read(EC_PUBLIC).unwrap();
    assert_401(
        &node,
        Some(&sign("HS256", &ec_public_pem, &claims("alice"))),
        "HS256 with the EC public key as secret",
    )
    .await;
}

#[tokio::test]
async fn token_in_the_query_string_works() {
    let node = Node::start(&[]).await;
    let url = format!("{}?token={}", node.ws_url(), any_token("alice"));
    let mut ws = Ws::connect(&url, None, None).await.unwrap();
    match ws.frame().await {
        ServerFrame::Welcome(w) => assert_eq!(w.user, "alice"),
        other => panic!("{other:?}"),
    }
    let bad = format!("{}?token=not-a-jwt", node.ws_url());
    let r = Ws::connect(&bad, None, None).await.err().unwrap();
    assert_eq!(r.status, 401);
    assert!(header_of(&r, "www-authenticate")
        .unwrap()
        .starts_with("Bearer"));
}

#[tokio::test]
async fn connection_cap_answers_503_with_retry_after() {
    let node = Node::start(&["--max-connections", "1"]).await;
    let (mut first, _) = Ws::open(&node.ws_url(), "alice").await;
    let r = Ws::connect(&node.ws_url(), Some(&any_token("bob")), None)
        .await
        .err()
        .expect("second connection accepted beyond the cap");
    assert_eq!(r.status, 503);
    assert!(header_of(&r, "retry-after").is_some(), "{r:?}");
    let m = node.metrics().await;
    assert_eq!(
        m.value(
            "wsgate_handshake_rejections_total",
            &[("reason", "capacity")]
        ),
        1.0
    );
    // The slot comes back when the first one leaves.
    first.close(1000).await;
    let url = node.ws_url();
    eventually("a slot is free again", || {
        let url = url.clone();
        async move { Ws::connect(&url, Some(&any_token("bob")), None).await.ok() }
    })
    .await;
}

#[tokio::test]
async fn a_client_that_never_sends_its_request_is_dropped() {
    use tokio::io::AsyncReadExt;
    let node = Node::start(&["--handshake-timeout", "300ms"]).await;
    let mut tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let mut buf = [0u8; 256];
    // No request line at all: the server ends the connection by itself.
    let n = tokio::time::timeout(wsgate_testkit::WAIT, tcp.read(&mut buf))
        .await
        .expect("the silent connection was kept open")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    // A prompt client is served as usual.
    Ws::open(&node.ws_url(), "alice").await;
}

#[tokio::test]
async fn not_a_websocket_upgrade_is_400_or_426() {
    let node = Node::start(&[]).await;
    let auth = format!("Bearer {}", any_token("alice"));
    let url = format!("{}/ws", node.http_url());
    let resp = http("GET", &url, &[("authorization", &auth)], b"")
        .await
        .unwrap();
    assert!(
        resp.0 == 400 || resp.0 == 426,
        "plain GET /ws: {} {:?}",
        resp.0,
        resp.2
    );
    // Upgrade header without a key.
    let resp = http(
        "GET",
        &url,
        &[
            ("authorization", &auth),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
        ],
        b"",
    )
    .await
    .unwrap();
    assert!(resp.0 == 400 || resp.0 == 426, "no key: {}", resp.0);
    let m = node.metrics().await;
    assert_eq!(
        m.value(
            "wsgate_handshake_rejections_total",
            &[("reason", "bad_request")]
        ),
        2.0
    );
    assert_eq!(
        m.value("wsgate_connections_accepted_total", &[("transport", "ws")]),
        0.0
    );
}

#[tokio::test]
async fn room_patterns_grant_join_and_publish() {
    let node = Node::start(&[]).await;
    let t = token(
        "alice",
        &["lobby", "team.42.*"],
        &["lobby", "news.*"],
        Duration::from_secs(600),
    );
    let (mut ws, welcome) = Ws::open_with(&node.ws_url(), &t).await;
    assert_eq!(welcome.user, "alice");
    for room in ["lobby", "team.42.general", "team.42.x.y"] {
        ws.join(room).await;
    }
    for room in ["team.43.general", "team.42", "lobby2", "admin"] {
        ws.send(json!({"type":"join","room":room,"id":room})).await;
        let v = ws.json().await;
        assert_eq!(v["type"], "error", "join {room}: {v}");
        assert_eq!(v["code"], "forbidden");
        assert_eq!(v["id"], room);
    }
    for room in ["lobby", "news.today"] {
        let ack = ws.publish(room, json!(1)).await;
        assert_eq!(ack["type"], "ack", "publish {room}: {ack}");
    }
    for room in ["team.42.general", "news", "admin"] {
        let v = ws.publish(room, json!(1)).await;
        assert_eq!(v["type"], "error", "publish {room}: {v}");
        assert_eq!(v["code"], "forbidden");
    }
}

#[tokio::test]
async fn missing_claims_grant_nothing_and_star_grants_everything() {
    let node = Node::start(&[]).await;
    let mut c = claims("nobody");
    c.as_object_mut().unwrap().remove("rooms");
    c.as_object_mut().unwrap().remove("publish");
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &sign_hs256(&c)).await;
    ws.send(json!({"type":"join","room":"lobby","id":1})).await;
    let v = ws.json().await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    let v = ws.publish("lobby", json!("x")).await;
    assert_eq!(v["code"], "forbidden", "{v}");

    let t = token("root", &["*"], &["*"], Duration::from_secs(600));
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &t).await;
    for room in ["a", "team.1.x", "Z_9-.:"] {
        ws.join(room).await;
        assert_eq!(ws.publish(room, json!(null)).await["type"], "ack");
    }
}

#[tokio::test]
async fn sub_is_shown_as_from_and_user() {
    let node = Node::start(&[]).await;
    let (mut alice, w) = Ws::open(&node.ws_url(), "alice@example.com").await;
    assert_eq!(w.user, "alice@example.com");
    assert!(!w.conn.is_empty());
    let (mut bob, _) = Ws::open(&node.ws_url(), "bob").await;
    bob.join("lobby").await;
    alice.publish("lobby", json!({"t": 1})).await;
    let m = bob.json().await;
    assert_eq!(m["from"], "alice@example.com");
}
