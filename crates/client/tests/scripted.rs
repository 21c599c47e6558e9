//! The client against a scripted server (a bare WebSocket server speaking
//! the protocol by hand): duplicates and seq jumps from a misbehaving
//! server, the exact `join` it re-sends after a drop (`since` + `epoch`),
//! an epoch change, a silent connection given up after `heartbeat_ms` plus
//! the margin, request timeouts and id matching, and the publish keys: a
//! `timeout` sent again with the same key, a publish sent again after a drop
//! (behind the re-join) and again after `unavailable`, one failing once its
//! key may have expired.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{collect_until, seqs, until};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use wsgate_client::{Backoff, Client, ClientConfig, Event, GapReason};

type Ws = WebSocketStream<TcpStream>;

/// Accepts connections and hands each upgraded socket to the test.
async fn scripted_server() -> (String, mpsc::UnboundedReceiver<Ws>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                if tx.send(ws).is_err() {
                    break;
                }
            }
        }
    });
    (url, rx)
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next client text frame, as JSON.
async fn recv(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await.expect("client frame").unwrap() {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A `welcome` with an hourly heartbeat (no Ping due during a test).
async fn send_welcome(ws: &mut Ws, conn: &str) {
    send(
        ws,
        json!({"type":"welcome","conn":conn,"user":"u","node":"s","heartbeat_ms":60000}),
    )
    .await;
}

fn msg(room: &str, seq: u64) -> Value {
    json!({"type":"message","room":room,"seq":seq,"from":"srv","data":seq,"ts":1})
}

#[tokio::test]
async fn duplicates_dropped_jumps_reported_resume_sent_silence_detected() {
    let (url, mut conns) = scripted_server().await;
    let mut config = ClientConfig::new([url], "opaque-token");
    config.backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    config.heartbeat_margin = Duration::from_millis(200);
    config.rng_seed = Some(5);
    let connecting = tokio::spawn(Client::connect(config));

    // First connection: a misbehaving stream.
    let mut ws = conns.recv().await.unwrap();
    send(
        &mut ws,
        json!({"type":"welcome","conn":"c1","user":"u","node":"s1","heartbeat_ms":60000}),
    )
    .await;
    let (client, mut events) = connecting.await.unwrap().unwrap();
    let joining = {
        let client = client.clone();
        tokio::spawn(async move { client.join("r").await })
    };
    let join = recv(&mut ws).await;
    assert_eq!(join["type"], "join");
    assert_eq!(join["room"], "r");
    assert!(
        join.get("since").is_none(),
        "a fresh join has no since: {join}"
    );
    send(
        &mut ws,
        json!({"type":"joined","room":"r","seq":0,"epoch":"E1","id":join["id"]}),
    )
    .await;
    let info = joining.await.unwrap().unwrap();
    assert_eq!((info.seq, info.epoch.as_str()), (0, "E1"));
    for seq in [1, 2, 2, 1, 3, 5] {
        send(&mut ws, msg("r", seq)).await;
    }
    let seen = collect_until(
        &mut events,
        "seq 5",
        |e| matches!(e, Event::Message(m) if m.seq == 5),
    )
    .await;
    assert_eq!(seqs(&seen, "r"), [1, 2, 3, 5], "duplicates dropped");
    let gap = seen
        .iter()
        .find_map(|e| match e {
            Event::Gap(g) => Some(g.clone()),
            _ => None,
        })
        .expect("the jump is reported");
    assert_eq!(gap.reason, GapReason::SeqJump);
    assert_eq!((gap.expected_after, gap.got), (3, 5));

    // The server fails (Close 1011): the client reconnects.
    ws.close(Some(CloseFrame {
        code: CloseCode::Error,
        reason: "boom".into(),
    }))
    .await
    .unwrap();
    let dropped = until(&mut events, "disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    assert!(
        matches!(&dropped, Event::Disconnected { code: Some(1011), reason } if reason == "boom"),
        "{dropped:?}"
    );
    drop(ws);

    // Second connection: the client re-joins with since + epoch; the
    // server replays with an overlap.
    let mut ws = conns.recv().await.unwrap();
    send(
        &mut ws,
        json!({"type":"welcome","conn":"c2","user":"u","node":"s2","heartbeat_ms":60000}),
    )
    .await;
    let rejoin = recv(&mut ws).await;
    assert_eq!(rejoin["type"], "join");
    assert_eq!(rejoin["room"], "r");
    assert_eq!(rejoin["since"], 5);
    assert_eq!(rejoin["epoch"], "E1");
    send(
        &mut ws,
        json!({"type":"joined","room":"r","seq":7,"epoch":"E1","recovered":true,"id":rejoin["id"]}),
    )
    .await;
    for seq in 4..=7 {
        send(&mut ws, msg("r", seq)).await;
    }
    let seen = collect_until(
        &mut events,
        "seq 7",
        |e| matches!(e, Event::Message(m) if m.seq == 7),
    )
    .await;
    assert!(seen.iter().any(|e| matches!(
        e,
        Event::Resumed { room, recovered: true } if room == "r"
    )));
    assert_eq!(seqs(&seen, "r"), [6, 7]);

    // An unsolicited joined with a new epoch is a gap, and the new epoch's
    // seqs are delivered even though they are lower.
    send(
        &mut ws,
        json!({"type":"joined","room":"r","seq":0,"epoch":"E2","recovered":false}),
    )
    .await;
    send(&mut ws, msg("r", 1)).await;
    let seen = collect_until(&mut events, "seq 1 of E2", |e| {
        matches!(e, Event::Message(_))
    })
    .await;
    match &seen[..] {
        [.., Event::Gap(g), Event::Message(m)] => {
            assert_eq!(g.reason, GapReason::EpochChanged);
            assert_eq!((g.expected_after, g.got), (7, 0));
            assert_eq!(g.epoch, "E2");
            assert_eq!(m.seq, 1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(client.position("r").await, Some((1, "E2".into())));

    // The TCP connection is lost (no Close frame).
    drop(ws);
    match until(&mut events, "reset", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await
    {
        Event::Disconnected { code, .. } => assert_eq!(code, None),
        _ => unreachable!(),
    }

    // Third connection: the server announces a 100 ms heartbeat and then
    // stays silent (no Ping, nothing). The client gives it up after
    // heartbeat_ms + margin and reconnects.
    let mut ws = conns.recv().await.unwrap();
    send(
        &mut ws,
        json!({"type":"welcome","conn":"c3","user":"u","node":"s3","heartbeat_ms":100}),
    )
    .await;
    let rejoin = recv(&mut ws).await;
    assert_eq!(
        (&rejoin["since"], &rejoin["epoch"]),
        (&json!(1), &json!("E2"))
    );
    let seen = collect_until(&mut events, "heartbeat timeout", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    match seen.last() {
        Some(Event::Disconnected { code, reason }) => {
            assert_eq!(*code, None);
            assert!(reason.contains("heartbeat"), "{reason}");
        }
        other => panic!("{other:?}"),
    }

    // close: Close 1000 to the server, no reconnect after it.
    let mut ws = conns.recv().await.unwrap();
    send(
        &mut ws,
        json!({"type":"welcome","conn":"c4","user":"u","node":"s4","heartbeat_ms":60000}),
    )
    .await;
    until(
        &mut events,
        "connected again",
        |e| matches!(e, Event::Connected { node, .. } if node == "s4"),
    )
    .await;
    let closing = {
        let client = client.clone();
        tokio::spawn(async move { client.close().await })
    };
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1000);
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
    drop(ws);
    closing.await.unwrap();
    while let Some(e) = events.next().await {
        assert!(!matches!(e, Event::Reconnecting { .. }), "{e:?}");
    }
}

#[tokio::test]
async fn requests_time_out_timeouts_and_drops_resend_publishes_with_their_key() {
    let (url, mut conns) = scripted_server().await;
    let welcome = json!({"type":"welcome","conn":"c","user":"u","node":"s","heartbeat_ms":60000});

    // No answer: Timeout after request_timeout.
    let mut config = ClientConfig::new([url.clone()], "t");
    config.request_timeout = Duration::from_millis(200);
    let connecting = tokio::spawn(Client::connect(config));
    let mut ws = conns.recv().await.unwrap();
    send(&mut ws, welcome.clone()).await;
    let (impatient, _events) = connecting.await.unwrap().unwrap();
    let err = impatient.publish("r", 1).await.unwrap_err();
    assert!(
        matches!(err, wsgate_client::ClientError::Timeout),
        "{err:?}"
    );
    assert_eq!(recv(&mut ws).await["type"], "publish");
    impatient.close().await;

    let mut config = ClientConfig::new([url], "t");
    config.backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    let connecting = tokio::spawn(Client::connect(config));
    let mut ws = conns.recv().await.unwrap();
    send(&mut ws, welcome).await;
    let (client, _events) = connecting.await.unwrap().unwrap();

    // Answers are matched by id, whatever their order.
    let (c1, c2) = (client.clone(), client.clone());
    let p1 = tokio::spawn(async move { c1.publish("r", "a").await });
    let f1 = recv(&mut ws).await;
    let p2 = tokio::spawn(async move { c2.publish("r", "b").await });
    let f2 = recv(&mut ws).await;
    send(
        &mut ws,
        json!({"type":"ack","id":f2["id"],"room":"r","seq":11}),
    )
    .await;
    send(
        &mut ws,
        json!({"type":"error","id":f1["id"],"code":"rate_limited","message":"slow down"}),
    )
    .await;
    assert_eq!(p2.await.unwrap().unwrap(), 11);
    let err = p1.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(wsgate_client::ErrorCode::RateLimited));

    // Every publish carries a key, unique per publish.
    assert!(f1["key"].is_string() && f2["key"].is_string());
    assert_ne!(f1["key"], f2["key"]);

    // `timeout` (fate unknown): sent again with the same key, 3 times, then
    // the caller gets it. `unavailable` is not sent again.
    let c4 = client.clone();
    let p4 = tokio::spawn(async move { c4.publish("r", "t").await });
    let first = recv(&mut ws).await;
    let mut last = first.clone();
    for attempt in 0..4 {
        send(
            &mut ws,
            json!({"type":"error","id":last["id"],"code":"timeout","message":"broker did not confirm in time"}),
        )
        .await;
        if attempt == 3 {
            break;
        }
        last = recv(&mut ws).await;
        assert_eq!(last["type"], "publish");
        assert_eq!(last["key"], first["key"]);
        assert_ne!(last["id"], first["id"]);
    }
    let err = p4.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(wsgate_client::ErrorCode::Timeout));
    let c5 = client.clone();
    let p5 = tokio::spawn(async move { c5.publish("r", "u").await });
    let f5 = recv(&mut ws).await;
    send(
        &mut ws,
        json!({"type":"error","id":f5["id"],"code":"unavailable","message":"broker unavailable"}),
    )
    .await;
    let err = p5.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(wsgate_client::ErrorCode::Unavailable));

    // A publish in flight when the connection drops is sent again, same
    // key, on the next connection after its re-joins; the caller gets that
    // ack.
    let joining = {
        let c = client.clone();
        tokio::spawn(async move { c.join("j").await })
    };
    let jf = recv(&mut ws).await;
    send(
        &mut ws,
        json!({"type":"joined","id":jf["id"],"room":"j","seq":3,"epoch":"E"}),
    )
    .await;
    joining.await.unwrap().unwrap();
    let c3 = client.clone();
    let p3 = tokio::spawn(async move { c3.publish("r", "c").await });
    let f3 = recv(&mut ws).await;
    drop(ws);
    let mut ws = conns.recv().await.unwrap();
    send_welcome(&mut ws, "c2").await;
    let rejoin = recv(&mut ws).await;
    assert_eq!(
        (&rejoin["type"], &rejoin["since"]),
        (&json!("join"), &json!(3))
    );
    let again = recv(&mut ws).await;
    assert_eq!(again["type"], "publish");
    assert_eq!(again["key"], f3["key"]);
    assert_eq!(again["data"], "c");
    // `unavailable` for a publish sent before does not mean "not
    // published": it is sent again later, same key.
    send(
        &mut ws,
        json!({"type":"error","id":again["id"],"code":"unavailable","message":"broker unavailable"}),
    )
    .await;
    let third = recv(&mut ws).await;
    assert_eq!(
        (&third["type"], &third["key"]),
        (&json!("publish"), &f3["key"])
    );
    send(
        &mut ws,
        json!({"type":"ack","id":third["id"],"room":"r","seq":12}),
    )
    .await;
    assert_eq!(p3.await.unwrap().unwrap(), 12);
    client.close().await;
}

#[tokio::test]
async fn a_publish_unanswered_past_the_key_window_fails_with_publish_expired() {
    let (url, mut conns) = scripted_server().await;
    let mut config = ClientConfig::new([url], "t");
    config.backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(5));
    let connecting = tokio::spawn(Client::connect(config));
    let mut ws = conns.recv().await.unwrap();
    send_welcome(&mut ws, "c").await;
    let (client, mut events) = connecting.await.unwrap().unwrap();
    let c = client.clone();
    let publishing = tokio::spawn(async move { c.publish("r", 1).await });
    let _ = recv(&mut ws).await;
    // The node goes away for good: no connection gets a welcome again.
    drop(ws);
    drop(conns);
    until(&mut events, "disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    // No live connection needs real time now: skip the 4.5 minutes.
    tokio::time::pause();
    let err = tokio::time::timeout(Duration::from_secs(600), publishing)
        .await
        .expect("failed within the window plus the backoff")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, wsgate_client::ClientError::PublishExpired),
        "{err:?}"
    );
    client.close().await;
}
