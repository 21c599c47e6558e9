//! PROTOCOL.md section 2: every client frame and every server frame, `id`
//! echoing, membership rules, every error code, refresh, ping, ordering,
//! and that an error never closes the connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wsgate_testkit::{
    any_token, claims, eventually, messages, now_secs, sign_hs256, token, Node, Ws, WAIT,
};

/// Send `frame` and return the next text frame.
async fn ask(ws: &mut Ws, frame: Value) -> Value {
    ws.send(frame).await;
    ws.json().await
}

fn assert_error(v: &Value, code: &str, what: &str) {
    assert_eq!(v["type"], "error", "{what}: {v}");
    assert_eq!(v["code"], code, "{what}: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: an error has a message: {v}"
    );
}

#[tokio::test]
async fn welcome_comes_first_with_the_configured_heartbeat() {
    let node = Node::start(&["--heartbeat", "45s", "--node-id", "edge-7"]).await;
    let mut ws = Ws::connect(&node.ws_url(), Some(&any_token("alice")), None)
        .await
        .unwrap();
    let v = ws.json().await;
    assert_eq!(v["type"], "welcome");
    assert_eq!(v["user"], "alice");
    assert_eq!(v["node"], "edge-7");
    assert_eq!(v["heartbeat_ms"], 45_000);
    assert!(v["conn"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    // Connection ids are distinct.
    let (_, w2) = Ws::open(&node.ws_url(), "alice").await;
    assert_ne!(v["conn"].as_str().unwrap(), w2.conn);
}

#[tokio::test]
async fn every_direct_answer_echoes_a_string_or_number_id() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    let refresh = any_token("alice");
    for id in [json!("s-1"), json!(42), json!(0), json!(-7), json!(1.5)] {
        let v = ask(&mut ws, json!({"type":"join","room":"lobby","id":id})).await;
        assert_eq!((&v["type"], &v["id"]), (&json!("joined"), &id), "{v}");
        let v = ask(
            &mut ws,
            json!({"type":"publish","room":"other","data":1,"id":id}),
        )
        .await;
        assert_eq!((&v["type"], &v["id"]), (&json!("ack"), &id), "{v}");
        let v = ask(&mut ws, json!({"type":"leave","room":"lobby","id":id})).await;
        assert_eq!((&v["type"], &v["id"]), (&json!("left"), &id), "{v}");
        let v = ask(&mut ws, json!({"type":"refresh","token":refresh,"id":id})).await;
        assert_eq!((&v["type"], &v["id"]), (&json!("refreshed"), &id), "{v}");
        let v = ask(&mut ws, json!({"type":"ping","id":id})).await;
        assert_eq!((&v["type"], &v["id"]), (&json!("pong"), &id), "{v}");
        let v = ask(&mut ws, json!({"type":"nope","id":id})).await;
        assert_eq!((&v["type"], &v["id"]), (&json!("error"), &id), "{v}");
        let v = ask(&mut ws, json!({"type":"join","room":"bad room","id":id})).await;
        assert_eq!((&v["type"], &v["id"]), (&json!("error"), &id), "{v}");
    }
    // Without an id, the answer has none.
    for frame in [
        json!({"type":"ping"}),
        json!({"type":"join","room":"lobby"}),
        json!({"type":"publish","room":"x","data":1}),
        json!({"type":"leave","room":"lobby"}),
        json!({"type":"nope"}),
    ] {
        let v = ask(&mut ws, frame.clone()).await;
        assert!(v.get("id").is_none(), "{frame} -> {v}");
    }
}

#[tokio::test]
async fn message_frames_carry_room_seq_from_data_and_ts() {
    let node = Node::start(&[]).await;
    let (mut alice, _) = Ws::open(&node.ws_url(), "alice").await;
    let (mut bob, _) = Ws::open(&node.ws_url(), "bob").await;
    let joined = bob.join("lobby").await;
    assert_eq!(joined["room"], "lobby");
    assert_eq!(joined["seq"], 0);
    assert!(joined["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(joined.get("recovered").is_none(), "no since, no recovered");
    let payloads = [
        json!({"text":"hi","nested":{"a":[1,2,{"b":null}]}}),
        json!("just a string with \"quotes\" and ünïcödé"),
        json!(12.5),
        json!([1, "two", false]),
        json!(null),
        json!(true),
    ];
    let before = now_secs() * 1000;
    for (i, data) in payloads.iter().enumerate() {
        let ack = alice.publish("lobby", data.clone()).await;
        assert_eq!(ack["type"], "ack");
        assert_eq!(ack["room"], "lobby");
        assert_eq!(ack["seq"], i as u64 + 1);
    }
    for (i, data) in payloads.iter().enumerate() {
        let m = bob.json().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["room"], "lobby");
        assert_eq!(m["seq"], i as u64 + 1);
        assert_eq!(m["from"], "alice");
        assert_eq!(&m["data"], data);
        let ts = m["ts"].as_u64().unwrap();
        assert!(ts >= before && ts <= (now_secs() + 1) * 1000, "ts {ts}");
    }
    // A later join reports the latest seq and the same epoch.
    let (mut carol, _) = Ws::open(&node.ws_url(), "carol").await;
    let again = carol.join("lobby").await;
    assert_eq!(again["seq"], payloads.len() as u64);
    assert_eq!(again["epoch"], joined["epoch"]);
}

#[tokio::test]
async fn publishing_needs_the_grant_not_membership() {
    let node = Node::start(&[]).await;
    let (mut member, _) = Ws::open(&node.ws_url(), "member").await;
    member.join("lobby").await;
    let t = token("backend", &[], &["lobby"], Duration::from_secs(600));
    let (mut publisher, _) = Ws::open_with(&node.ws_url(), &t).await;
    let ack = publisher.publish("lobby", json!("hello")).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = member.json().await;
    assert_eq!(
        (&m["from"], &m["data"]),
        (&json!("backend"), &json!("hello"))
    );
    // The publisher is not a member: the next thing it gets is its pong.
    let v = ask(&mut publisher, json!({"type":"ping","id":"p"})).await;
    assert_eq!(v["type"], "pong", "{v}");
}

#[tokio::test]
async fn a_publisher_in_the_room_receives_its_own_message() {
    let node = Node::start(&[]).await;
    let (mut alice, _) = Ws::open(&node.ws_url(), "alice").await;
    alice.join("lobby").await;
    alice
        .send(json!({"type":"publish","room":"lobby","data":{"n":1},"id":"c1"}))
        .await;
    let (mut got_message, mut got_ack) = (false, false);
    for _ in 0..2 {
        let v = alice.json().await;
        match v["type"].as_str() {
            Some("message") => {
                assert_eq!((&v["seq"], &v["from"]), (&json!(1), &json!("alice")));
                got_message = true;
            }
            Some("ack") => {
                assert_eq!((&v["seq"], &v["id"]), (&json!(1), &json!("c1")));
                got_ack = true;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    assert!(got_message && got_ack);
}

#[tokio::test]
async fn joining_twice_answers_joined_again_and_counts_once() {
    let node = Node::start(&["--max-rooms", "2"]).await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    let first = ws.join("a").await;
    pubr.publish("a", json!(1)).await;
    // The message arrives before the second joined (same queue, in order).
    let m = ws.json().await;
    assert_eq!(m["seq"], 1);
    let second = ws.join("a").await;
    assert_eq!(second["seq"], 1);
    assert_eq!(second["epoch"], first["epoch"]);
    // The repeated join did not use the second room slot.
    ws.join("b").await;
    let v = ask(&mut ws, json!({"type":"join","room":"c","id":"c"})).await;
    assert_error(&v, "too_many_rooms", "third room");
    assert_eq!(v["id"], "c");
    // Still one membership: one copy of each message.
    pubr.publish("a", json!(2)).await;
    let v = ask(&mut ws, json!({"type":"ping","id":"p"})).await;
    assert_eq!((&v["type"], &v["seq"]), (&json!("message"), &json!(2)));
    let v = ws.json().await;
    assert_eq!(v["type"], "pong", "no duplicate before the pong: {v}");
    assert_eq!(node.metrics().await.value("wsgate_rooms_active", &[]), 2.0);
}

#[tokio::test]
async fn leave_stops_messages_and_frees_a_room_slot() {
    let node = Node::start(&["--max-rooms", "1"]).await;
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    ws.join("a").await;
    let v = ask(&mut ws, json!({"type":"leave","room":"a","id":1})).await;
    assert_eq!(v, json!({"type":"left","room":"a","id":1}));
    pubr.publish("a", json!("after leave")).await;
    ws.join("b").await; // the slot is free again
    pubr.publish("b", json!("in b")).await;
    let m = ws.json().await;
    assert_eq!(
        (&m["room"], &m["data"]),
        (&json!("b"), &json!("in b")),
        "{m}"
    );
    // Leaving a room one is not in is answered too.
    let v = ask(&mut ws, json!({"type":"leave","room":"never","id":2})).await;
    assert_eq!(v, json!({"type":"left","room":"never","id":2}));
    assert_eq!(node.metrics().await.value("wsgate_rooms_active", &[]), 1.0);
}

#[tokio::test]
async fn malformed_frames_are_bad_request() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    let long = "x".repeat(129);
    let cases: Vec<(&str, String, Option<Value>)> = vec![
        ("not JSON", "hello".into(), None),
        ("truncated JSON", r#"{"type":"ping""#.into(), None),
        ("array", "[1,2]".into(), None),
        ("string", r#""ping""#.into(), None),
        ("number", "7".into(), None),
        ("null", "null".into(), None),
        (
            "unknown type",
            r#"{"type":"dance","id":"u"}"#.into(),
            Some(json!("u")),
        ),
        (
            "missing type",
            r#"{"room":"a","id":"m"}"#.into(),
            Some(json!("m")),
        ),
        (
            "type not a string",
            r#"{"type":1,"id":2}"#.into(),
            Some(json!(2)),
        ),
        (
            "join without room",
            r#"{"type":"join","id":3}"#.into(),
            Some(json!(3)),
        ),
        (
            "room not a string",
            r#"{"type":"join","room":5,"id":4}"#.into(),
            Some(json!(4)),
        ),
        (
            "empty room",
            r#"{"type":"join","room":"","id":5}"#.into(),
            Some(json!(5)),
        ),
        (
            "room too long",
            format!(r#"{{"type":"join","room":"{long}","id":6}}"#),
            Some(json!(6)),
        ),
        (
            "room with space",
            r#"{"type":"join","room":"a b","id":7}"#.into(),
            Some(json!(7)),
        ),
        (
            "room with slash",
            r#"{"type":"publish","room":"a/b","data":1,"id":8}"#.into(),
            Some(json!(8)),
        ),
        (
            "room non-ASCII",
            r#"{"type":"leave","room":"ä","id":9}"#.into(),
            Some(json!(9)),
        ),
        (
            "publish without data",
            r#"{"type":"publish","room":"a","id":10}"#.into(),
            Some(json!(10)),
        ),
        (
            "since not an integer",
            r#"{"type":"join","room":"a","since":"x","id":11}"#.into(),
            Some(json!(11)),
        ),
        (
            "negative since",
            r#"{"type":"join","room":"a","since":-1,"id":12}"#.into(),
            Some(json!(12)),
        ),
        (
            "epoch not a string",
            r#"{"type":"join","room":"a","since":1,"epoch":5,"id":13}"#.into(),
            Some(json!(13)),
        ),
        (
            "refresh without token",
            r#"{"type":"refresh","id":14}"#.into(),
            Some(json!(14)),
        ),
        (
            "id of a bad type",
            r#"{"type":"ping","id":{"a":1}}"#.into(),
            None,
        ),
    ];
    for (what, text, id) in &cases {
        ws.send_text(text).await;
        let v = ws.json().await;
        assert_error(&v, "bad_request", what);
        match id {
            Some(id) => assert_eq!(&v["id"], id, "{what}: {v}"),
            None => assert!(v.get("id").is_none(), "{what}: {v}"),
        }
    }
    // A 128-character room is fine.
    ws.join(&"x".repeat(128)).await;
}

#[tokio::test]
async fn two_hundred_malformed_frames_never_close_the_connection() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    let junk = [
        "",
        "{",
        "}",
        "[]",
        "nul",
        "{\"type\":",
        "\u{0}",
        "{\"type\":\"join\"}",
        "1e999",
        "{\"type\":\"publish\",\"room\":\"a\"}",
    ];
    for i in 0..200 {
        ws.send_text(junk[i % junk.len()]).await;
    }
    for i in 0..200 {
        let v = ws.json().await;
        assert_error(&v, "bad_request", &format!("junk #{i}"));
    }
    let v = ask(&mut ws, json!({"type":"ping","id":"still-here"})).await;
    assert_eq!(v, json!({"type":"pong","id":"still-here"}));
    let m = node.metrics().await;
    assert_eq!(
        m.value("wsgate_connections_active", &[("transport", "ws")]),
        1.0
    );
}

#[tokio::test]
async fn forbidden_join_and_publish() {
    let node = Node::start(&[]).await;
    let t = token("alice", &["lobby"], &["lobby"], Duration::from_secs(600));
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &t).await;
    let v = ask(&mut ws, json!({"type":"join","room":"admin","id":"j"})).await;
    assert_error(&v, "forbidden", "join admin");
    assert_eq!(v["id"], "j");
    let v = ask(
        &mut ws,
        json!({"type":"publish","room":"admin","data":1,"id":"p"}),
    )
    .await;
    assert_error(&v, "forbidden", "publish admin");
    assert_eq!(v["id"], "p");
    // The connection goes on.
    ws.join("lobby").await;
}

#[tokio::test]
async fn publish_rate_limit_drops_with_rate_limited() {
    let node = Node::start(&["--publish-rate", "1", "--publish-burst", "2"]).await;
    let (mut member, _) = Ws::open(&node.ws_url(), "member").await;
    member.join("lobby").await;
    let t = token("alice", &["*"], &["lobby"], Duration::from_secs(600));
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &t).await;
    // Refused publishes take nothing from the bucket.
    for _ in 0..5 {
        let v = ws.publish("elsewhere", json!(0)).await;
        assert_error(&v, "forbidden", "publish without the grant");
    }
    assert_eq!(ws.publish("lobby", json!(1)).await["seq"], 1);
    assert_eq!(ws.publish("lobby", json!(2)).await["seq"], 2);
    let v = ws.publish("lobby", json!("dropped")).await;
    assert_error(&v, "rate_limited", "third publish in the burst");
    // Another connection has its own bucket.
    let (mut other, _) = Ws::open(&node.ws_url(), "other").await;
    assert_eq!(other.publish("lobby", json!(3)).await["seq"], 3);
    // The bucket refills at the rate; the dropped message took no seq.
    let deadline = std::time::Instant::now() + WAIT;
    let seq = loop {
        let v = ws.publish("lobby", json!(4)).await;
        if v["type"] == "ack" {
            break v["seq"].clone();
        }
        assert_eq!(v["code"], "rate_limited", "{v}");
        assert!(
            std::time::Instant::now() < deadline,
            "the bucket never refilled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(seq, 4);
    let got = messages(&mut member, 4).await;
    let data: Vec<&Value> = got.iter().map(|m| &m.2).collect();
    assert_eq!(data, [&json!(1), &json!(2), &json!(3), &json!(4)]);
}

#[tokio::test]
async fn room_limit_answers_too_many_rooms() {
    let node = Node::start(&["--max-rooms", "2"]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    ws.join("a").await;
    ws.join("b").await;
    let v = ask(&mut ws, json!({"type":"join","room":"c","id":"c"})).await;
    assert_error(&v, "too_many_rooms", "third room");
    assert_eq!(v["id"], "c");
    // Not a member of c: its messages do not arrive.
    let (mut pubr, _) = Ws::open(&node.ws_url(), "pub").await;
    pubr.publish("c", json!("c")).await;
    pubr.publish("a", json!("a")).await;
    let m = ws.json().await;
    assert_eq!(m["room"], "a", "{m}");
}

#[tokio::test]
async fn refresh_pushes_the_expiry_forward() {
    let node = Node::start(&["--jwt-leeway", "0s"]).await;
    let short = token("alice", &["*"], &["*"], Duration::from_secs(2));
    let old_exp = now_secs() + 2;
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &short).await;
    let mut c = claims("alice");
    let new_exp = now_secs() + 3600;
    c["exp"] = json!(new_exp);
    let v = ask(
        &mut ws,
        json!({"type":"refresh","token":sign_hs256(&c),"id":"r"}),
    )
    .await;
    assert_eq!(v, json!({"type":"refreshed","exp":new_exp,"id":"r"}));
    // Past the old expiry (plus a second), the connection is still open.
    eventually("the old token's expiry has passed", || async {
        (now_secs() > old_exp + 1).then_some(())
    })
    .await;
    let v = ask(&mut ws, json!({"type":"ping","id":"alive"})).await;
    assert_eq!(v, json!({"type":"pong","id":"alive"}));
}

#[tokio::test]
async fn refresh_replaces_the_grants() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    assert_eq!(ws.publish("news", json!(1)).await["type"], "ack");
    let narrower = token("alice", &["lobby"], &["lobby"], Duration::from_secs(600));
    let v = ask(&mut ws, json!({"type":"refresh","token":narrower})).await;
    assert_eq!(v["type"], "refreshed", "{v}");
    let v = ws.publish("news", json!(2)).await;
    assert_error(&v, "forbidden", "publish after narrowing refresh");
    let v = ask(&mut ws, json!({"type":"join","room":"news","id":1})).await;
    assert_error(&v, "forbidden", "join after narrowing refresh");
    ws.join("lobby").await;
}

#[tokio::test]
async fn a_rejected_refresh_is_invalid_token_and_the_old_token_stays() {
    let node = Node::start(&["--jwt-leeway", "0s"]).await;
    let t = token("alice", &["lobby"], &["lobby"], Duration::from_secs(3));
    let (mut ws, _) = Ws::open_with(&node.ws_url(), &t).await;
    let now = now_secs();
    let mut expired = claims("alice");
    expired["exp"] = json!(now - 10);
    expired["iat"] = json!(now - 20);
    let mut bad_sig = claims("alice");
    bad_sig["exp"] = json!(now + 3600);
    let cases = [
        ("garbage", "not-a-jwt".to_owned()),
        ("expired", sign_hs256(&expired)),
        (
            "bad signature",
            wsgate_testkit::sign("HS256", b"other-secret", &bad_sig),
        ),
        ("other sub", any_token("mallory")),
    ];
    for (what, tok) in &cases {
        let v = ask(&mut ws, json!({"type":"refresh","token":tok,"id":what})).await;
        assert_error(&v, "invalid_token", what);
        assert_eq!(v["id"], *what);
    }
    // The old grants still apply (the "other sub" token granted everything).
    let v = ws.publish("admin", json!(1)).await;
    assert_error(&v, "forbidden", "old grants stay");
    assert_eq!(ws.publish("lobby", json!(1)).await["type"], "ack");
    // And the old expiry too: 4001 arrives.
    assert_eq!(ws.ended().await, wsgate_testkit::Ended::Close(4001));
}

#[tokio::test]
async fn app_ping_and_websocket_ping_are_answered() {
    let node = Node::start(&[]).await;
    let (mut ws, _) = Ws::open(&node.ws_url(), "alice").await;
    let v = ask(&mut ws, json!({"type":"ping","id":"p1"})).await;
    assert_eq!(v, json!({"type":"pong","id":"p1"}));
    let v = ask(&mut ws, json!({"type":"ping"})).await;
    assert_eq!(v, json!({"type":"pong"}));
    ws.stream
        .send(Message::Ping(b"rfc6455".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            match ws.stream.next().await.unwrap().unwrap() {
                Message::Pong(p) => return p,
                Message::Ping(_) => continue,
                other => panic!("expected a Pong, got {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&pong[..], b"rfc6455");
}

#[tokio::test]
async fn concurrent_publishers_give_strictly_increasing_seq_without_duplicates() {
    let node = Node::start(&[]).await;
    let mut members = Vec::new();
    for i in 0..3 {
        let (mut ws, _) = Ws::open(&node.ws_url(), &format!("m{i}")).await;
        ws.join("busy").await;
        members.push(ws);
    }
    const PER: usize = 50;
    let mut tasks = Vec::new();
    for p in 0..4 {
        let url = node.ws_url();
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = Ws::open(&url, &format!("p{p}")).await;
            let mut seqs = Vec::new();
            for k in 0..PER {
                let ack = ws.publish("busy", json!({"p": p, "k": k})).await;
                assert_eq!(ack["type"], "ack", "{ack}");
                seqs.push(ack["seq"].as_u64().unwrap());
            }
            seqs
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "acks increase per publisher"
        );
        acked.extend(seqs);
    }
    acked.sort_unstable();
    let total = 4 * PER;
    assert_eq!(acked, (1..=total as u64).collect::<Vec<_>>());
    for ws in &mut members {
        let got = messages(ws, total).await;
        let seqs: Vec<u64> = got.iter().map(|m| m.0).collect();
        assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
        // Each publisher's messages arrive in its own order.
        for p in 0..4 {
            let ks: Vec<u64> = got
                .iter()
                .filter(|m| m.2["p"] == p)
                .map(|m| m.2["k"].as_u64().unwrap())
                .collect();
            assert_eq!(ks, (0..PER as u64).collect::<Vec<_>>());
        }
        let v = ask(ws, json!({"type":"ping","id":"end"})).await;
        assert_eq!(v["type"], "pong", "nothing after the last message: {v}");
    }
}
