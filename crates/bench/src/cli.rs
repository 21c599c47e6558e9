//! Command line: the seven scenarios, their flags, bounds and validation.
//!
//! Every run is bounded: connection counts, rates, payloads and durations
//! have ceilings, and a hard `--deadline` (by default the planned time plus a
//! margin) ends any run that hangs. Targets must be loopback addresses unless
//! `--allow-remote` is given.

use std::net::IpAddr;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::net::{OpsTarget, Target, Transport};

/// Most connections one run may open.
pub const MAX_CONNECTIONS: usize = 500_000;
/// Highest total publish rate, messages per second.
pub const MAX_RATE: f64 = 10_000_000.0;
/// Longest planned duration of any phase.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Largest padding in a message's `data`.
pub const MAX_PAYLOAD: usize = 1 << 20;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))
}

/// `wsgate-bench`: load tool for wsgate.
#[derive(Debug, Parser)]
#[command(name = "wsgate-bench", version, about, long_about = None)]
pub struct Cli {
    /// The scenario to run (or the floor server).
    #[command(subcommand)]
    pub command: Command,
}

/// What the binary does: a scenario against servers, or be the floor server.
// Parsed once per process: the size of the value does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    #[allow(missing_docs)]
    #[command(flatten)]
    Scenario(Scenario),
    /// The floor under a fan-out: a minimal WebSocket sender (no framework)
    /// that `fanout` and `rooms` can target; prints `listening ADDR`.
    FloorServer(FloorArgs),
}

/// `floor-server`.
#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Address to listen on (port 0: a free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Allow a listen address that is not loopback.
    #[arg(long)]
    pub allow_remote: bool,
}

impl FloorArgs {
    /// Check the listen address.
    pub fn validate(&self) -> Result<(), String> {
        if !self.allow_remote && !self.listen.ip().is_loopback() {
            return Err(format!(
                "--listen {} is not a loopback address (use --allow-remote)",
                self.listen
            ));
        }
        Ok(())
    }
}

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Open N connections as fast as allowed; report handshakes/s and failures by status.
    Connect(ConnectArgs),
    /// Hold N connections joined to rooms; report the server's memory per connection.
    Idle(IdleArgs),
    /// S subscribers in one room, P publishers at a total rate: deliveries/s, latency, seq checks, CPU per delivery.
    Fanout(FanoutArgs),
    /// C connections in rooms of K, each publishing at r/s (the chat shape).
    Rooms(RoomsArgs),
    /// Clients over several nodes; kill or drain one node; time until all its clients resumed elsewhere.
    Reconnect(ReconnectArgs),
    /// Raise the fan-out rate step by step until p99 passes a limit or a message is lost.
    Ramp(RampArgs),
    /// Hours-long trust check under churn and faults: every acknowledged
    /// message reaches every member, once, or the member is told.
    Soak(SoakArgs),
}

/// Flags every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Gateway WebSocket URL; repeat for several nodes (connections go round-robin).
    #[arg(long = "url", default_value = "ws://127.0.0.1:8080/ws")]
    pub urls: Vec<String>,
    /// A node's operations listener (for /metrics before and after); repeatable.
    #[arg(long = "ops-url")]
    pub ops_urls: Vec<String>,
    /// A server process (node or redis-server) to read CPU and memory of from
    /// /proc/PID; repeatable. When given, these replace the nodes' /metrics
    /// process figures (whose CPU counter has a 1 s grain): list every server process.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// HMAC secret to mint HS256 tokens with (as the gateway's --jwt-secret).
    #[arg(long, env = "WSGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A ready token used by every connection (needs rooms and publish grants for the scenario).
    #[arg(long, conflicts_with = "jwt_secret", hide_env_values = true)]
    pub token: Option<String>,
    /// `iss` claim of minted tokens.
    #[arg(long)]
    pub jwt_issuer: Option<String>,
    /// `aud` claim of minted tokens.
    #[arg(long)]
    pub jwt_audience: Option<String>,
    /// Send this Origin header on the upgrade (it must be on the gateway's allow-list).
    #[arg(long)]
    pub origin: Option<String>,
    /// Source addresses to bind client sockets to, round-robin (about 28k connections per address).
    #[arg(long, value_delimiter = ',')]
    pub source_ips: Vec<IpAddr>,
    /// Allow targets and source addresses that are not loopback.
    #[arg(long)]
    pub allow_remote: bool,
    /// Limit on one connect + upgrade + welcome (and join).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// Handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Hard limit on the whole run (default: the planned time plus a margin).
    #[arg(long, value_parser = duration)]
    pub deadline: Option<Duration>,
    /// Print only the JSON line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    pub threads: Option<usize>,
    /// WebSocket read buffer per connection, bytes.
    #[arg(long, default_value_t = 4096)]
    pub read_buffer: usize,
    /// Offer permessage-deflate (RFC 7692, `server_no_context_takeover;
    /// client_no_context_takeover`) on every connection and inflate
    /// compressed messages; a server that does not accept it sends plain frames.
    #[arg(long)]
    pub deflate: bool,
    /// Transport of the members that only read (`idle`, `fanout`
    /// subscribers): `ws`, or `sse` (GET /sse, joins with POST /sse/{conn});
    /// publishers always use WebSocket.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
}

