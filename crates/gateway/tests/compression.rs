//! PROTOCOL.md section 12: permessage-deflate on `/ws`, seen from the wire.
//! The negotiation in the 101 answer, RSV1 per frame around
//! `--compression-min-bytes`, compressed client frames, and the bad input
//! (a deflate bomb, corrupt data, RSV1 where it means nothing). [`RawWs`]
//! shows the raw frames; the deflate on the test side is flate2 used
//! directly, not the gateway's own module.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};
use wsgate_testkit::{any_token, opcode, Ended, Node, RawWs, Ws};

/// What browsers and Python `websockets` offer.
const OFFER: &str = "permessage-deflate; client_max_window_bits";
const ANSWER: &str = "sec-websocket-extensions: permessage-deflate; \
                      server_no_context_takeover; client_no_context_takeover";
const RSV1: u8 = 0x40;
const FIN: u8 = 0x80;

/// One message compressed as RFC 7692 wants it: raw deflate, sync flush,
/// tail stripped.
fn deflate(payload: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() + 1024);
    c.compress_vec(payload, &mut out, FlushCompress::Sync)
        .unwrap();
    assert_eq!(c.total_in() as usize, payload.len());
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(16 << 20);
    Decompress::new(false)
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

/// A raw connection offering `offer`, past its `welcome`; the 101 head in
/// lower case.
async fn offering(node: &Node, sub: &str, offer: &str) -> (RawWs, String) {
    let (mut ws, head) = RawWs::connect_offering(node.addr, &any_token(sub), offer).await;
    let (_, welcome) = next(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    (ws, head.to_ascii_lowercase())
}

/// The next text frame (Pings and Pongs skipped): whether it had RSV1, and
/// its JSON (inflated when compressed).
async fn next(ws: &mut RawWs) -> (bool, Value) {
    loop {
        let (first, payload) = ws.read_raw().await.expect("connection ended");
        match first & 0x0f {
            opcode::PING | opcode::PONG => continue,
            opcode::TEXT => {
                assert_ne!(first & FIN, 0, "the server sends whole messages");
                let compressed = first & RSV1 != 0;
                let text = if compressed {
                    inflate(&payload)
                } else {
                    payload
                };
                return (compressed, serde_json::from_slice(&text).unwrap());
            }
            other => panic!("expected a text frame, got opcode {other}"),
        }
    }
}

/// The next frame of `type`, skipping others.
async fn next_of(ws: &mut RawWs, kind: &str) -> (bool, Value) {
    loop {
        let (rsv1, v) = next(ws).await;
        if v["type"] == kind {
            return (rsv1, v);
        }
    }
}

async fn join(ws: &mut RawWs, room: &str) {
    ws.send_text(&json!({"type": "join", "room": room, "id": "j"}).to_string())
        .await;
    assert_eq!(next_of(ws, "joined").await.1["room"], room);
}

/// A connection that negotiated compression, in room `dash`.
async fn member(node: &Node) -> RawWs {
    let (mut ws, head) = offering(node, "alice", OFFER).await;
    assert!(head.contains(ANSWER), "{head}");
    join(&mut ws, "dash").await;
    ws
}

/// Publish each of `data` to room `dash` from a plain connection, acked.
async fn publish(node: &Node, data: &[Value]) {
    let (mut publisher, _) = Ws::open(&node.ws_url(), "carol").await;
    for d in data {
        assert_eq!(publisher.publish("dash", d.clone()).await["type"], "ack");
    }
}

/// A dashboard-like JSON value of about `n` bytes.
fn dashboard(n: usize) -> Value {
    let rows: Vec<Value> = (0..n / 40)
        .map(|i| json!({"cpu": i % 97, "mem": i * 31 % 1000, "host": format!("node-{}", i % 7)}))
        .collect();
    json!(rows)
}

#[tokio::test]
async fn the_101_carries_the_negotiated_parameters() {
    let node = Node::start(&[]).await;
    let (_ws, head) = offering(&node, "alice", OFFER).await;
    assert!(head.contains(ANSWER), "{head}");
    // An offer that limits the server's window to ours is echoed.
    let (_ws, head) = offering(
        &node,
        "bob",
        "permessage-deflate; server_max_window_bits=15",
    )
    .await;
    assert!(
        head.contains(&format!("{ANSWER}; server_max_window_bits=15")),
        "{head}"
    );
}

#[tokio::test]
async fn an_offer_we_cannot_honour_opens_uncompressed_and_the_next_offer_is_taken() {
    let node = Node::start(&["--compression-min-bytes", "0"]).await;
    let (mut ws, head) = offering(
        &node,
        "alice",
        "permessage-deflate; server_max_window_bits=10",
    )
    .await;
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
    join(&mut ws, "dash").await;
    let (_, two) = offering(
        &node,
        "bob",
        "permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits",
    )
    .await;
    assert!(two.contains(ANSWER), "{two}");
    // The refused connection gets plain frames, however large.
    publish(&node, &[dashboard(2048)]).await;
    let (rsv1, msg) = next_of(&mut ws, "message").await;
    assert!(!rsv1);
    assert_eq!(msg["data"], dashboard(2048));
}

#[tokio::test]
async fn small_frames_go_plain_large_ones_compressed_to_whoever_negotiated() {
    let node = Node::start(&[]).await;
    let (mut deflating, _) = offering(&node, "alice", OFFER).await;
    let mut plain = RawWs::connect(node.addr, &any_token("bob")).await;
    assert_eq!(next(&mut plain).await.1["type"], "welcome");
    join(&mut deflating, "dash").await;
    join(&mut plain, "dash").await;
    let small = json!({"cpu": 3});
    let large = dashboard(2048);
    publish(&node, &[small.clone(), large.clone()]).await;

    let (rsv1, msg) = next_of(&mut deflating, "message").await;
    assert!(!rsv1, "below --compression-min-bytes: plain");
    assert_eq!(msg["data"], small);
    let (rsv1, msg) = next_of(&mut deflating, "message").await;
    assert!(rsv1, "at least --compression-min-bytes: compressed");
    assert_eq!(msg["data"], large);
    // The member without the extension gets the same messages plain.
    for want in [small, large] {
        let (rsv1, msg) = next_of(&mut plain, "message").await;
        assert!(!rsv1);
        assert_eq!(msg["data"], want);
    }
}

#[tokio::test]
async fn the_threshold_follows_the_flag() {
    let node = Node::start(&["--compression-min-bytes", "4096"]).await;
    let mut ws = member(&node).await;
    publish(&node, &[dashboard(2048), dashboard(8192)]).await;
    assert!(!next_of(&mut ws, "message").await.0);
    assert!(next_of(&mut ws, "message").await.0);
}

#[tokio::test]
async fn compression_off_ignores_the_offer() {
    let node = Node::start(&["--compression", "off", "--compression-min-bytes", "0"]).await;
    let (mut ws, head) = offering(&node, "alice", OFFER).await;
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
    join(&mut ws, "dash").await;
    publish(&node, &[dashboard(4096)]).await;
    assert!(!next_of(&mut ws, "message").await.0);
}

#[tokio::test]
async fn a_compressed_client_frame_is_inflated_and_published() {
    let node = Node::start(&[]).await;
    let mut ws = member(&node).await;
    let data = dashboard(4096);
    let publish = json!({"type": "publish", "room": "dash", "id": "p1", "data": data});
    ws.send_raw(
        FIN | RSV1 | opcode::TEXT,
        &deflate(publish.to_string().as_bytes()),
        true,
    )
    .await;
    // The ack and the member's own message come in either order.
    let (mut acked, mut delivered) = (false, false);
    while !(acked && delivered) {
        let (_, v) = next(&mut ws).await;
        match v["type"].as_str() {
            Some("ack") => acked = v["id"] == "p1",
            Some("message") => delivered = v["data"] == data,
            _ => panic!("unexpected {v}"),
        }
    }
}

#[tokio::test]
async fn a_deflate_bomb_closes_with_1009() {
    let node = Node::start(&["--max-message-bytes", "65536"]).await;
    let (mut ws, _) = offering(&node, "alice", OFFER).await;
    // About 1 KiB on the wire, 1 MiB once inflated.
    let bomb = deflate(&vec![b' '; 1 << 20]);
    assert!(bomb.len() <= 1100, "{}", bomb.len());
    ws.send_raw(FIN | RSV1 | opcode::TEXT, &bomb, true).await;
    assert_eq!(ws.ended().await, Ended::Close(1009));
    // The node is fine afterwards.
    let (_, welcome) = Ws::open(&node.ws_url(), "bob").await;
    assert_eq!(welcome.user, "bob");
}

#[tokio::test]
async fn corrupt_compressed_data_closes_with_1007() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = offering(&node, "alice", OFFER).await;
    // Block type 3 does not exist.
    ws.send_raw(FIN | RSV1 | opcode::TEXT, &[0xff, 0xff, 0xff, 0xff], true)
        .await;
    assert_eq!(ws.ended().await, Ended::Close(1007));
}

#[tokio::test]
async fn rsv1_on_a_control_frame_closes_with_1002() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = offering(&node, "alice", OFFER).await;
    ws.send_raw(FIN | RSV1 | opcode::PING, b"x", true).await;
    assert_eq!(ws.ended().await, Ended::Close(1002));
}

#[tokio::test]
async fn rsv1_without_the_extension_closes_with_1002() {
    let node = Node::start(&[]).await;
    let mut ws = RawWs::connect(node.addr, &any_token("alice")).await;
    assert_eq!(next(&mut ws).await.1["type"], "welcome");
    let ping = deflate(br#"{"type":"ping"}"#);
    ws.send_raw(FIN | RSV1 | opcode::TEXT, &ping, true).await;
    assert_eq!(ws.ended().await, Ended::Close(1002));
}
