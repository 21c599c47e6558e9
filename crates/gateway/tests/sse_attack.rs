//! PROTOCOL.md section 7 under attack: floods, oversized and hostile
//! input, and faults, against real nodes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsgate_testkit::{eventually, header, Node, Sse, WAIT};

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
