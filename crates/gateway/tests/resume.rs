//! PROTOCOL.md section 2, "Resuming after a reconnect": `join` with `since`
//! (and `epoch`) is `recovered: true` with an exact replay of
//! `(since, latest]` when history reaches back, and `recovered: false` with
//! nothing replayed otherwise; live messages follow without gap or duplicate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use wsgate_testkit::{Node, Ws};

/// Publish `n` messages to `room` (data = 1..=n after `offset`).
async fn publish_n(ws: &mut Ws, room: &str, offset: u64, n: u64) {
    for k in offset + 1..=offset + n {
        let ack = ws.publish(room, json!({"k": k})).await;
        assert_eq!(ack["seq"], k, "{ack}");
    }
}

/// Send a resume join and return the `joined` answer.
async fn resume(ws: &mut Ws, room: &str, since: u64, epoch: Option<&str>) -> Value {
    let mut frame = json!({"type":"join","room":room,"since":since,"id":"resume"});
    if let Some(e) = epoch {
        frame["epoch"] = json!(e);
    }
    ws.send(frame).await;
    let v = ws.json().await;
    assert_eq!(v["type"], "joined", "{v}");
    assert_eq!(v["id"], "resume");
    v
}

/// The seqs of the next messages up to a `pong`.
async fn seqs_until_pong(ws: &mut Ws) -> Vec<u64> {
    ws.send(json!({"type":"ping","id":"fence"})).await;
    let mut out = Vec::new();
    loop {
        let v = ws.json().await;
        match v["type"].as_str() {
            Some("message") => out.push(v["seq"].as_u64().unwrap()),
            Some("pong") => return out,
            _ => panic!("unexpected {v}"),
        }
    }
}

#[tokio::test]
async fn since_replays_exactly_the_missed_messages_then_live_ones() {
    let node = Node::start(&[]).await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    let (mut first, _) = Ws::open(&node.ws_url(), "alice").await;
    let epoch = first.join("lobby").await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    publish_n(&mut pubr, "lobby", 0, 3).await;
    assert_eq!(seqs_until_pong(&mut first).await, [1, 2, 3]);
    first.close(1000).await;
    // Missed while away: 4..=7.
    publish_n(&mut pubr, "lobby", 3, 4).await;
    let (mut again, _) = Ws::open(&node.ws_url(), "alice").await;
    let joined = resume(&mut again, "lobby", 3, Some(&epoch)).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["seq"], 7);
    assert_eq!(joined["epoch"], epoch.as_str());
    for k in 4..=7u64 {
        let m = again.json().await;
        assert_eq!((&m["type"], &m["seq"]), (&json!("message"), &json!(k)));
        assert_eq!(m["data"], json!({"k": k}));
        assert_eq!(m["from"], "pub");
    }
    publish_n(&mut pubr, "lobby", 7, 2).await;
    assert_eq!(seqs_until_pong(&mut again).await, [8, 9]);
}

