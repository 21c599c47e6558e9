//! The connection task behind a [`Client`](crate::Client): connects, runs
//! one session at a time over a [`Wire`] (WebSocket or SSE), and reconnects
//! with backoff.
//!
//! One task owns all state (rooms, pending requests, token, backoff); the
//! `Client` handles talk to it through a command channel and the application
//! hears from it through the event channel. Each session has a small writer
//! task so that the reading side never waits on a socket write.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use rand::distr::{Alphanumeric, SampleString};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::value::RawValue;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::debug;
use wsgate_protocol::{close, ClientRequest, ErrorCode, ErrorFrame, Id, ServerFrame, Welcome};

use crate::backoff::Backoff;
use crate::config::Transport;
use crate::config::{ClientConfig, TokenSource};
use crate::error::ClientError;
use crate::event::{Event, JoinInfo, PresenceInfo};
use crate::jwt::jwt_exp;
use crate::tracker::RoomTracker;
use crate::wire::{self, Failure, Incoming, Outbound, Wire};
type Reply<T> = oneshot::Sender<Result<T, ClientError>>;

/// A request from a [`Client`](crate::Client) handle.
pub(crate) enum Command {
    Join {
        room: String,
        resume: Option<(u64, Option<String>)>,
        reply: Reply<JoinInfo>,
    },
    Leave {
        room: String,
        reply: Reply<()>,
    },
    Publish {
        room: String,
        data: Box<RawValue>,
        reply: Reply<u64>,
    },
    Position {
        room: String,
        reply: oneshot::Sender<Option<(u64, String)>>,
    },
    Presence {
        room: String,
        reply: Reply<PresenceInfo>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// Whether the driver goes on.
enum Flow {
    Continue,
    /// The application closed (with a reply to send when done), or every
    /// handle was dropped.
    Stop(Option<oneshot::Sender<()>>),
}

/// How a session ended.
enum SessionEnd {
    Dropped { code: Option<u16>, reason: String },
    Stop(Option<oneshot::Sender<()>>),
}

/// How long to wait for the server to end the connection after its Close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The gateway remembers a publish key for 5 minutes; an unacknowledged
/// publish is sent again only while it is younger than this (30 s margin).
pub(crate) const RETRY_WINDOW: Duration = Duration::from_secs(270);

/// At most this many unacknowledged publishes wait for a reconnect; beyond
/// it a dropped connection fails them with `Disconnected` as before.
pub(crate) const RETRY_QUEUE: usize = 1000;

/// A publish answered `timeout` is sent again (same key) this many times
/// before the caller gets the `timeout` error.
pub(crate) const TIMEOUT_RETRIES: u32 = 3;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// When to refresh a token expiring at `exp` (Unix seconds): `margin` before
/// it, but never earlier than half its remaining life.
pub(crate) fn refresh_delay(exp: u64, now_ms: u64, margin: Duration) -> Duration {
    let remaining = Duration::from_millis(exp.saturating_mul(1000).saturating_sub(now_ms));
    remaining.saturating_sub(margin.min(remaining / 2))
}

/// The cached token and whether it must be replaced before the next connect.
struct Tokens {
    source: TokenSource,
    cached: Option<String>,
    stale: bool,
}

impl Tokens {
    /// The token for a connection attempt; calls the callback when there is
    /// none yet, it was marked stale (4001, 401) or it has expired.
    async fn for_connect(&mut self, limit: Duration) -> Result<String, Failure> {
        let cb = match &self.source {
            TokenSource::Static(t) => return Ok(t.clone()),
            TokenSource::Callback(cb) => cb.clone(),
        };
        let expired = self
            .cached
            .as_deref()
            .and_then(jwt_exp)
            .is_some_and(|exp| exp.saturating_mul(1000) <= now_ms());
        match &self.cached {
            Some(t) if !self.stale && !expired => Ok(t.clone()),
            _ => {
                let token = match timeout(limit, cb()).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => return Err(Failure::new(format!("token callback failed: {e}"))),
                    Err(_) => return Err(Failure::new("token callback timed out")),
                };
                self.cached = Some(token.clone());
                self.stale = false;
                Ok(token)
            }
        }
    }

    fn is_callback(&self) -> bool {
        matches!(self.source, TokenSource::Callback(_))
    }
}

/// The state the application sees, kept across sessions.
struct AppSide {
    tracker: RoomTracker,
    /// Application joins waiting for a `joined`, by room; kept across
    /// reconnects (the re-join answers them).
    waiters: HashMap<String, Vec<Reply<JoinInfo>>>,
    events: UnboundedSender<Event>,
    /// Publishes sent on a connection that dropped before their `ack`, in
    /// the order they were first sent: sent again (same key) after the next
    /// connection's re-joins.
    unacked: VecDeque<Outgoing>,
}

impl AppSide {
    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn answer_waiters(&mut self, room: &str, result: impl Fn() -> Result<JoinInfo, ClientError>) {
        for w in self.waiters.remove(room).unwrap_or_default() {
            let _ = w.send(result());
        }
    }

