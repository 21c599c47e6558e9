//! RFC 6455 framing: server frames encoded once into their complete wire
//! bytes, and a decoder for client frames.
//!
//! Hand-written on purpose: `tungstenite` and `fastwebsockets` keep a read
//! and a write buffer per connection and write through their own path, so a
//! frame shared by every member of a room would be copied into each
//! connection's buffer. Here a server frame is one `Bytes` (header and
//! payload; server frames are unmasked, so identical for every recipient)
//! that is written as is, and the decoder holds no memory between frames.
//!
//! permessage-deflate ([`crate::deflate`]): a room message's frame is a
//! [`SharedText`], its plain encoding built at once and its compressed one
//! (RSV1) built the first time a member that negotiated the extension needs
//! it; both are shared by every member. A client message with RSV1 is
//! inflated when it is complete.

use std::sync::OnceLock;

use axum::extract::ws::Utf8Bytes;
use bytes::{Buf, Bytes, BytesMut};
use wsgate_protocol::close;

use crate::deflate::{self, FrameKind, InflateError};

const FIN: u8 = 0x80;
/// RSV1: set on frames compressed with permessage-deflate.
pub const RSV1: u8 = 0x40;
/// RSV2 and RSV3: no extension of ours defines them.
const RSV23: u8 = 0x30;
const MASK: u8 = 0x80;

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Largest payload of a control frame.
const MAX_CONTROL: usize = 125;

/// A server frame with FIN set: `flags` is [`RSV1`] or 0.
fn encode(opcode: u8, flags: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut out = Vec::with_capacity(len + 10);
    out.push(FIN | flags | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// The wire bytes of a text frame.
pub fn text(payload: &str) -> Bytes {
    encode(OP_TEXT, 0, payload.as_bytes())
}

/// How a connection's frames go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// WebSocket text frames, compressed (RSV1) when their payload is at
    /// least this long (`usize::MAX` without permessage-deflate).
    Ws(usize),
    /// Server-Sent Events ([`crate::sse`]): one `data:` event a frame.
    Sse,
}

/// The wire bytes of a text frame for one connection: for a WebSocket,
/// compressed (RSV1) when its payload is at least the connection's
/// threshold; for SSE, an event.
pub fn text_for(payload: &str, encoding: Encoding) -> Bytes {
    match encoding {
        Encoding::Ws(from) if payload.len() >= from => {
            encode(OP_TEXT, RSV1, &deflate::compress(payload.as_bytes()))
        }
        Encoding::Ws(_) => text(payload),
        Encoding::Sse => crate::sse::event(payload),
    }
}

/// A server text frame shared by many connections, in its encodings:
/// plain, built at once; compressed (RSV1), built the first time a
/// connection that negotiated permessage-deflate needs it; and as a
/// Server-Sent Event, built the first time an SSE connection needs it.
/// Each is then shared: one deflate and one event per message per node, no
/// encoder state per connection.
#[derive(Debug)]
pub struct SharedText {
    plain: Bytes,
    deflated: OnceLock<Bytes>,
    sse: OnceLock<Bytes>,
}

impl SharedText {
    /// The frame of `payload`.
    pub fn new(payload: &str) -> SharedText {
        SharedText {
            plain: text(payload),
            deflated: OnceLock::new(),
            sse: OnceLock::new(),
        }
    }

    /// The encoding for a connection that encodes with `encoding`.
    pub fn for_conn(&self, encoding: Encoding) -> Bytes {
        let payload = &self.plain[header_len(&self.plain)..];
        match encoding {
            Encoding::Ws(from) if payload.len() < from => self.plain.clone(),
            Encoding::Ws(_) => self
                .deflated
                .get_or_init(|| encode(OP_TEXT, RSV1, &deflate::compress(payload)))
                .clone(),
            Encoding::Sse => self
                .sse
                .get_or_init(|| {
                    // The payload was built from a `&str`.
                    crate::sse::event(std::str::from_utf8(payload).unwrap_or_default())
                })
                .clone(),
        }
    }
}

/// The header length of a server frame (unmasked) built by [`encode`].
fn header_len(frame: &[u8]) -> usize {
    match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    }
}

