//! The wsgate gateway: terminates WebSocket connections, authenticates them
//! with JWTs, serves rooms, and relays room messages between nodes through a
//! broker (Redis, or in-process for a single node).
//!
//! The binary (`src/main.rs`) parses flags, loads the keys and certificates
//! ([`Resources::load`]), sets up logging, binds the two listeners and calls
//! [`run`]; tests call [`run`] the same way.
//!
//! # Layout
//! - [`config`]: flags, environment and the validated [`Config`].
//! - [`auth`]: JWT verification (a static key, or a JWKS kept fresh), room grants, token minting.
//! - [`http`]: the public router: WebSocket upgrade checks, HTTP publish API, dev pages.
//! - [`api`]: the server API (`--api-key`): disconnect and revoke users, room history.
//! - [`server`]: wiring: loads a node's keys and certificates ([`Resources`]), builds the node from its [`Config`] and runs it ([`run`]).
//! - [`state`]: the state a node's parts share: [`state::App`], connection slots, the connection registry.
//! - [`shutdown`]: signals, background tasks and the paced drain.
//! - [`listener`]: accept loop, HTTP/1 connections.
//! - [`tls`]: loading the public listener's certificate and key.
//! - [`session`]: one connection's protocol state machine, over a [`transport::Transport`].
//! - [`transport`]: what a session needs from a transport.
//! - [`sse`]: the fallback transport: Server-Sent Events plus POST, handed between nodes.
//! - [`ws`]: the WebSocket transport: handshake answer, frame codec, socket I/O.
//! - [`deflate`]: permessage-deflate: negotiation, compress once, bounded inflate.
//! - [`outbound`]: a connection's outbound frames: direct writes, bounded queue.
//! - [`limits`]: rate limits: token buckets, per-user publish buckets.
//! - [`rooms`]: room membership (join, leave, subscriptions) and fan-out.
//! - [`presence`]: who is in a room, across the cluster (leases in Redis).
//! - [`broker`]: the broker trait, in-process and Redis implementations.
//! - [`ops`]: `/health`, `/ready`, `/metrics` on the operations listener.
//! - [`metrics`]: Prometheus metrics.
//! - [`logging`]: tracing set-up.

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod deflate;
pub mod http;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod outbound;
pub mod presence;
pub mod rooms;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod sse;
pub mod state;
pub mod tls;
pub mod transport;
pub mod ws;

pub use config::Config;
pub use server::{run, Listeners, Resources, RunError};
pub use state::{App, Conns, Slot};