/// Subscribers and publishers of a fan-out (`fanout`, `ramp`).
#[derive(Debug, Clone, Args)]
pub struct Audience {
    /// Subscribers, spread round-robin over the URLs.
    #[arg(long, short = 's', default_value_t = 1000)]
    pub subscribers: usize,
    /// Publishers, sharing the rate (each must stay under the gateway's --publish-rate).
    #[arg(long, short = 'p', default_value_t = 1)]
    pub publishers: usize,
}

/// The measured phase of `fanout` and `rooms`.
#[derive(Debug, Clone, Args)]
pub struct Window {
    /// Measured time.
    #[arg(long, short = 'd', default_value = "10s", value_parser = duration)]
    pub duration: Duration,
    /// Publishing before the measurement starts.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub warmup: Duration,
}

/// What the publishers of a fan-out send, and where they connect (`fanout`, `ramp`).
#[derive(Debug, Clone, Args)]
pub struct PublisherArgs {
    /// Padding bytes in each message's `data`.
    #[arg(long, default_value_t = 32)]
    pub payload: usize,
    /// Instead of padding: `data` is a dashboard-like JSON document (a list
    /// of metric series: names, hosts, values, units) of about this many bytes.
    #[arg(long, conflicts_with = "payload")]
    pub payload_bytes: Option<usize>,
    /// URL the publishers connect to (default: the first --url).
    #[arg(long)]
    pub publisher_url: Option<String>,
    /// Give every publish an idempotency key (to measure its cost).
    #[arg(long)]
    pub keys: bool,
}

/// Presence (PROTOCOL.md section 6) for the joins of `idle` and `reconnect`.
#[derive(Debug, Clone, Args)]
pub struct PresenceArgs {
    /// Join with `"presence":true` (presence events for every member), each
    /// connection as its own user so that presence counts every one (implies
    /// --distinct-users). Presence events cost members x joins per room: keep
    /// rooms small (--rooms).
    #[arg(long)]
    pub presence: bool,
    /// Each connection its own user (`<user-prefix>-<index>`) instead of one
    /// user for all.
    #[arg(long)]
    pub distinct_users: bool,
    /// Prefix of the user ids (default: the scenario's); several processes
    /// of one run need different prefixes for distinct users.
    #[arg(long)]
    pub user_prefix: Option<String>,
}

impl PresenceArgs {
    /// Whether every connection is its own user.
    pub fn distinct(&self) -> bool {
        self.presence || self.distinct_users
    }

    /// The user id of connection `index`: `<prefix>-<index>` when distinct,
    /// otherwise `<prefix>`; `default` is the scenario's prefix.
    pub fn user(&self, default: &str, index: usize) -> String {
        let prefix = self.user_prefix.as_deref().unwrap_or(default);
        if self.distinct() {
            format!("{prefix}-{index}")
        } else {
            prefix.to_owned()
        }
    }

    fn validate(&self) -> Result<(), String> {
        match &self.user_prefix {
            Some(p) if p.is_empty() || p.len() > 100 => {
                Err("--user-prefix must be 1 to 100 characters".to_owned())
            }
            _ => Ok(()),
        }
    }
}

/// `connect`.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub common: Common,
    /// Connections to open (kept open until all are done).
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
}

/// `idle`.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub common: Common,
    /// Connections to hold.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
    /// Rooms to spread them over (`<room>.0`, `<room>.1`, ...).
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Room name prefix.
    #[arg(long, default_value = "idle")]
    pub room: String,
    /// How long to hold them before measuring again.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub hold: Duration,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub presence: PresenceArgs,
}

