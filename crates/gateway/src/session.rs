//! One connection's protocol state machine, over a [`Transport`].
//!
//! The session owns the connection's state (claims, rooms, rate buckets,
//! heartbeat and expiry timers) and answers every client frame; it runs in
//! the connection's one task, which also drives the transport's reads and
//! writes. Everything it and the rooms send goes through the connection's
//! [`ConnHandle`] (written straight into the socket, or queued behind what
//! is already queued), so answers and room messages keep their order.
//! Closing is started by setting a close reason on the handle; the session
//! then has the transport send the Close and waits a moment for the reply.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;
use serde_json::value::RawValue;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, Instrument};
use wsgate_protocol::server::Id;
use wsgate_protocol::{
    close, parse_client_frame, Ack, ClientCommand, ErrorCode, ErrorFrame, Left, MessageParts, Pong,
    Refreshed, ServerFrame, Welcome,
};

use crate::auth::Claims;
use crate::broker::control::DISCONNECTED;
use crate::broker::{BrokerError, Since};
use crate::limits::Bucket;
use crate::outbound::{CloseReason, ConnHandle};
use crate::state::{App, Slot};
use crate::transport::{ClientEvent, Transport};
use crate::ws::WsTransport;

/// How long a closing connection waits for the client's Close reply.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The farthest deadline a session sets (about 30 years): a token's `exp`
/// may be anything up to `u64::MAX`, and `Instant` arithmetic must not
/// overflow on it.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `t + d`, saturating at [`FAR_FUTURE`] from `t` instead of panicking.
fn later(t: Instant, d: Duration) -> Instant {
    // `t + FAR_FUTURE` is far inside `Instant`'s range (i64 seconds).
    t.checked_add(d.min(FAR_FUTURE)).unwrap_or(t)
}

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

/// Build a connection's session and transport from an upgraded socket;
/// `compress_from` when permessage-deflate was negotiated.
pub(crate) fn start(
    upgraded: hyper::upgrade::Upgraded,
    app: Arc<App>,
    claims: Claims,
    remote: &str,
    slot: Slot,
    compress_from: Option<usize>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let conn_id = app.next_conn_id();
    let (transport, handle) = WsTransport::new(
        upgraded,
        &conn_id,
        app.config.limits.max_outbound_bytes,
        app.config.limits.max_message_bytes,
        app.metrics.clone(),
        compress_from,
    );
    run(app, claims, slot, handle, transport, conn_id, remote)
}

/// Run a connection's session over `transport`, whose handle is `handle`.
pub(crate) fn run<T: Transport + 'static>(
    app: Arc<App>,
    claims: Claims,
    slot: Slot,
    handle: Arc<ConnHandle>,
    transport: T,
    conn_id: String,
    remote: &str,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let span = tracing::info_span!(
        "conn",
        conn = %conn_id,
        user = %claims.sub,
        node = %app.config.node_id,
        remote = %remote,
        transport = T::NAME,
    );
    Session::new(app, claims, slot, handle)
        .run(transport, conn_id)
        .instrument(span)
}

fn expiry_instant(exp: u64, leeway: Duration) -> Instant {
    let deadline = Duration::from_secs(exp).saturating_add(leeway);
    let now = Duration::from_secs(now_secs());
    later(Instant::now(), deadline.saturating_sub(now))
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
}

struct Session {
    /// The connection's place under `--max-connections`, released with the session.
    _slot: Slot,
    app: Arc<App>,
    handle: Arc<ConnHandle>,
    claims: Claims,
    rooms: RoomSet,
    /// Publishes of this connection (the user's shared bucket is in `app.limits`).
    bucket: Bucket,
    /// Joins of this connection.
    joins: Bucket,
    expires: Instant,
}

/// The drop guard: however the session ends (its loop returning, a panic,
/// its task aborted or its future dropped in the middle of an `.await`),
/// it releases its memberships with their broker subscriptions and its
/// entry in the connection registry; the slot is released with `_slot`.
/// Both steps are idempotent, so the normal end path may run them first.
impl Drop for Session {
    fn drop(&mut self) {
        self.leave_all();
        self.app.conns.remove(&self.claims.sub, &self.handle);
        self.app.limits.detach(&self.claims.sub);
    }
}

