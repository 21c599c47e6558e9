//! PROTOCOL.md section 7 under attack: floods, oversized and hostile
//! input, and faults, against real nodes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsgate_testkit::{
    any_token, eventually, header, http, http_get, token, BinNode, Node, Redis, Sse, WAIT,
};

/// Open a connection and write `bytes` (a request head, maybe part of a
/// body) without reading.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    tokio::time::timeout(WAIT, s.write_all(bytes))
        .await
        .expect("write timed out")
        .expect("write");
    s
}

/// Everything the node answers on `s` until it closes (or [`WAIT`]).
async fn answer(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// The head of `POST /sse/{conn}` declaring `len` body bytes.
fn post_head(sse: &Sse, token: &str, len: usize) -> String {
    format!(
        "POST /sse/{} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {len}\r\n\r\n",
        sse.conn
    )
}

#[tokio::test]
async fn posts_share_the_nodes_body_budget_and_are_refused_from_their_head() {
    let node = Node::start(&[
        "--max-message-bytes",
        "1000000",
        "--max-inflight-body-bytes",
        "2000000",
        "--body-timeout",
        "1h",
    ])
    .await;
    let (sse, _) = Sse::open(node.addr, "alice").await;

    // A declared length beyond --max-message-bytes: 413 from the head,
    // although no byte of the body comes (the body deadline is an hour).
    let mut s = send_raw(node.addr, post_head(&sse, &sse.token, 1 << 30).as_bytes()).await;
    let a = answer(&mut s).await;
    assert!(a.starts_with("HTTP/1.1 413"), "{a}");
    // A wrong token: 401 from the head, whatever the body would be.
    let mut s = send_raw(node.addr, post_head(&sse, "nope", 1 << 30).as_bytes()).await;
    let a = answer(&mut s).await;
    assert!(a.starts_with("HTTP/1.1 401"), "{a}");

    // Two POSTs of 1 MB, half sent: they hold the node's whole budget.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut bytes = post_head(&sse, &sse.token, 1_000_000).into_bytes();
        bytes.extend_from_slice(b"[");
        bytes.extend(std::iter::repeat_n(b' ', 500_000));
        holders.push(send_raw(node.addr, &bytes).await);
    }
    let resp = eventually("a third POST refused", || async {
        Some(sse.post_raw(r#"{"type":"ping"}"#).await).filter(|r| r.0 == 503)
    })
    .await;
    assert_eq!(header(&resp, "retry-after"), Some("1"), "{resp:?}");
    let metrics = node.metrics().await;
    let refused = [("limit", "inflight_body_bytes")];
    assert!(metrics.value("wsgate_limit_refusals_total", &refused) >= 1.0);
    // The holders give up: the budget comes back.
    drop(holders);
    eventually("the budget released", || async {
        Some(sse.post_raw(r#"{"type":"ping"}"#).await).filter(|r| r.0 == 202)
    })
    .await;
    node.stop().await;
}

/// POST `body` to `sse`'s stream with `headers` (the token is added as
/// Bearer unless an `authorization` is given); the status.
async fn post_with(sse: &Sse, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    let auth = format!("Bearer {}", sse.token);
    let mut all = headers.to_vec();
    if !headers.iter().any(|(n, _)| *n == "authorization") {
        all.push(("authorization", &auth));
    }
    let url = format!("{}/sse/{path}", sse.base);
    http("POST", &url, &all, body).await.expect("POST").0
}

#[tokio::test]
async fn hostile_post_bodies_are_refused_and_the_stream_still_serves() {
    let node = Node::start(&[]).await;
    let (mut sse, _) = Sse::open(node.addr, "alice").await;
    let conn = sse.conn.clone();
    let json = [("content-type", "application/json")];
    // Nesting 100,000 deep, as an element of the array and inside a
    // frame: never a crash; refused as a whole (400) or answered
    // `bad_request` on the stream.
    let deep = |inner: &str| format!("{}{inner}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bodies = [
        format!("[{}]", deep("")),
        format!(
            r#"[{{"type":"publish","room":"r","id":"deep","data":{}}}]"#,
            deep("1")
        ),
    ];
    for body in bodies {
        match post_with(&sse, &conn, &json, body.as_bytes()).await {
            400 => {}
            202 => {
                let v = sse.json().await;
                assert_eq!(v["type"], "error", "{v}");
                assert_eq!(v["code"], "bad_request", "{v}");
            }
            other => panic!("deep body: {other}"),
        }
    }
    // Not UTF-8, not JSON, empty: 400.
    for bad in [
        &b"\xff\xfe{}"[..],
        b"{\"type\":\"ping\",\"id\":\"\xc3\x28\"}",
        b"",
        b"null",
    ] {
        assert_eq!(post_with(&sse, &conn, &json, bad).await, 400, "{bad:?}");
    }
    // Any Content-Type (a page may send text/plain to avoid a preflight).
    let plain = [("content-type", "text/plain")];
    assert_eq!(
        post_with(&sse, &conn, &plain, br#"{"type":"ping","id":"p"}"#).await,
        202
    );
    assert_eq!(
        sse.json().await,
        serde_json::json!({"type": "pong", "id": "p"})
    );
    // Bearer and ?token= both present and different: the Bearer counts,
    // as for /ws.
    let bob = format!("{conn}?token={}", any_token("bob"));
    assert_eq!(
        post_with(&sse, &bob, &json, br#"{"type":"ping","id":"b"}"#).await,
        202
    );
    let as_bob = format!("Bearer {}", any_token("bob"));
    let with_alice = format!("{conn}?token={}", sse.token);
    let headers = [("authorization", as_bob.as_str())];
    assert_eq!(post_with(&sse, &with_alice, &headers, b"{}").await, 403);
    assert_eq!(
        sse.json().await,
        serde_json::json!({"type": "pong", "id": "b"})
    );
    node.stop().await;
}

#[tokio::test]
async fn garbage_conn_ids_are_404_at_once_on_one_node() {
    let node = Node::start(&[]).await;
    let (sse, _) = Sse::open(node.addr, "alice").await;
    let json = [("content-type", "application/json")];
    let huge = "A".repeat(16_000);
    let other_node = format!("1.{}", "b3RoZXI"); // "other"
    for conn in ["x", ".", "..", "1.!!", huge.as_str(), other_node.as_str()] {
        let status = post_with(&sse, conn, &json, br#"{"type":"ping"}"#).await;
        assert_eq!(status, 404, "{conn:.40}");
    }
    node.stop().await;
}

#[tokio::test]
async fn a_get_sse_head_sent_byte_by_byte_is_cut_off_by_the_handshake_timeout() {
    let node = Node::start(&["--handshake-timeout", "1s"]).await;
    let request = format!(
        "GET /sse?token={} HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n\r\n",
        any_token("alice"),
        "p".repeat(200)
    );
    let s = send_raw(node.addr, b"GET /sse").await;
    let (mut rd, mut wr) = s.into_split();
    // One byte every 50 ms: the whole head would take about 30 s.
    let trickle = async {
        for b in request.as_bytes()[8..].iter() {
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let closed = async {
        let mut buf = Vec::new();
        // A reset counts as closed too.
        let _ = tokio::time::timeout(WAIT, rd.read_to_end(&mut buf))
            .await
            .expect("the node kept the connection");
        buf
    };
    let answer = tokio::select! {
        a = closed => a,
        _ = trickle => panic!("the whole trickled head was taken"),
    };
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // The node still serves streams.
    let (_sse, welcome) = Sse::open(node.addr, "bob").await;
    assert_eq!(welcome["type"], "welcome");
    node.stop().await;
}

#[tokio::test]
async fn a_get_sse_head_over_64_kib_gets_431() {
    let node = Node::start(&[]).await;
    let request = format!(
        "GET /sse?token={} HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n\r\n",
        any_token("alice"),
        "p".repeat(70 * 1024)
    );
    let mut s = send_raw(node.addr, request.as_bytes()).await;
    let a = answer(&mut s).await;
    assert!(a.starts_with("HTTP/1.1 431"), "{a:.200}");
    node.stop().await;
}

/// A node on `redis` once it is ready.
async fn ready_node(redis: &Redis) -> Node {
    let node = Node::start(&["--redis-url", &redis.url()]).await;
    let ready = format!("{}/ready", node.ops_url());
    eventually("node ready", || async {
        matches!(http_get(&ready).await, Ok((200, _, _))).then_some(())
    })
    .await;
    node
}

#[tokio::test]
async fn posts_handed_to_a_stopped_or_killed_node_are_404_and_never_delivered_late() {
    let redis = Redis::start();
    let mut holder = BinNode::start(&["--redis-url", &redis.url()]).await;
    let poster = ready_node(&redis).await;
    let ready = format!("{}/ready", holder.ops_url());
    eventually("holder ready", || async {
        matches!(http_get(&ready).await, Ok((200, _, _))).then_some(())
    })
    .await;
    let (mut sse, _) = Sse::open(holder.addr, "alice").await;
    sse.base = poster.http_url();
    sse.send(json!({"type": "ping", "id": "before"})).await;
    assert_eq!(sse.json().await["id"], "before");

    // The holder is stopped: POSTs through the poster are 404 (its 2 s
    // bound), all of them at once.
    holder.signal("STOP");
    let posts = (0..20).map(|i| {
        let sse = &sse;
        async move {
            sse.post_raw(&json!({"type": "ping", "id": i}).to_string())
                .await
                .0
        }
    });
    let answers = tokio::time::timeout(WAIT, futures_util::future::join_all(posts))
        .await
        .expect("the poster answers within its bound");
    assert!(answers.iter().all(|s| *s == 404), "{answers:?}");
    // Resumed, the holder does not act on POSTs answered 404 meanwhile:
    // the next answer on the stream is the next POST's.
    holder.signal("CONT");
    let resumed = eventually("the holder answers again", || async {
        Some(sse.post_raw(r#"{"type":"ping","id":"after"}"#).await.0).filter(|s| *s == 202)
    })
    .await;
    assert_eq!(resumed, 202);
    assert_eq!(sse.json().await, json!({"type": "pong", "id": "after"}));

    // Killed: 404, and the poster keeps serving.
    holder.kill();
    let resp = sse.post_raw(r#"{"type":"ping"}"#).await;
    assert_eq!(resp.0, 404, "{resp:?}");
    let (mut own, _) = Sse::open(poster.addr, "bob").await;
    own.send(json!({"type": "ping", "id": "own"})).await;
    assert_eq!(own.json().await["id"], "own");
    poster.stop().await;
}

#[tokio::test]
async fn the_handover_recovers_when_redis_comes_back() {
    let mut redis = Redis::start();
    let holder = ready_node(&redis).await;
    let poster = ready_node(&redis).await;
    let (mut sse, _) = Sse::open(holder.addr, "alice").await;
    sse.base = poster.http_url();
    sse.send(json!({"type": "ping", "id": 1})).await;
    assert_eq!(sse.json().await["id"], 1);
    redis.kill();
    assert_eq!(sse.post_raw(r#"{"type":"ping","id":2}"#).await.0, 503);
    redis.restart();
    eventually("a handed-over POST after the restart", || async {
        Some(sse.post_raw(r#"{"type":"ping","id":3}"#).await.0).filter(|s| *s == 202)
    })
    .await;
    // Only the 202 POST is answered on the stream (a 404 one never is).
    assert_eq!(sse.json().await, json!({"type": "pong", "id": 3}));
    holder.stop().await;
    poster.stop().await;
}

/// Open a direct stream with `token` (none: refused) on a raw connection;
/// what the node sent until `until` appeared (or it closed).
async fn raw_stream(addr: SocketAddr, token: Option<&str>, until: &[u8]) -> (TcpStream, Vec<u8>) {
    let query = token.map(|t| format!("?token={t}")).unwrap_or_default();
    let request = format!("GET /sse{query} HTTP/1.1\r\nhost: x\r\n\r\n");
    let mut s = send_raw(addr, request.as_bytes()).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(until.len()).any(|w| w == until) {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    (s, got)
}

#[tokio::test]
async fn floods_of_refused_streams_and_thousands_of_one_users_streams_stay_small() {
    const N: usize = 2000;
    let node = BinNode::start(&[]).await;
    let addr = node.addr;
    // Warm up: one stream opened and closed.
    drop(raw_stream(addr, Some(&any_token("warm")), b"welcome").await);
    let before = node.rss_kib();
    // 2,000 GET /sse without a token, 200 at a time: each is 401.
    for _ in 0..N / 200 {
        let batch = (0..200).map(|_| raw_stream(addr, None, b"\r\n\r\n"));
        for (_, got) in futures_util::future::join_all(batch).await {
            assert!(
                got.starts_with(b"HTTP/1.1 401"),
                "{}",
                String::from_utf8_lossy(&got)
            );
        }
    }
    let refused = node.rss_kib();
    // 2,000 streams of one user, held open.
    let token = any_token("alice");
    let mut streams = Vec::with_capacity(N);
    for _ in 0..N / 200 {
        let batch = (0..200).map(|_| raw_stream(addr, Some(&token), b"welcome"));
        for (s, got) in futures_util::future::join_all(batch).await {
            assert!(
                got.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&got)
            );
            streams.push(s);
        }
    }
    let open = node.rss_kib();
    let per_stream = (open.saturating_sub(refused) * 1024) / N as u64;
    println!(
        "VmRSS {before} KiB; after {N} refused GET /sse {refused} KiB; \
         with {N} streams of one user {open} KiB ({per_stream} B per stream)"
    );
    assert!(
        refused.saturating_sub(before) < 8 * 1024,
        "{before} -> {refused} KiB"
    );
    assert!(per_stream < 32 * 1024, "{per_stream} B per stream");
    // The node still serves: a new stream of the same user.
    let (_s, got) = raw_stream(addr, Some(&token), b"welcome").await;
    assert!(got.starts_with(b"HTTP/1.1 200"));
    drop(streams);
}

#[tokio::test]
async fn posts_in_flight_when_the_token_expires_get_answers_then_404() {
    let node = Node::start(&["--jwt-leeway", "0s"]).await;
    let short = token("alice", &["*"], &["*"], Duration::from_secs(2));
    let (mut sse, _) = Sse::open_with(node.addr, &short).await;
    // A fresh token for the POSTs: the stream's own expiry is the test.
    sse.token = any_token("alice");
    let poster = async {
        let mut statuses = Vec::new();
        // Bounded: about 200 POSTs over the 2 s before the expiry, then
        // 404s.
        for i in 0..2_000 {
            let status = sse
                .post_raw(&json!({"type": "ping", "id": i}).to_string())
                .await
                .0;
            statuses.push(status);
            if status == 404 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        statuses
    };
    let statuses = tokio::time::timeout(Duration::from_secs(60), poster)
        .await
        .expect("the POSTs end with a 404");
    // 202 (or 503 when the inbox was full) until the stream closed, then 404.
    let (last, before) = statuses.split_last().unwrap();
    assert_eq!(*last, 404, "{statuses:?}");
    assert!(
        before.iter().all(|s| matches!(s, 202 | 503)),
        "{statuses:?}"
    );
    // The stream ends with its close event: every POST taken before it is
    // answered in order, none after it.
    let rest = sse.rest().await;
    let close = rest.last().expect("a close event");
    assert_eq!(
        (close["type"].as_str(), close["code"].as_u64()),
        (Some("close"), Some(4001)),
        "{rest:?}"
    );
    let ids: Vec<u64> = rest.iter().filter_map(|v| v["id"].as_u64()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    node.stop().await;
}

#[tokio::test]
async fn extreme_exp_values_are_served_or_refused_never_crash() {
    let node = Node::start(&[]).await;
    let huge = [
        json!(u64::MAX),
        json!(1e300),
        json!(-1),
        json!("soon"),
        json!(null),
    ];
    let mut served = Vec::new();
    for exp in huge {
        let mut claims = wsgate_testkit::claims("alice");
        claims["exp"] = exp.clone();
        let t = wsgate_testkit::sign_hs256(&claims);
        let (_s, got) = raw_stream(node.addr, Some(&t), b"\n\n").await;
        let status = &got[..got.len().min(12)];
        assert!(
            status == b"HTTP/1.1 200" || status == b"HTTP/1.1 401",
            "exp {exp}: {}",
            String::from_utf8_lossy(&got)
        );
        if status == b"HTTP/1.1 200" {
            served.push(exp);
        }
    }
    // u64::MAX is a valid (far) expiry: its stream is open and answers.
    assert_eq!(served, [json!(u64::MAX)]);
    let mut claims = wsgate_testkit::claims("alice");
    claims["exp"] = json!(u64::MAX);
    let (mut sse, _) = Sse::open_with(node.addr, &wsgate_testkit::sign_hs256(&claims)).await;
    sse.send(json!({"type": "ping", "id": "far"})).await;
    assert_eq!(sse.json().await, json!({"type": "pong", "id": "far"}));
    node.stop().await;
}

#[tokio::test]
async fn posts_for_streams_of_nodes_that_never_existed_are_404_within_the_bound() {
    let redis = Redis::start();
    let node = ready_node(&redis).await;
    let (mut sse, _) = Sse::open(node.addr, "alice").await;
    let long_node = "Z".repeat(8_000);
    let posts = (0..50).map(|i| {
        let conn = if i % 2 == 0 {
            format!("c-{i}.Z2hvc3Q") // "ghost"
        } else {
            format!("c-{i}.{long_node}")
        };
        let sse = &sse;
        let json = [("content-type", "application/json")];
        async move { post_with(sse, &conn, &json, br#"{"type":"ping"}"#).await }
    });
    let answers = tokio::time::timeout(WAIT, futures_util::future::join_all(posts))
        .await
        .expect("answered within the 2 s bound");
    assert!(answers.iter().all(|s| *s == 404), "{answers:?}");
    // The node's own stream is not disturbed.
    sse.send(json!({"type": "ping", "id": "mine"})).await;
    assert_eq!(sse.json().await, json!({"type": "pong", "id": "mine"}));
    node.stop().await;
}

#[tokio::test]
async fn unfinished_get_sse_heads_hold_about_64_kib_each_and_only_up_to_the_pending_cap() {
    const CAP: usize = 300;
    let node = BinNode::start(&[
        "--max-pending-connections",
        "300",
        "--handshake-timeout",
        "1m",
    ])
    .await;
    drop(raw_stream(node.addr, Some(&any_token("warm")), b"welcome").await);
    let before = node.rss_kib();
    // 400 connections, each 60,000 bytes into a head it never finishes.
    let mut head =
        format!("GET /sse?token={} HTTP/1.1\r\nx-pad: ", any_token("alice")).into_bytes();
    head.extend(std::iter::repeat_n(b'p', 60_000));
    let mut held = Vec::new();
    for _ in 0..400 {
        held.push(send_raw(node.addr, &head).await);
    }
    // Everything sent has been read by then: a new connection is refused
    // (the cap is full) or served by the time the node answers it.
    let ops = node.ops_url();
    eventually("the pending cap reached", || async {
        let m = wsgate_testkit::metrics(&ops).await;
        let n = m.value(
            "wsgate_limit_refusals_total",
            &[("limit", "pending_connections")],
        );
        (n >= 1.0).then_some(n)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = node.rss_kib();
    let per_conn = during.saturating_sub(before) / CAP as u64;
    println!(
        "VmRSS {before} KiB; with {CAP} unfinished 60 KB heads {during} KiB ({per_conn} KiB each)"
    );
    assert!(per_conn <= 96, "{per_conn} KiB per unfinished head");
    drop(held);
}
