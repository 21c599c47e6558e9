//! The operations listener: `/health`, `/ready`, `/metrics`.
//!
//! Kept off the public port so that only the orchestrator and Prometheus
//! reach it. Its connections are capped and short-lived on their own
//! (`--max-ops-connections`, `--ops-timeout`), so that neither listener can
//! take the other's descriptors.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::listener::{self, Http1};
use crate::metrics::{Limit, Metrics};
use crate::state::App;

/// The operations router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(app)
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    if app.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !app.broker.is_up() {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable\n").into_response()
    } else if !app.verifier.keys_loaded() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "JWKS key set not loaded yet\n",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// The operations connections open now, oldest first.
#[derive(Default)]
struct Open {
    next: u64,
    conns: VecDeque<(u64, CancellationToken)>,
}

/// One open operations connection; leaves [`Open`] when dropped.
struct OpsSlot {
    id: u64,
    evicted: CancellationToken,
    open: Arc<Mutex<Open>>,
}

impl Drop for OpsSlot {
    fn drop(&mut self) {
        lock(&self.open).conns.retain(|(id, _)| *id != self.id);
    }
}

fn lock(open: &Mutex<Open>) -> MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(|p| p.into_inner())
}

/// Admit a connection: at the cap, the oldest open one is closed to make
/// room, so that a probe gets through even while others hold every slot
/// with idle or half-sent requests (a probe is answered in a moment; to
/// push it out, `cap` newer connections would have to arrive meanwhile).
fn admit(open: &Arc<Mutex<Open>>, cap: usize, metrics: &Metrics) -> OpsSlot {
    let mut o = lock(open);
    while o.conns.len() >= cap {
        let Some((_, oldest)) = o.conns.pop_front() else {
            break;
        };
        oldest.cancel();
        metrics.refused(Limit::OpsConnections);
    }
    let id = o.next;
    o.next += 1;
    let evicted = CancellationToken::new();
    o.conns.push_back((id, evicted.clone()));
    OpsSlot {
        id,
        evicted,
        open: open.clone(),
    }
}

/// Serve until `stop` is cancelled.
///
/// At most `--max-ops-connections` connections at once (at the cap the
/// oldest is closed to admit a new one), one request each, each closed
/// `--ops-timeout` after it was accepted whatever it is doing: idle or
/// half-sent requests cannot pile up, and the descriptors they take stay far
/// below the file limit.
pub async fn serve(listener: TcpListener, app: Arc<App>, stop: CancellationToken) {
    let router = router(app.clone());
    let open = Arc::new(Mutex::new(Open::default()));
    let cap = app.config.limits.max_ops_connections;
    let lifetime = app.config.limits.ops_timeout;
    let http = Http1 {
        header_timeout: lifetime,
        keep_alive: false,
    };
    let handle = |tcp: TcpStream, peer: SocketAddr, slot: OpsSlot| {
        let router = router.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let served = listener::serve_http(tcp, peer, router, http, stop, None);
            tokio::select! {
                done = tokio::time::timeout(lifetime, served) => if done.is_err() {
                    debug!(%peer, "operations connection closed after --ops-timeout");
                },
                _ = slot.evicted.cancelled() => {
                    debug!(%peer, "operations connection closed to admit a newer one");
                }
            }
        });
    };
    let admit_evicting = || Some(admit(&open, cap, &app.metrics));
    listener::accept_loop(listener, &stop, admit_evicting, |_| {}, handle).await;
}
