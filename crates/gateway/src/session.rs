//! One WebSocket connection: a reader task that runs the protocol and a
//! writer task that drains the connection's outbound queue in batches.
//!
//! The reader owns the connection's state (claims, rooms, rate bucket,
//! heartbeat and expiry timers) and answers every frame; everything it and
//! the rooms send goes through the same bounded queue ([`ConnHandle`]), so
//! answers and room messages keep their order. Closing is started by setting
//! a close reason on the handle; the writer then sends the Close frame.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, info, Instrument};
use wsgate_protocol::server::Id;
use wsgate_protocol::{
    close, parse_client_frame, Ack, ClientCommand, ErrorCode, ErrorFrame, Joined, Left,
    MessageParts, Pong, Refreshed, ServerFrame, Welcome,
};

use crate::auth::Claims;
use crate::broker::control::DISCONNECTED;
use crate::broker::Since;
use crate::outbound::{CloseReason, ConnHandle};
use crate::{App, Slot};

/// How long a closing connection waits for the client's Close reply.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Token bucket for the per-connection publish limit: starts full, only
/// accepted publishes take from it.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    burst: f64,
    rate: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            rate,
            last: Instant::now(),
        }
    }

    /// Give back a token taken for a publish the broker then refused: only
    /// accepted publishes take from the bucket.
    pub fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }

    /// Take one token if there is one.
    pub fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

type Sink = SplitSink<WebSocket, Message>;
type Stream = SplitStream<WebSocket>;

/// Build a connection's state from an upgraded socket. Synchronous on
/// purpose: the socket is split here, so that no copy of the (large)
/// `WebSocket` value is kept alive inside the connection's future.
pub(crate) fn start(
    ws: WebSocket,
    app: Arc<App>,
    claims: Claims,
    remote: &str,
    slot: Slot,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let conn_id = app.next_conn_id();
    let span = tracing::info_span!(
        "conn",
        conn = %conn_id,
        user = %claims.sub,
        node = %app.config.node_id,
        remote = %remote,
    );
    let handle = ConnHandle::new(
        conn_id.as_str(),
        app.config.max_outbound_bytes,
        app.metrics.clone(),
    );
    let (sink, stream) = ws.split();
    let session = Box::new(Session {
        bucket: Bucket::new(app.config.publish_rate, app.config.publish_burst),
        expires: expiry_instant(claims.exp, app.config.verifier.leeway()),
        rooms: RoomSet::default(),
        handle,
        claims,
        app,
        _slot: slot,
    });
    session.run(sink, stream, conn_id).instrument(span)
}

fn expiry_instant(exp: u64, leeway: Duration) -> Instant {
    let deadline = Duration::from_secs(exp).saturating_add(leeway);
    let now = Duration::from_secs(now_secs());
    Instant::now() + deadline.saturating_sub(now)
}

