//! The Redis relay against a real redis-server: cross-node delivery, total
//! order, resume on another node, subscription bookkeeping, and Redis faults.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use wsgate_testkit::{any_token, eventually, http, http_get, messages, Node, Redis, TcpProxy, Ws};

async fn nodes(redis_url: &str, n: usize, extra: &[&str]) -> Vec<Node> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut args = vec!["--redis-url", redis_url];
        args.extend_from_slice(extra);
        let node = Node::start(&args).await;
        wait_ready(&node).await;
        out.push(node);
    }
    out
}

async fn wait_ready(node: &Node) {
    let url = format!("{}/ready", node.ops_url());
    eventually("node ready", || async {
        matches!(http_get(&url).await, Ok((200, _, _))).then_some(())
    })
    .await;
}

async fn http_publish(node: &Node, room: &str, data: serde_json::Value) -> (u16, String) {
    let auth = format!("Bearer {}", any_token("backend"));
    let (status, _, body) = http(
        "POST",
        &format!("{}/api/rooms/{room}/messages", node.http_url()),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        data.to_string().as_bytes(),
    )
    .await
    .unwrap();
    (status, body)
}

#[tokio::test]
async fn every_member_on_every_node_gets_every_message_once_in_order() {
    let redis = Redis::start();
    let nodes = nodes(&redis.url(), 3, &[]).await;
    let mut members = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..2 {
            let (mut ws, w) = Ws::open(&node.ws_url(), &format!("u{i}{j}")).await;
            assert_eq!(w.node, node.node_id);
            ws.join("lobby").await;
            members.push(ws);
        }
    }
    // Publishes from every node over WebSocket, and from the HTTP API.
    let mut expected = 0;
    for node in &nodes {
        let (mut p, _) = Ws::open(&node.ws_url(), "pub").await;
        for k in 0..3 {
            let ack = p.publish("lobby", json!({"k": k})).await;
            assert_eq!(ack["type"], "ack", "{ack}");
            expected += 1;
            assert_eq!(ack["seq"], expected);
        }
        let (status, body) = http_publish(node, "lobby", json!({"http": true})).await;
        assert_eq!(status, 200, "{body}");
        expected += 1;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v, json!({"room": "lobby", "seq": expected}));
    }
    for ws in &mut members {
        let got = messages(ws, expected as usize).await;
        let seqs: Vec<u64> = got.iter().map(|m| m.0).collect();
        assert_eq!(seqs, (1..=expected).collect::<Vec<_>>());
        assert_eq!(got[3].1, "backend");
    }
    // Nothing more arrives: a ping is answered next, not a duplicate.
    for ws in &mut members {
        ws.send(json!({"type": "ping", "id": "end"})).await;
        assert_eq!(ws.json().await, json!({"type": "pong", "id": "end"}));
    }
}

