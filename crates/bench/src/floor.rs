//! `floor-server`: the least a server can do to deliver a fan-out, measured
//! with the same clients, pinning and `/proc` CPU reading as the gateway.
//!
//! No framework: one thread, a current-thread tokio runtime for readiness
//! only. It answers the WebSocket handshake by hand (request head,
//! `Sec-WebSocket-Key`, 101 with the computed accept key; no auth, no
//! extension), sends the minimal `welcome`, answers `join` with `joined`, and
//! for every `publish` encodes the room `message` frame **once** (the same
//! shape and size as a wsgate frame: [`MessageParts`]) and hands the ready
//! bytes to each member's socket with one non-blocking `write()`. Only a
//! short write leaves bytes in that member's queue, which its own task
//! flushes when the socket is writable. The publisher gets an `ack`.
//!
//! Everything `wsgate-bench fanout` (or `rooms`) needs works against it, so
//! the tool's figures (CPU per delivery from `--pid`) are directly the floor
//! under the gateway's. It is a measuring stick, not a server: no
//! heartbeat, no history, no limits besides frame size and a queue cap.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::value::RawValue;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use wsgate_protocol::MessageParts;

/// Largest request head.
const MAX_HEAD: usize = 8 << 10;
/// Largest client frame payload.
const MAX_FRAME: usize = 1 << 20;
/// A member whose unsent bytes pass this is disconnected (the slow-consumer rule).
const MAX_QUEUED: usize = 16 << 20;

/// The header of an unmasked, final server frame of `opcode` with `len` payload bytes.
pub fn frame_header(opcode: u8, len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(10);
    h.push(0x80 | opcode);
    if len < 126 {
        h.push(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        h.push(126);
        h.extend_from_slice(&short.to_be_bytes());
    } else {
        h.push(127);
        h.extend_from_slice(&(len as u64).to_be_bytes());
    }
    h
}

/// A complete unmasked text frame carrying `text`.
pub fn text_frame(text: &str) -> Vec<u8> {
    let mut f = frame_header(0x1, text.len());
    f.extend_from_slice(text.as_bytes());
    f
}

/// One client frame, unmasked.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientFrame {
    /// FIN bit.
    pub fin: bool,
    /// Opcode.
    pub opcode: u8,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

/// Take one client frame off the front of `buf`: `Ok(None)` while incomplete,
/// an error for an unmasked or oversized frame.
pub fn take_client_frame(buf: &mut Vec<u8>) -> Result<Option<ClientFrame>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b1 & 0x80 == 0 {
        return Err("client frame not masked");
    }
    if b0 & 0x70 != 0 {
        return Err("reserved bits set");
    }
    let (len, mut at) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (
                usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX),
                10,
            )
        }
        126 | 127 => return Ok(None),
        n => (usize::from(n), 2),
    };
    if len > MAX_FRAME {
        return Err("frame too large");
    }
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    at += 4;
    let mut payload = buf[at..at + len].to_vec();
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    buf.drain(..at + len);
    Ok(Some(ClientFrame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        payload,
    }))
}

/// The `Sec-WebSocket-Key` of a complete upgrade request head.
pub fn websocket_key(head: &[u8]) -> Option<&str> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let request = lines.next()?;
    if !request.starts_with("GET ") {
        return None;
    }
    lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim())
    })
}

/// One connection: its socket and the bytes a short write left behind.
struct Conn {
    stream: TcpStream,
    queued: RefCell<Vec<u8>>,
    /// How much of `queued` is already written.
    sent: std::cell::Cell<usize>,
    wake: Notify,
    dead: std::cell::Cell<bool>,
}

impl Conn {
    /// Hand `bytes` to the socket: one `write()` when nothing is queued,
    /// otherwise (or for what a short write left) the queue.
    fn send(&self, bytes: &[u8]) {
        if self.dead.get() {
            return;
        }
        let mut queued = self.queued.borrow_mut();
        let written = if queued.is_empty() {
            // One send() on the non-blocking socket, without tokio's
            // readiness bookkeeping (a WouldBlock here leaves its readiness
            // stale: the member's task then finds out with one try_write).
            match SockRef::from(&self.stream).send(bytes) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(_) => {
                    self.dead.set(true);
                    self.wake.notify_one();
                    return;
                }
            }
        } else {
            0
        };
        if written < bytes.len() {
            if queued.len() - self.sent.get() + bytes.len() - written > MAX_QUEUED {
                self.dead.set(true);
            } else {
                queued.extend_from_slice(&bytes[written..]);
            }
            self.wake.notify_one();
        }
    }
}

#[derive(Default)]
struct Room {
    seq: u64,
    members: Vec<Rc<Conn>>,
}

#[derive(Default)]
struct State {
    rooms: HashMap<String, Room>,
    conns: u64,
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    room: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Bind `listen`, print `listening <addr>` on stdout, and serve until killed.
pub fn serve(listen: SocketAddr) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("cannot start the runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let mut out = io::stdout().lock();
        writeln!(out, "listening {addr}")?;
        out.flush()?;
        drop(out);
        let state = Rc::new(RefCell::new(State::default()));
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                // Out of descriptors and the like: keep serving the others.
                Err(_) => continue,
            };
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            tokio::task::spawn_local(async move {
                let _ = connection(stream, state).await;
            });
        }
    })
}

