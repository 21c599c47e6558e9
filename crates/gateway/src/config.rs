//! Command line and environment (OPERATING.md), and the validated [`Config`].
//!
//! Every flag can also be set as `WSGATE_<FLAG>`. Parsing is clap derive;
//! `serve`'s flags come in groups flattened into one command line
//! ([`BrokerArgs`], [`JwtArgs`], [`Limits`], [`HistoryArgs`], [`TlsArgs`],
//! [`PresenceArgs`], [`crate::deflate::CompressionArgs`]),
//! and [`ServeArgs::into_config`] turns them into a checked configuration
//! or one clear error line, each group checked by its own method. The
//! configuration is data only: key and certificate files are named by
//! path, and read at start-up by [`crate::server::Resources::load`]. [`CommandLine`] is generic over the subcommands so
//! the binary adds `client` without repeating the command's attributes.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::api::ApiKey;
use crate::auth::jwks::JwksSettings;
use crate::auth::VerifierSettings;

/// The per-user publish bucket is this many connections' worth by default.
const USER_RATE_FACTOR: f64 = 10.0;

/// The library's command line: `serve` flags and its subcommands.
pub type Cli = CommandLine<Command>;

/// `wsgate`: horizontally scaled WebSocket gateway.
// Generic over the subcommands so that the binary adds `client` (which
// the library must not depend on) without repeating these attributes.
#[derive(Debug, Parser)]
#[command(
    name = "wsgate",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct CommandLine<C: Subcommand> {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<C>,
    /// Flags of `serve`, accepted without the subcommand name.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// A set of subcommands that may hold `serve`.
pub trait ServeCommand {
    /// The `serve` flags, if this is `serve`.
    fn serve_mut(&mut self) -> Option<&mut ServeArgs>;
}

impl ServeCommand for Command {
    fn serve_mut(&mut self) -> Option<&mut ServeArgs> {
        match self {
            Command::Serve(serve) => Some(serve),
            Command::Token(_) => None,
        }
    }
}

impl<C: Subcommand + ServeCommand> CommandLine<C> {
    /// Parse a command line (the first item is the program name). In dev
    /// mode, a listener whose address was not given (by flag or environment)
    /// binds loopback instead of every interface: a dev node hands out
    /// tokens to anyone who reaches it.
    pub fn parse_with_dev_defaults<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        let mut cli = Self::from_arg_matches(&matches)?;
        let (serve, matches) = match &mut cli.command {
            None => (&mut cli.serve, Some(&matches)),
            Some(command) => match command.serve_mut() {
                Some(serve) => (serve, matches.subcommand_matches("serve")),
                None => return Ok(cli),
            },
        };
        if let Some(matches) = matches {
            serve.apply_dev_defaults(matches);
        }
        Ok(cli)
    }
}

/// Subcommands of the library (the binary adds `client`).
// Parsed once at start-up: the size difference between variants is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a gateway node (the default).
    Serve(ServeArgs),
    /// Mint a token with the configured HMAC secret and print it on stdout.
    Token(TokenArgs),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, pretty otherwise.
    Auto,
    /// One JSON object a line.
    Json,
    /// Human-readable lines.
    Pretty,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))
}

/// Flags of `wsgate serve`: a few of the node's own, then one group per
/// concern. Each group is flattened into the command line (the flags keep
/// their names) and most are moved whole into [`Config`].
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Public listener: /ws and /api/... (with --dev: 127.0.0.1:8080).
    #[arg(long, env = "WSGATE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Operations listener: /health, /ready, /metrics (with --dev: 127.0.0.1:9090).
    #[arg(long, env = "WSGATE_OPS_LISTEN", default_value = "0.0.0.0:9090")]
    pub ops_listen: SocketAddr,
    /// Node id shown in `welcome` and metrics (default: host name).
    #[arg(long, env = "WSGATE_NODE_ID")]
    pub node_id: Option<String>,
    /// Redis relay: `--redis-*`.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Token verification: `--jwt-*`, `--jwks-*`.
    #[command(flatten)]
    pub jwt: JwtArgs,
    /// Comma list of exact origins allowed to connect; `*` allows any.
    #[arg(
        long,
        env = "WSGATE_ALLOWED_ORIGINS",
        value_delimiter = ',',
        default_value = "http://localhost:8080,http://127.0.0.1:8080"
    )]
    pub allowed_origins: Vec<String>,
    /// Refuse connections that carry no Origin header (browsers always send one).
    #[arg(long, env = "WSGATE_REQUIRE_ORIGIN")]
    pub require_origin: bool,
    /// Bounds on connections, messages, rates and timeouts.
    #[command(flatten)]
    pub limits: Limits,
    /// Room history: `--history*`.
    #[command(flatten)]
    pub history: HistoryArgs,
    /// TLS on the public listener: `--tls-cert`, `--tls-key`.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Presence: `--presence-ttl`.
    #[command(flatten)]
    pub presence: PresenceArgs,
    /// Compression (permessage-deflate): `--compression*`.
    #[command(flatten)]
    pub compression: crate::deflate::CompressionArgs,
    /// Enables the server API (/api/users/..., history, publish as "server").
    #[arg(long, env = "WSGATE_API_KEY", hide_env_values = true, value_parser = ApiKey::parse)]
    pub api_key: Option<ApiKey>,
    /// With --api-key: longest token lifetime (exp - iat) accepted, and how long revocations are
    /// kept; unset, any lifetime is accepted and revocations are kept for good.
    #[arg(long, env = "WSGATE_MAX_TOKEN_LIFETIME", value_parser = duration)]
    pub max_token_lifetime: Option<Duration>,
    /// Development mode: random key when none is set, printed token, chat
    /// page at /, loopback listeners unless --listen/--ops-listen are given.
    #[arg(long, env = "WSGATE_DEV")]
    pub dev: bool,
    /// Log format.
    #[arg(long, env = "WSGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// Log filter, RUST_LOG syntax (e.g. `info`, `wsgate=debug`).
    #[arg(long, env = "WSGATE_LOG", default_value = "info")]
    pub log: String,
}

