//! Broker failover (PROTOCOL.md section 10) on a real Redis Cluster of three
//! primaries and three replicas, with `--redis-cluster` (sharded pub/sub).
//!
//! The replica of the shard owning the test room misses the primary's last
//! writes (it is frozen while they happen); the primary is killed and the
//! replica promoted. After the promotion no (room, epoch, seq) is handed out
//! twice: the room starts a new epoch, announced to every member on both
//! nodes, and no acknowledged message is lost without notice. `/ready` is
//! 503 while the shard has no primary, 200 again after.
//!
//! Bounded: the failover itself takes a few seconds (node timeout 2 s);
//! every wait below has its own limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use wsgate_testkit::{
    assert_failover_stream, epoch_stream, eventually, eventually_for, http_get, publish_acked,
    Node, RedisCluster, Ws,
};

/// How long a failover may take, from the kill to publishes acked again.
const FAILOVER: Duration = Duration::from_secs(30);

async fn ready_status(node: &Node) -> Option<u16> {
    http_get(&format!("{}/ready", node.ops_url()))
        .await
        .ok()
        .map(|r| r.0)
}

/// Publish `m<i>` with key `k<i>` until acknowledged.
async fn publish(ws: &mut Ws, room: &str, i: usize) {
    publish_acked(ws, room, json!(format!("m{i}")), &format!("k{i}"), FAILOVER).await;
}

#[tokio::test]
async fn a_cluster_failover_never_reuses_a_seq_and_loses_nothing_silently() {
    let cluster = RedisCluster::start_with(3, 1);
    let room = "cfo";
    let seq_key = format!("wsgate:{{{room}}}:seq");
    let slot = cluster.slot(&seq_key);
    let (primary, replicas) = cluster.shard(slot);
    let replica = *replicas.first().expect("the shard has a replica");

    let urls = cluster.urls();
    let a = Node::start(&["--redis-url", &urls, "--redis-cluster"]).await;
    let b = Node::start(&["--redis-url", &urls, "--redis-cluster"]).await;
    for node in [&a, &b] {
        eventually("node ready", || async {
            (ready_status(node).await == Some(200)).then_some(())
        })
        .await;
    }
    let (mut on_a, _) = Ws::open(&a.ws_url(), "m-a").await;
    let (mut on_b, _) = Ws::open(&b.ws_url(), "m-b").await;
    let epoch = on_a.join(room).await["epoch"].as_str().unwrap().to_owned();
    on_b.join(room).await;
    let (mut publisher, _) = Ws::open(&a.ws_url(), "p").await;
    for i in 0..5 {
        publish(&mut publisher, room, i).await;
    }
    eventually("the replica has seq 5", || async {
        (cluster.get_on(replica, &seq_key).as_deref() == Some("5")).then_some(())
    })
    .await;

    // The replica misses the next three writes, then the primary dies.
    cluster.signal(replica, "STOP");
    for i in 5..8 {
        publish(&mut publisher, room, i).await;
    }
    cluster.signal(primary, "KILL");
    cluster.signal(replica, "CONT");
    // No primary for the room's slot: not ready.
    for node in [&a, &b] {
        eventually("not ready while the shard has no primary", || async {
            (ready_status(node).await == Some(503)).then_some(())
        })
        .await;
    }
    eventually_for("the replica is promoted", FAILOVER, || async {
        cluster.serves(replica, slot).then_some(())
    })
    .await;
    for node in [&a, &b] {
        eventually_for("ready again after the promotion", FAILOVER, || async {
            (ready_status(node).await == Some(200)).then_some(())
        })
        .await;
    }
    for i in 8..11 {
        publish(&mut publisher, room, i).await;
    }

    for member in [&mut on_a, &mut on_b] {
        let got = epoch_stream(member, epoch.clone(), 11).await;
        // m5..m7 never reached the replica; m8.. went to it once promoted.
        assert_failover_stream(&got, 8, 11);
    }
}
