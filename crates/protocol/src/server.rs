//! Frames the server sends (PROTOCOL.md section 2, "Server to client").

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

/// A request `id`: a string or a number, echoed verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Id {
    /// A numeric id, kept as the client's exact JSON text.
    Num(IdNum),
    /// A string id.
    Str(String),
}

/// A numeric `id` exactly as the client wrote it: `1e3` is echoed `1e3`,
/// `-0` as `-0`, never re-encoded through a float.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdNum(Box<str>);

impl IdNum {
    /// `text` when it is one JSON number (surrounding whitespace ignored),
    /// of any size: `1e400` is a valid id even though no `f64` holds it.
    pub fn parse(text: &str) -> Option<IdNum> {
        let text = text.trim();
        is_json_number(text).then(|| IdNum(text.into()))
    }

    /// The number's JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number as a `u64`, when it is written as one (`7`, not `7.0`).
    pub fn as_u64(&self) -> Option<u64> {
        self.0.parse().ok()
    }
}

/// The JSON number grammar (RFC 8259 section 6), checked on the text:
/// serde_json would parse the value and refuse what overflows an `f64`.
fn is_json_number(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

impl From<u64> for IdNum {
    fn from(n: u64) -> IdNum {
        IdNum(n.to_string().into())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Num(n) => f.write_str(n.as_str()),
            Id::Str(s) => f.write_str(s),
        }
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Id::Str(text) => s.serialize_str(text),
            Id::Num(n) => RawValue::from_string(n.as_str().to_owned())
                .map_err(serde::ser::Error::custom)?
                .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = Box::<RawValue>::deserialize(d)?;
        let text = raw.get();
        if text.starts_with('"') {
            return serde_json::from_str(text)
                .map(Id::Str)
                .map_err(D::Error::custom);
        }
        IdNum::parse(text)
            .map(Id::Num)
            .ok_or_else(|| D::Error::custom("an id must be a string or a number"))
    }
}

/// Error codes of PROTOCOL.md section 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, unknown type, missing or invalid field, bad room.
    BadRequest,
    /// No grant to join or publish that room.
    Forbidden,
    /// Publishing faster than the connection's limit; the message was dropped.
    RateLimited,
    /// The connection is at its room limit.
    TooManyRooms,
    /// The broker could not take the message or the join.
    Unavailable,
    /// A `refresh` token was rejected.
    InvalidToken,
    /// v1.1: the broker did not confirm a publish in time; it may or may not
    /// be delivered (at most once). Retry only with the same idempotency key.
    Timeout,
    /// A code this version does not know (forward compatibility).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unknown => "unknown",
        }
    }
}

/// `welcome`: the first frame after the upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Connection id.
    pub conn: String,
    /// The token's `sub`.
    pub user: String,
    /// The node's id.
    pub node: String,
    /// Server Ping interval in milliseconds.
    pub heartbeat_ms: u64,
    /// `"sse"` on the Server-Sent Events transport (section 7); absent on
    /// a WebSocket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// `joined`: answer to `join`, or an unsolicited epoch change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Joined {
    /// Room name.
    pub room: String,
    /// The room's latest seq when joining.
    pub seq: u64,
    /// The room's history epoch.
    pub epoch: String,
    /// Present when `since` was given (or the epoch changed): whether the replay covers the gap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// Echo of the request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
}

/// `message`: a room message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    /// Room name.
    pub room: String,
    /// Per-room sequence number.
    pub seq: u64,
    /// Publisher's `sub`.
    pub from: String,
    /// The payload, as published.
    pub data: Box<RawValue>,
    /// Publish time, Unix milliseconds.
    pub ts: u64,
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.room == other.room
            && self.seq == other.seq
            && self.from == other.from
            && self.data.get() == other.data.get()
            && self.ts == other.ts
    }
}

/// `ack`: the broker took a published message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// Echo of the request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    /// Room name.
    pub room: String,
    /// The message's seq.
    pub seq: u64,
}

/// `left`: answer to `leave`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Left {
    /// Room name.
    pub room: String,
    /// Echo of the request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
}

