//! Presence (PROTOCOL.md section 6) against real nodes: the in-process
//! broker, and a real redis-server with nodes in this process and as
//! processes (for SIGKILL and SIGTERM).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use wsgate_testkit::{
    any_token, eventually, eventually_for, http, http_get, token, BinNode, Node, Redis,
    RedisCluster, Ws,
};

/// The presence lease of the Redis tests: short, to keep them fast.
const TTL: &str = "2s";
/// What the protocol allows after a lease runs out.
const GRACE: Duration = Duration::from_secs(2 + 5);

async fn wait_ready(ops_url: &str) {
    let url = format!("{ops_url}/ready");
    eventually("node ready", || async {
        matches!(http_get(&url).await, Ok((200, _, _))).then_some(())
    })
    .await;
}

async fn redis_node(redis: &Redis, extra: &[&str]) -> Node {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str(), "--presence-ttl", TTL];
    args.extend_from_slice(extra);
    let node = Node::start(&args).await;
    wait_ready(&node.ops_url()).await;
    node
}

async fn bin_node(redis: &Redis, ttl: &str) -> BinNode {
    let url = redis.url();
    let node = BinNode::start_with(
        Path::new(env!("CARGO_BIN_EXE_wsgate")),
        &["--redis-url", &url, "--presence-ttl", ttl, "--log", "warn"],
    )
    .await;
    wait_ready(&node.ops_url()).await;
    node
}

/// Join `room`, with `"presence":true` when `watch`.
async fn join(ws: &mut Ws, room: &str, watch: bool) {
    let id = ws.id();
    let mut req = json!({"type": "join", "room": room, "id": id});
    if watch {
        req["presence"] = json!(true);
    }
    ws.send(req).await;
    let v = ws.json().await;
    assert_eq!(v["type"], "joined", "{v}");
}

/// The `presence` answer for `room`.
async fn query(ws: &mut Ws, room: &str) -> Value {
    let id = ws.id();
    ws.send(json!({"type": "presence", "room": room, "id": id}))
        .await;
    let v = ws.json().await;
    assert_eq!(v["id"], id.as_str(), "{v}");
    v
}

