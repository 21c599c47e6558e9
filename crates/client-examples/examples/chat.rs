//! A terminal chat on one room: prints every event, publishes each line
//! typed on stdin, and shows reconnects, resumes and gaps as they happen.
//!
//! ```text
//! wsgate serve --dev --jwt-secret devsecret &
//! export WSGATE_TOKEN=$(wsgate token --jwt-secret devsecret --sub alice --rooms '*' --publish '*')
//! cargo run -p wsgate-client-examples --example chat -- ws://127.0.0.1:8080/ws lobby
//! ```
//!
//! Several URLs (comma-separated) give fail-over: stop one node and the chat
//! carries on through another one, without losing or repeating a message.

// An example talks to its user on stdout.
#![allow(clippy::print_stdout)]

use tokio::io::AsyncBufReadExt;
use wsgate_client::{Client, ClientConfig, Event, GapReason};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let urls = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws".into());
    let room = args.next().unwrap_or_else(|| "lobby".into());
    let token = std::env::var("WSGATE_TOKEN")
        .map_err(|_| anyhow::anyhow!("set WSGATE_TOKEN (see `wsgate token --help`)"))?;

    let config = ClientConfig::new(urls.split(','), token);
    let (client, mut events) = Client::connect(config).await?;
    let info = client.join(&room).await?;
    println!("* joined {room} at seq {} (epoch {})", info.seq, info.epoch);

    let publisher = client.clone();
    let typing_room = room.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match publisher
                .publish(&typing_room, serde_json::json!({ "text": line }))
                .await
            {
                Ok(seq) => println!("* sent as #{seq}"),
                Err(e) => println!("* not sent: {e}"),
            }
        }
    });

    while let Some(event) = events.next().await {
        match event {
            Event::Message(m) => {
                let text = serde_json::from_str::<serde_json::Value>(m.data.get())
                    .ok()
                    .and_then(|v| v["text"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| m.data.get().to_owned());
                println!("#{} {}: {text}", m.seq, m.from);
            }
            Event::Connected { node, .. } => println!("* connected to {node}"),
            Event::Disconnected { code, reason } => {
                println!("* disconnected ({code:?}: {reason})")
            }
            Event::Reconnecting { attempt, delay } => {
                println!("* reconnecting in {delay:?} (attempt {attempt})")
            }
            Event::Resumed { room, recovered } => {
                println!("* resumed {room}, history complete: {recovered}")
            }
            Event::Gap(gap) => match gap.reason {
                GapReason::SeqJump => println!(
                    "* messages {}..{} of {} were lost",
                    gap.expected_after + 1,
                    gap.got,
                    gap.room
                ),
                _ => println!(
                    "* {} lost its history after #{} ({:?}): reload it",
                    gap.room, gap.expected_after, gap.reason
                ),
            },
            other => println!("* {other:?}"),
        }
    }
    Ok(())
}