/// `fanout`.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub common: Common,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub audience: Audience,
    /// Total publish rate, messages per second.
    #[arg(long, short = 'r', default_value_t = 100.0)]
    pub rate: f64,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub window: Window,
    /// Longest wait, after publishing stops, for every subscriber to catch up.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub drain: Duration,
    /// The room.
    #[arg(long, default_value = "fanout")]
    pub room: String,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub publisher: PublisherArgs,
}

/// `rooms`.
#[derive(Debug, Clone, Args)]
pub struct RoomsArgs {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub common: Common,
    /// Connections, each in one room and publishing to it.
    #[arg(long, short = 'n', default_value_t = 2000)]
    pub connections: usize,
    /// Connections per room.
    #[arg(long, short = 'k', default_value_t = 10)]
    pub room_size: usize,
    /// Publish rate of each connection, messages per second.
    #[arg(long, short = 'r', default_value_t = 1.0)]
    pub rate: f64,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub window: Window,
    /// Longest wait, after publishing stops, for every member to catch up.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub drain: Duration,
    /// Room name prefix (`<room>.0`, `<room>.1`, ...).
    #[arg(long, default_value = "chat")]
    pub room: String,
    /// Padding bytes in each message's `data`.
    #[arg(long, default_value_t = 32)]
    pub payload: usize,
    /// Give every publish an idempotency key (to measure its cost).
    #[arg(long)]
    pub keys: bool,
}

/// `reconnect`.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("fault").required(true).args(["kill_pid", "drain_pid"])))]
pub struct ReconnectArgs {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub common: Common,
    /// Clients, spread round-robin over the URLs.
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub clients: usize,
    /// Rooms the clients are spread over (client i in room i mod R; one room
    /// is named --room, several `<room>.0`, `<room>.1`, ...), one publisher
    /// each.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Publish rate of each room's publisher (on the last --url), messages
    /// per second.
    #[arg(long, short = 'r', default_value_t = 100.0)]
    pub rate: f64,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub presence: PresenceArgs,
    /// With --presence or --distinct-users: check presence this long after
    /// the fault (the gateway's --presence-ttl, 15 s by default, + 5 s for
    /// the killed node's users to be removed, + 2 s to propagate), then
    /// compare every room's `presence` answer, on every surviving node,
    /// with the clients connected in it.
    #[arg(long, default_value = "22s", value_parser = duration)]
    pub presence_settle: Duration,
    /// SIGKILL this process: the node behind the FIRST --url.
    #[arg(long)]
    pub kill_pid: Option<u32>,
    /// SIGTERM (drain) this process: the node behind the FIRST --url.
    #[arg(long)]
    pub drain_pid: Option<u32>,
    /// Share of the clients put on the first --url (the node the fault hits);
    /// the rest go round-robin over the others. Default: an even spread.
    #[arg(long)]
    pub first_share: Option<f64>,
    /// Messages flowing before the fault.
    #[arg(long, default_value = "3s", value_parser = duration)]
    pub before: Duration,
    /// Messages flowing after every client resumed.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub after: Duration,
    /// Longest wait for every client of the node to resume.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub resume_timeout: Duration,
    /// Longest wait, after publishing stops, for every client to catch up
    /// (clients still receiving when it runs out are reported as lagging,
    /// not as losing messages).
    #[arg(long, default_value = "120s", value_parser = duration)]
    pub drain: Duration,
    /// The drain also ends when no client has received a message for this
    /// long (the servers are idle): what is still missing then never arrived
    /// and counts as lost.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub idle: Duration,
    /// Share of the clients that stop reading for --stall, from --stall/2
    /// before publishing stops (slow readers: they lag, they lose nothing).
    #[arg(long, default_value_t = 0.0)]
    pub stall_share: f64,
    /// How long the --stall-share clients stop reading (below --idle).
    #[arg(long, default_value = "0s", value_parser = duration)]
    pub stall: Duration,
    /// The room.
    #[arg(long, default_value = "failover")]
    pub room: String,
    /// Padding bytes in each message's `data`.
    #[arg(long, default_value_t = 32)]
    pub payload: usize,
}

