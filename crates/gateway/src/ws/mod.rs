//! The WebSocket transport: the handshake's answer, the frame codec, and
//! the connection's I/O driven from its one task.

pub mod codec;
pub mod handshake;

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::outbound::{CloseReason, ConnHandle};
use crate::transport::{ClientEvent, Transport};
use codec::{Decoder, Incoming};

/// How long a closing connection may take to accept its last frames.
const WRITE_PATIENCE: Duration = Duration::from_secs(1);

/// Bytes read from the socket per read, into a buffer on the stack: an
/// idle connection holds no read buffer.
const READ_CHUNK: usize = 4096;

/// A TLS (or otherwise wrapped) stream: read and written by the task.
trait Stream: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> Stream for T {}

/// One WebSocket connection's transport.
pub struct WsTransport {
    handle: Arc<ConnHandle>,
    /// `None` on a plain TCP connection: its socket is in the handle.
    stream: Option<Pin<Box<dyn Stream>>>,
    decoder: Decoder,
    /// `--max-message-bytes`.
    max: usize,
}

impl WsTransport {
    /// The transport of an upgraded connection, with its handle. A plain
    /// TCP connection gets its socket back from hyper (with the bytes hyper
    /// read past the handshake), so that sends write into it directly.
    /// `compress_from`: permessage-deflate was negotiated, and text frames
    /// with a payload this long or longer are sent compressed.
    pub fn new(
        upgraded: Upgraded,
        id: &str,
        max_outbound: usize,
        max_message: usize,
        metrics: Arc<crate::metrics::Metrics>,
        compress_from: Option<usize>,
    ) -> (WsTransport, Arc<ConnHandle>) {
        let mut decoder = Decoder::new(compress_from.is_some());
        let (sock, stream) = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                decoder.extend(&parts.read_buf);
                (Some(parts.io.into_inner()), None)
            }
            Err(upgraded) => (
                None,
                Some(Box::pin(TokioIo::new(upgraded)) as Pin<Box<dyn Stream>>),
            ),
        };
        let encoding = codec::Encoding::Ws(compress_from.unwrap_or(usize::MAX));
        let handle = ConnHandle::with_socket(id, max_outbound, metrics, sock, encoding);
        let transport = WsTransport {
            handle: handle.clone(),
            stream,
            decoder,
            max: max_message,
        };
        (transport, handle)
    }

    fn stream(&mut self) -> Option<Pin<&mut (dyn AsyncWrite + Send)>> {
        self.stream
            .as_mut()
            .map(|s| s.as_mut() as Pin<&mut (dyn AsyncWrite + Send)>)
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        match self.stream.as_mut() {
            Some(s) => {
                let mut rb = ReadBuf::new(buf);
                match s.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
            None => self
                .handle
                .poll_read_tcp(cx, buf)
                .unwrap_or(Poll::Ready(Ok(0))),
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<ClientEvent> {
        let handle = self.handle.clone();
        if let Poll::Ready(Err(_)) = handle.poll_write(cx, self.stream()) {
            return Poll::Ready(ClientEvent::Gone);
        }
        // Bounded: a client that keeps sending yields after a while.
        for _ in 0..16 {
            match self.decoder.next(self.max) {
                Err(v) => {
                    return Poll::Ready(ClientEvent::Violation(CloseReason {
                        code: v.code,
                        reason: v.reason,
                    }))
                }
                Ok(Some(m)) => return Poll::Ready(self.incoming(m)),
                Ok(None) => {}
            }
            let mut buf = [0u8; READ_CHUNK];
            match self.poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(ClientEvent::Gone),
                Poll::Ready(Ok(n)) => self.decoder.extend(&buf[..n]),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn incoming(&mut self, m: Incoming) -> ClientEvent {
        match m {
            Incoming::Text(t) => ClientEvent::Text(t),
            Incoming::Binary => ClientEvent::Binary,
            Incoming::Ping(pong) => {
                self.handle.send_control(pong);
                ClientEvent::Activity
            }
            Incoming::Pong => ClientEvent::Activity,
            Incoming::Close(echo) => {
                // After our own Close this is the client's reply: nothing
                // more to send.
                if !self.handle.is_closing() {
                    self.handle.send_control(echo);
                }
                ClientEvent::Closed
            }
        }
    }

    /// Write the queue until it is empty, at most [`WRITE_PATIENCE`].
    async fn flush(&mut self) {
        let handle = self.handle.clone();
        let _ = tokio::time::timeout(
            WRITE_PATIENCE,
            poll_fn(|cx| handle.poll_write(cx, self.stream())),
        )
        .await;
    }
}

impl Transport for WsTransport {
    const NAME: &'static str = "ws";
    const ANSWERS_PINGS: bool = true;

    async fn next_event(&mut self) -> ClientEvent {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    async fn close(&mut self, reason: CloseReason) {
        self.handle
            .replace_queue(codec::close_frame(Some(reason.code), reason.reason));
        self.flush().await;
    }

    async fn finish(mut self) {
        self.flush().await;
        if let Some(mut s) = self.stream.take() {
            let _ =
                tokio::time::timeout(WRITE_PATIENCE, poll_fn(|cx| s.as_mut().poll_shutdown(cx)))
                    .await;
        }
        drop(self.handle.take_socket());
    }
}
