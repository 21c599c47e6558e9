//! How to connect: [`ClientConfig`] and where tokens come from ([`TokenSource`]).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::backoff::Backoff;
use crate::error::{BoxError, ClientError};

/// What a token callback returns.
pub type TokenFuture = BoxFuture<'static, Result<String, BoxError>>;

/// An async function giving a fresh JWT.
pub type TokenCallback = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

/// Where the client gets its JWT (sent as `Authorization: Bearer`).
#[derive(Clone)]
pub enum TokenSource {
    /// One token for the client's whole life; when it expires the gateway
    /// closes with 4001 and reconnects are refused with 401.
    Static(String),
    /// Called at the first connect, before reconnecting after a 4001 close
    /// (or a 401, or when the cached token has expired), and
    /// [`refresh_margin`](ClientConfig::refresh_margin) before `exp` to send a
    /// `refresh` on the open connection.
    Callback(TokenCallback),
}

impl TokenSource {
    /// A callback source from an async closure.
    ///
    /// ```
    /// use wsgate_client::TokenSource;
    /// let source = TokenSource::callback(|| async {
    ///     // Ask your auth service here.
    ///     Ok::<_, wsgate_client::BoxError>("eyJ...".to_owned())
    /// });
    /// # let _ = source;
    /// ```
    pub fn callback<F, Fut>(f: F) -> TokenSource
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, BoxError>> + Send + 'static,
    {
        TokenSource::Callback(Arc::new(move || Box::pin(f())))
    }
}

impl fmt::Debug for TokenSource {
    /// Never shows the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Static(_) => f.write_str("Static(<redacted>)"),
            TokenSource::Callback(_) => f.write_str("Callback(..)"),
        }
    }
}

impl From<String> for TokenSource {
    fn from(token: String) -> Self {
        TokenSource::Static(token)
    }
}

impl From<&str> for TokenSource {
    fn from(token: &str) -> Self {
        TokenSource::Static(token.to_owned())
    }
}

/// How the client talks to a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Transport {
    /// A WebSocket on `/ws` (the default).
    #[default]
    #[serde(rename = "ws")]
    #[cfg_attr(feature = "cli", value(name = "ws"))]
    WebSocket,
    /// Server-Sent Events on `GET /sse` plus `POST /sse/{conn}` (protocol
    /// v1.1), for networks that block the WebSocket upgrade. Same frames,
    /// same guarantees.
    Sse,
    /// The WebSocket, and SSE at once (same URL, no backoff) when it cannot
    /// open; every new connection tries the WebSocket first again.
    Auto,
}

