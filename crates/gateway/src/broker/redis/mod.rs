//! The Redis relay: seq, history and cross-node delivery through Redis.
//!
//! Per room `R` (the `{R}` hash tag keeps a room's keys on one cluster slot):
//! - `wsgate:{R}:seq`: the last seq (`INCR`).
//! - `wsgate:{R}:epoch`: the history epoch, created beside the seq when
//!   missing (a Redis that lost its data shows a new epoch).
//! - `wsgate:{R}:log`: a Stream of the last `--history` frames (at least),
//!   entry id `<seq>-0`, field `f` = the complete message frame.
//! - channel `wsgate:room:R`: `<epoch> <seq> <frame>` for every message.
//!
//! A publish is one Lua script (EVALSHA, re-loaded on NOSCRIPT by
//! `redis::Script`): INCR, XADD (trimmed with `MAXLEN ~`), EXPIRE (at most
//! every half second per room), PUBLISH,
//! so seq order, history order and delivery order cannot disagree. The
//! frame is encoded once by the publishing node; the script only splices
//! in the seq.
//!
//! Each node holds one pub/sub connection and one `SUBSCRIBE` per room with
//! local members: the node's rooms count the members and call
//! `subscribe`/`unsubscribe` in order, so the broker only keeps the set of
//! subscribed rooms (and whether each is ready). When the connection drops,
//! the node reconnects with capped, jittered exponential backoff,
//! re-subscribes every room and reads back from the log what it missed; a
//! seq gap seen on the live relay is filled from the log the same way.
//!
//! With `--redis-cluster` the same keys and scripts run on the shard that
//! owns the room; the script publishes with `SPUBLISH` on `wsgate:{R}:ch`
//! and nodes `SSUBSCRIBE` over RESP3 (`sharded_relay`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use redis::{Script, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use wsgate_protocol::MessageParts;

mod link;
mod range;
pub(crate) mod sentinel;
mod sharded;

use super::control::{self, Control, ControlMsg};
use super::{
    covers, new_epoch, redact_url, BoxFut, Broker, BrokerError, Delivery, HistoryPage, Published,
    RoomHistory, Since, IDEMPOTENCY_WINDOW,
};
use crate::metrics::Metrics;
pub use link::Link;
use sharded::sharded_relay;

/// Redis broker settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Messages kept per room (at least).
    pub history: usize,
    /// TTL of an idle room's keys.
    pub history_ttl: Duration,
    /// Replicas that must have a publish before it is acknowledged
    /// (`--redis-min-replicas`).
    pub min_replicas: u32,
    /// PEM CA for `rediss://` (`--redis-ca-cert`); the system roots otherwise.
    pub ca_cert: Option<Vec<u8>>,
}

fn tls_certs(ca: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.to_vec()),
    }
}

/// A command connection to one Redis server, reconnecting by itself.
fn connection_manager(client: redis::Client) -> Result<ConnectionManager, BrokerError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_number_of_retries(1)
        .set_min_delay(BACKOFF_BASE)
        .set_max_delay(BACKOFF_CAP);
    ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)
}

/// The publish script.
///
/// KEYS: seq, epoch, log, idempotency key, replication id. ARGV: frame
/// head, frame tail, history length, a fresh epoch, TTL, channel, PUBLISH
/// or SPUBLISH, deadline (Unix ms), "1" when KEYS[4] is a real key,
/// idempotency window (s). Returns {seq, duplicate}; {-1, 0} past the
/// deadline.
///
/// - Deadline: a script that Redis runs later than the node's deadline
///   (Redis was frozen, or the command sat in a buffer) publishes nothing,
///   so that a publish the node answered `timeout` is delivered at most
///   once, and never late.
/// - Idempotency: a key already used in the room within the window returns
///   the first seq and publishes nothing; checked and stored here, so it is
///   atomic across nodes. It rewrites the key (same value and TTL): that
///   write puts the node's connection past the first publish in the
///   replication stream, so `--redis-min-replicas`' `WAIT` covers it.
/// - Failover: the room's epoch is tied to the replication id of the
///   primary that wrote it. A replica promoted after an asynchronous
///   replication may lack the room's last INCRs; it also has a new
///   replication id, so the first publish it takes starts a new epoch and
///   never hands out a seq again in the old one.
/// - Expiry: the four room keys get `--history-ttl` together, and only
///   when the log's TTL (whole seconds, rounded) is below it: a log that
///   `XADD` just created (a new epoch) or one last renewed more than half
///   a second ago. A busy room's publishes skip the four `EXPIRE`s; its
///   keys may expire up to half a second earlier than `--history-ttl`
///   after its last publish. Each `redis.call` costs Redis some time of
///   its own on top of its command's (docs/benchmarks.md, measured with
///   `INFO commandstats`), hence also the one `MGET` for the epoch and its
///   replication id.
const PUBLISH_LUA: &str = r"
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[8]) then
  return {-1, 0}
