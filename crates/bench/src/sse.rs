//! The Server-Sent Events transport on the client side (PROTOCOL.md
//! section 7): `GET /sse` read as a stream of frames, client frames sent with
//! `POST /sse/{conn}`.
//!
//! Hand-written over a plain TCP socket, like the rest of the tool's hot
//! path: the response head is read once, then the body (chunked or not) is
//! cut into events; each event's `data:` lines are one server frame, handed
//! out as a [`Message::Text`] so that a member reads an SSE stream exactly
//! as it reads a WebSocket. Comment lines (the heartbeat) are skipped.
//! POSTs go over a fresh connection each (`Connection: close`): members
//! post once (their `join`), publishers stay on WebSocket.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::net::ConnectError;
use crate::wire::Counted;

/// Longest response head read.
const MAX_HEAD: usize = 16 << 10;
/// Longest chunk-size line.
const MAX_SIZE_LINE: usize = 64;
/// Largest event kept while incomplete.
const MAX_EVENT: usize = 16 << 20;

/// Where a body's chunked encoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// This many data bytes left in the current chunk.
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The last (zero) chunk came: the body is over.
    Done,
}

/// An open `/sse` stream: a [`Stream`] of server frames as text messages.
pub struct Sse {
    io: Counted,
    events: EventReader,
    eof: bool,
    /// Where POSTs for this stream go.
    post: PostTarget,
}

/// Cuts a response body (chunked or not) into events.
#[derive(Debug, Default)]
pub struct EventReader {
    /// Bytes read and not yet de-chunked (chunked bodies only).
    raw: Vec<u8>,
    /// Body bytes not yet cut into events, from `pos`.
    body: Vec<u8>,
    pos: usize,
    /// `None`: the body is not chunked (it ends with the connection).
    chunk: Option<Chunk>,
}

/// Where and as whom a stream's POSTs go.
#[derive(Clone)]
pub struct PostTarget {
    /// The node's address.
    pub addr: SocketAddr,
    /// `host:port` for the Host header.
    pub host: String,
    /// The stream's token.
    pub token: Arc<str>,
    /// `conn` from `welcome` (set once it came).
    pub conn: String,
}

impl Sse {
    /// A stream whose head has been read; `rest` is what came after it.
    pub fn new(io: Counted, rest: &[u8], chunked: bool, post: PostTarget) -> io::Result<Sse> {
        let mut events = EventReader::new(chunked);
        events.take_in(rest)?;
        Ok(Sse {
            io,
            events,
            eof: false,
            post,
        })
    }

    /// Where this stream's POSTs go.
    pub fn post_target(&mut self) -> &mut PostTarget {
        &mut self.post
    }
}

impl EventReader {
    /// A reader for a body that is `chunked` or not.
    pub fn new(chunked: bool) -> EventReader {
        EventReader {
            chunk: chunked.then_some(Chunk::Size),
            ..EventReader::default()
        }
    }

    /// Add body bytes as read off the socket.
    pub fn take_in(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.chunk.is_none() {
            self.body.extend_from_slice(bytes);
            Ok(())
        } else {
            self.raw.extend_from_slice(bytes);
            self.dechunk()
        }
    }

    /// Move the complete chunk data in `raw` to `body`.
    fn dechunk(&mut self) -> io::Result<()> {
        let Some(mut state) = self.chunk else {
            return Ok(());
        };
        let mut at = 0;
        loop {
            let rest = &self.raw[at..];
            match state {
                Chunk::Size => {
                    let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                        if rest.len() > MAX_SIZE_LINE {
                            return Err(invalid("chunk-size line too long"));
                        }
                        break;
                    };
                    let line = std::str::from_utf8(&rest[..end])
                        .map_err(|_| invalid("bad chunk-size line"))?;
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let n =
                        usize::from_str_radix(hex, 16).map_err(|_| invalid("bad chunk size"))?;
                    at += end + 2;
                    state = if n == 0 { Chunk::Done } else { Chunk::Data(n) };
                }
                Chunk::Data(n) => {
                    let take = n.min(rest.len());
                    if take == 0 {
                        break;
                    }
                    self.body.extend_from_slice(&rest[..take]);
                    at += take;
                    state = if take == n {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(n - take)
                    };
                }
                Chunk::DataEnd => {
                    if rest.len() < 2 {
                        break;
                    }
                    at += 2;
                    state = Chunk::Size;
                }
                Chunk::Done => break,
            }
        }
        self.raw.drain(..at);
        self.chunk = Some(state);
        Ok(())
    }

    /// The next complete event's frame (events without data are skipped).
    pub fn next_event(&mut self) -> io::Result<Option<String>> {
        loop {
            let rest = &self.body[self.pos..];
            let Some(end) = find_event_end(rest) else {
                if rest.len() > MAX_EVENT {
                    return Err(invalid("event larger than the tool's limit"));
                }
                // Compact once the consumed part is the larger one.
                if self.pos > 0 && self.pos * 2 >= self.body.len() {
                    self.body.drain(..self.pos);
                    self.pos = 0;
                }
                return Ok(None);
            };
            let event = &rest[..end.0];
            self.pos += end.1;
            if let Some(frame) = event_data(event) {
                return Ok(Some(frame));
            }
        }
    }

    /// The chunked body ended (its last chunk came).
    pub fn done(&self) -> bool {
        self.chunk == Some(Chunk::Done)
    }
}

