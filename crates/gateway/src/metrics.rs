//! Prometheus metrics, served on the operations listener only.
//!
//! Every metric is prefixed `wsgate_`, carries the constant label `node`, and
//! has low-cardinality labels only (never a room or a user). The standard
//! `process_*` metrics (resident memory, CPU seconds, open files) are exported
//! unprefixed, as Prometheus client libraries do.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Reasons a handshake is refused before the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Origin not allowed (403).
    Origin,
    /// Token missing or invalid (401).
    Auth,
    /// Connection cap or draining (503).
    Capacity,
    /// Not a valid WebSocket upgrade (400).
    BadRequest,
}

impl Rejection {
    fn label(self) -> &'static str {
        match self {
            Rejection::Origin => "origin",
            Rejection::Auth => "auth",
            Rejection::Capacity => "capacity",
            Rejection::BadRequest => "bad_request",
        }
    }
}

/// Node-wide limits that refuse a connection or request before any work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-pending-connections`: a public TCP connection closed at accept.
    PendingConnections,
    /// `--max-ops-connections`: an operations connection closed at accept.
    OpsConnections,
    /// `--max-inflight-body-bytes`: an HTTP API request answered 503.
    InflightBodyBytes,
    /// `--body-timeout`: an HTTP API body not sent in time, answered 408.
    BodyTimeout,
}

impl Limit {
    const ALL: [Limit; 4] = [
        Limit::PendingConnections,
        Limit::OpsConnections,
        Limit::InflightBodyBytes,
        Limit::BodyTimeout,
    ];

    fn label(self) -> &'static str {
        match self {
            Limit::PendingConnections => "pending_connections",
            Limit::OpsConnections => "ops_connections",
            Limit::InflightBodyBytes => "inflight_body_bytes",
            Limit::BodyTimeout => "body_timeout",
        }
    }
}

