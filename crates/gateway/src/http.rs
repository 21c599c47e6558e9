//! The public router: `GET /ws` (checks before the upgrade), the HTTP
//! publish API, the server API's routes ([`api`]), and in dev mode the chat
//! page and a token endpoint.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::FromRequestParts;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::upgrade::OnUpgrade;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::{debug, error, info_span, warn, Span};
use wsgate_protocol::MessageParts;

use crate::api;
use crate::auth::{self, AuthError, Claims, MintRequest};
use crate::broker::BrokerError;
use crate::metrics::{Limit, Rejection};
use crate::session::{self, now_ms};
use crate::state::App;
use crate::ws;

/// The peer address of an HTTP connection (set by the listener).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// A public connection's place under `--max-pending-connections` (set by
/// the listener). An SSE stream gives it back when it starts: the stream is
/// then a connection under `--max-connections`, like an upgraded WebSocket.
#[derive(Clone, Default)]
pub struct PendingSlot(Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>);

impl PendingSlot {
    /// Hold `permit` until [`release`](Self::release) or the end.
    pub fn new(permit: OwnedSemaphorePermit) -> PendingSlot {
        PendingSlot(Arc::new(std::sync::Mutex::new(Some(permit))))
    }

    /// Give the place back.
    pub fn release(&self) {
        drop(self.0.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// The node-wide budget of HTTP API body bytes being read or held
/// (`--max-inflight-body-bytes`), one semaphore permit a byte.
#[derive(Clone)]
pub(crate) struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    /// Slots for draining refused bodies ([`linger`]).
    lingering: Arc<Semaphore>,
    /// `--max-message-bytes`.
    max_body: usize,
}

/// The router of the public listener.
pub fn router(app: Arc<App>) -> Router {
    let total = app.config.limits.max_inflight_body_bytes;
    let budget = BodyBudget {
        bytes: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
        total,
        lingering: Arc::new(Semaphore::new(LINGERING)),
        max_body: app.config.limits.max_message_bytes,
    };
    let max_body = app.config.limits.max_message_bytes;
    let api = Router::new()
        .route(
            "/api/rooms/{room}/messages",
            post(api_publish).layer(Extension(budget.clone())),
        )
        .route(
            "/api/users/{user}/disconnect",
            post(api::disconnect).layer(Extension(budget.clone())),
        )
        .route("/api/rooms/{room}/history", get(api::history))
        .route("/api/rooms/{room}/presence", get(crate::presence::http_get))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            api::count,
        ));
    let mut router = Router::new()
        .route("/ws", get(upgrade))
        .route("/sse", get(crate::sse::open))
        .route(
            "/sse/{conn}",
            post(crate::sse::post)
                .options(crate::sse::preflight)
                .layer::<_, std::convert::Infallible>(Extension(budget.clone()))
                .layer(axum::extract::DefaultBodyLimit::max(max_body)),
        )
        .merge(api);
    if app.config.dev {
        router = router
            .route("/", get(dev_page))
            .route("/wsgate.js", get(dev_js))
            .route("/dev/token", get(dev_token))
            .route("/dev/check", get(dev_check));
    }
    router
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(30),
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<_>| {
                    info_span!(
                        "http",
                        method = %req.method(),
                        uri = %auth::redact_query(&req.uri().to_string()),
                        remote = %remote(req.headers(), req.extensions().get::<PeerAddr>()),
                    )
                })
                .on_failure(on_failure),
        )
        .with_state(app)
}

/// TraceLayer's failure log. A 503 or 504 is an expected answer (the
/// broker is down, the node is full or draining; the broker logs its own
/// outage once), so it is logged at `debug`, not as an ERROR per request.
fn on_failure(class: ServerErrorsFailureClass, latency: Duration, _span: &Span) {
    match class {
        ServerErrorsFailureClass::StatusCode(
            status @ (StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT),
        ) => debug!(status = status.as_u16(), ?latency, "response unavailable"),
        other => error!(classification = %other, ?latency, "response failed"),
    }
}

