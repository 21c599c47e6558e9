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
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::listener::{self, Http1};
use crate::metrics::Limit;
use crate::App;

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

/// Serve until `stop` is cancelled.
///
/// At most `--max-ops-connections` connections at once (beyond it a new one
/// is closed at once), one request each, each closed `--ops-timeout` after
/// it was accepted whatever it is doing: idle or half-sent requests cannot
/// pile up, and the descriptors they take stay far below the file limit.
pub async fn serve(listener: TcpListener, app: Arc<App>, stop: CancellationToken) {
    let router = router(app.clone());
    let slots = Arc::new(Semaphore::new(app.config.max_ops_connections));
    let lifetime = app.config.ops_timeout;
    let http = Http1 {
        header_timeout: lifetime,
        keep_alive: false,
    };
    let refuse = |_tcp: TcpStream| app.metrics.refused(Limit::OpsConnections);
    let handle = |tcp: TcpStream, peer: SocketAddr, slot: OwnedSemaphorePermit| {
        let router = router.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let served = listener::serve_http(tcp, peer, router, http, stop);
            if tokio::time::timeout(lifetime, served).await.is_err() {
                debug!(%peer, "operations connection closed after --ops-timeout");
            }
        });
    };
    listener::accept_loop(listener, &stop, slots, refuse, handle).await;
}
