//! The relay on a Redis Cluster (`--redis-cluster`): sharded pub/sub.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{control, keys, redact_url, sharded_channel, Conn, Inner, SubCmd, COMMAND_TIMEOUT};

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
    let channels = [control::CHANNEL.to_owned(), inner.control.own_channel()];
    if let Err(e) = conn.subscribe(&channels).await {
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
                        if let Some(ready) = inner.subs().get(&room) {
                            ready.send_replace(true);
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
                        // The control channels (the only plain ones).
                        if let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) = (push.data.first(), push.data.get(1)) {
                            if let Ok(channel) = std::str::from_utf8(channel) {
                                inner.on_message(channel, payload).await;
                            }
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
                                if let Some((epoch, last)) = inner.delivery.position(&room) {
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

/// The cluster's primaries as one server sees them (`CLUSTER NODES`):
/// whether every slot-owning primary is up (none flagged `fail` or
/// `fail?`), and which addresses serve slots. The health check's `PING`
/// alone cannot tell: the cluster client fans it out only to the primaries
/// it still holds connections to, so a dead primary is skipped.
pub(super) async fn primaries(conn: &mut Conn) -> Option<(bool, String)> {
    let nodes = tokio::time::timeout(
        COMMAND_TIMEOUT,
        redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async::<String>(conn),
    )
    .await;
    match nodes {
        Ok(Ok(text)) => Some(parse_primaries(&text)),
        _ => None,
    }
}

/// `CLUSTER NODES` lines: `id addr flags primary ping pong epoch link
/// slot...`. Returns (no slot-owning primary failed, the sorted addresses
/// of the slot-owning primaries).
fn parse_primaries(nodes: &str) -> (bool, String) {
    let mut up = true;
    let mut serving = Vec::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = fields.get(2).copied().unwrap_or("");
        if fields.len() > 8 && flags.split(',').any(|f| f == "master") {
            up &= !flags.contains("fail");
            serving.push(fields[1]);
        }
    }
    serving.sort_unstable();
    (up, serving.join(" "))
}

/// The primaries changed (a replica took over): make the cluster client
/// learn the new topology, then check that every subscribed room's slot
/// answers. The client re-reads the slot map only when a command fails on
/// the old one with a redirection, so one `EXISTS` goes to each primary
/// directly: those not owning its slot answer `MOVED`. On the new slot map
/// the client re-subscribes the sharded channels on the new primaries, and
/// each re-subscription catches up from the room's log (a new epoch,
/// announced to the members). Without this, a node that publishes nothing
/// to a room would keep its subscription on the dead primary. Returns
/// whether every room answered (else the health check tries again).
pub(super) async fn follow_topology(inner: &Inner, conn: &Conn, primaries: &str) -> bool {
    let Conn::Cluster(cluster) = conn else {
        return true;
    };
    let rooms: Vec<Arc<str>> = inner.subs().keys().cloned().collect();
    let Some(first) = rooms.first() else {
        return true;
    };
    info!(
        rooms = rooms.len(),
        "redis cluster primaries changed; re-routing the rooms"
    );
    let [probe, _, _] = keys(first);
    for addr in primaries.split(' ') {
        let addr = addr.split(['@', ',']).next().unwrap_or(addr);
        let Some((host, port)) = addr.rsplit_once(':') else {
            continue;
        };
        let Ok(port) = port.parse() else { continue };
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.to_owned(),
            port,
        });
        let mut exists = redis::cmd("EXISTS");
        exists.arg(&probe);
        let mut cluster = cluster.clone();
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, cluster.route_command(exists, route)).await;
    }
    let failed = AtomicUsize::new(0);
    futures_util::stream::iter(rooms)
        .for_each_concurrent(16, |room| {
            let mut conn = conn.clone();
            let failed = &failed;
            async move {
                let [seq, _, _] = keys(&room);
                let mut exists = redis::cmd("EXISTS");
                exists.arg(seq);
                let answer =
                    tokio::time::timeout(COMMAND_TIMEOUT, exists.query_async::<i64>(&mut conn))
                        .await;
                if !matches!(answer, Ok(Ok(_))) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
    failed.load(Ordering::Relaxed) == 0
}

#[cfg(test)]
mod tests {
    use super::parse_primaries;

    fn has_failed_primary(nodes: &str) -> bool {
        !parse_primaries(nodes).0
    }

    #[test]
    fn a_failed_primary_with_slots_is_seen() {
        let ok = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                  b 127.0.0.1:7001@17001 slave a 0 0 1 connected\n\
                  c 127.0.0.1:7002@17002 master,fail - 0 0 2 disconnected\n";
        assert!(!has_failed_primary(ok), "a failed primary without slots");
        let pfail = "a 127.0.0.1:7000@17000 master,fail? - 0 0 1 connected 0-5460\n";
        assert!(has_failed_primary(pfail));
        let fail = "a 127.0.0.1:7000@17000 master,fail - 0 0 1 connected 0-5460\n";
        assert!(has_failed_primary(fail));
        assert!(!has_failed_primary(""));
        assert_eq!(parse_primaries(ok).1, "127.0.0.1:7000@17000");
    }
}