/// All metrics of a node.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open connections, by `transport` (`ws`, `sse`).
    connections_active: IntGaugeVec,
    /// Connections accepted (upgrades, SSE streams), by `transport`.
    connections_accepted: IntCounterVec,
    /// Connections ended, by `transport`.
    connections_closed: IntCounterVec,
    handshake_rejections: IntCounterVec,
    /// Text frames received from clients.
    pub messages_received: IntCounter,
    /// Message frames handed to clients' outbound queues.
    pub messages_delivered: IntCounter,
    /// Messages the broker took (WebSocket and HTTP).
    pub messages_published: IntCounter,
    /// Publishes answered from an idempotency key already used (nothing published).
    pub publish_duplicates: IntCounter,
    /// Connections closed 1008 because their queue overflowed.
    pub slow_consumer_closes: IntCounter,
    /// Rooms whose history the in-process broker dropped (new epoch) to
    /// stay under `--history-budget-bytes`.
    pub history_evictions: IntCounter,
    closes: IntCounterVec,
    /// Rooms with at least one local member.
    pub rooms_active: IntGauge,
    /// Time from a publish request to the broker's seq.
    pub publish_latency: Histogram,
    /// 1 when the broker is reachable.
    pub broker_up: IntGauge,
    /// Broker reconnections.
    pub broker_reconnects: IntCounter,
    /// Messages received from the broker's relay (other nodes' publishes too).
    pub relayed_in: IntCounter,
    /// Messages recovered from history to fill a relay gap.
    pub gaps_filled: IntCounter,
    /// Broker subscriptions (rooms) held by this node.
    pub subscriptions: IntGauge,
    limit_refusals: IntCounterVec,
    jwks_fetches: IntCounterVec,
    jwks_age: IntGauge,
    /// When the key set in force was fetched (`None` before the first).
    jwks_loaded_at: Arc<Mutex<Option<Instant>>>,
    api_requests: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Metrics labelled with this node's id.
    pub fn new(node: &str) -> Metrics {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| {
            Opts::new(name, help)
                .namespace("wsgate")
                .const_label("node", node)
        };
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            // Only a duplicate name can fail, and every name below is distinct.
            let _ = registry.register(c);
        };
        let counter = |name: &str, help: &str| {
            let c = must(IntCounter::with_opts(opts(name, help)));
            reg(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::with_opts(opts(name, help)));
            reg(Box::new(g.clone()));
            g
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(opts(name, help), labels));
            reg(Box::new(g.clone()));
            g
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(opts(name, help), labels));
            reg(Box::new(c.clone()));
            c
        };
        let publish_latency = must(Histogram::with_opts(
            HistogramOpts::new(
                "publish_latency_seconds",
                "Time from a publish request until the broker assigned its seq",
            )
            .namespace("wsgate")
            .const_label("node", node)
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        ));
        reg(Box::new(publish_latency.clone()));
        #[cfg(target_os = "linux")]
        reg(Box::new(ProcessMetrics(
            prometheus::process_collector::ProcessCollector::for_self(),
        )));
        let m = Metrics {
            connections_active: gauge_vec(
                "connections_active",
                "Open connections (slots in use), by transport",
                &["transport"],
            ),
            connections_accepted: counter_vec(
                "connections_accepted_total",
                "Connections accepted (WebSocket upgrades, SSE streams), by transport",
                &["transport"],
            ),
            connections_closed: counter_vec(
                "connections_closed_total",
                "Connections ended (for any reason), by transport",
                &["transport"],
            ),
            handshake_rejections: counter_vec(
                "handshake_rejections_total",
                "Upgrade requests and SSE streams refused before they start, by reason",
                &["reason"],
            ),
            messages_received: counter(
                "messages_received_total",
                "Text frames received from clients",
            ),
            messages_delivered: counter(
                "messages_delivered_total",
                "Room messages handed to clients' outbound queues",
            ),
            messages_published: counter(
                "messages_published_total",
                "Messages the broker accepted from this node (WebSocket and HTTP)",
            ),
            publish_duplicates: counter(
                "publish_duplicates_total",
                "Publishes whose idempotency key was already used in the room: answered with the first seq, not published again",
            ),
            slow_consumer_closes: counter(
                "slow_consumer_closes_total",
                "Connections closed with 1008 because their outbound queue overflowed",
            ),
            history_evictions: counter(
                "history_evictions_total",
                "Rooms whose history was dropped (new epoch) to keep the node's history under --history-budget-bytes",
            ),
            closes: counter_vec(
                "connection_closes_total",
                "Connections closed by the server, by close code",
                &["code"],
            ),
            rooms_active: gauge(
                "rooms_active",
                "Rooms with at least one member on this node",
            ),
            publish_latency,
            broker_up: gauge("broker_up", "1 when the broker is reachable, else 0"),
            broker_reconnects: counter(
                "broker_reconnects_total",
                "Reconnections to the broker after a failure",
            ),
            relayed_in: counter(
                "messages_relayed_in_total",
                "Messages received from the broker relay",
            ),
            gaps_filled: counter(
                "relay_gap_messages_filled_total",
                "Messages read back from history to fill a gap in the relay",
            ),
            subscriptions: gauge(
                "broker_subscriptions",
                "Rooms this node is subscribed to at the broker",
            ),
            limit_refusals: counter_vec(
                "limit_refusals_total",
                "Connections or requests refused by a node-wide limit, by limit",
                &["limit"],
            ),
            jwks_fetches: counter_vec(
                "jwks_fetches_total",
                "Fetches of the --jwt-jwks-url key set, by result (ok, failed)",
                &["result"],
            ),
            jwks_age: gauge(
                "jwks_age_seconds",
                "Seconds since the JWKS key set in force was fetched (0 before the first)",
            ),
            jwks_loaded_at: Arc::new(Mutex::new(None)),
            api_requests: counter_vec(
                "api_requests_total",
                "HTTP API calls (/api/...), by route pattern and status code",
                &["endpoint", "status"],
            ),
            registry,
        };
        for l in Limit::ALL {
            m.limit_refusals.with_label_values(&[l.label()]);
        }
        for r in [
            Rejection::Origin,
            Rejection::Auth,
            Rejection::Capacity,
            Rejection::BadRequest,
        ] {
            m.handshake_rejections.with_label_values(&[r.label()]);
        }
        for result in ["ok", "failed"] {
            m.jwks_fetches.with_label_values(&[result]);
        }
        for transport in ["ws", "sse"] {
            m.connections_active.with_label_values(&[transport]);
            m.connections_accepted.with_label_values(&[transport]);
            m.connections_closed.with_label_values(&[transport]);
        }
        m
    }

    /// Count a JWKS fetch; a good one restarts the key set's age.
    pub fn jwks_fetched(&self, ok: bool) {
        self.jwks_fetches
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
        if ok {
            *self
                .jwks_loaded_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        }
    }

    /// A connection of `transport` (`ws`, `sse`) took a slot.
    pub fn opened(&self, transport: &str) {
        self.connections_active
            .with_label_values(&[transport])
            .inc();
    }

    /// A connection of `transport` passed every check (a WebSocket
    /// upgrade, an SSE stream started).
    pub fn accepted(&self, transport: &str) {
        self.connections_accepted
            .with_label_values(&[transport])
            .inc();
    }

    /// A connection of `transport` ended and gave its slot back.
    pub fn ended(&self, transport: &str) {
        self.connections_active
            .with_label_values(&[transport])
            .dec();
        self.connections_closed
            .with_label_values(&[transport])
            .inc();
    }

    /// Open connections of `transport`.
    pub fn active(&self, transport: &str) -> i64 {
        self.connections_active
            .with_label_values(&[transport])
            .get()
    }

    /// Count a refused handshake.
    pub fn reject(&self, why: Rejection) {
        self.handshake_rejections
            .with_label_values(&[why.label()])
            .inc();
    }

    /// Count a refusal by a node-wide limit.
    pub fn refused(&self, limit: Limit) {
        self.limit_refusals
            .with_label_values(&[limit.label()])
            .inc();
    }

    /// Count a close the server initiated.
    pub fn closed(&self, code: u16) {
        self.closes
            .with_label_values(&[code.to_string().as_str()])
            .inc();
    }

    /// Count an HTTP API call: `endpoint` is the route pattern (never a
    /// room or user), `status` the answer's code.
    pub fn api_call(&self, endpoint: &str, status: u16) {
        self.api_requests
            .with_label_values(&[endpoint, status.to_string().as_str()])
            .inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        if let Some(at) = *self
            .jwks_loaded_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            self.jwks_age
                .set(i64::try_from(at.elapsed().as_secs()).unwrap_or(i64::MAX));
        }
        let mut out = Vec::with_capacity(8192);
        // Encoding into a Vec only fails on a malformed metric family, which
        // the registry never holds.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Metrics {
    /// Register a collector of another module (presence) with this node's
    /// registry, served on `/metrics` with the rest.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        // Only a duplicate name can fail; each module registers its own names once.
        let _ = self.registry.register(c);
    }
}