/// The users a `presence` query lists until they are `want` (bounded).
async fn until_users(ws: &mut Ws, room: &str, want: &[&str], limit: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let v = query(ws, room).await;
        if v["users"] == json!(want) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence of {room} stayed {v}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next frame, asserting it is the answer to a ping (nothing else was
/// queued before it).
async fn nothing_pending(ws: &mut Ws) {
    let id = ws.id();
    ws.send(json!({"type": "ping", "id": id})).await;
    let v = ws.json().await;
    assert_eq!(v, json!({"type": "pong", "id": id}), "unexpected frame");
}

/// The next presence event, within `limit`.
async fn event(ws: &mut Ws, limit: Duration) -> Value {
    let v = tokio::time::timeout(limit, ws.json())
        .await
        .expect("no presence event in time");
    assert!(
        v["type"] == "presence_join" || v["type"] == "presence_leave",
        "{v}"
    );
    assert!(v.get("seq").is_none(), "an event carries no seq: {v}");
    v
}

#[tokio::test]
async fn a_single_node_counts_users_once_sorted_and_checks_grants() {
    let node = Node::start(&[]).await;
    let (mut a1, _) = Ws::open(&node.ws_url(), "alice").await;
    let (mut a2, _) = Ws::open(&node.ws_url(), "alice").await;
    let (mut b, _) = Ws::open(&node.ws_url(), "bob").await;
    for ws in [&mut b, &mut a1, &mut a2] {
        join(ws, "lobby", false).await;
    }
    let v = query(&mut b, "lobby").await;
    assert_eq!(
        v,
        json!({"type":"presence","room":"lobby","count":2,"users":["alice","bob"],"id":v["id"]})
    );
    // Membership is not needed, the grant is.
    let (mut outsider, _) = Ws::open(&node.ws_url(), "carol").await;
    assert_eq!(query(&mut outsider, "lobby").await["count"], 2);
    assert_eq!(query(&mut outsider, "empty").await["count"], 0);
    let limited = token("dave", &["other"], &[], Duration::from_secs(600));
    let (mut dave, _) = Ws::open_with(&node.ws_url(), &limited).await;
    let v = query(&mut dave, "lobby").await;
    assert_eq!(v["type"], "error");
    assert_eq!(v["code"], "forbidden");
    // Bad input.
    b.send(json!({"type":"presence","room":"bad room","id":9}))
        .await;
    let v = b.json().await;
    assert_eq!(
        (v["code"].as_str(), v["id"].as_i64()),
        (Some("bad_request"), Some(9))
    );
    for flag in [json!("yes"), json!(1), json!(null)] {
        b.send(json!({"type":"join","room":"x","presence":flag,"id":10}))
            .await;
        let v = b.json().await;
        assert_eq!(v["code"], "bad_request", "{flag}: {v}");
    }
    // One of alice's two connections leaves: still present.
    a1.close(1000).await;
    a1.ended().await;
    assert_eq!(
        until_users(&mut b, "lobby", &["alice", "bob"], Duration::from_secs(1)).await["count"],
        2
    );
    let id = a2.id();
    a2.send(json!({"type":"leave","room":"lobby","id":id}))
        .await;
    assert_eq!(a2.json().await["type"], "left");
    until_users(&mut b, "lobby", &["bob"], Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_http_endpoint_answers_200_401_403() {
    let node = Node::start(&["--api-key", "k-presence-test"]).await;
    let (mut a, _) = Ws::open(&node.ws_url(), "alice").await;
    join(&mut a, "lobby", false).await;
    let url = format!("{}/api/rooms/lobby/presence", node.http_url());
    let get = |auth: Option<String>| {
        let url = url.clone();
        async move {
            let headers: Vec<(&str, &str)> = match &auth {
                Some(a) => vec![("authorization", a.as_str())],
                None => vec![],
            };
            let (status, _, body) = http("GET", &url, &headers, b"").await.unwrap();
            (status, body)
        }
    };
    let (status, body) = get(Some(format!("Bearer {}", any_token("reader")))).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v, json!({"room":"lobby","count":1,"users":["alice"]}));
    let (status, body) = get(Some("ApiKey k-presence-test".into())).await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()),
        (200, v)
    );
    assert_eq!(get(None).await.0, 401);
    assert_eq!(get(Some("Bearer nope".into())).await.0, 401);
    let other = token("reader", &["other"], &[], Duration::from_secs(600));
    assert_eq!(get(Some(format!("Bearer {other}"))).await.0, 403);
}

#[tokio::test]
async fn events_are_opt_in_never_about_oneself_and_leave_with_the_last_connection() {
    let node = Node::start(&[]).await;
    let (mut watcher, _) = Ws::open(&node.ws_url(), "w").await;
    let (mut plain, _) = Ws::open(&node.ws_url(), "p").await;
    join(&mut watcher, "lobby", true).await;
    join(&mut plain, "lobby", false).await;
    assert_eq!(
        event(&mut watcher, Duration::from_secs(5)).await,
        json!({"type":"presence_join","room":"lobby","user":"p"})
    );
    // alice opts in too: she hears about no one's first join of herself.
    let (mut a1, _) = Ws::open(&node.ws_url(), "alice").await;
    join(&mut a1, "lobby", true).await;
    assert_eq!(
        event(&mut watcher, Duration::from_secs(5)).await,
        json!({"type":"presence_join","room":"lobby","user":"alice"})
    );
    let (mut a2, _) = Ws::open(&node.ws_url(), "alice").await;
    join(&mut a2, "lobby", false).await;
    nothing_pending(&mut a1).await;
    // The second connection changes nothing; closing one of two neither.
    a1.close(1000).await;
    a1.ended().await;
    nothing_pending(&mut watcher).await;
    a2.close(1000).await;
    a2.ended().await;
    assert_eq!(
        event(&mut watcher, Duration::from_secs(5)).await,
        json!({"type":"presence_leave","room":"lobby","user":"alice"})
    );
    // The member without the flag got nothing of all this.
    nothing_pending(&mut plain).await;
}

#[tokio::test]
async fn two_nodes_share_presence_and_events_through_redis() {
    let redis = Redis::start();
    let n1 = redis_node(&redis, &[]).await;
    let n2 = redis_node(&redis, &[]).await;
    let (mut watcher, _) = Ws::open(&n2.ws_url(), "w").await;
    join(&mut watcher, "lobby", true).await;
    let (mut a1, _) = Ws::open(&n1.ws_url(), "alice").await;
    let (mut a2, _) = Ws::open(&n2.ws_url(), "alice").await;
    let (mut b, _) = Ws::open(&n1.ws_url(), "bob").await;
    join(&mut a1, "lobby", false).await;
    assert_eq!(
        event(&mut watcher, Duration::from_secs(2)).await,
        json!({"type":"presence_join","room":"lobby","user":"alice"})
    );
    join(&mut a2, "lobby", false).await;
    join(&mut b, "lobby", false).await;
    assert_eq!(
        event(&mut watcher, Duration::from_secs(2)).await,
        json!({"type":"presence_join","room":"lobby","user":"bob"})
    );
    // Three users, four connections, two nodes: the same answer on both.
    let v = until_users(
        &mut b,
        "lobby",
        &["alice", "bob", "w"],
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(v["count"], 3);
    until_users(
        &mut watcher,
        "lobby",
        &["alice", "bob", "w"],
        Duration::from_secs(2),
    )
    .await;
    // alice's node-1 connection closes: still present through node 2.
    a1.close(1000).await;
    a1.ended().await;
    b.close(1000).await;
    b.ended().await;
    assert_eq!(
        event(&mut watcher, Duration::from_secs(2)).await,
        json!({"type":"presence_leave","room":"lobby","user":"bob"})
    );
    until_users(
        &mut watcher,
        "lobby",
        &["alice", "w"],
        Duration::from_secs(2),
    )
    .await;
    a2.close(1000).await;
    a2.ended().await;
    assert_eq!(
        event(&mut watcher, Duration::from_secs(2)).await,
        json!({"type":"presence_leave","room":"lobby","user":"alice"})
    );
    // The HTTP endpoint reads the cluster's presence as well.
    let (status, _, body) = http(
        "GET",
        &format!("{}/api/rooms/lobby/presence", n1.http_url()),
        &[("authorization", &format!("Bearer {}", any_token("r")))],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v, json!({"room":"lobby","count":1,"users":["w"]}));
}

#[tokio::test]
async fn a_query_lists_the_first_thousand_users_and_says_truncated() {
    let redis = Redis::start();
    let node = redis_node(&redis, &[]).await;
    // 1,001 users through the lower-level path: the room's user index.
    let mut cmd = redis::cmd("ZADD");
    cmd.arg("wsgate:{big}:pu");
    for i in 0..1001 {
        cmd.arg(0).arg(format!("u{i:04}"));
    }
    let added: i64 = redis.query(&cmd);
    assert_eq!(added, 1001);
    let (mut ws, _) = Ws::open(&node.ws_url(), "x").await;
    let v = query(&mut ws, "big").await;
    assert_eq!(v["count"], 1001);
    assert_eq!(v["truncated"], true);
    let users = v["users"].as_array().unwrap();
    assert_eq!(users.len(), 1000);
    assert_eq!(
        (users[0].as_str(), users[999].as_str()),
        (Some("u0000"), Some("u0999"))
    );
}

#[tokio::test]
async fn a_killed_nodes_users_leave_within_the_ttl_and_a_drained_nodes_at_once() {
    let redis = Redis::start();
    let watching = redis_node(&redis, &[]).await;
    let (mut watcher, _) = Ws::open(&watching.ws_url(), "w").await;
    join(&mut watcher, "lobby", true).await;

    // SIGKILL: no drain; the lease runs out and another node reaps it.
    let mut doomed = bin_node(&redis, TTL).await;
    let (mut ghost, _) = Ws::open(&doomed.ws_url(), "ghost").await;
    join(&mut ghost, "lobby", false).await;
    assert_eq!(
        event(&mut watcher, Duration::from_secs(2)).await["user"],
        "ghost"
    );
    doomed.kill();
    assert_eq!(
        event(&mut watcher, GRACE).await,
        json!({"type":"presence_leave","room":"lobby","user":"ghost"})
    );
    until_users(&mut watcher, "lobby", &["w"], Duration::from_secs(1)).await;
    let m = watching.metrics().await;
    // The only live node reaped the dead one and measured it.
    assert!(m.value("wsgate_presence_dead_node_removal_seconds_count", &[]) >= 1.0);
    assert!(m.value("wsgate_presence_events_total", &[]) >= 2.0);

    // SIGTERM: a lease far longer than the wait, so only the drain can
    // remove the user in time.
    let mut drained = bin_node(&redis, "60s").await;
    let (mut leaving, _) = Ws::open(&drained.ws_url(), "leaving").await;
    join(&mut leaving, "lobby", false).await;
    assert_eq!(
        event(&mut watcher, Duration::from_secs(2)).await["user"],
        "leaving"
    );
    drained.signal("TERM");
    assert_eq!(
        event(&mut watcher, Duration::from_secs(10)).await,
        json!({"type":"presence_leave","room":"lobby","user":"leaving"})
    );
    assert!(drained.wait_exit(Duration::from_secs(20)).await.is_some());
}

#[tokio::test]
async fn nodes_with_different_ttls_keep_each_others_users_present() {
    let redis = Redis::start();
    // A short lease beside the default 15 s one, renewed every 5 s: the
    // short-lived node must not take those renewals for a death.
    let short = redis_node(&redis, &[]).await;
    let long = bin_node(&redis, "15s").await;
    let (mut watcher, _) = Ws::open(&short.ws_url(), "w").await;
    join(&mut watcher, "lobby", true).await;
    let (mut healthy, _) = Ws::open(&long.ws_url(), "healthy").await;
    join(&mut healthy, "lobby", false).await;
    assert_eq!(
        event(&mut watcher, Duration::from_secs(2)).await["user"],
        "healthy"
    );
    // Three of the short TTL's reaps after the long node's last renewal.
    tokio::time::sleep(Duration::from_secs(7)).await;
    nothing_pending(&mut watcher).await;
    let v = query(&mut watcher, "lobby").await;
    assert_eq!(v["users"], json!(["healthy", "w"]), "{v}");
    drop(healthy);
    assert_eq!(
        event(&mut watcher, Duration::from_secs(3)).await,
        json!({"type":"presence_leave","room":"lobby","user":"healthy"})
    );
}

#[tokio::test]
async fn presence_recovers_after_redis_restarts_empty() {
    let mut redis = Redis::start();
    let n1 = redis_node(&redis, &[]).await;
    let n2 = redis_node(&redis, &[]).await;
    let (mut a, _) = Ws::open(&n1.ws_url(), "alice").await;
    let (mut b, _) = Ws::open(&n2.ws_url(), "bob").await;
    join(&mut a, "lobby", false).await;
    join(&mut b, "lobby", false).await;
    until_users(&mut a, "lobby", &["alice", "bob"], Duration::from_secs(2)).await;
    redis.restart();
    let flushed: i64 = redis.query(&redis::cmd("DBSIZE"));
    assert_eq!(flushed, 0, "redis restarted with data");
    // The live nodes re-announce their members once they see their lease gone.
    eventually_for("presence recovered", GRACE, || {
        let url = format!("{}/api/rooms/lobby/presence", n2.http_url());
        async move {
            let auth = format!("Bearer {}", any_token("r"));
            let (status, _, body) = http("GET", &url, &[("authorization", &auth)], b"")
                .await
                .ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            (status == 200 && v["users"] == json!(["alice", "bob"])).then_some(())
        }
    })
    .await;
    let v = query(&mut a, "lobby").await;
    assert_eq!(v["count"], 2);
}

#[tokio::test]
async fn presence_works_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let node = Node::start(&[
            "--redis-url",
            &urls,
            "--redis-cluster",
            "--presence-ttl",
            TTL,
        ])
        .await;
        wait_ready(&node.ops_url()).await;
        nodes.push(node);
    }
    // Both nodes' leases are renewed (the lease scripts' keys share a slot).
    eventually("both leases renewed", || async {
        let leases: Option<i64> =
            cluster.query_any(redis::cmd("ZCARD").arg("wsgate:presence:{leases}"));
        let ttls: Option<i64> =
            cluster.query_any(redis::cmd("HLEN").arg("wsgate:presence:{leases}:ttls"));
        (leases == Some(2) && ttls == Some(2)).then_some(())
    })
    .await;
    let (mut watcher, _) = Ws::open(&nodes[1].ws_url(), "w").await;
    // Rooms on different slots: each room's keys and events stay on its own.
    for room in ["lobby", "r2", "r3"] {
        join(&mut watcher, room, true).await;
    }
    let (mut a, _) = Ws::open(&nodes[0].ws_url(), "alice").await;
    for room in ["lobby", "r2", "r3"] {
        join(&mut a, room, false).await;
        assert_eq!(
            event(&mut watcher, Duration::from_secs(2)).await,
            json!({"type":"presence_join","room":room,"user":"alice"})
        );
        until_users(&mut watcher, room, &["alice", "w"], Duration::from_secs(2)).await;
    }
    a.close(1000).await;
    a.ended().await;
    let mut left = Vec::new();
    for _ in 0..3 {
        let v = event(&mut watcher, Duration::from_secs(2)).await;
        assert_eq!(
            (v["type"].as_str(), v["user"].as_str()),
            (Some("presence_leave"), Some("alice"))
        );
        left.push(v["room"].as_str().unwrap().to_owned());
    }
    left.sort();
    assert_eq!(left, ["lobby", "r2", "r3"]);
}
