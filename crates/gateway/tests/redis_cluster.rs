//! `--redis-cluster`: the relay on a real three-shard Redis Cluster with
//! sharded pub/sub. Rooms land on different shards; every member on every
//! node gets every message once, in order, and resumes on another node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use wsgate_testkit::{eventually, http_get, messages, Node, RedisCluster, Ws};

#[tokio::test]
async fn rooms_on_every_shard_deliver_once_in_order_and_resume_across_nodes() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let node = Node::start(&["--redis-url", &urls, "--redis-cluster"]).await;
        let ready = format!("{}/ready", node.ops_url());
        eventually("node ready", || async {
            matches!(http_get(&ready).await, Ok((200, _, _))).then_some(())
        })
        .await;
        nodes.push(node);
    }
    // These names hash (CRC16 mod 16384) to slots 425, 4488, 8683, 12746,
    // 301 and 4364: all three shards of `--cluster create`'s even split.
    let rooms: Vec<String> = (0..6).map(|i| format!("shard.room{i}")).collect();
    let (mut a, _) = Ws::open(&nodes[0].ws_url(), "alice").await;
    let (mut b, _) = Ws::open(&nodes[1].ws_url(), "bob").await;
    let mut epochs = Vec::new();
    for room in &rooms {
        epochs.push(a.join(room).await["epoch"].as_str().unwrap().to_owned());
        b.join(room).await;
    }
    let (mut p, _) = Ws::open(&nodes[0].ws_url(), "pub").await;
    for k in 0..3 {
        for room in &rooms {
            let ack = p.publish(room, json!({"k": k})).await;
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_eq!(ack["seq"], k + 1);
        }
    }
    for ws in [&mut a, &mut b] {
        let got = messages(ws, 3 * rooms.len()).await;
        for room_index in 0..rooms.len() {
            let seqs: Vec<u64> = got
                .iter()
                .skip(room_index)
                .step_by(rooms.len())
                .map(|m| m.0)
                .collect();
            assert_eq!(seqs, [1, 2, 3]);
        }
    }
    // Alice leaves, two more messages in room 0, she resumes on node 2.
    drop(a);
    p.publish(&rooms[0], json!("x")).await;
    p.publish(&rooms[0], json!("y")).await;
    let (mut a2, _) = Ws::open(&nodes[1].ws_url(), "alice").await;
    a2.send(json!({"type":"join","room":rooms[0],"since":3,"epoch":epochs[0],"id":"r"}))
        .await;
    let joined = a2.json().await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["seq"], 5);
    let replay = messages(&mut a2, 2).await;
    assert_eq!(replay.iter().map(|m| m.0).collect::<Vec<_>>(), [4, 5]);
    // One subscription per room per node, on the shard that owns it.
    let m = nodes[1].metrics().await;
    assert_eq!(
        m.value("wsgate_broker_subscriptions", &[]),
        rooms.len() as f64
    );
}
