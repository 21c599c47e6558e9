//! permessage-deflate (RFC 7692) on the receiving side, under tungstenite.
//!
//! tungstenite 0.29 has no permessage-deflate and fails a connection on a
//! frame with RSV1 set, so the client offers the extension itself and puts
//! this byte-stream adapter between the socket (plain or TLS) and
//! tungstenite: it passes the HTTP handshake through, notes whether the
//! server's `101` accepted `permessage-deflate`, and from then on rewrites
//! every compressed message (RSV1 on its first frame) into one plain,
//! unfragmented frame of the inflated payload. Everything else (plain
//! frames, control frames, writes) passes through unchanged, so tungstenite
//! sees an ordinary WebSocket. The client never compresses what it sends
//! (RFC 7692 lets each side choose per message), so no deflater is needed.
//!
//! The offer asks for `server_no_context_takeover`: each server message
//! inflates on its own, with a reset inflater. Inflation is bounded by
//! [`MAX_INFLATED`]: a message inflating beyond it fails the connection
//! instead of allocating without limit.
//!
//! Public for other tools that drive tungstenite themselves against wsgate
//! (the load tool `wsgate-bench` uses it under its byte counter).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use flate2::{Decompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The `Sec-WebSocket-Extensions` value the client offers.
pub const OFFER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The largest message the client inflates (tungstenite's own default
/// message limit).
pub const MAX_INFLATED: usize = 64 << 20;

/// The longest handshake answer head read before giving up on parsing it.
const MAX_HEAD: usize = 64 << 10;

/// The trailer RFC 7692 7.2.2 says a receiver appends before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

enum Mode {
    /// Reading the handshake answer's head.
    Head,
    /// The server did not accept the extension: pass everything through.
    Plain,
    /// Rewriting compressed messages.
    Inflating,
}

/// A compressed message whose frames are still arriving.
struct Partial {
    opcode: u8,
    payload: Vec<u8>,
}

/// The adapter; see the module docs. Wrap a fresh connection with
/// [`Inflating::new`], offer [`OFFER`] in the upgrade request, and run the
/// WebSocket handshake over it.
pub struct Inflating<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from `inner` and not yet processed.
    raw: Vec<u8>,
    /// Processed bytes waiting for the reader, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    partial: Option<Partial>,
    inflater: Option<Decompress>,
    eof: bool,
}

impl<S> Inflating<S> {
    /// Wrap a fresh connection, before the WebSocket handshake.
    pub fn new(inner: S) -> Self {
        Inflating {
            inner,
            mode: Mode::Head,
            raw: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            partial: None,
            inflater: None,
            eof: false,
        }
    }

    /// Whether the server accepted permessage-deflate (known once the
    /// handshake answer has been read).
    pub fn negotiated(&self) -> bool {
        matches!(self.mode, Mode::Inflating)
    }

    /// Move what can be processed from `raw` to `out`.
    fn process(&mut self) -> io::Result<()> {
        if let Mode::Head = self.mode {
            let Some(end) = find(&self.raw, b"\r\n\r\n") else {
                if self.raw.len() > MAX_HEAD || self.eof {
                    // Not an answer we can read: let tungstenite judge it.
                    self.mode = Mode::Plain;
                }
                return self.pass_all();
            };
            let head = &self.raw[..end + 4];
            self.mode = if accepts_deflate(head) {
                Mode::Inflating
            } else {
                Mode::Plain
            };
            self.out.extend_from_slice(head);
            self.raw.drain(..end + 4);
        }
        match self.mode {
            Mode::Inflating => self.frames(),
            _ => self.pass_all(),
        }
    }

    fn pass_all(&mut self) -> io::Result<()> {
        if !matches!(self.mode, Mode::Head) {
            self.out.append(&mut self.raw);
        }
        Ok(())
    }

    /// Rewrite every complete frame in `raw`.
    fn frames(&mut self) -> io::Result<()> {
        let mut at = 0;
        while let Some((head_len, len)) = frame_len(&self.raw[at..])? {
            let total = head_len + len;
            if self.raw.len() - at < total {
                break;
            }
            let b0 = self.raw[at];
            let masked = self.raw[at + 1] & 0x80 != 0;
            let opcode = b0 & 0x0f;
            let fin = b0 & 0x80 != 0;
            let rsv1 = b0 & 0x40 != 0;
            let control = opcode >= 8;
            if !control && (rsv1 || self.partial.is_some()) && !masked {
                let payload = &self.raw[at + head_len..at + total];
                let partial = self.partial.get_or_insert_with(|| Partial {
                    opcode,
                    payload: Vec::new(),
                });
                if partial.payload.len() + payload.len() > MAX_INFLATED {
                    return Err(invalid("compressed message larger than the client's limit"));
                }
                partial.payload.extend_from_slice(payload);
                if fin {
                    if let Some(p) = self.partial.take() {
                        let data = inflate(
                            self.inflater.get_or_insert_with(|| Decompress::new(false)),
                            &p.payload,
                            MAX_INFLATED,
                        )?;
                        put_frame(&mut self.out, p.opcode, &data);
                    }
                }
            } else {
                // Plain frames, control frames (which may sit between the
                // fragments of a message): unchanged.
                self.out.extend_from_slice(&self.raw[at..at + total]);
            }
            at += total;
        }
        self.raw.drain(..at);
        Ok(())
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether a `101` head's `Sec-WebSocket-Extensions` accepts
/// permessage-deflate.
fn accepts_deflate(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        name.trim().eq_ignore_ascii_case("sec-websocket-extensions")
            && value
                .split(',')
                .any(|ext| ext.split(';').next().map(str::trim) == Some("permessage-deflate"))
    })
}

