//! What a session needs from a transport.
//!
//! The session ([`crate::session`]) is the protocol state machine: it
//! answers client frames, runs the heartbeat, token expiry and closing
//! linger. A transport carries it: it yields client events and writes the
//! connection's outbound queue ([`crate::outbound::ConnHandle`], through
//! which the session and the rooms send ready frames and pings) to the
//! client. The WebSocket transport is [`crate::ws::WsTransport`]; the SSE
//! fallback (PROTOCOL.md section 7) fits the same shape: its client frames
//! arrive from POSTs as `Text`, it reports no `Activity` for pings it
//! cannot receive, and its `close` ends the event stream
//! ([`crate::sse::SseTransport`]).

use std::future::Future;

use axum::extract::ws::Utf8Bytes;

use crate::outbound::CloseReason;

/// Something the client did.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A text message: one protocol frame.
    Text(Utf8Bytes),
    /// A binary message (not supported by the protocol: closed with 1003).
    Binary,
    /// A sign of life without a message (a Ping or Pong).
    Activity,
    /// The client closed the connection (its Close was answered).
    Closed,
    /// The client broke the transport's rules: close with this code.
    Violation(CloseReason),
    /// The connection is gone (reset, end of stream, write error).
    Gone,
}

/// A connection's transport, driven by its session.
pub trait Transport: Send {
    /// The transport's name: the `transport` label of the connection
    /// metrics, and, but for the WebSocket, `welcome.transport`.
    const NAME: &'static str;

    /// Whether the client answers the heartbeat (a WebSocket Pong). When it
    /// cannot (an EventSource), a silent client is not closed for silence.
    const ANSWERS_PINGS: bool;

    /// The next client event. Meanwhile the transport writes what the
    /// connection's queue holds. Cancel-safe: no event is lost when the
    /// future is dropped.
    fn next_event(&mut self) -> impl Future<Output = ClientEvent> + Send;

    /// Start the server's closing: the frames still queued are dropped and
    /// the close (code and reason) is sent, waiting at most a moment for
    /// the client to take it. The session then waits for the client's
    /// reply with [`next_event`](Self::next_event).
    fn close(&mut self, reason: CloseReason) -> impl Future<Output = ()> + Send;

    /// The session is over: write what is still queued (the echo of the
    /// client's Close), waiting at most a moment, and release the
    /// connection.
    fn finish(self) -> impl Future<Output = ()> + Send;
}
