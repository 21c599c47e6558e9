//! The node's edge (issue 9, items 5, 9, 10, 12): nothing unauthenticated
//! may exhaust a node. The HTTP API authenticates from the head before it
//! reads a body byte, reads bodies within a deadline and a node-wide byte
//! budget; connections not upgraded yet and operations connections are
//! capped and time out; `Sec-WebSocket-Key` is validated; a broker outage's
//! 503s are not logged as errors. Real nodes, raw TCP on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsgate_testkit::{
    any_token, eventually, free_port, header, http, http_get, token, BinNode, Node, Ws, WAIT,
};

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// The head of `POST /api/rooms/{room}/messages` declaring `length` body
/// bytes, with a Bearer token when given.
fn api_head(addr: SocketAddr, room: &str, token: Option<&str>, length: usize) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /api/rooms/{room}/messages HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n{auth}\r\n"
    )
}

/// Connect to `addr` and send `bytes`.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// Read until the end of a response head: its status, or `None` when the
/// connection ended (or was reset) first. Panics after [`WAIT`].
async fn status(s: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_string();
                return head.split_whitespace().nth(1).and_then(|c| c.parse().ok());
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("neither a response nor a close within the wait")
}

/// Whether the server closes `s` (EOF or reset) within [`WAIT`], reading
/// and discarding whatever it sends before.
async fn closed_by_server(s: &mut TcpStream) -> bool {
    tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = s.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .is_ok()
}

/// The status of `GET path` on an operations listener.
async fn ops_status(ops_url: &str, path: &str) -> u16 {
    http_get(&format!("{ops_url}{path}")).await.unwrap().0
}

async fn refusals(node: &Node, limit: &str) -> f64 {
    node.metrics()
        .await
        .value("wsgate_limit_refusals_total", &[("limit", limit)])
}

#[tokio::test]
async fn the_api_answers_from_the_head_before_reading_the_body() {
    // A body deadline far beyond the wait: an answer can only come from
    // the head alone.
    let node = Node::start(&["--body-timeout", "1h"]).await;
    let no_grant = token("svc", &["*"], &["other"], Duration::from_secs(60));
    let good = any_token("svc");
    let cases = [
        (None, "lobby", 401),
        (Some("not-a-jwt"), "lobby", 401),
        (Some(no_grant.as_str()), "lobby", 403),
        (Some(good.as_str()), "bad%20room", 400),
    ];
    for (t, room, want) in cases {
        // A megabyte announced, not one byte of it sent.
        let mut s = send_raw(
            node.addr,
            api_head(node.addr, room, t, 1_000_000).as_bytes(),
        )
        .await;
        assert_eq!(status(&mut s).await, Some(want), "token {t:?}, room {room}");
        // The body never comes: the server closes once the client says so
        // (it drains a refused body for a moment, but keeps nothing).
        s.shutdown().await.unwrap();
        assert!(
            closed_by_server(&mut s).await,
            "connection kept after {want}"
        );
    }
    // A declared length over --max-message-bytes: 413 before the body too.
    let mut s = send_raw(
        node.addr,
        api_head(node.addr, "lobby", Some(&good), 2 << 20).as_bytes(),
    )
    .await;
    assert_eq!(status(&mut s).await, Some(413));
}

#[tokio::test]
async fn a_client_that_sends_its_whole_body_first_still_reads_the_refusal() {
    let node = BinNode::start_with(Path::new(BIN), &[]).await;
    // 900 KB with a bad token, written whole before the answer is read (as
    // many HTTP clients do): the answer, not a reset, every time.
    let body = format!("\"{}\"", "x".repeat(900_000));
    let url = format!("http://{}/api/rooms/lobby/messages", node.addr);
    for i in 0..20 {
        let resp = http(
            "POST",
            &url,
            &[("authorization", "Bearer bad")],
            body.as_bytes(),
        )
        .await
        .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(resp.0, 401, "request {i}");
        assert_eq!(header(&resp, "connection"), Some("close"));
    }
}