    /// A command while there is no connection.
    fn offline(&mut self, cmd: Option<Command>) -> Flow {
        let Some(cmd) = cmd else {
            return Flow::Stop(None);
        };
        match cmd {
            Command::Join {
                room,
                resume,
                reply,
            } => {
                // Joined (with `since` when known) as soon as a connection is up.
                self.tracker.want(&room, resume);
                self.waiters.entry(room).or_default().push(reply);
            }
            Command::Leave { room, reply } => {
                self.tracker.unwant(&room);
                self.answer_waiters(&room, || Err(ClientError::Cancelled));
                let _ = reply.send(Ok(()));
            }
            Command::Publish { reply, .. } => {
                let _ = reply.send(Err(ClientError::Disconnected));
            }
            Command::Position { room, reply } => {
                let _ = reply.send(self.position(&room));
            }
            Command::Presence { reply, .. } => {
                let _ = reply.send(Err(ClientError::Disconnected));
            }
            Command::Close { reply } => return Flow::Stop(Some(reply)),
        }
        Flow::Continue
    }

    fn position(&self, room: &str) -> Option<(u64, String)> {
        match self.tracker.position(room) {
            Some((Some(seq), Some(epoch))) => Some((seq, epoch)),
            _ => None,
        }
    }

    /// Fail every waiting join and publish (the client is closing).
    fn close_all(&mut self) {
        for (_, ws) in self.waiters.drain() {
            for w in ws {
                let _ = w.send(Err(ClientError::Closed));
            }
        }
        for o in self.unacked.drain(..) {
            let _ = o.reply.send(Err(ClientError::Closed));
        }
    }

    /// Keep the publishes a dropped connection left unanswered (`pending`
    /// in the order they were sent) for the next connection, within the
    /// queue's size and the key window.
    fn keep_unacked(&mut self, pending: impl IntoIterator<Item = Outgoing>) {
        for o in pending {
            if o.expired() {
                let _ = o.reply.send(Err(ClientError::PublishExpired));
            } else if self.unacked.len() >= RETRY_QUEUE {
                let _ = o.reply.send(Err(ClientError::Disconnected));
            } else {
                self.unacked.push_back(o);
            }
        }
    }

    /// Fail the queued publishes the gateway may have forgotten the key of;
    /// when the next one expires.
    fn expire_unacked(&mut self) -> Option<Instant> {
        let (expired, kept) = self.unacked.drain(..).partition(Outgoing::expired);
        self.unacked = kept;
        for o in Vec::from(expired) {
            let _ = o.reply.send(Err(ClientError::PublishExpired));
        }
        self.unacked.iter().map(|o| o.since + RETRY_WINDOW).min()
    }
}

/// A publish that has no `ack` yet, kept whole so that it can be sent again
/// with the same key.
pub(crate) struct Outgoing {
    room: String,
    data: Box<RawValue>,
    key: String,
    reply: Reply<u64>,
    /// When it was first sent.
    since: Instant,
    /// `timeout` answers so far.
    timeouts: u32,
    /// Times sent so far: after the first, an `unavailable` or
    /// `rate_limited` answer no longer means "not published" (an earlier
    /// send may have been), so it is sent again later instead.
    sends: u32,
}

impl Outgoing {
    /// Too old to send again: the gateway may have forgotten its key.
    fn expired(&self) -> bool {
        self.since.elapsed() >= RETRY_WINDOW
    }
}

/// The key prefix of one client instance: 16 random characters from the
/// operating system (never the seeded backoff rng, so that two clients
/// configured with the same `rng_seed` still get different keys).
fn key_prefix() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 16)
}

/// A request sent on the current connection, waiting for its answer.
enum Pending {
    Join {
        room: String,
    },
    /// A presence query: the application's (with its reply), or the
    /// client's own after a join (reported as an event).
    Presence {
        reply: Option<Reply<PresenceInfo>>,
    },
    Leave {
        reply: Reply<()>,
    },
    Publish(Outgoing),
    Refresh,
}

