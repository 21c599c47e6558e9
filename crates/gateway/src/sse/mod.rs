//! The fallback transport (PROTOCOL.md section 7): Server-Sent Events for
//! the server's frames, `POST /sse/{conn}` for the client's.
//!
//! `GET /sse` runs the same checks as `/ws` ([`crate::http::admit`]), then
//! starts a session ([`crate::session`]) over an [`SseTransport`]. Events
//! are encoded with [`Encoding::Sse`] (once per room message per node) and
//! go through the connection's [`ConnHandle`] queue, so a client that does
//! not read fills the queue and is closed as a slow consumer like a
//! WebSocket one. Two ways to carry them:
//!
//! - **Direct** ([`direct`]): a plain TCP connection whose first request is
//!   `GET /sse` is taken by the listener before hyper sees it. The response
//!   head is written by hand (`Connection: close`, the body runs until the
//!   connection ends), and the handle gets the socket, as a WebSocket's
//!   does: events are written straight into it. An idle stream then costs
//!   what an idle WebSocket costs (hyper's read and write buffers, 8 KiB
//!   each, are never allocated).
//! - **Through hyper**: any other `GET /sse` (TLS, or a kept-alive
//!   connection that served other requests first) is answered by the router
//!   with an [`SseBody`] that takes the handle's queued events out as hyper
//!   asks for more; the handle has no socket.
//!
//! A POST's frames go to the session through the stream's [`Link`]: a
//! bounded inbox of POSTs ([`INBOX_POSTS`]; a full inbox answers 503 with
//! `Retry-After`), read by the session's task as `Text` events in order.
//! A POST reaching another node is handed over ([`handover`]).

pub mod direct;
pub mod handover;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::ws::Utf8Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::task::AtomicWaker;
use hyper::body::Frame;
use serde_json::value::RawValue;
use tracing::debug;

use crate::http::{self as public, BodyBudget, PeerAddr};
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