end
if ARGV[9] == '1' then
  local first = redis.call('GET', KEYS[4])
  if first then
    -- A write, so that the node's WAIT covers the first publish too.
    redis.call('SET', KEYS[4], first, 'KEEPTTL')
    return {tonumber(first), 1}
  end
end
local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)') or ''
local known = redis.call('MGET', KEYS[2], KEYS[5])
local epoch = known[1]
if epoch and known[2] ~= rid then epoch = false end
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('SET', KEYS[2], epoch)
  redis.call('SET', KEYS[5], rid)
end
local seq = redis.call('INCR', KEYS[1])
local frame = ARGV[1] .. seq .. ARGV[2]
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'f', frame)
if redis.call('TTL', KEYS[3]) < tonumber(ARGV[5]) then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
  redis.call('EXPIRE', KEYS[5], ARGV[5])
end
if ARGV[9] == '1' then redis.call('SET', KEYS[4], seq, 'EX', ARGV[10]) end
redis.call(ARGV[7], ARGV[6], epoch .. ' ' .. seq .. ' ' .. frame)
return {seq, 0}
";

/// The history script: the room's epoch, latest seq, oldest seq kept, and
/// with ARGV[1] >= 0 the entries after it, at most ARGV[4] of them and
/// about ARGV[5] bytes (at least one). A room without an epoch gets one
/// that lives ARGV[3] seconds (short: a room that is only joined, never
/// published to, must not leave state behind for a day); the first publish
/// makes it last `--history-ttl`.
const HISTORY_LUA: &str = r"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('SET', KEYS[2], epoch, 'EX', ARGV[3])
  local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)') or ''
  redis.call('SET', KEYS[4], rid, 'EX', ARGV[3])
