//! PROTOCOL.md section 8, the server API behind `--api-key`: publish as
//! `server`, disconnect (and revoke) a user on every node, room history over
//! HTTP. Real nodes, a real redis-server, and the in-process broker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{json, Value};
use wsgate_testkit::{
    any_token, eventually, http, http_get, now_secs, token, Ended, Node, Redis, RedisCluster,
    TcpProxy, Ws,
};

const KEY: &str = "test-server-api-key";

/// How a call presents its credentials.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    /// `X-API-Key: KEY`.
    Key(&'a str),
    /// `Authorization: apikey KEY`.
    KeyScheme(&'a str),
    /// `Authorization: Bearer JWT`.
    Bearer(&'a str),
}

/// A call whose answer must have `status`; its body as JSON (`null` when
/// empty).
async fn expect(
    status: u16,
    node: &Node,
    method: &str,
    path: &str,
    auth: Auth<'_>,
    body: &str,
) -> Value {
    let authorization = match auth {
        Auth::KeyScheme(k) => Some(format!("apikey {k}")),
        Auth::Bearer(t) => Some(format!("Bearer {t}")),
        Auth::None | Auth::Key(_) => None,
    };
    let mut headers = vec![("content-type", "application/json")];
    if let Auth::Key(k) = auth {
        headers.push(("x-api-key", k));
    }
    if let Some(a) = &authorization {
        headers.push(("authorization", a.as_str()));
    }
    let url = format!("{}{path}", node.http_url());
    let resp = http(method, &url, &headers, body.as_bytes()).await.unwrap();
    assert_eq!(resp.0, status, "{method} {path} {body:?}: {resp:?}");
    if resp.2.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(&resp.2).unwrap_or_else(|e| panic!("not JSON: {resp:?}: {e}"))
}

async fn disconnect(node: &Node, user: &str, revoke: bool) {
    let payload = if revoke { r#"{"revoke":true}"# } else { "" };
    let path = format!("/api/users/{user}/disconnect");
    let resp = expect(202, node, "POST", &path, Auth::Key(KEY), payload).await;
    assert_eq!(resp, json!({ "user": user }));
}

async fn history(node: &Node, room: &str, query: &str) -> Value {
    let path = format!("/api/rooms/{room}/history{query}");
    expect(200, node, "GET", &path, Auth::Key(KEY), "").await
}

fn seqs(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

async fn redis_nodes(redis: &Redis, n: usize) -> Vec<Node> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(redis_node(redis).await);
    }
    out
}

async fn redis_node(redis: &Redis) -> Node {
    ready_node(&["--redis-url", &redis.url(), "--api-key", KEY]).await
}

async fn ready_node(args: &[&str]) -> Node {
    let node = Node::start(args).await;
    wait_ready(&node, 200).await;
    node
}

async fn wait_ready(node: &Node, status: u16) {
    let ready = format!("{}/ready", node.ops_url());
    eventually("readiness", || async {
        matches!(http_get(&ready).await, Ok((s, _, _)) if s == status).then_some(())
    })
    .await;
}

/// Connect with `token` expecting a refusal; the HTTP status.
async fn refused(node: &Node, token: &str) -> Option<u16> {
    Ws::connect(&node.ws_url(), Some(token), None)
        .await
        .err()
        .map(|r| r.status)
}

async fn still_open(ws: &mut Ws) {
    let id = ws.id();
    ws.send(json!({"type": "ping", "id": id})).await;
    assert_eq!(ws.json().await, json!({"type": "pong", "id": id}));
}

async fn refresh(ws: &mut Ws, token: &str) -> Value {
    let id = ws.id();
    ws.send(json!({"type": "refresh", "token": token, "id": id}))
        .await;
    let answer = ws.json().await;
    assert_eq!(answer["id"], id.as_str(), "{answer}");
    answer
}

/// Wait until the clock has left second `t`: a token minted afterwards has
/// `iat > t`, so a revocation made in second `t` does not cover it.
async fn after_second(t: u64) {
    eventually("the next second", || async {
        (now_secs() > t).then_some(())
    })
    .await;
}

#[tokio::test]
async fn without_api_key_the_server_endpoints_are_404() {
    let node = Node::start(&[]).await;
    let bearer = any_token("svc");
    let resp = expect(
        404,
        &node,
        "POST",
        "/api/users/bob/disconnect",
        Auth::Key(KEY),
        "",
    )
    .await;
    assert_eq!(resp["error"], "not_found");
    for auth in [Auth::Key(KEY), Auth::Bearer(&bearer)] {
        expect(404, &node, "GET", "/api/rooms/lobby/history", auth, "").await;
    }
    // Presence with the key while the server API is off: 404 like the rest.
    expect(
        404,
        &node,
        "GET",
        "/api/rooms/lobby/presence",
        Auth::Key(KEY),
        "",
    )
    .await;
    // Publishing with the key is a server API call (404); with a token it
    // keeps section 4.
    for auth in [Auth::Key(KEY), Auth::KeyScheme(KEY)] {
        expect(404, &node, "POST", "/api/rooms/lobby/messages", auth, "{}").await;
    }
    expect(
        200,
        &node,
        "POST",
        "/api/rooms/lobby/messages",
        Auth::Bearer(&bearer),
        "{}",
    )
    .await;
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_401_and_the_right_one_in_either_header_works() {
    let node = Node::start(&["--api-key", KEY]).await;
    let bearer = any_token("svc");
    let wrong = [
        Auth::None,
        Auth::Key("wrong"),
        Auth::KeyScheme("wrong"),
        Auth::Key(&KEY[..KEY.len() - 1]),
        Auth::Bearer(&bearer),
    ];
    for auth in wrong {
        let resp = expect(401, &node, "POST", "/api/users/bob/disconnect", auth, "").await;
        assert_eq!(resp["error"], "unauthorized");
    }
    for auth in [Auth::None, Auth::Key("wrong"), Auth::KeyScheme("wrong")] {
        for (method, path) in [
            ("GET", "/api/rooms/lobby/history"),
            ("POST", "/api/rooms/lobby/messages"),
        ] {
            expect(401, &node, method, path, auth, "{}").await;
        }
    }
    for auth in [Auth::Key(KEY), Auth::KeyScheme(KEY)] {
        expect(202, &node, "POST", "/api/users/bob/disconnect", auth, "").await;
        expect(200, &node, "GET", "/api/rooms/lobby/history", auth, "").await;
    }
    // A bad body is refused and disconnects nobody.
    let (mut bob, _) = Ws::open(&node.ws_url(), "bob").await;
    for bad in ["{", "[]", r#"{"revoke":"yes"}"#] {
        expect(
            400,
            &node,
            "POST",
            "/api/users/bob/disconnect",
            Auth::Key(KEY),
            bad,
        )
        .await;
    }
    still_open(&mut bob).await;
    // Calls are counted by route pattern and status, never by user or room.
    let m = node.metrics().await;
    let count = |endpoint: &str, status: &str| {
        m.value(
            "wsgate_api_requests_total",
            &[("endpoint", endpoint), ("status", status)],
        )
    };
    assert_eq!(count("/api/users/{user}/disconnect", "401"), 5.0);
    assert_eq!(count("/api/users/{user}/disconnect", "202"), 2.0);
    assert_eq!(count("/api/users/{user}/disconnect", "400"), 3.0);
    assert_eq!(count("/api/rooms/{room}/history", "200"), 2.0);
    assert_eq!(count("/api/rooms/{room}/messages", "401"), 3.0);
}

#[tokio::test]
async fn publish_with_the_key_comes_from_server_on_every_node() {
    let redis = Redis::start();
    let nodes = redis_nodes(&redis, 2).await;
    let mut members = Vec::new();
    for node in &nodes {
        let (mut ws, _) = Ws::open(&node.ws_url(), "member").await;
        ws.join("news").await;
        members.push(ws);
    }
    let resp = expect(
        200,
        &nodes[0],
        "POST",
        "/api/rooms/news/messages",
        Auth::Key(KEY),
        r#"{"text":"maintenance at noon"}"#,
    )
    .await;
    assert_eq!(resp, json!({"room": "news", "seq": 1}));
    // Bearer tokens keep working beside the key.
    let bearer = token("billing", &[], &["news"], Duration::from_secs(600));
    expect(
        200,
        &nodes[1],
        "POST",
        "/api/rooms/news/messages",
        Auth::Bearer(&bearer),
        "2",
    )
    .await;
    for ws in &mut members {
        let m = ws.json().await;
        assert_eq!(
            (&m["seq"], &m["from"], &m["data"]),
            (
                &json!(1),
                &json!("server"),
                &json!({"text": "maintenance at noon"})
            )
        );
        let m = ws.json().await;
        assert_eq!((&m["seq"], &m["from"]), (&json!(2), &json!("billing")));
    }
}

#[tokio::test]
async fn disconnect_closes_the_users_connections_on_every_node_with_4003() {
    let redis = Redis::start();
    let nodes = redis_nodes(&redis, 3).await;
    let bob_token = any_token("bob");
    let mut bobs = Vec::new();
    let mut others = Vec::new();
    for node in &nodes[..2] {
        for _ in 0..2 {
            let (mut ws, _) = Ws::open_with(&node.ws_url(), &bob_token).await;
            ws.join("lobby").await;
            bobs.push(ws);
        }
        let (mut alice, _) = Ws::open(&node.ws_url(), "alice").await;
        alice.join("lobby").await;
        others.push(alice);
        // A user whose name starts like bob's is someone else.
        others.push(Ws::open(&node.ws_url(), "bobby").await.0);
    }
    disconnect(&nodes[2], "bob", false).await;
    for ws in &mut bobs {
        assert_eq!(ws.ended().await, Ended::Close(4003));
    }
    for ws in &mut others {
        still_open(ws).await;
    }
    // Without `revoke` the same token connects again at once.
    for node in &nodes {
        Ws::open_with(&node.ws_url(), &bob_token).await;
    }
    let closes = |m: &wsgate_testkit::Metrics| {
        m.value("wsgate_connection_closes_total", &[("code", "4003")])
    };
    for node in &nodes[..2] {
        assert_eq!(closes(&node.metrics().await), 2.0);
    }
    // A user with no connection anywhere is fine too.
    disconnect(&nodes[0], "nobody", false).await;
}

#[tokio::test]
async fn revoke_refuses_the_old_tokens_on_every_node_including_later_ones() {
    let redis = Redis::start();
    let nodes = redis_nodes(&redis, 2).await;
    let old = any_token("bob");
    let alice = any_token("alice");
    let (mut bob, _) = Ws::open_with(&nodes[0].ws_url(), &old).await;
    let (mut bob_elsewhere, _) = Ws::open_with(&nodes[1].ws_url(), &old).await;
    disconnect(&nodes[1], "bob", true).await;
    let revoked_in = now_secs();
    assert_eq!(bob.ended().await, Ended::Close(4003));
    assert_eq!(bob_elsewhere.ended().await, Ended::Close(4003));
    for node in &nodes {
        // The node that did not take the call learns it through Redis.
        let status = eventually("old token refused", || refused(node, &old)).await;
        assert_eq!(status, 401);
        expect(
            401,
            node,
            "POST",
            "/api/rooms/lobby/messages",
            Auth::Bearer(&old),
            "1",
        )
        .await;
        Ws::open_with(&node.ws_url(), &alice).await;
    }
    // A node started after the call loads the revocation from Redis.
    let late = redis_node(&redis).await;
    assert_eq!(refused(&late, &old).await, Some(401));

    after_second(revoked_in).await;
    let new = any_token("bob");
    for node in nodes.iter().chain([&late]) {
        let (mut ws, w) = Ws::open_with(&node.ws_url(), &new).await;
        assert_eq!(w.user, "bob");
        let answer = refresh(&mut ws, &old).await;
        assert_eq!(
            (&answer["type"], &answer["code"]),
            (&json!("error"), &json!("invalid_token")),
            "{answer}"
        );
        assert_eq!(refresh(&mut ws, &new).await["type"], "refreshed");
    }
}

#[tokio::test]
async fn a_node_cut_off_from_redis_learns_a_revocation_when_it_reconnects() {
    let redis = Redis::start();
    let proxy = TcpProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let caller = redis_node(&redis).await;
    let cut = ready_node(&["--redis-url", &proxy.redis_url(), "--api-key", KEY]).await;
    let old = any_token("bob");
    proxy.cut();
    wait_ready(&cut, 503).await;
    disconnect(&caller, "bob", true).await;
    proxy.restore();
    // Ready again only once the revocations are reloaded.
    wait_ready(&cut, 200).await;
    assert_eq!(refused(&cut, &old).await, Some(401));
}

#[tokio::test]
async fn disconnect_and_revoke_reach_every_node_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let args = ["--redis-url", &urls, "--redis-cluster", "--api-key", KEY];
    let nodes = [ready_node(&args).await, ready_node(&args).await];
    let old = any_token("bob");
    let mut bobs = Vec::new();
    for node in &nodes {
        bobs.push(Ws::open_with(&node.ws_url(), &old).await.0);
    }
    let (mut alice, _) = Ws::open(&nodes[1].ws_url(), "alice").await;
    disconnect(&nodes[0], "bob", true).await;
    for ws in &mut bobs {
        assert_eq!(ws.ended().await, Ended::Close(4003));
    }
    still_open(&mut alice).await;
    for node in &nodes {
        let status = eventually("old token refused", || refused(node, &old)).await;
        assert_eq!(status, 401);
    }
    let late = ready_node(&args).await;
    assert_eq!(refused(&late, &old).await, Some(401));
}

#[tokio::test]
async fn disconnect_and_revoke_with_the_in_process_broker() {
    let node = Node::start(&["--api-key", KEY]).await;
    let old = any_token("bob");
    let (mut a, _) = Ws::open_with(&node.ws_url(), &old).await;
    let (mut b, _) = Ws::open_with(&node.ws_url(), &old).await;
    let (mut alice, _) = Ws::open(&node.ws_url(), "alice").await;
    disconnect(&node, "bob", false).await;
    assert_eq!(a.ended().await, Ended::Close(4003));
    assert_eq!(b.ended().await, Ended::Close(4003));
    still_open(&mut alice).await;
    let (mut c, _) = Ws::open_with(&node.ws_url(), &old).await;

    disconnect(&node, "bob", true).await;
    let revoked_in = now_secs();
    assert_eq!(c.ended().await, Ended::Close(4003));
    assert_eq!(refused(&node, &old).await, Some(401));
    after_second(revoked_in).await;
    let new = any_token("bob");
    let (mut d, _) = Ws::open_with(&node.ws_url(), &new).await;
    assert_eq!(refresh(&mut d, &old).await["code"], "invalid_token");
    still_open(&mut alice).await;
}

#[tokio::test]
async fn tokens_longer_than_the_maximum_lifetime_are_refused_with_the_server_api() {
    let node = Node::start(&["--api-key", KEY, "--max-token-lifetime", "2h"]).await;
    let long = token("bob", &["*"], &[], Duration::from_secs(3 * 3600));
    assert_eq!(refused(&node, &long).await, Some(401));
    Ws::open_with(
        &node.ws_url(),
        &token("bob", &["*"], &[], Duration::from_secs(7200)),
    )
    .await;
    // Without the server API there is no cap.
    let plain = Node::start(&[]).await;
    Ws::open_with(&plain.ws_url(), &long).await;
}

#[tokio::test]
async fn without_a_maximum_lifetime_any_token_lifetime_is_accepted_and_revocations_kept() {
    let redis = Redis::start();
    let node = redis_node(&redis).await;
    let year = Duration::from_secs(365 * 24 * 3600);
    let long = token("bob", &["*"], &[], year);
    let (mut bob, _) = Ws::open_with(&node.ws_url(), &long).await;
    disconnect(&node, "bob", true).await;
    assert_eq!(bob.ended().await, Ended::Close(4003));
    assert_eq!(refused(&node, &long).await, Some(401));
    // Kept in Redis for good: the token lives a year, the revocation as long.
    let ttl: i64 = redis.query(redis::cmd("TTL").arg("wsgate:revoked"));
    assert_eq!(ttl, -1, "the revocations hash has no expiry");
    let late = redis_node(&redis).await;
    assert_eq!(refused(&late, &long).await, Some(401));
}

/// Publishes `n` messages to `room` with the key; the last seq.
async fn publish_n(node: &Node, room: &str, n: usize) {
    let (mut ws, _) = Ws::open(&node.ws_url(), "writer").await;
    for k in 0..n {
        let ack = ws.publish(room, json!({ "k": k })).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
}

async fn history_bounds(node: &Node) {
    // A room nobody used: seq 0, no messages, and the epoch a join then sees.
    let empty = history(node, "hist.empty", "").await;
    assert_eq!((&empty["seq"], &empty["messages"]), (&json!(0), &json!([])));
    let (mut ws, _) = Ws::open(&node.ws_url(), "reader").await;
    assert_eq!(ws.join("hist.empty").await["epoch"], empty["epoch"]);

    publish_n(node, "hist.a", 12).await;
    let epoch = ws.join("hist.a").await["epoch"].clone();
    let page = history(node, "hist.a", "?since=3&limit=4").await;
    assert_eq!(page["room"], "hist.a");
    assert_eq!(page["epoch"], epoch);
    assert_eq!(page["seq"], 12);
    assert_eq!(seqs(&page), [4, 5, 6, 7]);
    let first = &page["messages"][0];
    assert_eq!(
        (
            &first["type"],
            &first["room"],
            &first["from"],
            &first["data"]
        ),
        (
            &json!("message"),
            &json!("hist.a"),
            &json!("writer"),
            &json!({"k": 3})
        )
    );
    assert!(first["ts"].as_u64().is_some());
    assert_eq!(
        seqs(&history(node, "hist.a", "").await),
        (1..=12).collect::<Vec<_>>()
    );
    assert_eq!(seqs(&history(node, "hist.a", "?limit=2").await), [1, 2]);
    assert_eq!(seqs(&history(node, "hist.a", "?since=10").await), [11, 12]);
    for query in ["?since=12", "?since=500", "?since=18446744073709551615"] {
        let page = history(node, "hist.a", query).await;
        assert_eq!((&page["seq"], seqs(&page)), (&json!(12), vec![]), "{query}");
    }
    for query in [
        "?since=-1",
        "?since=x",
        "?since=",
        "?limit=0",
        "?limit=-5",
        "?limit=ten",
    ] {
        let path = format!("/api/rooms/hist.a/history{query}");
        expect(400, node, "GET", &path, Auth::Key(KEY), "").await;
    }
    expect(
        400,
        node,
        "GET",
        "/api/rooms/bad%20room/history",
        Auth::Key(KEY),
        "",
    )
    .await;

    // Bearer tokens: the `rooms` grant decides.
    let reader = token("reader", &["hist.*"], &[], Duration::from_secs(600));
    let other = token("reader", &["lobby"], &["*"], Duration::from_secs(600));
    let path = "/api/rooms/hist.a/history?since=11";
    let resp = expect(200, node, "GET", path, Auth::Bearer(&reader), "").await;
    assert_eq!(seqs(&resp), [12]);
    expect(403, node, "GET", path, Auth::Bearer(&other), "").await;
    for auth in [Auth::None, Auth::Bearer("not.a.jwt")] {
        expect(401, node, "GET", path, auth, "").await;
    }
}

#[tokio::test]
async fn history_since_limit_epoch_and_grants_in_process() {
    let node = Node::start(&["--api-key", KEY]).await;
    history_bounds(&node).await;
}

#[tokio::test]
async fn history_since_limit_epoch_and_grants_with_redis() {
    let redis = Redis::start();
    let node = redis_node(&redis).await;
    history_bounds(&node).await;
}

#[tokio::test]
async fn history_limit_above_1000_is_capped() {
    let node = Node::start(&[
        "--api-key",
        KEY,
        "--history",
        "1100",
        "--publish-burst",
        "2000",
    ])
    .await;
    publish_n(&node, "big", 1050).await;
    let page = history(&node, "big", "?limit=5000").await;
    assert_eq!(page["seq"], 1050);
    assert_eq!(seqs(&page), (1..=1000).collect::<Vec<_>>());
    let rest = history(&node, "big", "?since=1000&limit=1001").await;
    assert_eq!(seqs(&rest), (1001..=1050).collect::<Vec<_>>());
    let default = history(&node, "big", "?since=7").await;
    assert_eq!(
        seqs(&default),
        (8..=107).collect::<Vec<_>>(),
        "default limit 100"
    );
}

/// The raw answer to `head` (and `body`, if any) sent on a fresh
/// connection: the bytes read until the peer closes or 5 s pass.
async fn raw_exchange(node: &Node, head: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&out).contains("\r\n\r\n{") {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn disconnect_checks_the_key_and_the_body_from_the_head() {
    let node = Node::start(&["--api-key", KEY, "--body-timeout", "1s"]).await;
    // A wrong key is refused before the body: no 100 Continue.
    let answer = raw_exchange(
        &node,
        "POST /api/users/x/disconnect HTTP/1.1\r\nHost: a\r\nX-API-Key: nope\r\n\
         Content-Length: 500000\r\nExpect: 100-continue\r\n\r\n",
        b"",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
    assert!(!answer.contains("100 Continue"), "{answer:?}");
    // A declared length beyond --max-message-bytes: 413 from the head.
    let head = format!(
        "POST /api/users/x/disconnect HTTP/1.1\r\nHost: a\r\nX-API-Key: {KEY}\r\n\
         Content-Length: 99999999999\r\n\r\n"
    );
    let answer = raw_exchange(&node, &head, b"").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    // A body that never completes: 408 after --body-timeout, as for a publish.
    let head = format!(
        "POST /api/users/x/disconnect HTTP/1.1\r\nHost: a\r\nX-API-Key: {KEY}\r\n\
         Content-Length: 20\r\n\r\n"
    );
    let answer = raw_exchange(&node, &head, br#"{"rev"#).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("request_timeout"), "{answer:?}");
    // An empty user names nobody.
    let resp = expect(
        400,
        &node,
        "POST",
        "/api/users//disconnect",
        Auth::Key(KEY),
        "",
    )
    .await;
    assert_eq!(resp["error"], "bad_request");
    // And a whole, right request still works.
    expect(
        202,
        &node,
        "POST",
        "/api/users/x/disconnect",
        Auth::Key(KEY),
        r#"{"revoke":false}"#,
    )
    .await;
}