/// The wire bytes of a Close frame; no payload when `code` is `None`.
pub fn close_frame(code: Option<u16>, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    if let Some(code) = code {
        payload.extend_from_slice(&code.to_be_bytes());
        // A control frame's payload is at most 125 bytes.
        let mut end = reason.len().min(MAX_CONTROL - 2);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        payload.extend_from_slice(&reason.as_bytes()[..end]);
    }
    encode(OP_CLOSE, 0, &payload)
}

/// The wire bytes of an empty Ping.
pub fn ping() -> Bytes {
    Bytes::from_static(&[FIN | OP_PING, 0])
}

fn pong(payload: &[u8]) -> Bytes {
    encode(OP_PONG, 0, payload)
}

/// A complete client message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A text message (UTF-8 checked).
    Text(Utf8Bytes),
    /// A binary message (its payload is not kept).
    Binary,
    /// A Ping: the Pong to write back.
    Ping(Bytes),
    /// A Pong.
    Pong,
    /// A Close: the Close to write back if the server did not close first
    /// (the client's code and reason echoed, or 1002 for a code a client
    /// may not send).
    Close(Bytes),
}

/// A client frame that breaks RFC 6455 or the size limit: the connection
/// is closed with this code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// Close code.
    pub code: u16,
    /// Close reason.
    pub reason: &'static str,
}

const fn protocol(reason: &'static str) -> Violation {
    Violation {
        code: close::PROTOCOL_ERROR,
        reason,
    }
}

const TOO_BIG: Violation = Violation {
    code: close::TOO_BIG,
    reason: "message too big",
};

const BAD_UTF8: Violation = Violation {
    code: close::INVALID_PAYLOAD,
    reason: "invalid UTF-8 in text frame",
};

/// A fragmented message in progress.
#[derive(Debug)]
struct Fragments {
    text: bool,
    /// Its first frame had RSV1: `data` is deflated.
    compressed: bool,
    /// The text so far (binary payloads are only counted).
    data: Vec<u8>,
    len: usize,
}

/// Client frame decoder. Holds no allocation between frames: bytes are
/// kept only while a frame (or a fragmented message) is incomplete.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
    message: Option<Box<Fragments>>,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
}

/// Close codes a client may send (RFC 6455 7.4; 1004-1006, 1014 and 1015
/// are reserved or may not appear on the wire).
fn allowed_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999)
}

impl Decoder {
    /// A decoder for a connection that negotiated permessage-deflate or not.
    pub fn new(deflate: bool) -> Decoder {
        Decoder {
            deflate,
            ..Decoder::default()
        }
    }

