//! The server API (PROTOCOL.md section 8), for back-end services holding the
//! `--api-key`: disconnect (and revoke) a user on every node, read a room's
//! history, and publish as `"server"` (through the HTTP publish handler in
//! [`http`](crate::http)). Without `--api-key` the server-only endpoints
//! answer 404.
//!
//! The key is sent as `Authorization: apikey KEY` or `X-API-Key: KEY` and
//! compared in constant time; it never appears in logs or `Debug` output.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;
use tracing::info;
use wsgate_protocol::is_valid_room;

use crate::auth::{token_from_request, AuthError, Claims};
use crate::broker::control::ControlMsg;
use crate::http::{authenticate, error, linger, take_body, unauthorized, unavailable, BodyBudget};
use crate::state::App;

/// Messages a history page returns when `limit` is not given.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;
/// The largest history page; a larger `limit` is capped to it.
pub const MAX_HISTORY_LIMIT: usize = 1000;
/// `from` of messages published with the API key.
pub const SERVER_SENDER: &str = "server";

/// The server API key (`--api-key`).
#[derive(Clone)]
pub struct ApiKey(Arc<[u8]>);

impl ApiKey {
    /// A key from the flag's value: not empty.
    pub fn parse(s: &str) -> Result<ApiKey, String> {
        if s.is_empty() {
            return Err("the API key must not be empty".to_owned());
        }
        Ok(ApiKey(Arc::from(s.as_bytes())))
    }

    /// Whether `given` is the key, compared in constant time (only the
    /// length can be told apart by timing).
    pub fn matches(&self, given: &str) -> bool {
        self.0.ct_eq(given.as_bytes()).into()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// The API key a request presents: `X-API-Key: KEY`, or
/// `Authorization: apikey KEY` (scheme case-insensitive).
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-api-key") {
        return v.to_str().ok().map(str::trim);
    }
    headers.get_all(header::AUTHORIZATION).iter().find_map(|v| {
        let (scheme, rest) = v.to_str().ok()?.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("apikey").then(|| rest.trim())
    })
}

/// Who makes an API call.
pub enum Caller {
    /// The holder of the API key.
    Server,
    /// A Bearer token's user.
    User(Box<Claims>),
}

impl Caller {
    /// The name messages are published under (`from`).
    pub fn name(&self) -> &str {
        match self {
            Caller::Server => SERVER_SENDER,
            Caller::User(c) => &c.sub,
        }
    }
}

/// What a caller wants to do with a room.
#[derive(Debug, Clone, Copy)]
pub enum RoomAction {
    /// Publish to it (the `publish` grant).
    Publish,
    /// Read its history (the `rooms` grant).
    Read,
}

/// The caller of a room endpoint, checked in the order of the HTTP publish
/// API: credentials (401), room name (400), grant (403).
pub fn room_caller(
    app: &App,
    headers: &HeaderMap,
    uri: &Uri,
    room: &str,
    action: RoomAction,
) -> Result<Caller, Refusal> {
    let caller = caller(app, headers, uri)?;
    if !is_valid_room(room) {
        return Err(Refusal::BadRoom);
    }
    let allowed = match (&caller, action) {
        (Caller::Server, _) => true,
        (Caller::User(c), RoomAction::Publish) => c.publish.allows(room),
        (Caller::User(c), RoomAction::Read) => c.rooms.allows(room),
    };
    if !allowed {
        return Err(Refusal::Forbidden {
            action: match action {
                RoomAction::Publish => "publish to",
                RoomAction::Read => "read",
            },
            room: room.to_owned(),
        });
    }
    Ok(caller)
}

