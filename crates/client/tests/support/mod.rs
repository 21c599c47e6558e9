//! Helpers shared by the client's integration tests: client configurations
//! for test nodes, bounded waits on the event stream, and a node on a chosen
//! port (to bring "the same node" back after it was down).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::time::Duration;

use tokio::net::TcpListener;
use wsgate_client::{Backoff, ClientConfig, Event, EventStream};
use wsgate_testkit::{any_token, eventually, http_get, Node, WAIT};

/// A config for `urls` with a token that may do everything, a fast backoff
/// and a fixed jitter seed.
pub fn config(urls: &[String], sub: &str) -> ClientConfig {
    let mut c = ClientConfig::new(urls.iter().cloned(), any_token(sub));
    c.backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    c.rng_seed = Some(7);
    c
}

/// The next event matching `pred`, skipping others; panics after [`WAIT`].
pub async fn until<F>(events: &mut EventStream, what: &str, mut pred: F) -> Event
where
    F: FnMut(&Event) -> bool,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Every event until (and including) the first matching `pred`.
pub async fn collect_until<F>(events: &mut EventStream, what: &str, mut pred: F) -> Vec<Event>
where
    F: FnMut(&Event) -> bool,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(e)) => {
                let done = pred(&e);
                seen.push(e);
                if done {
                    return seen;
                }
            }
            Ok(None) => panic!("event stream ended while waiting for {what}: {seen:#?}"),
            Err(_) => panic!("timed out waiting for {what}: {seen:#?}"),
        }
    }
}

/// The seqs of the `Message` events of `room` in `events`.
pub fn seqs(events: &[Event], room: &str) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if m.room == room => Some(m.seq),
            _ => None,
        })
        .collect()
}

/// A gateway node served in this process from a listener the test bound
/// itself (so it can come back on the same port): the test kit's node.
pub struct PortNode;

impl PortNode {
    /// Serve on `public` with the test secret, `node_id` and `extra` flags.
    pub async fn start(public: TcpListener, node_id: &str, extra: &[&str]) -> Node {
        let mut args = vec!["--node-id", node_id];
        args.extend_from_slice(extra);
        Node::start_on(public, &args).await
    }
}

/// Wait until a node's `/ready` answers 200 (its broker is up).
pub async fn wait_ready(ops_url: &str) {
    let url = format!("{ops_url}/ready");
    eventually("node ready", || async {
        matches!(http_get(&url).await, Ok((200, _, _))).then_some(())
    })
    .await;
}
