//! `--jwt-jwks-url` (PROTOCOL.md section 9) against real nodes and a real
//! identity provider stand-in: an HTTP server in this process that serves a
//! JSON Web Key Set the test can change, take down, or hold unanswered, and
//! that counts the requests it gets.
//!
//! The keys are the test key pairs in `tests/fixtures/` (RSA 2048, EC
//! P-256, EC P-384, Ed25519); their public halves are published as JWKs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use wsgate_testkit::{claims, eventually, http, http_get, sign_hs256, unsigned, Node, Ws};

const RSA_PRIVATE: &[u8] = include_bytes!("fixtures/rsa_private.pem");
const EC_PRIVATE: &[u8] = include_bytes!("fixtures/ec_private.pem");
const EC384_PRIVATE: &[u8] = include_bytes!("fixtures/ec384_private.pem");
const ED25519_PRIVATE: &[u8] = include_bytes!("fixtures/ed25519_private.pem");
const ED25519_PUBLIC: &[u8] = include_bytes!("fixtures/ed25519_public.pem");

/// The fixture keys: the private halves sign, the public halves are JWKs.
#[derive(Clone, Copy, Debug)]
enum Key {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Key {
    fn private(self) -> EncodingKey {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        match self {
            Key::Rsa => EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
            Key::P256 => EncodingKey::from_ec_pem(EC_PRIVATE).unwrap(),
            Key::P384 => EncodingKey::from_ec_pem(EC384_PRIVATE).unwrap(),
            Key::Ed25519 => EncodingKey::from_ed_pem(ED25519_PRIVATE).unwrap(),
        }
    }

    /// The public JWK with this `kid` (no `kid` when `None`) and no `alg`:
    /// the key type alone decides the algorithms.
    fn jwk(self, kid: Option<&str>) -> Value {
        let mut jwk = match self {
            Key::Ed25519 => {
                // SPKI DER of an Ed25519 key: 12 bytes of header, 32 of key.
                let der = pem::parse(ED25519_PUBLIC).unwrap();
                let x =
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&der.contents()[12..]);
                json!({"kty": "OKP", "crv": "Ed25519", "use": "sig", "x": x})
            }
            _ => {
                let alg = match self {
                    Key::P256 => Algorithm::ES256,
                    Key::P384 => Algorithm::ES384,
                    _ => Algorithm::RS256,
                };
                let mut jwk = Jwk::from_encoding_key(&self.private(), alg).unwrap();
                jwk.common.key_algorithm = None;
                serde_json::to_value(jwk).unwrap()
            }
        };
        if let Some(kid) = kid {
            jwk["kid"] = json!(kid);
        }
        jwk
    }

    /// A token for `sub` (every room) signed with `alg`, naming `kid`.
    fn token(self, alg: Algorithm, kid: Option<&str>, sub: &str) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims(sub), &self.private()).unwrap()
    }
}

/// What the stand-in identity provider does with a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// 200 with the current key set.
    Serve,
    /// 503.
    Down,
    /// No answer until the mode changes (then as that mode says).
    Hang,
}

struct IdpState {
    jwks: Mutex<Value>,
    mode: watch::Sender<Mode>,
    hits: AtomicUsize,
}

/// An HTTP server on 127.0.0.1:0 serving `/jwks.json`.
#[derive(Clone)]
struct Idp {
    state: Arc<IdpState>,
    addr: SocketAddr,
}

impl Idp {
    async fn start(keys: &[(Key, Option<&str>)], mode: Mode) -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, keys, mode)
    }

    /// Serve on `listener` (plain TCP or TLS).
    fn serve<L>(listener: L, keys: &[(Key, Option<&str>)], mode: Mode) -> Idp
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let state = Arc::new(IdpState {
            jwks: Mutex::new(Value::Null),
            mode: watch::Sender::new(mode),
            hits: AtomicUsize::new(0),
        });
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/jwks.json", get(serve_jwks))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        let idp = Idp { state, addr };
        idp.publish(keys);
        idp
    }

    fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    fn publish(&self, keys: &[(Key, Option<&str>)]) {
        let keys: Vec<Value> = keys.iter().map(|(k, kid)| k.jwk(*kid)).collect();
        *self.state.jwks.lock().unwrap() = json!({ "keys": keys });
    }

    fn set_mode(&self, mode: Mode) {
        self.state.mode.send_replace(mode);
    }

    fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }
}