/// `--redis-*`: the cross-node relay.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Redis URL for the cross-node relay; unset means the in-process broker.
    #[arg(long, env = "WSGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// --redis-url names a Redis Cluster (comma-separated seed URLs):
    /// sharded pub/sub (SPUBLISH/SSUBSCRIBE), each room on its own shard.
    #[arg(long, env = "WSGATE_REDIS_CLUSTER", requires = "redis_url")]
    pub redis_cluster: bool,
    /// Replicas that must have a publish before it is acknowledged
    /// (Redis WAIT, 1 s; fewer answers `unavailable`).
    #[arg(long, env = "WSGATE_REDIS_MIN_REPLICAS", default_value_t = 0)]
    pub redis_min_replicas: u32,
    /// PEM CA certificate for `rediss://` (default: the system's roots).
    #[arg(long, env = "WSGATE_REDIS_CA_CERT")]
    pub redis_ca_cert: Option<PathBuf>,
}

/// `--jwt-*`, `--jwks-*`: where the verification keys come from and which
/// claims are required.
#[derive(Debug, Clone, Args)]
pub struct JwtArgs {
    /// HMAC key for HS256/384/512 tokens.
    #[arg(long, env = "WSGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Path to a PEM public key (RSA: RS256; EC P-256/P-384: ES256/ES384; Ed25519: EdDSA).
    #[arg(long, env = "WSGATE_JWT_PUBLIC_KEY", conflicts_with = "jwt_secret")]
    pub jwt_public_key: Option<PathBuf>,
    /// Take the verification keys from this JWKS URL (http or https), e.g. an
    /// identity provider's `jwks_uri`.
    #[arg(
        long,
        env = "WSGATE_JWT_JWKS_URL",
        conflicts_with_all = ["jwt_secret", "jwt_public_key"]
    )]
    pub jwt_jwks_url: Option<String>,
    /// How often the JWKS is fetched again.
    #[arg(long, env = "WSGATE_JWKS_REFRESH", default_value = "5m", value_parser = duration)]
    pub jwks_refresh: Duration,
    /// PEM CA certificate(s) trusted for an https JWKS URL, besides the system store.
    #[arg(long, env = "WSGATE_JWKS_CA_CERT", requires = "jwt_jwks_url")]
    pub jwks_ca_cert: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "WSGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "WSGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Leeway on exp, nbf and iat.
    #[arg(long, env = "WSGATE_JWT_LEEWAY", default_value = "5s", value_parser = duration)]
    pub jwt_leeway: Duration,
}

