//! Presence through the Rust SDK against real nodes and a real
//! redis-server: the query, the event stream, and presence asked again
//! after a reconnect (events are not replayed); over the WebSocket and SSE.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::{config, until, wait_ready};
use wsgate_client::{Client, Event, PresenceInfo, Transport};
use wsgate_testkit::{Node, Redis, Ws};

fn info(room: &str, users: &[&str]) -> PresenceInfo {
    PresenceInfo {
        room: room.into(),
        count: users.len() as u64,
        users: users.iter().map(|u| u.to_string()).collect(),
        truncated: false,
    }
}

#[tokio::test]
async fn the_sdk_reports_presence_events_and_asks_again_after_a_reconnect() {
    presence_across_a_reconnect(Transport::WebSocket).await;
}

#[tokio::test]
async fn the_same_over_sse() {
    presence_across_a_reconnect(Transport::Sse).await;
}

async fn presence_across_a_reconnect(transport: Transport) {
    let redis = Redis::start();
    let a = Node::start(&["--redis-url", &redis.url(), "--drain-timeout", "2s"]).await;
    let b = Node::start(&["--redis-url", &redis.url()]).await;
    wait_ready(&a.ops_url()).await;
    wait_ready(&b.ops_url()).await;
    let mut cfg = config(&[a.ws_url(), b.ws_url()], "carol").transport(transport);
    cfg.presence = true;
    let (client, mut events) = Client::connect(cfg).await.unwrap();
    client.join("lobby").await.unwrap();
    let first = until(&mut events, "presence after join", |e| {
        matches!(e, Event::Presence(_))
    })
    .await;
    assert_eq!(first, Event::Presence(info("lobby", &["carol"])));

    let (mut bob, _) = Ws::open(&b.ws_url(), "bob").await;
    bob.join("lobby").await;
    let joined = until(&mut events, "presence_join", |e| {
        matches!(e, Event::PresenceJoin { .. })
    })
    .await;
    assert_eq!(
        joined,
        Event::PresenceJoin {
            room: "lobby".into(),
            user: "bob".into()
        }
    );
    assert_eq!(
        client.presence("lobby").await.unwrap(),
        info("lobby", &["bob", "carol"])
    );
    assert!(client.presence("bad room").await.is_err());

    // The node drains: the client resumes on the other node and asks for
    // the room's presence again.
    a.begin_stop();
    let again = until(&mut events, "presence after the reconnect", |e| {
        matches!(e, Event::Presence(_))
    })
    .await;
    let Event::Presence(p) = again else {
        unreachable!()
    };
    assert!(p.users.contains(&"bob".to_owned()), "{p:?}");
    client.close().await;
}
