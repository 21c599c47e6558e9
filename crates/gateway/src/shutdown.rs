//! Stopping a node: the signals that start it, the node's background tasks
//! and their cancellation token, and the paced drain of open connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::outbound::CloseReason;
use crate::state::App;

/// Cancel `stop` on the first SIGTERM or SIGINT (the binary's trigger for
/// [`run`](crate::run)'s drain).
pub async fn on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: draining"),
    }
    stop.cancel();
}

/// A node's background tasks (listeners, broker relay and health, sweeps,
/// JWKS refresh): spawned on one tracker, stopped by one token after the
/// drain.
#[derive(Default)]
pub(crate) struct Background {
    /// Cancelled when the node stops: every background task ends on it.
    pub stop: CancellationToken,
    /// The tasks, so that stopping waits (briefly) for them.
    pub tasks: TaskTracker,
}

impl Background {
    /// Cancel every task and wait up to `grace` for them to end.
    pub async fn stop(self, grace: Duration) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(grace, self.tasks.wait()).await;
    }
}

/// Drain a node for shutdown within `--drain-timeout`: `/ready` turns 503
/// and new upgrades are refused at once; open connections are closed with
/// 1001, spread over time; then the sessions get what is left of the budget
/// to end.
pub(crate) async fn drain(app: &Arc<App>) {
    let started = Instant::now();
    let budget = app.config.drain_timeout;
    app.start_draining();
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
