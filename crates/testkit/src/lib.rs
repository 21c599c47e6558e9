//! Test kit shared by the workspace's integration tests: real gateway nodes
//! (in-process on `127.0.0.1:0`, or the built binary as a child process), a
//! private `redis-server` on a free port, tokens signed with the test secret,
//! a raw WebSocket test client, a small HTTP/1.1 client and a Prometheus text
//! reader. Everything talks to loopback only, and every wait is bounded.
//!
//! # Layout
//! - `node`: gateway nodes, in-process ([`Node`]) or the binary ([`BinNode`]).
//! - `redis_server`: a private [`Redis`] and a private [`RedisCluster`].
//! - `ws`: the protocol test client ([`Ws`]); `raw`: a hand-made client and
//!   frame codec ([`RawWs`]) for what a real client refuses to send.
//! - `sse`: the SSE fallback's test client ([`Sse`]): the event stream
//!   read from raw TCP, POSTs with the HTTP client.
//! - `streams`: what room members receive, and the failover tests' checks.
//! - `http`: a minimal HTTP/1.1 client; `prometheus`: the `/metrics` reader.
//! - `proxy`: a TCP forwarder to cut a link; `tls`: a self-signed certificate.
//! - `tokens`: the test secret and tokens; `wait`: bounded polling.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity,
    missing_docs
)]

mod http;
mod node;
mod prometheus;
mod proxy;
mod raw;
mod redis_server;
mod sse;
mod streams;
mod tls;
mod tokens;
mod wait;
mod ws;

pub use http::{header, http, http_get, HttpResponse};
pub use node::{free_port, wsgate_bin, BinNode, Node};
pub use prometheus::{metrics, Metrics};
pub use proxy::TcpProxy;
pub use raw::{opcode, RawWs};
pub use redis_server::{Redis, RedisCluster};
pub use sse::{Sse, SseItem};
pub use streams::{assert_failover_stream, epoch_stream, messages, publish_acked};
pub use tls::self_signed_cert;
pub use tokens::{any_token, claims, now_secs, sign, sign_hs256, token, unsigned, SECRET};
pub use wait::{eventually, eventually_for, WAIT};
pub use ws::{Ended, Refused, Ws};
