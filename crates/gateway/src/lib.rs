//! The wsgate gateway: terminates WebSocket connections, authenticates them
//! with JWTs, serves rooms, and relays room messages between nodes through a
//! broker (Redis, or in-process for a single node).
//!
//! The binary (`src/main.rs`) parses flags, sets up logging, binds the two
//! listeners and calls [`run`]; tests call [`run`] the same way.
//!
//! # Layout
//! - [`config`]: flags, environment and the validated [`Config`].
//! - [`auth`]: JWT verification (a static key, or a JWKS kept fresh), room grants, token minting.
//! - [`http`]: the public router: WebSocket upgrade checks, HTTP publish API, dev pages.
//! - [`api`]: the server API (`--api-key`): disconnect and revoke users, room history.
//! - [`listener`]: accept loop, TLS, HTTP/1 connections.
//! - [`session`]: one WebSocket connection (reader, writer, protocol).
//! - [`outbound`]: a connection's bounded outbound queue.
//! - [`limits`]: rate limits: token buckets, per-user publish buckets.
//! - [`rooms`]: local room registry and fan-out.
//! - [`presence`]: who is in a room, across the cluster (leases in Redis).
//! - [`broker`]: the broker trait, in-process and Redis implementations.
//! - [`ops`]: `/health`, `/ready`, `/metrics` on the operations listener.
//! - [`metrics`]: Prometheus metrics.
//! - [`logging`]: tracing set-up.

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod http;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod outbound;
pub mod presence;
pub mod rooms;
pub mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use wsgate_protocol::MessageParts;

pub use config::Config;

use auth::{AuthError, Claims};
use broker::control::Control;
use broker::{Broker, BrokerError};
use metrics::Metrics;
use outbound::{CloseReason, ConnHandle};
use rooms::Rooms;

/// The two bound listeners a node serves.
#[derive(Debug)]
pub struct Listeners {
    /// Public: `/ws`, `/api/...` (and dev pages).
    pub public: TcpListener,
    /// Operations: `/health`, `/ready`, `/metrics`.
    pub ops: TcpListener,
}

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The broker could not be set up.
    #[error("{0}")]
    Broker(#[from] BrokerError),
}

/// Open connections by user: for the drain on shutdown, and for the server
/// API's disconnect (every transport registers here).
#[derive(Default)]
pub struct Conns {
    users: Mutex<HashMap<Box<str>, Vec<Arc<ConnHandle>>>>,
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
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Local rooms.
    pub rooms: Arc<Rooms>,
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// Presence (section 6).
    pub presence: Arc<presence::Presence>,
    /// Per-user publish buckets (WebSocket and HTTP API).
    pub limits: limits::UserLimits,
    /// Disconnects and revocations of the server API.
    pub control: Arc<Control>,
    conns: Arc<Conns>,
    draining: AtomicBool,
    active: AtomicUsize,
    conn_seq: AtomicU64,
    conn_prefix: u32,
    sessions: TaskTracker,
}

/// A reserved connection slot; released when dropped.
pub struct Slot(Arc<App>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.connections_active.dec();
    }
}

impl App {
    /// Whether the node is draining for shutdown.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Reserve a connection slot, unless at the cap or draining.
    pub fn try_slot(self: &Arc<Self>) -> Option<Slot> {
        if self.is_draining() {
            return None;
        }
        let max = self.config.max_connections;
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.connections_active.inc();
        Some(Slot(self.clone()))
    }

    fn next_conn_id(&self) -> String {
        let n = self.conn_seq.fetch_add(1, Ordering::Relaxed);
        format!("c-{:x}{:x}", self.conn_prefix, n)
    }