/// Writes queued frames, one flush per batch, until the connection closes;
/// then sends the Close frame if the server is the one closing.
async fn write_loop(mut sink: Sink, handle: &ConnHandle, app: &App) {
    let mut batch = VecDeque::new();
    loop {
        tokio::select! {
            biased;
            _ = handle.closed() => break,
            ping = handle.take(&mut batch) => {
                let written = tokio::select! {
                    biased;
                    _ = handle.closed() => break,
                    r = write_batch(&mut sink, &mut batch, ping, handle) => r,
                };
                if written.is_err() {
                    handle.end();
                    break;
                }
            }
        }
    }
    if let Some(reason) = handle.close_reason() {
        app.metrics.closed(reason.code);
        let frame = CloseFrame {
            code: reason.code,
            reason: Utf8Bytes::from_static(reason.reason),
        };
        let _ = timeout(
            Duration::from_secs(1),
            sink.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

async fn write_batch(
    sink: &mut Sink,
    batch: &mut VecDeque<Utf8Bytes>,
    ping: bool,
    handle: &ConnHandle,
) -> Result<(), axum::Error> {
    if ping {
        sink.feed(Message::Ping(bytes::Bytes::new())).await?;
    }
    while let Some(text) = batch.pop_front() {
        let len = text.len();
        sink.feed(Message::Text(text)).await?;
        handle.written(len);
    }
    sink.flush().await?;
    handle.batch_written();
    Ok(())
}

/// The rooms one connection is in: a plain vector, since there are at most
/// `--max-rooms` (100 by default) and most connections are in one or two;
/// a hash set would cost an idle connection more memory than the scan costs.
#[derive(Default)]
struct RoomSet(Vec<Arc<str>>);

impl RoomSet {
    fn contains(&self, room: &str) -> bool {
        self.0.iter().any(|r| &**r == room)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn insert(&mut self, room: Arc<str>) {
        if !self.contains(&room) {
            self.0.push(room);
        }
    }
    fn remove(&mut self, room: &str) -> bool {
        match self.0.iter().position(|r| &**r == room) {
            Some(i) => {
                self.0.swap_remove(i);
                true
            }
            None => false,
        }
    }
    fn drain(&mut self) -> std::vec::Drain<'_, Arc<str>> {
        self.0.drain(..)
    }
}

struct Session {
    /// The connection's place under `--max-connections`, released with the session.
    _slot: Slot,
    app: Arc<App>,
    handle: Arc<ConnHandle>,
    claims: Claims,
    rooms: RoomSet,
    bucket: Bucket,
    expires: Instant,
}

/// What ended the read loop, for the log.
type Ended = &'static str;

impl Session {
    /// The connection's one task: the reader and the writer run side by
    /// side in it (joined, not spawned), which saves a task per connection.
    async fn run(mut self: Box<Self>, sink: Sink, stream: Stream, conn_id: String) {
        let app = self.app.clone();
        let handle = self.handle.clone();
        app.conns.insert(&self.claims.sub, &handle);
        if app.control.check(&self.claims).is_err() {
            // Revoked between the token check and the registration above,
            // so the disconnect did not find this connection.
            handle.close(DISCONNECTED);
        }
        if app.is_draining() {
            // Upgraded just as the drain began: close like the others.
            handle.close(CloseReason {
                code: close::GOING_AWAY,
                reason: "server shutting down",
            });
        }
        info!("connection opened");
        self.send(ServerFrame::Welcome(Welcome {
            conn: conn_id,
            user: self.claims.sub.clone(),
            node: app.config.node_id.to_string(),
            heartbeat_ms: app.config.heartbeat.as_millis() as u64,
        }));
        // Both futures are built inside the join: a named local would keep a
        // second, moved-from copy of the reader alive in this future's state.
        let (ended, ()) = tokio::join!(
            async {
                let ended = self.read_loop(stream).await;
                // Ends the writer (which sends our Close frame, if any).
                handle.end();
                ended
            },
            write_loop(sink, &handle, &app)
        );
        self.leave_all();
        app.conns.remove(&self.claims.sub, &handle);
        match handle.close_reason() {
            Some(r) => info!(
                code = r.code,
                reason = r.reason,
                "connection closed by server"
            ),
            None => info!(why = ended, "connection closed by client"),
        }
    }

    fn send(&self, frame: ServerFrame) {
        self.handle.send(Utf8Bytes::from(frame.to_json()));
    }

    fn error(&self, code: ErrorCode, message: impl Into<String>, id: Option<Id>) {
        self.send(ServerFrame::Error(ErrorFrame {
            code,
            message: message.into(),
            id,
        }));
    }

    fn close(&self, code: u16, reason: &'static str) {
        self.handle.close(CloseReason { code, reason });
    }

    async fn read_loop(&mut self, mut stream: Stream) -> Ended {
        let heartbeat = self.app.config.heartbeat;
        let pong_timeout = self.app.config.pong_timeout;
        let mut next_ping = Instant::now() + heartbeat;
        // When a Ping went out with nothing heard since.
        let mut awaiting: Option<Instant> = None;
        let mut closing_since: Option<Instant> = None;
        // One timer for heartbeat, expiry and the closing linger, and one
        // cancellation future, created once: an idle connection's state
        // stays small.
        let handle = self.handle.clone();
        let cancelled = handle.closed();
        tokio::pin!(cancelled);
        let timer = sleep_until(next_ping);
        tokio::pin!(timer);
        loop {
            let deadline = match closing_since {
                Some(since) => since + CLOSE_LINGER,
                None => awaiting
                    .map_or(next_ping, |sent| (sent + pong_timeout).min(next_ping))
                    .min(self.expires),
            };
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                _ = &mut cancelled, if closing_since.is_none() => {
                    if self.handle.close_reason().is_none() {
                        return "write side ended";
                    }
                    closing_since = Some(Instant::now());
                }
                _ = &mut timer => {
                    if closing_since.is_some() {
                        return "closing handshake timed out";
                    }
                    let now = Instant::now();
                    if now >= self.expires {
                        self.close(close::TOKEN_EXPIRED, "token expired");
                    } else if awaiting.is_some_and(|sent| now >= sent + pong_timeout) {
                        // Do not wait for a silent peer's reply.
                        self.close(close::POLICY, "heartbeat timeout");
                        return "heartbeat timeout";
                    } else if now >= next_ping {
                        self.handle.ping();
                        awaiting.get_or_insert(now);
                        next_ping = now + heartbeat;
                    }
                }
                msg = stream.next() => {
                    let Some(msg) = msg else { return "connection ended" };
                    if closing_since.is_some() {
                        if msg.is_err() {
                            return "connection ended";
                        }
                        continue;
                    }
                    awaiting = None;
                    match msg {
                        // Boxed: handling a frame needs far more state than
                        // waiting for one, and idle connections only wait.
                        Ok(Message::Text(text)) => Box::pin(self.on_text(text)).await,
                        Ok(Message::Binary(_)) => {
                            self.close(close::UNSUPPORTED_DATA, "binary frames are not supported");
                        }
                        Ok(Message::Ping(_) | Message::Pong(_)) => {}
                        // The library answers the Close; the next read ends the stream.
                        Ok(Message::Close(_)) => {}
                        Err(e) => {
                            if let Some((code, reason)) = classify(e) {
                                self.close(code, reason);
                            } else {
                                return "connection error";
                            }
                        }
                    }
                }
            }
        }
    }

    async fn on_text(&mut self, text: Utf8Bytes) {
        self.app.metrics.messages_received.inc();
        let frame = match parse_client_frame(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                debug!(error = %e.message, "bad frame");
                return self.error(ErrorCode::BadRequest, e.message, e.id);
            }
        };
        let id = frame.id;
        match frame.cmd {
            ClientCommand::Join { room, since, epoch } => self.join(room, since, epoch, id).await,
            ClientCommand::Leave { room } => self.leave(&room, id),
            ClientCommand::Publish { room, data } => self.publish(&room, data, id).await,
            ClientCommand::Refresh { token } => self.refresh(&token, id),
            ClientCommand::Ping => self.send(ServerFrame::Pong(Pong { id })),
        }
    }

    async fn join(
        &mut self,
        room: Cow<'_, str>,
        since: Option<u64>,
        epoch: Option<Cow<'_, str>>,
        id: Option<Id>,
    ) {
        if !self.claims.rooms.allows(&room) {
            return self.error(
                ErrorCode::Forbidden,
                format!("not allowed to join room '{room}'"),
                id,
            );
        }
        let member = self.rooms.contains(room.as_ref());
        if !member && self.rooms.len() >= self.app.config.max_rooms {
            return self.error(
                ErrorCode::TooManyRooms,
                format!(
                    "connection is at its limit of {} rooms",
                    self.app.config.max_rooms
                ),
                id,
            );
        }
        let app = self.app.clone();
        app.rooms.add_pending(&room, &self.handle);
        if !member {
            if let Err(e) = app.broker.subscribe(&room).await {
                app.rooms.remove(&room, &self.handle);
                return self.error(ErrorCode::Unavailable, format!("{e}; retry later"), id);
            }
            self.rooms.insert(Arc::from(room.as_ref()));
        }
        let since = since.map(|seq| Since {
            seq,
            epoch: epoch.as_deref(),
        });
        match app.broker.history(&room, since).await {
            Ok(h) => {
                self.send(ServerFrame::Joined(Joined {
                    room: room.to_string(),
                    seq: h.latest,
                    epoch: h.epoch.to_string(),
                    recovered: since.map(|_| h.recovered),
                    id,
                }));
                // Paced: a replay may be larger than the outbound limit; it
                // waits for the client to read instead of closing it, but
                // no longer than the heartbeat would let a silent peer live.
                let patience = app.config.heartbeat + app.config.pong_timeout;
                let mut replayed = 0;
                for f in h.frames {
                    if !self.handle.send_paced(f, patience).await {
                        break;
                    }
                    replayed += 1;
                }
                app.metrics.messages_delivered.inc_by(replayed);
                app.rooms
                    .go_live(&room, &self.handle, Some((&*h.epoch, h.latest)));
            }
            Err(e) => {
                if member {
                    app.rooms.go_live(&room, &self.handle, None);
                } else {
                    self.rooms.remove(room.as_ref());
                    app.rooms.remove(&room, &self.handle);
                    app.broker.unsubscribe(&room);
                }
                self.error(ErrorCode::Unavailable, format!("{e}; retry later"), id);
            }
        }
    }

    fn leave(&mut self, room: &str, id: Option<Id>) {
        if self.rooms.remove(room) {
            self.app.rooms.remove(room, &self.handle);
            self.app.broker.unsubscribe(room);
        }
        self.send(ServerFrame::Left(Left {
            room: room.to_owned(),
            id,
        }));
    }

    fn leave_all(&mut self) {
        for room in self.rooms.drain() {
            self.app.rooms.remove(&room, &self.handle);
            self.app.broker.unsubscribe(&room);
        }
    }

    async fn publish(&mut self, room: &str, data: &RawValue, id: Option<Id>) {
        if !self.claims.publish.allows(room) {
            return self.error(
                ErrorCode::Forbidden,
                format!("not allowed to publish to room '{room}'"),
                id,
            );
        }
        if !self.bucket.try_take() {
            return self.error(
                ErrorCode::RateLimited,
                "publish rate limit exceeded; message dropped",
                id,
            );
        }
        let parts = MessageParts::new(room, &self.claims.sub, data, now_ms());
        match self.app.publish(room, parts).await {
            Ok(seq) => self.send(ServerFrame::Ack(Ack {
                id,
                room: room.to_owned(),
                seq,
            })),
            Err(e) => {
                self.bucket.refund();
                self.error(
                    ErrorCode::Unavailable,
                    format!("{e}; message not delivered"),
                    id,
                )
            }
        }
    }

    fn refresh(&mut self, token: &str, id: Option<Id>) {
        match self.app.verify_token(token) {
            Ok(claims) if claims.sub == self.claims.sub => {
                self.expires = expiry_instant(claims.exp, self.app.config.verifier.leeway());
                let exp = claims.exp;
                self.claims = claims;
                self.send(ServerFrame::Refreshed(Refreshed { exp, id }));
            }
            Ok(_) => self.error(
                ErrorCode::InvalidToken,
                "refresh token is for another subject",
                id,
            ),
            Err(e) => self.error(
                ErrorCode::InvalidToken,
                format!("refresh token rejected: {}", e.reason()),
                id,
            ),
        }
    }
}

/// Map a read error to the close code PROTOCOL.md gives it; `None` when
/// the connection is simply gone.
fn classify(e: axum::Error) -> Option<(u16, &'static str)> {
    use tungstenite::error::{CapacityError, Error as WsError};
    let inner = e.into_inner();
    let ws = inner.downcast_ref::<WsError>()?;
    match ws {
        WsError::Utf8(_) => Some((close::INVALID_PAYLOAD, "invalid UTF-8 in text frame")),
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            Some((close::TOO_BIG, "message too big"))
        }
        WsError::Capacity(_) => Some((close::TOO_BIG, "message too big")),
        WsError::Protocol(_) => Some((close::PROTOCOL_ERROR, "protocol error")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_starts_full_and_refills_at_rate() {
        let mut b = Bucket::new(10.0, 3);
        assert!(b.try_take() && b.try_take() && b.try_take());
        assert!(!b.try_take());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.try_take(), "one token after 1/rate");
        assert!(!b.try_take());
        tokio::time::advance(Duration::from_secs(60)).await;
        let taken = (0..10).filter(|_| b.try_take()).count();
        assert_eq!(taken, 3, "never more than the burst");
        b.refund();
        assert!(b.try_take(), "a refunded token can be taken again");
        assert!(!b.try_take());
    }

    #[test]
    fn expiry_includes_leeway() {
        let now = now_secs();
        let soon = expiry_instant(now + 10, Duration::from_secs(5));
        let left = soon.duration_since(Instant::now());
        assert!(left > Duration::from_secs(13) && left <= Duration::from_secs(15));
        let past = expiry_instant(now.saturating_sub(100), Duration::from_secs(5));
        assert!(past <= Instant::now());
    }
}
