//! PROTOCOL.md section 7: the fallback transport, Server-Sent Events plus
//! POST, against real nodes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use std::time::Duration;

use wsgate_testkit::{
    any_token, eventually, http, http_get, token, BinNode, Node, Redis, RedisCluster, Sse, SseItem,
    Ws,
};

#[tokio::test]
async fn a_stream_gets_welcome_then_answers_and_messages_in_order() {
    let node = Node::start(&[]).await;
    let (mut sse, welcome) = Sse::open(node.addr, "alice").await;
    assert_eq!(welcome["transport"], "sse");
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["node"], node.node_id.as_str());
    assert_eq!(welcome["heartbeat_ms"], 30_000);
    // The listener took the connection: no chunked encoding, the body runs
    // until the connection ends.
    assert_eq!(sse.header("connection"), Some("close"));
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    assert_eq!(sse.header("cache-control"), Some("no-cache"));
    assert_eq!(sse.header("x-accel-buffering"), Some("no"));

    let joined = sse.join("lobby").await;
    assert_eq!(
        (joined["type"].as_str(), joined["seq"].as_u64()),
        (Some("joined"), Some(0))
    );

    // A WebSocket member publishes; the stream gets the message.
    let (mut ws, _) = Ws::open(&node.ws_url(), "bob").await;
    ws.join("lobby").await;
    ws.publish("lobby", json!({"n": 1})).await;
    let m = sse.json().await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64(), m["from"].as_str()),
        (Some("message"), Some(1), Some("bob"))
    );

    // Publishing over POST: message and ack on the stream, in order.
    sse.send(json!({"type": "publish", "room": "lobby", "data": {"n": 2}, "id": "p"}))
        .await;
    let m = sse.json().await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64()),
        (Some("message"), Some(2))
    );
    let ack = sse.json().await;
    assert_eq!(
        (
            ack["type"].as_str(),
            ack["id"].as_str(),
            ack["seq"].as_u64()
        ),
        (Some("ack"), Some("p"), Some(2))
    );
    assert_eq!(ws.json().await["seq"], 2);
    node.stop().await;
}

#[tokio::test]
async fn a_post_answers_202_400_401_403_404_413() {
    let node = Node::start(&["--max-message-bytes", "1024"]).await;
    let (mut sse, _) = Sse::open(node.addr, "alice").await;
    let url = format!("{}/sse/{}", node.http_url(), sse.conn);
    let bearer = |sub: &str| format!("Bearer {}", any_token(sub));
    let post = |url: String, auth: String, body: Vec<u8>| async move {
        http("POST", &url, &[("authorization", &auth)], &body)
            .await
            .unwrap()
            .0
    };
    // An array, handled in order: the errors carry their ids.
    let frames = json!([{"type": "ping", "id": 1}, {"type": "nope", "id": 2}, 3]);
    assert_eq!(
        post(url.clone(), bearer("alice"), frames.to_string().into()).await,
        202
    );
    assert_eq!(sse.json().await, json!({"type": "pong", "id": 1}));
    let e = sse.json().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["id"].as_u64()),
        (Some("error"), Some("bad_request"), Some(2))
    );
    assert_eq!(sse.json().await["code"], "bad_request");

    assert_eq!(
        post(url.clone(), bearer("alice"), b"not json".to_vec()).await,
        400
    );
    assert_eq!(
        post(url.clone(), bearer("alice"), b"42".to_vec()).await,
        400
    );
    assert_eq!(
        post(url.clone(), "Bearer nope".into(), b"{}".to_vec()).await,
        401
    );
    assert_eq!(
        post(url.clone(), bearer("mallory"), b"{}".to_vec()).await,
        403
    );
    let big = format!("{{\"type\":\"ping\",\"id\":\"{}\"}}", "x".repeat(2000));
    assert_eq!(post(url.clone(), bearer("alice"), big.into()).await, 413);
    let missing = format!("{}/sse/c-0.{}", node.http_url(), "bm9uZQ");
    assert_eq!(post(missing, bearer("alice"), b"{}".to_vec()).await, 404);
    // The stream still works, and the refused POSTs left nothing on it.
    sse.send(json!({"type": "ping", "id": "after"})).await;
    assert_eq!(sse.json().await, json!({"type": "pong", "id": "after"}));
    node.stop().await;
}