    /// Append bytes read from the socket.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether bytes of an incomplete frame are held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next complete message or control frame in what was read, or
    /// `None` when more bytes are needed. `max` bounds a message's payload.
    pub fn next(&mut self, max: usize) -> Result<Option<Incoming>, Violation> {
        loop {
            let Some((b0, len, header)) = self.header(max)? else {
                return Ok(None);
            };
            if self.buf.len() < header + len {
                self.reserve(header + len);
                return Ok(None);
            }
            let mask = [
                self.buf[header - 4],
                self.buf[header - 3],
                self.buf[header - 2],
                self.buf[header - 1],
            ];
            self.buf.advance(header);
            let mut payload = self.buf.split_to(len);
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i & 3];
            }
            if self.buf.is_empty() {
                // Give the allocation back: an idle connection holds none.
                self.buf = BytesMut::new();
            }
            if let Some(done) = self.frame(b0, payload, max)? {
                return Ok(Some(done));
            }
        }
    }

    /// Parse the header at the front: (first byte, payload length, header
    /// length), `None` while incomplete.
    fn header(&self, max: usize) -> Result<Option<(u8, usize, usize)>, Violation> {
        let buf = &self.buf[..];
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        if b0 & RSV23 != 0 {
            return Err(protocol("reserved bits set"));
        }
        let opcode = b0 & 0x0F;
        if !matches!(
            opcode,
            OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        ) {
            return Err(protocol("reserved opcode"));
        }
        let control = opcode >= OP_CLOSE;
        let kind = match opcode {
            _ if control => FrameKind::Control,
            OP_CONT => FrameKind::Continuation,
            _ => FrameKind::First,
        };
        deflate::rsv1_compressed(b0 & RSV1 != 0, kind, self.deflate)
            .map_err(|e| protocol(e.reason()))?;
        if b1 & MASK == 0 {
            return Err(protocol("client frames must be masked"));
        }
        let short = usize::from(b1 & 0x7F);
        if control && (b0 & FIN == 0 || short > MAX_CONTROL) {
            return Err(protocol(
                "control frames must be whole and at most 125 bytes",
            ));
        }
        let (len, at) = match short {
            126 => {
                let Some(b) = buf.get(2..4) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
            }
            127 => {
                let Some(b) = buf.get(2..10) else {
                    return Ok(None);
                };
                let mut n = [0u8; 8];
                n.copy_from_slice(b);
                let len = u64::from_be_bytes(n);
                if len >> 63 != 0 {
                    return Err(protocol("invalid frame length"));
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        let so_far = self.message.as_ref().map_or(0, |m| m.len) as u64;
        if !control && so_far.saturating_add(len) > max as u64 {
            return Err(TOO_BIG);
        }
        let header = at + 4;
        if buf.len() < header {
            return Ok(None);
        }
        // `len <= max` (or <= 125) here, so it fits in usize.
        Ok(Some((b0, len as usize, header)))
    }

    fn reserve(&mut self, total: usize) {
        let missing = total - self.buf.len();
        self.buf.reserve(missing);
    }

    /// Handle one whole frame; `Some` when it completes something.
    fn frame(
        &mut self,
        b0: u8,
        payload: BytesMut,
        max: usize,
    ) -> Result<Option<Incoming>, Violation> {
        let fin = b0 & FIN != 0;
        match b0 & 0x0F {
            OP_PING => Ok(Some(Incoming::Ping(pong(&payload)))),
            OP_PONG => Ok(Some(Incoming::Pong)),
            OP_CLOSE => Ok(Some(Incoming::Close(close_reply(&payload)?))),
            OP_CONT => {
                let Some(m) = self.message.as_mut() else {
                    return Err(protocol("continuation frame without a message"));
                };
                m.len += payload.len();
                if m.len > max {
                    return Err(TOO_BIG);
                }
                if m.text {
                    m.data.extend_from_slice(&payload);
                }
                if !fin {
                    return Ok(None);
                }
                match self.message.take() {
                    Some(m) if m.text && m.compressed => {
                        Ok(Some(text_message(inflate(&m.data, max)?)?))
                    }
                    Some(m) if m.text => Ok(Some(text_message(Bytes::from(m.data))?)),
                    _ => Ok(Some(Incoming::Binary)),
                }
            }
            opcode => {
                if self.message.is_some() {
                    return Err(protocol("new message inside a fragmented one"));
                }
                let text = opcode == OP_TEXT;
                // The header checked RSV1 against the negotiation.
                let compressed = b0 & RSV1 != 0;
                if fin {
                    return Ok(Some(match (text, compressed) {
                        (true, true) => text_message(inflate(&payload, max)?)?,
                        (true, false) => text_message(payload.freeze())?,
                        (false, _) => Incoming::Binary,
                    }));
                }
                self.message = Some(Box::new(Fragments {
                    text,
                    compressed,
                    len: payload.len(),
                    data: if text { payload.to_vec() } else { Vec::new() },
                }));
                Ok(None)
            }
        }
    }
}

/// A compressed message's payload inflated within `max` bytes.
fn inflate(compressed: &[u8], max: usize) -> Result<Bytes, Violation> {
    deflate::inflate(compressed, max)
        .map(Bytes::from)
        .map_err(|e| match e {
            InflateError::TooBig => TOO_BIG,
            InflateError::Corrupt => Violation {
                code: close::INVALID_PAYLOAD,
                reason: "invalid compressed data",
            },
        })
}

fn text_message(payload: Bytes) -> Result<Incoming, Violation> {
    Utf8Bytes::try_from(payload)
        .map(Incoming::Text)
        .map_err(|_| BAD_UTF8)
}

/// The Close to answer a client's Close with (RFC 6455 5.5.1): its code
/// and reason echoed; 1002 for a code a client may not send.
fn close_reply(payload: &[u8]) -> Result<Bytes, Violation> {
    match payload {
        [] => Ok(close_frame(None, "")),
        [_] => Err(protocol("close frame with a one-byte payload")),
        [a, b, reason @ ..] => {
            let reason = std::str::from_utf8(reason).map_err(|_| BAD_UTF8)?;
            let code = u16::from_be_bytes([*a, *b]);
            Ok(if allowed_close_code(code) {
                close_frame(Some(code), reason)
            } else {
                close_frame(Some(close::PROTOCOL_ERROR), "Protocol violation")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(MASK | n as u8),
            n if n <= 0xFFFF => {
                out.push(MASK | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(MASK | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    fn decode(bytes: &[u8], max: usize) -> Result<Vec<Incoming>, Violation> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        // Byte by byte: every split point must work.
        for b in bytes {
            d.extend(std::slice::from_ref(b));
            while let Some(m) = d.next(max)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    #[test]
    fn server_frames_carry_their_header() {
        assert_eq!(&text("hi")[..], b"\x81\x02hi");
        let long = "x".repeat(300);
        assert_eq!(&text(&long)[..4], &[0x81, 126, 1, 44]);
        let huge = "x".repeat(70_000);
        assert_eq!(
            &text(&huge)[..10],
            &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]
        );
        assert_eq!(
            &close_frame(Some(1008), "slow")[..],
            b"\x88\x06\x03\xf0slow"
        );
        assert_eq!(&ping()[..], &[0x89, 0]);
    }

    #[test]
    fn text_fragments_and_controls_between_them() {
        let mut bytes = client(OP_TEXT, b"he");
        bytes.extend(client(FIN | OP_PING, b"p"));
        bytes.extend(client(FIN | OP_CONT, b"llo"));
        let got = decode(&bytes, 100).unwrap();
        assert_eq!(got[0], Incoming::Ping(pong(b"p")));
        assert_eq!(got[1], Incoming::Text(Utf8Bytes::from("hello")));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn rule_breaking_frames_get_their_close_code() {
        let code = |bytes: Vec<u8>, max| decode(&bytes, max).unwrap_err().code;
        let mut unmasked = client(FIN | OP_TEXT, b"a");
        unmasked[1] &= !MASK;
        assert_eq!(code(unmasked, 10), 1002);
        assert_eq!(code(client(FIN | RSV1 | OP_TEXT, b"a"), 10), 1002);
        assert_eq!(code(client(FIN | 0x3, b"a"), 10), 1002);
        assert_eq!(code(client(OP_PING, b"a"), 10), 1002);
        assert_eq!(code(client(FIN | OP_PING, &[0; 126]), 1000), 1002);
        assert_eq!(code(client(FIN | OP_CONT, b"a"), 10), 1002);
        let mut twice = client(OP_TEXT, b"a");
        twice.extend(client(FIN | OP_TEXT, b"b"));
        assert_eq!(code(twice, 10), 1002);
        assert_eq!(code(client(FIN | OP_TEXT, &[0xff]), 10), 1007);
        assert_eq!(code(client(FIN | OP_TEXT, &[b'a'; 11]), 10), 1009);
        let mut split = client(OP_TEXT, &[b'a'; 6]);
        split.extend(client(FIN | OP_CONT, &[b'a'; 6]));
        assert_eq!(code(split, 10), 1009);
        assert_eq!(code(client(FIN | OP_CLOSE, &[3]), 10), 1002);
        assert_eq!(code(client(FIN | OP_CLOSE, &[3, 232, 0xff]), 10), 1007);
    }

    #[test]
    fn a_size_violation_is_seen_from_the_header_alone() {
        let header = &client(FIN | OP_TEXT, &[b'a'; 70_000])[..14];
        assert_eq!(decode(header, 1000).unwrap_err().code, 1009);
    }

    #[test]
    fn closes_are_echoed_or_answered_with_1002() {
        let echo = |payload: &[u8]| match &decode(&client(FIN | OP_CLOSE, payload), 10).unwrap()[..]
        {
            [Incoming::Close(reply)] => reply.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(echo(&[]), close_frame(None, ""));
        assert_eq!(echo(b"\x03\xe8bye"), close_frame(Some(1000), "bye"));
        assert_eq!(
            echo(&[3, 237]),
            close_frame(Some(1002), "Protocol violation")
        );
        assert_eq!(
            echo(&[0x13, 0x88]),
            close_frame(Some(1002), "Protocol violation")
        );
    }

    fn deflated(text: &str) -> Vec<u8> {
        crate::deflate::compress(text.as_bytes())
    }

    #[test]
    fn compressed_messages_are_inflated_when_negotiated() {
        let mut d = Decoder::new(true);
        let whole = deflated("hello hello hello");
        d.extend(&client(FIN | RSV1 | OP_TEXT, &whole));
        // Fragmented: RSV1 on the first frame only, a Ping in between.
        let split = deflated("fragmented and compressed");
        let (a, b) = split.split_at(split.len() / 2);
        d.extend(&client(RSV1 | OP_TEXT, a));
        d.extend(&client(FIN | OP_PING, b"p"));
        d.extend(&client(FIN | OP_CONT, b));
        d.extend(&client(FIN | OP_TEXT, b"plain"));
        let mut got = Vec::new();
        while let Some(m) = d.next(1000).unwrap() {
            got.push(m);
        }
        assert_eq!(
            got,
            vec![
                Incoming::Text(Utf8Bytes::from("hello hello hello")),
                Incoming::Ping(pong(b"p")),
                Incoming::Text(Utf8Bytes::from("fragmented and compressed")),
                Incoming::Text(Utf8Bytes::from("plain")),
            ]
        );
    }

    #[test]
    fn compressed_rule_breakers_get_their_close_code() {
        let code = |bytes: Vec<u8>, max| {
            let mut d = Decoder::new(true);
            d.extend(&bytes);
            d.next(max).unwrap_err()
        };
        let bomb = crate::deflate::compress(&[b' '; 100_000]);
        assert_eq!(code(client(FIN | RSV1 | OP_TEXT, &bomb), 1000).code, 1009);
        let corrupt = code(client(FIN | RSV1 | OP_TEXT, &[0xff; 4]), 1000);
        assert_eq!(
            (corrupt.code, corrupt.reason),
            (1007, "invalid compressed data")
        );
        let invalid_utf8 = crate::deflate::compress(&[0xff, 0xfe]);
        assert_eq!(
            code(client(FIN | RSV1 | OP_TEXT, &invalid_utf8), 1000).code,
            1007
        );
        assert_eq!(code(client(FIN | RSV1 | OP_PING, b"p"), 1000).code, 1002);
        let mut cont = client(RSV1 | OP_TEXT, &deflated("a"));
        cont.extend(client(FIN | RSV1 | OP_CONT, b""));
        assert_eq!(code(cont, 1000).code, 1002);
        assert_eq!(code(client(FIN | 0x20 | OP_TEXT, b"a"), 1000).code, 1002);
    }

    #[test]
    fn a_shared_text_is_compressed_once_for_those_who_negotiated() {
        let payload = "x".repeat(300);
        let shared = SharedText::new(&payload);
        let plain = shared.for_conn(Encoding::Ws(usize::MAX));
        assert_eq!(plain, text(&payload));
        assert_eq!(shared.for_conn(Encoding::Ws(301)), plain);
        let deflated = shared.for_conn(Encoding::Ws(300));
        assert_eq!(deflated[0], FIN | RSV1 | OP_TEXT);
        assert_eq!(
            crate::deflate::inflate(&deflated[2..], 300).unwrap(),
            payload.as_bytes()
        );
        // The same bytes for the next member, not a second compression.
        assert_eq!(shared.for_conn(Encoding::Ws(0)).as_ptr(), deflated.as_ptr());
        assert_eq!(text_for(&payload, Encoding::Ws(300)), deflated);
        assert_eq!(text_for(&payload, Encoding::Ws(usize::MAX)), plain);
    }

    #[test]
    fn nothing_is_held_between_frames() {
        let mut d = Decoder::default();
        d.extend(&client(FIN | OP_TEXT, b"hi"));
        assert!(d.next(10).unwrap().is_some());
        assert!(d.is_empty());
        assert_eq!(d.buf.capacity(), 0);
    }
}