/// The client's address for logs: the first `X-Forwarded-For` entry when
/// a proxy set one, else the TCP peer.
pub(crate) fn remote(headers: &HeaderMap, peer: Option<&PeerAddr>) -> String {
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_owned())
        .or_else(|| peer.map(|p| p.0.to_string()))
        .unwrap_or_default()
}

pub(crate) fn unauthorized(e: &AuthError) -> Response {
    if matches!(e, AuthError::KeysNotLoaded) {
        // Not the token's fault: the JWKS has not been fetched yet.
        return unavailable("5", "token keys not loaded yet; retry shortly");
    }
    let challenge = match e {
        AuthError::Missing => HeaderValue::from_static("Bearer realm=\"wsgate\""),
        _ => HeaderValue::from_static("Bearer realm=\"wsgate\", error=\"invalid_token\""),
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge)],
        Json(json!({"error": "unauthorized", "message": e.to_string()})),
    )
        .into_response()
}

pub(crate) fn unavailable(retry_after: &'static str, message: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, HeaderValue::from_static(retry_after))],
        Json(json!({"error": "unavailable", "message": message})),
    )
        .into_response()
}

pub(crate) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let message: String = message.into();
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

pub(crate) fn authenticate(app: &App, headers: &HeaderMap, uri: &Uri) -> Result<Claims, AuthError> {
    let token = auth::token_from_request(headers, uri.query()).ok_or(AuthError::Missing)?;
    app.verify_token(&token)
}

/// [`authenticate`] for a handshake, which may wait a moment: a token whose
/// `kid` the JWKS does not have yet is verified once more after the fetch it
/// asked for (PROTOCOL.md section 9: a new key is accepted as soon as the
/// provider publishes it).
async fn authenticate_handshake(
    app: &App,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Claims, AuthError> {
    match authenticate(app, headers, uri) {
        Err(AuthError::UnknownKey) => {
            if let Some(jwks) = app.verifier.jwks_source() {
                jwks.settle_unknown_kid().await;
            }
            authenticate(app, headers, uri)
        }
        other => other,
    }
}

/// The checks of a new connection (`/ws` and `/sse`), in the order of
/// PROTOCOL.md section 1: Origin (403), token (401), a slot under
/// `--max-connections` and not draining (503 with `Retry-After`). Each
/// refusal is counted.
// The error is the response itself, built once per refused connection.
#[allow(clippy::result_large_err)]
pub(crate) async fn admit(
    app: &Arc<App>,
    headers: &HeaderMap,
    uri: &Uri,
    transport: &'static str,
) -> Result<(Claims, crate::state::Slot), Response> {
    match headers.get(header::ORIGIN) {
        Some(origin) => {
            let allowed = origin
                .to_str()
                .is_ok_and(|o| app.config.origins.allows(o.trim_end_matches('/')));
            if !allowed {
                app.metrics.reject(Rejection::Origin);
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "origin not allowed",
                ));
            }
        }
        None if app.config.require_origin => {
            app.metrics.reject(Rejection::Origin);
            return Err(error(StatusCode::FORBIDDEN, "forbidden", "origin required"));
        }
        None => {}
    }
    if !app.verifier.keys_loaded() {
        // PROTOCOL.md section 9: until a JWKS has been loaded, upgrades get
        // 503, whatever token they carry (or none).
        app.metrics.reject(Rejection::Auth);
        return Err(unauthorized(&AuthError::KeysNotLoaded));
    }
    let claims = match authenticate_handshake(app, headers, uri).await {
        Ok(c) => c,
        Err(e) => {
            debug!(reason = e.reason(), "token refused");
            app.metrics.reject(Rejection::Auth);
            return Err(unauthorized(&e));
        }
    };
    let Some(slot) = app.try_slot(transport) else {
        app.metrics.reject(Rejection::Capacity);
        return Err(if app.is_draining() {
            unavailable("1", "node is draining; reconnect to another node")
        } else {
            unavailable("5", "node is at its connection limit")
        });
    };
    Ok((claims, slot))
}

