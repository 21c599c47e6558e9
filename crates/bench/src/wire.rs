//! The client socket under tungstenite: counts the bytes read off the wire.
//!
//! With `--deflate` the connection also offers permessage-deflate; the
//! compressed messages are inflated by the client SDK's adapter
//! ([`wsgate_client::inflate::Inflating`]), which sits above this counter,
//! so the count is what the wire carried, before inflating.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use wsgate_client::inflate::{Inflating, OFFER as DEFLATE_OFFER};

/// A client TCP stream that counts what it reads, under the inflating
/// adapter (which passes everything through when nothing was negotiated).
pub type WireStream = Inflating<Counted>;

/// Wrap `inner`, counting the bytes it reads into `rx`.
pub fn wire_stream(inner: TcpStream, rx: Arc<AtomicU64>) -> WireStream {
    Inflating::new(counted(inner, rx))
}

/// `inner`, counting the bytes it reads into `rx` (no inflating: SSE).
pub fn counted(inner: TcpStream, rx: Arc<AtomicU64>) -> Counted {
    Counted { inner, rx }
}

/// A TCP stream that adds the bytes it reads to a shared counter.
pub struct Counted {
    inner: TcpStream,
    rx: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            this.rx
                .fetch_add((buf.filled().len() - before) as u64, Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted {
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
