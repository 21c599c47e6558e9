//! The fallback transport (PROTOCOL.md section 7): Server-Sent Events for
//! the server's frames, `POST /sse/{conn}` for the client's.
//!
//! `GET /sse` runs the same checks as `/ws` ([`crate::http::admit`]), then
//! starts a session ([`crate::session`]) over an [`SseTransport`] and
//! answers with an [`SseBody`]. The connection's [`ConnHandle`] has no
//! socket: its queue holds ready events (encoded with
//! [`Encoding::Sse`], once per room message per node), and the body takes
//! them out as hyper asks for more, so a client that does not read fills
//! the queue and is closed as a slow consumer like a WebSocket one. An idle
//! stream holds no buffer of its own.
//!
//! A POST's frames go to the session through the stream's [`Link`]: a
//! bounded inbox of POSTs ([`INBOX_POSTS`]; a full inbox answers 503 with
//! `Retry-After`), read by the session's task as `Text` events in order.
//! A POST reaching another node is handed over ([`handover`]).

pub mod handover;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::Utf8Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::task::AtomicWaker;
use hyper::body::Frame;
use serde_json::value::RawValue;
use tracing::debug;

use crate::http::{self as public, PeerAddr};
use crate::outbound::{CloseReason, ConnHandle};
use crate::state::App;
use crate::transport::{ClientEvent, Transport};
use crate::ws::codec::Encoding;

/// POSTs at most waiting in a stream's inbox for its session; one more is
/// answered 503 with `Retry-After: 1`. Each is at most
/// `--max-message-bytes`, so a stream holds at most this many of them.
pub const INBOX_POSTS: usize = 8;

/// How long a closing stream may take to accept its last events.
const WRITE_PATIENCE: Duration = Duration::from_secs(1);

/// One server frame as an event: `data: <json>` and a blank line. A frame
/// is one line of JSON; should a client's `data` keep line breaks of its
/// own, each line gets its own `data:` field, which the client joins with
/// `\n` back into the same JSON.
pub fn event(payload: &str) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 8);
    for line in payload.split(['\n', '\r']) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    Bytes::from(out)
}

/// The heartbeat: a comment line, ignored by an EventSource.
pub fn comment() -> Bytes {
    Bytes::from_static(b":\n\n")
}

/// The last event of a stream the server closes.
fn close_event(reason: CloseReason) -> Bytes {
    let frame = serde_json::json!({
        "type": "close",
        "code": reason.code,
        "reason": reason.reason,
    });
    event(&frame.to_string())
}

/// The frames of one POST, in order.
type Post = Vec<Utf8Bytes>;

/// What the session's transport and the response body share, and what a
/// POST finds in the registry ([`Streams`]).
pub struct Link {
    /// The stream's user: a POST must carry a token of the same `sub`.
    user: Box<str>,
    state: Mutex<LinkState>,
    /// The session's task, woken by a POST or the body's end.
    session: AtomicWaker,
}

#[derive(Default)]
struct LinkState {
    posts: VecDeque<Post>,
    /// The response body was dropped: the client is gone.
    body_gone: bool,
    /// The session is done: the body ends once the queue is empty; with
    /// `Some(true)` at once, with an error (the client did not take the
    /// last events in time: hyper drops the connection).
    end: Option<bool>,
}

/// What became of a POST's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Queued for the session (202).
    Queued,
    /// No such stream (404).
    NotFound,
    /// The stream belongs to another user (403).
    Forbidden,
    /// The stream's inbox is full (503).
    Full,
    /// The POST could not be handed to the stream's node: the broker is
    /// down (503).
    Unavailable,
}

impl Link {
    fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn post(&self, user: &str, frames: Post) -> Delivery {
        if *self.user != *user {
            return Delivery::Forbidden;
        }
        let mut s = self.state();
        if s.end.is_some() || s.body_gone {
            return Delivery::NotFound;
        }
        if s.posts.len() >= INBOX_POSTS {
            return Delivery::Full;
        }
        s.posts.push_back(frames);
        drop(s);
        self.session.wake();
        Delivery::Queued
    }
}

