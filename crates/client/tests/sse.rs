//! The client over the Server-Sent Events transport (protocol v1.1 section
//! 7) against real nodes: join, publish, ack and messages between an SSE and
//! a WebSocket client; `Transport::Auto` falling back when the upgrade is
//! refused (as a blocking proxy would); a drain (the `close` event, 1001)
//! and a SIGKILL of the node (a second node, Redis), after which the client
//! resumes over SSE elsewhere with every seq once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::json;
use support::{
    collect_until, config, connected_over, drained_node_closes_1001_and_the_client_resumes,
    node_killed_mid_stream, seqs, until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsgate_client::{Client, ClientConfig, Event, Transport};
use wsgate_testkit::{Node, Ws, WAIT};

fn sse(urls: &[String], sub: &str) -> ClientConfig {
    config(urls, sub).transport(Transport::Sse)
}

#[tokio::test]
async fn an_sse_client_joins_publishes_and_chats_with_a_websocket_client() {
    let node = Node::start(&[]).await;
    let (alice, mut events) = Client::connect(sse(&[node.ws_url()], "alice"))
        .await
        .unwrap();
    assert_eq!(connected_over(&mut events).await.0, Transport::Sse);
    let joined = alice.join("lobby").await.unwrap();
    assert_eq!(joined.seq, 0);

    // Own publishes are acked with their seq and come back once.
    for i in 1..=3u64 {
        assert_eq!(alice.publish("lobby", json!({ "n": i })).await.unwrap(), i);
    }
    // A WebSocket user in the same room sees them and answers.
    let (mut bob, _) = Ws::open(&node.ws_url(), "bob").await;
    bob.join("lobby").await;
    assert_eq!(bob.publish("lobby", json!("hi alice")).await["seq"], 4);
    let got = collect_until(
        &mut events,
        "four messages",
        |e| matches!(e, Event::Message(m) if m.seq == 4),
    )
    .await;
    assert_eq!(seqs(&got, "lobby"), [1, 2, 3, 4]);
    match got.last() {
        Some(Event::Message(m)) => {
            assert_eq!(m.from, "bob");
            assert_eq!(m.data.get(), r#""hi alice""#);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(alice.publish("lobby", json!("hi bob")).await.unwrap(), 5);
    let to_bob = loop {
        let v = bob.json().await;
        if v["type"] == "message" && v["seq"] == 5 {
            break v;
        }
    };
    assert_eq!(to_bob["from"], "alice");

    // Errors come back on the stream as for a WebSocket client.
    let refused = alice.join("bad room").await.unwrap_err();
    assert!(
        matches!(refused, wsgate_client::ClientError::InvalidRoom(_)),
        "{refused:?}"
    );
    alice.leave("lobby").await.unwrap();
    alice.close().await;
}

#[tokio::test]
async fn an_http_sse_url_selects_sse_whatever_the_transport_says() {
    let node = Node::start(&[]).await;
    let url = format!("{}/sse", node.http_url());
    let (client, mut events) = Client::connect(config(std::slice::from_ref(&url), "carol"))
        .await
        .unwrap();
    let e = until(&mut events, "connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await;
    assert!(
        matches!(&e, Event::Connected { transport: Transport::Sse, url: at, compressed: false, .. } if *at == url),
        "{e:?}"
    );
    client.join("x").await.unwrap();
    assert_eq!(client.publish("x", json!(1)).await.unwrap(), 1);
    client.close().await;
}

/// A proxy in front of `target` that refuses every WebSocket upgrade with
/// 403 (as a proxy that blocks WebSockets does) and passes everything else
/// through unchanged; its port.
async fn blocking_proxy(target: std::net::SocketAddr) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = vec![0u8; 8192];
                let n = match tokio::time::timeout(WAIT, client.read(&mut head)).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => return,
                };
                let text = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
                if text.contains("\r\nupgrade: websocket") {
                    let _ = client
                        .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut server) = TcpStream::connect(target).await else {
                    return;
                };
                if server.write_all(&head[..n]).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn auto_falls_back_to_sse_when_the_upgrade_is_refused_and_uses_websocket_where_it_works() {
    let node = Node::start(&[]).await;
    let port = blocking_proxy(node.addr).await;
    let blocked = format!("ws://127.0.0.1:{port}/ws");
    let auto = config(&[blocked], "dave").transport(Transport::Auto);
    let (client, mut events) = Client::connect(auto).await.unwrap();
    assert_eq!(connected_over(&mut events).await.0, Transport::Sse);
    client.join("a").await.unwrap();
    assert_eq!(
        client
            .publish("a", json!("through the proxy"))
            .await
            .unwrap(),
        1
    );
    client.close().await;

    // Straight to the node, the WebSocket opens: no fallback.
    let direct = config(&[node.ws_url()], "dave").transport(Transport::Auto);
    let (client, mut events) = Client::connect(direct).await.unwrap();
    assert_eq!(connected_over(&mut events).await.0, Transport::WebSocket);
    client.close().await;

    // Forced WebSocket through the blocking proxy: refused, with the status.
    let ws_only = config(&[format!("ws://127.0.0.1:{port}/ws")], "dave");
    match Client::connect(ws_only).await {
        Err(wsgate_client::ClientError::Connect { status, .. }) => assert_eq!(status, Some(403)),
        other => panic!("expected a refused upgrade, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_drained_node_ends_the_stream_with_1001_and_the_client_resumes_over_sse_elsewhere() {
    // The stream's last event is `close` 1001: reported as that code.
    drained_node_closes_1001_and_the_client_resumes(Transport::Sse).await;
}

#[tokio::test]
async fn node_killed_mid_stream_the_sse_client_resumes_on_another_node_with_every_seq_once() {
    // Subscriber and publisher over SSE; node-a SIGKILLed mid-stream.
    let seen = node_killed_mid_stream(Transport::Sse, 300).await;
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Disconnected { code: None, .. })),
        "a kill ends the stream without a close event: {seen:?}"
    );
}