/// Bounds on connections, messages, rates and timeouts, used as given
/// (after [`ServeArgs::into_config`] checked them). The two per-user
/// rates and `--max-pending-connections` have computed defaults: read the
/// resolved values from [`Config`].
#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Larger client frames close with 1009; larger API bodies get 413.
    #[arg(long, env = "WSGATE_MAX_MESSAGE_BYTES", default_value_t = 1_048_576)]
    pub max_message_bytes: usize,
    /// WebSocket Ping interval.
    #[arg(long, env = "WSGATE_HEARTBEAT", default_value = "30s", value_parser = duration)]
    pub heartbeat: Duration,
    /// Close a connection silent this long after a Ping.
    #[arg(long, env = "WSGATE_PONG_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub pong_timeout: Duration,
    /// Connections per node; beyond it the upgrade gets 503.
    #[arg(long, env = "WSGATE_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Per-connection queue of unwritten frames; overflow closes with 1008.
    #[arg(long, env = "WSGATE_MAX_OUTBOUND_BYTES", default_value_t = 1_048_576)]
    pub max_outbound_bytes: usize,
    /// Per-connection publish limit, messages per second.
    #[arg(long, env = "WSGATE_PUBLISH_RATE", default_value_t = 100.0)]
    pub publish_rate: f64,
    /// Per-connection publish burst.
    #[arg(long, env = "WSGATE_PUBLISH_BURST", default_value_t = 200)]
    pub publish_burst: u32,
    /// Per-user publish limit on this node, messages per second, shared by
    /// the user's connections and HTTP API calls [default: 10 x --publish-rate].
    #[arg(long, env = "WSGATE_USER_PUBLISH_RATE")]
    pub user_publish_rate: Option<f64>,
    /// Per-user publish burst [default: 10 x --publish-burst].
    #[arg(long, env = "WSGATE_USER_PUBLISH_BURST")]
    pub user_publish_burst: Option<u32>,
    /// Per-connection `join` limit, joins per second.
    #[arg(long, env = "WSGATE_JOIN_RATE", default_value_t = 100.0)]
    pub join_rate: f64,
    /// Per-connection `join` burst.
    #[arg(long, env = "WSGATE_JOIN_BURST", default_value_t = 1000)]
    pub join_burst: u32,
    /// Rooms one connection may be in.
    #[arg(long, env = "WSGATE_MAX_ROOMS", default_value_t = 100)]
    pub max_rooms: usize,
    /// Longest a graceful shutdown waits for connections to close.
    #[arg(long, env = "WSGATE_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// Time allowed for the TLS handshake, the HTTP upgrade request and its headers.
    #[arg(long, env = "WSGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,
    /// Public-listener connections not (yet) upgraded to a WebSocket or
    /// serving an SSE stream: TLS handshakes, request heads, HTTP API
    /// requests. Beyond it new TCP
    /// connections are closed at once. Default: a quarter of the file limit
    /// (RLIMIT_NOFILE), at most 4096.
    #[arg(long, env = "WSGATE_MAX_PENDING_CONNECTIONS")]
    pub max_pending_connections: Option<usize>,
    /// Time allowed to send an HTTP API request body; slower gets 408.
    #[arg(long, env = "WSGATE_BODY_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub body_timeout: Duration,
    /// Bytes of HTTP API request bodies held at once, node-wide; beyond it 503.
    #[arg(long, env = "WSGATE_MAX_INFLIGHT_BODY_BYTES", default_value_t = DEFAULT_INFLIGHT_BODY_BYTES)]
    pub max_inflight_body_bytes: usize,
    /// Connections the operations listener serves at once; beyond it closed at once.
    #[arg(long, env = "WSGATE_MAX_OPS_CONNECTIONS", default_value_t = 64)]
    pub max_ops_connections: usize,
    /// Longest an operations connection lives (one request per connection).
    #[arg(long, env = "WSGATE_OPS_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub ops_timeout: Duration,
}

/// `--history*`: how much of each room is kept for resume, and for how long.
#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    /// Messages kept per room for resume (at least this many).
    #[arg(long, env = "WSGATE_HISTORY", default_value_t = 1000)]
    pub history: usize,
    /// Idle rooms' history lives this long in Redis after the last message.
    #[arg(long, env = "WSGATE_HISTORY_TTL", default_value = "24h", value_parser = duration)]
    pub history_ttl: Duration,
    /// In-process broker: most history bytes over all rooms; past it the
    /// rooms least recently published to lose their history (new epoch).
    #[arg(
        long,
        env = "WSGATE_HISTORY_BUDGET_BYTES",
        default_value_t = 268_435_456
    )]
    pub history_budget_bytes: usize,
}

/// `--presence-ttl`: the lease of a node's presence entries.
#[derive(Debug, Clone, Args)]
pub struct PresenceArgs {
    /// How long a stopped node's users stay present before other nodes
    /// remove them (Redis; at least 1s).
    #[arg(long, env = "WSGATE_PRESENCE_TTL", default_value = "15s", value_parser = duration)]
    pub presence_ttl: Duration,
}

/// `--tls-cert`, `--tls-key`.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// PEM certificate chain; with --tls-key the public listener speaks TLS.
    #[arg(long, env = "WSGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "WSGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Default of `--max-inflight-body-bytes`: 64 MiB.
pub const DEFAULT_INFLIGHT_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Most pending connections the automatic `--max-pending-connections` allows.
pub const AUTO_PENDING_MAX: usize = 4096;

/// The automatic `--max-pending-connections`: a quarter of the process's
/// file limit (the rest stays for upgraded clients, the ops listener and
/// Redis), at least 16, at most [`AUTO_PENDING_MAX`].
pub fn auto_max_pending(nofile: u64) -> usize {
    let quarter = usize::try_from(nofile / 4).unwrap_or(usize::MAX);
    quarter.clamp(16, AUTO_PENDING_MAX)
}

/// The soft RLIMIT_NOFILE of this process (1024 when it cannot be read).
pub fn nofile_limit() -> u64 {
    rlimit::Resource::NOFILE
        .get()
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// Flags of `wsgate token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// HMAC key the token is signed with.
    #[arg(long, env = "WSGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// The user id (`sub`).
    #[arg(long)]
    pub sub: String,
    /// Comma list of room patterns the user may join.
    #[arg(long, value_delimiter = ',')]
    pub rooms: Vec<String>,
    /// Comma list of room patterns the user may publish to.
    #[arg(long, value_delimiter = ',')]
    pub publish: Vec<String>,
    /// Lifetime of the token.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub ttl: Duration,
    /// `iss` claim.
    #[arg(long, env = "WSGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// `aud` claim.
    #[arg(long, env = "WSGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
}

