//! Async Rust client for the wsgate gateway (protocol version 1), and the
//! `wsgate client` command line tool built on it (feature `cli`).
//!
//! A [`Client`] keeps one logical connection to a cluster of gateway nodes:
//! it joins rooms, publishes with acks, and on any drop (close 1001, 1006 or
//! a network error, 1008, 1011, 1013, a silent connection past
//! `heartbeat_ms` plus a margin) reconnects with capped exponential backoff
//! and full jitter, re-joins every room with `since` and `epoch`, delivers
//! the replayed messages, never delivers a seq twice, and reports every gap
//! as an [`Event::Gap`] instead of hiding it. Every publish carries an
//! idempotency key: one whose `ack` a drop (or a `timeout`) swallowed is
//! sent again with the same key after the reconnect, so it is published once
//! and the caller gets its seq (see [`Client::publish`]). A 4001 close (token expired)
//! gets a new token from the [`TokenSource`] before reconnecting, and with a
//! callback source the token is refreshed on the open connection before it
//! expires. Where the WebSocket upgrade is blocked, the same client runs
//! over Server-Sent Events plus POST ([`Transport::Sse`], or
//! [`Transport::Auto`] to fall back by itself), with the same guarantees.
//!
//! ```no_run
//! use wsgate_client::{Client, ClientConfig, Event};
//!
//! # async fn demo() -> Result<(), wsgate_client::ClientError> {
//! let config = ClientConfig::new(["ws://127.0.0.1:8080/ws"], std::env::var("TOKEN").unwrap_or_default());
//! let (client, mut events) = Client::connect(config).await?;
//! client.join("lobby").await?;
//! let seq = client.publish("lobby", serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = events.next().await {
//!     match event {
//!         Event::Message(m) => println!("{} #{} {}: {}", m.room, m.seq, m.from, m.data),
//!         Event::Gap(gap) => eprintln!("lost messages in {}: reload it", gap.room),
//!         other => eprintln!("{other:?}"),
//!     }
//! #   let _ = seq; break;
//! }
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`Client`]: the handle (`join`, `leave`, `publish`, `presence`, `close`).
//! - [`ClientConfig`], [`TokenSource`], [`Transport`]: URLs, token, timings,
//!   WebSocket or the Server-Sent Events fallback.
//! - [`Event`], [`EventStream`], [`Gap`], [`JoinInfo`], [`PresenceInfo`]: what the application hears.
//! - [`Backoff`]: the reconnect schedule, pure and testable.
//! - [`ClientError`]: typed errors.
//! - `cli` (feature `cli`): the `wsgate client` command line tool.

mod backoff;
#[cfg(feature = "cli")]
pub mod cli;
mod client;
mod config;
mod driver;
mod error;
mod event;
pub mod inflate;
mod jwt;
mod tracker;
mod wire;

pub use backoff::Backoff;
pub use client::Client;
pub use config::{ClientConfig, TokenCallback, TokenFuture, TokenSource, Transport};
pub use error::{BoxError, ClientError};
pub use event::{Event, EventStream, Gap, GapReason, JoinInfo, PresenceInfo};
pub use jwt::jwt_exp;
pub use wsgate_protocol::{ErrorCode, Message};

#[cfg(feature = "tls")]
pub use rustls;
