//! The server's answer to a WebSocket handshake (RFC 6455 4.2.2). The
//! request itself is checked by axum's `WebSocketUpgrade` extractor; the
//! accept key comes from `tungstenite`; permessage-deflate is negotiated by
//! [`crate::deflate`].

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::deflate::Agreement;

/// The `101 Switching Protocols` response to a checked upgrade request,
/// with the negotiated permessage-deflate parameters if any.
pub fn switching_protocols(headers: &HeaderMap, deflate: Option<Agreement>) -> Response<Body> {
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map_or(&[][..], |k| k.as_bytes());
    let accept = tungstenite::handshake::derive_accept_key(key);
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(agreement) = deflate {
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static(agreement.header_value()),
        );
    }
    res
}