/// One server frame as an event: `data: <json>` and a blank line, the
/// frame's JSON on one line (PROTOCOL.md section 7). A client's `data` may
/// carry line breaks of its own; in valid JSON a CR or LF can only be
/// whitespace between tokens (inside strings they are escaped), so each
/// becomes a space and the JSON means the same.
pub fn event(payload: &str) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend(
        payload
            .bytes()
            .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The heartbeat: a comment line, ignored by an EventSource.
pub fn comment() -> Bytes {
    Bytes::from_static(b":\n\n")
}

/// The reason of the `close` event of a draining node's streams, as
/// PROTOCOL.md section 7 gives it (a WebSocket's Close 1001 says "server
/// shutting down", unchanged since v1).
const GOING_AWAY_REASON: &str = "shutting down";

/// The last event of a stream the server closes.
fn close_event(reason: CloseReason) -> Bytes {
    let text = if reason.code == wsgate_protocol::close::GOING_AWAY {
        GOING_AWAY_REASON
    } else {
        reason.reason
    };
    let frame = serde_json::json!({
        "type": "close",
        "code": reason.code,
        "reason": text,
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
/// inbox; server frames written into the handle's socket (direct) or taken
/// by the [`SseBody`].
pub struct SseTransport {
    handle: Arc<ConnHandle>,
    link: Arc<Link>,
    /// The POST being handled, frame by frame.
    current: std::vec::IntoIter<Utf8Bytes>,
    /// The handle writes into the connection's socket.
    direct: bool,
    _registered: Registered,
}

impl SseTransport {
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<ClientEvent> {
        if self.poll_socket(cx).is_ready() {
            return Poll::Ready(ClientEvent::Gone);
        }
        if let Some(text) = self.current.next() {
            if self.current.len() == 0 {
                // An idle stream keeps no POST's buffer.
                self.current = Post::new().into_iter();
            }
            return Poll::Ready(ClientEvent::Text(text));
        }
        self.link.session.register(cx.waker());
        let mut s = self.link.state();
        if s.body_gone || s.end.is_some() {
            return Poll::Ready(ClientEvent::Gone);
        }
        match s.posts.pop_front() {
            Some(post) => {
                if s.posts.is_empty() {
                    s.posts = VecDeque::new();
                }
                drop(s);
                self.current = post.into_iter();
                // An empty array: nothing to answer; look again.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            None => Poll::Pending,
        }
    }

    /// A direct stream: write what is queued into the socket, and watch it
    /// for its end (the client sends nothing after its request: whatever it
    /// sends is read and dropped). Ready when the connection is gone.
    fn poll_socket(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.direct {
            return Poll::Pending;
        }
        if let Poll::Ready(Err(_)) = self.handle.poll_write(cx, None) {
            return Poll::Ready(());
        }
        let mut buf = [0u8; 256];
        match self.handle.poll_read_tcp(cx, &mut buf) {
            Some(Poll::Pending) => Poll::Pending,
            Some(Poll::Ready(Ok(n))) if n > 0 => {
                // Dropped; look again later (bounded per poll).
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    }

    /// Wait until everything queued is written (direct) or taken by the
    /// body, at most [`WRITE_PATIENCE`], then end the body.
    async fn end_body(&mut self) {
        let drained = if self.direct {
            let handle = self.handle.clone();
            tokio::time::timeout(
                WRITE_PATIENCE,
                std::future::poll_fn(|cx| handle.poll_write(cx, None)),
            )
            .await
            .is_ok_and(|r| r.is_ok())
        } else {
            tokio::time::timeout(WRITE_PATIENCE, self.handle.drained())
                .await
                .is_ok()
        };
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
        // A direct stream ends with its connection.
        drop(self.handle.take_socket());
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
    let (handle, link) = start(&app, claims, slot, &remote, None);
    let mut response = Body::new(SseBody { handle, link }).into_response();
    for (name, value) in HEADERS {
        response.headers_mut().insert(
            header::HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    cors(&app, &parts.headers, &mut response);
    response
}

/// The allowed `Origin` of a request, if it has one: a page on another
/// origin reads a stream (EventSource) and POSTs to it only with CORS.
pub(crate) fn allowed_origin<'a>(app: &App, headers: &'a HeaderMap) -> Option<&'a HeaderValue> {
    headers.get(header::ORIGIN).filter(|o| {
        o.to_str()
            .is_ok_and(|o| app.config.origins.allows(o.trim_end_matches('/')))
    })
}

/// Let the request's allowed origin read the answer.
fn cors(app: &App, headers: &HeaderMap, response: &mut Response) {
    if let Some(origin) = allowed_origin(app, headers) {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(header::VARY, HeaderValue::from_static("origin"));
    }
}

/// `OPTIONS /sse/{conn}`: the CORS preflight of a POST from a page on
/// another (allowed) origin that sends `Authorization` or a JSON
/// `Content-Type`.
pub async fn preflight(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    if allowed_origin(&app, &headers).is_some() {
        let h = response.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    cors(&app, &headers, &mut response);
    response
}

/// Start the session of a stream admitted for `claims`: its handle (with
/// the socket of a direct stream) and link, registered for POSTs.
pub(crate) fn start(
    app: &Arc<App>,
    claims: crate::auth::Claims,
    slot: crate::state::Slot,
    remote: &str,
    sock: Option<tokio::net::TcpStream>,
) -> (Arc<ConnHandle>, Arc<Link>) {
    let conn_id = format!(
        "{}.{}",
        app.next_conn_id(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(app.config.node_id.as_bytes())
    );
    let direct = sock.is_some();
    let handle = ConnHandle::with_socket(
        conn_id.as_str(),
        app.config.limits.max_outbound_bytes,
        app.metrics.clone(),
        sock,
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
        direct,
        _registered: Registered {
            streams: app.conns.clone(),
            conn: conn_id.as_str().into(),
        },
    };
    let session = crate::session::run(
        app.clone(),
        claims,
        slot,
        handle.clone(),
        transport,
        conn_id,
        remote,
    );
    tokio::spawn(app.track_session(session));
    (handle, link)
}

/// The response head of a stream.
pub const HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
];

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
/// Every answer is readable by an allowed origin (CORS).
pub(crate) async fn post(
    State(app): State<Arc<App>>,
    Extension(budget): Extension<BodyBudget>,
    conn: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    // A conn id that is not even UTF-8 names no stream: the token is
    // checked first as for any other, then 404.
    let conn = conn.map(|Path(c)| c).unwrap_or_default();
    let mut response = handle_post(&app, &budget, &conn, &headers, &uri, body).await;
    cors(&app, &headers, &mut response);
    response
}

/// As the HTTP publish API: the token (401) and the body's share of the
/// node's `--max-inflight-body-bytes` (413 on a declared length beyond
/// `--max-message-bytes`, 503) are checked from the head, before a byte of
/// the body is read; the body is then read up to `--max-message-bytes`.
async fn handle_post(
    app: &Arc<App>,
    budget: &BodyBudget,
    conn: &str,
    headers: &HeaderMap,
    uri: &Uri,
    body: Body,
) -> Response {
    let claims = match public::authenticate(app, headers, uri) {
        Ok(c) => c,
        Err(e) => return public::linger(budget, headers, body, public::unauthorized(&e)),
    };
    let (body, _held) = match public::take_body(app, budget, headers, body).await {
        Ok(taken) => taken,
        Err(refused) => return refused,
    };
    let Some(frames) = frames(&body) else {
        return public::error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "body is not a JSON object or an array of them",
        );
    };
    let delivery = if node_of(conn).as_deref() == Some(&*app.config.node_id) {
        app.conns.sse.deliver(conn, &claims.sub, frames)
    } else {
        handover::forward(app, conn, &claims.sub, &body).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::codec::SharedText;

    #[test]
    fn a_frame_is_one_data_line_even_when_its_json_has_line_breaks() {
        assert_eq!(&event(r#"{"a":1}"#)[..], b"data: {\"a\":1}\n\n");
        // A client's data kept its own line breaks: whitespace, now spaces.
        let pretty = "{\"a\":\r\n  \"x\\ny\",\n\"b\": 1}";
        let one = event(pretty);
        assert_eq!(&one[..], b"data: {\"a\":    \"x\\ny\", \"b\": 1}\n\n");
        let line = std::str::from_utf8(&one[6..one.len() - 2]).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(line).unwrap(),
            serde_json::from_str::<serde_json::Value>(pretty).unwrap(),
            "the same JSON"
        );
        assert_eq!(&comment()[..], b":\n\n");
    }

    #[test]
    fn a_draining_node_closes_a_stream_with_the_contracts_reason() {
        let ev = close_event(CloseReason {
            code: wsgate_protocol::close::GOING_AWAY,
            reason: "server shutting down",
        });
        assert_eq!(
            &ev[..],
            b"data: {\"code\":1001,\"reason\":\"shutting down\",\"type\":\"close\"}\n\n"
        );
    }

    #[test]
    fn a_shared_frame_builds_its_event_once() {
        let shared = SharedText::new(r#"{"type":"message"}"#);
        let first = shared.for_conn(Encoding::Sse);
        assert_eq!(&first[..], b"data: {\"type\":\"message\"}\n\n");
        assert_eq!(shared.for_conn(Encoding::Sse).as_ptr(), first.as_ptr());
        assert_eq!(
            crate::ws::codec::text_for(r#"{"type":"message"}"#, Encoding::Sse),
            first
        );
    }

    #[test]
    fn a_post_body_is_one_object_or_an_array_sliced_without_a_copy() {
        let one = Bytes::from_static(b" {\"type\":\"ping\"} ");
        assert_eq!(frames(&one).unwrap(), ["{\"type\":\"ping\"}"]);
        let many = Bytes::from_static(b"[{\"type\":\"ping\"}, 3, {\"x\":[1]}]");
        let got = frames(&many).unwrap();
        assert_eq!(got, ["{\"type\":\"ping\"}", "3", "{\"x\":[1]}"]);
        let inside = many.as_ptr_range();
        assert!(inside.contains(&got[2].as_str().as_ptr()), "copied");
        for bad in [&b"42"[..], b"\"s\"", b"", b"{", b"[1,", b"\xff{}"] {
            assert!(frames(&Bytes::from_static(bad)).is_none(), "{bad:?}");
        }
        assert_eq!(frames(&Bytes::from_static(b"[]")).unwrap().len(), 0);
    }

    #[test]
    fn a_link_takes_its_users_posts_up_to_its_bound() {
        let link = Link {
            user: "alice".into(),
            state: Mutex::new(LinkState::default()),
            session: AtomicWaker::new(),
        };
        assert_eq!(link.post("bob", Vec::new()), Delivery::Forbidden);
        for _ in 0..INBOX_POSTS {
            assert_eq!(link.post("alice", Vec::new()), Delivery::Queued);
        }
        assert_eq!(link.post("alice", Vec::new()), Delivery::Full);
        link.state().posts.pop_front();
        assert_eq!(link.post("alice", Vec::new()), Delivery::Queued);
        link.state().body_gone = true;
        assert_eq!(link.post("alice", Vec::new()), Delivery::NotFound);
    }

    #[test]
    fn the_conn_id_names_its_node() {
        assert_eq!(node_of("c-1a.bm9kZS0x").as_deref(), Some("node-1"));
        assert_eq!(node_of("c-1a"), None);
        assert_eq!(node_of("c-1a.!!"), None);
    }
}
