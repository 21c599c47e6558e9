//! One connection's outbound queue, shared by everything that sends to it.
//!
//! Rooms, the session and the broker relay push frames with
//! [`ConnHandle::send`], which never blocks and never waits for the client:
//! the queue is bounded in bytes (`--max-outbound-bytes`). A frame is always
//! accepted into an empty queue; a frame that would overflow a non-empty one
//! closes the connection with 1008 ("slow consumer") instead, so that nobody
//! else waits for a client that does not read. The connection's writer task
//! drains the queue in batches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// An item for the writer task.
#[derive(Debug)]
pub enum Outgoing {
    /// A text frame.
    Text(Utf8Bytes),
    /// A WebSocket Ping (heartbeat).
    Ping,
}

/// Why and how the server closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code.
    pub code: u16,
    /// Close reason text.
    pub reason: &'static str,
}

/// The sending side of one connection.
#[derive(Debug)]
pub struct ConnHandle {
    id: Box<str>,
    tx: mpsc::UnboundedSender<Outgoing>,
    queued: AtomicUsize,
    max: usize,
    close: OnceLock<CloseReason>,
    closing: CancellationToken,
    metrics: Arc<Metrics>,
}

impl ConnHandle {
    /// A handle and the receiver its writer task drains.
    pub fn new(
        id: impl Into<Box<str>>,
        max_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> (Arc<ConnHandle>, mpsc::UnboundedReceiver<Outgoing>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = ConnHandle {
            id: id.into(),
            tx,
            queued: AtomicUsize::new(0),
            max: max_bytes,
            close: OnceLock::new(),
            closing: CancellationToken::new(),
            metrics,
        };
        (Arc::new(handle), rx)
    }

    /// The connection id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Queue a text frame. Returns false when the connection is closing or
    /// the frame overflowed the queue (which starts a 1008 close).
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        if self.closing.is_cancelled() {
            return false;
        }
        let len = frame.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before != 0 && before + len > self.max {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            if self.close(CloseReason {
                code: wsgate_protocol::close::POLICY,
                reason: "slow consumer",
            }) {
                self.metrics.slow_consumer_closes.inc();
            }
            return false;
        }
        if self.tx.send(Outgoing::Text(frame)).is_err() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Queue a WebSocket Ping.
    pub fn ping(&self) {
        let _ = self.tx.send(Outgoing::Ping);
    }

    /// The writer wrote `len` bytes of queued frames to the socket.
    pub fn written(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::AcqRel);
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Start closing with this code. Only the first reason counts; returns
    /// whether this call set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.close.set(reason).is_ok();
        self.closing.cancel();
        first
    }

    /// Why the server is closing this connection, if it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.get().copied()
    }

    /// Cancelled once the connection is closing for any reason.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(max: usize) -> (Arc<ConnHandle>, mpsc::UnboundedReceiver<Outgoing>) {
        ConnHandle::new("c-1", max, Arc::new(Metrics::new("t")))
    }

    #[test]
    fn an_empty_queue_accepts_any_frame() {
        let (h, _rx) = handle(4);
        assert!(h.send(Utf8Bytes::from("0123456789")));
        assert_eq!(h.queued_bytes(), 10);
        assert!(h.close_reason().is_none());
    }

    #[test]
    fn overflowing_a_non_empty_queue_closes_with_1008() {
        let (h, _rx) = handle(10);
        assert!(h.send(Utf8Bytes::from("01234")));
        assert!(h.send(Utf8Bytes::from("01234")));
        assert!(!h.send(Utf8Bytes::from("x")));
        assert_eq!(
            h.close_reason(),
            Some(CloseReason {
                code: 1008,
                reason: "slow consumer"
            })
        );
        assert!(h.closing().is_cancelled());
        assert!(!h.send(Utf8Bytes::from("y")), "closing refuses frames");
    }

    #[test]
    fn written_frees_room() {
        let (h, _rx) = handle(10);
        assert!(h.send(Utf8Bytes::from("0123456789")));
        h.written(10);
        assert!(h.send(Utf8Bytes::from("0123456789")));
        assert!(h.close_reason().is_none());
    }

    #[test]
    fn first_close_reason_wins() {
        let (h, _rx) = handle(10);
        assert!(h.close(CloseReason {
            code: 1001,
            reason: "a"
        }));
        assert!(!h.close(CloseReason {
            code: 1008,
            reason: "b"
        }));
        assert_eq!(h.close_reason().map(|r| r.code), Some(1001));
    }
}