async fn upgrade(
    State(app): State<Arc<App>>,
    peer: Option<axum::Extension<PeerAddr>>,
    request: Request<Body>,
) -> Response {
    let (mut parts, _) = request.into_parts();
    // The extractor checks the request (and takes hyper's upgrade handle
    // out of it: a clone of it is kept for the connection).
    let on_upgrade = parts.extensions.get::<OnUpgrade>().cloned();
    let ws = WebSocketUpgrade::from_request_parts(&mut parts, &()).await;
    let (headers, uri) = (&parts.headers, &parts.uri);
    let (claims, slot) = match admit(&app, headers, uri, "ws").await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let ws = match ws {
        Ok(_) if !valid_key(headers) => {
            app.metrics.reject(Rejection::BadRequest);
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
            );
        }
        Ok(ws) => ws,
        Err(rejection) => {
            app.metrics.reject(Rejection::BadRequest);
            return rejection.into_response();
        }
    };
    drop(ws);
    let Some(on_upgrade) = on_upgrade else {
        app.metrics.reject(Rejection::BadRequest);
        return error(
            StatusCode::UPGRADE_REQUIRED,
            "bad_request",
            "connection cannot be upgraded",
        );
    };
    app.metrics.accepted("ws");
    let remote = remote(headers, peer.as_ref().map(|p| &p.0));
    let compression = app.config.compression;
    let deflate = compression.negotiate(
        headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    let response = ws::handshake::switching_protocols(headers, deflate);
    let compress_from = deflate.map(|_| compression.min_bytes);
    // One allocation, consumed at the upgrade: what an async block captures
    // stays in its task for the connection's whole life.
    let inputs = Box::new((app.clone(), claims, remote, slot, compress_from));
    let session = app.track_session(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let (app, claims, remote, slot, compress_from) = *inputs;
                let session = session::start(upgraded, app, claims, &remote, slot, compress_from);
                drop(remote);
                session.await
            }
            Err(e) => warn!(error = %e, "websocket upgrade failed"),
        }
    });
    tokio::spawn(session);
    response
}

/// RFC 6455 4.1: the key is 16 random bytes, base64-encoded.
fn valid_key(headers: &HeaderMap) -> bool {
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k.as_bytes())
                .ok()
        })
        .is_some_and(|key| key.len() == 16)
}

async fn api_publish(
    State(app): State<Arc<App>>,
    Extension(budget): Extension<BodyBudget>,
    Path(room): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    let caller = match check_head(&app, &room, &headers, &uri) {
        Ok(caller) => caller,
        Err(refused) => return linger(&budget, &headers, body, refused),
    };
    // Checked with the head (check_head); invalid keys never get here.
    let key = idempotency_key(&headers).ok().flatten();
    let (body, _held) = match take_body(&app, &budget, &headers, body).await {
        Ok(taken) => taken,
        Err(refused) => return refused,
    };
    let data: &RawValue = match std::str::from_utf8(&body)
        .ok()
        .and_then(|text| serde_json::from_str(text.trim()).ok())
    {
        Some(d) => d,
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "body is not valid JSON",
            )
        }
    };
    if let Err(e) = wsgate_protocol::check_depth(data.get()) {
        return error(StatusCode::BAD_REQUEST, "bad_request", e);
    }
    // A user's HTTP publishes share its publish bucket; the API key's do not.
    let user = match &caller {
        api::Caller::User(claims) => Some(claims.sub.as_str()),
        api::Caller::Server => None,
    };
    if let Some(Err(limited)) = user.map(|u| app.limits.try_take(u)) {
        return limited.into_response();
    }
    app.metrics.messages_received.inc();
    let parts = MessageParts::new(&room, caller.name(), data, now_ms());
    match app.publish(&room, parts, key).await {
        Ok(seq) => Json(json!({"room": room, "seq": seq})).into_response(),
        Err(e) => {
            if let (BrokerError::Unavailable(_), Some(user)) = (&e, user) {
                app.limits.refund(user);
            }
            broker_error(&e)
        }
    }
}

