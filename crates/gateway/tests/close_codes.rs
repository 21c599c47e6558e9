//! PROTOCOL.md section 3: every close code the server sends, provoked for
//! real. Frames a normal client refuses to send (unmasked, invalid UTF-8)
//! and a client that never answers Pings or never reads use [`RawWs`].
//!
//! Not provoked here: 1011 (internal error) has no trigger short of a bug,
//! and 1013 (try again later) is not sent by this gateway, which refuses
//! overload before the upgrade with 503 instead (see `handshake.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use wsgate_testkit::{any_token, eventually, opcode, token, Ended, Node, RawWs, Ws, WAIT};

async fn closes_metric(node: &Node, code: &str) -> f64 {
    node.metrics()
        .await
        .value("wsgate_connection_closes_total", &[("code", code)])
}

/// A raw connection past its `welcome`.
async fn raw(node: &Node) -> RawWs {
    let mut ws = RawWs::connect(node.addr, &any_token("raw")).await;
    assert_eq!(ws.json().await["type"], "welcome");
    ws
}

#[tokio::test]
async fn client_close_1000_is_answered_and_the_connection_released() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    ws.join("lobby").await;
    ws.close(1000).await;
    assert_eq!(ws.ended().await, Ended::Close(1000));
    let ops = node.ops_url();
    eventually("connection released", || {
        let ops = ops.clone();
        async move {
            let m = wsgate_testkit::metrics(&ops).await;
            (m.value("wsgate_connections_active", &[("transport", "ws")]) == 0.0
                && m.value("wsgate_rooms_active", &[]) == 0.0)
                .then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn graceful_shutdown_closes_with_1001() {
    let node = Node::start(&["--drain-timeout", "2s"]).await;
    let (mut a, _) = Ws::open(&node.ws_url(), "alice").await;
    let (mut b, _) = Ws::open(&node.ws_url(), "bob").await;
    a.join("lobby").await;
    node.begin_stop();
    assert_eq!(a.ended().await, Ended::Close(1001));
    assert_eq!(b.ended().await, Ended::Close(1001));
    node.stop().await;
}

#[tokio::test]
async fn unmasked_client_frame_closes_with_1002() {
    let node = Node::start(&[]).await;
    let mut ws = raw(&node).await;
    ws.send_frame(opcode::TEXT, br#"{"type":"ping"}"#, false)
        .await;
    assert_eq!(ws.ended().await, Ended::Close(1002));
    assert_eq!(closes_metric(&node, "1002").await, 1.0);
}

#[tokio::test]
async fn binary_frame_closes_with_1003() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    ws.stream
        .send(Message::Binary(b"{\"type\":\"ping\"}".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(ws.ended().await, Ended::Close(1003));
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let node = Node::start(&[]).await;
    let mut ws = raw(&node).await;
    ws.send_frame(opcode::TEXT, &[b'"', 0xff, 0xfe, b'"'], true)
        .await;
    assert_eq!(ws.ended().await, Ended::Close(1007));
}

#[tokio::test]
async fn oversize_message_closes_with_1009_and_the_limit_itself_is_fine() {
    let node = Node::start(&["--max-message-bytes", "1024"]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    // Exactly 1024 bytes: accepted.
    let head = r#"{"type":"ping","id":""#;
    let pad = "x".repeat(1024 - head.len() - 2);
    let exact = format!("{head}{pad}\"}}");
    assert_eq!(exact.len(), 1024);
    ws.send_text(&exact).await;
    let v = ws.json().await;
    assert_eq!(v["type"], "pong");
    // One byte more: 1009.
    let over = format!("{head}{pad}x\"}}");
    ws.send_text(&over).await;
    assert_eq!(ws.ended().await, Ended::Close(1009));

    // A frame header announcing a huge payload is refused without the body.
    let mut ws = raw(&node).await;
    ws.send_frame(opcode::TEXT, &vec![b' '; 70_000], true).await;
    assert_eq!(ws.ended().await, Ended::Close(1009));
}

#[tokio::test]
async fn token_expiry_closes_with_4001() {
    let node = Node::start(&["--jwt-leeway", "0s"]).await;
    let t = token("alice", &["*"], &["*"], Duration::from_secs(2));
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &t).await;
    ws.join("lobby").await;
    assert_eq!(ws.ended().await, Ended::Close(4001));
    assert_eq!(closes_metric(&node, "4001").await, 1.0);
}

#[tokio::test]
async fn the_4001_close_waits_for_the_leeway() {
    // Expired a second ago, but within the 30 s leeway: accepted, and not
    // closed at once; a short leeway closes it as soon as it has passed.
    let node = Node::start(&["--jwt-leeway", "30s"]).await;
    let mut c = wsgate_testkit::claims("alice");
    let now = wsgate_testkit::now_secs();
    c["exp"] = json!(now - 1);
    c["iat"] = json!(now - 60);
    let t = wsgate_testkit::sign_hs256(&c);
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &t).await;
    ws.send(json!({"type":"ping","id":1})).await;
    assert_eq!(ws.json().await["type"], "pong");

    let node = Node::start(&["--jwt-leeway", "2s"]).await;
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &t).await;
    assert_eq!(ws.ended().await, Ended::Close(4001));
}

#[tokio::test]
async fn heartbeat_timeout_closes_with_1008_and_drops_the_silent_peer() {
    let node = Node::start(&["--heartbeat", "200ms", "--pong-timeout", "1s"]).await;
    // A client that answers Pings (tungstenite does, while it is read)
    // stays: it sees several Pings and is still served.
    let (mut good, welcome) = Ws::open(&node.ws_url(), "good").await;
    assert_eq!(welcome.heartbeat_ms, 200);
    let good = tokio::spawn(async move {
        let mut seen = 0;
        while seen < 4 {
            let next = tokio::time::timeout(WAIT, good.stream.next()).await;
            match next.expect("Pings every heartbeat").unwrap().unwrap() {
                Message::Ping(_) => seen += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        good
    });
    // A raw client that never answers.
    let mut silent = raw(&node).await;
    let mut pings = 0;
    let code = loop {
        match silent.read_frame().await {
            Some((opcode::PING, _)) => pings += 1,
            Some((opcode::CLOSE, p)) => break u16::from_be_bytes([p[0], p[1]]),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(pings >= 1, "a Ping came before the close");
    assert_eq!(code, 1008);
    assert!(silent.dropped().await, "the TCP connection is dropped");

    let mut good = good.await.unwrap();
    good.send(json!({"type":"ping","id":"alive"})).await;
    assert_eq!(good.json().await["type"], "pong");
    assert_eq!(closes_metric(&node, "1008").await, 1.0);
}

#[tokio::test]
async fn any_client_frame_counts_as_alive() {
    // A client that sends app-level frames but never Pongs is not closed
    // while it keeps talking within the pong timeout.
    let node = Node::start(&["--heartbeat", "100ms", "--pong-timeout", "1s"]).await;
    let mut ws = raw(&node).await;
    let mut pongs = 0;
    let mut pings_seen = 0;
    while pings_seen < 6 {
        ws.send_text(r#"{"type":"ping"}"#).await;
        loop {
            match ws.read_frame().await {
                Some((opcode::TEXT, _)) => {
                    pongs += 1;
                    break;
                }
                Some((opcode::PING, _)) => pings_seen += 1,
                other => panic!("closed while talking: {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pongs >= 1);
}

#[tokio::test]
async fn an_empty_queue_accepts_a_frame_larger_than_the_limit() {
    let node = Node::start(&["--max-outbound-bytes", "1024"]).await;
    let (mut member, _) = Ws::open(&node.ws_url(), "member").await;
    member.join("r").await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    let big = "y".repeat(8192);
    for k in 0..3 {
        pubr.publish("r", json!({"k": k, "big": big})).await;
        let m = member.json().await;
        assert_eq!(
            (&m["type"], &m["data"]["k"]),
            (&json!("message"), &json!(k))
        );
    }
    assert_eq!(
        node.metrics()
            .await
            .value("wsgate_slow_consumer_closes_total", &[]),
        0.0
    );
}

#[tokio::test]
async fn slow_consumer_is_closed_while_the_others_get_everything() {
    let node = Node::start(&[
        "--max-outbound-bytes",
        "262144",
        "--publish-rate",
        "1000000",
        "--publish-burst",
        "1000000",
    ])
    .await;
    // The slow one: joins, then never reads, with a small receive buffer.
    let mut slow = RawWs::connect_with(node.addr, &any_token("slow"), Some(4096)).await;
    assert_eq!(slow.json().await["type"], "welcome");
    slow.send_text(r#"{"type":"join","room":"busy","id":"j"}"#)
        .await;
    assert_eq!(slow.json().await["type"], "joined");

    // A healthy member reads everything in its own task.
    let (mut fast, _) = Ws::open(&node.ws_url(), "fast").await;
    fast.join("busy").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let reader = tokio::spawn(async move {
        loop {
            let v = fast.json().await;
            assert_eq!(v["type"], "message", "{v}");
            if tx.send(v["seq"].as_u64().unwrap()).is_err() {
                return;
            }
        }
    });

    // Publish 4 KiB messages until the slow consumer is closed (bounded).
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    let blob = "x".repeat(4096);
    let mut published = 0u64;
    let mut closed = false;
    for i in 0..20_000u64 {
        let ack = pubr.publish("busy", json!({"i": i, "blob": blob})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        published = ack["seq"].as_u64().unwrap();
        if i % 50 == 0
            && node
                .metrics()
                .await
                .value("wsgate_slow_consumer_closes_total", &[])
                >= 1.0
        {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "the slow consumer was never closed after {published} messages"
    );
    // A few more after the close: the healthy member still gets them.
    for i in 0..20 {
        pubr.publish("busy", json!({"after": i})).await;
        published += 1;
    }
    // The healthy member received every message, in order.
    let mut want = 1;
    while want <= published {
        let seq = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("healthy member starved")
            .expect("reader ended");
        assert_eq!(seq, want, "gap or duplicate for the healthy member");
        want += 1;
    }
    reader.abort();
    // The slow one sees its connection end: a 1008 Close if it got through,
    // else just the end of the TCP stream.
    match slow.ended().await {
        Ended::Close(1008) | Ended::Dropped => {}
        other => panic!("slow consumer ended with {other:?}"),
    }
    let m = node.metrics().await;
    assert_eq!(m.value("wsgate_slow_consumer_closes_total", &[]), 1.0);
    assert_eq!(
        m.value("wsgate_connection_closes_total", &[("code", "1008")]),
        1.0
    );
}