/// The SSE streams open on this node, by connection id.
#[derive(Default)]
pub struct Streams {
    map: Mutex<HashMap<Box<str>, Arc<Link>>>,
}

impl Streams {
    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, Arc<Link>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand a POST's frames (of `user`) to the stream `conn` of this node.
    pub fn deliver(&self, conn: &str, user: &str, frames: Post) -> Delivery {
        let link = self.lock().get(conn).cloned();
        match link {
            Some(link) => link.post(user, frames),
            None => Delivery::NotFound,
        }
    }
}

/// Removes a stream from the registry when its transport goes.
struct Registered {
    streams: Arc<crate::state::Conns>,
    conn: Box<str>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.streams.sse.lock().remove(&self.conn);
    }
}

/// One SSE connection's transport: client frames from the [`Link`]'s
/// inbox, server frames taken by the [`SseBody`].
pub struct SseTransport {
    handle: Arc<ConnHandle>,
    link: Arc<Link>,
    /// The POST being handled, frame by frame.
    current: std::vec::IntoIter<Utf8Bytes>,
    _registered: Registered,
}

impl SseTransport {
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<ClientEvent> {
        if let Some(text) = self.current.next() {
            return Poll::Ready(ClientEvent::Text(text));
        }
        self.link.session.register(cx.waker());
        let mut s = self.link.state();
        if s.body_gone || s.end.is_some() {
            return Poll::Ready(ClientEvent::Gone);
        }
        match s.posts.pop_front() {
            Some(post) => {
                drop(s);
                self.current = post.into_iter();
                // An empty array: nothing to answer; look again.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            None => Poll::Pending,
        }
    }

    /// Wait until the body took everything queued, at most
    /// [`WRITE_PATIENCE`], then end the body.
    async fn end_body(&mut self) {
        let drained = tokio::time::timeout(WRITE_PATIENCE, self.handle.drained())
            .await
            .is_ok();
        let mut s = self.link.state();
        s.end.get_or_insert(!drained);
        drop(s);
        self.handle.wake();
    }
}

impl Transport for SseTransport {
    const NAME: &'static str = "sse";
    const ANSWERS_PINGS: bool = false;

    async fn next_event(&mut self) -> ClientEvent {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    async fn close(&mut self, reason: CloseReason) {
        self.handle.replace_queue(close_event(reason));
        self.handle.wake();
        self.end_body().await;
    }

    async fn finish(mut self) {
        self.end_body().await;
    }
}

/// The response body of an SSE stream: the connection's queued events.
pub struct SseBody {
    handle: Arc<ConnHandle>,
    link: Arc<Link>,
}

impl Drop for SseBody {
    fn drop(&mut self) {
        self.link.state().body_gone = true;
        self.link.session.wake();
    }
}

/// The error that makes hyper drop a connection whose client did not take
/// its last events.
#[derive(Debug)]
pub struct NotReading;

impl std::fmt::Display for NotReading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client did not take the stream's last events")
    }
}