/// A frame's header length and payload length, once its header is complete.
fn frame_len(buf: &[u8]) -> io::Result<Option<(usize, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mask = if buf[1] & 0x80 != 0 { 4 } else { 0 };
    let (ext, len) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (2, u64::from(u16::from_be_bytes([buf[2], buf[3]])))
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (8, u64::from_be_bytes(b))
        }
        n => (0, u64::from(n)),
    };
    let len = usize::try_from(len).map_err(|_| invalid("frame length out of range"))?;
    if len > MAX_INFLATED {
        return Err(invalid("frame larger than the client's message limit"));
    }
    Ok(Some((2 + ext + mask, len)))
}

/// Inflate one message (no context takeover: the inflater is reset).
fn inflate(inflater: &mut Decompress, payload: &[u8], limit: usize) -> io::Result<Vec<u8>> {
    inflater.reset(false);
    let mut out = Vec::with_capacity((payload.len() * 4).clamp(64, 64 << 10).min(limit + 1));
    for input in [payload, &TAIL[..]] {
        let mut input = input;
        loop {
            if out.len() == out.capacity() {
                if out.len() > limit {
                    return Err(invalid(
                        "compressed message inflates past the client's limit",
                    ));
                }
                out.reserve_exact(out.len().min(limit + 1 - out.len()).max(1));
            }
            let (before_in, before_out) = (inflater.total_in(), out.len());
            let status = inflater
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
                .map_err(|_| invalid("corrupt compressed message"))?;
            let used = usize::try_from(inflater.total_in() - before_in).unwrap_or(input.len());
            input = &input[used.min(input.len())..];
            let stuck = used == 0 && out.len() == before_out;
            if matches!(status, Status::StreamEnd)
                || stuck
                || (input.is_empty() && out.len() < out.capacity())
            {
                break;
            }
        }
    }
    if out.len() > limit {
        return Err(invalid(
            "compressed message inflates past the client's limit",
        ));
    }
    Ok(out)
}

/// Append a server-style (unmasked, final) frame.
fn put_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

impl<S: AsyncRead + Unpin> AsyncRead for Inflating<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Whatever is left is an incomplete frame: end the stream
                // and let tungstenite report the truncated connection.
                return Poll::Ready(Ok(()));
            }
            if matches!(this.mode, Mode::Plain) && this.raw.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                    }
                    this.raw.extend_from_slice(rb.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inflating<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};
    use tokio::io::AsyncReadExt;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(data.len() + 64);
        c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
        assert!(out.ends_with(&TAIL));
        out.truncate(out.len() - 4);
        out
    }

    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        put_frame(&mut f, 0, payload);
        f[0] = b0;
        f
    }

    const HEAD: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n\r\n";

    /// Feed `input` one byte at a time (the worst split) and read all.
    async fn run(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut tx, rx) = tokio::io::duplex(16);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in input {
                if tx.write_all(&[b]).await.is_err() {
                    break;
                }
            }
        });
        let mut out = Vec::new();
        let mut s = Inflating::new(rx);
        let r = s.read_to_end(&mut out).await;
        writer.await.unwrap();
        r.map(|_| out)
    }

    #[tokio::test]
    async fn compressed_messages_become_plain_frames_and_the_rest_passes_through() {
        let text = br#"{"type":"message","data":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#;
        let z = deflate(text);
        let mut input = HEAD.to_vec();
        input.extend(frame(0x81, b"plain"));
        input.extend(frame(0xC1, &z));
        // A fragmented compressed message with a Ping between its frames.
        let (a, b) = z.split_at(z.len() / 2);
        input.extend(frame(0x41, a));
        input.extend(frame(0x89, b"p"));
        input.extend(frame(0x80, b));
        let out = run(input).await.unwrap();
        let mut want = HEAD.to_vec();
        want.extend(frame(0x81, b"plain"));
        want.extend(frame(0x81, text));
        want.extend(frame(0x89, b"p"));
        want.extend(frame(0x81, text));
        assert_eq!(out, want);
    }

    #[tokio::test]
    async fn without_the_extension_in_the_answer_nothing_is_rewritten() {
        let mut input = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
        // An RSV1 frame here is the server's error; tungstenite must see it.
        input.extend(frame(0xC1, b"xyz"));
        let out = run(input.clone()).await.unwrap();
        assert_eq!(out, input);
    }

    #[tokio::test]
    async fn corrupt_data_and_bombs_fail_the_stream() {
        let mut input = HEAD.to_vec();
        input.extend(frame(0xC1, &[0xff, 0xff, 0xff, 0xff, 0x00]));
        let e = run(input).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        let mut inflater = Decompress::new(false);
        let bomb = deflate(&vec![b'a'; 1 << 20]);
        assert!(bomb.len() < 2048);
        let e = inflate(&mut inflater, &bomb, 64 << 10).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
        // The same inflater, reset, still inflates a good message.
        let ok = inflate(&mut inflater, &deflate(b"hello"), 64 << 10).unwrap();
        assert_eq!(ok, b"hello");
    }

    #[test]
    fn the_answer_is_parsed_case_insensitively_and_among_others() {
        assert!(accepts_deflate(
            b"HTTP/1.1 101 x\r\nsec-websocket-extensions: x-foo, permessage-deflate\r\n\r\n"
        ));
        assert!(!accepts_deflate(
            b"HTTP/1.1 101 x\r\nSec-WebSocket-Extensions: x-permessage-deflate\r\n\r\n"
        ));
    }
}
