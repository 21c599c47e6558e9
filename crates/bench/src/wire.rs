//! The client socket under tungstenite: counts the bytes read off the wire
//! and, when the connection offered `permessage-deflate` (RFC 7692), turns
//! compressed server messages back into plain frames.
//!
//! tungstenite 0.29 has no permessage-deflate: it refuses any frame with
//! RSV1 set. So this layer sits between the TCP socket and tungstenite:
//! it passes the HTTP response head through (noting whether the server
//! accepted the extension), then parses server frames; a message whose first
//! frame has RSV1 set is inflated (flate2, raw deflate with the
//! `00 00 ff ff` tail put back, a fresh window per message as
//! `server_no_context_takeover` asks) and handed up as one plain frame.
//! Plain frames and control frames pass through unchanged. Client frames
//! are sent uncompressed, which the extension allows.
//!
//! The byte count is taken before inflating: it is what the wire carried.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use flate2::{Decompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::floor::frame_header;

/// The offer a `--deflate` client sends.
pub const DEFLATE_OFFER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// Largest message inflated (and largest compressed message buffered).
const MAX_MESSAGE: usize = 16 << 20;
/// Largest response head looked at before giving up on finding its end.
const MAX_HEAD: usize = 16 << 10;

/// A client TCP stream that counts what it reads and inflates compressed messages.
pub struct WireStream {
    inner: TcpStream,
    rx: Option<Arc<AtomicU64>>,
    inflate: Option<Box<Inflater>>,
}

impl WireStream {
    /// Wrap `inner`; `rx` counts bytes read; `deflate`: the handshake offers
    /// permessage-deflate, so compressed messages may come.
    pub fn new(inner: TcpStream, rx: Option<Arc<AtomicU64>>, deflate: bool) -> WireStream {
        WireStream {
            inner,
            rx,
            inflate: deflate.then(Box::default),
        }
    }

    /// Whether the server's 101 accepted permessage-deflate.
    pub fn deflate_negotiated(&self) -> bool {
        self.inflate.as_ref().is_some_and(|i| i.negotiated)
    }
}

/// Turns the raw byte stream into one with plain frames only.
#[derive(Default)]
pub struct Inflater {
    head_done: bool,
    negotiated: bool,
    raw: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    /// Opcode and compressed bytes of a fragmented compressed message.
    partial: Option<(u8, Vec<u8>)>,
    decompress: Option<Decompress>,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

impl Inflater {
    /// Take `bytes` read from the socket; complete units move to the output.
    pub fn feed(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.raw.extend_from_slice(bytes);
        if !self.head_done {
            match self.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(i) => {
                    let head = String::from_utf8_lossy(&self.raw[..i + 4]).to_ascii_lowercase();
                    self.negotiated = head.lines().any(|l| {
                        l.starts_with("sec-websocket-extensions:")
                            && l.contains("permessage-deflate")
                    });
                    self.out.extend(self.raw.drain(..i + 4));
                    self.head_done = true;
                }
                None if self.raw.len() > MAX_HEAD => return Err(bad("response head too long")),
                None => return Ok(()),
            }
        }
        while let Some((at, len)) = frame_bounds(&self.raw)? {
            let (b0, end) = (self.raw[0], at + len);
            let (fin, rsv1, opcode) = (b0 & 0x80 != 0, b0 & 0x40 != 0, b0 & 0x0f);
            if opcode >= 0x8 || (!rsv1 && self.partial.is_none()) {
                // Control frames and plain data frames go up as they are.
                self.out.extend_from_slice(&self.raw[..end]);
            } else if rsv1 && opcode == 0 {
                return Err(bad("RSV1 on a continuation frame"));
            } else {
                let (op, mut compressed) = match (self.partial.take(), opcode) {
                    (None, op) if op != 0 => (op, Vec::new()),
                    (Some(p), 0) => p,
                    _ => return Err(bad("unexpected frame inside a compressed message")),
                };
                compressed.extend_from_slice(&self.raw[at..end]);
                if compressed.len() > MAX_MESSAGE {
                    return Err(bad("compressed message too large"));
                }
                if fin {
                    let plain = self.inflate(&compressed)?;
                    self.out.extend_from_slice(&frame_header(op, plain.len()));
                    self.out.extend_from_slice(&plain);
                } else {
                    self.partial = Some((op, compressed));
                }
            }
            self.raw.drain(..end);
        }
        Ok(())
    }