impl std::error::Error for NotReading {}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = NotReading;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, NotReading>>> {
        let end = self.link.state().end;
        if end == Some(true) {
            return Poll::Ready(Some(Err(NotReading)));
        }
        if let Poll::Ready(event) = self.handle.poll_take(cx) {
            return Poll::Ready(Some(Ok(Frame::data(event))));
        }
        // `end` is set after the last events were queued, and wakes us.
        match self.link.state().end {
            Some(true) => Poll::Ready(Some(Err(NotReading))),
            Some(false) => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

/// `GET /sse`: the checks of `/ws`, then the event stream.
pub async fn open(
    State(app): State<Arc<App>>,
    peer: Option<axum::Extension<PeerAddr>>,
    request: Request<Body>,
) -> Response {
    let (parts, _) = request.into_parts();
    let (claims, slot) = match public::admit(&app, &parts.headers, &parts.uri, "sse").await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    app.metrics.accepted("sse");
    if let Some(pending) = parts.extensions.get::<public::PendingSlot>() {
        pending.release();
    }
    let remote = public::remote(&parts.headers, peer.as_ref().map(|p| &p.0));
    let conn_id = format!(
        "{}.{}",
        app.next_conn_id(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(app.config.node_id.as_bytes())
    );
    let handle = ConnHandle::with_socket(
        conn_id.as_str(),
        app.config.limits.max_outbound_bytes,
        app.metrics.clone(),
        None,
        Encoding::Sse,
    );
    let link = Arc::new(Link {
        user: claims.sub.as_str().into(),
        state: Mutex::new(LinkState::default()),
        session: AtomicWaker::new(),
    });
    app.conns
        .sse
        .lock()
        .insert(conn_id.as_str().into(), link.clone());
    let transport = SseTransport {
        handle: handle.clone(),
        link: link.clone(),
        current: Vec::new().into_iter(),
        _registered: Registered {
            streams: app.conns.clone(),
            conn: conn_id.as_str().into(),
        },
    };
    let body = SseBody { handle, link };
    let session = crate::session::run(
        app.clone(),
        claims,
        slot,
        transport.handle.clone(),
        transport,
        conn_id,
        &remote,
    );
    tokio::spawn(app.track_session(session));
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::new(body),
    )
        .into_response()
}

/// The node holding stream `conn`, from its id (`<id>.<node, base64url>`).
pub fn node_of(conn: &str) -> Option<String> {
    let (_, node) = conn.rsplit_once('.')?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(node)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// Split a POST body into its frames: one JSON object, or an array of
/// them (each element is handed on as is; one that is not an object gets
/// the session's `bad_request` error, as over a WebSocket). `None` for
/// anything else.
pub fn frames(body: &Bytes) -> Option<Post> {
    let text = std::str::from_utf8(body).ok()?.trim();
    match text.as_bytes().first()? {
        b'{' => {
            let one: &RawValue = serde_json::from_str(text).ok()?;
            Some(vec![slice(body, one)?])
        }
        b'[' => {
            let all: Vec<&RawValue> = serde_json::from_str(text).ok()?;
            all.into_iter().map(|raw| slice(body, raw)).collect()
        }
        _ => None,
    }
}

/// The part of `body` that `raw` (parsed from it) is, without a copy.
fn slice(body: &Bytes, raw: &RawValue) -> Option<Utf8Bytes> {
    Utf8Bytes::try_from(body.slice_ref(raw.get().as_bytes())).ok()
}

/// `POST /sse/{conn}`: a client frame, or an array of them, for a stream.
pub async fn post(
    State(app): State<Arc<App>>,
    Path(conn): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    let claims = match public::authenticate(&app, &headers, &uri) {
        Ok(c) => c,
        Err(e) => return public::unauthorized(&e),
    };
    let body = match public::read_body(&app, body).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let Some(frames) = frames(&body) else {
        return public::error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "body is not a JSON object or an array of them",
        );
    };
    let delivery = if node_of(&conn).as_deref() == Some(&*app.config.node_id) {
        app.conns.sse.deliver(&conn, &claims.sub, frames)
    } else {
        handover::forward(&app, &conn, &claims.sub, &body).await
    };
    debug!(conn, ?delivery, "sse post");
    answer(delivery)
}

fn answer(delivery: Delivery) -> Response {
    match delivery {
        Delivery::Queued => StatusCode::ACCEPTED.into_response(),
        Delivery::NotFound => public::error(StatusCode::NOT_FOUND, "not_found", "no such stream"),
        Delivery::Forbidden => public::error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the stream belongs to another user",
        ),
        Delivery::Full => public::unavailable(
            "1",
            "the stream's session has too many POSTs waiting; retry",
        ),
        Delivery::Unavailable => public::unavailable(
            "1",
            "the broker is unavailable: the POST could not reach its stream's node",
        ),
    }
}