/// Everything [`Client::connect`](crate::Client::connect) needs. Build it with
/// [`ClientConfig::new`] and change the public fields.
///
/// ```
/// use std::time::Duration;
/// use wsgate_client::{Backoff, ClientConfig};
///
/// let mut config = ClientConfig::new(
///     ["ws://127.0.0.1:8080/ws", "ws://127.0.0.1:8081/ws"],
///     "eyJ...",
/// );
/// config.backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
///     .with_stable_after(Duration::from_secs(30));
/// config.origin = Some("http://localhost:8080".into());
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// One or several `ws://` or `wss://` URLs of the `/ws` endpoint, tried
    /// round-robin: each new attempt goes to the URL after the last one. An
    /// `http://` or `https://` URL (of the `/sse` endpoint) is always used
    /// with [`Transport::Sse`].
    pub urls: Vec<String>,
    /// WebSocket (default), SSE, or WebSocket with the SSE fallback, for the
    /// `ws(s)://` URLs (SSE uses the same URL with `http(s)` and `/sse`
    /// for `/ws`).
    pub transport: Transport,
    /// Where the JWT comes from.
    pub token: TokenSource,
    /// An `Origin` header to send (browsers send one; other clients need not).
    pub origin: Option<String>,
    /// Reconnect schedule (default: base 500 ms, cap 30 s, stable after 10 s).
    pub backoff: Backoff,
    /// A connection is given up as dead when no frame at all (the node's
    /// Pings included) arrived within `welcome.heartbeat_ms` plus this
    /// margin (default 10 s).
    pub heartbeat_margin: Duration,
    /// With a [`TokenSource::Callback`], get a new token and send `refresh`
    /// this long before the current one's `exp` (at most half its remaining
    /// life). `None` never refreshes early (the 4001 close then leads to a
    /// new token and a reconnect). Default 60 s.
    pub refresh_margin: Option<Duration>,
    /// Longest wait for the TCP/TLS connection, the upgrade and `welcome`
    /// (and for a token callback). Default 10 s.
    pub connect_timeout: Duration,
    /// Longest wait for the answer to a request sent on an open connection
    /// (`join`, `leave`, `publish`). Default 10 s.
    pub request_timeout: Duration,
    /// Seed of the backoff's jitter, for reproducible schedules in tests;
    /// `None` seeds from the operating system.
    pub rng_seed: Option<u64>,
    /// Offer permessage-deflate (RFC 7692) in the upgrade (default `true`):
    /// a gateway that accepts it sends its larger frames compressed, and the
    /// client inflates them (it sends its own frames uncompressed).
    pub compression: bool,
    /// Join every room with `"presence":true` (v1.1): the room's
    /// `presence_join` / `presence_leave` arrive as
    /// [`Event::PresenceJoin`](crate::Event::PresenceJoin) /
    /// [`Event::PresenceLeave`](crate::Event::PresenceLeave), and after
    /// every join (the re-joins after a reconnect too, since events are not
    /// replayed) the client asks for the room's presence and reports it as
    /// [`Event::Presence`](crate::Event::Presence). Default off.
    pub presence: bool,
    /// TLS settings for `wss://` (for example a private root certificate);
    /// `None` uses the platform's root certificates.
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl ClientConfig {
    /// A configuration with the defaults.
    pub fn new(
        urls: impl IntoIterator<Item = impl Into<String>>,
        token: impl Into<TokenSource>,
    ) -> ClientConfig {
        ClientConfig {
            urls: urls.into_iter().map(Into::into).collect(),
            token: token.into(),
            transport: Transport::WebSocket,
            origin: None,
            backoff: Backoff::default(),
            heartbeat_margin: Duration::from_secs(10),
            refresh_margin: Some(Duration::from_secs(60)),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            rng_seed: None,
            compression: true,
            presence: false,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// The same configuration with `transport`.
    ///
    /// ```
    /// use wsgate_client::{ClientConfig, Transport};
    /// let config = ClientConfig::new(["ws://127.0.0.1:8080/ws"], "eyJ...").transport(Transport::Sse);
    /// # let _ = config;
    /// ```
    pub fn transport(mut self, transport: Transport) -> ClientConfig {
        self.transport = transport;
        self
    }

    /// Check what can be checked before connecting.
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.urls.is_empty() {
            return Err(ClientError::Config("no URL given".into()));
        }
        for url in &self.urls {
            let secure = url.starts_with("wss://") || url.starts_with("https://");
            if !secure && !url.starts_with("ws://") && !url.starts_with("http://") {
                return Err(ClientError::Config(format!(
                    "{url:?} is not a ws://, wss://, http:// or https:// URL"
                )));
            }
            if secure && !cfg!(feature = "tls") {
                return Err(ClientError::Config(format!(
                    "{url:?} needs the `tls` feature of wsgate-client"
                )));
            }
        }
        if self.backoff.base().is_zero() {
            return Err(ClientError::Config("backoff base must be above 0".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_urls() {
        assert!(ClientConfig::new(["ws://h/ws"], "t").validate().is_ok());
        let none: [&str; 0] = [];
        assert!(ClientConfig::new(none, "t").validate().is_err());
        assert!(ClientConfig::new(["http://h/sse"], "t").validate().is_ok());
        assert!(ClientConfig::new(["ftp://h/ws"], "t").validate().is_err());
        let mut c = ClientConfig::new(["ws://h/ws"], "t");
        c.backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(c.validate().is_err());
    }

    #[test]
    fn debug_never_shows_the_token() {
        let c = ClientConfig::new(["ws://h/ws"], "secret-token");
        assert!(!format!("{c:?}").contains("secret-token"));
    }
}
