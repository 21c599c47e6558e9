//! The relay on a Redis Cluster (`--redis-cluster`): sharded pub/sub.

use std::sync::Arc;

use redis::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{control, redact_url, sharded_channel, Conn, Inner, SubCmd, COMMAND_TIMEOUT};

/// The relay on a Redis Cluster: one `SSUBSCRIBE` per room per node on the
/// shard that owns the room; messages arrive as RESP3 pushes. The library
/// re-subscribes after a reconnect or a slot move; each re-subscription
/// triggers the same catch-up from the room's log as the standalone relay.
pub(super) async fn sharded_relay(
    inner: Arc<Inner>,
    mut commands: mpsc::UnboundedReceiver<SubCmd>,
    mut pushes: mpsc::UnboundedReceiver<redis::PushInfo>,
    stop: CancellationToken,
) {
    let Ok(Conn::Cluster(mut conn)) = inner.conn() else {
        return;
    };
    // The control channel is not sharded: PUBLISH reaches every shard.
    if let Err(e) = conn.subscribe(control::CHANNEL).await {
        warn!(error = %redact_url(&e.to_string()), "redis cluster: control channel subscription failed");
    }
    inner.set_relay_up(true);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { return };
                let timed_out = || redis::RedisError::from((redis::ErrorKind::Io, "redis timed out"));
                let result = match &cmd {
                    SubCmd::Subscribe(room) => tokio::time::timeout(
                        COMMAND_TIMEOUT,
                        conn.ssubscribe(sharded_channel(room)),
                    )
                    .await
                    .map_err(|_| timed_out())
                    .and_then(|r| r),
                    SubCmd::Unsubscribe(room) => tokio::time::timeout(
                        COMMAND_TIMEOUT,
                        conn.sunsubscribe(sharded_channel(room)),
                    )
                    .await
                    .map_err(|_| timed_out())
                    .and_then(|r| r),
                };
                match (result, cmd) {
                    (Ok(()), SubCmd::Subscribe(room)) => {
                        if let Some(state) = inner.subs().get(&room) {
                            state.ready.send_replace(true);
                        }
                    }
                    (Ok(()), SubCmd::Unsubscribe(_)) => {}
                    (Err(e), _) => {
                        warn!(error = %redact_url(&e.to_string()), "redis cluster subscription change failed");
                    }
                }
                inner.metrics.subscriptions.set(inner.subs().len() as i64);
            }
            push = pushes.recv() => {
                let Some(push) = push else { return };
                match push.kind {
                    redis::PushKind::SMessage => {
                        let mut data = push.data.into_iter();
                        if let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) = (data.next(), data.next()) {
                            if let Ok(channel) = std::str::from_utf8(&channel) {
                                inner.on_message(channel, &payload).await;
                            }
                        }
                    }
                    redis::PushKind::Message => {
                        if let Some(Value::BulkString(payload)) = push.data.get(1) {
                            inner.control.on_message(payload);
                        }
                    }
                    redis::PushKind::Subscribe => {
                        if let Ok(conn) = inner.conn() {
                            inner.control.reload(conn).await;
                        }
                    }
                    redis::PushKind::SSubscribe => {
                        // A (re-)subscription: catch up on what may have
                        // been missed while the shard was unreachable.
                        if let Some(Value::BulkString(channel)) = push.data.first() {
                            let room = std::str::from_utf8(channel).ok().and_then(|c| inner.room_of(c)).map(str::to_owned);
                            if let Some(room) = room {
                                if let Some((epoch, last)) = inner.rooms.position(&room) {
                                    inner.fill(&room, &epoch, last, None).await;
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