/// `soak`.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub common: Common,
    /// How long publishing and churn go on (faults are injected from outside,
    /// e.g. by benches/soak.sh).
    #[arg(long, short = 'd', default_value = "10m", value_parser = duration)]
    pub duration: Duration,
    /// Rooms (named `--room.N`).
    #[arg(long, default_value_t = 8)]
    pub rooms: usize,
    /// Subscribers: long-lived connections, each in --sub-rooms rooms, that
    /// resume with `since` + `epoch` whenever their connection drops.
    #[arg(long, short = 's', default_value_t = 120)]
    pub subscribers: usize,
    /// Rooms each subscriber joins.
    #[arg(long, default_value_t = 2)]
    pub sub_rooms: usize,
    /// Of the rooms, this many (the last ones) get no steady publishing,
    /// only storm messages: members that joined or resumed since the last
    /// storm have had no message when a fault hits.
    #[arg(long, default_value_t = 2)]
    pub quiet_rooms: usize,
    /// Publishers, each publishing with an id and recording every `ack`.
    #[arg(long, short = 'p', default_value_t = 4)]
    pub publishers: usize,
    /// Steady publish rate of each publisher, messages per second.
    #[arg(long, short = 'r', default_value_t = 20.0)]
    pub rate: f64,
    /// A publish storm every this long...
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub storm_every: Duration,
    /// ...of this many messages from each publisher at once.
    #[arg(long, default_value_t = 300)]
    pub storm: usize,
    /// Churners: connect, join a room or two, stay a moment, leave, close
    /// (or drop the TCP connection), again and again.
    #[arg(long, short = 'c', default_value_t = 30)]
    pub churners: usize,
    /// Longest wait after publishing stops for every subscriber to be back
    /// and quiet.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub drain: Duration,
    /// The drain ends once every subscriber is connected and none has
    /// received anything for this long.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub idle: Duration,
    /// Room name prefix.
    #[arg(long, default_value = "soak")]
    pub room: String,
}

/// `ramp`.
#[derive(Debug, Clone, Args)]
pub struct RampArgs {
    #[allow(missing_docs)]
    #[command(flatten)]
    pub common: Common,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub audience: Audience,
    /// First step's total publish rate, messages per second.
    #[arg(long, default_value_t = 20.0)]
    pub start_rate: f64,
    /// Each step multiplies the rate by this.
    #[arg(long, default_value_t = 1.25)]
    pub factor: f64,
    /// Highest rate tried.
    #[arg(long, default_value_t = 100_000.0)]
    pub max_rate: f64,
    /// Length of one step (its first fifth is not measured).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub step: Duration,
    /// Most steps.
    #[arg(long, default_value_t = 30)]
    pub max_steps: usize,
    /// A step passes while its p99 stays at or under this.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    pub p99_limit: Duration,
    /// The room.
    #[arg(long, default_value = "ramp")]
    pub room: String,
    #[allow(missing_docs)]
    #[command(flatten)]
    pub publisher: PublisherArgs,
}

fn check_count(name: &str, n: usize, min: usize, max: usize) -> Result<(), String> {
    if n < min || n > max {
        return Err(format!(
            "--{name} must be between {min} and {max} (got {n})"
        ));
    }
    Ok(())
}

fn check_rate(name: &str, r: f64) -> Result<(), String> {
    if !(r.is_finite() && r > 0.0 && r <= MAX_RATE) {
        return Err(format!(
            "--{name} must be above 0 and at most {MAX_RATE} (got {r})"
        ));
    }
    Ok(())
}

fn check_duration(name: &str, d: Duration, allow_zero: bool) -> Result<(), String> {
    if (!allow_zero && d.is_zero()) || d > MAX_DURATION {
        let min = if allow_zero { "0" } else { "above 0" };
        return Err(format!("--{name} must be {min} and at most 24h"));
    }
    Ok(())
}

fn check_room(name: &str, room: &str) -> Result<(), String> {
    // Room prefixes get `.N` appended; check with a suffix so the length counts.
    let probe = format!("{room}.0");
    if !wsgate_protocol::is_valid_room(room) || !wsgate_protocol::is_valid_room(&probe) {
        return Err(format!(
            "--{name} '{room}' is not a valid room name (1 to 128 of A-Z a-z 0-9 _ - . :)"
        ));
    }
    Ok(())
}

fn check_payload(n: usize) -> Result<(), String> {
    check_count("payload", n, 0, MAX_PAYLOAD)
}

impl Audience {
    /// Check the counts.
    fn validate(&self) -> Result<(), String> {
        check_count("subscribers", self.subscribers, 1, MAX_CONNECTIONS)?;
        check_count("publishers", self.publishers, 1, 10_000)
    }

    /// Connections: subscribers and publishers.
    pub fn connections(&self) -> usize {
        self.subscribers + self.publishers
    }
}