/// A stream on node A, its POSTs sent to node B, a WebSocket publisher on
/// node C: the answers and C's messages arrive on the stream in order.
async fn any_node(broker: &[&str]) {
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let node = Node::start(broker).await;
        let ready = format!("{}/ready", node.ops_url());
        eventually("node ready", || async {
            matches!(http_get(&ready).await, Ok((200, _, _))).then_some(())
        })
        .await;
        nodes.push(node);
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (mut sse, welcome) = Sse::open(a.addr, "alice").await;
    assert_eq!(welcome["node"], a.node_id.as_str());
    // POSTs go to B from now on.
    sse.base = b.http_url();
    let joined = sse.join("lobby").await;
    assert_eq!(joined["type"], "joined", "{joined}");

    let (mut ws, _) = Ws::open(&c.ws_url(), "carol").await;
    ws.join("lobby").await;
    for n in 1..=5 {
        ws.publish("lobby", json!({ "n": n })).await;
    }
    sse.send(json!({"type": "publish", "room": "lobby", "data": {"n": 6}, "id": "p6"}))
        .await;
    let (mut seqs, mut acked) = (Vec::new(), false);
    while seqs.len() < 6 || !acked {
        let m = sse.json().await;
        if m["type"] == "message" {
            assert_eq!(m["data"]["n"], m["seq"], "{m}");
            seqs.push(m["seq"].as_u64().unwrap());
        } else {
            assert_eq!(
                (m["type"].as_str(), m["id"].as_str()),
                (Some("ack"), Some("p6")),
                "{m}"
            );
            acked = true;
        }
    }
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);

    // Through B: another user's POST is refused by A with 403, a stream that
    // no node holds is 404.
    let url = format!("{}/sse/{}", b.http_url(), sse.conn);
    let mallory = format!("Bearer {}", any_token("mallory"));
    let resp = http("POST", &url, &[("authorization", &mallory)], b"{}")
        .await
        .unwrap();
    assert_eq!(resp.0, 403, "{resp:?}");
    let alice = format!("Bearer {}", any_token("alice"));
    let gone = format!("{}/sse/c-0.{}", b.http_url(), "bm9kZS1nb25l");
    assert_eq!(
        http("POST", &gone, &[("authorization", &alice)], b"{}")
            .await
            .unwrap()
            .0,
        404
    );
    let own = format!(
        "{}/sse/c-0.{}",
        b.http_url(),
        sse.conn.rsplit_once('.').unwrap().1
    );
    assert_eq!(
        http("POST", &own, &[("authorization", &alice)], b"{}")
            .await
            .unwrap()
            .0,
        404
    );
    // The stream is still served.
    sse.send(json!({"type": "ping", "id": "end"})).await;
    assert_eq!(sse.json().await, json!({"type": "pong", "id": "end"}));
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_post_to_any_node_reaches_the_stream_through_redis() {
    let redis = Redis::start();
    any_node(&["--redis-url", &redis.url()]).await;
}

#[tokio::test]
async fn a_post_to_any_node_reaches_the_stream_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    any_node(&["--redis-url", &cluster.urls(), "--redis-cluster"]).await;
}

