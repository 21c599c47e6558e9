//! The client against one real in-process node: connect, join, publish with
//! acks and typed errors, leave, close; and refused connections.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{config, seqs, until};
use wsgate_client::{Client, ClientConfig, ClientError, ErrorCode, Event};
use wsgate_testkit::{any_token, token, Node, Ws, WAIT};

#[tokio::test]
async fn join_publish_receive_leave_close() {
    let node = Node::start(&[]).await;
    let (client, mut events) = Client::connect(config(&[node.ws_url()], "alice"))
        .await
        .unwrap();
    match events.next().await.unwrap() {
        Event::Connected { node: id, user, .. } => {
            assert_eq!(id, node.node_id);
            assert_eq!(user, "alice");
        }
        other => panic!("expected connected, got {other:?}"),
    }
    let info = client.join("lobby").await.unwrap();
    assert_eq!(
        (info.room.as_str(), info.seq, info.recovered),
        ("lobby", 0, None)
    );
    assert!(!info.epoch.is_empty());
    // Joining again answers with the current position.
    assert_eq!(client.join("lobby").await.unwrap().epoch, info.epoch);

    // Own publishes: acks carry the seq, and the messages come back once.
    for i in 1..=3u64 {
        assert_eq!(client.publish("lobby", json!({"n": i})).await.unwrap(), i);
    }
    // Someone else publishes too.
    let (mut other, _) = Ws::open(&node.ws_url(), "bob").await;
    assert_eq!(other.publish("lobby", json!("from bob")).await["seq"], 4);
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(until(&mut events, "message", |e| matches!(e, Event::Message(_))).await);
    }
    assert_eq!(seqs(&got, "lobby"), [1, 2, 3, 4]);
    match &got[3] {
        Event::Message(m) => {
            assert_eq!(m.from, "bob");
            assert_eq!(m.data.get(), r#""from bob""#);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client.position("lobby").await,
        Some((4, info.epoch.clone()))
    );

    client.leave("lobby").await.unwrap();
    assert_eq!(client.position("lobby").await, None);
    assert_eq!(other.publish("lobby", json!("unseen")).await["seq"], 5);
    // Publishing does not need membership; the left room's message is not delivered.
    assert_eq!(client.publish("lobby", json!("still ok")).await.unwrap(), 6);
    client.join("side").await.unwrap();
    client.publish("side", json!(1)).await.unwrap();
    let e = until(&mut events, "message", |e| matches!(e, Event::Message(_))).await;
    match e {
        Event::Message(m) => assert_eq!(m.room, "side", "nothing from the left room"),
        other => panic!("{other:?}"),
    }

    client.close().await;
    assert!(client.is_closed());
    // The stream ends after close; nothing but leftovers before that.
    let rest = tokio::time::timeout(WAIT, async {
        let mut rest = Vec::new();
        while let Some(e) = events.next().await {
            rest.push(e);
        }
        rest
    })
    .await
    .expect("event stream ends after close");
    assert!(
        rest.iter()
            .all(|e| !matches!(e, Event::Reconnecting { .. })),
        "no reconnect after close: {rest:?}"
    );
    assert!(matches!(
        client.publish("lobby", 1).await,
        Err(ClientError::Closed)
    ));
    assert!(matches!(
        client.join("lobby").await,
        Err(ClientError::Closed)
    ));
    client.close().await; // idempotent
}

#[tokio::test]
async fn server_errors_are_typed() {
    let node = Node::start(&["--publish-rate", "1", "--publish-burst", "2"]).await;
    let tok = token("carol", &["lobby"], &["lobby"], Duration::from_secs(600));
    let (client, _events) = Client::connect(ClientConfig::new([node.ws_url()], tok))
        .await
        .unwrap();
    let err = client.join("admin").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    let err = client.publish("admin", json!({})).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Server { code: ErrorCode::Forbidden, message } if message.contains("admin")),
        "{err:?}"
    );
    client.publish("lobby", 1).await.unwrap();
    client.publish("lobby", 2).await.unwrap();
    let err = client.publish("lobby", 3).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::RateLimited));
    // Client-side checks never reach the server.
    assert!(matches!(
        client.join("bad room").await,
        Err(ClientError::InvalidRoom(_))
    ));
    let unencodable: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
    assert!(matches!(
        client.publish("lobby", unencodable).await,
        Err(ClientError::Encode(_))
    ));
    // The connection is still fine.
    assert!(client.join("lobby").await.is_ok());
    client.close().await;
}

#[tokio::test]
async fn refused_connections_fail_connect_with_the_status() {
    let node = Node::start(&[]).await;
    let rooms = ["*".to_owned()];
    let foreign = wsgate::auth::mint_hs256(
        b"another-secret",
        &wsgate::auth::MintRequest {
            sub: "dave",
            rooms: &rooms,
            publish: &rooms,
            ttl: Duration::from_secs(60),
            issuer: None,
            audience: None,
        },
    )
    .unwrap();
    let err = Client::connect(ClientConfig::new([node.ws_url()], "not-a-jwt"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Connect {
                status: Some(401),
                ..
            }
        ),
        "{err:?}"
    );
    // Every URL is tried once before giving up.
    let mut c = ClientConfig::new(["ws://127.0.0.1:1/ws".to_owned(), node.ws_url()], foreign);
    c.backoff = wsgate_client::Backoff::new(Duration::from_millis(1), Duration::from_millis(5));
    let err = Client::connect(c).await.unwrap_err();
    match err {
        ClientError::Connect { url, status, .. } => {
            assert_eq!(url, node.ws_url());
            assert_eq!(status, Some(401));
        }
        other => panic!("{other:?}"),
    }
    let mut c = ClientConfig::new([node.ws_url()], any_token("erin"));
    c.origin = Some("http://evil.example".into());
    let err = Client::connect(c).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Connect {
                status: Some(403),
                ..
            }
        ),
        "{err:?}"
    );
    let err = Client::connect(ClientConfig::new(["ftp://x/ws"], "t"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Config(_)), "{err:?}");
}

#[tokio::test]
async fn join_while_disconnected_waits_for_the_connection() {
    // `start` returns at once; a join made right away (before or after the
    // connection is up) is answered once the room is joined.
    let node = Node::start(&[]).await;
    let (client, mut events) = Client::start(config(&[node.ws_url()], "frank")).unwrap();
    let info = client.join("early").await.unwrap();
    assert_eq!(info.room, "early");
    until(&mut events, "connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await;
    client.close().await;
}