#[tokio::test]
async fn a_trickled_body_gets_408_and_the_connection_closes() {
    let node = Node::start(&["--body-timeout", "1s"]).await;
    let t = any_token("svc");
    let mut s = send_raw(
        node.addr,
        api_head(node.addr, "lobby", Some(&t), 1000).as_bytes(),
    )
    .await;
    let (mut rd, mut wr) = s.split();
    // One byte every 100 ms: the 1000 bytes would take 100 s.
    let trickle = async {
        for _ in 0..1000 {
            if wr.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let answer = async {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, rd.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).to_string()
    };
    let answer = tokio::select! {
        a = answer => a,
        _ = trickle => panic!("the trickled body was read to its end"),
    };
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert_eq!(refusals(&node, "body_timeout").await, 1.0);
    // Nothing was published.
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    assert_eq!(ws.join("lobby").await["seq"], 0);
}

#[tokio::test]
async fn bodies_in_flight_beyond_the_budget_get_503() {
    let node = Node::start(&[
        "--max-message-bytes",
        "1000000",
        "--max-inflight-body-bytes",
        "2000000",
        "--body-timeout",
        "1m",
    ])
    .await;
    let t = any_token("svc");
    let head = api_head(node.addr, "lobby", Some(&t), 1_000_000);
    // Two authenticated bodies of 1 MB, half sent: they hold the budget.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut bytes = head.clone().into_bytes();
        bytes.extend_from_slice(b"\"");
        bytes.extend(std::iter::repeat_n(b'x', 500_000));
        holders.push(send_raw(node.addr, &bytes).await);
    }
    let publish = |body: Vec<u8>| {
        let url = format!("{}/api/rooms/lobby/messages", node.http_url());
        let auth = format!("Bearer {t}");
        async move { http("POST", &url, &[("authorization", &auth)], &body).await }
    };
    // Once the holders are being read, even a 2-byte body is refused.
    let resp = eventually("a third body refused", || async {
        publish(b"{}".to_vec()).await.ok().filter(|r| r.0 == 503)
    })
    .await;
    assert_eq!(header(&resp, "retry-after"), Some("1"), "{resp:?}");
    assert!(refusals(&node, "inflight_body_bytes").await >= 1.0);
    // The holders give up: their share comes back, a whole 1 MB body fits.
    drop(holders);
    let big = format!("\"{}\"", "y".repeat(999_998)).into_bytes();
    eventually("the budget released", || async {
        publish(big.clone()).await.ok().filter(|r| r.0 == 200)
    })
    .await;
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[tokio::test]
async fn unauthenticated_bodies_cost_no_memory() {
    let node = BinNode::start_with(Path::new(BIN), &["--body-timeout", "1m"]).await;
    let before = rss_kib(node.pid(), "VmRSS:");
    // 500 unauthenticated requests at once, each sending all but the last
    // byte of a 1 MiB body and then holding its connection.
    const N: usize = 500;
    const LEN: usize = 1 << 20;
    let head = api_head(node.addr, "lobby", None, LEN);
    let body: std::sync::Arc<[u8]> = vec![b'x'; LEN - 1].into();
    let mut tasks = Vec::new();
    for _ in 0..N {
        let (head, body, addr) = (head.clone(), body.clone(), node.addr);
        tasks.push(tokio::spawn(async move {
            let mut s = send_raw(addr, head.as_bytes()).await;
            // The server answers 401 and closes: the rest may be refused.
            let _ = s.write_all(&body).await;
            s
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(tokio::time::timeout(WAIT, t).await.expect("write").unwrap());
    }
    let peak = rss_kib(node.pid(), "VmHWM:");
    let growth_mib = peak.saturating_sub(before) / 1024;
    assert!(
        growth_mib < 64,
        "{N} unauthenticated 1 MiB bodies grew the node by {growth_mib} MiB"
    );
    // The node still serves.
    assert_eq!(ops_status(&node.ops_url(), "/health").await, 200);
    drop(held);
}

#[tokio::test]
async fn idle_and_half_sent_request_heads_are_closed_after_the_handshake_timeout() {
    let node = Node::start(&["--handshake-timeout", "1s"]).await;
    let mut idle = send_raw(node.addr, b"").await;
    let mut half = send_raw(
        node.addr,
        b"POST /api/rooms/lobby/messages HTTP/1.1\r\nHost: x\r\n",
    )
    .await;
    // A kept-alive connection idle after a complete request.
    let mut kept = send_raw(node.addr, b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status(&mut kept).await, Some(404));
    for (what, s) in [
        ("idle", &mut idle),
        ("half-sent", &mut half),
        ("kept-alive", &mut kept),
    ] {
        assert!(closed_by_server(s).await, "{what} connection kept open");
    }
}

#[tokio::test]
async fn a_request_head_over_64_kib_gets_431() {
    let node = Node::start(&[]).await;
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
        "p".repeat(70 * 1024)
    );
    let mut s = send_raw(node.addr, head.as_bytes()).await;
    assert_eq!(status(&mut s).await, Some(431));
    // A large head within the limit is served.
    let head = format!(
        "GET /nothing HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
        "p".repeat(48 * 1024)
    );
    let mut s = send_raw(node.addr, head.as_bytes()).await;
    assert_eq!(status(&mut s).await, Some(404));
}

#[tokio::test]
async fn connections_not_upgraded_beyond_the_cap_are_closed_at_once() {
    let node = Node::start(&[
        "--max-pending-connections",
        "4",
        "--handshake-timeout",
        "1m",
    ])
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(send_raw(node.addr, b"").await);
    }
    // The fifth gets 503 (or is closed) at once, not after a minute.
    let mut fifth = send_raw(node.addr, b"").await;
    let code = status(&mut fifth).await;
    assert!(matches!(code, None | Some(503)), "{code:?}");
    assert!(refusals(&node, "pending_connections").await >= 1.0);
    // The operations listener does not share the cap.
    assert_eq!(ops_status(&node.ops_url(), "/ready").await, 200);
    // Once the idle ones go, clients get in; upgraded connections do not
    // count against the cap.
    drop(idle);
    eventually("the idle connections' slots freed", || async {
        // Four at once, each answered and closed (freeing its slot again).
        let mut probes = Vec::new();
        for _ in 0..4 {
            let req = b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            probes.push(send_raw(node.addr, req).await);
        }
        let mut served = 0;
        for p in &mut probes {
            served += usize::from(status(p).await == Some(404));
            assert!(closed_by_server(p).await);
        }
        (served == 4).then_some(())
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..8 {
        clients.push(Ws::open(&node.ws_url(), &format!("u{i}")).await);
    }
    assert_eq!(
        node.metrics()
            .await
            .value("wsgate_connections_active", &[("transport", "ws")]),
        8.0
    );
}

#[tokio::test]
async fn the_ops_listener_caps_its_connections_and_still_answers_probes() {
    let node = Node::start(&["--max-ops-connections", "4", "--ops-timeout", "1m"]).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(send_raw(node.ops, b"").await);
    }
    // Every slot held by an idle connection: a probe still gets through,
    // and the oldest idle connection is closed to make room.
    assert_eq!(ops_status(&node.ops_url(), "/health").await, 200);
    assert!(closed_by_server(&mut idle[0]).await, "the oldest kept");
    // Many more: the node never holds more than the cap (each new one
    // closes the oldest), and the probes keep working.
    for _ in 0..20 {
        idle.push(send_raw(node.ops, b"GET /metrics HTTP/1.1\r\n").await);
    }
    assert_eq!(ops_status(&node.ops_url(), "/ready").await, 200);
    // Any connection with four admitted after it has been closed.
    let older = idle.len() - 4;
    for (i, s) in idle[..older].iter_mut().enumerate() {
        assert!(closed_by_server(s).await, "idle ops connection {i} kept");
    }
    // Public clients are not locked out.
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    assert_eq!(ws.join("lobby").await["type"], "joined");
    let m = node.metrics().await;
    assert!(
        m.value(
            "wsgate_limit_refusals_total",
            &[("limit", "ops_connections")]
        ) >= 20.0
    );
}

#[tokio::test]
async fn idle_and_half_sent_ops_requests_are_closed_after_the_ops_timeout() {
    let node = Node::start(&["--ops-timeout", "1s"]).await;
    let mut idle = send_raw(node.ops, b"").await;
    let mut half = send_raw(node.ops, b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
    assert!(
        closed_by_server(&mut idle).await,
        "idle ops connection kept"
    );
    assert!(
        closed_by_server(&mut half).await,
        "half-sent ops request kept"
    );
    // One request per connection: a probe is answered and closed.
    let mut probe = send_raw(node.ops, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status(&mut probe).await, Some(200));
    assert!(closed_by_server(&mut probe).await);
}

/// `GET /ws` with a valid token and this `Sec-WebSocket-Key`.
async fn upgrade_with_key(addr: SocketAddr, key: &str) -> Option<u16> {
    let t = any_token("alice");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {t}\r\n\r\n"
    );
    let mut s = send_raw(addr, req.as_bytes()).await;
    status(&mut s).await
}

#[tokio::test]
async fn sec_websocket_key_must_be_base64_of_16_bytes() {
    let node = Node::start(&[]).await;
    // base64 of 15 and 17 bytes, not base64 at all, empty.
    for key in [
        "!!!",
        "AAAAAAAAAAAAAAAAAAAA",
        "AAAAAAAAAAAAAAAAAAAAAAA=",
        "AAAAAAAAAAAAAAAAAAAAAAAA",
        "",
    ] {
        assert_eq!(
            upgrade_with_key(node.addr, key).await,
            Some(400),
            "key {key:?}"
        );
    }
    assert_eq!(
        upgrade_with_key(node.addr, "dGhlIHNhbXBsZSBub25jZQ==").await,
        Some(101)
    );
    let m = node.metrics().await;
    assert_eq!(
        m.value(
            "wsgate_handshake_rejections_total",
            &[("reason", "bad_request")]
        ),
        5.0
    );
}

#[tokio::test]
async fn a_broker_outage_is_not_an_error_per_request() {
    // Redis on a port nothing listens on: the broker is down.
    let redis = format!("redis://127.0.0.1:{}/", free_port());
    let node = BinNode::start_with(
        Path::new(BIN),
        &[
            "--redis-url",
            &redis,
            "--log",
            "debug",
            "--log-format",
            "json",
        ],
    )
    .await;
    let t = any_token("svc");
    let url = format!("http://{}/api/rooms/lobby/messages", node.addr);
    for _ in 0..3 {
        let resp = http(
            "POST",
            &url,
            &[("authorization", &format!("Bearer {t}"))],
            b"{}",
        )
        .await
        .unwrap();
        assert_eq!(resp.0, 503, "{resp:?}");
    }
    let logs = eventually("the 503s logged at debug", || async {
        let logs = node.logs();
        (logs.matches("response unavailable").count() >= 3).then_some(logs)
    })
    .await;
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\"") && l.contains("response failed"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}