end
local latest = tonumber(redis.call('GET', KEYS[1]) or '0')
local since = tonumber(ARGV[1])
local oldest = -1
local first = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
if #first > 0 then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
local out = {epoch, latest, oldest}
if since >= 0 and since < latest and oldest ~= -1 and oldest <= since + 1 then
  local entries = redis.call('XRANGE', KEYS[3], (since + 1) .. '-0', '+', 'COUNT', ARGV[4])
  local bytes = 0
  for _, e in ipairs(entries) do
    bytes = bytes + #e[2][2]
    if #out > 3 and bytes > tonumber(ARGV[5]) then break end
    out[#out + 1] = e[1]
    out[#out + 1] = e[2][2]
  end
end
return out
";

/// How long the epoch of a room that was joined but never published to
/// lives in Redis (at most; `--history-ttl` when shorter).
const EMPTY_ROOM_TTL: Duration = Duration::from_secs(600);

const CHANNEL_PREFIX: &str = "wsgate:room:";
/// Redis Cluster: the sharded channel shares the room's hash tag, so it
/// lives on the same shard as the room's keys (SPUBLISH from the script).
const SHARDED_PREFIX: &str = "wsgate:{";
const SHARDED_SUFFIX: &str = "}:ch";

fn keys(room: &str) -> [String; 3] {
    [
        format!("wsgate:{{{room}}}:seq"),
        format!("wsgate:{{{room}}}:epoch"),
        format!("wsgate:{{{room}}}:log"),
    ]
}

/// The replication id of the primary that wrote the room's epoch.
fn replid_key(room: &str) -> String {
    format!("wsgate:{{{room}}}:rid")
}

/// An idempotency key of the room (same hash tag: same cluster slot).
fn idempotency_key(room: &str, key: &str) -> String {
    format!("wsgate:{{{room}}}:idem:{key}")
}

fn channel(room: &str) -> String {
    format!("{CHANNEL_PREFIX}{room}")
}

fn sharded_channel(room: &str) -> String {
    format!("{SHARDED_PREFIX}{room}{SHARDED_SUFFIX}")
}

/// The command connection: one Redis, or a Redis Cluster (commands routed
/// by the keys' slot).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A room's log as read by the history script.
struct Log {
    epoch: Arc<str>,
    latest: u64,
    oldest: Option<u64>,
    /// (seq, frame) after the requested seq, when the log covers it.
    entries: Vec<(u64, Utf8Bytes)>,
}

enum SubCmd {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
}

struct Inner {
    /// A Redis Cluster (sharded pub/sub, channels named after the slot).
    cluster: bool,
    /// The primary's client, for the relay's pub/sub connections; `None` on
    /// a cluster, and with Sentinel until a primary is found.
    primary: std::sync::RwLock<Option<redis::Client>>,
    /// The command connection; `None` with Sentinel until a primary is found.
    conn: std::sync::RwLock<Option<Conn>>,
    /// Bumped when Sentinel names another primary: the relay reconnects.
    switched: watch::Sender<u64>,
    publish: Script,
    history: Script,
    settings: Settings,
    delivery: Delivery,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    /// The subscribed rooms, each with whether its messages are being
    /// received now.
    subs: Mutex<HashMap<Arc<str>, watch::Sender<bool>>>,
    commands: mpsc::UnboundedSender<SubCmd>,
    relay_up: AtomicBool,
    commands_up: AtomicBool,
    /// A failure was seen (the health check's PING failed, or the relay
    /// could not connect or lost its connection) and Redis has not been up
    /// since: joins and publishes are refused at once. Not set while the
    /// node is still connecting at start, so early joins wait as usual.
    known_down: AtomicBool,
    /// Where presence changes relayed on room channels go (`link`).
    presence: std::sync::OnceLock<std::sync::Weak<crate::presence::Presence>>,
}

/// Broker relaying through Redis.
pub struct RedisBroker {
    inner: Arc<Inner>,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(redact_url(&e.to_string()))
}

/// How long a join waits for its room's subscription while Redis is away.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(3);
/// Bound on any single Redis command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a publish waits for `--redis-min-replicas` replicas.
const REPLICA_WAIT: Duration = Duration::from_secs(1);
/// Reconnect backoff: first delay and cap (full jitter below the cap).
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

impl RedisBroker {
    /// Set up the broker and start its relay and health tasks on `tasks`;
    /// they stop with `stop`. Redis need not be up yet: the node starts
    /// not ready and connects when Redis appears.
    // What a node hands its broker, each a distinct part; a struct would
    // only rename the list.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        url: &str,
        cluster: bool,
        settings: Settings,
        delivery: Delivery,
        control: Arc<Control>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Arc<RedisBroker>, BrokerError> {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let ca = settings.ca_cert.clone();
        let sentinel = match sentinel::parse(url) {
            Some(parsed) => Some(
                parsed
                    .and_then(|u| sentinel::client(&u, ca.as_deref()).map_err(|e| e.to_string()))
                    .map_err(|e| BrokerError::Unavailable(format!("bad sentinel URL: {e}")))?,
            ),
            None => None,
        };
        let (client, conn, pushes) = if cluster {
            // Sharded pub/sub needs RESP3: messages arrive as pushes, and
            // the library re-subscribes after reconnects and slot moves.
            let (push_tx, push_rx) = mpsc::unbounded_channel();
            let seeds: Vec<&str> = url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect();
            let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
                .use_protocol(redis::ProtocolVersion::RESP3)
                .connection_timeout(COMMAND_TIMEOUT)
                .response_timeout(COMMAND_TIMEOUT)
                .push_sender(push_tx);
            if let Some(ca) = &ca {
                builder = builder.certs(tls_certs(ca));
            }
            let client = builder.build().map_err(unavailable)?;
            let conn = tokio::time::timeout(COMMAND_TIMEOUT * 5, client.get_async_connection())
                .await
                .map_err(|_| unavailable("redis cluster did not answer"))?
                .map_err(unavailable)?;
            (None, Some(Conn::Cluster(conn)), Some(push_rx))
        } else if sentinel.is_some() {
            (None, None, None)
        } else {
            let client = match &ca {
                Some(ca) => redis::Client::build_with_tls(url, tls_certs(ca)),
                None => redis::Client::open(url),
            }
            .map_err(unavailable)?;
            if url.starts_with("rediss://") {
                check_tls(&client).await?;
            }
            let conn = connection_manager(client.clone())?;
            (Some(client), Some(Conn::Single(conn)), None)
        };
        let inner = Arc::new(Inner {
            cluster,
            primary: std::sync::RwLock::new(client),
            conn: std::sync::RwLock::new(conn),
            switched: watch::channel(0).0,
            publish: Script::new(PUBLISH_LUA),
            history: Script::new(HISTORY_LUA),
            settings,
            delivery,
            control,
            metrics,
            subs: Mutex::new(HashMap::new()),
            commands,
            relay_up: AtomicBool::new(false),
            commands_up: AtomicBool::new(false),
            known_down: AtomicBool::new(false),
            presence: std::sync::OnceLock::new(),
        });
        inner.metrics.broker_up.set(0);
        // Revocations before the first connection is served; the relay
        // reloads them after each (re)subscription to the control channel.
        if let Ok(conn) = inner.conn() {
            inner.control.reload(conn).await;
        }
        match pushes {
            Some(pushes) => {
                tasks.spawn(sharded_relay(
                    inner.clone(),
                    command_rx,
                    pushes,
                    stop.clone(),
                ));
            }
            None => {
                tasks.spawn(relay(inner.clone(), command_rx, stop.clone()));
            }
        }
        if let Some(sentinel) = sentinel {
            tasks.spawn(sentinel::follow(inner.clone(), sentinel, stop.clone()));
        }
        tasks.spawn(health(inner.clone(), stop));
        Ok(Arc::new(RedisBroker { inner }))
    }
}

/// A TLS Redis that cannot be verified (wrong CA, wrong host name) is a
/// configuration error, not an outage: refuse to start, with one clear line.
/// An unreachable one is an outage: start, not ready.
async fn check_tls(client: &redis::Client) -> Result<(), BrokerError> {
    let attempt =
        tokio::time::timeout(COMMAND_TIMEOUT, client.get_multiplexed_async_connection()).await;
    match attempt {
        Ok(Err(e)) if is_tls_error(&e) => Err(BrokerError::Unavailable(format!(
            "TLS to redis failed (check --redis-ca-cert and the host name): {}",
            redact_url(&e.to_string())
        ))),
        _ => Ok(()),
    }
}

fn is_tls_error(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    ["certificate", "tls", "unknownissuer", "handshake"]
        .iter()
        .any(|w| text.contains(w))
}

impl Inner {
    /// The command connection, unless no primary is known yet (Sentinel).
    fn conn(&self) -> Result<Conn, BrokerError> {
        self.conn
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| unavailable("no redis primary known yet"))
    }

    /// The primary's client for the relay's pub/sub connection.
    fn primary(&self) -> Option<redis::Client> {
        self.primary
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sentinel named a (new) primary: commands and the relay move to it.
    fn switch_primary(&self, client: redis::Client) -> Result<(), BrokerError> {
        let conn = connection_manager(client.clone())?;
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(Conn::Single(conn));
        *self.primary.write().unwrap_or_else(|p| p.into_inner()) = Some(client);
        self.commands_up.store(false, Ordering::Release);
        self.update_up();
        self.switched.send_modify(|n| *n += 1);
        Ok(())
    }

    fn subs(&self) -> MutexGuard<'_, HashMap<Arc<str>, watch::Sender<bool>>> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_relay_up(&self, up: bool) {
        self.relay_up.store(up, Ordering::Release);
        self.update_up();
    }

    fn update_up(&self) {
        let up = self.is_up();
        if up {
            self.known_down.store(false, Ordering::Release);
        }
        self.metrics.broker_up.set(i64::from(up));
    }

    /// A failure talking to Redis was seen.
    fn saw_failure(&self) {
        self.known_down.store(true, Ordering::Release);
    }

    fn is_known_down(&self) -> bool {
        self.known_down.load(Ordering::Acquire)
    }

    fn is_up(&self) -> bool {
        self.relay_up.load(Ordering::Acquire) && self.commands_up.load(Ordering::Acquire)
    }

    fn ttl_secs(&self) -> u64 {
        self.settings.history_ttl.as_secs().max(1)
    }

    fn empty_room_ttl_secs(&self) -> u64 {
        self.settings
            .history_ttl
            .min(EMPTY_ROOM_TTL)
            .as_secs()
            .max(1)
    }

    /// With `--redis-min-replicas N`: wait (at most [`REPLICA_WAIT`]) until
    /// N replicas have every write of this node's command connection so
    /// far, the publish just made included; fewer is `unavailable` (the
    /// message may still be delivered, as PROTOCOL.md section 10 says).
    async fn confirm_replicas(&self) -> Result<(), BrokerError> {
        let n = self.settings.min_replicas;
        if n == 0 {
            return Ok(());
        }
        let mut conn = self.conn()?;
        let mut wait = redis::cmd("WAIT");
        wait.arg(n).arg(REPLICA_WAIT.as_millis() as u64);
        match tokio::time::timeout(COMMAND_TIMEOUT, wait.query_async::<i64>(&mut conn)).await {
            Ok(Ok(acked)) if acked >= i64::from(n) => Ok(()),
            Ok(Ok(acked)) => Err(BrokerError::Unconfirmed(format!(
                "{acked} of {n} replicas confirmed the message within {} ms; it may still be delivered",
                REPLICA_WAIT.as_millis()
            ))),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable("redis did not answer WAIT in time")),
        }
    }

    /// Fail fast while Redis is known to be unreachable (the relay saw its
    /// connection drop, or the health check's PING failed), rather than
    /// holding the caller for a command timeout.
    fn check_up(&self) -> Result<(), BrokerError> {
        if self.is_known_down() {
            Err(unavailable("redis is unreachable"))
        } else {
            Ok(())
        }
    }

    async fn read_log(&self, room: &str, since: Option<u64>) -> Result<Log, BrokerError> {
        let [seq, epoch, log] = keys(room);
        let mut conn = self.conn()?;
        let mut call = self.history.prepare_invoke();
        call.key(seq)
            .key(epoch)
            .key(log)
            .key(replid_key(room))
            .arg(since.map_or(-1, |s| s as i64))
            .arg(new_epoch())
            .arg(self.empty_room_ttl_secs())
            .arg(super::REPLAY_PAGE_MESSAGES)
            .arg(super::REPLAY_PAGE_BYTES);
        let value: Value = tokio::time::timeout(COMMAND_TIMEOUT, call.invoke_async(&mut conn))
            .await
            .map_err(|_| unavailable("redis timed out"))?
            .map_err(unavailable)?;
        parse_log(value).ok_or_else(|| unavailable("unexpected reply from the history script"))
    }

    /// Deliver what the log holds after `last` (in `epoch`) for `room`, page
    /// by page; before `before` when given. When the log is in another epoch,
    /// everything it holds is new to this node. Returns how many were
    /// delivered.
    async fn fill(&self, room: &str, epoch: &str, last: u64, before: Option<u64>) -> u64 {
        let mut epoch: Arc<str> = Arc::from(epoch);
        let mut after = last;
        let mut switched = false;
        let mut n = 0;
        loop {
            let log = match self.read_log(room, Some(after)).await {
                Ok(log) => log,
                Err(e) => {
                    warn!(room, error = %e, "cannot read history to fill a relay gap");
                    break;
                }
            };
            if log.epoch != epoch {
                if switched {
                    break;
                }
                // A new epoch: everything its log holds is new to this node.
                switched = true;
                epoch = log.epoch;
                after = 0;
                continue;
            }
            if log.entries.is_empty() {
                if after < log.latest {
                    warn!(room, after, oldest = ?log.oldest, "relay gap is older than the history");
                }
                break;
            }
            for (seq, frame) in log.entries {
                if before.is_some_and(|b| seq >= b) {
                    self.metrics.gaps_filled.inc_by(n);
                    return n;
                }
                self.delivery.deliver(room, &epoch, seq, &frame);
                after = seq;
                n += 1;
            }
            if after >= log.latest {
                break;
            }
        }
        self.metrics.gaps_filled.inc_by(n);
        n
    }

    fn channel(&self, room: &str) -> String {
        if !self.cluster {
            channel(room)
        } else {
            sharded_channel(room)
        }
    }

    fn room_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        if !self.cluster {
            channel.strip_prefix(CHANNEL_PREFIX)
        } else {
            channel
                .strip_prefix(SHARDED_PREFIX)?
                .strip_suffix(SHARDED_SUFFIX)
        }
    }

    async fn on_message(&self, channel: &str, payload: &[u8]) {
        if self.control.listens_on(channel) {
            if let (Some(answer), Ok(conn)) = (self.control.on_message(payload), self.conn()) {
                // Not waited for here: the relay goes on reading.
                let control = self.control.clone();
                tokio::spawn(async move {
                    if let Err(e) = control.broadcast(conn, &answer).await {
                        debug!(error = %e, "sse handover: answer not sent");
                    }
                });
            }
            return;
        }
        let Some(room) = self.room_of(channel) else {
            return;
        };
        if let Some(change) = payload.strip_prefix(&[link::PRESENCE_MARK]) {
            return self.on_presence(room, change);
        }
        let Some((epoch, seq, frame)) = parse_relay(payload) else {
            warn!(room, "malformed relay message ignored");
            return;
        };
        self.metrics.relayed_in.inc();
        if let Some((known, last)) = self.delivery.position(room) {
            // A gap in the known epoch, or a new epoch whose first messages
            // went by before this node saw it: fill from the log.
            let from = if &*known == epoch { last } else { 0 };
            if seq > from + 1 {
                let filled = self.fill(room, epoch, from, Some(seq)).await;
                debug!(room, from, seq, filled, "relay gap filled from history");
            }
        }
        self.delivery.deliver(room, epoch, seq, &frame);
    }
}

