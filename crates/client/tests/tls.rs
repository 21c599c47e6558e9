//! `wss://`: the client (and `wsgate client --ca-cert`) against a node
//! serving TLS with a self-signed certificate made at test time by the
//! `openssl` CLI; the test is skipped, saying so, only when `openssl` is not
//! installed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use clap::Parser;
use support::until;
use wsgate_client::cli::ClientArgs;
use wsgate_client::{Client, ClientConfig, ClientError, Event};
use wsgate_testkit::{any_token, self_signed_cert as self_signed, Node};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ClientArgs,
}

#[tokio::test]
async fn wss_with_a_private_root_certificate() {
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
    let url = format!("wss://127.0.0.1:{}/ws", node.addr.port());
    let token = any_token("secure");

    // The root given the way `wsgate client --ca-cert` does.
    let config = Cli::try_parse_from([
        "client",
        "--url",
        &url,
        "--token",
        &token,
        "--ca-cert",
        cert.to_str().unwrap(),
    ])
    .unwrap()
    .args
    .config()
    .unwrap();
    let (client, mut events) = Client::connect(config).await.unwrap();
    until(&mut events, "connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await;
    client.join("tls").await.unwrap();
    assert_eq!(client.publish("tls", "encrypted").await.unwrap(), 1);
    match until(&mut events, "message", |e| matches!(e, Event::Message(_))).await {
        Event::Message(m) => assert_eq!(m.data.get(), r#""encrypted""#),
        _ => unreachable!(),
    }
    client.close().await;

    // Without that root the certificate is not trusted.
    let err = Client::connect(ClientConfig::new([url], token))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Connect { status: None, .. }),
        "{err:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