/// The connection task.
pub(crate) struct Driver {
    cfg: ClientConfig,
    cmds: UnboundedReceiver<Command>,
    app: AppSide,
    tokens: Tokens,
    backoff: Backoff,
    rng: StdRng,
    next_url: usize,
    next_id: u64,
    /// Every publish's key is this prefix, a dot and a counter.
    key_prefix: String,
    next_key: u64,
    /// Told the outcome of the first connection round (for `connect`).
    first: Option<oneshot::Sender<Result<(), ClientError>>>,
    first_failures: usize,
}

impl Driver {
    pub(crate) fn new(
        cfg: ClientConfig,
        cmds: UnboundedReceiver<Command>,
        events: UnboundedSender<Event>,
        first: Option<oneshot::Sender<Result<(), ClientError>>>,
    ) -> Driver {
        let rng = match cfg.rng_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Driver {
            tokens: Tokens {
                source: cfg.token.clone(),
                cached: None,
                stale: false,
            },
            backoff: cfg.backoff.clone(),
            cmds,
            app: AppSide {
                tracker: RoomTracker::default(),
                waiters: HashMap::new(),
                events,
                unacked: VecDeque::new(),
            },
            rng,
            next_url: 0,
            next_id: 0,
            key_prefix: key_prefix(),
            next_key: 0,
            first,
            first_failures: 0,
            cfg,
        }
    }