#[tokio::test]
async fn racing_publishers_on_two_nodes_produce_one_total_order() {
    let redis = Redis::start();
    let nodes = nodes(&redis.url(), 2, &[]).await;
    let mut watchers = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            let (mut ws, _) = Ws::open(&node.ws_url(), "watch").await;
            ws.join("race").await;
            watchers.push(ws);
        }
    }
    const EACH: u64 = 40;
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let url = node.ws_url();
        tasks.push(tokio::spawn(async move {
            let (mut p, _) = Ws::open(&url, &format!("p{i}")).await;
            for k in 0..EACH {
                let id = format!("{i}-{k}");
                p.send(json!({"type":"publish","room":"race","data":{"p":i,"k":k},"id":id}))
                    .await;
            }
            let mut acks = 0;
            while acks < EACH {
                if p.json().await["type"] == "ack" {
                    acks += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let first = messages(&mut watchers[0], 2 * EACH as usize).await;
    let seqs: Vec<u64> = first.iter().map(|m| m.0).collect();
    assert_eq!(seqs, (1..=2 * EACH).collect::<Vec<_>>());
    for ws in &mut watchers[1..] {
        assert_eq!(messages(ws, 2 * EACH as usize).await, first);
    }
}

#[tokio::test]
async fn resume_on_another_node_with_and_without_recovery() {
    let redis = Redis::start();
    let nodes = nodes(&redis.url(), 2, &["--history", "5"]).await;
    let (mut a, _) = Ws::open(&nodes[0].ws_url(), "alice").await;
    let joined = a.join("r").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let (mut p, _) = Ws::open(&nodes[1].ws_url(), "pub").await;
    for k in 0..3 {
        p.publish("r", json!(k)).await;
    }
    let seen = messages(&mut a, 3).await;
    assert_eq!(seen.last().unwrap().0, 3);
    drop(a);
    for k in 3..6 {
        p.publish("r", json!(k)).await;
    }
    // Back on the other node: seqs 4..=6 replayed, then live.
    let (mut b, _) = Ws::open(&nodes[1].ws_url(), "alice").await;
    b.send(json!({"type":"join","room":"r","since":3,"epoch":epoch,"id":"j"}))
        .await;
    let joined = b.json().await;
    assert_eq!(
        joined,
        json!({"type":"joined","room":"r","seq":6,"epoch":epoch,"recovered":true,"id":"j"})
    );
    let replay = messages(&mut b, 3).await;
    assert_eq!(replay.iter().map(|m| m.0).collect::<Vec<_>>(), [4, 5, 6]);
    assert_eq!(replay[0].2, json!(3));
    p.publish("r", json!(6)).await;
    assert_eq!(messages(&mut b, 1).await[0].0, 7);

    // History keeps at least 5, and Redis trims the stream approximately
    // (whole nodes of 100 entries): seq 1 is gone after 150 more.
    for k in 0..150 {
        p.publish("r", json!(k)).await;
    }
    let (mut c, _) = Ws::open(&nodes[0].ws_url(), "alice").await;
    c.send(json!({"type":"join","room":"r","since":1,"epoch":epoch,"id":"j2"}))
        .await;
    let joined = c.json().await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(joined["seq"], 157);
    // Nothing replayed: the next frame is the live message.
    p.publish("r", json!("live")).await;
    let next = c.json().await;
    assert_eq!(
        (next["type"].as_str(), next["seq"].as_u64()),
        (Some("message"), Some(158))
    );
}

#[tokio::test]
async fn join_and_leave_churn_leaves_no_subscription_behind() {
    let redis = Redis::start();
    let nodes = nodes(&redis.url(), 2, &[]).await;
    let mut clients = Vec::new();
    for node in &nodes {
        for i in 0..3 {
            let (ws, _) = Ws::open(&node.ws_url(), &format!("c{i}")).await;
            clients.push(ws);
        }
    }
    for round in 0..5 {
        for ws in clients.iter_mut() {
            ws.send(json!({"type":"join","room":"churn","id":format!("j{round}")}))
                .await;
            ws.send(json!({"type":"leave","room":"churn","id":format!("l{round}")}))
                .await;
            ws.send(json!({"type":"join","room":"churn","id":format!("k{round}")}))
                .await;
        }
        for ws in clients.iter_mut() {
            for want in ["joined", "left", "joined"] {
                assert_eq!(ws.json().await["type"], want);
            }
        }
        assert_eq!(
            redis.numsub("wsgate:room:churn"),
            2,
            "one subscription per node"
        );
        // Half leave explicitly, half disconnect.
        for (i, ws) in clients.iter_mut().enumerate() {
            if i % 2 == 0 {
                ws.send(json!({"type":"leave","room":"churn"})).await;
                assert_eq!(ws.json().await["type"], "left");
            }
        }
    }
    drop(clients);
    eventually("no subscriptions left", || async {
        (redis.numsub("wsgate:room:churn") == 0).then_some(())
    })
    .await;
    for node in &nodes {
        eventually("subscription gauge at 0", || async {
            let m = node.metrics().await;
            (m.value("wsgate_broker_subscriptions", &[]) == 0.0).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn redis_down_means_not_ready_and_unavailable_then_recovers_by_itself() {
    let mut redis = Redis::start();
    let nodes = nodes(&redis.url(), 2, &[]).await;
    let (mut a, _) = Ws::open(&nodes[0].ws_url(), "alice").await;
    a.join("f").await;
    let (mut b, _) = Ws::open(&nodes[1].ws_url(), "bob").await;
    b.join("f").await;
    assert_eq!(b.publish("f", json!("before")).await["type"], "ack");
    assert_eq!(messages(&mut a, 1).await[0].0, 1);

    redis.kill();
    for node in &nodes {
        let url = format!("{}/ready", node.ops_url());
        eventually("ready turns 503", || async {
            matches!(http_get(&url).await, Ok((503, _, _))).then_some(())
        })
        .await;
        let (status, _, _) = http_get(&format!("{}/health", node.ops_url()))
            .await
            .unwrap();
        assert_eq!(status, 200, "liveness stays up");
        let (status, _) = http_publish(node, "f", json!("lost")).await;
        assert_eq!(status, 503);
        let m = node.metrics().await;
        assert_eq!(m.value("wsgate_broker_up", &[]), 0.0);
    }
    let answer = b.publish("f", json!("during")).await;
    assert_eq!(answer["type"], "error");
    assert_eq!(answer["code"], "unavailable");
    // The connection stays open.
    b.send(json!({"type":"ping","id":"p"})).await;
    assert_eq!(b.json().await, json!({"type":"pong","id":"p"}));

    redis.restart();
    for node in &nodes {
        wait_ready(node).await;
    }
    // Redis came back empty: a new epoch, announced before its messages.
    let ack = eventually("publish accepted again", || async {
        let (status, body) = http_publish(&nodes[1], "f", json!("after")).await;
        (status == 200).then_some(body)
    })
    .await;
    let ack: serde_json::Value = serde_json::from_str(&ack).unwrap();
    assert_eq!(ack["seq"], 1);
    let announce = a.json().await;
    assert_eq!(announce["type"], "joined", "{announce}");
    assert_eq!(announce["recovered"], false);
    assert_eq!(announce["seq"], 0);
    let m = messages(&mut a, 1).await;
    assert_eq!((m[0].0, m[0].2.clone()), (1, json!("after")));
    let m = nodes[0].metrics().await;
    assert!(m.value("wsgate_broker_reconnects_total", &[]) >= 1.0);
}

#[tokio::test]
async fn a_node_cut_off_from_redis_replays_what_it_missed_from_history() {
    let redis = Redis::start();
    let proxy = TcpProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let publisher_node = nodes(&redis.url(), 1, &[]).await.remove(0);
    let cut_node = nodes(&proxy.redis_url(), 1, &[]).await.remove(0);
    let (mut member, _) = Ws::open(&cut_node.ws_url(), "m").await;
    member.join("gap").await;
    assert_eq!(http_publish(&publisher_node, "gap", json!(1)).await.0, 200);
    assert_eq!(messages(&mut member, 1).await[0].0, 1);

    proxy.cut();
    let url = format!("{}/ready", cut_node.ops_url());
    eventually("cut node not ready", || async {
        matches!(http_get(&url).await, Ok((503, _, _))).then_some(())
    })
    .await;
    for k in 2..=4 {
        assert_eq!(http_publish(&publisher_node, "gap", json!(k)).await.0, 200);
    }
    proxy.restore();
    wait_ready(&cut_node).await;
    assert_eq!(http_publish(&publisher_node, "gap", json!(5)).await.0, 200);
    let got = messages(&mut member, 4).await;
    assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), [2, 3, 4, 5]);
    assert_eq!(got[0].2, json!(2));
    let m = cut_node.metrics().await;
    assert!(m.value("wsgate_relay_gap_messages_filled_total", &[]) >= 3.0);
    // And nothing twice.
    member.send(json!({"type":"ping","id":"x"})).await;
    assert_eq!(member.json().await["type"], "pong");
}
