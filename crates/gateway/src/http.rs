//! The public router: `GET /ws` (checks before the upgrade), the HTTP
//! publish API, and in dev mode the chat page and a token endpoint.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::{debug, info_span, warn};
use wsgate_protocol::{is_valid_room, MessageParts};

use crate::auth::{self, AuthError, Claims, MintRequest};
use crate::metrics::Rejection;
use crate::session::{self, now_ms};
use crate::App;

/// The peer address of an HTTP connection (set by the listener).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Read buffer of each WebSocket: small, since most frames are small and
/// idle connections should cost little; larger frames grow it as needed.
const WS_READ_BUFFER: usize = 256;
/// Bytes the WebSocket gathers before writing to the socket; the writer
/// flushes at the end of every batch anyway.
const WS_WRITE_BUFFER: usize = 16 * 1024;

/// The router of the public listener.
pub fn router(app: Arc<App>) -> Router {
    let max_body = app.config.max_message_bytes;
    let mut router = Router::new().route("/ws", get(upgrade)).route(
        "/api/rooms/{room}/messages",
        post(api_publish).layer(DefaultBodyLimit::max(max_body)),
    );
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
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                info_span!(
                    "http",
                    method = %req.method(),
                    uri = %auth::redact_query(&req.uri().to_string()),
                    remote = %remote(req.headers(), req.extensions().get::<PeerAddr>()),
                )
            }),
        )
        .with_state(app)
}

/// The client's address for logs: the first `X-Forwarded-For` entry when
/// a proxy set one, else the TCP peer.
fn remote(headers: &HeaderMap, peer: Option<&PeerAddr>) -> String {
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_owned())
        .or_else(|| peer.map(|p| p.0.to_string()))
        .unwrap_or_default()
}

fn unauthorized(e: &AuthError) -> Response {
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

fn unavailable(retry_after: &'static str, message: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, HeaderValue::from_static(retry_after))],
        Json(json!({"error": "unavailable", "message": message})),
    )
        .into_response()
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let message: String = message.into();
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

fn authenticate(app: &App, headers: &HeaderMap, uri: &Uri) -> Result<Claims, AuthError> {
    let token = auth::token_from_request(headers, uri.query()).ok_or(AuthError::Missing)?;
    app.config.verifier.verify(&token)
}

async fn upgrade(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    uri: Uri,
    peer: Option<axum::Extension<PeerAddr>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match headers.get(header::ORIGIN) {
        Some(origin) => {
            let allowed = origin
                .to_str()
                .is_ok_and(|o| app.config.origins.allows(o.trim_end_matches('/')));
            if !allowed {
                app.metrics.reject(Rejection::Origin);
                return error(StatusCode::FORBIDDEN, "forbidden", "origin not allowed");
            }
        }
        None if app.config.require_origin => {
            app.metrics.reject(Rejection::Origin);
            return error(StatusCode::FORBIDDEN, "forbidden", "origin required");
        }
        None => {}
    }
    let claims = match authenticate(&app, &headers, &uri) {
        Ok(c) => c,
        Err(e) => {
            debug!(reason = e.reason(), "token refused");
            app.metrics.reject(Rejection::Auth);
            return unauthorized(&e);
        }
    };
    let Some(slot) = app.try_slot() else {
        app.metrics.reject(Rejection::Capacity);
        return if app.is_draining() {
            unavailable("1", "node is draining; reconnect to another node")
        } else {
            unavailable("5", "node is at its connection limit")
        };
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            app.metrics.reject(Rejection::BadRequest);
            return rejection.into_response();
        }
    };
    app.metrics.connections_accepted.inc();
    let max = app.config.max_message_bytes;
    let remote = remote(&headers, peer.as_ref().map(|p| &p.0));
    let session_app = app.clone();
    ws.read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(|e| warn!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| {
            app.track_session(session::start(socket, session_app, claims, &remote, slot))
        })
}

async fn api_publish(
    State(app): State<Arc<App>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let claims = match authenticate(&app, &headers, &uri) {
        Ok(c) => c,
        Err(e) => return unauthorized(&e),
    };
    if !is_valid_room(&room) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "invalid room name: 1 to 128 characters of A-Z a-z 0-9 _ - . :",
        );
    }
    if !claims.publish.allows(&room) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("not allowed to publish to room '{room}'"),
        );
    }
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "bad_request"
            };
            return error(status, code, rejection.body_text());
        }
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
    app.metrics.messages_received.inc();
    let parts = MessageParts::new(&room, &claims.sub, data, now_ms());
    match app.publish(&room, parts).await {
        Ok(seq) => Json(json!({"room": room, "seq": seq})).into_response(),
        Err(e) => unavailable("1", &format!("{e}; message not delivered")),
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
        Ok(token) => Json(json!({"token": token})).into_response(),
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