fn parse_relay(payload: &[u8]) -> Option<(&str, u64, Utf8Bytes)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (epoch, rest) = text.split_once(' ')?;
    let (seq, frame) = rest.split_once(' ')?;
    Some((epoch, seq.parse().ok()?, Utf8Bytes::from(frame.to_owned())))
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

fn as_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn parse_log(value: Value) -> Option<Log> {
    let Value::Array(items) = value else {
        return None;
    };
    let mut items = items.into_iter();
    let epoch = as_string(items.next()?)?;
    let latest = as_u64(&items.next()?)?;
    let oldest = match items.next()? {
        Value::Int(n) if n >= 0 => Some(n as u64),
        _ => None,
    };
    let mut entries = Vec::new();
    while let (Some(id), Some(frame)) = (items.next(), items.next()) {
        let id = as_string(id)?;
        let seq = id.split('-').next()?.parse().ok()?;
        entries.push((seq, Utf8Bytes::from(as_string(frame)?)));
    }
    Some(Log {
        epoch: Arc::from(epoch),
        latest,
        oldest,
        entries,
    })
}

fn jittered(backoff: Duration) -> Duration {
    let ms = backoff.as_millis().max(1) as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

/// The relay task: holds the pub/sub connection, applies subscription
/// changes in the order they were made, and forwards messages to the rooms.
async fn relay(
    inner: Arc<Inner>,
    mut commands: mpsc::UnboundedReceiver<SubCmd>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_BASE;
    let mut connected_before = false;
    let mut switched = inner.switched.subscribe();
    loop {
        switched.mark_unchanged();
        let Some(client) = inner.primary() else {
            // Sentinel has not named a primary yet.
            sleep_backoff(&mut backoff, &stop).await;
            continue;
        };
        let pubsub = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub()) => r,
        };
        let (mut sink, mut stream) = match pubsub {
            Ok(Ok(ps)) => ps.split(),
            Ok(Err(e)) => {
                debug!(error = %redact_url(&e.to_string()), "redis relay connect failed");
                inner.saw_failure();
                sleep_backoff(&mut backoff, &stop).await;
                continue;
            }
            Err(_) => {
                inner.saw_failure();
                sleep_backoff(&mut backoff, &stop).await;
                continue;
            }
        };
        // The subscription map is the truth: queued commands are already
        // reflected in it.
        while commands.try_recv().is_ok() {}
        let rooms: Vec<Arc<str>> = inner.subs().keys().cloned().collect();
        if let Err(e) = subscribe_all(&mut sink, &rooms, &inner).await {
            warn!(error = %redact_url(&e.to_string()), "redis re-subscribe failed");
            sleep_backoff(&mut backoff, &stop).await;
            continue;
        }
        // Revocations sent while this node was away: not up without them.
        let reloaded = match inner.conn() {
            Ok(conn) => inner.control.reload(conn).await,
            Err(_) => false,
        };
        if !reloaded {
            sleep_backoff(&mut backoff, &stop).await;
            continue;
        }
        backoff = BACKOFF_BASE;
        inner.set_relay_up(true);
        for ready in inner.subs().values() {
            ready.send_replace(true);
        }
        inner.metrics.subscriptions.set(rooms.len() as i64);
        if connected_before {
            inner.metrics.broker_reconnects.inc();
            info!(rooms = rooms.len(), "redis relay reconnected; catching up");
            for room in &rooms {
                if let Some((epoch, last)) = inner.delivery.position(room) {
                    inner.fill(room, &epoch, last, None).await;
                }
            }
        } else {
            info!("redis relay connected");
        }
        connected_before = true;

        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = switched.changed() => {
                    info!("redis primary changed; the relay moves to it");
                    break;
                }
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { return };
                    if let Err(e) = apply(&inner, &mut sink, cmd).await {
                        warn!(error = %redact_url(&e.to_string()), "redis subscription change failed");
                        break;
                    }
                }
                msg = stream.next() => match msg {
                    Some(msg) => inner.on_message(msg.get_channel_name(), msg.get_payload_bytes()).await,
                    None => break,
                },
            }
        }
        warn!("redis relay connection lost; reconnecting");
        inner.saw_failure();
        inner.set_relay_up(false);
        for ready in inner.subs().values() {
            ready.send_replace(false);
        }
    }
}