    /// Verify a token: signature and claims, then the server API's rules
    /// (revocations, `--max-token-lifetime`).
    pub fn verify_token(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = self.config.verifier.verify(token)?;
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

/// Run a node on bound listeners until `stop` is cancelled, then drain:
/// `/ready` turns 503, new upgrades get 503, open connections are closed
/// with 1001 spread over half of `--drain-timeout`, and the function
/// returns within `--drain-timeout`.
pub async fn run(
    listeners: Listeners,
    config: Config,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new(&config.node_id));
    let rooms = Arc::new(Rooms::new(metrics.clone()));
    let conns = Arc::new(Conns::default());
    let control = Arc::new(Control::new(conns.clone(), &config));
    let background = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (broker, presence): (Arc<dyn Broker>, _) = match &config.redis_url {
        Some(url) => {
            let redis = broker::redis::RedisBroker::start(
                url,
                config.redis_cluster,
                broker::redis::Settings {
                    history: config.history,
                    history_ttl: config.history_ttl,
                    min_replicas: config.redis_min_replicas,
                    ca_cert: config.redis_ca_cert.clone(),
                },
                rooms.clone(),
                control.clone(),
                metrics.clone(),
                background.clone(),
                &tasks,
            )
            .await?;
            let presence = presence::Presence::redis(
                redis.link(),
                config.presence_ttl,
                &metrics,
                &config.node_id,
                background.clone(),
                &tasks,
            );
            (redis, presence)
        }
        None => {
            let memory = Arc::new(broker::memory::MemoryBroker::new(
                config.history,
                config.history_budget_bytes,
                rooms.clone(),
                metrics.clone(),
            ));
            metrics.broker_up.set(1);
            let sweeper = memory.clone();
            let ttl = config.history_ttl;
            let cancel = background.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(broker::memory::SWEEP_EVERY);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tick.tick() => sweeper.sweep(ttl),
                    }
                }
            });
            (
                memory,
                presence::Presence::memory(&metrics, &config.node_id),
            )
        }
    };
    let app = Arc::new(App {
        limits: limits::UserLimits::new(config.user_publish_rate, config.user_publish_burst),
        conns,
        control,
        draining: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        conn_seq: AtomicU64::new(0),
        conn_prefix: rand::random::<u32>() & 0xfff,
        sessions: TaskTracker::new(),
        config,
        metrics,
        rooms,
        broker,
        presence,
    });
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let public_addr = addr(&listeners.public);
    let ops_addr = addr(&listeners.ops);
    tasks.spawn(listener::serve(
        listeners.public,
        app.clone(),
        background.clone(),
    ));
    tasks.spawn(ops::serve(listeners.ops, app.clone(), background.clone()));
    if let Some(jwks) = app.config.verifier.jwks_source() {
        tasks.spawn(jwks.clone().run(app.metrics.clone(), background.clone()));
    }
    info!(
        node = %app.config.node_id,
        public = %public_addr,
        ops = %ops_addr,
        tls = app.config.tls.is_some(),
        broker = if app.config.redis_url.is_some() { "redis" } else { "memory" },
        "wsgate serving"
    );

    stop.cancelled().await;
    drain(&app).await;
    app.presence.stop().await;
    background.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_millis(500), tasks.wait()).await;
    info!("stopped");
    Ok(())
}

async fn drain(app: &Arc<App>) {
    let started = Instant::now();
    let budget = app.config.drain_timeout;
    app.draining.store(true, Ordering::Release);
    let conns = app.conns.all();
    info!(connections = conns.len(), "draining");
    // Spread the closes so that the reconnects do not reach the other nodes
    // as one stampede: at most RECONNECTS_PER_SEC, and never over more than
    // half the budget (a larger node closes faster).
    const RECONNECTS_PER_SEC: f64 = 2000.0;
    let spread = (budget / 2).min(Duration::from_secs_f64(
        conns.len() as f64 / RECONNECTS_PER_SEC,
    ));
    let waves = conns.len().clamp(1, 50);
    let per_wave = conns.len().div_ceil(waves).max(1);
    let gap = spread / waves as u32;
    for (i, chunk) in conns.chunks(per_wave).enumerate() {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        for c in chunk {
            c.close(CloseReason {
                code: wsgate_protocol::close::GOING_AWAY,
                reason: "server shutting down",
            });
        }
    }
    app.sessions.close();
    let left = budget
        .saturating_sub(started.elapsed())
        .saturating_sub(Duration::from_millis(700));
    if tokio::time::timeout(left, app.sessions.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = app.sessions.len(),
            "drain timeout: connections still open are dropped"
        );
    }
}