    fn inflate(&mut self, compressed: &[u8]) -> io::Result<Vec<u8>> {
        let d = self
            .decompress
            .get_or_insert_with(|| Decompress::new(false));
        d.reset(false);
        let mut input = Vec::with_capacity(compressed.len() + 4);
        input.extend_from_slice(compressed);
        input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
        let mut out = Vec::with_capacity(compressed.len() * 4 + 64);
        let mut consumed = 0usize;
        // Bounded: every round consumes input or fills spare room, and the
        // output is capped.
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity().max(4096));
            }
            let (in0, out0) = (d.total_in(), d.total_out());
            d.decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                .map_err(|e| bad(&format!("inflate: {e}")))?;
            consumed += (d.total_in() - in0) as usize;
            let progressed = d.total_in() != in0 || d.total_out() != out0;
            if out.len() > MAX_MESSAGE {
                return Err(bad("inflated message too large"));
            }
            if consumed >= input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if !progressed {
                return Err(bad("inflate made no progress"));
            }
        }
    }

    /// Copy pending output into `buf`; true when something was copied.
    fn drain_into(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let pending = &self.out[self.out_pos..];
        if pending.is_empty() {
            return false;
        }
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        self.out_pos += n;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        true
    }

    /// The output so far (tests).
    pub fn output(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// Whether the head accepted the extension.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }
}

/// Payload offset and length of the first complete frame in `raw`.
fn frame_bounds(raw: &[u8]) -> io::Result<Option<(usize, usize)>> {
    if raw.len() < 2 {
        return Ok(None);
    }
    let masked = raw[1] & 0x80 != 0;
    let (len, at) = match raw[1] & 0x7f {
        126 if raw.len() >= 4 => (u64::from(u16::from_be_bytes([raw[2], raw[3]])), 4),
        127 if raw.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    if masked {
        return Err(bad("masked server frame"));
    }
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_MESSAGE)
        .ok_or_else(|| bad("server frame too large"))?;
    Ok((raw.len() >= at + len).then_some((at, len)))
}

impl AsyncRead for WireStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(inflater) = this.inflate.as_mut() else {
            let before = buf.filled().len();
            let r = Pin::new(&mut this.inner).poll_read(cx, buf);
            if let (Some(rx), Poll::Ready(Ok(()))) = (&this.rx, &r) {
                rx.fetch_add((buf.filled().len() - before) as u64, Relaxed);
            }
            return r;
        };
        // Bounded: each round either returns or reads more from the socket.
        loop {
            if inflater.drain_into(buf) {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(())); // end of stream
                    }
                    if let Some(rx) = &this.rx {
                        rx.fetch_add(n as u64, Relaxed);
                    }
                    inflater.feed(rb.filled())?;
                }
            }
        }
    }
}

impl AsyncWrite for WireStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn deflate(text: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(text.len() + 64);
        c.compress_vec(text, &mut out, FlushCompress::Sync).unwrap();
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }

    const HEAD: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n";

    #[test]
    fn compressed_messages_come_out_plain() {
        let text = br#"{"type":"message","room":"r","seq":1,"data":{"v":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}}"#;
        let z = deflate(text);
        let mut wire = HEAD.to_vec();
        let mut f = frame_header(0x1, z.len());
        f[0] |= 0x40;
        wire.extend_from_slice(&f);
        wire.extend_from_slice(&z);
        // A fragmented compressed message: RSV1 on the first frame only.
        let (a, b) = z.split_at(z.len() / 2);
        let mut f1 = frame_header(0x1, a.len());
        f1[0] = 0x40 | 0x1; // not final
        wire.extend_from_slice(&f1);
        wire.extend_from_slice(a);
        wire.extend_from_slice(&frame_header(0x0, b.len()));
        wire.extend_from_slice(b);
        // A plain frame and a ping pass through.
        wire.extend_from_slice(&frame_header(0x1, 2));
        wire.extend_from_slice(b"{}");
        wire.extend_from_slice(&[0x89, 0x00]);

        let mut inf = Inflater::default();
        for byte in &wire {
            inf.feed(std::slice::from_ref(byte)).unwrap();
        }
        assert!(inf.negotiated());
        let mut want = HEAD.to_vec();
        for _ in 0..2 {
            want.extend_from_slice(&frame_header(0x1, text.len()));
            want.extend_from_slice(text);
        }
        want.extend_from_slice(&frame_header(0x1, 2));
        want.extend_from_slice(b"{}");
        want.extend_from_slice(&[0x89, 0x00]);
        assert_eq!(inf.output(), &want[..]);
    }

    #[test]
    fn plain_server_and_bad_frames() {
        let mut inf = Inflater::default();
        inf.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .unwrap();
        assert!(!inf.negotiated());
        let mut f = frame_header(0x1, 3);
        f[0] |= 0x40;
        f.extend_from_slice(b"xyz"); // not deflate data
        assert!(inf.feed(&f).is_err());
        let mut inf = Inflater::default();
        inf.feed(HEAD).unwrap();
        assert!(inf.feed(&[0x81, 0x85, 1, 2, 3, 4, 0]).is_err(), "masked");
    }
}