async fn sleep_backoff(backoff: &mut Duration, stop: &CancellationToken) {
    let delay = jittered(*backoff);
    *backoff = (*backoff * 2).min(BACKOFF_CAP);
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

async fn subscribe_all(
    sink: &mut PubSubSink,
    rooms: &[Arc<str>],
    inner: &Inner,
) -> redis::RedisResult<()> {
    for chunk in rooms.chunks(500) {
        let channels: Vec<String> = chunk.iter().map(|r| channel(r)).collect();
        tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(channels))
            .await
            .map_err(|_| {
                redis::RedisError::from((redis::ErrorKind::Io, "subscribe timed out"))
            })??;
    }
    control::subscribe(sink, &inner.control).await
}

async fn apply(inner: &Inner, sink: &mut PubSubSink, cmd: SubCmd) -> redis::RedisResult<()> {
    let timed_out = || redis::RedisError::from((redis::ErrorKind::Io, "redis timed out"));
    match cmd {
        SubCmd::Subscribe(room) => {
            tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(channel(&room)))
                .await
                .map_err(|_| timed_out())??;
            if let Some(ready) = inner.subs().get(&room) {
                ready.send_replace(true);
            }
        }
        SubCmd::Unsubscribe(room) => {
            tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(channel(&room)))
                .await
                .map_err(|_| timed_out())??;
        }
    }
    inner.metrics.subscriptions.set(inner.subs().len() as i64);
    Ok(())
}

