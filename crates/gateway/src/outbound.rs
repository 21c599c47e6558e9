//! One connection's outbound queue, shared by everything that sends to it.
//!
//! Rooms, the session and the broker relay push frames with
//! [`ConnHandle::send`], which never blocks and never waits for the client:
//! the queue is bounded in bytes (`--max-outbound-bytes`). A frame is always
//! accepted into an empty queue; a frame that would overflow a non-empty one
//! closes the connection with 1008 ("slow consumer") instead, so that nobody
//! else waits for a client that does not read. The connection's writer task
//! drains the queue in batches.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Why and how the server closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code.
    pub code: u16,
    /// Close reason text.
    pub reason: &'static str,
}

/// Frames waiting for the writer. A plain deque under a lock rather than a
/// channel: it allocates nothing until used, which matters for the memory
/// of idle connections.
#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Utf8Bytes>,
    ping: bool,
}

/// The sending side of one connection.
#[derive(Debug)]
pub struct ConnHandle {
    id: Box<str>,
    queue: Mutex<Queue>,
    wake: Notify,
    drained: Notify,
    queued: AtomicUsize,
    max: usize,
    close: OnceLock<CloseReason>,
    /// Woken when the connection starts closing (see `ended`).
    closing: Notify,
    /// Set once the connection is closing for any reason.
    ended: AtomicBool,
    metrics: Arc<Metrics>,
}

impl ConnHandle {
    /// A handle whose queue holds at most `max_bytes` of unwritten frames.
    pub fn new(
        id: impl Into<Box<str>>,
        max_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<ConnHandle> {
        Arc::new(ConnHandle {
            id: id.into(),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            drained: Notify::new(),
            queued: AtomicUsize::new(0),
            max: max_bytes,
            close: OnceLock::new(),
            closing: Notify::new(),
            ended: AtomicBool::new(false),
            metrics,
        })
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Queue a text frame. Returns false when the connection is closing or
    /// the frame overflowed the queue (which starts a 1008 close).
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        if self.ended.load(Ordering::Acquire) {
            return false;
        }
        let len = frame.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before != 0 && before + len > self.max {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.slow_consumer();
            return false;
        }
        let was_empty = {
            let mut q = self.queue();
            let was_empty = q.frames.is_empty();
            q.frames.push_back(frame);
            was_empty
        };
        if was_empty {
            self.wake.notify_one();
        }
        true
    }

    /// Close with 1008 ("slow consumer"), counted once.
    fn slow_consumer(&self) {
        if self.close(CloseReason {
            code: wsgate_protocol::close::POLICY,
            reason: "slow consumer",
        }) {
            self.metrics.slow_consumer_closes.inc();
        }
    }

    /// Queue a frame the client asked for in bulk (a resume's replay):
    /// instead of overflowing, wait while the queue is over its limit until
    /// the writer makes room. Returns false when the connection closes.
    ///
    /// While it waits nothing else of the connection runs (its heartbeat
    /// included), so the wait is bounded: a client that lets `patience` go
    /// by without the writer making any room is not reading, and is closed
    /// as a slow consumer (1008) instead of holding its session forever.
    pub async fn send_paced(&self, frame: Utf8Bytes, patience: Duration) -> bool {
        loop {
            let progress = self.drained.notified();
            if self.is_closing() {
                return false;
            }
            let queued = self.queued_bytes();
            if queued == 0 || queued + frame.len() <= self.max {
                return self.send(frame);
            }
            tokio::select! {
                _ = progress => {}
                _ = self.closed() => return false,
                _ = tokio::time::sleep(patience) => {
                    self.slow_consumer();
                    return false;
                }
            }
        }
    }

    /// The most bytes this connection may have queued.
    pub fn max_bytes(&self) -> usize {
        self.max
    }

    /// Queue a WebSocket Ping.
    pub fn ping(&self) {
        self.queue().ping = true;
        self.wake.notify_one();
    }

    /// Wait for queued frames, then move them all into `batch` (which must
    /// be empty; its allocation is kept for the next turn). Returns whether
    /// a Ping is due too.
    pub async fn take(&self, batch: &mut VecDeque<Utf8Bytes>) -> bool {
        loop {
            if let Some(ping) = self.try_take(batch) {
                return ping;
            }
            self.wake.notified().await;
        }
    }

    /// [`take`](Self::take) without waiting: `None` when nothing is queued.
    pub fn try_take(&self, batch: &mut VecDeque<Utf8Bytes>) -> Option<bool> {
        let mut q = self.queue();
        if q.frames.is_empty() && !q.ping {
            return None;
        }
        std::mem::swap(&mut q.frames, batch);
        Some(std::mem::take(&mut q.ping))
    }

    /// The writer wrote `len` bytes of queued frames to the socket.
    pub fn written(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::AcqRel);
    }