/// Metric definitions are static and valid, so building them cannot fail;
/// no input reaches this.
#[allow(clippy::expect_used)]
pub(crate) fn must<T>(r: prometheus::Result<T>) -> T {
    r.expect("static metric definition")
}

/// The standard `process_*` metrics, with `process_cpu_seconds_total` to
/// the clock tick (10 ms) rather than the whole seconds the prometheus
/// crate reports, so that CPU per message can be read from a short run.
#[cfg(target_os = "linux")]
struct ProcessMetrics(prometheus::process_collector::ProcessCollector);

#[cfg(target_os = "linux")]
impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.0.collect();
        if let Some(cpu) = process_cpu_seconds() {
            for family in &mut families {
                if family.name() == "process_cpu_seconds_total" {
                    for metric in family.mut_metric() {
                        let mut counter = prometheus::proto::Counter::default();
                        counter.set_value(cpu);
                        metric.set_counter(counter);
                    }
                }
            }
        }
        families
    }
}

/// User plus system CPU time of this process from `/proc/self/stat`.
#[cfg(target_os = "linux")]
fn process_cpu_seconds() -> Option<f64> {
    /// `/proc` reports times in USER_HZ, which Linux fixes at 100 for userspace.
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, so
    // utime (14) and stime (15) are the 12th and 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_prefixed_names_and_node_label() {
        let m = Metrics::new("n1");
        m.accepted("sse");
        m.reject(Rejection::Origin);
        m.closed(1008);
        let text = m.render();
        assert!(
            text.contains("wsgate_connections_accepted_total{node=\"n1\",transport=\"sse\"} 1"),
            "{text}"
        );
        assert!(text.contains("wsgate_handshake_rejections_total{node=\"n1\",reason=\"origin\"} 1"));
        assert!(text.contains("wsgate_handshake_rejections_total{node=\"n1\",reason=\"auth\"} 0"));
        assert!(text.contains("wsgate_connection_closes_total{code=\"1008\",node=\"n1\"} 1"));
        assert!(text.contains("wsgate_publish_latency_seconds_bucket"));
        assert!(text.contains("wsgate_jwks_fetches_total{node=\"n1\",result=\"failed\"} 0"));
        m.jwks_fetched(true);
        let text = m.render();
        assert!(text.contains("wsgate_jwks_fetches_total{node=\"n1\",result=\"ok\"} 1"));
        assert!(text.contains("wsgate_jwks_age_seconds{node=\"n1\"} 0"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_are_exported_with_cpu_time() {
        let text = Metrics::new("n").render();
        let line = text
            .lines()
            .find(|l| l.starts_with("process_cpu_seconds_total "))
            .unwrap();
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let direct = process_cpu_seconds().unwrap();
        // Ours, read from /proc to the tick, not the crate's whole seconds.
        assert!((direct - value).abs() < 0.5, "{value} vs {direct}");
        assert!(value.fract() != 0.0 || direct.fract() == 0.0, "{line}");
        assert!(text.contains("process_resident_memory_bytes "));
    }
}