/// `refreshed`: the new token is in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refreshed {
    /// The new token's expiry, Unix seconds.
    pub exp: u64,
    /// Echo of the request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
}

/// `pong`: answer to an application-level `ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pong {
    /// Echo of the request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
}

/// `error`: a refused request; never closes the connection by itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
    /// Echo of the request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
}

/// `presence`: who is in a room (v1.1), the answer to a `presence` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    /// Room name.
    pub room: String,
    /// Present users.
    pub count: u64,
    /// Their ids, sorted, at most [`MAX_PRESENCE_USERS`].
    pub users: Vec<String>,
    /// Set when `users` lists fewer than `count`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Echo of the request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
}

/// Most users a `presence` answer lists.
pub const MAX_PRESENCE_USERS: usize = 1000;

/// `presence_join` / `presence_leave`: a user became, or stopped being,
/// present in a room (v1.1, for memberships joined with `"presence":true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceEvent {
    /// Room name.
    pub room: String,
    /// The user.
    pub user: String,
}

/// Any frame the server sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame {
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Joined`].
    Joined(Joined),
    /// See [`Message`].
    Message(Message),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Left`].
    Left(Left),
    /// See [`Refreshed`].
    Refreshed(Refreshed),
    /// See [`Pong`].
    Pong(Pong),
    /// See [`ErrorFrame`].
    Error(ErrorFrame),
    /// See [`Presence`].
    Presence(Presence),
    /// A user became present (see [`PresenceEvent`]).
    #[serde(rename = "presence_join")]
    PresenceJoin(PresenceEvent),
    /// A user stopped being present (see [`PresenceEvent`]).
    #[serde(rename = "presence_leave")]
    PresenceLeave(PresenceEvent),
}

impl ServerFrame {
    /// The JSON text of this frame.
    pub fn to_json(&self) -> String {
        // Serializing these plain types into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parse a server frame (client side).
    pub fn parse(text: &str) -> Result<ServerFrame, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The `id` this frame echoes, if any.
    pub fn id(&self) -> Option<&Id> {
        match self {
            ServerFrame::Joined(f) => f.id.as_ref(),
            ServerFrame::Ack(f) => f.id.as_ref(),
            ServerFrame::Left(f) => f.id.as_ref(),
            ServerFrame::Refreshed(f) => f.id.as_ref(),
            ServerFrame::Pong(f) => f.id.as_ref(),
            ServerFrame::Error(f) => f.id.as_ref(),
            ServerFrame::Presence(f) => f.id.as_ref(),
            ServerFrame::Welcome(_)
            | ServerFrame::Message(_)
            | ServerFrame::PresenceJoin(_)
            | ServerFrame::PresenceLeave(_) => None,
        }
    }
}

/// Internally tagged enums cannot hold a `RawValue`, so frames are read
/// through this flat form and then checked per type.
#[derive(Deserialize)]
struct FlatFrame {
    #[serde(rename = "type")]
    kind: String,
    conn: Option<String>,
    user: Option<String>,
    node: Option<String>,
    heartbeat_ms: Option<u64>,
    transport: Option<String>,
    room: Option<String>,
    seq: Option<u64>,
    epoch: Option<String>,
    recovered: Option<bool>,
    from: Option<String>,
    #[serde(default, deserialize_with = "some_boxed_raw")]
    data: Option<Box<RawValue>>,
    ts: Option<u64>,
    id: Option<Id>,
    exp: Option<u64>,
    code: Option<ErrorCode>,
    message: Option<String>,
    count: Option<u64>,
    users: Option<Vec<String>>,
    truncated: Option<bool>,
}

fn some_boxed_raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

impl<'de> Deserialize<'de> for ServerFrame {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let f = FlatFrame::deserialize(d)?;
        fn need<T, E: Error>(v: Option<T>, name: &'static str) -> Result<T, E> {
            v.ok_or_else(|| E::missing_field(name))
        }
        Ok(match f.kind.as_str() {
            "welcome" => ServerFrame::Welcome(Welcome {
                conn: need(f.conn, "conn")?,
                user: need(f.user, "user")?,
                node: need(f.node, "node")?,
                heartbeat_ms: need(f.heartbeat_ms, "heartbeat_ms")?,
                transport: f.transport,
            }),
            "joined" => ServerFrame::Joined(Joined {
                room: need(f.room, "room")?,
                seq: need(f.seq, "seq")?,
                epoch: need(f.epoch, "epoch")?,
                recovered: f.recovered,
                id: f.id,
            }),
            "message" => ServerFrame::Message(Message {
                room: need(f.room, "room")?,
                seq: need(f.seq, "seq")?,
                from: need(f.from, "from")?,
                data: need(f.data, "data")?,
                ts: need(f.ts, "ts")?,
            }),
            "ack" => ServerFrame::Ack(Ack {
                id: f.id,
                room: need(f.room, "room")?,
                seq: need(f.seq, "seq")?,
            }),
            "left" => ServerFrame::Left(Left {
                room: need(f.room, "room")?,
                id: f.id,
            }),
            "refreshed" => ServerFrame::Refreshed(Refreshed {
                exp: need(f.exp, "exp")?,
                id: f.id,
            }),
            "pong" => ServerFrame::Pong(Pong { id: f.id }),
            "presence" => ServerFrame::Presence(Presence {
                room: need(f.room, "room")?,
                count: need(f.count, "count")?,
                users: need(f.users, "users")?,
                truncated: f.truncated.unwrap_or(false),
                id: f.id,
            }),
            "presence_join" => ServerFrame::PresenceJoin(PresenceEvent {
                room: need(f.room, "room")?,
                user: need(f.user, "user")?,
            }),
            "presence_leave" => ServerFrame::PresenceLeave(PresenceEvent {
                room: need(f.room, "room")?,
                user: need(f.user, "user")?,
            }),
            "error" => ServerFrame::Error(ErrorFrame {
                code: need(f.code, "code")?,
                message: need(f.message, "message")?,
                id: f.id,
            }),
            other => {
                return Err(D::Error::unknown_variant(
                    other,
                    &[
                        "welcome",
                        "joined",
                        "message",
                        "ack",
                        "left",
                        "refreshed",
                        "pong",
                        "error",
                        "presence",
                        "presence_join",
                        "presence_leave",
                    ],
                ))
            }
        })
    }
}