/// The `close` event the stream ends with, and that it then ends.
async fn closed_with(sse: &mut Sse) -> (u64, String) {
    let rest = sse.rest().await;
    let last = rest.last().expect("a close event");
    assert_eq!(last["type"], "close", "{rest:?}");
    (
        last["code"].as_u64().unwrap(),
        last["reason"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn heartbeat_comments_come_and_a_silent_stream_stays_open() {
    let node = Node::start(&["--heartbeat", "200ms", "--pong-timeout", "100ms"]).await;
    let (mut sse, welcome) = Sse::open(node.addr, "alice").await;
    assert_eq!(welcome["heartbeat_ms"], 200);
    // Many heartbeats and pong timeouts go by without a word from the client.
    for _ in 0..5 {
        assert_eq!(sse.next().await, Some(SseItem::Comment));
    }
    sse.send(json!({"type": "ping", "id": "still"})).await;
    assert_eq!(sse.json().await, json!({"type": "pong", "id": "still"}));
    node.stop().await;
}

#[tokio::test]
async fn an_expired_token_closes_the_stream_with_4001() {
    let node = Node::start(&["--jwt-leeway", "0s"]).await;
    let short = token("alice", &["*"], &["*"], Duration::from_secs(2));
    let (mut sse, _) = Sse::open_with(node.addr, &short).await;
    assert_eq!(closed_with(&mut sse).await, (4001, "token expired".into()));
    node.stop().await;
}

#[tokio::test]
async fn a_refresh_over_post_moves_the_expiry() {
    let node = Node::start(&["--jwt-leeway", "0s"]).await;
    let short = token("alice", &["*"], &["*"], Duration::from_secs(2));
    let (mut sse, _) = Sse::open_with(node.addr, &short).await;
    let other = any_token("bob");
    sse.send(json!({"type": "refresh", "token": other, "id": "r1"}))
        .await;
    let e = sse.answer("r1").await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("invalid_token"))
    );
    let long = any_token("alice");
    sse.send(json!({"type": "refresh", "token": long, "id": "r2"}))
        .await;
    assert_eq!(sse.answer("r2").await["type"], "refreshed");
    // Past the first token's expiry, the stream still answers (the POSTs
    // carry the new token).
    sse.token = long;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sse.send(json!({"type": "ping", "id": "p"})).await;
    assert_eq!(sse.answer("p").await["type"], "pong");
    node.stop().await;
}

/// The server API (`--api-key k`) disconnects alice: her stream gets 4003.
async fn disconnected_by_the_api(node: Node, sse: &mut Sse) {
    let url = format!("{}/api/users/alice/disconnect", node.http_url());
    let resp = http("POST", &url, &[("x-api-key", "k")], b"")
        .await
        .unwrap();
    assert_eq!(resp.0, 202, "{resp:?}");
    assert_eq!(closed_with(sse).await, (4003, "disconnected".into()));
    node.stop().await;
}

#[tokio::test]
async fn the_server_api_disconnect_closes_the_stream_with_4003() {
    let node = Node::start(&["--api-key", "k"]).await;
    let (mut sse, _) = Sse::open(node.addr, "alice").await;
    disconnected_by_the_api(node, &mut sse).await;
}

#[tokio::test]
async fn sigterm_closes_the_stream_with_1001() {
    let node = BinNode::start(&[]).await;
    let (mut sse, _) = Sse::open(node.addr, "alice").await;
    node.signal("TERM");
    assert_eq!(closed_with(&mut sse).await, (1001, "shutting down".into()));
}

/// Flood room `flood` from a WebSocket on `ws_url` (bounded) until the node
/// at `ops` counts a slow-consumer close.
async fn flood_until_a_slow_consumer_close(ws_url: &str, ops: &str) {
    let (mut ws, _) = Ws::open(ws_url, "pub").await;
    let big = "x".repeat(8192);
    for i in 0..10_000 {
        let ack = ws.publish("flood", json!(big)).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        if i % 50 == 0
            && wsgate_testkit::metrics(ops)
                .await
                .value("wsgate_slow_consumer_closes_total", &[])
                >= 1.0
        {
            return;
        }
    }
    panic!("the stream was never closed as a slow consumer");
}

/// A stream of `slow` that joined `flood`, with a small receive buffer;
/// `kept_alive`: through the HTTP stack.
async fn slow_stream(addr: std::net::SocketAddr, kept_alive: bool) -> Sse {
    let token = any_token("slow");
    let auth = format!("Authorization: Bearer {token}\r\n");
    let mut slow = Sse::connect_after(addr, &auth, &token, Some(4096), kept_alive)
        .await
        .unwrap();
    let welcome = slow.json().await;
    slow.conn = welcome["conn"].as_str().unwrap().to_owned();
    slow.join("flood").await;
    slow
}

const FLOOD: [&str; 6] = [
    "--max-outbound-bytes",
    "65536",
    "--publish-rate",
    "1000000",
    "--publish-burst",
    "1000000",
];

#[tokio::test]
async fn a_stream_that_is_not_read_is_closed_as_a_slow_consumer() {
    let node = Node::start(&FLOOD).await;
    let mut slow = slow_stream(node.addr, false).await;
    let ops = node.ops_url();
    flood_until_a_slow_consumer_close(&node.ws_url(), &ops).await;
    eventually("slow consumer closed", || {
        let ops = ops.clone();
        async move {
            let m = wsgate_testkit::metrics(&ops).await;
            (m.value("wsgate_slow_consumer_closes_total", &[]) == 1.0
                && m.value("wsgate_connections_active", &[("transport", "sse")]) == 0.0)
                .then_some(())
        }
    })
    .await;
    // The client, reading at last, sees its stream end.
    while slow.next().await.is_some() {}
    node.stop().await;
}

#[tokio::test]
async fn a_stream_through_http_that_is_not_read_loses_its_connection() {
    // The binary: its own process, so its open descriptors are its own. A
    // large outbound limit: the socket's buffers fill up before the queue
    // overflows, so hyper is left with events it cannot write.
    let node = BinNode::start(&[&["--max-outbound-bytes", "16777216"], &FLOOD[2..]].concat()).await;
    let ops = node.ops_url();
    let fds = |m: wsgate_testkit::Metrics| m.value("process_open_fds", &[]);
    let (_publisher, _) = Ws::open(&node.ws_url(), "warm-up").await;
    let before = fds(wsgate_testkit::metrics(&ops).await);
    let _slow = slow_stream(node.addr, true).await;
    flood_until_a_slow_consumer_close(&node.ws_url(), &ops).await;
    // The slow client still holds its socket and reads nothing; the node
    // dropped the connection anyway: back to its descriptors before, plus
    // the flooding publisher's.
    eventually("connection dropped", || {
        let ops = ops.clone();
        async move { (fds(wsgate_testkit::metrics(&ops).await) <= before + 1.0).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_new_stream_resumes_with_since_and_epoch() {
    let node = Node::start(&[]).await;
    let (mut first, _) = Sse::open(node.addr, "alice").await;
    let joined = first.join("lobby").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let (mut ws, _) = Ws::open(&node.ws_url(), "bob").await;
    ws.join("lobby").await;
    ws.publish("lobby", json!(1)).await;
    assert_eq!(first.json().await["seq"], 1);
    drop(first);
    ws.publish("lobby", json!(2)).await;
    ws.publish("lobby", json!(3)).await;

    let (mut second, _) = Sse::open(node.addr, "alice").await;
    second
        .send(json!({"type": "join", "room": "lobby", "since": 1, "epoch": epoch, "id": "j"}))
        .await;
    let joined = second.json().await;
    assert_eq!(
        (joined["recovered"].as_bool(), joined["seq"].as_u64()),
        (Some(true), Some(3)),
        "{joined}"
    );
    assert_eq!(second.json().await["seq"], 2);
    assert_eq!(second.json().await["seq"], 3);

    // A stale epoch is not recovered: nothing replayed, live messages follow.
    let (mut third, _) = Sse::open(node.addr, "alice").await;
    third
        .send(json!({"type": "join", "room": "lobby", "since": 1, "epoch": "other", "id": "j"}))
        .await;
    let joined = third.json().await;
    assert_eq!(joined["recovered"], false, "{joined}");
    ws.publish("lobby", json!(4)).await;
    assert_eq!(third.json().await["seq"], 4);
    node.stop().await;
}

#[tokio::test]
async fn an_array_of_10000_frames_meets_the_limits_and_the_node_still_serves() {
    // Room for every answer (a client that sends a lot at once without
    // reading may otherwise be closed as a slow consumer, as over a
    // WebSocket).
    // A bucket that hardly refills: the acks do not depend on how fast a
    // loaded machine handles the array.
    let node = Node::start(&["--max-outbound-bytes", "4194304", "--publish-rate", "0.01"]).await;
    let (mut sse, _) = Sse::open(node.addr, "alice").await;
    let frames: Vec<_> = (0..10_000)
        .map(|i| json!({"type": "publish", "room": "r", "data": i, "id": i}))
        .collect();
    let body = serde_json::Value::Array(frames).to_string();
    assert_eq!(sse.post_raw(&body).await.0, 202);
    // Every frame is answered, in order: the burst is acked, the rest is
    // rate limited.
    let (mut acks, mut limited, mut next) = (0, 0, 0);
    while next < 10_000 {
        let v = sse.json().await;
        if v["type"] == "close" {
            panic!("{v} after {next} answers");
        }
        assert_eq!(v["id"], next, "{v}");
        next += 1;
        match v["type"].as_str() {
            Some("ack") => acks += 1,
            _ => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited += 1;
            }
        }
    }
    assert!(
        (200..=201).contains(&acks),
        "{acks} acks, {limited} limited"
    );
    // The node still serves.
    let (mut again, _) = Sse::open(node.addr, "carol").await;
    again.send(json!({"type": "ping", "id": "ok"})).await;
    assert_eq!(again.json().await, json!({"type": "pong", "id": "ok"}));
    node.stop().await;
}

#[tokio::test]
async fn get_sse_is_checked_like_ws() {
    let node = Node::start(&[
        "--max-connections",
        "1",
        "--allowed-origins",
        "https://good.example",
    ])
    .await;
    let bearer = format!("Authorization: Bearer {}\r\n", any_token("alice"));
    let refused = |r: Result<Sse, wsgate_testkit::Refused>| match r {
        Ok(_) => panic!("not refused"),
        Err(r) => r,
    };
    let r = refused(
        Sse::connect(
            node.addr,
            &format!("{bearer}Origin: https://evil.example\r\n"),
            "",
            None,
        )
        .await,
    );
    assert_eq!(r.status, 403);
    let r = refused(Sse::connect(node.addr, "", "", None).await);
    assert_eq!(r.status, 401);
    assert!(
        r.headers
            .iter()
            .any(|(k, v)| k == "www-authenticate" && v.starts_with("Bearer")),
        "{r:?}"
    );
    let (_held, _) = Sse::open(node.addr, "alice").await;
    let r = refused(Sse::connect(node.addr, &bearer, "", None).await);
    assert_eq!(r.status, 503);
    assert!(r.headers.iter().any(|(k, _)| k == "retry-after"), "{r:?}");
    node.stop().await;
}

#[tokio::test]
async fn metrics_count_streams_with_transport_sse() {
    let node = Node::start(&[]).await;
    let (sse, _) = Sse::open(node.addr, "alice").await;
    let (_ws, _) = Ws::open(&node.ws_url(), "bob").await;
    let m = node.metrics().await;
    let sse_label = [("transport", "sse")];
    assert_eq!(m.value("wsgate_connections_active", &sse_label), 1.0);
    assert_eq!(
        m.value("wsgate_connections_accepted_total", &sse_label),
        1.0
    );
    assert_eq!(
        m.value("wsgate_connections_active", &[("transport", "ws")]),
        1.0
    );
    drop(sse);
    let ops = node.ops_url();
    eventually("stream counted closed", || {
        let ops = ops.clone();
        async move {
            let m = wsgate_testkit::metrics(&ops).await;
            (m.value("wsgate_connections_active", &[("transport", "sse")]) == 0.0
                && m.value("wsgate_connections_closed_total", &[("transport", "sse")]) == 1.0)
                .then_some(())
        }
    })
    .await;
    node.stop().await;
}

#[tokio::test]
async fn streams_do_not_hold_pending_connection_slots() {
    let node = Node::start(&["--max-pending-connections", "2"]).await;
    let mut streams = Vec::new();
    for i in 0..4 {
        streams.push(Sse::open(node.addr, &format!("u{i}")).await.0);
    }
    // POSTs (pending connections while they last) still get through.
    for s in &mut streams {
        s.send(json!({"type": "ping", "id": "p"})).await;
        assert_eq!(s.json().await["type"], "pong");
    }
    node.stop().await;
}

#[tokio::test]
async fn a_stream_on_a_kept_alive_connection_is_served_through_http() {
    let node = Node::start(&["--api-key", "k"]).await;
    let token = any_token("alice");
    let auth = format!("Authorization: Bearer {token}\r\n");
    let mut sse = Sse::connect_after(node.addr, &auth, &token, None, true)
        .await
        .unwrap();
    assert_eq!(sse.header("transfer-encoding"), Some("chunked"));
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    let welcome = sse.json().await;
    assert_eq!(welcome["transport"], "sse");
    sse.conn = welcome["conn"].as_str().unwrap().to_owned();
    sse.join("lobby").await;
    sse.send(json!({"type": "publish", "room": "lobby", "data": 1, "id": "p"}))
        .await;
    assert_eq!(sse.json().await["type"], "message");
    assert_eq!(sse.json().await["type"], "ack");
    disconnected_by_the_api(node, &mut sse).await;
}

#[tokio::test]
async fn a_post_that_cannot_reach_the_streams_node_is_503_while_redis_is_down() {
    let mut redis = Redis::start();
    let url = redis.url();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let node = Node::start(&["--redis-url", &url]).await;
        let ready = format!("{}/ready", node.ops_url());
        eventually("node ready", || async {
            matches!(http_get(&ready).await, Ok((200, _, _))).then_some(())
        })
        .await;
        nodes.push(node);
    }
    let (mut sse, _) = Sse::open(nodes[0].addr, "alice").await;
    sse.base = nodes[1].http_url();
    sse.send(json!({"type": "ping", "id": 1})).await;
    assert_eq!(sse.json().await["type"], "pong");
    redis.kill();
    let resp = sse.post_raw(r#"{"type":"ping","id":2}"#).await;
    assert_eq!(resp.0, 503, "{resp:?}");
    assert!(resp.1.iter().any(|(k, _)| k == "retry-after"), "{resp:?}");
    // The node holding the stream still takes its POSTs itself.
    sse.base = nodes[0].http_url();
    sse.send(json!({"type": "ping", "id": 3})).await;
    assert_eq!(sse.json().await["id"], 3);
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_page_on_an_allowed_origin_may_read_the_stream_and_post() {
    let node = Node::start(&["--allowed-origins", "https://app.example"]).await;
    let token = any_token("alice");
    let headers = format!("Authorization: Bearer {token}\r\nOrigin: https://app.example\r\n");
    let mut sse = Sse::connect(node.addr, &headers, &token, None)
        .await
        .unwrap();
    assert_eq!(
        sse.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    sse.conn = sse.json().await["conn"].as_str().unwrap().to_owned();
    let url = format!("{}/sse/{}", node.http_url(), sse.conn);
    let origin = ("origin", "https://app.example");
    let preflight = http(
        "OPTIONS",
        &url,
        &[origin, ("access-control-request-method", "POST")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(preflight.0, 204, "{preflight:?}");
    let allowed = wsgate_testkit::header(&preflight, "access-control-allow-headers").unwrap();
    assert!(allowed.contains("authorization"), "{preflight:?}");
    let auth = format!("Bearer {token}");
    for (body, status) in [(&b"{\"type\":\"ping\"}"[..], 202), (b"x", 400)] {
        let resp = http("POST", &url, &[origin, ("authorization", &auth)], body)
            .await
            .unwrap();
        assert_eq!(resp.0, status, "{resp:?}");
        assert_eq!(
            wsgate_testkit::header(&resp, "access-control-allow-origin"),
            Some("https://app.example")
        );
    }
    node.stop().await;
}

/// Read from `stream` into `raw` until it holds `what` after byte `from`
/// (bounded).
async fn read_until(
    stream: &mut tokio::net::TcpStream,
    raw: &mut Vec<u8>,
    from: usize,
    what: &str,
) {
    use tokio::io::AsyncReadExt;
    let fut = async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&raw[from.min(raw.len())..]).contains(what) {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "stream ended before {what:?}");
            raw.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| panic!("no {what:?} within 5 s"));
}

#[tokio::test]
async fn a_pretty_printed_message_arrives_as_one_data_line() {
    use tokio::io::AsyncWriteExt;
    let node = Node::start(&[]).await;
    let t = any_token("alice");
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let head = format!("GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    read_until(&mut stream, &mut raw, 0, "\"welcome\"").await;
    read_until(&mut stream, &mut raw, 0, "}\n\n").await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let conn = text
        .split("\"conn\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("conn in welcome")
        .to_owned();
    let auth = format!("Bearer {t}");
    let post = format!("{}/sse/{conn}", node.http_url());
    let join = br#"{"type":"join","room":"lobby"}"#;
    let (status, _, body) = http("POST", &post, &[("authorization", &auth)], join)
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    read_until(&mut stream, &mut raw, 0, "\"joined\"").await;
    // Pretty-printed data, with LF and CRLF line breaks of its own.
    let pretty = "{\r\n  \"text\": \"hi\\nthere\",\n  \"n\": [1,\n 2]\n}";
    let url = format!("{}/api/rooms/lobby/messages", node.http_url());
    let (status, _, body) = http("POST", &url, &[("authorization", &auth)], pretty.as_bytes())
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    read_until(&mut stream, &mut raw, 0, "\"message\"").await;
    let from = String::from_utf8_lossy(&raw).find("\"message\"").unwrap();
    read_until(&mut stream, &mut raw, from, "\n\n").await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let event = text
        .split("\n\n")
        .find(|e| e.contains("\"message\""))
        .expect("the message event");
    let lines: Vec<&str> = event.lines().collect();
    assert_eq!(lines.len(), 1, "one data line: {event:?}");
    let frame: serde_json::Value =
        serde_json::from_str(lines[0].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(frame["data"], json!({"text": "hi\nthere", "n": [1, 2]}));
}

#[tokio::test]
async fn a_post_to_a_conn_id_that_is_not_utf8_is_checked_like_any_other() {
    let node = Node::start(&[]).await;
    let url = format!("{}/sse/%ff", node.http_url());
    let (status, _, body) = http("POST", &url, &[], b"{}").await.unwrap();
    assert_eq!(status, 401, "{body}");
    let auth = format!("Bearer {}", any_token("alice"));
    let (status, _, body) = http("POST", &url, &[("authorization", &auth)], b"{}")
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "not_found");
}
