//! Keep a room's position across restarts of the program: store the last
//! seq and epoch when leaving, and join from them next time. The messages
//! missed in between are replayed (once each), or a gap is reported when
//! the gateway's history no longer reaches back that far.
//!
//! ```text
//! export WSGATE_TOKEN=$(wsgate token --jwt-secret devsecret --sub bob --rooms '*' --publish '*')
//! cargo run -p wsgate-client-examples --example resume -- ws://127.0.0.1:8080/ws lobby /tmp/lobby.pos
//! # publish a few messages elsewhere, then run it again: it prints only those.
//! ```

// An example talks to its user on stdout.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use wsgate_client::{Client, ClientConfig, Event};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws".into());
    let room = args.next().unwrap_or_else(|| "lobby".into());
    let file = args.next().unwrap_or_else(|| "resume.pos".into());
    let token = std::env::var("WSGATE_TOKEN")?;

    let (client, mut events) = Client::connect(ClientConfig::new([url], token)).await?;
    // "SEQ EPOCH" from the last run, if any.
    let stored = std::fs::read_to_string(&file).ok().and_then(|s| {
        let (seq, epoch) = s.trim().split_once(' ')?;
        Some((seq.parse::<u64>().ok()?, epoch.to_owned()))
    });
    let info = match &stored {
        Some((seq, epoch)) => client.join_from(&room, *seq, Some(epoch)).await?,
        None => client.join(&room).await?,
    };
    println!(
        "joined {room}: now at seq {}, replay complete: {:?}",
        info.seq, info.recovered
    );

    // Print what arrives for a few quiet seconds, then save the position.
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(3), events.next()).await {
        match event {
            Event::Message(m) => println!("#{} {}: {}", m.seq, m.from, m.data),
            Event::Gap(gap) => println!("gap: {gap:?} (reload the room from your own store)"),
            _ => {}
        }
    }
    if let Some((seq, epoch)) = client.position(&room).await {
        std::fs::write(&file, format!("{seq} {epoch}\n"))?;
        println!("saved position {seq} in {file}");
    }
    client.close().await;
    Ok(())
}
