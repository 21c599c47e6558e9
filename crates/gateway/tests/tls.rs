//! `wss://`: with `--tls-cert`/`--tls-key` the public listener speaks TLS
//! (WebSocket and HTTP API); the operations listener stays plain HTTP.
//!
//! The certificate is made at test time with the `openssl` CLI; the test is
//! skipped, saying so, only when `openssl` is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use wsgate_testkit::{any_token, http_get, self_signed_cert as self_signed, Node, WAIT};

/// A TLS client trusting only `cert`.
async fn tls_connect(addr: std::net::SocketAddr, cert: &Path) -> TlsStream<TcpStream> {
    let pem = std::fs::read(cert).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake")
}

type Wss = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

async fn send(ws: &mut Wss, v: serde_json::Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

async fn next_json(ws: &mut Wss) -> serde_json::Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no frame within the wait")
            .expect("stream ended")
            .unwrap();
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn wss_and_https_api_work_with_the_configured_certificate() {
    let Some((dir, cert, key)) = self_signed() else {
        return;
    };
    let node = Node::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .await;

    // A WebSocket over TLS, through the whole protocol path.
    let tls = tls_connect(node.addr, &cert).await;
    let mut req = format!("wss://localhost:{}/ws", node.addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", any_token("alice"))).unwrap(),
    );
    let (stream, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tls))
        .await
        .unwrap()
        .expect("wss upgrade");
    assert_eq!(resp.status().as_u16(), 101);
    let mut ws = stream;
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    send(&mut ws, json!({"type":"join","room":"secure","id":1})).await;
    assert_eq!(next_json(&mut ws).await["type"], "joined");
    send(
        &mut ws,
        json!({"type":"publish","room":"secure","data":{"over":"tls"},"id":2}),
    )
    .await;
    let m = next_json(&mut ws).await;
    assert_eq!(
        (&m["type"], &m["data"]),
        (&json!("message"), &json!({"over": "tls"}))
    );
    assert_eq!(next_json(&mut ws).await["type"], "ack");

    // The HTTP API over TLS.
    let mut tls = tls_connect(node.addr, &cert).await;
    let body = b"{\"via\":\"https\"}";
    let req = format!(
        "POST /api/rooms/secure/messages HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        any_token("svc"),
        body.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut raw))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let m = next_json(&mut ws).await;
    assert_eq!(
        (&m["from"], &m["data"]),
        (&json!("svc"), &json!({"via": "https"}))
    );

    // Plain ws:// to the TLS port does not upgrade.
    let plain = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{}/ws", node.addr)),
    )
    .await
    .expect("plain connect attempt timed out");
    assert!(
        plain.is_err(),
        "a plaintext upgrade succeeded on the TLS port"
    );

    // The ops listener stays plain HTTP.
    let (status, _, _) = http_get(&format!("{}/health", node.ops_url()))
        .await
        .unwrap();
    assert_eq!(status, 200);
    drop(ws);
    node.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
