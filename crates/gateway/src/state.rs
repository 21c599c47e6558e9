//! The state a running node shares between its parts: [`App`] (config,
//! metrics, rooms, broker, limits, control), the connection slots
//! ([`Slot`]) and the registry of open connections ([`Conns`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::task::TaskTracker;
use wsgate_protocol::MessageParts;

use crate::auth::{AuthError, Claims};
use crate::broker::control::Control;
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::limits::UserLimits;
use crate::metrics::Metrics;
use crate::outbound::ConnHandle;
use crate::rooms::Rooms;

/// Open connections by user: for the drain on shutdown, and for the server
/// API's disconnect (every transport registers here).
#[derive(Default)]
pub struct Conns {
    users: Mutex<HashMap<Box<str>, Vec<Arc<ConnHandle>>>>,
    /// The SSE streams, by connection id, for their POSTs.
    pub(crate) sse: crate::sse::Streams,
}

impl Conns {
    /// Register a connection of `user`.
    pub fn insert(&self, user: &str, h: &Arc<ConnHandle>) {
        self.lock()
            .entry(Box::from(user))
            .or_default()
            .push(h.clone());
    }
    /// Forget a connection registered with [`insert`](Self::insert).
    pub fn remove(&self, user: &str, h: &Arc<ConnHandle>) {
        let mut users = self.lock();
        if let Some(list) = users.get_mut(user) {
            list.retain(|c| !Arc::ptr_eq(c, h));
            if list.is_empty() {
                users.remove(user);
            }
        }
    }
    /// Every open connection.
    pub fn all(&self) -> Vec<Arc<ConnHandle>> {
        self.lock().values().flatten().cloned().collect()
    }
    /// The open connections of `user`.
    pub fn of_user(&self, user: &str) -> Vec<Arc<ConnHandle>> {
        self.lock().get(user).cloned().unwrap_or_default()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Vec<Arc<ConnHandle>>>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// State shared by every part of a running node.
pub struct App {
    /// Configuration.
    pub config: Config,
    /// Token verifier (loaded at start-up).
    pub verifier: Arc<crate::auth::Verifier>,
    /// TLS for the public listener (loaded at start-up).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Local rooms.
    pub rooms: Arc<Rooms>,
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// Per-user publish buckets (WebSocket and HTTP API).
    pub limits: UserLimits,
    /// Disconnects and revocations of the server API.
    pub control: Arc<Control>,
    /// Presence (section 6).
    pub presence: Arc<crate::presence::Presence>,
    pub(crate) conns: Arc<Conns>,
    draining: AtomicBool,
    active: AtomicUsize,
    conn_seq: AtomicU64,
    conn_prefix: u32,
    pub(crate) sessions: TaskTracker,
}

/// A reserved connection slot of a transport (`ws`, `sse`: the metrics'
/// label); released when dropped.
pub struct Slot(Arc<App>, &'static str);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.ended(self.1);
    }
}

impl App {
    /// A node's shared state, not draining, with no connection yet.
    pub fn new(
        config: Config,
        resources: &crate::server::Resources,
        metrics: Arc<Metrics>,
        rooms: Arc<Rooms>,
        broker: Arc<dyn Broker>,
        control: Arc<Control>,
        conns: Arc<Conns>,
    ) -> App {
        App {
            presence: crate::presence::Presence::memory(crate::presence::PresenceMetrics::new(
                &metrics,
                &config.node_id,
            )),
            limits: UserLimits::new(config.user_publish_rate, config.user_publish_burst),
            conns,
            control,
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            conn_seq: AtomicU64::new(0),
            conn_prefix: rand::random::<u32>() & 0xfff,
            sessions: TaskTracker::new(),
            verifier: resources.verifier.clone(),
            tls: resources.tls.clone(),
            config,
            metrics,
            rooms,
            broker,
        }
    }

    /// The same state with `presence` in place of the in-process one
    /// [`new`](Self::new) sets up (a Redis node's).
    pub fn with_presence(self, presence: Arc<crate::presence::Presence>) -> App {
        App { presence, ..self }
    }

    /// Whether the node is draining for shutdown.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Start draining: from now on no slot is handed out.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Reserve a connection slot for a connection of `transport` (`ws`,
    /// `sse`), unless at the cap or draining.
    pub fn try_slot(self: &Arc<Self>, transport: &'static str) -> Option<Slot> {
        if self.is_draining() {
            return None;
        }
        let max = self.config.limits.max_connections;
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.opened(transport);
        Some(Slot(self.clone(), transport))
    }

    pub(crate) fn next_conn_id(&self) -> String {
        let n = self.conn_seq.fetch_add(1, Ordering::Relaxed);
        format!("c-{:x}{:x}", self.conn_prefix, n)
    }

    /// Verify a token: signature and claims, then the server API's rules
    /// (revocations, `--max-token-lifetime`).
    pub fn verify_token(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = self.verifier.verify(token)?;
        self.control.check(&claims)?;
        Ok(claims)
    }

    /// Hand a message to the broker, with its idempotency key if any;
    /// counts and times it. Returns the seq (the first one for a duplicate).
    pub async fn publish(
        &self,
        room: &str,
        parts: MessageParts,
        key: Option<&str>,
    ) -> Result<u64, BrokerError> {
        let started = Instant::now();
        let published = self.broker.publish(room, parts, key).await?;
        self.metrics
            .publish_latency
            .observe(started.elapsed().as_secs_f64());
        if published.duplicate {
            self.metrics.publish_duplicates.inc();
        } else {
            self.metrics.messages_published.inc();
        }
        Ok(published.seq)
    }

    /// Track a session task so that shutdown waits for it.
    pub fn track_session<F>(&self, fut: F) -> tokio_util::task::task_tracker::TrackedFuture<F>
    where
        F: std::future::Future,
    {
        self.sessions.track_future(fut)
    }
}
