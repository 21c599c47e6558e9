//! Handing a POST to the node that holds its stream (PROTOCOL.md section
//! 7, "any node").
//!
//! A stream's connection id names its node (`<id>.<node, base64url>`), so
//! the node that receives a POST for a stream it does not hold knows where
//! to send it. With Redis the POST travels as a [`ControlMsg::SsePost`] on
//! that node's own control channel
//! ([`crate::broker::control::node_channel`]); the holder delivers it to
//! the stream and answers on the sender's channel
//! ([`ControlMsg::SseAnswer`]), so that the client gets the real 202, 403,
//! 404 or 503. No answer within [`ANSWER_WAIT`] means no node holds the
//! stream (its node is gone or stopped): 404. The holder delivers a POST
//! only within [`DELIVER_WITHIN`] of its sending, so that a POST answered
//! 404 is never acted on later (a stopped node resumed, Redis delivered
//! late). The in-process broker has one node, so
//! a stream of another node does not exist: 404 at once.

use std::sync::Arc;

use axum::body::Bytes;

use super::Delivery;
use crate::broker::control::{ControlMsg, ANSWER_WAIT, DELIVER_WITHIN};
use crate::config::BrokerChoice;
use crate::state::App;

/// Hand the POST (`body`, of `user`, already checked to be a JSON object
/// or array) for stream `conn` to the node that holds it.
pub async fn forward(app: &Arc<App>, conn: &str, user: &str, body: &Bytes) -> Delivery {
    let Some(node) = super::node_of(conn) else {
        return Delivery::NotFound;
    };
    if matches!(app.config.broker, BrokerChoice::Memory) {
        return Delivery::NotFound;
    }
    let Ok(body) = std::str::from_utf8(body) else {
        return Delivery::NotFound;
    };
    let (req, answer) = app.control.expect_answer();
    let msg = ControlMsg::SsePost {
        to: node,
        from: app.config.node_id.to_string(),
        req,
        conn: conn.to_owned(),
        user: user.to_owned(),
        body: body.to_owned(),
        deliver_by_ms: Some(crate::session::now_ms() + DELIVER_WITHIN.as_millis() as u64),
    };
    if app.broker.control(&msg).await.is_err() {
        app.control.forget(req);
        return Delivery::Unavailable;
    }
    match tokio::time::timeout(ANSWER_WAIT, answer).await {
        Ok(Ok(delivery)) => delivery,
        _ => {
            app.control.forget(req);
            Delivery::NotFound
        }
    }
}
