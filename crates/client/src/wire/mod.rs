//! The wire under a session: a WebSocket (`ws.rs`) or Server-Sent Events
//! plus POST (`sse.rs`, protocol v1.1 section 7). Both carry the same
//! frames; the driver sees a [`Wire`]: a stream of [`Incoming`] items and a
//! queue of [`Outbound`] ones, and does resume, dedup and backoff the same
//! way over either.

use futures_util::stream::BoxStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::http::StatusCode;
use wsgate_protocol::{ServerFrame, Welcome};

use crate::config::{ClientConfig, Transport};

mod sse;
mod ws;

/// What arrives from the server.
pub(crate) enum Incoming {
    /// One server frame (JSON text).
    Frame(String),
    /// The server's close (a WebSocket Close frame, or the SSE `close`
    /// event): the connection ends next.
    Close(u16, String),
    /// Proof of life without a frame: a WebSocket Ping or Pong, an SSE
    /// comment line.
    Alive,
}

/// What the session sends.
pub(crate) enum Outbound {
    /// One client frame (JSON text).
    Frame(String),
    /// From now on, authenticate with this token (SSE: each POST carries
    /// one; a WebSocket authenticated once, at the upgrade).
    Token(String),
    /// Close the connection normally (1000).
    Close,
}

/// One open connection.
pub(crate) struct Wire {
    /// Server items until the connection ends (`None`) or fails (`Err`).
    pub(crate) incoming: BoxStream<'static, Result<Incoming, String>>,
    /// Frames to send, written in order by `writer`.
    pub(crate) out: UnboundedSender<Outbound>,
    pub(crate) writer: JoinHandle<()>,
    /// Whether the node accepted permessage-deflate (WebSocket only).
    pub(crate) compressed: bool,
    pub(crate) transport: Transport,
}

/// Why a connection attempt failed.
pub(crate) struct Failure {
    /// The HTTP status when the node refused the upgrade or the stream.
    pub(crate) status: Option<u16>,
    pub(crate) reason: String,
}

impl Failure {
    pub(crate) fn new(reason: impl Into<String>) -> Failure {
        Failure {
            status: None,
            reason: reason.into(),
        }
    }
}

/// The transport for `url`: an `http(s)://` URL is an SSE endpoint
/// whatever the configuration says; a `ws(s)://` one follows
/// [`ClientConfig::transport`].
pub(crate) fn transport_for(cfg: &ClientConfig, url: &str) -> Transport {
    if url.starts_with("http://") || url.starts_with("https://") {
        Transport::Sse
    } else {
        cfg.transport
    }
}

/// One connection attempt to `url` with `token`, up to `welcome`, within
/// `cfg.connect_timeout`. [`Transport::Auto`] tries the WebSocket, and SSE
/// at once when the WebSocket cannot open.
pub(crate) async fn establish(
    cfg: &ClientConfig,
    token: &str,
    url: &str,
) -> Result<(Wire, Welcome), Failure> {
    match transport_for(cfg, url) {
        Transport::WebSocket => within(cfg, ws::establish(cfg, token, url)).await,
        Transport::Sse => within(cfg, sse::establish(cfg, token, url)).await,
        Transport::Auto => match within(cfg, ws::establish(cfg, token, url)).await {
            Ok(r) => Ok(r),
            Err(f) => {
                tracing::debug!(%url, reason = %f.reason, "WebSocket could not open; trying SSE");
                within(cfg, sse::establish(cfg, token, url))
                    .await
                    .map_err(|g| Failure {
                        status: g.status,
                        reason: format!("WebSocket: {}; SSE: {}", f.reason, g.reason),
                    })
            }
        },
    }
}

/// `attempt`, given up after `cfg.connect_timeout`.
async fn within<T>(
    cfg: &ClientConfig,
    attempt: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    match timeout(cfg.connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(Failure::new(format!(
            "no welcome within {} ms",
            cfg.connect_timeout.as_millis()
        ))),
    }
}

/// The first frame of a connection, which must be `welcome`.
fn welcome(text: &str) -> Result<Welcome, Failure> {
    match ServerFrame::parse(text) {
        Ok(ServerFrame::Welcome(w)) => Ok(w),
        Ok(other) => Err(Failure::new(format!(
            "expected welcome, got {}",
            other.to_json()
        ))),
        Err(e) => Err(Failure::new(format!("unreadable first frame: {e}"))),
    }
}

/// A refused upgrade or stream in words: the status, and the gateway's own
/// reason (the `message` of its JSON error body) when it sent one.
fn refusal(what: &str, status: StatusCode, body: Option<&[u8]>) -> Failure {
    let message = body
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .and_then(|v| v.get("message")?.as_str().map(str::to_owned));
    let reason = match message {
        Some(m) => format!("{what} refused: HTTP {status}: {m}"),
        None => format!("{what} refused: HTTP {status}"),
    };
    Failure {
        status: Some(status.as_u16()),
        reason,
    }
}
