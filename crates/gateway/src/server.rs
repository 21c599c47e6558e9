//! Wiring a node together and running it: [`Resources::load`] reads the
//! files the configuration names (keys, certificates) once at start-up;
//! [`run`] builds the metrics, the broker chosen by the configuration, the
//! rooms and the shared state, starts the listeners and background tasks,
//! and drains on stop.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::auth::Verifier;
use crate::broker::control::Control;
use crate::broker::{self, Broker, BrokerError};
use crate::config::{BrokerChoice, Config, ConfigError, JwtKey};
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

/// What a node loads from files at start-up, before its listeners bind.
#[derive(Clone)]
pub struct Resources {
    /// Token verifier (a static key, or a JWKS not fetched yet).
    pub verifier: Arc<Verifier>,
    /// TLS for the public listener.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// PEM CA certificate(s) for `rediss://`.
    pub redis_ca: Option<Vec<u8>>,
}

impl Resources {
    /// Read the keys and certificates `config` names; the error is the one
    /// start-up error line.
    pub fn load(config: &Config) -> Result<Resources, ConfigError> {
        let settings = config.verifier_settings();
        let verifier = match &config.jwt_key {
            JwtKey::Hmac(secret) => Verifier::hmac(secret, settings),
            JwtKey::PublicKey(path) => {
                let bad = |reason: String| ConfigError::PublicKey {
                    path: path.clone(),
                    reason,
                };
                let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
                Verifier::public_key_pem(&pem, settings).map_err(|e| bad(e.to_string()))?
            }
            JwtKey::Jwks(source) => Verifier::jwks(source, settings).map_err(ConfigError::Jwks)?,
        };
        let tls = match &config.tls {
            Some(files) => Some(
                crate::tls::load_tls(&files.cert, &files.key)
                    .map_err(|e| ConfigError::Tls(e.to_string()))?,
            ),
            None => None,
        };
        let redis_ca = match &config.broker {
            BrokerChoice::Redis(r) | BrokerChoice::RedisCluster(r) => {
                r.ca_cert.as_deref().map(read_ca).transpose()?
            }
            BrokerChoice::Memory => None,
        };
        Ok(Resources {
            verifier: Arc::new(verifier),
            tls,
            redis_ca,
        })
    }
}

/// `--redis-ca-cert`: a file holding at least one PEM certificate.
fn read_ca(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        flag: "--redis-ca-cert",
        reason: format!("{}: {reason}", path.display()),
    };
    let pem = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .filter_map(Result::ok)
        .count();
    if certs == 0 {
        return Err(invalid("no PEM certificate found".into()));
    }
    Ok(pem)
}

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The broker could not be set up.
    #[error("{0}")]
    Broker(#[from] BrokerError),
}

/// Run a node on bound listeners, with the configuration and what was
/// loaded for it, until `stop` is cancelled, then drain:
/// `/ready` turns 503, new upgrades get 503, open connections are closed
/// with 1001 spread over half of `--drain-timeout`, and the function
/// returns within `--drain-timeout`.
pub async fn run(
    listeners: Listeners,
    config: Config,
    resources: Resources,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new(&config.node_id));
    let delivery = Delivery::default();
    let conns = Arc::new(Conns::default());
    let control = Arc::new(Control::new(
        conns.clone(),
        &config,
        resources.verifier.leeway(),
    ));
    let background = Background::default();
    let (broker, link) = start_broker(
        &config,
        &resources,
        &delivery,
        &control,
        &metrics,
        &background,
    )
    .await?;
    let rooms = Rooms::new(metrics.clone(), broker.clone(), &delivery);
    let mut app = App::new(config, &resources, metrics, rooms, broker, control, conns);
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
    if let Some(jwks) = app.verifier.jwks_source() {
        tasks.spawn(
            jwks.clone()
                .run(app.metrics.clone(), background.stop.clone()),
        );
    }
    info!(
        node = %app.config.node_id,
        public = %public_addr,
        ops = %ops_addr,
        tls = app.tls.is_some(),
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
    resources: &Resources,
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
            ca_cert: resources.redis_ca.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::serve;

    /// The configuration of `wsgate serve args`, then its resources loaded.
    fn load(args: &[&str]) -> Result<Resources, ConfigError> {
        let (config, _) = serve(args).unwrap().into_config()?;
        Resources::load(&config)
    }

    /// The error loading the resources of `wsgate serve args` gives.
    fn refused(args: &[&str]) -> ConfigError {
        match load(args) {
            Ok(_) => panic!("{args:?} loaded"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_missing_key_or_certificate_file_is_an_error() {
        let missing = "/nonexistent/file.pem";
        let err = refused(&["--jwt-public-key", missing]);
        assert!(matches!(err, ConfigError::PublicKey { .. }), "{err}");
        assert!(err.to_string().contains(missing), "{err}");
        let jwks = ["--jwt-jwks-url", "https://idp.example/jwks"];
        let err = refused(&[&jwks[..], &["--jwks-ca-cert", missing]].concat());
        assert!(matches!(err, ConfigError::Jwks(_)), "{err}");
        assert!(!err.to_string().contains('\n'), "{err}");
        let secret = ["--jwt-secret", "s"];
        let tls = ["--tls-cert", missing, "--tls-key", missing];
        let err = refused(&[&secret[..], &tls].concat());
        assert!(matches!(err, ConfigError::Tls(_)), "{err}");
        assert!(err.to_string().contains(missing), "{err}");
        let redis = ["--redis-url", "rediss://127.0.0.1:1", "--redis-ca-cert"];
        let err = refused(&[&secret[..], &redis, &[missing]].concat());
        assert!(err.to_string().contains("--redis-ca-cert"), "{err}");
        assert!(err.to_string().contains(missing), "{err}");
    }

    #[test]
    fn a_jwks_is_not_fetched_before_run() {
        let Ok(resources) = load(&["--jwt-jwks-url", "https://idp.example/jwks"]) else {
            panic!("JWKS flags refused");
        };
        assert!(
            !resources.verifier.keys_loaded(),
            "nothing is fetched before run()"
        );
        assert!(resources.verifier.jwks_source().is_some());
    }
}