async fn connection(mut stream: TcpStream, state: Rc<RefCell<State>>) -> io::Result<()> {
    // The request head, then 101.
    let mut buf = Vec::with_capacity(1024);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD || stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    };
    let Some(key) = websocket_key(&buf[..end]) else {
        stream
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await?;
        return Ok(());
    };
    let accept = derive_accept_key(key.as_bytes());
    buf.drain(..end);
    let id = {
        let mut s = state.borrow_mut();
        s.conns += 1;
        s.conns
    };
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    stream.write_all(reply.as_bytes()).await?;
    stream
        .write_all(&text_frame(&format!(
            r#"{{"type":"welcome","conn":"f{id}","user":"floor","node":"floor","heartbeat_ms":0}}"#
        )))
        .await?;
    let conn = Rc::new(Conn {
        stream,
        queued: RefCell::new(Vec::new()),
        sent: std::cell::Cell::new(0),
        wake: Notify::new(),
        dead: std::cell::Cell::new(false),
    });
    let mut joined: Vec<String> = Vec::new();
    let result = session(&conn, &state, &mut buf, &mut joined).await;
    let mut s = state.borrow_mut();
    for room in joined {
        if let Some(r) = s.rooms.get_mut(&room) {
            r.members.retain(|m| !Rc::ptr_eq(m, &conn));
        }
    }
    result
}

async fn session(
    conn: &Rc<Conn>,
    state: &Rc<RefCell<State>>,
    buf: &mut Vec<u8>,
    joined: &mut Vec<String>,
) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        // Frames already read.
        loop {
            match take_client_frame(buf) {
                Ok(Some(f)) => match f.opcode {
                    0x8 => {
                        conn.send(&[0x88, 0x02, 0x03, 0xe8]);
                        return Ok(());
                    }
                    0x1 if f.fin => handle_text(conn, state, &f.payload, joined),
                    0x9 | 0xA => {}
                    _ => {
                        conn.send(&[0x88, 0x02, 0x03, 0xeb]); // 1003: not supported here
                        return Ok(());
                    }
                },
                Ok(None) => break,
                Err(_) => {
                    conn.send(&[0x88, 0x02, 0x03, 0xea]); // 1002
                    return Ok(());
                }
            }
        }
        if conn.dead.get() {
            return Ok(());
        }
        let has_queue = !conn.queued.borrow().is_empty();
        tokio::select! {
            r = conn.stream.readable() => {
                r?;
                match conn.stream.try_read(&mut chunk) {
                    Ok(0) => return Ok(()),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            r = conn.stream.writable(), if has_queue => {
                r?;
                let mut queued = conn.queued.borrow_mut();
                let mut sent = conn.sent.get();
                match conn.stream.try_write(&queued[sent..]) {
                    Ok(n) => {
                        // Compact only once half is sent: no memmove of a
                        // long backlog per short write.
                        sent += n;
                        if sent == queued.len() {
                            queued.clear();
                            sent = 0;
                        } else if sent > queued.len() / 2 {
                            queued.drain(..sent);
                            sent = 0;
                        }
                        conn.sent.set(sent);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            _ = conn.wake.notified() => {}
        }
    }
}

fn handle_text(conn: &Rc<Conn>, state: &Rc<RefCell<State>>, text: &[u8], joined: &mut Vec<String>) {
    let Ok(frame) = serde_json::from_slice::<Incoming<'_>>(text) else {
        conn.send(&text_frame(
            r#"{"type":"error","code":"bad_request","message":"not a frame the floor server knows"}"#,
        ));
        return;
    };
    let id = frame
        .id
        .map(|i| format!(r#","id":{}"#, i.get()))
        .unwrap_or_default();
    let Some(room) = frame.room else { return };
    let room_json = serde_json::to_string(&room).unwrap_or_default();
    let mut s = state.borrow_mut();
    match frame.kind {
        "join" => {
            let r = s.rooms.entry(room.clone()).or_default();
            if !r.members.iter().any(|m| Rc::ptr_eq(m, conn)) {
                r.members.push(conn.clone());
                joined.push(room);
            }
            conn.send(&text_frame(&format!(
                r#"{{"type":"joined","room":{room_json},"seq":{},"epoch":"floor"{id}}}"#,
                r.seq
            )));
        }
        "publish" => {
            let Some(data) = frame.data else { return };
            let r = s.rooms.entry(room.clone()).or_default();
            r.seq += 1;
            // Encoded once per message; every member gets the same bytes.
            let text = MessageParts::new(&room, "floor", data, now_ms()).frame(r.seq);
            let wire = text_frame(&text);
            for member in &r.members {
                member.send(&wire);
            }
            conn.send(&text_frame(&format!(
                r#"{{"type":"ack"{id},"room":{room_json},"seq":{}}}"#,
                r.seq
            )));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut f = frame_header(opcode, payload.len());
        f[1] |= 0x80;
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn client_frames_parse_whole_and_in_pieces() {
        for len in [5usize, 200, 70_000] {
            let payload = vec![b'a'; len];
            let wire = masked(0x1, &payload);
            let mut buf = wire[..wire.len() - 1].to_vec();
            assert_eq!(take_client_frame(&mut buf), Ok(None));
            buf.push(*wire.last().unwrap());
            buf.extend_from_slice(&masked(0x8, b""));
            let f = take_client_frame(&mut buf).unwrap().unwrap();
            assert_eq!((f.fin, f.opcode, f.payload.len()), (true, 1, len));
            assert_eq!(take_client_frame(&mut buf).unwrap().unwrap().opcode, 8);
            assert!(buf.is_empty());
        }
        let mut unmasked = text_frame("hi");
        assert!(take_client_frame(&mut unmasked).is_err());
    }

    #[test]
    fn handshake_key_is_found() {
        let head =
            b"GET /ws HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        assert_eq!(websocket_key(head), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(
            derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(websocket_key(b"POST / HTTP/1.1\r\n\r\n"), None);
    }
}
