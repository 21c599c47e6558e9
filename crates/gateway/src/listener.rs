//! The public listener: accept loop, optional TLS, HTTP/1.1 with upgrades.
//!
//! Each accepted socket gets its own task that does the TLS handshake and
//! serves HTTP/1.1 (bounded by `--handshake-timeout` for the TLS handshake
//! and the request headers) until the connection upgrades to a WebSocket or
//! ends. Connections not upgraded yet (nor serving an SSE stream) are
//! capped by `--max-pending-connections`. The loop survives accept errors such as
//! `EMFILE`; the operations listener uses the same loop.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::http::{self, PeerAddr, PendingSlot};
use crate::metrics::Limit;
use crate::state::App;

/// Pending connections the kernel queues for `accept` (the system's
/// `somaxconn` may lower it): large, so that bursts of reconnects after a
/// node goes away are not dropped and retried a second later.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Bind a listener with [`LISTEN_BACKLOG`] (std's and tokio's default is 128).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What a full public listener writes before closing a new connection
/// (plain HTTP only; one non-blocking write, never waited for).
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Accept connections until `stop` is cancelled.
///
/// Each connection holds one of `--max-pending-connections` slots until it
/// upgrades to a WebSocket or starts an SSE stream (the session is bounded
/// by `--max-connections` instead) or ends; beyond the cap a new connection is
/// answered 503 (without TLS) and closed at once, so that descriptors stay
/// free for upgraded clients and the operations listener.
pub async fn serve(listener: TcpListener, app: Arc<App>, stop: CancellationToken) {
    let router = http::router(app.clone());
    let tls = app.tls.clone().map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(app.config.max_pending_connections));
    let nofile = crate::config::nofile_limit();
    if app.config.max_pending_connections as u64 >= nofile {
        warn!(
            max_pending_connections = app.config.max_pending_connections,
            nofile, "--max-pending-connections is not below the file limit (ulimit -n)"
        );
    }
    let handshake = app.config.limits.handshake_timeout;
    let refuse = |tcp: TcpStream| {
        app.metrics.refused(Limit::PendingConnections);
        if tls.is_none() {
            let _ = tcp.try_write(BUSY);
        }
    };
    let handle = |tcp: TcpStream, peer: SocketAddr, slot: OwnedSemaphorePermit| {
        let router = router.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        let http = Http1 {
            header_timeout: handshake,
            keep_alive: true,
        };
        let app = app.clone();
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            match tls {
                None => match crate::sse::direct::is_sse(&tcp, handshake).await {
                    Some(true) => {
                        let deadline = started + handshake;
                        crate::sse::direct::serve(tcp, peer, app, slot, deadline).await
                    }
                    Some(false) => {
                        let slot = Some(PendingSlot::new(slot));
                        serve_http(tcp, peer, router, http, stop, slot).await
                    }
                    None => debug!(%peer, "no request within --handshake-timeout"),
                },
                Some(acceptor) => {
                    match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let slot = Some(PendingSlot::new(slot));
                            serve_http(stream, peer, router, http, stop, slot).await
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    };
    let admit = || slots.clone().try_acquire_owned().ok();
    accept_loop(listener, &stop, admit, refuse, handle).await;
}

/// Accept until `stop` is cancelled; each connection gets a slot from
/// `admit` (`handle` spawns its task), or, when there is none, is given to
/// `refuse` and dropped, so that the loop never waits for a slot. Survives
/// accept errors such as `EMFILE`.
pub(crate) async fn accept_loop<S>(
    listener: TcpListener,
    stop: &CancellationToken,
    mut admit: impl FnMut() -> Option<S>,
    refuse: impl Fn(TcpStream),
    mut handle: impl FnMut(TcpStream, SocketAddr, S),
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    // EMFILE/ENFILE and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match admit() {
            Some(slot) => {
                let _ = tcp.set_nodelay(true);
                handle(tcp, peer, slot);
            }
            None => refuse(tcp),
        }
    }
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Largest request head, and the read buffer an HTTP connection grows to
/// (hyper's default is about 400 KB): a larger head gets 431, so a
/// connection not upgraded yet cannot make the node buffer more.
pub const MAX_READ_BUFFER: usize = 64 * 1024;

/// How [`serve_http`] runs an HTTP/1.1 connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Http1 {
    /// Time allowed for each request head, counted from when the server
    /// starts waiting for it (also while a kept-alive connection is idle).
    pub header_timeout: Duration,
    /// Serve more than one request per connection.
    pub keep_alive: bool,
}

/// Serve HTTP/1.1 (with upgrades) on one connection until it ends, upgrades
/// or `stop` is cancelled; its requests see `pending`, when given.
pub(crate) async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    router: axum::Router,
    http: Http1,
    stop: CancellationToken,
    pending: Option<PendingSlot>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(PeerAddr(peer));
        if let Some(p) = &pending {
            req.extensions_mut().insert(p.clone());
        }
        router.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(http.header_timeout)
        .max_buf_size(MAX_READ_BUFFER)
        .max_header_size(MAX_READ_BUFFER)
        .keep_alive(http.keep_alive)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                debug!(%peer, error = %e, "http connection ended with an error");
            }
        }
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}
