//! Redis relay (being written).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::BrokerError;
use crate::metrics::Metrics;
use crate::rooms::Rooms;

/// Redis broker settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Messages kept per room.
    pub history: usize,
    /// TTL of an idle room's keys.
    pub history_ttl: Duration,
}

/// Broker relaying through Redis.
pub struct RedisBroker;

impl RedisBroker {
    /// Connect and start the subscriber task.
    pub async fn start(
        _url: &str,
        _settings: Settings,
        _rooms: Arc<Rooms>,
        _metrics: Arc<Metrics>,
        _stop: CancellationToken,
        _tasks: &TaskTracker,
    ) -> Result<std::sync::Arc<dyn super::Broker>, BrokerError> {
        Err(BrokerError::Unavailable("redis relay not built yet".into()))
    }
}
