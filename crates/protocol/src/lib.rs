//! Wire types of the wsgate client protocol, version 1 (PROTOCOL.md).
//!
//! Shared by the gateway, the Rust client SDK and the load tool; it has no
//! async runtime and no I/O. Client frames are parsed *borrowing* from the
//! received text ([`parse_client_frame`]) so that a `publish` payload is never
//! copied or re-encoded; server frames are plain owned types ([`ServerFrame`])
//! except the hot `message` frame, which is assembled from pre-encoded parts
//! ([`MessageParts`]) so that one serialization serves every receiver.
//!
//! # Layout
//! - [`client`]: frames a client sends, and the borrowing parser the server uses.
//! - [`server`]: frames the server sends, with a parser for clients.
//! - [`room`]: room-name rules.

pub mod client;
pub mod room;
pub mod server;

pub use client::{
    check_depth, parse_client_frame, ClientCommand, ClientFrame, ClientRequest, FrameError,
    MAX_DEPTH,
};
pub use room::{is_valid_key, is_valid_room, MAX_KEY_LEN, MAX_ROOM_LEN};
pub use server::{
    peek_message, Ack, ErrorCode, ErrorFrame, Id, IdNum, Joined, Left, Message, MessageParts, Pong,
    Presence, PresenceEvent, Refreshed, ServerFrame, Welcome, MAX_PRESENCE_USERS,
};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Close codes of PROTOCOL.md section 3 (and 4003 of section 8).
pub mod close {
    /// Normal close.
    pub const NORMAL: u16 = 1000;
    /// The node is shutting down: reconnect elsewhere and resume.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error (for example an unmasked client frame).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Binary frame received (v1 is text only).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Text frame that is not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy: slow consumer or heartbeat timeout.
    pub const POLICY: u16 = 1008;
    /// Message larger than the configured maximum.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error.
    pub const INTERNAL: u16 = 1011;
    /// Try again later (overload).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Token expired.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// Disconnected by the server API (v1.1, PROTOCOL.md section 8).
    pub const DISCONNECTED: u16 = 4003;
}