/// Why an API call is refused before it does anything.
pub enum Refusal {
    /// 404: the server API is not enabled.
    NotEnabled,
    /// 401: the API key is missing or wrong.
    WrongKey,
    /// 401: the Bearer token is missing or invalid.
    Token(AuthError),
    /// 400: not a valid room name.
    BadRoom,
    /// 403: the token's grants do not cover the room.
    Forbidden {
        /// What was refused, e.g. `publish to`.
        action: &'static str,
        /// The room.
        room: String,
    },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::NotEnabled => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "the server API is not enabled (--api-key)",
            ),
            Refusal::WrongKey => (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("apikey realm=\"wsgate\""),
                )],
                Json(json!({"error": "unauthorized", "message": "missing or wrong API key"})),
            )
                .into_response(),
            Refusal::Token(e) => unauthorized(&e),
            Refusal::BadRoom => error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "invalid room name: 1 to 128 characters of A-Z a-z 0-9 _ - . :",
            ),
            Refusal::Forbidden { action, room } => error(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("not allowed to {action} room '{room}'"),
            ),
        }
    }
}

/// The caller of an endpoint open to the API key and to Bearer tokens: a
/// request presenting an API key is judged by it when the server API is
/// enabled, and is 404 when it is not (unless it also has a Bearer token);
/// otherwise the Bearer token decides.
pub fn caller(app: &App, headers: &HeaderMap, uri: &Uri) -> Result<Caller, Refusal> {
    match (&app.config.api_key, presented_key(headers)) {
        (Some(key), Some(given)) if key.matches(given) => return Ok(Caller::Server),
        (Some(_), Some(_)) => return Err(Refusal::WrongKey),
        (None, Some(_)) if token_from_request(headers, uri.query()).is_none() => {
            return Err(Refusal::NotEnabled)
        }
        _ => {}
    }
    authenticate(app, headers, uri)
        .map(|c| Caller::User(Box::new(c)))
        .map_err(Refusal::Token)
}

/// An endpoint for the API key only: 404 when the server API is not
/// enabled, 401 without the right key.
fn server_only(app: &App, headers: &HeaderMap) -> Result<(), Refusal> {
    let key = app.config.api_key.as_ref().ok_or(Refusal::NotEnabled)?;
    match presented_key(headers) {
        Some(given) if key.matches(given) => Ok(()),
        _ => Err(Refusal::WrongKey),
    }
}

/// The body of a disconnect: nothing, or `{"revoke": bool}`.
fn parse_revoke(body: &[u8]) -> Result<bool, &'static str> {
    let text = std::str::from_utf8(body).map_err(|_| "body is not valid JSON")?;
    if text.trim().is_empty() {
        return Ok(false);
    }
    let value: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|_| "body is not valid JSON")?;
    let obj = value
        .as_object()
        .ok_or("body must be a JSON object like {\"revoke\":true}")?;
    match obj.get("revoke") {
        None | Some(serde_json::Value::Null) => Ok(false),
        Some(v) => v.as_bool().ok_or("\"revoke\" must be true or false"),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `POST /api/users/{user}/disconnect`, body optionally `{"revoke":true}`.
/// The key is checked from the head, before any body byte is read (no
/// `100 Continue` for a wrong key); the body then goes through the same
/// budget, size and `--body-timeout` rules as a publish.
pub(crate) async fn disconnect(
    State(app): State<Arc<App>>,
    Extension(budget): Extension<BodyBudget>,
    user: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(r) = server_only(&app, &headers) {
        return linger(&budget, &headers, body, r.into_response());
    }
    let user = match user {
        Ok(Path(user)) if !user.is_empty() => user,
        _ => {
            let refused = error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the user must be a non-empty UTF-8 string",
            );
            return linger(&budget, &headers, body, refused);
        }
    };
    let (body, _held) = match take_body(&app, &budget, &headers, body).await {
        Ok(taken) => taken,
        Err(refused) => return refused,
    };
    let revoke = match parse_revoke(&body) {
        Ok(revoke) => revoke,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
    };
    let msg = ControlMsg::Disconnect {
        user: user.clone(),
        revoked_at: revoke.then(unix_now),
    };
    if let Err(e) = app.broker.control(&msg).await {
        return unavailable("1", &format!("{e}; user not disconnected"));
    }
    let (closed, _) = app.control.apply(&msg);
    info!(
        user,
        revoke,
        closed_here = closed,
        "server API: user disconnected"
    );
    (StatusCode::ACCEPTED, Json(json!({ "user": user }))).into_response()
}