/// What ended the read loop, for the log.
type Ended = &'static str;

impl Session {
    fn new(app: Arc<App>, claims: Claims, slot: Slot, handle: Arc<ConnHandle>) -> Box<Session> {
        // Released by the drop guard, with the rest.
        app.limits.attach(&claims.sub);
        Box::new(Session {
            bucket: Bucket::new(app.config.publish_limit()),
            joins: Bucket::new(app.config.join_limit()),
            expires: expiry_instant(claims.exp, app.verifier.leeway()),
            rooms: RoomSet::default(),
            handle,
            claims,
            app,
            _slot: slot,
        })
    }

    /// The connection's one task: the protocol, and the transport's reads
    /// and writes.
    async fn run<T: Transport>(mut self: Box<Self>, mut transport: T, conn_id: String) {
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
            heartbeat_ms: app.config.limits.heartbeat.as_millis() as u64,
            transport: (T::NAME != "ws").then(|| T::NAME.to_owned()),
        }));
        let ended = self.serve(&mut transport).await;
        handle.end();
        self.leave_all();
        app.conns.remove(&self.claims.sub, &handle);
        // Boxed, like the closing below: the end of a connection needs its
        // own timers, and an idle connection's task need not hold them.
        Box::pin(transport.finish()).await;
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
        self.handle.send(self.handle.text(&frame.to_json()));
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

    /// Have the transport send the server's Close, if the server closes.
    async fn send_close<T: Transport>(&self, transport: &mut T) {
        if let Some(reason) = self.handle.close_reason() {
            self.app.metrics.closed(reason.code);
            transport.close(reason).await;
        }
    }

    /// Answer client events until the connection ends; the heartbeat,
    /// token expiry and closing linger run here too.
    async fn serve<T: Transport>(&mut self, transport: &mut T) -> Ended {
        let heartbeat = self.app.config.limits.heartbeat;
        let pong_timeout = self.app.config.limits.pong_timeout;
        let mut next_ping = later(Instant::now(), heartbeat);
        // When a Ping went out with nothing heard since.
        let mut awaiting: Option<Instant> = None;
        let mut closing_since: Option<Instant> = None;
        // One timer for heartbeat, expiry and the closing linger, created
        // once, and the handle's closing flag polled in place of a `Notify`
        // future: an idle connection's state stays small.
        let handle = self.handle.clone();
        let timer = sleep_until(next_ping);
        tokio::pin!(timer);
        loop {
            let deadline = match closing_since {
                Some(since) => since + CLOSE_LINGER,
                None => awaiting
                    .map_or(next_ping, |sent| later(sent, pong_timeout).min(next_ping))
                    .min(self.expires),
            };
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                _ = std::future::poll_fn(|cx| handle.poll_closed(cx)), if closing_since.is_none() => {
                    if self.handle.close_reason().is_none() {
                        return "write side ended";
                    }
                    Box::pin(self.send_close(transport)).await;
                    closing_since = Some(Instant::now());
                }
                _ = &mut timer => {
                    if closing_since.is_some() {
                        return "closing handshake timed out";
                    }
                    let now = Instant::now();
                    if now >= self.expires {
                        self.close(close::TOKEN_EXPIRED, "token expired");
                    } else if awaiting.is_some_and(|sent| now >= later(sent, pong_timeout)) {
                        // Do not wait for a silent peer's reply.
                        self.close(close::POLICY, "heartbeat timeout");
                        Box::pin(self.send_close(transport)).await;
                        return "heartbeat timeout";
                    } else if now >= next_ping {
                        self.handle.ping();
                        if T::ANSWERS_PINGS {
                            awaiting.get_or_insert(now);
                        }
                        next_ping = later(now, heartbeat);
                    }
                }
                event = transport.next_event() => {
                    if closing_since.is_some() {
                        match event {
                            ClientEvent::Closed | ClientEvent::Gone | ClientEvent::Violation(_) => {
                                return "connection ended";
                            }
                            _ => continue,
                        }
                    }
                    awaiting = None;
                    match event {
                        // Boxed: handling a frame needs far more state than
                        // waiting for one, and idle connections only wait.
                        ClientEvent::Text(text) => Box::pin(self.on_text(text)).await,
                        ClientEvent::Binary => {
                            self.close(close::UNSUPPORTED_DATA, "binary frames are not supported");
                        }
                        ClientEvent::Activity => {}
                        // The transport answered the client's Close.
                        ClientEvent::Closed => return "closed by the client",
                        ClientEvent::Violation(reason) => self.close(reason.code, reason.reason),
                        ClientEvent::Gone => return "connection ended",
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
            ClientCommand::Join { .. } if !self.joins.try_take(self.app.config.join_limit()) => {
                self.error(
                    ErrorCode::RateLimited,
                    "join rate limit exceeded; retry later",
                    id,
                )
            }
            ClientCommand::Join {
                room,
                since,
                epoch,
                presence,
            } => {
                self.join(room.clone(), since, epoch, id).await;
                // Presence hook: count the membership (if the join made
                // one), and set whether it receives presence events.
                if self.rooms.contains(&room) {
                    let app = &self.app;
                    app.presence
                        .join(&room, &self.claims.sub, &self.handle, presence);
                    app.presence.settled(&room, &self.claims.sub).await;
                }
            }
            ClientCommand::Presence { room } => self.presence(&room, id).await,
            ClientCommand::Leave { room } => self.leave(&room, id),
            ClientCommand::Publish { room, data, key } => {
                self.publish(&room, data, key.as_deref(), id).await
            }
            ClientCommand::Refresh { token } => self.refresh(&token, id).await,
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
        if !member && self.rooms.len() >= self.app.config.limits.max_rooms {
            return self.error(
                ErrorCode::TooManyRooms,
                format!(
                    "connection is at its limit of {} rooms",
                    self.app.config.limits.max_rooms
                ),
                id,
            );
        }
        // Recorded before the join awaits anything: the drop guard then
        // releases the membership even if this future is dropped mid-join.
        self.rooms.insert(Arc::from(room.as_ref()));
        let since = since.map(|seq| Since {
            seq,
            epoch: epoch.as_deref(),
        });
        let patience = self
            .app
            .config
            .limits
            .heartbeat
            .saturating_add(self.app.config.limits.pong_timeout);
        let joined = self
            .app
            .rooms
            .join(&room, &self.handle, since, id.clone(), patience)
            .await;
        if let Err(e) = joined {
            if !member {
                // Rooms already left the room again.
                self.rooms.remove(room.as_ref());
            }
            self.error(ErrorCode::Unavailable, format!("{e}; retry later"), id);
        }
    }

    fn leave(&mut self, room: &str, id: Option<Id>) {
        if self.rooms.remove(room) {
            self.release(room);
        }
        self.send(ServerFrame::Left(Left {
            room: room.to_owned(),
            id,
        }));
    }

    /// Give up a membership already taken out of `self.rooms`.
    fn release(&self, room: &str) {
        self.app.presence.leave(room, &self.handle);
        self.app.rooms.leave(room, &self.handle);
    }

    fn leave_all(&mut self) {
        for room in std::mem::take(&mut self.rooms.0) {
            self.release(&room);
        }
    }

    /// After a `refresh`: leave every room the new grants no longer cover,
    /// each answered with an unsolicited `left` (no `id`).
    fn leave_ungranted(&mut self) {
        let rooms = &self.claims.rooms;
        let gone: Vec<Arc<str>> = self
            .rooms
            .0
            .iter()
            .filter(|r| !rooms.allows(r))
            .cloned()
            .collect();
        for room in gone {
            self.leave(&room, None);
        }
    }

    /// `presence`: needs the `rooms` grant, not membership.
    async fn presence(&self, room: &str, id: Option<Id>) {
        if !self.claims.rooms.allows(room) {
            return self.error(
                ErrorCode::Forbidden,
                format!("not allowed to read room '{room}'"),
                id,
            );
        }
        match self.app.presence.query(room).await {
            Ok(s) => self.send(ServerFrame::Presence(wsgate_protocol::Presence {
                room: room.to_owned(),
                count: s.count,
                truncated: s.truncated(),
                users: s.users,
                id,
            })),
            Err(e) => self.error(ErrorCode::Unavailable, format!("{e}; retry later"), id),
        }
    }

    async fn publish(&mut self, room: &str, data: &RawValue, key: Option<&str>, id: Option<Id>) {
        if !self.claims.publish.allows(room) {
            return self.error(
                ErrorCode::Forbidden,
                format!("not allowed to publish to room '{room}'"),
                id,
            );
        }
        let limit = self.app.config.publish_limit();
        if !self.bucket.try_take(limit) {
            return self.error(
                ErrorCode::RateLimited,
                "publish rate limit exceeded; message dropped",
                id,
            );
        }
        if self.app.limits.try_take(&self.claims.sub).is_err() {
            self.bucket.refund(limit);
            return self.error(
                ErrorCode::RateLimited,
                "publish rate limit of this user exceeded; message dropped",
                id,
            );
        }
        let parts = MessageParts::new(room, &self.claims.sub, data, now_ms());
        match self.app.publish(room, parts, key).await {
            Ok(seq) => self.send(ServerFrame::Ack(Ack {
                id,
                room: room.to_owned(),
                seq,
            })),
            Err(e @ BrokerError::Unavailable(_)) => {
                self.bucket.refund(limit);
                self.app.limits.refund(&self.claims.sub);
                self.error(
                    ErrorCode::Unavailable,
                    format!("{e}; message not delivered"),
                    id,
                )
            }
            Err(e @ BrokerError::Unconfirmed(_)) => {
                self.error(ErrorCode::Unavailable, e.to_string(), id)
            }
            Err(e @ BrokerError::Timeout(_)) => self.error(
                ErrorCode::Timeout,
                format!("{e}; the message may or may not be delivered (at most once)"),
                id,
            ),
        }
    }

    async fn refresh(&mut self, token: &str, id: Option<Id>) {
        let mut verified = self.app.verify_token(token);
        if let (Err(crate::auth::AuthError::UnknownKey), Some(jwks)) =
            (&verified, self.app.verifier.jwks_source())
        {
            // A key the provider has just published: verify again once the
            // fetch this token asked for is done.
            jwks.settle_unknown_kid().await;
            verified = self.app.verify_token(token);
        }
        match verified {
            Ok(claims) if claims.sub == self.claims.sub => {
                self.expires = expiry_instant(claims.exp, self.app.verifier.leeway());
                let exp = claims.exp;
                self.claims = claims;
                self.leave_ungranted();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::codec;

    #[test]
    fn expiry_includes_leeway() {
        let now = now_secs();
        let soon = expiry_instant(now + 10, Duration::from_secs(5));
        let left = soon.duration_since(Instant::now());
        assert!(left > Duration::from_secs(13) && left <= Duration::from_secs(15));
        let past = expiry_instant(now.saturating_sub(100), Duration::from_secs(5));
        assert!(past <= Instant::now());
    }

    #[test]
    fn a_huge_exp_saturates_instead_of_overflowing() {
        let far = expiry_instant(u64::MAX, Duration::from_secs(u64::MAX));
        assert!(far >= Instant::now() + Duration::from_secs(20 * 365 * 24 * 3600));
        let t = Instant::now();
        assert_eq!(later(t, Duration::MAX), later(t, FAR_FUTURE));
    }

    /// A broker whose subscriptions never become ready (a frozen Redis);
    /// `refs` counts the subscriptions rooms started and did not end.
    #[derive(Default)]
    struct StuckBroker {
        refs: std::sync::atomic::AtomicI64,
    }

    impl crate::broker::Broker for StuckBroker {
        fn publish<'a>(
            &'a self,
            _room: &'a str,
            _parts: MessageParts,
            _key: Option<&'a str>,
        ) -> crate::broker::BoxFut<'a, Result<crate::broker::Published, crate::broker::BrokerError>>
        {
            Box::pin(std::future::pending())
        }
        fn subscribe(&self, _room: &str) {
            self.refs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        fn ready<'a>(
            &'a self,
            _room: &'a str,
        ) -> crate::broker::BoxFut<'a, Result<(), crate::broker::BrokerError>> {
            Box::pin(std::future::pending())
        }
        fn unsubscribe(&self, _room: &str) {
            self.refs.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        fn history<'a>(
            &'a self,
            _room: &'a str,
            _since: Option<Since<'a>>,
        ) -> crate::broker::BoxFut<'a, Result<crate::broker::RoomHistory, crate::broker::BrokerError>>
        {
            Box::pin(std::future::pending())
        }
        fn replay_page<'a>(
            &'a self,
            _room: &'a str,
            _epoch: &'a str,
            _after: u64,
            _upto: u64,
        ) -> crate::broker::BoxFut<'a, Result<Vec<(u64, Utf8Bytes)>, crate::broker::BrokerError>>
        {
            Box::pin(std::future::pending())
        }
        fn range<'a>(
            &'a self,
            _room: &'a str,
            _since: u64,
            _limit: usize,
        ) -> crate::broker::BoxFut<'a, Result<crate::broker::HistoryPage, crate::broker::BrokerError>>
        {
            Box::pin(std::future::pending())
        }
        fn control<'a>(
            &'a self,
            _msg: &'a crate::broker::control::ControlMsg,
        ) -> crate::broker::BoxFut<'a, Result<(), crate::broker::BrokerError>> {
            Box::pin(std::future::pending())
        }
        fn is_up(&self) -> bool {
            true
        }
    }

    fn app_with(broker: Arc<dyn crate::broker::Broker>) -> Arc<App> {
        app_from(&[], |_, _| broker)
    }

    /// A node's state from these flags (and `--jwt-secret s`), with the
    /// broker `broker` builds for its rooms.
    fn app_from(
        flags: &[&str],
        broker: impl FnOnce(
            crate::rooms::Delivery,
            Arc<crate::metrics::Metrics>,
        ) -> Arc<dyn crate::broker::Broker>,
    ) -> Arc<App> {
        use clap::Parser;
        let args = ["wsgate", "--jwt-secret", "s"].iter().chain(flags);
        let cli = crate::config::Cli::try_parse_from(args).unwrap();
        let (config, _) = cli.serve.into_config().unwrap();
        let resources = crate::server::Resources::load(&config).unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new("n"));
        let conns = Arc::new(crate::state::Conns::default());
        let leeway = resources.verifier.leeway();
        let control = Arc::new(crate::broker::control::Control::new(
            conns.clone(),
            &config,
            leeway,
        ));
        let delivery = crate::rooms::Delivery::default();
        let broker = broker(delivery.clone(), metrics.clone());
        let rooms = crate::rooms::Rooms::new(metrics.clone(), broker.clone(), &delivery);
        Arc::new(App::new(
            config, &resources, metrics, rooms, broker, control, conns,
        ))
    }

    #[tokio::test]
    async fn a_session_aborted_mid_join_releases_everything_it_held() {
        let broker = Arc::new(StuckBroker::default());
        let app = app_with(broker.clone());
        let slot = app.try_slot("ws").unwrap();
        let handle = ConnHandle::new("c-1", 1 << 20, app.metrics.clone());
        app.conns.insert("alice", &handle);
        let claims = Claims {
            sub: "alice".into(),
            exp: u64::MAX,
            iat: None,
            rooms: crate::auth::Grants::from_patterns(["*"]),
            publish: crate::auth::Grants::from_patterns(["*"]),
        };
        let mut session = Session::new(app.clone(), claims, slot, handle);
        let task = tokio::spawn(async move {
            session.join(Cow::Borrowed("lobby"), None, None, None).await;
        });
        // Bounded wait for the join to be stuck in `subscribe`.
        for _ in 0..1000 {
            if app.rooms.member_count("lobby") == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(app.rooms.member_count("lobby"), 1, "join did not start");
        assert_eq!(broker.refs.load(std::sync::atomic::Ordering::SeqCst), 1);

        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());

        assert_eq!(app.rooms.member_count("lobby"), 0);
        assert_eq!(app.metrics.rooms_active.get(), 0);
        assert_eq!(broker.refs.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(app.conns.all().is_empty(), "connection still registered");
        assert_eq!(app.metrics.active("ws"), 0, "slot kept");
        assert!(app.limits.is_empty(), "user entry kept");
        // A later message of the room reaches no one and counts no delivery.
        let frame = Utf8Bytes::from(
            MessageParts::new(
                "lobby",
                "bob",
                &RawValue::from_string("1".into()).unwrap(),
                1,
            )
            .frame(1),
        );
        app.rooms.deliver("lobby", "e", 1, &frame);
        assert_eq!(app.metrics.messages_delivered.get(), 0);
    }

    /// A transport without a socket: the test feeds client events; the
    /// session's frames stay in its handle's queue.
    struct FakeTransport {
        events: tokio::sync::mpsc::UnboundedReceiver<ClientEvent>,
        closes: Arc<std::sync::Mutex<Vec<CloseReason>>>,
    }

    impl Transport for FakeTransport {
        const NAME: &'static str = "ws";
        const ANSWERS_PINGS: bool = true;

        async fn next_event(&mut self) -> ClientEvent {
            match self.events.recv().await {
                Some(e) => e,
                // The test is done sending: a client that stays silent.
                None => std::future::pending().await,
            }
        }
        async fn close(&mut self, reason: CloseReason) {
            self.closes.lock().unwrap().push(reason);
        }
        async fn finish(self) {}
    }

    /// A running session of `alice` (token valid for `ttl`) on a node with
    /// an in-process broker and these flags.
    struct Running {
        app: Arc<App>,
        handle: Arc<ConnHandle>,
        client: tokio::sync::mpsc::UnboundedSender<ClientEvent>,
        closes: Arc<std::sync::Mutex<Vec<CloseReason>>>,
        task: tokio::task::JoinHandle<()>,
    }

    fn token(_app: &App, sub: &str, ttl: Duration) -> String {
        let all = ["*".to_owned()];
        crate::auth::mint_hs256(
            b"s",
            &crate::auth::MintRequest {
                sub,
                rooms: &all,
                publish: &all,
                ttl,
                issuer: None,
                audience: None,
            },
        )
        .unwrap()
    }

    fn running(flags: &[&str], ttl: Duration) -> Running {
        let app = app_from(flags, |delivery, metrics| {
            Arc::new(crate::broker::memory::MemoryBroker::new(
                100,
                1 << 20,
                delivery,
                metrics,
            ))
        });
        let claims = app.verify_token(&token(&app, "alice", ttl)).unwrap();
        let handle = ConnHandle::new("c-1", 1 << 20, app.metrics.clone());
        let (client, events) = tokio::sync::mpsc::unbounded_channel();
        let closes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let transport = FakeTransport {
            events,
            closes: closes.clone(),
        };
        let slot = app.try_slot("ws").unwrap();
        let session = Session::new(app.clone(), claims, slot, handle.clone());
        let task = tokio::spawn(session.run(transport, "c-1".into()));
        Running {
            app,
            handle,
            client,
            closes,
            task,
        }
    }

    impl Running {
        fn say(&self, frame: serde_json::Value) {
            let text = Utf8Bytes::from(frame.to_string());
            self.client.send(ClientEvent::Text(text)).unwrap();
        }

        /// The frames the session sent so far: JSON texts, and "ping".
        async fn sent(&self) -> Vec<serde_json::Value> {
            // Let the session handle what it was given.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let mut out = Vec::new();
            for f in self.handle.take_queued() {
                if f[..] == codec::ping()[..] {
                    out.push(serde_json::json!("ping"));
                    continue;
                }
                let at = match f[1] {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                };
                out.push(serde_json::from_slice(&f[at..]).unwrap());
            }
            out
        }

        fn closes(&self) -> Vec<u16> {
            self.closes.lock().unwrap().iter().map(|r| r.code).collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_token_closes_with_4001() {
        let s = running(&["--heartbeat", "1h"], Duration::from_secs(60));
        assert_eq!(s.sent().await[0]["type"], "welcome");
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(s.closes().is_empty(), "closed before expiry");
        // exp (60 s, rounded up) plus the 5 s leeway, and the linger.
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert_eq!(s.closes(), [close::TOKEN_EXPIRED]);
        assert_eq!(
            s.handle.close_reason().map(|r| r.reason),
            Some("token expired")
        );
        tokio::time::sleep(CLOSE_LINGER).await;
        assert!(s.task.is_finished(), "the closing linger is bounded");
        assert!(s.app.conns.all().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_pinged_then_closed_with_1008() {
        let s = running(
            &["--heartbeat", "30s", "--pong-timeout", "10s"],
            Duration::from_secs(3600),
        );
        assert_eq!(s.sent().await[0]["type"], "welcome");
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(s.sent().await, ["ping"]);
        assert!(s.closes().is_empty());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(s.closes(), [close::POLICY]);
        assert_eq!(
            s.handle.close_reason().map(|r| r.reason),
            Some("heartbeat timeout")
        );
        s.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_answers_pings_stays() {
        let s = running(
            &["--heartbeat", "30s", "--pong-timeout", "10s"],
            Duration::from_secs(3600),
        );
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(31)).await;
            assert_eq!(s.sent().await.last(), Some(&serde_json::json!("ping")));
            s.client.send(ClientEvent::Activity).unwrap();
        }
        assert!(s.closes().is_empty());
        assert!(!s.task.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_close_waits_for_the_reply_at_most_the_linger() {
        let s = running(&[], Duration::from_secs(3600));
        s.sent().await;
        s.handle.close(DISCONNECTED);
        s.sent().await;
        assert_eq!(s.closes(), [DISCONNECTED.code]);
        // Frames arriving meanwhile are not answered.
        s.say(serde_json::json!({"type":"ping","id":1}));
        assert!(s.sent().await.is_empty());
        tokio::time::sleep(CLOSE_LINGER - Duration::from_millis(100)).await;
        assert!(!s.task.is_finished(), "ended before the linger");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(s.task.is_finished(), "lingered past its bound");
    }

    #[tokio::test(start_paused = true)]
    async fn the_clients_close_reply_ends_the_linger_at_once() {
        let s = running(&[], Duration::from_secs(3600));
        s.handle.close(DISCONNECTED);
        s.sent().await;
        s.client.send(ClientEvent::Closed).unwrap();
        s.sent().await;
        assert!(s.task.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn join_publish_and_refresh_are_answered() {
        let s = running(&["--heartbeat", "1h"], Duration::from_secs(60));
        s.sent().await;
        s.say(serde_json::json!({"type":"join","room":"r","id":"j"}));
        let got = s.sent().await;
        assert_eq!(
            (&got[0]["type"], &got[0]["id"], &got[0]["seq"]),
            (
                &serde_json::json!("joined"),
                &serde_json::json!("j"),
                &serde_json::json!(0)
            )
        );
        s.say(serde_json::json!({"type":"publish","room":"r","data":{"x":1},"id":"p"}));
        let got = s.sent().await;
        let types: Vec<_> = got.iter().map(|v| v["type"].as_str().unwrap()).collect();
        assert!(
            types.contains(&"ack") && types.contains(&"message"),
            "{got:?}"
        );
        let ack = got.iter().find(|v| v["type"] == "ack").unwrap();
        assert_eq!(
            (&ack["id"], &ack["seq"]),
            (&serde_json::json!("p"), &serde_json::json!(1))
        );

        let other = token(&s.app, "bob", Duration::from_secs(60));
        s.say(serde_json::json!({"type":"refresh","token":other,"id":"r1"}));
        let got = s.sent().await;
        assert_eq!(
            (&got[0]["type"], &got[0]["code"]),
            (
                &serde_json::json!("error"),
                &serde_json::json!("invalid_token")
            )
        );

        // A fresh token moves the expiry: no 4001 at the first one.
        let fresh = token(&s.app, "alice", Duration::from_secs(3600));
        s.say(serde_json::json!({"type":"refresh","token":fresh,"id":"r2"}));
        let got = s.sent().await;
        assert_eq!(
            (&got[0]["type"], &got[0]["id"]),
            (&serde_json::json!("refreshed"), &serde_json::json!("r2"))
        );
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert!(s.closes().is_empty(), "{:?}", s.closes());
    }

    #[tokio::test(start_paused = true)]
    async fn a_binary_frame_or_a_violation_closes_with_its_code() {
        let s = running(&[], Duration::from_secs(3600));
        s.client.send(ClientEvent::Binary).unwrap();
        s.sent().await;
        assert_eq!(s.closes(), [close::UNSUPPORTED_DATA]);

        let s = running(&[], Duration::from_secs(3600));
        s.client
            .send(ClientEvent::Violation(CloseReason {
                code: close::TOO_BIG,
                reason: "message too big",
            }))
            .unwrap();
        s.sent().await;
        assert_eq!(s.closes(), [close::TOO_BIG]);
    }
}
