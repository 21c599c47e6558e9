//! `wsgate-bench`: the load tool for wsgate.
//!
//! It speaks the client protocol (PROTOCOL.md) directly over
//! tokio-tungstenite, one task per connection, and measures what the issue
//! tracker's benchmark table asks for: handshakes per second, server memory
//! per idle connection, fan-out deliveries per second with end-to-end
//! latency and seq checking, the chat shape, fail-over resume time, the
//! highest sustained fan-out rate, and a soak that checks every acknowledged
//! message under churn and faults. Every figure comes with the tool's own CPU
//! time, so a run where the tool was the bottleneck shows it.
//!
//! The receive path is kept cheap: a message frame is never fully parsed
//! ([`wsgate_protocol::peek_message`] reads room and seq, [`net::peek_sent_ns`]
//! the send timestamp), latencies are buffered per connection and merged into
//! sharded histograms, and counters are flushed in batches.
//!
//! # Layout
//! - [`cli`]: command line, bounds and validation (loopback-only targets).
//! - [`clock`]: the process-wide monotonic clock the timestamps use.
//! - [`stats`]: latency histograms and their summary, the [`stats::SeqTracker`].
//! - [`pace`]: rate pacing math for publishers.
//! - [`token`]: HS256 token minting, or a given token.
//! - [`net`]: connecting (source addresses, timeouts), frames, hot-path peeks.
//! - [`wire`]: the client socket: bytes on the wire, permessage-deflate inflate.
//! - [`sse`]: the SSE transport's client side (`GET /sse`, `POST /sse/{conn}`).
//! - [`probe`]: server figures from `/metrics` and `/proc`, the tool's own CPU.
//! - [`report`]: the human summary, the JSON line and progress bars.
//! - [`scenario`]: the seven scenarios and the per-connection member task.
//! - [`floor`]: the `floor-server`, a minimal sender the fan-out's CPU is compared to.

pub mod cli;
pub mod clock;
pub mod floor;
pub mod net;
pub mod pace;
pub mod probe;
pub mod report;
pub mod scenario;
pub mod sse;
pub mod stats;
pub mod token;
pub mod wire;