async fn serve_jwks(State(state): State<Arc<IdpState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let mut mode = state.mode.subscribe();
    let answer =
        tokio::time::timeout(Duration::from_secs(60), mode.wait_for(|m| *m != Mode::Hang)).await;
    match answer.ok().and_then(|m| m.ok()).map(|m| *m) {
        Some(Mode::Serve) => {
            let body = state.jwks.lock().unwrap().to_string();
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        _ => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn node(idp_url: &str, refresh: &str) -> Node {
    Node::start(&["--jwt-jwks-url", idp_url, "--jwks-refresh", refresh]).await
}

/// A provider serving `keys` and a node using it, once the node is ready.
async fn start(keys: &[(Key, Option<&str>)], refresh: &str) -> (Idp, Node) {
    let idp = Idp::start(keys, Mode::Serve).await;
    let node = node(&idp.url(), refresh).await;
    wait_ready(&node).await;
    (idp, node)
}

async fn ready(node: &Node) -> u16 {
    http_get(&format!("{}/ready", node.ops_url()))
        .await
        .unwrap()
        .0
}

async fn wait_ready(node: &Node) {
    eventually("node ready", || async {
        (ready(node).await == 200).then_some(())
    })
    .await;
}

/// The HTTP status of an upgrade with `token` (101 when it connects).
async fn upgrade_status(node: &Node, token: &str) -> u16 {
    match Ws::connect(&node.ws_url(), Some(token), None).await {
        Ok(_) => 101,
        Err(refused) => refused.status,
    }
}

/// Wait until an upgrade with `token` answers `status`.
async fn wait_upgrade(node: &Node, token: &str, status: u16, what: &str) {
    eventually(what, || async {
        (upgrade_status(node, token).await == status).then_some(())
    })
    .await;
}

/// `wsgate_jwks_fetches_total{result}` of `node`.
async fn fetches(node: &Node, result: &str) -> f64 {
    let m = node.metrics().await;
    m.value("wsgate_jwks_fetches_total", &[("result", result)])
}

/// Wait until `node` counts at least `n` failed fetches.
async fn wait_failed_fetches(node: &Node, n: f64, what: &str) {
    eventually(what, || async {
        (fetches(node, "failed").await >= n).then_some(())
    })
    .await;
}

/// The HTTP status of a publish through the HTTP API with `token`.
async fn api_status(node: &Node, token: &str) -> u16 {
    let url = format!("{}/api/rooms/lobby/messages", node.http_url());
    let auth = format!("Bearer {token}");
    http("POST", &url, &[("authorization", &auth)], b"{\"hi\":1}")
        .await
        .unwrap()
        .0
}

#[tokio::test]
async fn every_key_type_verifies_by_kid_and_hmac_or_none_never() {
    let (_idp, node) = start(
        &[
            (Key::Rsa, Some("rsa")),
            (Key::P256, Some("p256")),
            (Key::P384, Some("p384")),
            (Key::Ed25519, Some("ed")),
            (Key::Ed25519, None),
        ],
        "5m",
    )
    .await;

    let accepted = [
        (Key::Rsa, Algorithm::RS256, Some("rsa")),
        (Key::Rsa, Algorithm::RS384, Some("rsa")),
        (Key::Rsa, Algorithm::RS512, Some("rsa")),
        (Key::Rsa, Algorithm::PS256, Some("rsa")),
        (Key::Rsa, Algorithm::PS384, Some("rsa")),
        (Key::Rsa, Algorithm::PS512, Some("rsa")),
        (Key::P256, Algorithm::ES256, Some("p256")),
        (Key::P384, Algorithm::ES384, Some("p384")),
        (Key::Ed25519, Algorithm::EdDSA, Some("ed")),
        // No `kid`: checked against the keys without one.
        (Key::Ed25519, Algorithm::EdDSA, None),
    ];
    for (key, alg, kid) in accepted {
        let token = key.token(alg, kid, "alice");
        let (_ws, welcome) = Ws::open_with(&node.ws_url(), &token).await;
        assert_eq!(welcome.user, "alice", "{key:?} {alg:?} {kid:?}");
    }
    let token = Key::P384.token(Algorithm::ES384, Some("p384"), "bob");
    assert_eq!(api_status(&node, &token).await, 200);

    let refused = [
        // The algorithm belongs to another key type than the kid's key.
        Key::P256.token(Algorithm::ES256, Some("p384"), "eve"),
        Key::P256.token(Algorithm::ES256, Some("rsa"), "eve"),
        // Signed by another key than the one its kid names.
        Key::P256.token(Algorithm::ES256, Some("ed"), "eve"),
        Key::Ed25519.token(Algorithm::EdDSA, Some("rsa"), "eve"),
        // No kid, and the kid-less key is Ed25519.
        Key::P256.token(Algorithm::ES256, None, "eve"),
        // HMAC, even naming a published kid; and `alg: none`.
        sign_hs256(&claims("eve")),
        hs256_with_kid("rsa"),
        unsigned(&claims("eve")),
    ];
    for token in &refused {
        assert_eq!(upgrade_status(&node, token).await, 401, "{token}");
        assert_eq!(api_status(&node, token).await, 401, "{token}");
    }

    assert!(fetches(&node, "ok").await >= 1.0);
    assert!(node
        .metrics()
        .await
        .get("wsgate_jwks_age_seconds", &[])
        .is_some());
}

fn hs256_with_kid(kid: &str) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        &claims("eve"),
        &EncodingKey::from_secret(wsgate_testkit::SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn rotation_needs_no_restart() {
    let (idp, node) = start(&[(Key::Rsa, Some("2026-old"))], "1s").await;
    let old = Key::Rsa.token(Algorithm::RS256, Some("2026-old"), "alice");
    let new = Key::P256.token(Algorithm::ES256, Some("2026-new"), "alice");
    assert_eq!(upgrade_status(&node, &old).await, 101);
    assert_eq!(upgrade_status(&node, &new).await, 401, "not published yet");

    // The provider publishes the new key beside the old one.
    idp.publish(&[(Key::Rsa, Some("2026-old")), (Key::P256, Some("2026-new"))]);
    wait_upgrade(&node, &new, 101, "the new key is accepted").await;
    assert_eq!(upgrade_status(&node, &old).await, 101);
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &old).await;

    // Then retires the old one: its tokens are refused after the next fetch.
    idp.publish(&[(Key::P256, Some("2026-new"))]);
    wait_upgrade(&node, &old, 401, "the removed key is refused").await;
    assert_eq!(upgrade_status(&node, &new).await, 101);

    // `refresh` checks against the same set: the open connection moves to
    // a new-key token, and an old-key one is `invalid_token`.
    ws.send(json!({"type": "refresh", "token": new, "id": "r1"}))
        .await;
    assert_eq!(ws.json().await["type"], "refreshed");
    ws.send(json!({"type": "refresh", "token": old, "id": "r2"}))
        .await;
    assert_eq!(ws.json().await["code"], "invalid_token");
}

#[tokio::test]
async fn a_new_kid_is_fetched_at_once_and_its_first_token_accepted() {
    let (idp, node) = start(&[(Key::Rsa, Some("k1"))], "5m").await;
    idp.publish(&[(Key::Rsa, Some("k1")), (Key::P384, Some("k2"))]);
    let token = Key::P384.token(Algorithm::ES384, Some("k2"), "alice");
    // The token that reveals the new kid waits for the fetch it asked for,
    // and is accepted on its first attempt.
    assert_eq!(upgrade_status(&node, &token).await, 101);
    assert_eq!(idp.hits(), 2, "the start-up fetch and one for the kid");
    // A kid the provider never published is refused after that one wait,
    // and causes no further fetch within 10 s.
    let unknown = Key::P384.token(Algorithm::ES384, Some("nope"), "alice");
    assert_eq!(upgrade_status(&node, &unknown).await, 401);
    assert_eq!(idp.hits(), 2);
}

#[tokio::test]
async fn provider_down_keeps_the_last_good_set() {
    let (idp, node) = start(&[(Key::Ed25519, Some("ed"))], "1s").await;
    let token = Key::Ed25519.token(Algorithm::EdDSA, Some("ed"), "alice");
    assert_eq!(upgrade_status(&node, &token).await, 101);

    idp.set_mode(Mode::Down);
    wait_failed_fetches(&node, 2.0, "two failed fetches").await;
    assert_eq!(upgrade_status(&node, &token).await, 101);
    assert_eq!(api_status(&node, &token).await, 200);
    assert_eq!(ready(&node).await, 200, "a loaded set stays in force");

    // Even a set without any usable key does not replace the good one.
    idp.publish(&[]);
    idp.set_mode(Mode::Serve);
    let failed = fetches(&node, "failed").await;
    wait_failed_fetches(
        &node,
        failed + 1.0,
        "the empty set counted as a failed fetch",
    )
    .await;
    assert_eq!(upgrade_status(&node, &token).await, 101);
}

#[tokio::test]
async fn unknown_kid_storm_fetches_at_most_once_per_10s() {
    let (idp, node) = start(&[(Key::P256, Some("k1"))], "5m").await;
    let loaded = Instant::now();
    assert_eq!(idp.hits(), 1);

    // 1,000 tokens with random kids, 50 at a time, over the HTTP API. The
    // kid is in the signed header, but no key is looked for a kid the set
    // does not have: one signature serves all of them.
    let signed = Key::P256.token(Algorithm::ES256, Some("k1"), "storm");
    let (_, rest) = signed.split_once('.').unwrap();
    let node = Arc::new(node);
    let mut sent = 0;
    while sent < 1000 {
        let batch: Vec<_> = (0..50)
            .map(|_| {
                let node = node.clone();
                let header =
                    json!({"alg": "ES256", "typ": "JWT", "kid": rand::random::<u64>().to_string()});
                let header =
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header.to_string());
                let token = format!("{header}.{rest}");
                tokio::spawn(async move { api_status(&node, &token).await })
            })
            .collect();
        for task in batch {
            assert_eq!(task.await.unwrap(), 401);
        }
        sent += 50;
    }
    // The fetch a refused token asks for runs in the background: give it a
    // moment to show up at the server before counting.
    let allowed = |elapsed: Duration| 2 + (elapsed.as_secs() / 10) as usize;
    let counted = eventually("the storm's fetches settle", || async {
        let hits = idp.hits();
        (fetches(&node, "ok").await as usize == hits).then_some(hits)
    })
    .await;
    assert!(
        counted <= allowed(loaded.elapsed()),
        "{counted} fetches in {:?}",
        loaded.elapsed()
    );

    // A key published now is picked up by an unknown-kid fetch (the refresh
    // is 5 minutes) once 10 s have passed since the storm's fetch.
    idp.publish(&[(Key::P256, Some("k1")), (Key::Ed25519, Some("k2"))]);
    let token = Key::Ed25519.token(Algorithm::EdDSA, Some("k2"), "alice");
    let deadline = Instant::now() + Duration::from_secs(30);
    while api_status(&node, &token).await != 200 {
        assert!(Instant::now() < deadline, "the new kid was never fetched");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(idp.hits() <= allowed(loaded.elapsed()), "{}", idp.hits());
}

#[tokio::test]
async fn unanswered_jwks_at_start_means_not_ready_then_ready() {
    let idp = Idp::start(&[(Key::Rsa, Some("rsa"))], Mode::Hang).await;
    let node = node(&idp.url(), "5m").await;
    eventually("the first fetch reached the server", || async {
        (idp.hits() >= 1).then_some(())
    })
    .await;
    let token = Key::Rsa.token(Algorithm::RS256, Some("rsa"), "alice");
    assert_eq!(ready(&node).await, 503);
    assert_eq!(upgrade_status(&node, &token).await, 503);
    assert_eq!(api_status(&node, &token).await, 503);
    assert_eq!(fetches(&node, "ok").await, 0.0);
    // Whatever the upgrade carries: no token, an HS256 token, garbage.
    let hs256 = wsgate_testkit::any_token("alice");
    for other in [None, Some(hs256.as_str()), Some("not-a-jwt")] {
        let status = match Ws::connect(&node.ws_url(), other, None).await {
            Ok(_) => 101,
            Err(refused) => refused.status,
        };
        assert_eq!(status, 503, "{other:?}");
    }

    idp.set_mode(Mode::Serve);
    wait_ready(&node).await;
    assert_eq!(upgrade_status(&node, &token).await, 101);
}

#[tokio::test]
async fn provider_started_after_the_node() {
    let port = wsgate_testkit::free_port();
    let url = format!("http://127.0.0.1:{port}/jwks.json");
    let node = node(&url, "5m").await;
    wait_failed_fetches(&node, 1.0, "a refused connection is a failed fetch").await;
    assert_eq!(ready(&node).await, 503);

    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let _idp = Idp::serve(listener, &[(Key::Ed25519, None)], Mode::Serve);
    wait_ready(&node).await;
    let token = Key::Ed25519.token(Algorithm::EdDSA, None, "alice");
    assert_eq!(upgrade_status(&node, &token).await, 101);
}

/// `https://` with a private CA given by `--jwks-ca-cert`; without it the
/// provider's certificate is not trusted and nothing loads.
#[tokio::test]
async fn https_with_a_private_ca() {
    let Some((_dir, cert, key)) = wsgate_testkit::self_signed_cert() else {
        return;
    };
    let tls = wsgate::tls::load_tls(&cert, &key).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(tls),
    };
    let idp = Idp::serve(listener, &[(Key::P384, Some("p384"))], Mode::Serve);
    let url = format!("https://localhost:{}/jwks.json", idp.addr.port());
    let cert = cert.to_str().unwrap();
    let node = Node::start(&["--jwt-jwks-url", &url, "--jwks-ca-cert", cert]).await;
    wait_ready(&node).await;
    let token = Key::P384.token(Algorithm::ES384, Some("p384"), "alice");
    assert_eq!(upgrade_status(&node, &token).await, 101);

    let untrusting = Node::start(&["--jwt-jwks-url", &url]).await;
    wait_failed_fetches(&untrusting, 1.0, "a refused certificate is a failed fetch").await;
    assert_eq!(ready(&untrusting).await, 503);
}

/// TLS over a TCP listener, for `axum::serve`.
struct TlsListener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(tcp)).await
            {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
