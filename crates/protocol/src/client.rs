//! Frames a client sends (PROTOCOL.md section 2, "Client to server").
//!
//! The server parses with [`parse_client_frame`], which borrows from the
//! received text: a `publish` payload stays the exact bytes the client sent.
//! Clients build frames with [`ClientRequest`].

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::room::{is_valid_key, is_valid_room};
use crate::server::{Id, IdNum};

/// A parsed client frame: its optional `id` and its command.
#[derive(Debug)]
pub struct ClientFrame<'a> {
    /// The frame's `id`, echoed on the server's direct answer.
    pub id: Option<Id>,
    /// What the client asks for.
    pub cmd: ClientCommand<'a>,
}

/// The commands of protocol version 1.
#[derive(Debug)]
pub enum ClientCommand<'a> {
    /// Join a room, optionally resuming after `since` in `epoch`.
    Join {
        /// Room name (valid).
        room: Cow<'a, str>,
        /// Resume after this seq.
        since: Option<u64>,
        /// The epoch the client saw with `since`.
        epoch: Option<Cow<'a, str>>,
        /// v1.1: receive `presence_join` / `presence_leave` for this room.
        presence: bool,
    },
    /// v1.1: who is present in a room.
    Presence {
        /// Room name (valid).
        room: Cow<'a, str>,
    },
    /// Leave a room.
    Leave {
        /// Room name (valid).
        room: Cow<'a, str>,
    },
    /// Publish `data` to a room.
    Publish {
        /// Room name (valid).
        room: Cow<'a, str>,
        /// The payload, exactly as the client sent it.
        data: &'a RawValue,
        /// v1.1 idempotency key (valid): a retry with the same key in the
        /// same room within 5 minutes is not published again.
        key: Option<Cow<'a, str>>,
    },
    /// Replace the connection's token.
    Refresh {
        /// The new JWT.
        token: Cow<'a, str>,
    },
    /// Application-level ping.
    Ping,
}

impl ClientCommand<'_> {
    /// The frame's `type` as sent on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientCommand::Join { .. } => "join",
            ClientCommand::Presence { .. } => "presence",
            ClientCommand::Leave { .. } => "leave",
            ClientCommand::Publish { .. } => "publish",
            ClientCommand::Refresh { .. } => "refresh",
            ClientCommand::Ping => "ping",
        }
    }
}

/// Why a frame was refused; answered with a `bad_request` error.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    /// The frame's `id` when it could be read, so that the error can echo it.
    pub id: Option<Id>,
    /// A human-readable reason.
    pub message: String,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FrameError {}

/// Every field of any client frame, each kept raw until the type is known.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "some_raw")]
    kind: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    room: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    since: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    epoch: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    data: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    token: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    key: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    presence: Option<&'a RawValue>,
}

/// A present field, even `null`, is `Some` (plain `Option` would map `null` to `None`).
fn some_raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// A JSON string, borrowed when it has no escapes.
fn raw_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&str>(text) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
    }
}

/// The `id`, a number kept as the client's text (`1e3` stays `1e3`).
fn parse_id(raw: Option<&RawValue>) -> Result<Option<Id>, String> {
    let Some(raw) = raw else { return Ok(None) };
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    let id = match raw_str(raw) {
        Some(s) => Some(Id::Str(s.into_owned())),
        None => IdNum::parse(text).map(Id::Num),
    };
    id.map(Some)
        .ok_or_else(|| "field 'id' must be a string or a number".to_owned())
}

/// How deep `data` (and any JSON this crate checks) may nest: 64 levels
/// of arrays and objects. Deeper values are refused with `bad_request`
/// before they are stored or relayed.
pub const MAX_DEPTH: usize = 64;

