//! Regression tests for the "trust first" findings on the broker side:
//! acknowledged messages are never lost without notice, never doubled, and
//! a client cannot make a node hold a room's whole history. Real
//! redis-server, real nodes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{json, Value};
use wsgate_testkit::{
    any_token, eventually, http, http_get, messages, BinNode, Node, RawWs, Redis, Ws,
};

async fn node(redis: &Redis, extra: &[&str]) -> Node {
    let mut args = vec!["--redis-url".to_owned(), redis.url()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = Node::start(&args).await;
    wait_ready(&node.ops_url()).await;
    node
}

async fn wait_ready(ops_url: &str) {
    let url = format!("{ops_url}/ready");
    eventually("node ready", || async {
        matches!(http_get(&url).await, Ok((200, _, _))).then_some(())
    })
    .await;
}

async fn http_publish(base: &str, room: &str, data: Value) -> (u16, Value) {
    let auth = format!("Bearer {}", any_token("backend"));
    let (status, _, body) = http(
        "POST",
        &format!("{base}/api/rooms/{room}/messages"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        data.to_string().as_bytes(),
    )
    .await
    .unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Publish `n` messages over HTTP, each acknowledged; returns their seqs.
async fn publish_acked(base: &str, room: &str, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        let (status, body) = http_publish(base, room, json!({ "n": i })).await;
        assert_eq!(status, 200, "publish {i}: {body}");
        seqs.push(body["seq"].as_u64().unwrap());
    }
    seqs
}

/// The member's next frames: an unsolicited `joined` naming a new epoch,
/// then the messages `seqs` in order.
async fn expect_new_epoch_then(ws: &mut Ws, room: &str, old_epoch: &str, seqs: &[u64]) {
    let notice = ws.json().await;
    assert_eq!(notice["type"], "joined", "epoch change announced: {notice}");
    assert_eq!(notice["room"], room);
    assert_eq!(notice["recovered"], false);
    assert!(notice.get("id").is_none(), "unsolicited: {notice}");
    assert_ne!(notice["epoch"], old_epoch, "{notice}");
    let first = seqs[0];
    assert_eq!(notice["seq"].as_u64(), Some(first - 1), "{notice}");
    let got: Vec<u64> = messages(ws, seqs.len())
        .await
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(got, seqs, "every acknowledged message of the new epoch");
}

#[tokio::test]
async fn a_quiet_room_whose_keys_expire_announces_the_new_epoch_and_loses_nothing() {
    let redis = Redis::start();
    let a = node(&redis, &["--history-ttl", "2s"]).await;
    let b = node(&redis, &["--history-ttl", "2s"]).await;
    publish_acked(&a.http_url(), "quiet", 5).await;
    let (mut member, _) = Ws::open(&b.ws_url(), "member").await;
    let joined = member.join("quiet").await;
    assert_eq!(joined["seq"], 5);
    let old_epoch = joined["epoch"].as_str().unwrap().to_owned();
    // No message is delivered in the room; its keys expire.
    eventually("room keys expired", || async {
        let n: i64 = redis.query(
            redis::cmd("EXISTS")
                .arg("wsgate:{quiet}:seq")
                .arg("wsgate:{quiet}:epoch"),
        );
        (n == 0).then_some(())
    })
    .await;
    let seqs = publish_acked(&a.http_url(), "quiet", 8).await;
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>(), "a new epoch starts at 1");
    expect_new_epoch_then(&mut member, "quiet", &old_epoch, &seqs).await;
}

#[tokio::test]
async fn a_quiet_room_survives_a_redis_restarted_empty() {
    let mut redis = Redis::start();
    let a = node(&redis, &[]).await;
    let b = node(&redis, &[]).await;
    publish_acked(&a.http_url(), "calm", 5).await;
    let (mut on_a, _) = Ws::open(&a.ws_url(), "m1").await;
    let (mut on_b, _) = Ws::open(&b.ws_url(), "m2").await;
    let old_epoch = on_a.join("calm").await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(on_b.join("calm").await["seq"], 5);
    redis.restart();
    wait_ready(&a.ops_url()).await;
    wait_ready(&b.ops_url()).await;
    let seqs = publish_acked(&a.http_url(), "calm", 8).await;
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    expect_new_epoch_then(&mut on_a, "calm", &old_epoch, &seqs).await;
    expect_new_epoch_then(&mut on_b, "calm", &old_epoch, &seqs).await;
}

#[tokio::test]
async fn repeated_joins_of_a_live_membership_lose_no_message() {
    let redis = Redis::start();
    let a = node(
        &redis,
        &["--publish-rate", "100000", "--publish-burst", "1000"],
    )
    .await;
    let b = node(&redis, &[]).await;
    let (mut member, _) = Ws::open(&b.ws_url(), "member").await;
    assert_eq!(member.join("busy").await["seq"], 0);
    const TOTAL: u64 = 400;
    let url = a.ws_url();
    let publisher = tokio::spawn(async move {
        let (mut p, _) = Ws::open(&url, "publisher").await;
        for i in 0..TOTAL {
            let ack = p.publish("busy", json!({ "i": i })).await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
    });
    let mut last = 0;
    let mut rejoins = 0;
    let mut pending_join: Option<String> = None;
    while last < TOTAL {
        let v = member.json().await;
        match v["type"].as_str() {
            Some("message") => {
                let seq = v["seq"].as_u64().unwrap();
                assert_eq!(seq, last + 1, "no message skipped or doubled");
                last = seq;
                if pending_join.is_none() && seq % 7 == 0 {
                    let id = member.id();
                    member
                        .send(json!({"type":"join","room":"busy","id":id}))
                        .await;
                    pending_join = Some(id);
                }
            }
            Some("joined") => {
                assert_eq!(v["id"].as_str(), pending_join.as_deref(), "{v}");
                assert_eq!(
                    v["seq"].as_u64(),
                    Some(last),
                    "the answer reports the last message the member got: {v}"
                );
                pending_join = None;
                rejoins += 1;
            }
            _ => panic!("unexpected frame {v}"),
        }
    }
    publisher.await.unwrap();
    assert!(rejoins > 10, "the test re-joined while messages flowed");
}

#[tokio::test]
async fn publishes_refused_while_redis_is_frozen_are_never_delivered() {
    let redis = Redis::start();
    let n = node(&redis, &[]).await;
    let (mut member, _) = Ws::open(&n.ws_url(), "member").await;
    member.join("frozen").await;
    let (mut publisher, _) = Ws::open(&n.ws_url(), "publisher").await;
    assert_eq!(publisher.publish("frozen", json!("before")).await["seq"], 1);
    assert_eq!(messages(&mut member, 1).await[0].0, 1);

    redis.signal("STOP");
    let answer = publisher.publish("frozen", json!("lost-ws")).await;
    assert_eq!(answer["type"], "error", "{answer}");
    let code = answer["code"].as_str().unwrap().to_owned();
    assert!(code == "timeout" || code == "unavailable", "{answer}");
    let (status, body) = http_publish(&n.http_url(), "frozen", json!("lost-http")).await;
    assert!(status == 504 || status == 503, "{status} {body}");
    // Frozen well past the publishes' deadlines, then thawed: Redis runs
    // the queued scripts, which must refuse to publish so late.
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.signal("CONT");
    wait_ready(&n.ops_url()).await;

    let ack = publisher.publish("frozen", json!("after")).await;
    assert_eq!(ack["seq"], 2, "neither refused publish took a seq: {ack}");
    let next = messages(&mut member, 1).await;
    assert_eq!(next[0].0, 2);
    assert_eq!(next[0].2, json!("after"), "nothing refused was delivered");
}

#[tokio::test]
async fn a_join_while_redis_is_down_is_refused_at_once() {
    let mut redis = Redis::start();
    let n = node(&redis, &[]).await;
    let (mut ws, _) = Ws::open(&n.ws_url(), "u").await;
    redis.kill();
    let url = format!("{}/ready", n.ops_url());
    eventually("not ready", || async {
        matches!(http_get(&url).await, Ok((503, _, _))).then_some(())
    })
    .await;
    ws.send(json!({"type":"join","room":"r","id":"j"})).await;
    ws.send(json!({"type":"ping","id":"p"})).await;
    let answer = ws.json().await;
    assert_eq!(answer["id"], "j");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("redis is unreachable"),
        "refused because Redis is known down, not after waiting: {answer}"
    );
    assert_eq!(ws.json().await["type"], "pong");
}

#[tokio::test]
async fn a_room_only_joined_leaves_a_short_lived_epoch_in_redis() {
    let redis = Redis::start();
    let n = node(&redis, &[]).await;
    let (mut ws, _) = Ws::open(&n.ws_url(), "u").await;
    ws.join("never-published").await;
    let ttl: i64 = redis.query(redis::cmd("TTL").arg("wsgate:{never-published}:epoch"));
    assert!(
        ttl > 0 && ttl <= 600,
        "epoch of an empty room expires soon: {ttl}"
    );
    let ack = ws.publish("never-published", json!(1)).await;
    assert_eq!(ack["seq"], 1);
    let ttl: i64 = redis.query(redis::cmd("TTL").arg("wsgate:{never-published}:epoch"));
    assert!(
        ttl > 600,
        "a published room keeps its history for --history-ttl: {ttl}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn resumers_that_do_not_read_cost_a_page_not_the_history() {
    let redis = Redis::start();
    let url = redis.url();
    let node = BinNode::start(&["--redis-url", &url]).await;
    wait_ready(&format!("http://{}", node.ops)).await;
    let base = format!("http://{}", node.addr);
    let blob = "x".repeat(100_000);
    const MESSAGES: u64 = 300;
    for _ in 0..MESSAGES {
        let (status, _) = http_publish(&base, "big", json!(blob)).await;
        assert_eq!(status, 200);
    }
    let before = rss_kib(node.pid());
    let mut joiners = Vec::new();
    for i in 0..6 {
        let mut raw =
            RawWs::connect_with(node.addr, &any_token(&format!("slow{i}")), Some(4096)).await;
        raw.send_text(r#"{"type":"join","room":"big","since":0}"#)
            .await;
        joiners.push(raw);
    }
    // Each replay is 30 MB; a node reading whole histories would hold 180.
    let mut peak = before;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(node.pid()));
    }
    let grown_mib = (peak.saturating_sub(before)) / 1024;
    assert!(
        grown_mib < 64,
        "six non-reading resumers grew the node by {grown_mib} MiB"
    );

    // A resumer that reads gets the whole history, page after page.
    let (mut reader, _) = Ws::open(&format!("ws://{}/ws", node.addr), "reader").await;
    reader
        .send(json!({"type":"join","room":"big","since":0,"id":"j"}))
        .await;
    let joined = reader.json().await;
    assert_eq!(joined["recovered"], true, "{joined}\n{}", node.logs());
    assert_eq!(joined["seq"], MESSAGES);
    let seqs: Vec<u64> = messages(&mut reader, MESSAGES as usize)
        .await
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(seqs, (1..=MESSAGES).collect::<Vec<_>>());
    drop(joiners);
}