/// The end of the first event in `buf`: (its length, the length with the
/// blank line after it).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while let Some(nl) = buf[i..].iter().position(|&b| b == b'\n') {
        let at = i + nl;
        match buf.get(at + 1) {
            Some(b'\n') => return Some((at, at + 2)),
            Some(b'\r') if buf.get(at + 2) == Some(&b'\n') => return Some((at, at + 3)),
            _ => i = at + 1,
        }
    }
    None
}

/// The frame an event carries: its `data` lines joined with `\n`; `None`
/// for an event without data (a comment).
pub fn event_data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let Some(value) = line.strip_prefix("data") else {
            continue;
        };
        let value = match value.strip_prefix(':') {
            Some(v) => v.strip_prefix(' ').unwrap_or(v),
            None if value.is_empty() => "",
            None => continue,
        };
        match &mut data {
            Some(d) => {
                d.push('\n');
                d.push_str(value);
            }
            None => data = Some(value.to_owned()),
        }
    }
    data
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

impl Stream for Sse {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.events.next_event() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(Message::text(frame)))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(WsError::Io(e)))),
            }
            if this.eof || this.events.done() {
                return Poll::Ready(None);
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(WsError::Io(e)))),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                    }
                    let filled = rb.filled().len();
                    if let Err(e) = this.events.take_in(&chunk[..filled]) {
                        return Poll::Ready(Some(Err(WsError::Io(e))));
                    }
                }
            }
        }
    }
}

/// A response head: its status and whether the body is chunked.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// HTTP status.
    pub status: u16,
    /// `Transfer-Encoding: chunked`.
    pub chunked: bool,
}

/// Parse a complete response head (up to and including the blank line).
pub fn parse_head(head: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()?
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
        })
    });
    Some(Head { status, chunked })
}

/// Read a response head off `io`: the head and what came after it.
pub async fn read_head<R: AsyncRead + Unpin>(io: &mut R) -> Result<(Head, Vec<u8>), ConnectError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse_head(&buf[..end + 4])
                .ok_or_else(|| ConnectError::Protocol("bad HTTP response head".to_owned()))?;
            return Ok((head, buf.split_off(end + 4)));
        }
        if buf.len() > MAX_HEAD {
            return Err(ConnectError::Protocol(
                "HTTP response head too long".to_owned(),
            ));
        }
        let mut chunk = [0u8; 4096];
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| ConnectError::Io(e.kind().to_string()))?;
        if n == 0 {
            return Err(ConnectError::Closed(None));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The `GET /sse` request.
pub fn get_request(host: &str, token: &str, origin: Option<&str>) -> String {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    format!(
        "GET /sse HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n{origin}\r\n"
    )
}

/// A `POST /sse/{conn}` request carrying `body` (one client frame).
pub fn post_request(post: &PostTarget, body: &str) -> String {
    format!(
        "POST /sse/{} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        post.conn,
        post.host,
        post.token,
        body.len()
    )
}

/// Send `request` on `io` and read the answer's status (the connection is
/// then dropped).
pub async fn send_post<S: AsyncRead + tokio::io::AsyncWrite + Unpin>(
    io: &mut S,
    request: &str,
) -> Result<u16, ConnectError> {
    io.write_all(request.as_bytes())
        .await
        .map_err(|e| ConnectError::Io(e.kind().to_string()))?;
    let (head, _) = read_head(io).await?;
    Ok(head.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_and_their_data_joined() {
        assert_eq!(event_data(b"data: {\"a\":1}"), Some("{\"a\":1}".to_owned()));
        assert_eq!(event_data(b"data:x\r\ndata: y"), Some("x\ny".to_owned()));
        assert_eq!(event_data(b":"), None);
        assert_eq!(event_data(b": keep-alive"), None);
        assert_eq!(
            event_data(b"event: m\ndata: z\nid: 3"),
            Some("z".to_owned())
        );
        assert_eq!(find_event_end(b"data: a\n\ndata: b"), Some((7, 9)));
        assert_eq!(find_event_end(b"data: a\r\n\r\n"), Some((8, 11)));
        assert_eq!(find_event_end(b"data: a\n"), None);
    }

    #[test]
    fn heads_parse() {
        let h = parse_head(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(
            h,
            Some(Head {
                status: 200,
                chunked: true
            })
        );
        let h = parse_head(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(
            h,
            Some(Head {
                status: 401,
                chunked: false
            })
        );
        assert_eq!(parse_head(b"SSH-2.0\r\n\r\n"), None);
    }

    #[test]
    fn chunked_bodies_are_cut_into_frames_whatever_the_reads() {
        let events = "data: {\"type\":\"welcome\"}\n\n:\n\ndata: {\"seq\":1}\n\n";
        // Chunks of 5 and the rest, then the last chunk.
        let (a, b) = events.split_at(5);
        let body = format!("5\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n", b.len());
        for step in [1, 3, 7, body.len()] {
            let mut r = EventReader::new(true);
            let mut got = Vec::new();
            for piece in body.as_bytes().chunks(step) {
                r.take_in(piece).unwrap();
                while let Some(f) = r.next_event().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(
                got,
                ["{\"type\":\"welcome\"}", "{\"seq\":1}"],
                "step {step}"
            );
            assert!(r.done());
        }
        let mut plain = EventReader::new(false);
        plain.take_in(b"data: x\n\ndata: y\n").unwrap();
        assert_eq!(plain.next_event().unwrap(), Some("x".to_owned()));
        assert_eq!(plain.next_event().unwrap(), None);
        plain.take_in(b"\n").unwrap();
        assert_eq!(plain.next_event().unwrap(), Some("y".to_owned()));
        assert!(EventReader::new(true).take_in(b"zz\r\n").is_err());
    }
}