/// Checks the command connection every second.
async fn health(inner: Arc<Inner>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    let mut primaries = String::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(mut conn) = inner.conn() else {
            inner.commands_up.store(false, Ordering::Release);
            inner.update_up();
            continue;
        };
        let ok = matches!(
            tokio::time::timeout(
                COMMAND_TIMEOUT,
                redis::cmd("PING").query_async::<String>(&mut conn)
            )
            .await,
            Ok(Ok(_))
        );
        let ok = ok && (!inner.cluster || cluster_up(&inner, &mut conn, &mut primaries).await);
        if !ok {
            inner.saw_failure();
        }
        let was = inner.commands_up.swap(ok, Ordering::AcqRel);
        if was != ok || (first && !ok) {
            if ok {
                info!("redis reachable");
            } else {
                warn!("redis unreachable; not ready until it answers");
            }
        }
        first = false;
        inner.update_up();
    }
}

/// Redis Cluster: every slot-owning primary is up; when they changed (a
/// replica took over), the rooms' subscriptions follow them first.
async fn cluster_up(inner: &Inner, conn: &mut Conn, known: &mut String) -> bool {
    let Some((up, now)) = sharded::primaries(conn).await else {
        return false;
    };
    if up && *known != now {
        if !known.is_empty() && !sharded::follow_topology(inner, conn, &now).await {
            return false;
        }
        *known = now;
    }
    up
}