/// A start-up error: printed as one line, exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No JWT key outside dev mode.
    #[error(
        "no JWT key configured: set one of --jwt-secret, --jwt-public-key or --jwt-jwks-url (or use --dev)"
    )]
    NoKey,
    /// The JWKS URL or its CA file is unusable.
    #[error("cannot use --jwt-jwks-url: {0}")]
    Jwks(String),
    /// The public key could not be read or parsed.
    #[error("cannot use JWT public key {path}: {reason}")]
    PublicKey {
        /// Path given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// TLS files could not be read or parsed.
    #[error("cannot use TLS certificate/key: {0}")]
    Tls(String),
    /// The Redis URL is malformed.
    #[error("malformed --redis-url: {0}")]
    RedisUrl(String),
    /// A value out of range.
    #[error("invalid {flag}: {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// Why.
        reason: String,
    },
}

/// Which origins may open a WebSocket.
#[derive(Debug, Clone)]
pub enum OriginPolicy {
    /// `*`: any origin.
    Any,
    /// Exact origins.
    List(Vec<String>),
}

impl OriginPolicy {
    /// Add an exact origin to a list (`*` already allows it).
    pub fn allow(&mut self, origin: &str) {
        if let OriginPolicy::List(list) = self {
            if !list.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
                list.push(origin.to_owned());
            }
        }
    }

    /// Whether a request with this `Origin` header value is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            OriginPolicy::Any => true,
            OriginPolicy::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }
}

/// Which broker a node runs with.
#[derive(Clone)]
pub enum BrokerChoice {
    /// In-process: one node, no Redis (no `--redis-url`).
    Memory,
    /// One Redis primary, or a Sentinel set (`redis+sentinel://`).
    Redis(RedisConfig),
    /// A Redis Cluster (`--redis-cluster`): `url` lists seed nodes.
    RedisCluster(RedisConfig),
}

impl BrokerChoice {
    /// `memory` or `redis`, for the log.
    pub fn name(&self) -> &'static str {
        match self {
            BrokerChoice::Memory => "memory",
            BrokerChoice::Redis(_) | BrokerChoice::RedisCluster(_) => "redis",
        }
    }
}

/// Where and how to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `--redis-url` (comma-separated seed nodes for a cluster).
    pub url: String,
    /// Replicas that must confirm a publish.
    pub min_replicas: u32,
    /// PEM CA file for `rediss://` (read by [`crate::server::Resources::load`]).
    pub ca_cert: Option<PathBuf>,
}

/// Where the token verification key comes from.
#[derive(Debug, Clone)]
pub enum JwtKey {
    /// An HMAC secret, given inline or generated in dev mode (also in
    /// [`Config::hmac_secret`]).
    Hmac(HmacSecret),
    /// A PEM public key file.
    PublicKey(PathBuf),
    /// A JWKS URL (checked), fetched by the running node.
    Jwks(JwksSettings),
}

/// The public listener's certificate chain and private key files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// The validated configuration a node runs with.
#[derive(Clone)]
pub struct Config {
    /// Node id.
    pub node_id: Arc<str>,
    /// The broker: in-process, or Redis.
    pub broker: BrokerChoice,
    /// Where the token verification key comes from.
    pub jwt_key: JwtKey,
    /// Leeway on exp, nbf and iat.
    pub jwt_leeway: Duration,
    /// HMAC secret (dev mode mints tokens with it).
    pub hmac_secret: Option<Arc<[u8]>>,
    /// Required `iss` (dev tokens carry it too).
    pub jwt_issuer: Option<String>,
    /// Required `aud` (dev tokens carry it too).
    pub jwt_audience: Option<String>,
    /// Allowed origins.
    pub origins: OriginPolicy,
    /// Refuse requests without Origin.
    pub require_origin: bool,
    /// Bounds on connections, messages, rates and timeouts, as given.
    pub limits: Limits,
    /// Publish rate per user on this node (messages/s), resolved.
    pub user_publish_rate: f64,
    /// Publish burst per user on this node, resolved.
    pub user_publish_burst: u32,
    /// Cap on public connections not upgraded yet, resolved.
    pub max_pending_connections: usize,
    /// Room history kept for resume.
    pub history: HistoryArgs,
    /// TLS for the public listener.
    pub tls: Option<TlsFiles>,
    /// The server API's key; `None` disables the server API.
    pub api_key: Option<ApiKey>,
    /// Longest token lifetime accepted with the server API; revocations
    /// are kept this long (plus the leeway). `None`: no cap, revocations
    /// are kept for good.
    pub max_token_lifetime: Option<Duration>,
    /// Dev mode.
    pub dev: bool,
    /// Presence lease.
    pub presence: PresenceArgs,
    /// permessage-deflate settings.
    pub compression: crate::deflate::Compression,
}

