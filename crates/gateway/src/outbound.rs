//! One connection's outbound queue, shared by everything that sends to it.
//!
//! Rooms and the session send frames as their complete wire bytes with
//! [`ConnHandle::send`], which never blocks and never waits for the client.
//! On a plain TCP connection with nothing queued, the frame is written into
//! the socket at once by the caller (a room message is queued under the
//! room's lock and written by the delivering task once the lock is
//! released: no task wake-up, no copy); only what the socket does not take
//! is left queued, and the connection's own task writes the queue when the
//! socket has room, with vectored writes. The queue is bounded in bytes
//! (`--max-outbound-bytes`): a frame is always accepted into an empty queue;
//! a frame that would overflow a non-empty one closes the connection with
//! 1008 ("slow consumer") instead, so that nobody else waits for a client
//! that does not read. TLS connections always queue (their task writes).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::ws::codec::Encoding;

/// Why and how the server closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code.
    pub code: u16,
    /// Close reason text.
    pub reason: &'static str,
}

/// Frames at most written by one vectored write.
const MAX_IOV: usize = 64;

/// Frames not yet written, in order, as their complete wire bytes. A plain
/// deque under a lock rather than a channel: it allocates nothing until
/// used, which matters for the memory of idle connections. The lock is also
/// what keeps a direct write from overtaking queued bytes.
#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    /// Bytes in `frames`.
    bytes: usize,
    /// The front frame is partly written: it must be finished even when
    /// the rest of the queue is dropped for a Close.
    started: bool,
    /// The socket of a plain TCP connection: sends write into it directly
    /// while nothing is queued. `None` for TLS (the transport writes the
    /// queue) and once the connection is over.
    sock: Option<TcpStream>,
}