/// Refuse JSON text that nests arrays and objects deeper than
/// [`MAX_DEPTH`]. A scan of the text, without recursion, so that it costs
/// nothing but time on a 100,000-deep value. `text` is assumed to be JSON
/// (brackets inside strings are skipped).
pub fn check_depth(text: &str) -> Result<(), String> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("JSON nested deeper than {MAX_DEPTH} levels"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Parse one client text frame.
///
/// Never panics; any input that is not a valid frame gives a [`FrameError`]
/// (answered as `bad_request`), carrying the `id` when one could be read.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame<'_>, FrameError> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        let message = if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
            "frame must be a JSON object"
        } else {
            "frame is not valid JSON"
        };
        return Err(FrameError {
            id: None,
            message: message.to_owned(),
        });
    }
    let raw: RawFrame<'_> = serde_json::from_str(text).map_err(|e| FrameError {
        id: None,
        message: if e.is_data() {
            format!("invalid frame: {e}")
        } else {
            "frame is not valid JSON".to_owned()
        },
    })?;
    let id = parse_id(raw.id).map_err(|message| FrameError { id: None, message })?;
    let fail = |message: String| FrameError {
        id: id.clone(),
        message,
    };
    let kind = raw
        .kind
        .and_then(raw_str)
        .ok_or_else(|| fail("missing or invalid field 'type'".to_owned()))?;
    let room = || -> Result<Cow<'_, str>, FrameError> {
        let room = raw
            .room
            .and_then(raw_str)
            .ok_or_else(|| fail("missing or invalid field 'room'".to_owned()))?;
        if is_valid_room(&room) {
            Ok(room)
        } else {
            Err(fail(
                "invalid room name: 1 to 128 characters of A-Z a-z 0-9 _ - . :".to_owned(),
            ))
        }
    };
    let cmd = match kind.as_ref() {
        "join" => {
            let room = room()?;
            let since = match raw.since {
                None => None,
                Some(r) if r.get() == "null" => None,
                Some(r) => Some(serde_json::from_str::<u64>(r.get()).map_err(|_| {
                    fail("field 'since' must be a non-negative integer".to_owned())
                })?),
            };
            let epoch = match raw.epoch {
                None => None,
                Some(r) if r.get() == "null" => None,
                Some(r) => Some(
                    raw_str(r).ok_or_else(|| fail("field 'epoch' must be a string".to_owned()))?,
                ),
            };
            let presence = match raw.presence.map(RawValue::get) {
                None | Some("false") => false,
                Some("true") => true,
                Some(_) => return Err(fail("field 'presence' must be a boolean".to_owned())),
            };
            ClientCommand::Join {
                room,
                since,
                epoch,
                presence,
            }
        }
        "presence" => ClientCommand::Presence { room: room()? },
        "leave" => ClientCommand::Leave { room: room()? },
        "publish" => {
            let room = room()?;
            let data = raw
                .data
                .ok_or_else(|| fail("missing field 'data'".to_owned()))?;
            check_depth(data.get()).map_err(|e| fail(format!("field 'data': {e}")))?;
            let key = match raw.key {
                None => None,
                Some(r) if r.get() == "null" => None,
                Some(r) => Some(raw_str(r).filter(|k| is_valid_key(k)).ok_or_else(|| {
                    fail("invalid key: 1 to 64 characters of A-Z a-z 0-9 _ - . :".to_owned())
                })?),
            };
            ClientCommand::Publish { room, data, key }
        }
        "refresh" => {
            let token = raw
                .token
                .and_then(raw_str)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| fail("missing or invalid field 'token'".to_owned()))?;
            ClientCommand::Refresh { token }
        }
        "ping" => ClientCommand::Ping,
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(fail(format!("unknown type '{shown}'")));
        }
    };
    Ok(ClientFrame { id, cmd })
}

/// A frame a client sends, for building with serde (SDKs, load tool, tests).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientRequest {
    /// `join`, optionally resuming.
    Join {
        /// Room name.
        room: String,
        /// Resume after this seq.
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        /// Epoch seen with `since`.
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        /// v1.1: receive presence events for this room.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        presence: bool,
        /// Request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
    },
    /// v1.1 `presence`: who is in a room.
    Presence {
        /// Room name.
        room: String,
        /// Request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
    },
    /// `leave`.
    Leave {
        /// Room name.
        room: String,
        /// Request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
    },
    /// `publish`.
    Publish {
        /// Room name.
        room: String,
        /// Payload (any JSON value).
        data: Box<RawValue>,
        /// Idempotency key (v1.1).
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        /// Request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
    },
    /// `refresh`.
    Refresh {
        /// The new JWT.
        token: String,
        /// Request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
    },
    /// Application-level `ping`.
    Ping {
        /// Request id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
    },
}