impl Config {
    /// The per-connection publish bucket's shape.
    pub fn publish_limit(&self) -> crate::limits::Rate {
        crate::limits::Rate::new(self.limits.publish_rate, self.limits.publish_burst)
    }

    /// The per-connection join bucket's shape.
    pub fn join_limit(&self) -> crate::limits::Rate {
        crate::limits::Rate::new(self.limits.join_rate, self.limits.join_burst)
    }

    /// The claim checks tokens must pass, whatever the key.
    pub fn verifier_settings(&self) -> VerifierSettings {
        VerifierSettings {
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            leeway: self.jwt_leeway,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("node_id", &self.node_id)
            .field("broker", &self.broker.name())
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
}

/// What `into_config` made up in dev mode, to tell the operator.
#[derive(Debug, Default)]
pub struct DevNotes {
    /// A random secret was generated.
    pub generated_secret: bool,
}

impl ServeArgs {
    /// Dev mode: listeners left at their default bind 127.0.0.1 (same port).
    /// `matches`: the parsed arguments these flags came from.
    pub fn apply_dev_defaults(&mut self, matches: &ArgMatches) {
        if !self.dev {
            return;
        }
        let defaulted = |id: &str| matches.value_source(id) == Some(ValueSource::DefaultValue);
        if defaulted("listen") {
            self.listen.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        if defaulted("ops_listen") {
            self.ops_listen.set_ip(Ipv4Addr::LOCALHOST.into());
        }
    }

    /// Check the flags (no file is read).
    pub fn into_config(self) -> Result<(Config, DevNotes), ConfigError> {
        if self.presence.presence_ttl < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                flag: "--presence-ttl",
                reason: "must be at least 1s".into(),
            });
        }
        let mut notes = DevNotes::default();
        let (jwt_key, hmac_secret) = self.jwt.key(self.dev, &mut notes)?;
        let origins = if self.allowed_origins.iter().any(|o| o.trim() == "*") {
            OriginPolicy::Any
        } else {
            OriginPolicy::List(
                self.allowed_origins
                    .iter()
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect(),
            )
        };
        let broker = self.broker.choice()?;
        positive("--max-message-bytes", self.limits.max_message_bytes)?;
        positive("--max-outbound-bytes", self.limits.max_outbound_bytes)?;
        positive("--history", self.history.history)?;
        positive("--max-rooms", self.limits.max_rooms)?;
        if self.max_token_lifetime.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::Invalid {
                flag: "--max-token-lifetime",
                reason: "must be greater than 0".into(),
            });
        }
        let (user_publish_rate, user_publish_burst, max_pending_connections) =
            self.limits.check()?;
        let tls = self.tls.files();
        let node_id = match self.node_id {
            Some(id) if !id.trim().is_empty() => id,
            _ => hostname(),
        };
        Ok((
            Config {
                node_id: Arc::from(node_id),
                broker,
                jwt_key,
                jwt_leeway: self.jwt.jwt_leeway,
                hmac_secret,
                jwt_issuer: self.jwt.jwt_issuer.filter(|s| !s.is_empty()),
                jwt_audience: self.jwt.jwt_audience.filter(|s| !s.is_empty()),
                origins,
                require_origin: self.require_origin,
                limits: self.limits,
                user_publish_rate,
                user_publish_burst,
                max_pending_connections,
                history: self.history,
                tls,
                api_key: self.api_key,
                max_token_lifetime: self.max_token_lifetime,
                dev: self.dev,
                presence: self.presence,
                compression: self.compression.settings(),
            },
            notes,
        ))
    }
}

/// `Invalid` naming `flag` unless `v` is above zero.
fn positive(flag: &'static str, v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        Err(ConfigError::Invalid {
            flag,
            reason: "must be greater than 0".into(),
        })
    } else {
        Ok(())
    }
}

/// An HMAC key as bytes (dev mode mints tokens with it).
pub type HmacSecret = Arc<[u8]>;

impl JwtArgs {
    /// The one key source given (dev mode: a random HMAC secret when none
    /// is), and the HMAC secret if there is one.
    fn key(
        &self,
        dev: bool,
        notes: &mut DevNotes,
    ) -> Result<(JwtKey, Option<HmacSecret>), ConfigError> {
        Ok(match (&self.jwt_secret, &self.jwt_public_key) {
            // Several key sources are refused by the flag parser already.
            (None, None) if self.jwt_jwks_url.is_some() => {
                let source = JwksSettings {
                    url: self.jwt_jwks_url.clone().unwrap_or_default(),
                    refresh: self.jwks_refresh,
                    ca_cert: self.jwks_ca_cert.clone(),
                };
                source.check().map_err(ConfigError::Jwks)?;
                (JwtKey::Jwks(source), None)
            }
            (Some(secret), _) => {
                if secret.is_empty() {
                    return Err(ConfigError::Invalid {
                        flag: "--jwt-secret",
                        reason: "empty".into(),
                    });
                }
                let bytes: Arc<[u8]> = Arc::from(secret.as_bytes());
                (JwtKey::Hmac(bytes.clone()), Some(bytes))
            }
            (None, Some(path)) => (JwtKey::PublicKey(path.clone()), None),
            (None, None) if dev => {
                notes.generated_secret = true;
                let secret: [u8; 32] = rand::random();
                let bytes: Arc<[u8]> = Arc::from(&secret[..]);
                (JwtKey::Hmac(bytes.clone()), Some(bytes))
            }
            (None, None) => return Err(ConfigError::NoKey),
        })
    }
}

