//! PROTOCOL.md section 5: the operations listener (`/health`, `/ready`,
//! `/metrics`), and that the metrics move as the traffic says. Readiness
//! while draining is in `shutdown.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use wsgate_testkit::{any_token, eventually, header, http, http_get, metrics, Node, Ws};

#[tokio::test]
async fn health_and_ready_are_200_and_only_on_the_ops_listener() {
    let node = Node::start(&[]).await;
    for path in ["/health", "/ready"] {
        let (status, _, _) = http_get(&format!("{}{path}", node.ops_url()))
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}");
    }
    // Not on the public listener, and no metrics there either.
    for path in ["/metrics", "/health"] {
        let (status, _, _) = http_get(&format!("{}{path}", node.http_url()))
            .await
            .unwrap();
        assert_eq!(status, 404, "public {path}");
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_the_node_label() {
    let node = Node::start(&["--node-id", "metrics-node"]).await;
    let resp = http_get(&format!("{}/metrics", node.ops_url()))
        .await
        .unwrap();
    assert_eq!(resp.0, 200);
    assert!(
        header(&resp, "content-type").is_some_and(|c| c.starts_with("text/plain")),
        "{resp:?}"
    );
    assert!(resp.2.contains("# TYPE wsgate_connections_active gauge"));
    assert!(resp
        .2
        .contains("# TYPE wsgate_publish_latency_seconds histogram"));
    let m = node.metrics().await;
    for name in [
        "wsgate_connections_active",
        "wsgate_connections_accepted_total",
        "wsgate_messages_received_total",
        "wsgate_messages_delivered_total",
        "wsgate_messages_published_total",
        "wsgate_slow_consumer_closes_total",
        "wsgate_rooms_active",
        "wsgate_publish_latency_seconds_count",
        "wsgate_publish_latency_seconds_sum",
        "wsgate_broker_up",
    ] {
        assert_eq!(
            m.get(name, &[("node", "metrics-node")]),
            Some(if name == "wsgate_broker_up" { 1.0 } else { 0.0 }),
            "{name}"
        );
    }
    for reason in ["origin", "auth", "capacity", "bad_request"] {
        assert_eq!(
            m.get(
                "wsgate_handshake_rejections_total",
                &[("node", "metrics-node"), ("reason", reason)]
            ),
            Some(0.0),
            "{reason}"
        );
    }
    // Every wsgate_ sample carries the node label.
    for (name, labels, _) in &m.samples {
        if name.starts_with("wsgate_") {
            assert!(
                labels
                    .iter()
                    .any(|(k, v)| k == "node" && v == "metrics-node"),
                "{name} {labels:?}"
            );
        }
    }
}

#[tokio::test]
async fn metrics_follow_the_traffic() {
    let node = Node::start(&["--max-connections", "3"]).await;
    let (mut a, _) = Ws::open(&node.ws_url(), "a").await;
    let (mut b, _) = Ws::open(&node.ws_url(), "b").await;
    // Rejections, one of each reason.
    let t = any_token("x");
    assert_eq!(
        Ws::connect(&node.ws_url(), Some(&t), Some("https://evil.example"))
            .await
            .err()
            .unwrap()
            .status,
        403
    );
    assert_eq!(
        Ws::connect(&node.ws_url(), Some("bad"), None)
            .await
            .err()
            .unwrap()
            .status,
        401
    );
    let bearer = format!("Bearer {t}");
    let resp = http(
        "GET",
        &format!("{}/ws", node.http_url()),
        &[("authorization", &bearer)],
        b"",
    )
    .await
    .unwrap();
    assert!(resp.0 == 400 || resp.0 == 426);
    let (_c, _) = Ws::open(&node.ws_url(), "c").await;
    assert_eq!(
        Ws::connect(&node.ws_url(), Some(&t), None)
            .await
            .err()
            .unwrap()
            .status,
        503
    );

    // Traffic: a and b in "r1", a also in "r2"; 3 publishes to r1 from b,
    // 1 to r2 over HTTP, 1 app ping from a.
    a.join("r1").await; // frame 1 (a)
    a.join("r2").await; // frame 2 (a)
    b.join("r1").await; // frame 3 (b)
    for k in 0..3 {
        b.publish("r1", json!(k)).await; // frames 4..6 (b)
    }
    let (status, _, _) = http(
        "POST",
        &format!("{}/api/rooms/r2/messages", node.http_url()),
        &[("authorization", &bearer)],
        b"{}",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    a.send(json!({"type":"ping","id":1})).await; // frame 7 (a)
                                                 // a receives 3 + 1 messages then the pong.
    let got = wsgate_testkit::messages(&mut a, 4).await;
    assert_eq!(got.len(), 4);
    assert_eq!(a.json().await["type"], "pong");

    let m = node.metrics().await;
    assert_eq!(
        m.value("wsgate_connections_active", &[("transport", "ws")]),
        3.0
    );
    assert_eq!(
        m.value("wsgate_connections_accepted_total", &[("transport", "ws")]),
        3.0
    );
    for reason in ["origin", "auth", "capacity", "bad_request"] {
        assert_eq!(
            m.value("wsgate_handshake_rejections_total", &[("reason", reason)]),
            1.0,
            "{reason}"
        );
    }
    // 7 WebSocket text frames, plus the HTTP API message.
    assert_eq!(m.value("wsgate_messages_received_total", &[]), 8.0);
    assert_eq!(m.value("wsgate_messages_published_total", &[]), 4.0);
    assert_eq!(m.value("wsgate_publish_latency_seconds_count", &[]), 4.0);
    // r1: 3 messages x 2 members; r2: 1 message x 1 member.
    assert_eq!(m.value("wsgate_messages_delivered_total", &[]), 7.0);
    assert_eq!(m.value("wsgate_rooms_active", &[]), 2.0);
    assert_eq!(m.value("wsgate_slow_consumer_closes_total", &[]), 0.0);
    let inf = m
        .get("wsgate_publish_latency_seconds_bucket", &[("le", "+Inf")])
        .unwrap();
    assert_eq!(inf, 4.0);

    // A replay counts as delivered too.
    let (mut d, _) = {
        a.close(1000).await;
        let ops = node.ops_url();
        eventually("a slot frees up", || {
            let ops = ops.clone();
            async move {
                (metrics(&ops)
                    .await
                    .value("wsgate_connections_active", &[("transport", "ws")])
                    == 2.0)
                    .then_some(())
            }
        })
        .await;
        Ws::open(&node.ws_url(), "d").await
    };
    d.send(json!({"type":"join","room":"r1","since":0})).await;
    assert_eq!(d.json().await["recovered"], true);
    wsgate_testkit::messages(&mut d, 3).await;
    let m = node.metrics().await;
    assert_eq!(m.value("wsgate_messages_delivered_total", &[]), 10.0);
    // a left r2 (its only member) by closing.
    assert_eq!(m.value("wsgate_rooms_active", &[]), 1.0);
    assert_eq!(
        m.value("wsgate_connections_accepted_total", &[("transport", "ws")]),
        4.0
    );
}