impl Window {
    /// Check the durations.
    fn validate(&self) -> Result<(), String> {
        check_duration("duration", self.duration, false)?;
        check_duration("warmup", self.warmup, true)
    }
}

impl PublisherArgs {
    /// Check the padding and the publisher URL.
    fn validate(&self, allow_remote: bool) -> Result<(), String> {
        check_payload(self.payload)?;
        if let Some(n) = self.payload_bytes {
            check_count("payload-bytes", n, 16, MAX_PAYLOAD)?;
        }
        if let Some(url) = &self.publisher_url {
            Target::parse(url, allow_remote)?;
        }
        Ok(())
    }
}

impl Common {
    /// Check targets, bounds and the token source.
    pub fn validate(&self) -> Result<(), String> {
        if self.urls.is_empty() {
            return Err("give at least one --url".to_owned());
        }
        for url in &self.urls {
            Target::parse(url, self.allow_remote)?;
        }
        for url in &self.ops_urls {
            OpsTarget::parse(url, self.allow_remote)?;
        }
        for ip in &self.source_ips {
            if !self.allow_remote && !ip.is_loopback() {
                return Err(format!(
                    "--source-ips {ip} is not a loopback address (use --allow-remote)"
                ));
            }
        }
        if self.source_ips.iter().any(IpAddr::is_ipv4)
            && self.source_ips.iter().any(IpAddr::is_ipv6)
        {
            return Err("--source-ips mixes IPv4 and IPv6".to_owned());
        }
        match (&self.jwt_secret, &self.token) {
            (None, None) => return Err("give --jwt-secret (to mint tokens) or --token".to_owned()),
            (Some(s), _) if s.is_empty() => return Err("--jwt-secret is empty".to_owned()),
            (_, Some(t)) if t.is_empty() => return Err("--token is empty".to_owned()),
            _ => {}
        }
        check_count("concurrency", self.concurrency, 1, 10_000)?;
        check_count("read-buffer", self.read_buffer, 256, 16 << 20)?;
        if let Some(t) = self.threads {
            check_count("threads", t, 1, 256)?;
        }
        check_duration("connect-timeout", self.connect_timeout, false)?;
        if let Some(d) = self.deadline {
            check_duration("deadline", d, false)?;
        }
        Ok(())
    }

    /// Time allowed to open `n` connections.
    pub fn setup_budget(&self, n: usize) -> Duration {
        self.connect_timeout * 2 + Duration::from_secs_f64(n as f64 / 500.0)
    }
}

