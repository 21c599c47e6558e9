//! Reconnect backoff against real sockets: with every node down the client
//! waits growing, capped, randomized delays (recorded as `Reconnecting`
//! events, on tokio's paused clock so that no real time passes), connects
//! as soon as a node comes back on its address, starts again from the base
//! after a stable connection, and keeps backing off on a flapping one.
//!
//! The clock is paused only while no live connection needs real I/O (tokio
//! auto-advances a paused clock whenever the runtime waits, also for a
//! socket), and the whole test runs under a real-time watchdog.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::{until, PortNode};
use tokio::net::TcpListener;
use tokio::time::Instant;
use wsgate_client::{Backoff, Client, ClientConfig, Event};
use wsgate_testkit::{any_token, free_port};

const BASE: Duration = Duration::from_millis(100);
const CAP: Duration = Duration::from_secs(2);
const STABLE: Duration = Duration::from_secs(5);
/// Node flags: no heartbeat timer due while the clock is paused.
const QUIET: &[&str] = &["--heartbeat", "1h", "--pong-timeout", "1h"];

/// Run `body` on its own current-thread runtime, failing the test if it
/// takes longer than a minute of real time.
fn guarded<F: std::future::Future<Output = ()> + Send + 'static>(body: F) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(body);
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => worker.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: show its message.
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("test did not finish within 60 s")
        }
    }
}

/// The next event (no timer: the watchdog bounds the wait, and a timer
/// would make the paused clock jump).
async fn next(events: &mut wsgate_client::EventStream) -> Event {
    events.next().await.expect("event stream ended")
}

#[test]
fn backs_off_with_jitter_while_all_nodes_are_down_then_connects() {
    guarded(backs_off_then_connects());
}

async fn backs_off_then_connects() {
    tokio::time::pause();
    // Two addresses with nothing listening.
    let (port_a, port_b) = (free_port(), free_port());
    let urls = [
        format!("ws://127.0.0.1:{port_a}/ws"),
        format!("ws://127.0.0.1:{port_b}/ws"),
    ];
    let mut config = ClientConfig::new(urls.clone(), any_token("patient"));
    config.backoff = Backoff::new(BASE, CAP).with_stable_after(STABLE);
    config.rng_seed = Some(42);
    let (client, mut events) = Client::start(config).unwrap();

    // Record 14 failed attempts and the delays before the next ones.
    const ATTEMPTS: usize = 14;
    let started = Instant::now();
    let mut delays = Vec::new();
    let mut failed_urls = Vec::new();
    while delays.len() < ATTEMPTS {
        match next(&mut events).await {
            Event::ConnectFailed { url, status, .. } => {
                assert_eq!(status, None, "nothing listens: no HTTP status");
                failed_urls.push(url);
            }
            Event::Reconnecting { attempt, delay } => {
                assert_eq!(attempt as usize, delays.len() + 1, "attempts count up");
                delays.push(delay);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Round-robin over the URLs.
    assert_eq!(
        failed_urls[..4],
        [&*urls[0], &*urls[1], &*urls[0], &*urls[1]]
    );

    // Each delay is within its full-jitter window [0, min(cap, base * 2^n)].
    for (n, d) in delays.iter().enumerate() {
        let ceiling = CAP.min(BASE * 2u32.pow(n as u32));
        assert!(*d <= ceiling, "attempt {}: {d:?} above {ceiling:?}", n + 1);
    }
    // Capped: never above the cap, and the late windows are the cap.
    assert!(delays.iter().all(|d| *d <= CAP));
    // Growing: the late delays are far above the first window.
    let early_max = delays[..3].iter().max().unwrap();
    let late_max = delays[ATTEMPTS - 5..].iter().max().unwrap();
    assert!(*early_max <= BASE * 4);
    assert!(
        *late_max > BASE * 4,
        "late delays {:?} did not grow past the early window",
        &delays[ATTEMPTS - 5..]
    );
    // Randomized: the delays in the capped region differ from each other.
    let capped: std::collections::HashSet<_> = delays[6..].iter().collect();
    assert!(capped.len() >= 6, "jitter missing: {delays:?}");
    // And the client really waited them (virtual time, no real sleeping).
    let waited: Duration = delays[..ATTEMPTS - 1].iter().sum();
    assert!(started.elapsed() >= waited);

    // A node comes back on the first address: the client connects to it
    // (real time again: the pending delay is at most the cap).
    tokio::time::resume();
    let listener = TcpListener::bind(("127.0.0.1", port_a)).await.unwrap();
    let node = PortNode::start(listener, "back", QUIET).await;
    let connected = until(&mut events, "connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await;
    match connected {
        Event::Connected { node, url, .. } => {
            assert_eq!(node, "back");
            assert_eq!(url, urls[0]);
        }
        _ => unreachable!(),
    }
    client.join("lobby").await.unwrap();
    assert_eq!(client.publish("lobby", "hi").await.unwrap(), 1);

    // A stable connection resets the schedule: the next drop starts over.
    // The connection has no timer due within the stable period (the node
    // pings hourly), so the paused clock can skip it.
    tokio::time::pause();
    tokio::time::sleep(STABLE + Duration::from_secs(1)).await;
    tokio::time::resume();
    node.stop().await;
    let dropped = until(&mut events, "disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    assert!(matches!(
        dropped,
        Event::Disconnected {
            code: Some(1001),
            ..
        }
    ));
    match until(&mut events, "reconnecting", |e| {
        matches!(e, Event::Reconnecting { .. })
    })
    .await
    {
        Event::Reconnecting { attempt, delay } => {
            assert_eq!(attempt, 1, "reset after a stable connection");
            assert!(delay <= BASE);
        }
        _ => unreachable!(),
    }
    client.close().await;
}

#[tokio::test]
async fn a_flapping_connection_keeps_backing_off() {
    // A node that accepts and at once drains every connection (1001): each
    // connection lasts less than the stable period, so the attempt count
    // keeps growing instead of starting over.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut config = ClientConfig::new([url], any_token("flappy"));
    config.backoff = Backoff::new(BASE, CAP).with_stable_after(STABLE);
    config.rng_seed = Some(1);
    let node = PortNode::start(listener, "flap", QUIET).await;
    let (client, mut events) = Client::connect(config).await.unwrap();
    node.stop().await;
    let mut attempts = Vec::new();
    // Bring a node up and down on the same port a few times; each
    // connection is short.
    for _ in 0..3 {
        match until(&mut events, "reconnecting", |e| {
            matches!(e, Event::Reconnecting { .. })
        })
        .await
        {
            Event::Reconnecting { attempt, .. } => attempts.push(attempt),
            _ => unreachable!(),
        }
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let node = PortNode::start(listener, "flap", &[]).await;
        until(&mut events, "connected", |e| {
            matches!(e, Event::Connected { .. })
        })
        .await;
        node.stop().await;
    }
    // Each Reconnecting after a short connection continues the count.
    for pair in attempts.windows(2) {
        assert!(
            pair[1] > pair[0],
            "attempts {attempts:?} did not keep growing"
        );
    }
    client.close().await;
}