/// The `Idempotency-Key` header (PROTOCOL.md section 11); `Err` when it is
/// present but invalid.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ()> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(k) if wsgate_protocol::is_valid_key(k) => Ok(Some(k)),
        _ => Err(()),
    }
}

/// A publish the broker did not take: 503 when it was not delivered (or,
/// unconfirmed by `--redis-min-replicas` replicas, may be), 504 when its
/// fate is unknown (delivered at most once; retry only with the
/// same idempotency key).
fn broker_error(e: &BrokerError) -> Response {
    match e {
        BrokerError::Unavailable(_) => unavailable("1", &format!("{e}; message not delivered")),
        BrokerError::Unconfirmed(_) => unavailable("1", &e.to_string()),
        BrokerError::Timeout(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("{e}; the message may or may not be delivered (at most once)"),
        ),
    }
}

/// An answer given without reading (all of) the request body: the
/// connection is closed after it rather than kept for another request.
pub(crate) fn unread(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn too_large(max: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("body larger than {max} bytes"),
    )
}

/// What a publish needs checked from its head besides its body's size:
/// token (401), room (400), grant (403), `Idempotency-Key` (400). A
/// refused request costs no body byte (and no `100 Continue` is sent).
// The error is the response itself, built once per refused request.
#[allow(clippy::result_large_err)]
fn check_head(
    app: &App,
    room: &str,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<api::Caller, Response> {
    // The API key or a Bearer token (401/404), the room name (400), the
    // `publish` grant (403).
    let caller = api::room_caller(app, headers, uri, room, api::RoomAction::Publish)
        .map_err(IntoResponse::into_response)?;
    if idempotency_key(headers).is_err() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "invalid Idempotency-Key: 1 to 64 characters of A-Z a-z 0-9 _ - . :",
        ));
    }
    Ok(caller)
}

/// The body of an API request whose head passed its checks: its share of
/// the node's budget reserved from the head ([`reserve_body`]; a refusal
/// drains it aside, [`linger`]), then read ([`read_body`]). The permit
/// holds the share until dropped.
pub(crate) async fn take_body(
    app: &App,
    budget: &BodyBudget,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, OwnedSemaphorePermit), Response> {
    let held = match reserve_body(app, budget, headers) {
        Ok(held) => held,
        Err(refused) => return Err(linger(budget, headers, body, refused)),
    };
    match read_body(app, body).await {
        Ok(body) => Ok((body, held)),
        Err(refused) => Err(unread(refused)),
    }
}

/// A share of the node's body budget for a request's body, from its head:
/// its declared length (413 beyond `--max-message-bytes`), else the
/// maximum; 503 with `Retry-After` when the budget has not that much left.
// The error is the response itself, built once per refused request.
#[allow(clippy::result_large_err)]
fn reserve_body(
    app: &App,
    budget: &BodyBudget,
    headers: &HeaderMap,
) -> Result<OwnedSemaphorePermit, Response> {
    let max = app.config.limits.max_message_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large(max));
    }
    // Reserve what the body may take: its declared length, else the
    // maximum. A body larger than the whole budget is read only alone.
    let want = declared
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(max)
        .min(budget.total);
    budget
        .bytes
        .clone()
        .try_acquire_many_owned(u32::try_from(want).unwrap_or(u32::MAX))
        .map_err(|_| {
            app.metrics.refused(Limit::InflightBodyBytes);
            unavailable("1", "node is reading too many request bodies; retry")
        })
}