/// What a failed publish means for the client: refused before it reached
/// Redis (`unavailable`), or sent with no answer (`timeout`: fate unknown,
/// at most once thanks to the script's deadline).
fn publish_error(e: redis::RedisError) -> BrokerError {
    if e.is_connection_refusal() {
        unavailable(e)
    } else if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        BrokerError::Timeout(redact_url(&e.to_string()))
    } else {
        unavailable(e)
    }
}

/// The room's messages after a seq, for a resume: only when `since` is
/// covered, and never past `latest`.
fn recovered_frames(log: Log, since: Since<'_>) -> Option<Vec<(u64, Utf8Bytes)>> {
    covers(since, &log.epoch, log.oldest, log.latest).then(|| {
        log.entries
            .into_iter()
            .filter(|(s, _)| *s > since.seq && *s <= log.latest)
            .collect()
    })
}

impl Broker for RedisBroker {
    fn publish<'a>(
        &'a self,
        room: &'a str,
        parts: MessageParts,
        key: Option<&'a str>,
    ) -> BoxFut<'a, Result<Published, BrokerError>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.check_up()?;
            let [seq, epoch, log] = keys(room);
            let deadline =
                crate::session::now_ms().saturating_add(COMMAND_TIMEOUT.as_millis() as u64);
            let mut call = inner.publish.prepare_invoke();
            call.key(seq)
                .key(epoch)
                .key(log)
                .key(idempotency_key(room, key.unwrap_or("")))
                .key(replid_key(room))
                .arg(parts.head())
                .arg(parts.tail())
                .arg(inner.settings.history)
                .arg(new_epoch())
                .arg(inner.ttl_secs())
                .arg(inner.channel(room))
                .arg(if inner.cluster { "SPUBLISH" } else { "PUBLISH" })
                .arg(deadline)
                .arg(if key.is_some() { "1" } else { "0" })
                .arg(IDEMPOTENCY_WINDOW.as_secs());
            let mut conn = inner.conn()?;
            let (seq, duplicate): (i64, i64) =
                tokio::time::timeout(COMMAND_TIMEOUT, call.invoke_async(&mut conn))
                    .await
                    .map_err(|_| BrokerError::Timeout("redis did not answer in time".into()))?
                    .map_err(publish_error)?;
            let seq = u64::try_from(seq)
                .map_err(|_| unavailable("redis ran the publish after its deadline"))?;
            // A duplicate too: the script wrote its key again, so the WAIT
            // covers everything up to the first publish (section 10: no
            // ack before N replicas have the message).
            inner.confirm_replicas().await?;
            Ok(Published {
                seq,
                duplicate: duplicate != 0,
            })
        })
    }

    fn subscribe(&self, room: &str) {
        let mut subs = self.inner.subs();
        if !subs.contains_key(room) {
            let key: Arc<str> = Arc::from(room);
            subs.insert(key.clone(), watch::channel(false).0);
            let _ = self.inner.commands.send(SubCmd::Subscribe(key));
        }
    }

    fn ready<'a>(&'a self, room: &'a str) -> BoxFut<'a, Result<(), BrokerError>> {
        let ready = self.inner.subs().get(room).map(watch::Sender::subscribe);
        Box::pin(async move {
            let Some(mut ready) = ready else {
                return Err(unavailable("room not subscribed"));
            };
            // Wait for the subscription, but answer at once when Redis is
            // known to be down (the health check notices within a second or
            // two) instead of holding the connection's other frames.
            let down = async {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                loop {
                    tick.tick().await;
                    if self.inner.is_known_down() {
                        return;
                    }
                }
            };
            tokio::select! {
                r = tokio::time::timeout(SUBSCRIBE_WAIT, ready.wait_for(|r| *r)) => match r {
                    Ok(Ok(_)) => Ok(()),
                    _ => Err(unavailable("redis subscription not available")),
                },
                () = down => Err(unavailable("redis is unreachable")),
            }
        })
    }

    fn unsubscribe(&self, room: &str) {
        if let Some((key, _)) = self.inner.subs().remove_entry(room) {
            let _ = self.inner.commands.send(SubCmd::Unsubscribe(key));
        }
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        since: Option<Since<'a>>,
    ) -> BoxFut<'a, Result<RoomHistory, BrokerError>> {
        Box::pin(async move {
            self.inner.check_up()?;
            let log = self.inner.read_log(room, since.map(|s| s.seq)).await?;
            let mut out = RoomHistory {
                epoch: log.epoch.clone(),
                latest: log.latest,
                recovered: false,
                frames: Vec::new(),
            };
            if let Some(frames) = since.and_then(|since| recovered_frames(log, since)) {
                out.recovered = true;
                out.frames = frames;
            }
            Ok(out)
        })
    }

    fn replay_page<'a>(
        &'a self,
        room: &'a str,
        epoch: &'a str,
        after: u64,
        upto: u64,
    ) -> BoxFut<'a, Result<Vec<(u64, Utf8Bytes)>, BrokerError>> {
        Box::pin(async move {
            let log = self.inner.read_log(room, Some(after)).await?;
            if &*log.epoch != epoch {
                return Ok(Vec::new());
            }
            Ok(log
                .entries
                .into_iter()
                .filter(|(s, _)| *s <= upto)
                .collect())
        })
    }

    fn range<'a>(
        &'a self,
        room: &'a str,
        since: u64,
        limit: usize,
    ) -> BoxFut<'a, Result<HistoryPage, BrokerError>> {
        Box::pin(range::range(&self.inner, room, since, limit))
    }

    fn control<'a>(&'a self, msg: &'a ControlMsg) -> BoxFut<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let conn = self.inner.conn()?;
            self.inner.control.broadcast(conn, msg).await
        })
    }

    fn is_up(&self) -> bool {
        self.inner.is_up()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_payload_parses() {
        let (epoch, seq, frame) = parse_relay(b"abc 42 {\"x\":\"a b\"}").unwrap();
        assert_eq!(epoch, "abc");
        assert_eq!(seq, 42);
        assert_eq!(frame.as_str(), "{\"x\":\"a b\"}");
        assert!(parse_relay(b"abc x {}").is_none());
        assert!(parse_relay(b"abc").is_none());
    }

    #[test]
    fn keys_share_a_hash_tag() {
        let [a, b, c] = keys("team.1");
        for k in [&a, &b, &c] {
            assert!(k.contains("{team.1}"), "{k}");
        }
        assert_eq!(channel("team.1"), "wsgate:room:team.1");
    }

    #[test]
    fn log_reply_parses() {
        let v = Value::Array(vec![
            Value::BulkString(b"ep".to_vec()),
            Value::Int(5),
            Value::Int(3),
            Value::BulkString(b"4-0".to_vec()),
            Value::BulkString(b"f4".to_vec()),
            Value::BulkString(b"5-0".to_vec()),
            Value::BulkString(b"f5".to_vec()),
        ]);
        let log = parse_log(v).unwrap();
        assert_eq!(&*log.epoch, "ep");
        assert_eq!((log.latest, log.oldest), (5, Some(3)));
        let seqs: Vec<u64> = log.entries.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [4, 5]);
        let empty = Value::Array(vec![
            Value::BulkString(b"ep".to_vec()),
            Value::Int(0),
            Value::Int(-1),
        ]);
        assert_eq!(parse_log(empty).unwrap().oldest, None);
    }

    #[test]
    fn backoff_jitter_stays_within_bounds() {
        for _ in 0..100 {
            let d = jittered(Duration::from_millis(400));
            assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
        }
    }
}