impl Scenario {
    /// The scenario's name, as on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Connect(_) => "connect",
            Scenario::Idle(_) => "idle",
            Scenario::Fanout(_) => "fanout",
            Scenario::Rooms(_) => "rooms",
            Scenario::Reconnect(_) => "reconnect",
            Scenario::Ramp(_) => "ramp",
            Scenario::Soak(_) => "soak",
        }
    }

    /// The flags every scenario takes.
    pub fn common(&self) -> &Common {
        match self {
            Scenario::Connect(a) => &a.common,
            Scenario::Idle(a) => &a.common,
            Scenario::Fanout(a) => &a.common,
            Scenario::Rooms(a) => &a.common,
            Scenario::Reconnect(a) => &a.common,
            Scenario::Ramp(a) => &a.common,
            Scenario::Soak(a) => &a.common,
        }
    }

    /// Connections the scenario opens (publishers included).
    pub fn connections(&self) -> usize {
        match self {
            Scenario::Connect(a) => a.connections,
            Scenario::Idle(a) => a.connections,
            Scenario::Fanout(a) => a.audience.connections(),
            Scenario::Rooms(a) => a.connections,
            Scenario::Reconnect(a) => a.clients + a.rooms,
            Scenario::Ramp(a) => a.audience.connections(),
            Scenario::Soak(a) => a.subscribers + a.publishers + a.churners,
        }
    }

    /// Check every flag; the error is one line for the user.
    pub fn validate(&self) -> Result<(), String> {
        let common = self.common();
        common.validate()?;
        if common.transport == Transport::Sse
            && !matches!(self, Scenario::Idle(_) | Scenario::Fanout(_))
        {
            return Err("--transport sse is for idle and fanout".to_owned());
        }
        if common.transport == Transport::Sse && common.deflate {
            return Err("--deflate is for WebSocket, not --transport sse".to_owned());
        }
        let max = MAX_CONNECTIONS;
        match self {
            Scenario::Connect(a) => check_count("connections", a.connections, 1, max)?,
            Scenario::Idle(a) => {
                check_count("connections", a.connections, 1, max)?;
                check_count("rooms", a.rooms, 1, a.connections)?;
                check_room("room", &a.room)?;
                check_duration("hold", a.hold, true)?;
                a.presence.validate()?;
            }
            Scenario::Fanout(a) => {
                a.audience.validate()?;
                check_rate("rate", a.rate)?;
                a.window.validate()?;
                check_duration("drain", a.drain, true)?;
                check_room("room", &a.room)?;
                a.publisher.validate(common.allow_remote)?;
            }
            Scenario::Rooms(a) => {
                check_count("connections", a.connections, 1, max)?;
                check_count("room-size", a.room_size, 1, a.connections)?;
                check_rate("rate", a.rate)?;
                check_rate("rate x connections", a.rate * a.connections as f64)?;
                a.window.validate()?;
                check_duration("drain", a.drain, true)?;
                check_room("room", &a.room)?;
                check_payload(a.payload)?;
            }
            Scenario::Reconnect(a) => {
                check_count("clients", a.clients, 1, max)?;
                check_count("rooms", a.rooms, 1, a.clients.min(10_000))?;
                check_rate("rate", a.rate)?;
                check_rate("rate x rooms", a.rate * a.rooms as f64)?;
                a.presence.validate()?;
                check_duration("presence-settle", a.presence_settle, true)?;
                if common.urls.len() < 2 {
                    return Err(
                        "reconnect needs at least two --url (the first is the node the fault hits)"
                            .to_owned(),
                    );
                }
                if a.kill_pid.or(a.drain_pid) == Some(std::process::id()) {
                    return Err("the fault pid is this process".to_owned());
                }
                if a.first_share.is_some_and(|f| !(f > 0.0 && f < 1.0)) {
                    return Err("--first-share must be above 0 and below 1".to_owned());
                }
                if a.kill_pid.or(a.drain_pid).is_some_and(|p| p <= 1) {
                    return Err("the fault pid must be a server process".to_owned());
                }
                check_duration("before", a.before, false)?;
                check_duration("after", a.after, true)?;
                check_duration("resume-timeout", a.resume_timeout, false)?;
                check_duration("drain", a.drain, true)?;
                check_duration("idle", a.idle, false)?;
                check_duration("stall", a.stall, true)?;
                if !(0.0..=1.0).contains(&a.stall_share) {
                    return Err("--stall-share must be from 0 to 1".to_owned());
                }
                if a.stall >= a.idle {
                    return Err(
                        "--stall must be below --idle (a stalled client would read as a loss)"
                            .to_owned(),
                    );
                }
                if a.stall / 2 > a.after {
                    return Err("--stall/2 must fit in --after".to_owned());
                }
                check_room("room", &a.room)?;
                check_payload(a.payload)?;
            }
            Scenario::Ramp(a) => {
                a.audience.validate()?;
                check_rate("start-rate", a.start_rate)?;
                check_rate("max-rate", a.max_rate)?;
                if a.start_rate > a.max_rate {
                    return Err("--start-rate is above --max-rate".to_owned());
                }
                if !(a.factor.is_finite() && a.factor > 1.0 && a.factor <= 10.0) {
                    return Err("--factor must be above 1 and at most 10".to_owned());
                }
                check_count("max-steps", a.max_steps, 1, 1_000)?;
                check_duration("step", a.step, false)?;
                check_duration("p99-limit", a.p99_limit, false)?;
                check_room("room", &a.room)?;
                a.publisher.validate(common.allow_remote)?;
            }
            Scenario::Soak(a) => {
                check_duration("duration", a.duration, false)?;
                check_count("rooms", a.rooms, 1, 10_000)?;
                check_count("subscribers", a.subscribers, 1, 3_000)?;
                check_count("sub-rooms", a.sub_rooms, 1, a.rooms)?;
                check_count("quiet-rooms", a.quiet_rooms, 0, a.rooms - 1)?;
                check_count("publishers", a.publishers, 1, 100)?;
                check_count("churners", a.churners, 0, 1_000)?;
                // One process, at most ~3,000 connections (20,000 open files).
                check_count(
                    "subscribers + --publishers + --churners",
                    a.subscribers + a.publishers + a.churners,
                    1,
                    3_000,
                )?;
                check_rate("rate", a.rate)?;
                check_count("storm", a.storm, 0, 10_000)?;
                check_duration("storm-every", a.storm_every, false)?;
                check_duration("drain", a.drain, false)?;
                check_duration("idle", a.idle, false)?;
                check_room("room", &a.room)?;
                // Every acked message is kept for the final check: bound them.
                let storms = a.duration.as_secs_f64() / a.storm_every.as_secs_f64();
                let total = a.publishers as f64
                    * (a.rate * a.duration.as_secs_f64() + storms * a.storm as f64);
                if total > 5e6 {
                    return Err(format!(
                        "the soak would publish about {total:.0} messages; at most 5,000,000 are checked"
                    ));
                }
            }
        }
        Ok(())
    }

    /// How long the run should take when all goes well.
    pub fn planned(&self) -> Duration {
        let setup = self.common().setup_budget(self.connections());
        let run = match self {
            Scenario::Connect(_) => Duration::ZERO,
            Scenario::Idle(a) => a.hold,
            Scenario::Fanout(a) => a.window.warmup + a.window.duration + a.drain,
            Scenario::Rooms(a) => a.window.warmup + a.window.duration + a.drain,
            Scenario::Reconnect(a) => {
                let settle = if a.presence.distinct() {
                    a.presence_settle + Duration::from_secs(10)
                } else {
                    Duration::ZERO
                };
                (a.before + a.resume_timeout + a.after + a.drain).max(a.before + settle)
            }
            Scenario::Ramp(a) => a.step * a.max_steps as u32 + a.step,
            Scenario::Soak(a) => a.duration + a.drain + Duration::from_secs(30),
        };
        setup + run
    }

    /// The hard deadline: `--deadline`, or the planned time plus a margin.
    pub fn deadline(&self) -> Duration {
        self.common()
            .deadline
            .unwrap_or_else(|| self.planned() + self.planned() / 2 + Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Scenario, String> {
        let mut all = vec!["wsgate-bench"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        let Command::Scenario(scenario) = cli.command else {
            return Err("not a scenario".to_owned());
        };
        scenario.validate()?;
        Ok(scenario)
    }

    #[test]
    fn floor_server_and_payload_flags() {
        let cli = Cli::try_parse_from(["wsgate-bench", "floor-server"]).unwrap();
        let Command::FloorServer(args) = cli.command else {
            panic!("not the floor server");
        };
        assert_eq!(args.listen.port(), 0);
        assert!(args.validate().is_ok());
        let s = parse(&[
            "fanout",
            "--jwt-secret",
            "s",
            "--payload-bytes",
            "2048",
            "--deflate",
        ])
        .unwrap();
        let Scenario::Fanout(f) = &s else {
            panic!("not fanout")
        };
        assert_eq!(f.publisher.payload_bytes, Some(2048));
        assert!(f.common.deflate);
        assert!(parse(&["fanout", "--jwt-secret", "s", "--payload-bytes", "2"]).is_err());
        let both = [
            "fanout",
            "--jwt-secret",
            "s",
            "--payload-bytes",
            "64",
            "--payload",
            "3",
        ];
        assert!(parse(&both).is_err());
    }

    #[test]
    fn command_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_valid() {
        for name in ["connect", "idle", "fanout", "rooms", "ramp", "soak"] {
            let s = parse(&[name, "--jwt-secret", "s"]).unwrap();
            assert_eq!(s.name(), name);
            assert!(s.deadline() > s.planned());
        }
        let s = parse(&[
            "reconnect",
            "--jwt-secret",
            "s",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--url",
            "ws://127.0.0.1:2/ws",
            "--kill-pid",
            "1234",
        ])
        .unwrap();
        assert_eq!(s.connections(), 1001);
    }

    #[test]
    fn a_token_source_is_required_and_exclusive() {
        assert!(parse(&["connect"]).unwrap_err().contains("--jwt-secret"));
        assert!(parse(&["connect", "--jwt-secret", ""]).is_err());
        assert!(parse(&["connect", "--token", "t"]).is_ok());
        assert!(parse(&["connect", "--token", "t", "--jwt-secret", "s"]).is_err());
    }

    #[test]
    fn remote_targets_need_allow_remote() {
        let remote = [
            "connect",
            "--jwt-secret",
            "s",
            "--url",
            "ws://10.1.2.3:8080/ws",
        ];
        assert!(parse(&remote).unwrap_err().contains("loopback"));
        let mut allowed = remote.to_vec();
        allowed.push("--allow-remote");
        assert!(parse(&allowed).is_ok());
        assert!(parse(&[
            "connect",
            "--jwt-secret",
            "s",
            "--ops-url",
            "http://192.168.1.1:9090"
        ])
        .is_err());
        assert!(parse(&[
            "connect",
            "--jwt-secret",
            "s",
            "--source-ips",
            "127.0.0.2,10.0.0.1"
        ])
        .is_err());
        assert!(parse(&[
            "connect",
            "--jwt-secret",
            "s",
            "--source-ips",
            "127.0.0.2,127.0.0.3"
        ])
        .is_ok());
        assert!(parse(&[
            "connect",
            "--jwt-secret",
            "s",
            "--url",
            "ws://localhost:1/ws"
        ])
        .is_ok());
        assert!(parse(&["connect", "--jwt-secret", "s", "--url", "ws://[::1]:1/ws"]).is_ok());
    }

    #[test]
    fn bounds_are_enforced() {
        let bad: &[&[&str]] = &[
            &["connect", "-n", "0"],
            &["connect", "-n", "500001"],
            &["fanout", "--rate", "0"],
            &["fanout", "--rate", "NaN"],
            &["fanout", "--rate", "1e9"],
            &["fanout", "--duration", "0s"],
            &["fanout", "--duration", "25h"],
            &["fanout", "--payload", "2000000"],
            &["fanout", "--room", "bad room"],
            &["fanout", "--publisher-url", "ws://8.8.8.8:1/ws"],
            &["rooms", "--room-size", "0"],
            &["soak", "-s", "2990", "-c", "20"],
            &["soak", "--quiet-rooms", "8"],
            &["soak", "--sub-rooms", "9"],
            &["soak", "-d", "24h", "-r", "1000"],
            &["rooms", "-n", "10", "--room-size", "11"],
            &["idle", "--rooms", "0"],
            &["ramp", "--factor", "1"],
            &["ramp", "--start-rate", "100", "--max-rate", "10"],
            &["ramp", "--max-steps", "0"],
            &["connect", "--concurrency", "0"],
            &["connect", "--read-buffer", "10"],
            &["connect", "--threads", "0"],
            &["connect", "--connect-timeout", "0s"],
            &["connect", "--url", "http://127.0.0.1:1/ws"],
            &["connect", "--url", "wss://127.0.0.1:1/ws"],
            &["connect", "--url", "ws://127.0.0.1/ws"],
        ];
        for args in bad {
            let mut all = args.to_vec();
            all.extend(["--jwt-secret", "s"]);
            assert!(parse(&all).is_err(), "{args:?} should be refused");
        }
    }

    #[test]
    fn reconnect_needs_two_nodes_and_one_fault() {
        let base = [
            "reconnect",
            "--jwt-secret",
            "s",
            "--url",
            "ws://127.0.0.1:1/ws",
        ];
        let mut one = base.to_vec();
        one.extend(["--kill-pid", "99"]);
        assert!(parse(&one).unwrap_err().contains("two --url"));
        let mut two = base.to_vec();
        two.extend(["--url", "ws://127.0.0.1:2/ws"]);
        assert!(parse(&two).is_err(), "a fault is required");
        let mut both = two.clone();
        both.extend(["--kill-pid", "99", "--drain-pid", "98"]);
        assert!(parse(&both).is_err(), "only one fault");
        let mut me = two.clone();
        let pid = std::process::id().to_string();
        me.extend(["--drain-pid", pid.as_str()]);
        assert!(parse(&me).is_err());
        let mut share = two.clone();
        share.extend(["--drain-pid", "99", "--first-share", "1"]);
        assert!(parse(&share).is_err());
        for stall in [
            ["--stall", "5s"],
            ["--stall-share", "2"],
            ["--stall", "4500ms"],
        ] {
            let mut bad = two.clone();
            bad.extend(["--kill-pid", "99"]);
            bad.extend(stall);
            assert!(parse(&bad).is_err(), "{stall:?}");
        }
        let mut ok = two;
        ok.extend(["--drain-pid", "99", "--first-share", "0.66"]);
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn deadline_flag_wins() {
        let s = parse(&["fanout", "--jwt-secret", "s", "--deadline", "7s"]).unwrap();
        assert_eq!(s.deadline(), Duration::from_secs(7));
        let s = parse(&["fanout", "--jwt-secret", "s", "-d", "60s"]).unwrap();
        assert!(s.deadline() >= Duration::from_secs(62));
    }
}
