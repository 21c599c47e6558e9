//! Wiring a node together and running it: [`run`] builds the metrics, the
//! broker chosen by the configuration, the rooms and the shared state,
//! starts the listeners and background tasks, and drains on stop.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::broker::control::Control;
use crate::broker::{self, Broker, BrokerError};
use crate::config::{BrokerChoice, Config};
use crate::metrics::Metrics;
use crate::rooms::{Delivery, Rooms};
use crate::shutdown::{drain, Background};
use crate::state::{App, Conns};
use crate::{listener, ops};

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
    let delivery = Delivery::default();
    let conns = Arc::new(Conns::default());
    let control = Arc::new(Control::new(conns.clone(), &config));
    let background = Background::default();
    let (broker, link) = start_broker(&config, &delivery, &control, &metrics, &background).await?;
    let rooms = Rooms::new(metrics.clone(), broker.clone(), &delivery);
    let mut app = App::new(config, metrics, rooms, broker, control, conns);
    if let Some(link) = link {
        let presence = crate::presence::Presence::redis(
            link,
            app.config.presence.presence_ttl,
            app.presence.metrics.clone(),
            &app.config.node_id,
            background.stop.clone(),
            &background.tasks,
        );
        app = app.with_presence(presence);
    }
    let app = Arc::new(app);
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let public_addr = addr(&listeners.public);
    let ops_addr = addr(&listeners.ops);
    let tasks = &background.tasks;
    tasks.spawn(listener::serve(
        listeners.public,
        app.clone(),
        background.stop.clone(),
    ));
    tasks.spawn(ops::serve(
        listeners.ops,
        app.clone(),
        background.stop.clone(),
    ));
    if let Some(jwks) = app.config.verifier.jwks_source() {
        tasks.spawn(
            jwks.clone()
                .run(app.metrics.clone(), background.stop.clone()),
        );
    }
    info!(
        node = %app.config.node_id,
        public = %public_addr,
        ops = %ops_addr,
        tls = app.config.tls.is_some(),
        broker = app.config.broker.name(),
        "wsgate serving"
    );

    stop.cancelled().await;
    drain(&app).await;
    app.presence.stop().await;
    background.stop(Duration::from_millis(500)).await;
    info!("stopped");
    Ok(())
}

/// The broker the configuration chose, with its background tasks, and
/// for Redis presence's link to it.
async fn start_broker(
    config: &Config,
    delivery: &Delivery,
    control: &Arc<Control>,
    metrics: &Arc<Metrics>,
    background: &Background,
) -> Result<(Arc<dyn Broker>, Option<broker::redis::Link>), BrokerError> {
    let (redis, cluster) = match &config.broker {
        BrokerChoice::Redis(r) => (r, false),
        BrokerChoice::RedisCluster(r) => (r, true),
        BrokerChoice::Memory => {
            return Ok((start_memory(config, delivery, metrics, background), None))
        }
    };
    let redis = broker::redis::RedisBroker::start(
        &redis.url,
        cluster,
        broker::redis::Settings {
            history: config.history.history,
            history_ttl: config.history.history_ttl,
            min_replicas: redis.min_replicas,
            ca_cert: redis.ca_cert.clone(),
        },
        delivery.clone(),
        control.clone(),
        metrics.clone(),
        background.stop.clone(),
        &background.tasks,
    )
    .await?;
    let link = redis.link();
    Ok((redis, Some(link)))
}

/// The in-process broker, and its sweep of idle rooms.
fn start_memory(
    config: &Config,
    delivery: &Delivery,
    metrics: &Arc<Metrics>,
    background: &Background,
) -> Arc<dyn Broker> {
    let memory = Arc::new(broker::memory::MemoryBroker::new(
        config.history.history,
        config.history.history_budget_bytes,
        delivery.clone(),
        metrics.clone(),
    ));
    metrics.broker_up.set(1);
    let sweeper = memory.clone();
    let ttl = config.history.history_ttl;
    let cancel = background.stop.clone();
    background.tasks.spawn(async move {
        let mut tick = tokio::time::interval(broker::memory::SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => sweeper.sweep(ttl),
            }
        }
    });
    memory
}