impl ClientRequest {
    /// The JSON text of this frame.
    pub fn to_json(&self) -> String {
        // Serializing these plain types into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every client example of PROTOCOL.md.
    const EXAMPLES: &[&str] = &[
        r#"{"type":"join","room":"lobby"}"#,
        r#"{"type":"join","room":"lobby","since":41,"epoch":"k3Xb"}"#,
        r#"{"type":"join","room":"lobby","presence":true}"#,
        r#"{"type":"presence","room":"lobby","id":7}"#,
        r#"{"type":"leave","room":"lobby"}"#,
        r#"{"type":"publish","room":"lobby","data":{"text":"hi"},"id":"c1"}"#,
        r#"{"type":"refresh","token":"<new jwt>"}"#,
        r#"{"type":"ping","id":"p1"}"#,
    ];

    fn to_request(frame: &ClientFrame<'_>) -> ClientRequest {
        let id = frame.id.clone();
        match &frame.cmd {
            ClientCommand::Join {
                room,
                since,
                epoch,
                presence,
            } => ClientRequest::Join {
                room: room.to_string(),
                since: *since,
                epoch: epoch.as_ref().map(|e| e.to_string()),
                presence: *presence,
                id,
            },
            ClientCommand::Presence { room } => ClientRequest::Presence {
                room: room.to_string(),
                id,
            },
            ClientCommand::Leave { room } => ClientRequest::Leave {
                room: room.to_string(),
                id,
            },
            ClientCommand::Publish { room, data, key } => ClientRequest::Publish {
                room: room.to_string(),
                data: (*data).to_owned(),
                key: key.as_ref().map(|k| k.to_string()),
                id,
            },
            ClientCommand::Refresh { token } => ClientRequest::Refresh {
                token: token.to_string(),
                id,
            },
            ClientCommand::Ping => ClientRequest::Ping { id },
        }
    }

    #[test]
    fn protocol_examples_round_trip() {
        for example in EXAMPLES {
            let frame = parse_client_frame(example).unwrap();
            let again = to_request(&frame).to_json();
            let a: serde_json::Value = serde_json::from_str(example).unwrap();
            let b: serde_json::Value = serde_json::from_str(&again).unwrap();
            assert_eq!(a, b, "{example} came back as {again}");
        }
    }

    #[test]
    fn presence_needs_a_valid_room_and_a_boolean_flag() {
        for bad in [
            r#"{"type":"presence","room":"bad room","id":1}"#,
            r#"{"type":"presence","id":1}"#,
            r#"{"type":"join","room":"r","presence":"yes","id":1}"#,
            r#"{"type":"join","room":"r","presence":1,"id":1}"#,
            r#"{"type":"join","room":"r","presence":null,"id":1}"#,
        ] {
            let err = parse_client_frame(bad).unwrap_err();
            assert_eq!(err.id, Some(Id::Num(1u64.into())), "{bad}");
        }
        match parse_client_frame(r#"{"type":"join","room":"r","presence":false}"#)
            .unwrap()
            .cmd
        {
            ClientCommand::Join { presence, .. } => assert!(!presence),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publish_data_is_borrowed_verbatim() {
        let text = r#"{"type":"publish","room":"r","data": {"a" : [1, 2.50]} }"#;
        let frame = parse_client_frame(text).unwrap();
        match frame.cmd {
            ClientCommand::Publish { data, .. } => assert_eq!(data.get(), r#"{"a" : [1, 2.50]}"#),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn null_data_is_a_value_but_missing_data_is_an_error() {
        assert!(matches!(
            parse_client_frame(r#"{"type":"publish","room":"r","data":null}"#)
                .unwrap()
                .cmd,
            ClientCommand::Publish { .. }
        ));
        let err = parse_client_frame(r#"{"type":"publish","room":"r","id":7}"#).unwrap_err();
        assert_eq!(err.id, Some(Id::Num(7u64.into())));
        assert!(err.message.contains("data"));
    }

    #[test]
    fn errors_carry_the_id_when_readable() {
        let err = parse_client_frame(r#"{"type":"join","room":"bad room","id":"x"}"#).unwrap_err();
        assert_eq!(err.id, Some(Id::Str("x".into())));
        let err = parse_client_frame(r#"{"type":"nope","id":"y"}"#).unwrap_err();
        assert_eq!(err.id, Some(Id::Str("y".into())));
        assert!(err.message.contains("unknown type"));
        let err =
            parse_client_frame(r#"{"type":"join","room":"a","since":-1,"id":1}"#).unwrap_err();
        assert_eq!(err.id, Some(Id::Num(1u64.into())));
    }

    #[test]
    fn numeric_ids_are_echoed_as_written() {
        use crate::server::{Pong, ServerFrame};
        for id in [
            "1e3",
            "-0",
            "1.50",
            "7",
            "-3",
            "123456789012345678901234567890",
            "2E-2",
            "1e400",
            "0.5e+7",
        ] {
            let text = format!(r#"{{"type":"ping","id":{id}}}"#);
            let frame = parse_client_frame(&text).unwrap();
            let answer = ServerFrame::Pong(Pong { id: frame.id }).to_json();
            assert_eq!(answer, format!(r#"{{"type":"pong","id":{id}}}"#));
            // And a client reads it back unchanged.
            let again = ServerFrame::parse(&answer).unwrap();
            assert_eq!(again.to_json(), answer);
        }
        let frame = parse_client_frame(r#"{"type":"ping","id":"1e3"}"#).unwrap();
        assert_eq!(frame.id, Some(Id::Str("1e3".into())));
        assert_eq!(IdNum::from(7).as_u64(), Some(7));
        assert_eq!(IdNum::parse("7.0").unwrap().as_u64(), None);
        for bad in [
            "true", "\"7\"", "", "-", "01", "1.", ".5", "1e", "1e+", "+1", "1 2", "0x1",
        ] {
            assert!(IdNum::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn data_nested_deeper_than_the_limit_is_refused() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let publish =
            |data: &str| format!(r#"{{"type":"publish","room":"r","data":{data},"id":5}}"#);
        assert!(parse_client_frame(&publish(&nested(MAX_DEPTH))).is_ok());
        let err = parse_client_frame(&publish(&nested(MAX_DEPTH + 1))).unwrap_err();
        assert!(
            err.message.contains("nested deeper than 64"),
            "{}",
            err.message
        );
        assert_eq!(err.id, Some(Id::Num(5u64.into())));
        let err = parse_client_frame(&publish(&nested(100_000))).unwrap_err();
        assert!(err.message.contains("nested deeper"));
        // Objects count too; brackets inside strings do not.
        let objects = format!("{}1{}", r#"{"a":"#.repeat(65), "}".repeat(65));
        assert!(check_depth(&objects).is_err());
        let quoted = format!(r#"["{}\"{}"]"#, "[".repeat(100), "{".repeat(100));
        assert!(check_depth(&quoted).is_ok());
    }

    #[test]
    fn rejects_non_objects_and_bad_json() {
        for bad in [
            "",
            "null",
            "[1,2]",
            "\"join\"",
            "{",
            "{\"type\":\"ping\"",
            "{\"type\":1}",
            "{\"id\":{},\"type\":\"ping\"}",
            "{\"type\":\"ping\",\"type\":\"ping\"}",
        ] {
            assert!(parse_client_frame(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn publish_keys_are_validated() {
        let frame =
            parse_client_frame(r#"{"type":"publish","room":"r","data":1,"key":"k-1"}"#).unwrap();
        match frame.cmd {
            ClientCommand::Publish { key, .. } => assert_eq!(key.as_deref(), Some("k-1")),
            other => panic!("{other:?}"),
        }
        for bad in [r#""""#, r#""a b""#, "7", &format!("\"{}\"", "k".repeat(65))] {
            let text = format!(r#"{{"type":"publish","room":"r","data":1,"key":{bad},"id":3}}"#);
            let err = parse_client_frame(&text).unwrap_err();
            assert!(err.message.contains("invalid key"), "{bad}: {err}");
            assert_eq!(err.id, Some(Id::Num(3.into())));
        }
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let frame = parse_client_frame(r#"{"type":"join","room":"lo\u0062by"}"#).unwrap();
        match frame.cmd {
            ClientCommand::Join { room, .. } => assert_eq!(room, "lobby"),
            other => panic!("{other:?}"),
        }
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics_on_any_text(s in "\\PC*") {
            let _ = parse_client_frame(&s);
        }

        #[test]
        fn parser_never_panics_on_json_like_text(
            s in r#"\{("(type|room|since|epoch|data|id|token)":(null|-?[0-9]{1,22}|"[a-z\\.:*]{0,8}"|\[\]|\{\}|true),?){0,6}\}"#
        ) {
            let _ = parse_client_frame(&s);
        }
    }
}