    /// Connect, serve, reconnect, until the application closes.
    pub(crate) async fn run(mut self) {
        let done = loop {
            let url = self.cfg.urls[self.next_url % self.cfg.urls.len()].clone();
            self.next_url = self.next_url.wrapping_add(1);
            let attempt = {
                let connecting = establish(&self.cfg, &mut self.tokens, &url);
                tokio::pin!(connecting);
                loop {
                    tokio::select! {
                        r = &mut connecting => break Ok(r),
                        cmd = self.cmds.recv() => {
                            if let Flow::Stop(reply) = self.app.offline(cmd) {
                                break Err(reply);
                            }
                        }
                    }
                }
            };
            let attempt = match attempt {
                Ok(a) => a,
                Err(reply) => break reply,
            };
            match attempt {
                Ok((wire, welcome)) => {
                    let up_since = Instant::now();
                    match self.session(wire, welcome, &url).await {
                        SessionEnd::Stop(reply) => break reply,
                        SessionEnd::Dropped { code, reason } => {
                            debug!(?code, %reason, "connection ended");
                            if code == Some(close::TOKEN_EXPIRED) && self.tokens.is_callback() {
                                self.tokens.stale = true;
                            }
                            self.app.emit(Event::Disconnected { code, reason });
                            self.backoff.connection_lasted(up_since.elapsed());
                        }
                    }
                }
                Err(f) => {
                    debug!(%url, reason = %f.reason, "connection attempt failed");
                    if f.status == Some(401) && self.tokens.is_callback() {
                        self.tokens.stale = true;
                    }
                    self.first_failures += 1;
                    if self.first_failures >= self.cfg.urls.len() {
                        if let Some(first) = self.first.take() {
                            let _ = first.send(Err(ClientError::Connect {
                                url,
                                status: f.status,
                                reason: f.reason,
                            }));
                            break None;
                        }
                    }
                    self.app.emit(Event::ConnectFailed {
                        url,
                        status: f.status,
                        reason: f.reason,
                    });
                }
            }
            let delay = self.backoff.next_delay(&mut self.rng);
            self.app.emit(Event::Reconnecting {
                attempt: self.backoff.attempt(),
                delay,
            });
            let wake = Instant::now() + delay;
            let stop = loop {
                let expiry = self.app.expire_unacked();
                tokio::select! {
                    _ = sleep_until(wake) => break None,
                    _ = sleep_until(expiry.unwrap_or(wake)), if expiry.is_some_and(|t| t < wake) => {}
                    cmd = self.cmds.recv() => {
                        if let Flow::Stop(reply) = self.app.offline(cmd) {
                            break Some(reply);
                        }
                    }
                }
            };
            if let Some(reply) = stop {
                break reply;
            }
        };
        self.app.close_all();
        // Fail whatever is still queued, then let `close` return.
        self.cmds.close();
        while let Ok(cmd) = self.cmds.try_recv() {
            refuse(cmd);
        }
        if let Some(reply) = done {
            let _ = reply.send(());
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Serve one connection until it ends.
    async fn session(&mut self, wire: Wire, welcome: Welcome, url: &str) -> SessionEnd {
        let Wire {
            incoming: mut stream,
            out,
            writer,
            compressed,
            transport,
        } = wire;
        let mut s = Session {
            out,
            transport,
            pending: HashMap::new(),
            deadlines: HashMap::new(),
            retry_joins: HashMap::new(),
            retry_publishes: Vec::new(),
            request_timeout: self.cfg.request_timeout,
            presence: self.cfg.presence,
        };
        self.app.emit(Event::Connected {
            url: url.to_owned(),
            node: welcome.node.clone(),
            conn: welcome.conn.clone(),
            user: welcome.user.clone(),
            heartbeat_ms: welcome.heartbeat_ms,
            compressed,
            transport,
        });
        // `connect` returns after the `Connected` event is queued.
        if let Some(first) = self.first.take() {
            let _ = first.send(Ok(()));
        }
        for room in self.app.tracker.rooms() {
            let id = self.id();
            s.send_join(&mut self.app.tracker, &room, id);
        }
        // Then the publishes the last connection left without an `ack`,
        // with their keys: the gateway answers one it already took with
        // its first seq.
        self.app.expire_unacked();
        for o in std::mem::take(&mut self.app.unacked) {
            let id = self.id();
            s.send_publish(id, o);
        }
        let silence = Duration::from_millis(welcome.heartbeat_ms) + self.cfg.heartbeat_margin;
        let mut last_frame = Instant::now();
        let mut refresh_at = self.next_refresh();
        let mut refreshing: Option<JoinHandle<Result<String, String>>> = None;
        let mut close_frame: Option<(u16, String)> = None;
        // After the server's Close, how long to wait for it to end the TCP
        // connection.
        let mut linger_until: Option<Instant> = None;
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);

        let end = loop {
            let next_deadline = s.deadlines.values().min().copied();
            let next_retry = s.retry_joins.values().min().copied();
            let next_resend = s.retry_publishes.iter().map(|(t, _)| *t).min();
            tokio::select! {
                msg = stream.next() => {
                    last_frame = Instant::now();
                    match msg {
                        Some(Ok(Incoming::Frame(text))) => {
                            match ServerFrame::parse(&text) {
                                Ok(frame) => {
                                    if let Some(next) = self.on_frame(&mut s, frame) {
                                        refresh_at = next;
                                    }
                                }
                                Err(e) => debug!(error = %e, "unreadable frame ignored"),
                            }
                        }
                        Some(Ok(Incoming::Close(code, reason))) => {
                            close_frame = Some((code, reason));
                            linger_until.get_or_insert(Instant::now() + CLOSE_LINGER);
                        }
                        Some(Ok(Incoming::Alive)) => {}
                        Some(Err(e)) => {
                            break match close_frame.take() {
                                Some((code, reason)) => SessionEnd::Dropped { code: Some(code), reason },
                                None => SessionEnd::Dropped { code: None, reason: format!("connection error: {e}") },
                            };
                        }
                        None => {
                            break match close_frame.take() {
                                Some((code, reason)) => SessionEnd::Dropped { code: Some(code), reason },
                                None => SessionEnd::Dropped { code: None, reason: "connection ended without a Close frame".into() },
                            };
                        }
                    }
                }
                _ = sleep_until(linger_until.unwrap_or_else(far)), if linger_until.is_some() => {
                    let (code, reason) = close_frame.take().unwrap_or((1005, String::new()));
                    break SessionEnd::Dropped { code: Some(code), reason };
                }
                _ = sleep_until(last_frame + silence) => {
                    break SessionEnd::Dropped {
                        code: None,
                        reason: format!("no frame for {} ms (heartbeat timeout)", silence.as_millis()),
                    };
                }
                cmd = self.cmds.recv() => {
                    match cmd {
                        None => break self.close_session(&mut s, &mut stream, None).await,
                        Some(Command::Close { reply }) => {
                            break self.close_session(&mut s, &mut stream, Some(reply)).await;
                        }
                        Some(cmd) => self.online(&mut s, cmd),
                    }
                }
                _ = sleep_until(next_deadline.unwrap_or_else(far)), if next_deadline.is_some() => {
                    self.expire(&mut s);
                }
                _ = sleep_until(next_retry.unwrap_or_else(far)), if next_retry.is_some() => {
                    let now = Instant::now();
                    let due: Vec<String> = s.retry_joins.iter().filter(|(_, t)| **t <= now).map(|(r, _)| r.clone()).collect();
                    for room in due {
                        s.retry_joins.remove(&room);
                        if self.app.tracker.has(&room) {
                            let id = self.id();
                            s.send_join(&mut self.app.tracker, &room, id);
                        }
                    }
                }
                _ = sleep_until(next_resend.unwrap_or_else(far)), if next_resend.is_some() => {
                    let now = Instant::now();
                    let (due, later) = std::mem::take(&mut s.retry_publishes).into_iter().partition(|(t, _)| *t <= now);
                    s.retry_publishes = later;
                    for (_, o) in due {
                        if o.expired() {
                            let _ = o.reply.send(Err(ClientError::PublishExpired));
                        } else {
                            let id = self.id();
                            s.send_publish(id, o);
                        }
                    }
                }
                _ = sleep_until(refresh_at.unwrap_or_else(far)), if refresh_at.is_some() && refreshing.is_none() => {
                    refresh_at = None;
                    if let TokenSource::Callback(cb) = &self.tokens.source {
                        let fut = cb();
                        let limit = self.cfg.connect_timeout;
                        refreshing = Some(tokio::spawn(async move {
                            match timeout(limit, fut).await {
                                Ok(Ok(t)) => Ok(t),
                                Ok(Err(e)) => Err(format!("token callback failed: {e}")),
                                Err(_) => Err("token callback timed out".to_owned()),
                            }
                        }));
                    }
                }
                got = async { match refreshing.as_mut() { Some(h) => h.await, None => std::future::pending().await } } => {
                    refreshing = None;
                    match got {
                        Ok(Ok(token)) => {
                            self.tokens.cached = Some(token.clone());
                            // SSE: the POST with this frame, and the ones after, carry it.
                            let _ = s.out.send(Outbound::Token(token.clone()));
                            let id = self.id();
                            s.send(ClientRequest::Refresh { token, id: Some(num(id)) });
                            s.pending.insert(id, Pending::Refresh);
                        }
                        Ok(Err(reason)) => {
                            self.app.emit(Event::TokenRefreshFailed { reason });
                            refresh_at = self.retry_refresh();
                        }
                        Err(e) => {
                            self.app.emit(Event::TokenRefreshFailed { reason: format!("token callback panicked: {e}") });
                            refresh_at = self.retry_refresh();
                        }
                    }
                }
            }
        };
        if let Some(h) = refreshing {
            h.abort();
        }
        drop(s.out);
        let _ = timeout(Duration::from_secs(1), writer).await;
        let mut unacked = Vec::new();
        for (id, p) in s.pending {
            match p {
                Pending::Publish(o) => unacked.push((id, o)),
                // The room is not joined any more on a closed connection.
                Pending::Leave { reply } => {
                    let _ = reply.send(Ok(()));
                }
                Pending::Presence { reply: Some(reply) } => {
                    let _ = reply.send(Err(ClientError::Disconnected));
                }
                Pending::Join { .. } | Pending::Refresh | Pending::Presence { reply: None } => {}
            }
        }
        // Sent again after the reconnect, in the order they were sent.
        unacked.sort_unstable_by_key(|(id, _)| *id);
        self.app.keep_unacked(unacked.into_iter().map(|(_, o)| o));
        self.app
            .keep_unacked(s.retry_publishes.into_iter().map(|(_, o)| o));
        self.app.tracker.disconnected();
        end
    }

    /// Send Close 1000 and wait (briefly) for the server's reply.
    async fn close_session(
        &mut self,
        s: &mut Session,
        stream: &mut futures_util::stream::BoxStream<'static, Result<Incoming, String>>,
        reply: Option<oneshot::Sender<()>>,
    ) -> SessionEnd {
        let _ = s.out.send(Outbound::Close);
        // A WebSocket node answers the Close and ends the connection; an SSE
        // stream just ends when it is dropped.
        if s.transport == Transport::WebSocket {
            let _ = timeout(Duration::from_secs(2), async {
                while let Some(Ok(_)) = stream.next().await {}
            })
            .await;
        }
        for (_, p) in s.pending.drain() {
            match p {
                Pending::Publish(o) => {
                    let _ = o.reply.send(Err(ClientError::Closed));
                }
                Pending::Leave { reply } => {
                    let _ = reply.send(Err(ClientError::Closed));
                }
                Pending::Presence { reply: Some(reply) } => {
                    let _ = reply.send(Err(ClientError::Closed));
                }
                Pending::Join { .. } | Pending::Refresh | Pending::Presence { reply: None } => {}
            }
        }
        SessionEnd::Stop(reply)
    }

    /// When to refresh the cached token, if refreshing early is on.
    fn next_refresh(&self) -> Option<Instant> {
        let margin = self.cfg.refresh_margin?;
        if !self.tokens.is_callback() {
            return None;
        }
        let exp = jwt_exp(self.tokens.cached.as_deref()?)?;
        Some(Instant::now() + refresh_delay(exp, now_ms(), margin))
    }

    /// After a failed refresh: try again in a few seconds while the token
    /// still has that long to live.
    fn retry_refresh(&self) -> Option<Instant> {
        let exp = jwt_exp(self.tokens.cached.as_deref()?)?;
        let left = Duration::from_millis(exp.saturating_mul(1000).saturating_sub(now_ms()));
        let wait = Duration::from_secs(5).min(left / 2);
        (wait >= Duration::from_millis(100)).then(|| Instant::now() + wait)
    }

    /// A command while connected.
    fn online(&mut self, s: &mut Session, cmd: Command) {
        match cmd {
            Command::Join {
                room,
                resume,
                reply,
            } => {
                let fresh = resume.is_none();
                if fresh && self.app.tracker.is_joined(&room) {
                    if let Some((seq, epoch)) = self.app.position(&room) {
                        let _ = reply.send(Ok(JoinInfo {
                            room,
                            seq,
                            epoch,
                            recovered: None,
                        }));
                        return;
                    }
                }
                self.app.tracker.want(&room, resume);
                self.app
                    .waiters
                    .entry(room.clone())
                    .or_default()
                    .push(reply);
                let in_flight = s
                    .pending
                    .values()
                    .any(|p| matches!(p, Pending::Join { room: r } if *r == room));
                if !in_flight || !fresh {
                    let id = self.id();
                    s.send_join(&mut self.app.tracker, &room, id);
                }
            }
            Command::Leave { room, reply } => {
                if !self.app.tracker.unwant(&room) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                self.app
                    .answer_waiters(&room, || Err(ClientError::Cancelled));
                s.retry_joins.remove(&room);
                let id = self.id();
                s.send(ClientRequest::Leave {
                    room,
                    id: Some(num(id)),
                });
                s.track(id, Pending::Leave { reply });
            }
            Command::Publish { room, data, reply } => {
                self.next_key += 1;
                let key = format!("{}.{}", self.key_prefix, self.next_key);
                let id = self.id();
                s.send_publish(
                    id,
                    Outgoing {
                        room,
                        data,
                        key,
                        reply,
                        since: Instant::now(),
                        timeouts: 0,
                        sends: 0,
                    },
                );
            }
            Command::Position { room, reply } => {
                let _ = reply.send(self.app.position(&room));
            }
            Command::Presence { room, reply } => {
                let id = self.id();
                s.send_presence(&room, id, Some(reply));
            }
            // Handled by the session loop.
            Command::Close { reply } => {
                let _ = reply.send(());
            }
        }
    }

    /// Requests whose answer is overdue get `Timeout`.
    fn expire(&mut self, s: &mut Session) {
        let now = Instant::now();
        let overdue: Vec<u64> = s
            .deadlines
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            s.deadlines.remove(&id);
            match s.pending.remove(&id) {
                Some(Pending::Publish(o)) => {
                    let _ = o.reply.send(Err(ClientError::Timeout));
                }
                Some(Pending::Leave { reply }) => {
                    let _ = reply.send(Err(ClientError::Timeout));
                }
                Some(Pending::Join { room }) => {
                    // The room stays wanted: a late answer (or the next
                    // connection) still joins it.
                    self.app.answer_waiters(&room, || Err(ClientError::Timeout));
                    s.pending.insert(id, Pending::Join { room });
                }
                Some(Pending::Presence { reply }) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(ClientError::Timeout));
                    }
                }
                Some(Pending::Refresh) | None => {}
            }
        }
    }

    /// Handle one server frame; returns a new refresh time after `refreshed`.
    fn on_frame(&mut self, s: &mut Session, frame: ServerFrame) -> Option<Option<Instant>> {
        let id = frame.id().and_then(id_num);
        let pending = id.and_then(|id| {
            s.deadlines.remove(&id);
            s.pending.remove(&id)
        });
        match frame {
            ServerFrame::Message(m) => {
                let effect = self.app.tracker.on_message(&m);
                if let Some(gap) = effect.gap {
                    self.app.emit(Event::Gap(gap));
                }
                if effect.deliver {
                    self.app.emit(Event::Message(m));
                }
            }
            ServerFrame::Joined(j) => {
                let effect = self.app.tracker.on_joined(&j);
                if let Some(gap) = effect.gap {
                    self.app.emit(Event::Gap(gap));
                }
                if let Some(recovered) = effect.resumed {
                    self.app.emit(Event::Resumed {
                        room: j.room.clone(),
                        recovered,
                    });
                }
                if j.id.is_some() && self.cfg.presence && self.app.tracker.has(&j.room) {
                    // Events are not replayed: ask again after every join.
                    let id = self.id();
                    s.send_presence(&j.room, id, None);
                }
                if j.id.is_some() && self.app.tracker.has(&j.room) {
                    let info = JoinInfo {
                        room: j.room.clone(),
                        seq: j.seq,
                        epoch: j.epoch.clone(),
                        recovered: j.recovered,
                    };
                    self.app.answer_waiters(&j.room, || Ok(info.clone()));
                }
            }
            ServerFrame::Ack(a) => {
                if let Some(Pending::Publish(o)) = pending {
                    let _ = o.reply.send(Ok(a.seq));
                }
            }
            ServerFrame::Left(_) => {
                if let Some(Pending::Leave { reply }) = pending {
                    let _ = reply.send(Ok(()));
                }
            }
            ServerFrame::Refreshed(r) => {
                self.app.emit(Event::TokenRefreshed { exp: r.exp });
                return Some(self.next_refresh());
            }
            ServerFrame::Error(e) => return self.on_error(s, pending, e),
            ServerFrame::Presence(p) => match pending {
                Some(Pending::Presence { reply: Some(reply) }) => {
                    let _ = reply.send(Ok(p.into()));
                }
                _ => self.app.emit(Event::Presence(p.into())),
            },
            ServerFrame::PresenceJoin(e) => self.app.emit(Event::PresenceJoin {
                room: e.room,
                user: e.user,
            }),
            ServerFrame::PresenceLeave(e) => self.app.emit(Event::PresenceLeave {
                room: e.room,
                user: e.user,
            }),
            ServerFrame::Welcome(_) | ServerFrame::Pong(_) => {}
        }
        None
    }

    fn on_error(
        &mut self,
        s: &mut Session,
        pending: Option<Pending>,
        e: ErrorFrame,
    ) -> Option<Option<Instant>> {
        let err = || ClientError::Server {
            code: e.code,
            message: e.message.clone(),
        };
        match pending {
            Some(Pending::Publish(mut o)) => {
                // Fate unknown: the same key makes sending it again safe.
                let refused_again =
                    matches!(e.code, ErrorCode::Unavailable | ErrorCode::RateLimited);
                if o.expired() {
                    let _ = o.reply.send(Err(err()));
                } else if e.code == ErrorCode::Timeout && o.timeouts < TIMEOUT_RETRIES {
                    o.timeouts += 1;
                    debug!(room = %o.room, attempt = o.timeouts, "publish timed out in the broker; sending it again with its key");
                    let id = self.id();
                    s.send_publish(id, o);
                } else if refused_again && o.sends > 1 {
                    // An earlier send may have been published: this refusal
                    // does not say it was not, so try again later.
                    let wait = self
                        .cfg
                        .backoff
                        .base()
                        .saturating_mul(1 << o.sends.min(8))
                        .min(self.cfg.backoff.cap());
                    s.retry_publishes.push((Instant::now() + wait, o));
                } else {
                    let _ = o.reply.send(Err(err()));
                }
            }
            Some(Pending::Leave { reply }) => {
                let _ = reply.send(Err(err()));
            }
            Some(Pending::Presence { reply: Some(reply) }) => {
                let _ = reply.send(Err(err()));
            }
            Some(Pending::Presence { reply: None }) => {
                debug!(
                    code = e.code.as_str(),
                    "presence query after a join refused"
                );
            }
            Some(Pending::Join { room }) => {
                let app_waiting = self.app.waiters.contains_key(&room);
                let retry =
                    e.code == ErrorCode::Unavailable && self.app.tracker.has_position(&room);
                if app_waiting {
                    self.app.answer_waiters(&room, || Err(err()));
                }
                if retry {
                    // A room joined before: keep it and try again.
                    s.retry_joins
                        .insert(room.clone(), Instant::now() + self.cfg.backoff.base() * 2);
                    if !app_waiting {
                        self.app.emit(Event::JoinFailed {
                            room,
                            code: e.code,
                            message: e.message.clone(),
                            retrying: true,
                        });
                    }
                } else if self.app.tracker.unwant(&room) && !app_waiting {
                    self.app.emit(Event::JoinFailed {
                        room,
                        code: e.code,
                        message: e.message.clone(),
                        retrying: false,
                    });
                }
            }
            Some(Pending::Refresh) => {
                self.app.emit(Event::TokenRefreshFailed {
                    reason: format!("{}: {}", e.code.as_str(), e.message),
                });
                return Some(self.retry_refresh());
            }
            None => debug!(code = e.code.as_str(), message = %e.message, "error frame"),
        }
        None
    }
}

