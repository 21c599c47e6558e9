//! What the client tells the application: [`Event`]s on an [`EventStream`],
//! and [`JoinInfo`] answers.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Serialize, Serializer};
use tokio::sync::mpsc::UnboundedReceiver;
use wsgate_protocol::{ErrorCode, Message};

/// Something that happened on the connection.
///
/// Serializes as one JSON object with an `event` field (`connected`,
/// `message`, `gap`, ...), which is what `wsgate client` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A connection is up (`welcome` received).
    Connected {
        /// The URL connected to.
        url: String,
        /// The node's id.
        node: String,
        /// The connection id.
        conn: String,
        /// The token's `sub`.
        user: String,
        /// The node's Ping interval.
        heartbeat_ms: u64,
        /// Whether the node accepted permessage-deflate (its larger frames
        /// arrive compressed; see `ClientConfig::compression`).
        compressed: bool,
        /// The transport of this connection: WebSocket, or SSE (see
        /// `ClientConfig::transport`).
        transport: crate::Transport,
    },
    /// A room message, delivered once: never a seq twice within an epoch.
    Message(Message),
    /// Messages were lost; the application should reload the room's state
    /// from its own source of truth.
    Gap(Gap),
    /// A room was joined again after a reconnect (or with a resume point):
    /// with `recovered: true` the missed messages follow as [`Event::Message`]s;
    /// with `recovered: false` a [`Event::Gap`] was reported just before.
    Resumed {
        /// Room name.
        room: String,
        /// Whether the replay covers everything missed.
        recovered: bool,
    },
    /// The next connection attempt waits `delay` (attempt counts from 1
    /// since the last stable connection).
    Reconnecting {
        /// Consecutive attempt number, from 1.
        attempt: u32,
        /// The jittered delay before the attempt.
        #[serde(rename = "delay_ms", serialize_with = "millis")]
        delay: Duration,
    },
    /// An established connection ended.
    Disconnected {
        /// The Close code, when the server sent one (`None`: the connection
        /// dropped, or the client gave up on a silent one).
        code: Option<u16>,
        /// Why, in words.
        reason: String,
    },
    /// A connection attempt failed before `welcome`.
    ConnectFailed {
        /// The URL tried.
        url: String,
        /// The HTTP status when the upgrade was refused (401, 403, 503, ...).
        status: Option<u16>,
        /// Why, in words.
        reason: String,
    },
    /// A `refresh` was accepted; the connection now expires at `exp`.
    TokenRefreshed {
        /// New expiry, Unix seconds.
        exp: u64,
    },
    /// Getting or sending a new token failed; the client retries before
    /// `exp`, and after a 4001 close gets a new token before reconnecting.
    TokenRefreshFailed {
        /// Why, in words.
        reason: String,
    },
    /// Who is in a room (v1.1), asked by the client after each join when
    /// [`ClientConfig::presence`](crate::ClientConfig::presence) is on.
    Presence(PresenceInfo),
    /// A user became present in a room joined with presence events.
    PresenceJoin {
        /// Room name.
        room: String,
        /// The user.
        user: String,
    },
    /// A user stopped being present in a room joined with presence events.
    PresenceLeave {
        /// Room name.
        room: String,
        /// The user.
        user: String,
    },
    /// Joining a room again after a reconnect was refused.
    JoinFailed {
        /// Room name.
        room: String,
        /// The server's error code.
        code: ErrorCode,
        /// The server's message.
        message: String,
        /// `true` for `unavailable` (the client retries the join); otherwise
        /// the room is no longer tracked.
        retrying: bool,
    },
}

/// A room's presence: the answer to [`Client::presence`](crate::Client::presence).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceInfo {
    /// Room name.
    pub room: String,
    /// Present users.
    pub count: u64,
    /// Their ids, sorted, at most 1,000.
    pub users: Vec<String>,
    /// Whether `users` lists fewer than `count`.
    pub truncated: bool,
}

impl From<wsgate_protocol::Presence> for PresenceInfo {
    fn from(p: wsgate_protocol::Presence) -> PresenceInfo {
        PresenceInfo {
            room: p.room,
            count: p.count,
            users: p.users,
            truncated: p.truncated,
        }
    }
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why messages of a room were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// A message arrived with a seq more than one above the last one.
    SeqJump,
    /// A resume was answered `recovered: false` (history no longer reaches
    /// back far enough, or the epoch given is not the room's).
    NotRecovered,
    /// The room's history was lost and started again (new epoch).
    EpochChanged,
}

/// A gap in a room's stream, reported instead of hidden.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// Room name.
    pub room: String,
    /// What happened.
    pub reason: GapReason,
    /// The last seq the application got (0 when none), in `previous_epoch`.
    pub expected_after: u64,
    /// For [`GapReason::SeqJump`], the seq of the message delivered next
    /// (`expected_after + 1 .. got` are missing); otherwise the room's seq in
    /// `epoch` when it was (re)joined: the messages after it follow.
    pub got: u64,
    /// The room's epoch now.
    pub epoch: String,
    /// The epoch of `expected_after`, when known.
    pub previous_epoch: Option<String>,
}

/// The answer to a join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JoinInfo {
    /// Room name.
    pub room: String,
    /// The room's latest seq when joined.
    pub seq: u64,
    /// The room's history epoch.
    pub epoch: String,
    /// Present when the join asked for a resume: whether the replay covers the gap.
    pub recovered: Option<bool>,
}

/// The client's events, in order. Also a [`futures_util::Stream`].
///
/// The channel is unbounded so that a slow application never stalls the
/// connection (heartbeats, acks); read it steadily. It ends after
/// [`Client::close`](crate::Client::close), or when every [`Client`](crate::Client)
/// handle is dropped.
#[derive(Debug)]
pub struct EventStream {
    rx: UnboundedReceiver<Event>,
}

impl EventStream {
    pub(crate) fn new(rx: UnboundedReceiver<Event>) -> EventStream {
        EventStream { rx }
    }

    /// The next event; `None` once the client has stopped.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is already queued.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl futures_util::Stream for EventStream {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}