/// A `message` frame encoded once, around the seq the broker assigns.
///
/// The frame is `head` + seq + `tail`:
/// `{"type":"message","room":R,"seq":` `58` `,"from":U,"data":D,"ts":T}`.
/// The publishing node encodes it once; the broker splices in the seq and
/// every receiver (local or on another node) gets the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageParts {
    head: String,
    tail: String,
}

impl MessageParts {
    /// Encode a message's parts. `data` is written verbatim.
    pub fn new(room: &str, from: &str, data: &RawValue, ts_ms: u64) -> MessageParts {
        let mut head = String::with_capacity(32 + room.len());
        head.push_str(r#"{"type":"message","room":"#);
        push_json_str(&mut head, room);
        head.push_str(r#","seq":"#);
        let data = data.get();
        let mut tail = String::with_capacity(32 + from.len() + data.len());
        tail.push_str(r#","from":"#);
        push_json_str(&mut tail, from);
        tail.push_str(r#","data":"#);
        tail.push_str(data);
        tail.push_str(r#","ts":"#);
        tail.push_str(&ts_ms.to_string());
        tail.push('}');
        MessageParts { head, tail }
    }

    /// Everything before the seq.
    pub fn head(&self) -> &str {
        &self.head
    }

    /// Everything after the seq.
    pub fn tail(&self) -> &str {
        &self.tail
    }

    /// The complete frame for `seq`.
    pub fn frame(&self, seq: u64) -> String {
        let seq = seq.to_string();
        let mut out = String::with_capacity(self.head.len() + seq.len() + self.tail.len());
        out.push_str(&self.head);
        out.push_str(&seq);
        out.push_str(&self.tail);
        out
    }
}

fn push_json_str(out: &mut String, s: &str) {
    // Serializing a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// The room and seq of a `message` frame that this crate (or the broker)
/// encoded, read without parsing the payload: for hot paths that only need
/// those two fields. Returns `None` for any other text.
pub fn peek_message(frame: &str) -> Option<(&str, u64)> {
    let rest = frame.strip_prefix(r#"{"type":"message","room":""#)?;
    let end = rest.find('"')?;
    let room = &rest[..end];
    let rest = rest[end..].strip_prefix(r#"","seq":"#)?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let seq = rest[..digits].parse().ok()?;
    Some((room, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every server example of PROTOCOL.md.
    const EXAMPLES: &[&str] = &[
        r#"{"type":"welcome","conn":"c-7f3a","user":"alice","node":"node-1","heartbeat_ms":30000}"#,
        r#"{"type":"joined","room":"lobby","seq":57,"epoch":"k3Xb"}"#,
        r#"{"type":"joined","room":"lobby","seq":57,"epoch":"k3Xb","recovered":true}"#,
        r#"{"type":"message","room":"lobby","seq":58,"from":"alice","data":{"text":"hi"},"ts":1764043200123}"#,
        r#"{"type":"ack","id":"c1","room":"lobby","seq":58}"#,
        r#"{"type":"left","room":"lobby"}"#,
        r#"{"type":"refreshed","exp":1764046800}"#,
        r#"{"type":"pong","id":"p1"}"#,
        r#"{"type":"error","code":"forbidden","message":"not allowed to join room 'admin'","id":"c2"}"#,
        r#"{"type":"joined","room":"lobby","seq":12,"epoch":"NEW","recovered":false}"#,
        r#"{"type":"presence","room":"lobby","count":2,"users":["alice","bob"],"id":7}"#,
        r#"{"type":"presence","room":"lobby","count":1001,"users":["a"],"truncated":true}"#,
        r#"{"type":"presence_join","room":"lobby","user":"bob"}"#,
        r#"{"type":"presence_leave","room":"lobby","user":"bob"}"#,
    ];

    #[test]
    fn protocol_examples_round_trip() {
        for example in EXAMPLES {
            let frame = ServerFrame::parse(example).unwrap();
            let again = frame.to_json();
            let a: serde_json::Value = serde_json::from_str(example).unwrap();
            let b: serde_json::Value = serde_json::from_str(&again).unwrap();
            assert_eq!(a, b, "{example} came back as {again}");
        }
    }

    #[test]
    fn every_error_code_round_trips() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Forbidden,
            ErrorCode::RateLimited,
            ErrorCode::TooManyRooms,
            ErrorCode::Unavailable,
            ErrorCode::InvalidToken,
            ErrorCode::Timeout,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        assert_eq!(
            serde_json::from_str::<ErrorCode>("\"brand_new\"").unwrap(),
            ErrorCode::Unknown
        );
    }

    #[test]
    fn message_parts_match_the_protocol_example() {
        let data = RawValue::from_string(r#"{"text":"hi"}"#.to_owned()).unwrap();
        let parts = MessageParts::new("lobby", "alice", &data, 1764043200123);
        assert_eq!(
            parts.frame(58),
            r#"{"type":"message","room":"lobby","seq":58,"from":"alice","data":{"text":"hi"},"ts":1764043200123}"#
        );
        assert_eq!(peek_message(&parts.frame(58)), Some(("lobby", 58)));
    }

    #[test]
    fn message_parts_escape_the_sender() {
        let data = RawValue::from_string("1".to_owned()).unwrap();
        let parts = MessageParts::new("r", "a\"b\\c", &data, 1);
        match ServerFrame::parse(&parts.frame(3)).unwrap() {
            ServerFrame::Message(m) => {
                assert_eq!(m.from, "a\"b\\c");
                assert_eq!(m.seq, 3);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn peek_rejects_other_frames() {
        assert_eq!(peek_message(r#"{"type":"ack","room":"a","seq":1}"#), None);
        assert_eq!(
            peek_message(r#"{"type":"message","room":"a","seq":x}"#),
            None
        );
    }

    #[test]
    fn unknown_type_is_an_error() {
        assert!(ServerFrame::parse(r#"{"type":"bogus"}"#).is_err());
        assert!(ServerFrame::parse(r#"{"type":"ack","room":"a"}"#).is_err());
    }
}