impl Queue {
    /// Account for `n` bytes written from the front.
    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let Some(front) = self.frames.front_mut() else {
                return;
            };
            if n < front.len() {
                front.advance(n);
                self.started = true;
                return;
            }
            n -= front.len();
            self.frames.pop_front();
            self.started = false;
        }
    }

    fn slices(&self) -> ([IoSlice<'_>; MAX_IOV], usize) {
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let mut n = 0;
        for (slot, frame) in slices.iter_mut().zip(&self.frames) {
            *slot = IoSlice::new(frame);
            n += 1;
        }
        (slices, n)
    }

    fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Write what is queued into the TCP socket without blocking. Ready
    /// when the queue is empty.
    fn poll_write_tcp(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bounded: a socket that keeps taking bytes yields after a while.
        for _ in 0..64 {
            if self.frames.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let Some(sock) = &self.sock else {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            let (slices, n) = self.slices();
            match sock.try_write_vectored(&slices[..n]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(written) => self.advance(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sock.poll_write_ready(cx)?.is_pending() {
                        return Poll::Pending;
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Write what is queued into the TCP socket as far as it takes it
    /// without waiting, registering nothing (the caller is not the
    /// connection's task). Nothing written without a socket.
    fn try_write_tcp(&mut self) -> io::Result<()> {
        for _ in 0..64 {
            let Some(sock) = &self.sock else {
                return Ok(());
            };
            let written = match self.frames.len() {
                0 => return Ok(()),
                // The usual case (one room message): a plain write.
                1 => sock.try_write(&self.frames[0]),
                _ => {
                    let (slices, n) = self.slices();
                    sock.try_write_vectored(&slices[..n])
                }
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Write what is queued into a stream (TLS), then flush it.
    fn poll_write_stream(
        &mut self,
        cx: &mut Context<'_>,
        mut io: Pin<&mut (dyn AsyncWrite + Send)>,
    ) -> Poll<io::Result<()>> {
        for _ in 0..64 {
            if self.frames.is_empty() {
                return io.as_mut().poll_flush(cx);
            }
            let (slices, n) = self.slices();
            match io.as_mut().poll_write_vectored(cx, &slices[..n])? {
                Poll::Ready(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(written) => self.advance(written),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The sending side of one connection.
#[derive(Debug)]
pub struct ConnHandle {
    id: Box<str>,
    queue: Mutex<Queue>,
    /// The task that writes the queue (the connection's own task; for an
    /// SSE stream served through hyper, its response body), woken when
    /// frames are queued for it.
    wake: AtomicWaker,
    /// The session's task while it waits for the closing
    /// ([`poll_closed`](ConnHandle::poll_closed)): apart from `wake`, which
    /// belongs to the writer of the queue, and may be another task.
    close_wake: AtomicWaker,
    /// Woken whenever queued bytes are written (for paced sends).
    drained: Notify,
    max: usize,
    close: OnceLock<CloseReason>,
    /// Woken when the connection starts closing (see `ended`).
    closing: Notify,
    /// Set once the connection is closing for any reason.
    ended: AtomicBool,
    /// How frames are encoded: WebSocket (compressed from some length,
    /// when permessage-deflate was negotiated) or Server-Sent Events.
    encoding: Encoding,
    metrics: Arc<Metrics>,
}

impl ConnHandle {
    /// A handle whose queue holds at most `max_bytes` of unwritten frames;
    /// its transport writes the queue.
    pub fn new(
        id: impl Into<Box<str>>,
        max_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<ConnHandle> {
        Self::with_socket(id, max_bytes, metrics, None, Encoding::Ws(usize::MAX))
    }

    /// A handle that writes frames straight into `sock` while nothing is
    /// queued, and encodes text frames with `encoding`.
    pub fn with_socket(
        id: impl Into<Box<str>>,
        max_bytes: usize,
        metrics: Arc<Metrics>,
        sock: Option<TcpStream>,
        encoding: Encoding,
    ) -> Arc<ConnHandle> {
        Arc::new(ConnHandle {
            id: id.into(),
            queue: Mutex::new(Queue {
                sock,
                ..Queue::default()
            }),
            wake: AtomicWaker::new(),
            close_wake: AtomicWaker::new(),
            drained: Notify::new(),
            max: max_bytes,
            close: OnceLock::new(),
            closing: Notify::new(),
            ended: AtomicBool::new(false),
            encoding,
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

    /// Send a frame (its complete wire bytes). With nothing queued, a plain
    /// TCP connection writes it at once, from the caller (the fan-out loop);
    /// whatever the socket does not take is queued for the connection's
    /// task. Returns false when the connection is closing or the frame
    /// overflowed the queue (which starts a 1008 close).
    pub fn send(&self, frame: Bytes) -> bool {
        self.push(frame, true)
    }

    /// Send a control frame (Ping, Pong, the echo of a Close): never closes
    /// for overflow.
    pub fn send_control(&self, frame: Bytes) -> bool {
        self.push(frame, false)
    }

    /// Queue a frame without writing it: its place in the connection's
    /// order is fixed now (room fan-out calls this under the room's lock),
    /// and [`flush`](Self::flush), called once the lock is released, writes
    /// it. Bounded like [`send`](Self::send).
    pub(crate) fn enqueue(&self, frame: Bytes) -> bool {
        if self.ended.load(Ordering::Acquire) {
            return false;
        }
        let mut q = self.queue();
        if !q.frames.is_empty() && q.bytes + frame.len() > self.max {
            drop(q);
            self.slow_consumer();
            return false;
        }
        q.push(frame);
        true
    }

    /// Write what [`enqueue`](Self::enqueue) queued into a plain TCP socket
    /// now, from the caller, as far as the socket takes it without waiting;
    /// the connection's task is woken for the rest (and for TLS).
    pub(crate) fn flush(&self) {
        let mut q = self.queue();
        let before = q.bytes;
        let written = q.try_write_tcp();
        let progress = q.bytes < before;
        let rest = !q.frames.is_empty();
        drop(q);
        if progress {
            self.drained.notify_waiters();
        }
        match written {
            Err(_) => self.end(),
            Ok(()) if rest => self.wake.wake(),
            Ok(()) => {}
        }
    }

    fn push(&self, mut frame: Bytes, bounded: bool) -> bool {
        if self.ended.load(Ordering::Acquire) {
            return false;
        }
        let mut q = self.queue();
        if !q.frames.is_empty() {
            if bounded && q.bytes + frame.len() > self.max {
                drop(q);
                self.slow_consumer();
                return false;
            }
            q.push(frame);
            return true;
        }
        if let Some(sock) = &q.sock {
            match sock.try_write(&frame) {
                Ok(n) if n == frame.len() => {
                    if q.frames.capacity() != 0 {
                        // The queue is empty: give its buffer back (room
                        // fan-out queues every message, and keeps the
                        // buffer while messages flow; an idle connection
                        // gives it back at its next heartbeat Ping).
                        q.frames = VecDeque::new();
                    }
                    return true;
                }
                Ok(n) => {
                    frame.advance(n);
                    q.started = n > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    drop(q);
                    self.end();
                    return false;
                }
            }
        }
        q.push(frame);
        drop(q);
        self.wake.wake();
        true
    }

    /// Close with 1008 ("slow consumer"), counted once.
    pub(crate) fn slow_consumer(&self) {
        if self.close(CloseReason {
            code: wsgate_protocol::close::POLICY,
            reason: "slow consumer",
        }) {
            self.metrics.slow_consumer_closes.inc();
        }
    }

    /// Send a frame the client asked for in bulk (a resume's replay):
    /// instead of overflowing, wait while the queue is over its limit until
    /// the transport makes room. Returns false when the connection closes.
    ///
    /// While it waits nothing else of the connection runs (its heartbeat
    /// included), so the wait is bounded: a client that lets `patience` go
    /// by without the transport writing anything is not reading, and is
    /// closed as a slow consumer (1008) instead of holding its session.
    pub async fn send_paced(&self, frame: Bytes, patience: Duration) -> bool {
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

    /// How this connection's frames are encoded.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// A text frame of `payload` encoded for this connection (compressed
    /// when negotiated and large enough; an event over SSE).
    pub fn text(&self, payload: &str) -> Bytes {
        crate::ws::codec::text_for(payload, self.encoding)
    }

    /// Send a WebSocket Ping (over SSE, a comment line).
    pub fn ping(&self) {
        self.send_control(match self.encoding {
            Encoding::Ws(_) => crate::ws::codec::ping(),
            Encoding::Sse => crate::sse::comment(),
        });
    }

    /// For a transport that writes elsewhere (the SSE response body): take
    /// the first queued frame out, or register the task to be woken when
    /// one is queued.
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Bytes> {
        self.wake.register(cx.waker());
        let mut q = self.queue();
        let Some(frame) = q.frames.pop_front() else {
            return Poll::Pending;
        };
        q.bytes -= frame.len();
        q.started = false;
        drop(q);
        self.drained.notify_waiters();
        Poll::Ready(frame)
    }

    /// Wake the task that writes the queue.
    pub fn wake(&self) {
        self.wake.wake();
    }

    /// Resolves once nothing is queued.
    pub async fn drained(&self) {
        loop {
            let progress = self.drained.notified();
            if self.queued_bytes() == 0 {
                return;
            }
            progress.await;
        }
    }

    /// Write queued frames into the connection's socket (or `stream`, for
    /// a connection without a plain TCP socket) as far as it takes them
    /// without waiting. Ready once the queue is empty; registers the task
    /// to be woken when frames are queued or the socket can take more.
    pub fn poll_write(
        &self,
        cx: &mut Context<'_>,
        stream: Option<Pin<&mut (dyn AsyncWrite + Send)>>,
    ) -> Poll<io::Result<()>> {
        self.wake.register(cx.waker());
        let mut q = self.queue();
        let before = q.bytes;
        let polled = match stream {
            Some(io) => q.poll_write_stream(cx, io),
            None => q.poll_write_tcp(cx),
        };
        let progress = q.bytes < before;
        drop(q);
        if progress {
            self.drained.notify_waiters();
        }
        polled
    }

    /// For a server-initiated Close: drop what is queued (but the rest of a
    /// frame already partly written) and queue `frame` last.
    pub fn replace_queue(&self, frame: Bytes) {
        let mut q = self.queue();
        let keep = usize::from(q.started);
        while q.frames.len() > keep {
            if let Some(f) = q.frames.pop_back() {
                q.bytes -= f.len();
            }
        }
        q.push(frame);
        drop(q);
        self.drained.notify_waiters();
    }

    /// Take the socket out (the connection is over; dropping it closes it).
    pub fn take_socket(&self) -> Option<TcpStream> {
        self.queue().sock.take()
    }

    /// Poll the plain TCP socket for bytes to read, into `buf`. `None`
    /// when the connection has no such socket.
    pub fn poll_read_tcp(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Option<Poll<io::Result<usize>>> {
        let q = self.queue();
        let sock = q.sock.as_ref()?;
        // Bounded: readiness may be stale once.
        for _ in 0..4 {
            match sock.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match sock.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                    Poll::Pending => return Some(Poll::Pending),
                },
                r => return Some(Poll::Ready(r)),
            }
        }
        cx.waker().wake_by_ref();
        Some(Poll::Pending)
    }

    /// Whether the connection writes into a plain TCP socket.
    pub fn has_socket(&self) -> bool {
        self.queue().sock.is_some()
    }

    /// Queued frames, taken out (for tests without a socket).
    #[cfg(test)]
    pub fn take_queued(&self) -> Vec<Bytes> {
        let mut q = self.queue();
        q.bytes = 0;
        q.frames.drain(..).collect()
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queue().bytes
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
        self.wake.wake();
        self.close_wake.wake();
    }

    /// Why the server is closing this connection, if it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.get().copied()
    }

    /// Whether the connection is closing for any reason.
    pub fn is_closing(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Ready once the connection is closing for any reason; registers the
    /// connection's task to be woken when it starts closing. For the
    /// connection's own task: no future to keep, where [`closed`](Self::closed)
    /// is one.
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.is_closing() {
            self.close_wake.register(cx.waker());
            if !self.is_closing() {
                return Poll::Pending;
            }
        }
        Poll::Ready(())
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

    /// A frame of `len` wire bytes (no socket here: the bytes are opaque).
    fn frame(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    /// Drain the queue like a transport that wrote it all.
    fn take(h: &ConnHandle, batch: &mut Vec<Bytes>) -> bool {
        let frames = h.take_queued();
        let ping = frames.iter().any(|f| f[..] == crate::ws::codec::ping()[..]);
        batch.extend(
            frames
                .into_iter()
                .filter(|f| f[..] != crate::ws::codec::ping()[..]),
        );
        h.drained.notify_waiters();
        ping
    }

    #[test]
    fn an_empty_queue_accepts_any_frame() {
        let (h, _rx) = handle(4);
        assert!(h.send(frame("0123456789")));
        assert_eq!(h.queued_bytes(), 10);
        assert!(h.close_reason().is_none());
    }

    #[test]
    fn overflowing_a_non_empty_queue_closes_with_1008() {
        let (h, _rx) = handle(10);
        assert!(h.send(frame("01234")));
        assert!(h.send(frame("01234")));
        assert!(!h.send(frame("x")));
        assert_eq!(
            h.close_reason(),
            Some(CloseReason {
                code: 1008,
                reason: "slow consumer"
            })
        );
        assert!(h.is_closing());
        assert!(!h.send(frame("y")), "closing refuses frames");
    }

    #[test]
    fn written_frees_room() {
        let (h, _rx) = handle(10);
        assert!(h.send(frame("0123456789")));
        h.take_queued();
        assert!(h.send(frame("0123456789")));
        assert!(h.close_reason().is_none());
    }

    #[tokio::test]
    async fn take_moves_everything_queued_in_order() {
        let (h, _) = handle(100);
        h.send(frame("a"));
        h.send(frame("b"));
        h.ping();
        let mut batch = Vec::new();
        assert!(take(&h, &mut batch), "ping due");
        assert_eq!(batch, ["a", "b"]);
        batch.clear();
        h.send(frame("c"));
        assert!(!take(&h, &mut batch));
        assert_eq!(batch, ["c"]);
    }

    #[tokio::test]
    async fn paced_sends_wait_for_the_writer_instead_of_overflowing() {
        let (h, _) = handle(10);
        assert!(h.send(frame("0123456789")));
        let paced = {
            let h = h.clone();
            tokio::spawn(
                async move { h.send_paced(frame("abcdef"), Duration::from_secs(60)).await },
            )
        };
        tokio::task::yield_now().await;
        assert!(!paced.is_finished(), "waits while the queue is full");
        let mut batch = Vec::new();
        take(&h, &mut batch);
        assert!(paced.await.unwrap());
        assert!(h.close_reason().is_none(), "no slow-consumer close");
        batch.clear();
        take(&h, &mut batch);
        assert_eq!(batch, ["abcdef"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_send_that_never_gets_room_closes_as_a_slow_consumer() {
        let (h, _) = handle(10);
        assert!(h.send(frame("0123456789")));
        let patience = Duration::from_secs(5);
        assert!(!h.send_paced(frame("x"), patience).await);
        assert_eq!(
            h.close_reason(),
            Some(CloseReason {
                code: 1008,
                reason: "slow consumer"
            })
        );
        assert_eq!(h.metrics.slow_consumer_closes.get(), 1);
    }

    #[tokio::test]
    async fn queued_room_frames_keep_their_order_with_direct_sends_through_the_socket() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut client = client.unwrap();
        let sock = accepted.unwrap().0;
        let metrics = Arc::new(Metrics::new("t"));
        let h = ConnHandle::with_socket(
            "c-1",
            100,
            metrics,
            Some(sock),
            crate::ws::codec::Encoding::Ws(usize::MAX),
        );
        // A fan-out queues under the room's lock; a send meanwhile (an ack)
        // goes behind it, and so does the next room frame.
        assert!(h.enqueue(frame("room-1 ")));
        assert!(h.send(frame("ack ")));
        assert!(h.enqueue(frame("room-2")));
        assert_eq!(h.queued_bytes(), 17, "nothing written before the flush");
        h.flush();
        // Whatever the socket did not take at once, the connection's task
        // writes (here: polled by the test).
        let write = std::future::poll_fn(|cx| h.poll_write(cx, None));
        tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .unwrap()
            .unwrap();
        let mut got = [0u8; 17];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"room-1 ack room-2");
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
