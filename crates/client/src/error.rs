//! The client's typed errors.

use wsgate_protocol::ErrorCode;

/// A boxed error from a token callback.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a request (or [`Client::connect`](crate::Client::connect)) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The gateway refused the request with an `error` frame.
    #[error("{}: {message}", code.as_str())]
    Server {
        /// The protocol's error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// No connection right now, or it dropped before the answer came. For a
    /// publish this means the message may or may not have been taken.
    #[error("not connected (the connection dropped or is being re-established)")]
    Disconnected,
    /// A publish left without an `ack` by a dropped connection could not be
    /// sent again while the gateway still remembers its key (the 5-minute
    /// window, less a margin): it may or may not have been published.
    #[error("no ack for the publish before its idempotency key expired (the connection did not come back in time); it may or may not have been published")]
    PublishExpired,
    /// No answer within `request_timeout` on an open connection.
    #[error("no answer within the request timeout")]
    Timeout,
    /// The room was left before its join was answered.
    #[error("the room was left before the join was answered")]
    Cancelled,
    /// The client was closed by the application.
    #[error("the client is closed")]
    Closed,
    /// A room name the protocol does not allow.
    #[error("invalid room name {0:?}: 1 to 128 characters of A-Z a-z 0-9 _ - . :")]
    InvalidRoom(String),
    /// The data to publish could not be encoded as JSON.
    #[error("cannot encode the data as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    /// The configuration cannot work (no URL, a URL that is not ws:// or wss://).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The first connection attempt to every URL failed.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The last URL tried.
        url: String,
        /// The HTTP status when the upgrade was refused.
        status: Option<u16>,
        /// Why, in words.
        reason: String,
    },
}

impl ClientError {
    /// The server's error code, for [`ClientError::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}