#[derive(Serialize)]
struct HistoryPage<'a> {
    room: &'a str,
    epoch: &'a str,
    seq: u64,
    messages: Vec<Box<RawValue>>,
}

/// `since` and `limit` of a history request; Err is the 400 message.
fn history_query(query: Option<&str>) -> Result<(u64, usize), String> {
    let mut since = 0;
    let mut limit = DEFAULT_HISTORY_LIMIT;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        // Percent-encoded as any query may be (`since=%31` is `since=1`).
        let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
        let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
        let value = value.as_ref();
        match key.as_ref() {
            "since" => {
                since = value
                    .parse()
                    .map_err(|_| format!("since must be a whole number >= 0, got {value:?}"))?
            }
            "limit" => {
                let n: usize = value
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .or_else(|| {
                        // Beyond usize: capped like any limit above the maximum.
                        (value.len() > 18 && value.bytes().all(|b| b.is_ascii_digit()))
                            .then_some(MAX_HISTORY_LIMIT)
                    })
                    .ok_or_else(|| format!("limit must be a whole number >= 1, got {value:?}"))?;
                limit = n.min(MAX_HISTORY_LIMIT);
            }
            _ => {}
        }
    }
    Ok((since, limit))
}

/// `GET /api/rooms/{room}/history?since=S&limit=N`, with the API key or a
/// Bearer token whose `rooms` grant covers the room.
pub async fn history(
    State(app): State<Arc<App>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Response {
    if app.config.api_key.is_none() {
        return Refusal::NotEnabled.into_response();
    }
    if let Err(r) = room_caller(&app, &headers, &uri, &room, RoomAction::Read) {
        return r.into_response();
    }
    let (since, limit) = match history_query(query.as_deref()) {
        Ok(q) => q,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
    };
    match app.broker.range(&room, since, limit).await {
        Ok(h) => Json(HistoryPage {
            room: &room,
            epoch: &h.epoch,
            seq: h.latest,
            messages: h
                .frames
                .iter()
                .filter_map(|f| RawValue::from_string(f.as_str().to_owned()).ok())
                .collect(),
        })
        .into_response(),
        Err(e) => unavailable("1", &format!("{e}; retry later")),
    }
}

/// Counts every `/api` call by route pattern and status
/// (`wsgate_api_requests_total`).
pub async fn count(
    State(app): State<Arc<App>>,
    path: MatchedPath,
    req: Request,
    next: Next,
) -> Response {
    let resp = next.run(req).await;
    app.metrics.api_call(path.as_str(), resp.status().as_u16());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_from_either_header() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        assert_eq!(presented_key(&h), None);
        h.append("authorization", HeaderValue::from_static("ApiKey  k1 "));
        assert_eq!(presented_key(&h), Some("k1"));
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(presented_key(&h), Some("k2"));
    }

    #[test]
    fn revoke_body() {
        assert_eq!(parse_revoke(b""), Ok(false));
        assert_eq!(parse_revoke(b" \n"), Ok(false));
        assert_eq!(parse_revoke(b"{}"), Ok(false));
        assert_eq!(parse_revoke(br#"{"revoke":true}"#), Ok(true));
        assert_eq!(parse_revoke(br#"{"revoke":false,"x":1}"#), Ok(false));
        for bad in [&b"{"[..], b"[]", b"true", br#"{"revoke":"yes"}"#, b"\xff"] {
            assert!(parse_revoke(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn history_query_bounds() {
        assert_eq!(history_query(None), Ok((0, 100)));
        assert_eq!(history_query(Some("since=5&limit=2")), Ok((5, 2)));
        assert_eq!(history_query(Some("limit=5000")), Ok((0, 1000)));
        assert_eq!(
            history_query(Some("limit=99999999999999999999999")),
            Ok((0, 1000))
        );
        assert_eq!(history_query(Some("other=x&limit=1000")), Ok((0, 1000)));
        assert_eq!(history_query(Some("since=%31%32&%6cimit=%33")), Ok((12, 3)));
        for bad in [
            "since=-1",
            "since=abc",
            "since=",
            "since",
            "limit=0",
            "limit=-3",
            "limit=x",
        ] {
            assert!(history_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
