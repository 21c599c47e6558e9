//! Handing a POST to the node that holds its stream.

use std::sync::Arc;

use axum::body::Bytes;

use super::Delivery;
use crate::state::App;

/// Hand the POST (`body`, of `user`) for stream `conn` to the node that
/// holds it.
pub async fn forward(_app: &Arc<App>, _conn: &str, _user: &str, _body: &Bytes) -> Delivery {
    Delivery::NotFound
}
