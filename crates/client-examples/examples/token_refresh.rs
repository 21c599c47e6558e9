//! Tokens from a callback: the client asks for one at connect, refreshes the
//! open connection before `exp` (a `refresh` frame), and after a 4001 close
//! gets a new one before reconnecting. Here the "auth service" is
//! `wsgate token` run as a command; in an application it would be an HTTP
//! call to your identity provider.
//!
//! ```text
//! wsgate serve --dev --jwt-secret devsecret --jwt-leeway 0s &
//! cargo run -p wsgate-client-examples --example token_refresh -- ws://127.0.0.1:8080/ws devsecret
//! ```

// An example talks to its user on stdout.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use wsgate_client::{BoxError, Client, ClientConfig, Event, TokenSource};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws".into());
    let secret = args.next().unwrap_or_else(|| "devsecret".into());

    let source = TokenSource::callback(move || {
        let secret = secret.clone();
        async move {
            // Short-lived tokens (20 s) to watch refreshes happen.
            let out = tokio::process::Command::new("wsgate")
                .args(["token", "--jwt-secret", &secret, "--sub", "carol"])
                .args(["--rooms", "*", "--publish", "*", "--ttl", "20s"])
                .output()
                .await?;
            if !out.status.success() {
                return Err::<String, BoxError>("wsgate token failed".into());
            }
            Ok(String::from_utf8(out.stdout)?.trim().to_owned())
        }
    });
    let mut config = ClientConfig::new([url], source);
    config.refresh_margin = Some(Duration::from_secs(5));
    let (client, mut events) = Client::connect(config).await?;
    client.join("lobby").await?;
    println!("connected; tokens live 20 s and are refreshed 5 s before they expire");
    while let Some(event) = events.next().await {
        match event {
            Event::TokenRefreshed { exp } => println!("refreshed, now valid until {exp}"),
            Event::TokenRefreshFailed { reason } => println!("refresh failed: {reason}"),
            Event::Message(m) => println!("#{} {}: {}", m.seq, m.from, m.data),
            other => println!("{other:?}"),
        }
    }
    Ok(())
}