/// Per-connection request bookkeeping.
struct Session {
    out: UnboundedSender<Outbound>,
    transport: Transport,
    pending: HashMap<u64, Pending>,
    deadlines: HashMap<u64, Instant>,
    /// Rooms whose re-join got `unavailable`, with when to try again.
    retry_joins: HashMap<String, Instant>,
    /// Publishes sent more than once that got `unavailable` or
    /// `rate_limited`, with when to send them again.
    retry_publishes: Vec<(Instant, Outgoing)>,
    request_timeout: Duration,
    /// Joins ask for presence events ([`ClientConfig::presence`]).
    presence: bool,
}

impl Session {
    fn send(&self, req: ClientRequest) {
        let _ = self.out.send(Outbound::Frame(req.to_json()));
    }

    fn track(&mut self, id: u64, p: Pending) {
        self.deadlines
            .insert(id, Instant::now() + self.request_timeout);
        self.pending.insert(id, p);
    }

    fn send_publish(&mut self, id: u64, mut o: Outgoing) {
        o.sends += 1;
        self.send(ClientRequest::Publish {
            room: o.room.clone(),
            data: o.data.clone(),
            key: Some(o.key.clone()),
            id: Some(num(id)),
        });
        self.track(id, Pending::Publish(o));
    }

    fn send_presence(&mut self, room: &str, id: u64, reply: Option<Reply<PresenceInfo>>) {
        self.send(ClientRequest::Presence {
            room: room.to_owned(),
            id: Some(num(id)),
        });
        self.track(id, Pending::Presence { reply });
    }