/// Refused bodies drained at once at most (see [`linger`]).
const LINGERING: usize = 32;
/// How long a refused body is drained at most.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Answer before the body was read, closing the connection after the
/// answer. Many clients write their whole body before they read, and
/// closing a socket with unread data resets it, so such a client would see
/// a broken pipe instead of the answer; so, as nginx's lingering close
/// does, the rest of the body is read and discarded (up to
/// `--max-message-bytes`, for at most [`LINGER_TIME`], at most
/// [`LINGERING`] connections at once, through hyper's bounded read buffer:
/// no body is held). Beyond that, or when the client waits for
/// `100 Continue`, the connection is simply closed.
pub(crate) fn linger(
    budget: &BodyBudget,
    headers: &HeaderMap,
    body: Body,
    refused: Response,
) -> Response {
    let waits_for_continue = headers.contains_key(header::EXPECT);
    if !waits_for_continue {
        if let Ok(slot) = budget.lingering.clone().try_acquire_owned() {
            let max = budget.max_body;
            tokio::spawn(async move {
                let _slot = slot;
                let drain = async move {
                    let mut body = body;
                    let mut seen = 0usize;
                    while let Some(Ok(frame)) = body.frame().await {
                        seen += frame.data_ref().map_or(0, |d| d.len());
                        if seen > max {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(LINGER_TIME, drain).await;
            });
        }
    }
    unread(refused)
}

/// Read an API body: at most `--max-message-bytes` (413), within
/// `--body-timeout` (408).
async fn read_body(app: &App, body: Body) -> Result<Bytes, Response> {
    let max = app.config.limits.max_message_bytes;
    let read = Limited::new(body, max).collect();
    match tokio::time::timeout(app.config.limits.body_timeout, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large(max)),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("cannot read the body: {e}"),
        )),
        Err(_) => {
            app.metrics.refused(Limit::BodyTimeout);
            Err(error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "body not received within --body-timeout",
            ))
        }
    }
}

const DEV_PAGE: &str = include_str!("../assets/index.html");
const DEV_JS: &str = include_str!("../../../clients/js/wsgate.js");

async fn dev_page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DEV_PAGE,
    )
        .into_response()
}

async fn dev_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        DEV_JS,
    )
        .into_response()
}

#[derive(Deserialize)]
struct DevTokenQuery {
    sub: Option<String>,
}

/// Dev mode only: a token for any user name, all rooms, valid one hour.
async fn dev_token(State(app): State<Arc<App>>, Query(q): Query<DevTokenQuery>) -> Response {
    let Some(secret) = &app.config.hmac_secret else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "dev tokens need an HMAC secret",
        );
    };
    let sub = q.sub.unwrap_or_else(|| "dev".to_owned());
    let sub = sub.trim();
    if sub.is_empty() || sub.len() > 64 {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "sub must be 1 to 64 characters",
        );
    }
    let all = ["*".to_owned()];
    match auth::mint_hs256(secret, &dev_mint_request(sub, &all, &app.config)) {
        // Readable from any origin: a page served by one node of a dev
        // cluster fetches tokens from the others when its own node is gone.
        Ok(token) => (
            [(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")],
            Json(json!({"token": token})),
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

#[derive(Deserialize)]
struct DevCheckQuery {
    origin: Option<String>,
}

/// Dev mode only: would `/ws` accept this origin and token? A browser cannot
/// see the HTTP status of a refused WebSocket upgrade (only a bare 1006), so
/// the chat page asks here to tell the user why. Same answers as the
/// upgrade's Origin and token checks; readable from any origin.
async fn dev_check(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<DevCheckQuery>,
) -> Response {
    let answer = match q.origin.as_deref().map(|o| o.trim_end_matches('/')) {
        Some(origin) if !app.config.origins.allows(origin) => error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("origin {origin} not allowed (add it to --allowed-origins)"),
        ),
        _ => match authenticate(&app, &headers, &uri) {
            Ok(_) => Json(json!({"ok": true})).into_response(),
            Err(e) => unauthorized(&e),
        },
    };
    (
        [(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        )],
        answer,
    )
        .into_response()
}

/// The request dev mode mints: every room, one hour, with the configured
/// issuer and audience.
pub fn dev_mint_request<'a>(
    sub: &'a str,
    all: &'a [String],
    config: &'a crate::Config,
) -> MintRequest<'a> {
    MintRequest {
        sub,
        rooms: all,
        publish: all,
        ttl: Duration::from_secs(3600),
        issuer: config.jwt_issuer.as_deref(),
        audience: config.jwt_audience.as_deref(),
    }
}