#[tokio::test]
async fn since_without_epoch_also_recovers() {
    let node = Node::start(&[]).await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    publish_n(&mut pubr, "r", 0, 5).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    let joined = resume(&mut ws, "r", 2, None).await;
    assert_eq!(
        (&joined["recovered"], &joined["seq"]),
        (&json!(true), &json!(5))
    );
    assert_eq!(seqs_until_pong(&mut ws).await, [3, 4, 5]);
    // since 0 on a room with history that still holds seq 1: everything.
    let (mut all, _) = Ws::open(&node.ws_url(), "bob").await;
    let joined = resume(&mut all, "r", 0, None).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(seqs_until_pong(&mut all).await, [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn since_equal_to_latest_recovers_with_nothing_to_replay() {
    let node = Node::start(&[]).await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    publish_n(&mut pubr, "r", 0, 4).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    let joined = resume(&mut ws, "r", 4, None).await;
    assert_eq!(
        (&joined["recovered"], &joined["seq"]),
        (&json!(true), &json!(4))
    );
    assert!(seqs_until_pong(&mut ws).await.is_empty());
    // A brand-new room: since 0 is its latest.
    let joined = resume(&mut ws, "empty", 0, None).await;
    assert_eq!(
        (&joined["recovered"], &joined["seq"]),
        (&json!(true), &json!(0))
    );
    publish_n(&mut pubr, "r", 4, 1).await;
    assert_eq!(seqs_until_pong(&mut ws).await, [5]);
}

#[tokio::test]
async fn since_beyond_history_is_not_recovered_and_replays_nothing() {
    let node = Node::start(&["--history", "3"]).await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    let epoch = ws.join("r").await["epoch"].as_str().unwrap().to_owned();
    // Published while alice is still a member: a room left without history
    // and members is forgotten (a new epoch), and alice's close must not
    // race the first publish.
    publish_n(&mut pubr, "r", 0, 10).await;
    ws.close(1000).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    // History keeps at least 3: seq 7 onwards. Resuming from 2 needs seq 3.
    let joined = resume(&mut ws, "r", 2, Some(&epoch)).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(joined["seq"], 10);
    assert!(
        seqs_until_pong(&mut ws).await.is_empty(),
        "nothing replayed"
    );
    // Live messages follow.
    publish_n(&mut pubr, "r", 10, 1).await;
    assert_eq!(seqs_until_pong(&mut ws).await, [11]);
    // The last --history messages are always recoverable.
    let (mut near, _) = Ws::open(&node.ws_url(), "bob").await;
    let joined = resume(&mut near, "r", 8, Some(&epoch)).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(seqs_until_pong(&mut near).await, [9, 10, 11]);
}

#[tokio::test]
async fn since_above_latest_is_not_recovered() {
    let node = Node::start(&[]).await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    publish_n(&mut pubr, "r", 0, 2).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    let joined = resume(&mut ws, "r", 5, None).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(joined["seq"], 2);
    assert!(seqs_until_pong(&mut ws).await.is_empty());
    publish_n(&mut pubr, "r", 2, 1).await;
    assert_eq!(seqs_until_pong(&mut ws).await, [3]);
}

#[tokio::test]
async fn a_wrong_epoch_is_not_recovered() {
    let node = Node::start(&[]).await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    publish_n(&mut pubr, "r", 0, 5).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    let joined = resume(&mut ws, "r", 3, Some("not-the-epoch")).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(joined["seq"], 5);
    assert_ne!(joined["epoch"], "not-the-epoch");
    assert!(seqs_until_pong(&mut ws).await.is_empty());
    // The right epoch recovers.
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let (mut ok, _) = Ws::open(&node.ws_url(), "bob").await;
    let joined = resume(&mut ok, "r", 3, Some(&epoch)).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(seqs_until_pong(&mut ok).await, [4, 5]);
}

#[tokio::test]
async fn a_repeated_join_with_since_replays_again() {
    let node = Node::start(&[]).await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    ws.join("r").await;
    publish_n(&mut pubr, "r", 0, 3).await;
    assert_eq!(seqs_until_pong(&mut ws).await, [1, 2, 3]);
    // Already a member: joined again, with the replay it asked for, and no
    // duplicate live copies afterwards.
    let joined = resume(&mut ws, "r", 1, None).await;
    assert_eq!(
        (&joined["recovered"], &joined["seq"]),
        (&json!(true), &json!(3))
    );
    assert_eq!(seqs_until_pong(&mut ws).await, [2, 3]);
    publish_n(&mut pubr, "r", 3, 1).await;
    assert_eq!(seqs_until_pong(&mut ws).await, [4]);
}

#[tokio::test]
async fn replay_and_concurrent_live_traffic_have_no_gap_or_duplicate() {
    let node = Node::start(&[]).await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    publish_n(&mut pubr, "r", 0, 20).await;
    // Keep publishing while clients resume.
    let url = node.ws_url();
    let writer = tokio::spawn(async move {
        let (mut ws, _) = Ws::open(&url, "pub2").await;
        for k in 0..100 {
            let ack = ws.publish("r", json!({"live": k})).await;
            assert_eq!(ack["type"], "ack");
        }
    });
    let mut readers = Vec::new();
    for i in 0..5u64 {
        let (mut ws, _) = Ws::open(&node.ws_url(), &format!("r{i}")).await;
        let since = i * 3;
        let joined = resume(&mut ws, "r", since, None).await;
        assert_eq!(joined["recovered"], true, "{joined}");
        readers.push((ws, since));
    }
    writer.await.unwrap();
    for (ws, since) in &mut readers {
        let got = wsgate_testkit::messages(ws, (120 - *since) as usize).await;
        let seqs: Vec<u64> = got.iter().map(|m| m.0).collect();
        assert_eq!(seqs, (*since + 1..=120).collect::<Vec<_>>());
        assert!(seqs_until_pong(ws).await.is_empty());
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_during_a_replay_is_still_closed() {
    // A paced replay must not keep a dead client's session alive (its
    // heartbeat does not run meanwhile): it is closed as a slow consumer.
    let node = Node::start(&[
        "--max-outbound-bytes",
        "16384",
        "--heartbeat",
        "200ms",
        "--pong-timeout",
        "1s",
        "--publish-rate",
        "100000",
        "--publish-burst",
        "100000",
    ])
    .await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    let blob = "x".repeat(32_000);
    for k in 1..=250u64 {
        pubr.publish("big", json!({"k": k, "blob": blob})).await;
    }
    pubr.close(1000).await;
    drop(pubr);
    let mut raw = wsgate_testkit::RawWs::connect_with(
        node.addr,
        &wsgate_testkit::any_token("dead"),
        Some(4096),
    )
    .await;
    raw.send_text(r#"{"type":"join","room":"big","since":0}"#)
        .await;
    // Never read, never answer a Ping: the server must give up on it.
    let ops = node.ops_url();
    wsgate_testkit::eventually("the dead client is closed", || {
        let ops = ops.clone();
        async move {
            let m = wsgate_testkit::metrics(&ops).await;
            (m.value("wsgate_slow_consumer_closes_total", &[]) == 1.0).then_some(())
        }
    })
    .await;
    match raw.ended().await {
        wsgate_testkit::Ended::Close(1008) | wsgate_testkit::Ended::Dropped => {}
        other => panic!("ended with {other:?}"),
    }
}