impl BrokerArgs {
    /// The broker these flags choose, with the Redis URL(s) checked.
    fn choice(self) -> Result<BrokerChoice, ConfigError> {
        let Some(url) = self.redis_url else {
            // Settings of the Redis broker are an error without it, rather
            // than silently ignored (an in-process publish has no replica
            // to wait for: PROTOCOL.md section 10 would not hold).
            if self.redis_min_replicas > 0 {
                return Err(ConfigError::Invalid {
                    flag: "--redis-min-replicas",
                    reason: "needs --redis-url (the in-process broker has no replicas)".into(),
                });
            }
            if self.redis_ca_cert.is_some() {
                return Err(ConfigError::Invalid {
                    flag: "--redis-ca-cert",
                    reason: "needs --redis-url".into(),
                });
            }
            return Ok(BrokerChoice::Memory);
        };
        let urls: Vec<&str> = if self.redis_cluster {
            url.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect()
        } else {
            vec![url.as_str()]
        };
        for url in urls {
            match crate::broker::redis::sentinel::parse(url) {
                Some(parsed) => {
                    parsed.map_err(|e| ConfigError::RedisUrl(crate::broker::redact_url(&e)))?;
                }
                None => {
                    redis::Client::open(url).map_err(|e| {
                        ConfigError::RedisUrl(crate::broker::redact_url(&e.to_string()))
                    })?;
                }
            }
        }
        let redis = RedisConfig {
            url,
            min_replicas: self.redis_min_replicas,
            ca_cert: self.redis_ca_cert,
        };
        Ok(if self.redis_cluster {
            BrokerChoice::RedisCluster(redis)
        } else {
            BrokerChoice::Redis(redis)
        })
    }
}

impl Limits {
    /// Check the bounds; the resolved per-user publish rate and burst and
    /// `--max-pending-connections`.
    fn check(&self) -> Result<(f64, u32, usize), ConfigError> {
        if self.heartbeat.is_zero() || self.pong_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                flag: "--heartbeat/--pong-timeout",
                reason: "must be greater than 0".into(),
            });
        }
        // Ten connections' worth by default: PROTOCOL.md gives each
        // connection its own --publish-rate, so the user's bound must not
        // cut a client with a few connections (or a back end's HTTP bulk
        // publish) below it, yet one token can no longer multiply its rate
        // without bound.
        let user_publish_rate = self
            .user_publish_rate
            .unwrap_or(self.publish_rate * USER_RATE_FACTOR);
        let user_publish_burst = self
            .user_publish_burst
            .unwrap_or(self.publish_burst.saturating_mul(USER_RATE_FACTOR as u32));
        for (flag, rate, burst) in [
            (
                "--publish-rate/--publish-burst",
                self.publish_rate,
                self.publish_burst,
            ),
            (
                "--user-publish-rate/--user-publish-burst",
                user_publish_rate,
                user_publish_burst,
            ),
            ("--join-rate/--join-burst", self.join_rate, self.join_burst),
        ] {
            if !(rate.is_finite() && rate > 0.0) || burst == 0 {
                return Err(ConfigError::Invalid {
                    flag,
                    reason: "must be greater than 0".into(),
                });
            }
        }
        let max_pending_connections = self
            .max_pending_connections
            .unwrap_or_else(|| auto_max_pending(nofile_limit()));
        positive("--max-pending-connections", max_pending_connections)?;
        positive("--max-inflight-body-bytes", self.max_inflight_body_bytes)?;
        positive("--max-ops-connections", self.max_ops_connections)?;
        for (flag, d) in [
            ("--body-timeout", self.body_timeout),
            ("--ops-timeout", self.ops_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid {
                    flag,
                    reason: "must be greater than 0".into(),
                });
            }
        }
        Ok((
            user_publish_rate,
            user_publish_burst,
            max_pending_connections,
        ))
    }
}