    fn send_join(&mut self, tracker: &mut RoomTracker, room: &str, id: u64) {
        let (since, epoch) = tracker.join_args(room);
        self.send(ClientRequest::Join {
            room: room.to_owned(),
            since,
            epoch,
            presence: self.presence,
            id: Some(num(id)),
        });
        self.track(
            id,
            Pending::Join {
                room: room.to_owned(),
            },
        );
    }
}

fn num(id: u64) -> Id {
    Id::Num(id.into())
}

fn id_num(id: &Id) -> Option<u64> {
    match id {
        Id::Num(n) => n.as_u64(),
        Id::Str(_) => None,
    }
}

/// Answer a command that arrives after the driver stopped.
fn refuse(cmd: Command) {
    match cmd {
        Command::Join { reply, .. } => {
            let _ = reply.send(Err(ClientError::Closed));
        }
        Command::Leave { reply, .. } => {
            let _ = reply.send(Err(ClientError::Closed));
        }
        Command::Publish { reply, .. } => {
            let _ = reply.send(Err(ClientError::Closed));
        }
        Command::Position { reply, .. } => {
            let _ = reply.send(None);
        }
        Command::Presence { reply, .. } => {
            let _ = reply.send(Err(ClientError::Closed));
        }
        Command::Close { reply } => {
            let _ = reply.send(());
        }
    }
}

/// One connection attempt: the token, then the wire up to `welcome`.
async fn establish(
    cfg: &ClientConfig,
    tokens: &mut Tokens,
    url: &str,
) -> Result<(Wire, Welcome), Failure> {
    let token = tokens.for_connect(cfg.connect_timeout).await?;
    wire::establish(cfg, &token, url).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_comes_a_margin_before_exp_but_not_before_half_life() {
        let now = 1_000_000_000;
        // An hour left, margin 60 s: refresh after 59 minutes.
        assert_eq!(
            refresh_delay(now / 1000 + 3600, now, Duration::from_secs(60)),
            Duration::from_secs(3540)
        );
        // 4 s left: half of it, not "already late".
        assert_eq!(
            refresh_delay(now / 1000 + 4, now, Duration::from_secs(60)),
            Duration::from_secs(2)
        );
        // Expired: at once.
        assert_eq!(
            refresh_delay(now / 1000 - 10, now, Duration::from_secs(60)),
            Duration::ZERO
        );
    }
}