    /// The writer finished a batch: wake paced senders.
    pub fn batch_written(&self) {
        self.drained.notify_waiters();
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Start closing with this code. Only the first reason counts; returns
    /// whether this call set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.close.set(reason).is_ok();
        self.end();
        first
    }

    /// Stop the connection without a close reason of the server's (the
    /// peer went away or the writer failed).
    pub fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.closing.notify_waiters();
    }

    /// Why the server is closing this connection, if it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.get().copied()
    }

    /// Whether the connection is closing for any reason.
    pub fn is_closing(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Resolves once the connection is closing for any reason. A `Notify`
    /// and a flag rather than a cancellation token: no extra allocation per
    /// connection.
    pub async fn closed(&self) {
        loop {
            let woken = self.closing.notified();
            if self.is_closing() {
                return;
            }
            woken.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(max: usize) -> (Arc<ConnHandle>, ()) {
        (ConnHandle::new("c-1", max, Arc::new(Metrics::new("t"))), ())
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
        assert!(h.is_closing());
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

    #[tokio::test]
    async fn take_moves_everything_queued_in_order() {
        let (h, _) = handle(100);
        h.send(Utf8Bytes::from("a"));
        h.send(Utf8Bytes::from("b"));
        h.ping();
        let mut batch = VecDeque::new();
        assert!(h.take(&mut batch).await, "ping due");
        assert_eq!(batch, ["a", "b"]);
        batch.clear();
        h.send(Utf8Bytes::from("c"));
        assert!(!h.take(&mut batch).await);
        assert_eq!(batch, ["c"]);
    }

    #[tokio::test]
    async fn paced_sends_wait_for_the_writer_instead_of_overflowing() {
        let (h, _) = handle(10);
        assert!(h.send(Utf8Bytes::from("0123456789")));
        let paced = {
            let h = h.clone();
            tokio::spawn(async move {
                h.send_paced(Utf8Bytes::from("abcdef"), Duration::from_secs(60))
                    .await
            })
        };
        tokio::task::yield_now().await;
        assert!(!paced.is_finished(), "waits while the queue is full");
        let mut batch = VecDeque::new();
        h.take(&mut batch).await;
        h.written(10);
        h.batch_written();
        assert!(paced.await.unwrap());
        assert!(h.close_reason().is_none(), "no slow-consumer close");
        batch.clear();
        h.take(&mut batch).await;
        assert_eq!(batch, ["abcdef"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_send_that_never_gets_room_closes_as_a_slow_consumer() {
        let (h, _) = handle(10);
        assert!(h.send(Utf8Bytes::from("0123456789")));
        let patience = Duration::from_secs(5);
        assert!(!h.send_paced(Utf8Bytes::from("x"), patience).await);
        assert_eq!(
            h.close_reason(),
            Some(CloseReason {
                code: 1008,
                reason: "slow consumer"
            })
        );
        assert_eq!(h.metrics.slow_consumer_closes.get(), 1);
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