impl TlsArgs {
    /// The public listener's TLS files, when both are given.
    fn files(&self) -> Option<TlsFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "wsgate".to_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `wsgate serve` with `args`.
    pub(crate) fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut all = vec!["wsgate", "serve"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all)?;
        match cli.command {
            Some(Command::Serve(s)) => Ok(s),
            other => panic!("{other:?}"),
        }
    }

    /// The checked configuration of `wsgate serve args`.
    fn config(args: &[&str]) -> Config {
        match serve(args).map(ServeArgs::into_config) {
            Ok(Ok((config, _))) => config,
            Ok(Err(e)) => panic!("{args:?}: {e}"),
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn dev_mode_binds_loopback_unless_told_otherwise() {
        let parse = |args: &[&str]| {
            let cli = Cli::parse_with_dev_defaults(args.iter().copied()).unwrap();
            let s = match cli.command {
                Some(Command::Serve(s)) => s,
                None => cli.serve,
                other => panic!("{other:?}"),
            };
            (s.listen.to_string(), s.ops_listen.to_string())
        };
        let loopback = ("127.0.0.1:8080".to_owned(), "127.0.0.1:9090".to_owned());
        assert_eq!(parse(&["wsgate", "--dev"]), loopback);
        assert_eq!(parse(&["wsgate", "serve", "--dev"]), loopback);
        assert_eq!(
            parse(&["wsgate", "serve", "--dev", "--listen", "0.0.0.0:8081"]),
            ("0.0.0.0:8081".to_owned(), "127.0.0.1:9090".to_owned())
        );
        assert_eq!(
            parse(&["wsgate", "--dev", "--ops-listen", "0.0.0.0:9091"]),
            ("127.0.0.1:8080".to_owned(), "0.0.0.0:9091".to_owned())
        );
        // Outside dev mode the documented defaults stay.
        assert_eq!(
            parse(&["wsgate", "serve", "--jwt-secret", "s"]),
            ("0.0.0.0:8080".to_owned(), "0.0.0.0:9090".to_owned())
        );
    }

    #[test]
    fn redis_settings_without_redis_are_a_start_error() {
        for args in [
            &["--jwt-secret", "s", "--redis-min-replicas", "1"][..],
            &["--jwt-secret", "s", "--redis-ca-cert", "/tmp/ca.pem"][..],
        ] {
            let err = match serve(args).map(ServeArgs::into_config) {
                Ok(Err(e)) => e.to_string(),
                other => panic!("{args:?} started: {:?}", other.map(|r| r.is_ok())),
            };
            assert!(err.contains("needs --redis-url"), "{args:?}: {err}");
        }
        let with = config(&[
            "--jwt-secret",
            "s",
            "--redis-url",
            "redis://127.0.0.1:1/",
            "--redis-min-replicas",
            "1",
        ]);
        assert!(matches!(with.broker, BrokerChoice::Redis(ref r) if r.min_replicas == 1));
        assert!(matches!(
            config(&["--jwt-secret", "s", "--redis-min-replicas", "0"]).broker,
            BrokerChoice::Memory
        ));
    }

    #[test]
    fn defaults_match_operating_md() {
        let s = serve(&[]).unwrap();
        assert_eq!(s.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(s.ops_listen, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(
            s.allowed_origins,
            vec!["http://localhost:8080", "http://127.0.0.1:8080"]
        );
        assert_eq!(s.limits.max_message_bytes, 1_048_576);
        assert_eq!(s.limits.heartbeat, Duration::from_secs(30));
        assert_eq!(s.limits.pong_timeout, Duration::from_secs(10));
        assert_eq!(s.limits.max_connections, 100_000);
        assert_eq!(s.history.history, 1000);
        assert_eq!(s.jwt.jwt_leeway, Duration::from_secs(5));
        assert_eq!(s.limits.max_outbound_bytes, 1_048_576);
        assert_eq!(s.limits.publish_rate, 100.0);
        assert_eq!(s.limits.publish_burst, 200);
        assert_eq!(
            (s.limits.user_publish_rate, s.limits.user_publish_burst),
            (None, None)
        );
        assert_eq!((s.limits.join_rate, s.limits.join_burst), (100.0, 1000));
        assert_eq!(s.limits.max_rooms, 100);
        assert_eq!(s.limits.drain_timeout, Duration::from_secs(10));
        assert_eq!(s.jwt.jwks_refresh, Duration::from_secs(300));
        assert!(!s.dev);
        assert!(s.api_key.is_none());
        assert_eq!(s.max_token_lifetime, None);
    }

    #[test]
    fn api_key_is_checked_and_never_printed() {
        assert!(serve(&["--api-key", ""]).is_err(), "empty key");
        let s = serve(&["--api-key", "k3y-s3cret"]).unwrap();
        assert!(!format!("{s:?}").contains("k3y-s3cret"));
        let key = s.api_key.unwrap();
        assert!(key.matches("k3y-s3cret"));
        assert!(!key.matches("k3y-s3creT") && !key.matches("k3y") && !key.matches(""));
        let err = serve(&["--jwt-secret", "s", "--max-token-lifetime", "0s"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(err.to_string().contains("--max-token-lifetime"), "{err}");
    }

    #[test]
    fn limits_and_budgets_defaults() {
        let s = serve(&[]).unwrap();
        assert_eq!(s.limits.max_pending_connections, None);
        assert_eq!(s.limits.body_timeout, Duration::from_secs(10));
        assert_eq!(s.limits.max_inflight_body_bytes, 64 * 1024 * 1024);
        assert_eq!(s.limits.max_ops_connections, 64);
        assert_eq!(s.limits.ops_timeout, Duration::from_secs(10));
        let (cfg, _) = serve(&["--jwt-secret", "s"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(
            cfg.max_pending_connections,
            auto_max_pending(nofile_limit())
        );
        assert!((cfg.max_pending_connections as u64) < nofile_limit());
        assert_eq!(auto_max_pending(1024), 256);
        assert_eq!(auto_max_pending(20), 16);
        assert_eq!(auto_max_pending(1 << 20), AUTO_PENDING_MAX);
        for flag in [
            "--max-pending-connections",
            "--max-inflight-body-bytes",
            "--max-ops-connections",
        ] {
            let err = serve(&["--jwt-secret", "s", flag, "0"])
                .unwrap()
                .into_config()
                .unwrap_err();
            assert!(err.to_string().contains(flag), "{err}");
        }
        let err = serve(&["--jwt-secret", "s", "--body-timeout", "0s"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(err.to_string().contains("--body-timeout"), "{err}");
    }

    #[test]
    fn serve_is_the_default_subcommand() {
        let cli = Cli::try_parse_from(["wsgate", "--dev", "--heartbeat", "500ms"]).unwrap();
        assert!(cli.command.is_none());
        assert!(cli.serve.dev);
        assert_eq!(cli.serve.limits.heartbeat, Duration::from_millis(500));
    }

    #[test]
    fn human_durations_and_bad_values() {
        assert_eq!(
            serve(&["--drain-timeout", "2m"])
                .unwrap()
                .limits
                .drain_timeout,
            Duration::from_secs(120)
        );
        assert!(serve(&["--heartbeat", "soon"]).is_err());
        assert!(serve(&["--listen", "nowhere"]).is_err());
        assert!(
            serve(&["--tls-cert", "a.pem"]).is_err(),
            "cert requires key"
        );
    }

    #[test]
    fn no_key_is_an_error_outside_dev_mode() {
        let err = serve(&[]).unwrap().into_config().unwrap_err();
        assert!(matches!(err, ConfigError::NoKey), "{err}");
        let (cfg, notes) = serve(&["--dev"]).unwrap().into_config().unwrap();
        assert!(notes.generated_secret);
        assert!(cfg.hmac_secret.is_some());
    }

    #[test]
    fn malformed_redis_url_is_an_error_and_files_are_not_read() {
        let err = serve(&["--jwt-secret", "s", "--redis-url", "nope://x"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(matches!(err, ConfigError::RedisUrl(_)), "{err}");
        // Files are read by `Resources::load` (server.rs tests).
        let missing = "/nonexistent/file.pem";
        let cfg = config(&[
            "--jwt-public-key",
            missing,
            "--tls-cert",
            missing,
            "--tls-key",
            missing,
        ]);
        assert!(matches!(cfg.jwt_key, JwtKey::PublicKey(_)));
        assert!(cfg.tls.is_some());
    }

    #[test]
    fn exactly_one_key_source() {
        for pair in [
            [
                "--jwt-secret",
                "s",
                "--jwt-jwks-url",
                "http://127.0.0.1:1/jwks",
            ],
            [
                "--jwt-public-key",
                "k.pem",
                "--jwt-jwks-url",
                "http://127.0.0.1:1/jwks",
            ],
            ["--jwt-secret", "s", "--jwt-public-key", "k.pem"],
        ] {
            let e = serve(&pair).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
        }
        let cfg = config(&[
            "--jwt-jwks-url",
            "https://idp.example/jwks",
            "--jwks-refresh",
            "1m",
        ]);
        assert!(matches!(cfg.jwt_key, JwtKey::Jwks(_)));
        assert!(cfg.hmac_secret.is_none());
        for bad in [
            [
                "--jwt-jwks-url",
                "ftp://idp.example/jwks",
                "--jwks-refresh",
                "1m",
            ],
            [
                "--jwt-jwks-url",
                "https://idp.example/jwks",
                "--jwks-refresh",
                "0s",
            ],
        ] {
            let err = serve(&bad).unwrap().into_config().unwrap_err();
            assert!(matches!(err, ConfigError::Jwks(_)), "{err}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
    }

    #[test]
    fn origin_policy() {
        let (cfg, _) = serve(&[
            "--jwt-secret",
            "s",
            "--allowed-origins",
            "https://a.example, https://b.example/",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        assert!(cfg.origins.allows("https://a.example"));
        assert!(cfg.origins.allows("https://b.example"));
        assert!(!cfg.origins.allows("https://c.example"));
        let (cfg, _) = serve(&["--jwt-secret", "s", "--allowed-origins", "*"])
            .unwrap()
            .into_config()
            .unwrap();
        assert!(cfg.origins.allows("https://anything.example"));
    }

    #[test]
    fn token_subcommand_parses() {
        let cli = Cli::try_parse_from([
            "wsgate",
            "token",
            "--jwt-secret",
            "s",
            "--sub",
            "alice",
            "--rooms",
            "lobby,team.*",
            "--publish",
            "lobby",
            "--ttl",
            "1h",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Token(t)) => {
                assert_eq!(t.rooms, vec!["lobby", "team.*"]);
                assert_eq!(t.ttl, Duration::from_secs(3600));
            }
            other => panic!("{other:?}"),
        }
    }
}
