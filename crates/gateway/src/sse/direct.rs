//! Direct streams: a plain TCP connection whose first request is `GET
//! /sse` is served here rather than by hyper, so that the stream holds no
//! HTTP connection state (see the module above).
//!
//! The listener peeks at the first bytes ([`is_sse`]); the request head is
//! read and parsed here (`httparse`, at most
//! [`crate::listener::MAX_READ_BUFFER`], else 431; the peek and the head
//! together within `--handshake-timeout` of the connection's start), the
//! checks are those of every connection ([`crate::http::admit`]), a
//! refusal is written as the router would answer it, and on success the
//! response head (`200`, no length: the body runs until the connection
//! closes) is written before the session starts with the socket in its
//! handle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use axum::response::Response;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::debug;

use crate::http::{self as public, PeerAddr};
use crate::listener::MAX_READ_BUFFER;
use crate::state::App;

/// What a request for a direct stream starts with.
const PREFIX: &[u8] = b"GET /sse";

/// Headers a request may have at most.
const MAX_HEADERS: usize = 64;

/// Whether the connection's first request is `GET /sse` (without a path
/// below it), from its first bytes, not consumed. `None` when the client
/// sent nothing usable within `patience`.
pub async fn is_sse(tcp: &TcpStream, patience: Duration) -> Option<bool> {
    let look = async {
        let mut buf = [0u8; PREFIX.len() + 1];
        // Bounded by `patience`; a request head rarely comes in pieces.
        loop {
            let n = tcp.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            let seen = &buf[..n];
            let common = n.min(PREFIX.len());
            if seen[..common] != PREFIX[..common] {
                return Some(false);
            }
            if n == buf.len() {
                return Some(matches!(buf[PREFIX.len()], b' ' | b'?'));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(patience, look).await.ok().flatten()
}

/// Serve a direct stream on `tcp` (its first request is `GET /sse`),
/// holding `pending` (its place under `--max-pending-connections`) until
/// the stream starts.
/// The request head is due by `deadline` (the connection's start plus
/// `--handshake-timeout`, the peek included).
pub async fn serve(
    mut tcp: TcpStream,
    peer: SocketAddr,
    app: Arc<App>,
    pending: OwnedSemaphorePermit,
    deadline: Instant,
) {
    let patience = app.config.limits.handshake_timeout;
    let head = match tokio::time::timeout_at(deadline, read_head(&mut tcp)).await {
        Ok(Head::Complete(head)) => head,
        Ok(Head::TooLarge) => {
            let refused = public::error(
                axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too_large",
                "request head too large",
            );
            return write_response(&mut tcp, refused, patience).await;
        }
        Ok(Head::Gone) | Err(_) => {
            debug!(%peer, "sse: no request head within --handshake-timeout");
            return;
        }
    };
    let Some((uri, headers)) = parse(&head) else {
        let refused = public::error(
            axum::http::StatusCode::BAD_REQUEST,
            "bad_request",
            "malformed request",
        );
        return write_response(&mut tcp, refused, patience).await;
    };
    let (claims, slot) = match public::admit(&app, &headers, &uri, "sse").await {
        Ok(admitted) => admitted,
        Err(refused) => return write_response(&mut tcp, refused, patience).await,
    };
    let mut ok = String::from("HTTP/1.1 200 OK\r\n");
    for (name, value) in super::HEADERS {
        ok.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(origin) = super::allowed_origin(&app, &headers).and_then(|o| o.to_str().ok()) {
        ok.push_str(&format!(
            "access-control-allow-origin: {origin}\r\nvary: origin\r\n"
        ));
    }
    ok.push_str("connection: close\r\n\r\n");
    match tokio::time::timeout(patience, tcp.write_all(ok.as_bytes())).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    app.metrics.accepted("sse");
    drop(pending);
    let remote = public::remote(&headers, Some(&PeerAddr(peer)));
    super::start(&app, claims, slot, &remote, Some(tcp));
}

/// What came of reading a request head.
enum Head {
    Complete(Vec<u8>),
    /// Larger than [`MAX_READ_BUFFER`]: 431, as hyper answers.
    TooLarge,
    /// The connection ended or failed first.
    Gone,
}

/// Read the request head. Anything after it (a stream's request has no
/// body) is dropped, like what the client sends later.
async fn read_head(tcp: &mut TcpStream) -> Head {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while head.len() < MAX_READ_BUFFER {
        let n = match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return Head::Gone,
            Ok(n) => n,
        };
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(from + end + 4);
            return Head::Complete(head);
        }
    }
    Head::TooLarge
}

/// The URI and headers of a request head; `None` when it is not a valid
/// `GET` request head.
fn parse(head: &[u8]) -> Option<(Uri, HeaderMap)> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let httparse::Status::Complete(_) = req.parse(head).ok()? else {
        return None;
    };
    if req.method != Some("GET") {
        return None;
    }
    let uri: Uri = req.path?.parse().ok()?;
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        headers.append(name, value);
    }
    Some((uri, headers))
}

/// Write a refusal (small, built by the router's helpers) and close.
async fn write_response(tcp: &mut TcpStream, response: Response, patience: Duration) {
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Default::default(),
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    let _ = tokio::time::timeout(patience, async {
        tcp.write_all(&out).await?;
        tcp.shutdown().await
    })
    .await;
}
