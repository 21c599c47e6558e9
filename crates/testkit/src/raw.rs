//! A WebSocket client written by hand over TCP, and its frame codec: for
//! what a real client refuses to do.

use crate::{Ended, WAIT};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// WebSocket opcodes, for [`RawWs`].
pub mod opcode {
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// A WebSocket client written by hand over TCP, for what a real client
/// refuses to do: send unmasked frames or invalid UTF-8, never answer a
/// Ping, never read. It does not answer anything by itself.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A TCP connection to `addr`, with a small socket receive buffer
/// (`SO_RCVBUF`) when given, so that a client that does not read backs the
/// server up quickly.
pub(crate) async fn connect_tcp(addr: SocketAddr, rcvbuf: Option<u32>) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).unwrap();
    }
    tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect timed out")
        .unwrap()
}

impl RawWs {
    /// Upgrade `GET /ws` on `addr` with `token` (header); panics unless 101.
    pub async fn connect(addr: SocketAddr, token: &str) -> RawWs {
        Self::connect_with(addr, token, None).await
    }

    /// Like [`connect`](Self::connect), with a small socket receive buffer
    /// (`SO_RCVBUF`) when given, so that a client that does not read backs
    /// the server up quickly.
    pub async fn connect_with(addr: SocketAddr, token: &str, rcvbuf: Option<u32>) -> RawWs {
        Self::upgrade(addr, token, rcvbuf, "").await.0
    }

    /// Like [`connect`](Self::connect), offering `extensions` in
    /// `Sec-WebSocket-Extensions`; also returns the 101 response head.
    pub async fn connect_offering(
        addr: SocketAddr,
        token: &str,
        extensions: &str,
    ) -> (RawWs, String) {
        let header = format!("Sec-WebSocket-Extensions: {extensions}\r\n");
        Self::upgrade(addr, token, None, &header).await
    }

    async fn upgrade(
        addr: SocketAddr,
        token: &str,
        rcvbuf: Option<u32>,
        extra_headers: &str,
    ) -> (RawWs, String) {
        let mut stream = connect_tcp(addr, rcvbuf).await;
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n{extra_headers}\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return i + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed during the upgrade");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("no upgrade response within the wait");
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        buf.drain(..head_end);
        (RawWs { stream, buf }, head)
    }

    /// Send one frame (FIN set), masked or not.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8], masked: bool) {
        self.send_raw(0x80 | opcode, payload, masked).await;
    }

    /// Send one frame whose first byte (FIN, RSV1-3, opcode) is `first`.
    pub async fn send_raw(&mut self, first: u8, payload: &[u8], masked: bool) {
        let mut frame = vec![first];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x37u8, 0xfa, 0x21, 0x3d];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        tokio::time::timeout(WAIT, self.stream.write_all(&frame))
            .await
            .expect("send timed out")
            .unwrap();
    }

    /// Send a masked text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(opcode::TEXT, text.as_bytes(), true).await;
    }

    async fn fill(&mut self, want: usize) -> bool {
        while self.buf.len() < want {
            let mut chunk = vec![0u8; 64 * 1024];
            let read = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("no data within the wait");
            match read {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    }

    /// The next frame as (opcode, payload); `None` when the TCP connection
    /// ended. Panics if nothing arrives within [`WAIT`].
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let (first, payload) = self.read_raw().await?;
        Some((first & 0x0f, payload))
    }

    /// Like [`read_frame`](Self::read_frame), with the whole first byte
    /// (FIN `0x80`, RSV1 `0x40`, RSV2, RSV3, opcode) instead of the opcode.
    pub async fn read_raw(&mut self) -> Option<(u8, Vec<u8>)> {
        if !self.fill(2).await {
            return None;
        }
        let first = self.buf[0];
        let masked = self.buf[1] & 0x80 != 0;
        let (len, at) = match self.buf[1] & 0x7f {
            126 => {
                if !self.fill(4).await {
                    return None;
                }
                (
                    usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                    4,
                )
            }
            127 => {
                if !self.fill(10).await {
                    return None;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (usize::from(n), 2),
        };
        assert!(!masked, "server frames are never masked");
        if !self.fill(at + len).await {
            return None;
        }
        let payload = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        Some((first, payload))
    }

    /// The next text frame as JSON, skipping Pings and Pongs; panics on
    /// anything else.
    pub async fn json(&mut self) -> serde_json::Value {
        loop {
            match self.read_frame().await {
                Some((opcode::TEXT, p)) => return serde_json::from_slice(&p).unwrap(),
                Some((opcode::PING | opcode::PONG, _)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Read until the connection ends: the close code if a Close frame came
    /// (1005 for one without a code), else [`Ended::Dropped`]. Every other
    /// frame is skipped, and nothing is answered.
    pub async fn ended(&mut self) -> Ended {
        loop {
            match self.read_frame().await {
                None => return Ended::Dropped,
                Some((opcode::CLOSE, p)) if p.len() >= 2 => {
                    return Ended::Close(u16::from_be_bytes([p[0], p[1]]))
                }
                Some((opcode::CLOSE, _)) => return Ended::Close(1005),
                Some(_) => continue,
            }
        }
    }

    /// After [`ended`](Self::ended) saw a Close frame: whether the server
    /// then dropped the TCP connection (EOF) without waiting for our reply.
    pub async fn dropped(&mut self) -> bool {
        loop {
            match self.read_frame().await {
                None => return true,
                Some(_) => continue,
            }
        }
    }
}
