//! Presence across a cluster, kept in Redis under per-node leases.
//!
//! Keys (the `{R}` hash tag keeps a room's presence keys on the room's
//! cluster slot, beside its history):
//! - `wsgate:{R}:pu`: sorted set of the room's present users, all with score
//!   0, so that `ZCARD` is the count and `ZRANGE 0 999` the first 1,000 in
//!   order: a query costs the same in a room of 20 or 20,000 users.
//! - `wsgate:{R}:pr`: hash user -> how many node incarnations hold the user.
//! - `wsgate:{R}:pn:<inc>`: set of the users node incarnation `<inc>` holds.
//! - `wsgate:presence:{<inc>}:rooms`: set of the rooms `<inc>` holds users in.
//! - `wsgate:presence:{leases}`: sorted set incarnation -> when its lease
//!   runs out (Redis clock, ms): its last renewal plus *its own*
//!   `--presence-ttl`, so nodes with different TTLs judge each other right.
//! - `wsgate:presence:{leases}:ttls`: hash incarnation -> its TTL (ms), for
//!   the removal metric (same hash tag: one cluster slot).
//!
//! A node's incarnation is its node id plus a random suffix, renewed each
//! time its lease is found missing. Every join or leave only marks
//! (room, user) dirty; one task per node writes the dirty set with one
//! idempotent script per entry (SADD/SREM, HINCRBY, ZADD/ZREM, and a
//! `!+user` / `!-user` publish on the room's relay channel when the user's
//! cluster-wide presence changed), many in flight at once on the
//! multiplexed connection, so a reconnect storm is a few pipelined batches,
//! not a round trip per client.
//!
//! Every `ttl / 3` a node renews its lease and reaps leases that ran out:
//! for each dead incarnation (claimed atomically by one reaper) each
//! of its rooms is cleaned by a script that decrements its users and
//! announces those who left. A lease found missing at renewal (Redis
//! restarted empty, or the node was cut off long enough to be reaped)
//! starts a new incarnation that re-announces every local member.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::Script;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use wsgate_protocol::MAX_PRESENCE_USERS;

use super::{lock, Presence, PresenceMetrics, Snapshot};
use crate::broker::redis::{Conn, Link};
use crate::broker::BrokerError;

/// The leases (v1.0 of presence used `wsgate:presence:nodes`, scored by
/// the last renewal, which a node judged by its own TTL).
const NODES: &str = "wsgate:presence:{leases}";
/// Each lease's TTL (the same hash tag: one Redis Cluster slot for the
/// lease scripts' two keys).
const TTLS: &str = "wsgate:presence:{leases}:ttls";
/// Scripts in flight at once during a flush.
const IN_FLIGHT: usize = 256;
/// Dead incarnations one reap claims.
const REAP_BATCH: usize = 16;
/// Pause after a failed flush before the next attempt.
const RETRY: Duration = Duration::from_millis(500);
/// Longest a join waits for its presence to be written.
const SETTLE_WAIT: Duration = Duration::from_secs(1);

/// KEYS: held, refs, users. ARGV: user, '1' add / '0' remove, channel,
/// publish command. Idempotent: an add of a user the incarnation already
/// holds (or a remove of one it does not) changes nothing.
const CHANGE_LUA: &str = r"
local u = ARGV[1]
if ARGV[2] == '1' then
  if redis.call('SADD', KEYS[1], u) == 1 and redis.call('HINCRBY', KEYS[2], u, 1) == 1 then
    redis.call('ZADD', KEYS[3], 0, u)
    redis.call(ARGV[4], ARGV[3], '!+' .. u)
  end
elseif redis.call('SREM', KEYS[1], u) == 1 then
  if redis.call('HINCRBY', KEYS[2], u, -1) <= 0 then
    redis.call('HDEL', KEYS[2], u)
    redis.call('ZREM', KEYS[3], u)
    redis.call(ARGV[4], ARGV[3], '!-' .. u)
  end
end
return 0
";

/// KEYS: held, refs, users. ARGV: channel, publish command. Removes every
/// user an incarnation held in the room.
const CLEAN_LUA: &str = r"
local users = redis.call('SMEMBERS', KEYS[1])
for _, u in ipairs(users) do
  if redis.call('HINCRBY', KEYS[2], u, -1) <= 0 then
    redis.call('HDEL', KEYS[2], u)
    redis.call('ZREM', KEYS[3], u)
    redis.call(ARGV[2], ARGV[1], '!-' .. u)
  end
end
redis.call('DEL', KEYS[1])
return #users
";

/// KEYS: leases, ttls. ARGV: incarnation, ttl (ms). Renews the lease
/// until now + ttl; 1 if it existed.
const RENEW_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if old then return 1 end
return 0
";

/// KEYS: leases, ttls. ARGV: limit. Claims (removes) up to `limit` leases
/// that ran out; returns {inc, ms since its last renewal, ...}, -1 for a
/// lease put back to be reaped again (score 0).
const REAP_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for i = 1, #dead, 2 do
  local until_ms = tonumber(dead[i + 1])
  local ttl = tonumber(redis.call('HGET', KEYS[2], dead[i]) or '0')
  redis.call('ZREM', KEYS[1], dead[i])
  redis.call('HDEL', KEYS[2], dead[i])
  table.insert(out, dead[i])
  if until_ms > 0 then
    table.insert(out, tostring(now - until_ms + ttl))
  else
    table.insert(out, '-1')
  end
end
return out
";

/// A (room, user) of this node.
type Entry = (Arc<str>, Arc<str>);

fn users_key(room: &str) -> String {
    format!("wsgate:{{{room}}}:pu")
}
fn refs_key(room: &str) -> String {
    format!("wsgate:{{{room}}}:pr")
}
fn held_key(room: &str, inc: &str) -> String {
    format!("wsgate:{{{room}}}:pn:{inc}")
}
fn rooms_key(inc: &str) -> String {
    format!("wsgate:presence:{{{inc}}}:rooms")
}

fn new_incarnation(node: &str) -> String {
    format!("{node}-{:08x}", rand::random::<u32>())
}

fn failed(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(crate::broker::redact_url(&e.to_string()))
}

/// The Redis side of a node's presence.
pub struct RedisPresence {
    link: Link,
    node: String,
    ttl: Duration,
    inc: Mutex<String>,
    /// Entries to write, and how many batches were taken from it so far.
    dirty: Mutex<(HashSet<Entry>, u64)>,
    /// The last batch written (or given up on).
    done: tokio::sync::watch::Sender<u64>,
    wake: Notify,
    /// Held during a flush; `stop` takes it so that no write follows its
    /// clean-up.
    flushing: tokio::sync::Mutex<()>,
    stopped: AtomicBool,
    change: Script,
    clean: Script,
    renew: Script,
    reap: Script,
}

impl Presence {
    /// Presence of a cluster node: kept in Redis through `link`, with a
    /// lease of `ttl`; its tasks run on `tasks` until `stop`.
    pub fn redis(
        link: Link,
        ttl: Duration,
        metrics: PresenceMetrics,
        node: &str,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Arc<Presence> {
        let presence = Arc::new(Presence {
            local: Mutex::default(),
            redis: Some(RedisPresence {
                link: link.clone(),
                node: node.to_owned(),
                ttl,
                inc: Mutex::new(new_incarnation(node)),
                dirty: Mutex::default(),
                done: tokio::sync::watch::channel(0).0,
                wake: Notify::new(),
                flushing: tokio::sync::Mutex::new(()),
                stopped: AtomicBool::new(false),
                change: Script::new(CHANGE_LUA),
                clean: Script::new(CLEAN_LUA),
                renew: Script::new(RENEW_LUA),
                reap: Script::new(REAP_LUA),
            }),
            metrics,
        });
        link.attach(Arc::downgrade(&presence));
        tasks.spawn(flush_loop(presence.clone(), stop.clone()));
        tasks.spawn(lease_loop(presence.clone(), stop));
        presence
    }
}

impl RedisPresence {
    fn inc(&self) -> String {
        lock(&self.inc).clone()
    }

    /// `user`'s local presence in `room` changed: write it soon.
    pub(super) fn changed(&self, room: &str, user: &Arc<str>) {
        lock(&self.dirty).0.insert((Arc::from(room), user.clone()));
        self.wake.notify_one();
    }

    /// Wait (at most [`SETTLE_WAIT`]) until `user`'s presence in `room` as
    /// this node sees it is written, so that a query right after a join
    /// lists the joining user.
    pub(super) async fn settled(&self, room: &str, user: &str) {
        let mut done = self.done.subscribe();
        let written = |done: u64| {
            let dirty = lock(&self.dirty);
            // Not waiting, and every batch taken so far is written.
            !dirty.0.contains(&(Arc::from(room), Arc::from(user))) && done >= dirty.1
        };
        let _ = tokio::time::timeout(SETTLE_WAIT, async {
            while !written(*done.borrow_and_update()) {
                if done.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    pub(super) async fn query(&self, room: &str) -> Result<Snapshot, BrokerError> {
        let mut conn = self.link.conn()?;
        let (count, users): (u64, Vec<String>) = redis::pipe()
            .zcard(users_key(room))
            .zrange(users_key(room), 0, MAX_PRESENCE_USERS as isize - 1)
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        Ok(Snapshot { count, users })
    }

    /// Remove every user of `inc` from the rooms it held.
    async fn clean(&self, conn: &Conn, inc: &str) -> Result<(), BrokerError> {
        let rooms: Vec<String> = redis::cmd("SMEMBERS")
            .arg(rooms_key(inc))
            .query_async(&mut conn.clone())
            .await
            .map_err(failed)?;
        let results: Vec<redis::RedisResult<u64>> = futures_util::stream::iter(rooms)
            .map(|room| {
                let mut conn = conn.clone();
                let (channel, command) = self.link.channel(&room);
                async move {
                    self.clean
                        .key(held_key(&room, inc))
                        .key(refs_key(&room))
                        .key(users_key(&room))
                        .arg(channel)
                        .arg(command)
                        .invoke_async(&mut conn)
                        .await
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(failed(e));
        }
        redis::cmd("DEL")
            .arg(rooms_key(inc))
            .query_async::<()>(&mut conn.clone())
            .await
            .map_err(failed)
    }

    /// Drain: write nothing more, then remove this node's users at once.
    pub(super) async fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _flush = self.flushing.lock().await;
        let Ok(conn) = self.link.conn() else { return };
        let inc = self.inc();
        let done = tokio::time::timeout(Duration::from_secs(2), async {
            self.clean(&conn, &inc).await?;
            redis::pipe()
                .cmd("ZREM")
                .arg(NODES)
                .arg(&inc)
                .ignore()
                .cmd("HDEL")
                .arg(TTLS)
                .arg(&inc)
                .ignore()
                .query_async::<()>(&mut conn.clone())
                .await
                .map_err(failed)
        })
        .await;
        match done {
            Ok(Ok(())) => info!("presence: this node's users removed"),
            // The lease runs out and another node reaps the rest.
            _ => warn!("presence: could not remove this node's users; its lease will expire"),
        }
    }
}

/// Write dirty (room, user) entries, batched, until `stop`.
async fn flush_loop(p: Arc<Presence>, stop: CancellationToken) {
    let Some(r) = &p.redis else { return };
    let mut retry = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = r.wake.notified(), if !retry => {}
            _ = tokio::time::sleep(RETRY), if retry => {}
        }
        let guard = r.flushing.lock().await;
        if r.stopped.load(Ordering::Acquire) {
            return;
        }
        let (batch, round) = {
            let mut dirty = lock(&r.dirty);
            if dirty.0.is_empty() {
                retry = false;
                continue;
            }
            dirty.1 += 1;
            (dirty.0.drain().collect::<Vec<Entry>>(), dirty.1)
        };
        let failed = flush(&p, r, &batch).await;
        drop(guard);
        r.done.send_replace(round);
        retry = !failed.is_empty();
        if retry {
            debug!(entries = failed.len(), "presence: writes failed; retrying");
            lock(&r.dirty).0.extend(failed);
        }
    }
}

/// One batch: the entries that could not be written are returned.
async fn flush(p: &Presence, r: &RedisPresence, batch: &[Entry]) -> Vec<Entry> {
    let Ok(conn) = r.link.conn() else {
        return batch.to_vec();
    };
    let inc = r.inc();
    // Whether each entry is an add, read now: the latest local state wins.
    let ops: Vec<(Entry, bool)> = batch
        .iter()
        .map(|k| (k.clone(), p.is_local(&k.0, &k.1)))
        .collect();
    // The incarnation's room list first, so that a reaper finds every room
    // this batch adds users to.
    let rooms: HashSet<&str> = ops
        .iter()
        .filter(|(_, add)| *add)
        .map(|(k, _)| &*k.0)
        .collect();
    if !rooms.is_empty() {
        let added = redis::cmd("SADD")
            .arg(rooms_key(&inc))
            .arg(rooms.into_iter().collect::<Vec<_>>())
            .query_async::<()>(&mut conn.clone())
            .await;
        if added.is_err() {
            return batch.to_vec();
        }
    }
    futures_util::stream::iter(ops)
        .map(|(key, add)| {
            let mut conn = conn.clone();
            let (channel, command) = r.link.channel(&key.0);
            let held = held_key(&key.0, &inc);
            async move {
                let done: redis::RedisResult<()> = r
                    .change
                    .key(held)
                    .key(refs_key(&key.0))
                    .key(users_key(&key.0))
                    .arg(&*key.1)
                    .arg(if add { "1" } else { "0" })
                    .arg(channel)
                    .arg(command)
                    .invoke_async(&mut conn)
                    .await;
                done.err().map(|_| key)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// Renew this node's lease and reap dead ones every `ttl / 3`, until `stop`.
async fn lease_loop(p: Arc<Presence>, stop: CancellationToken) {
    let Some(r) = &p.redis else { return };
    let every = (r.ttl / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registered = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if r.stopped.load(Ordering::Acquire) {
            return;
        }
        let Ok(conn) = r.link.conn() else { continue };
        let inc = r.inc();
        let renewed = renew(r, &conn, &inc).await;
        match renewed {
            Ok(1) => registered = true,
            Ok(_) if !registered => registered = true,
            Ok(_) => {
                // Redis lost the lease (restarted empty), or another node
                // reaped it while this one was cut off: start over under a
                // new incarnation (the old one's clean-up may still run) and
                // announce every local member again.
                let _flush = r.flushing.lock().await;
                let fresh = new_incarnation(&r.node);
                warn!(old = %inc, new = %fresh, "presence: lease lost; re-announcing local members");
                *lock(&r.inc) = fresh.clone();
                let renewed = renew(r, &conn, &fresh).await;
                // Anything still written under the old incarnation is reaped.
                let _ = redis::cmd("ZADD")
                    .arg(NODES)
                    .arg(0)
                    .arg(&inc)
                    .query_async::<()>(&mut conn.clone())
                    .await;
                if renewed.is_ok() {
                    lock(&r.dirty).0.extend(p.all_local());
                    r.wake.notify_one();
                }
            }
            Err(e) => debug!(error = %e, "presence: lease renewal failed"),
        }
        reap(&p, r, &conn).await;
    }
}

/// Renew incarnation `inc`'s lease for this node's ttl: 1 if it existed.
async fn renew(r: &RedisPresence, conn: &Conn, inc: &str) -> redis::RedisResult<u8> {
    r.renew
        .key(NODES)
        .key(TTLS)
        .arg(inc)
        .arg(r.ttl.as_millis() as u64)
        .invoke_async(&mut conn.clone())
        .await
}

/// Remove the users of leases that ran out.
async fn reap(p: &Presence, r: &RedisPresence, conn: &Conn) {
    let dead: redis::RedisResult<Vec<String>> = r
        .reap
        .key(NODES)
        .key(TTLS)
        .arg(REAP_BATCH)
        .invoke_async(&mut conn.clone())
        .await;
    let Ok(dead) = dead else { return };
    for pair in dead.chunks(2) {
        let [inc, age] = pair else { continue };
        match r.clean(conn, inc).await {
            Ok(()) => match age.parse::<f64>() {
                // A lease that ran out: from its last renewal until now.
                Ok(ms) if ms >= 0.0 => {
                    let age = ms / 1000.0;
                    p.metrics.dead_node_removal.observe(age);
                    info!(incarnation = %inc, age_s = age, "presence: dead node's users removed");
                }
                // Put back to be reaped (this node's own lost incarnation,
                // or a clean-up that failed): no renewal to measure from.
                _ => info!(incarnation = %inc, "presence: old incarnation's users removed"),
            },
            // Claimed but not cleaned: put the lease back (old, so that the
            // next reap takes it again).
            Err(e) => {
                warn!(incarnation = %inc, error = %e, "presence: could not clean a dead node");
                let _ = redis::cmd("ZADD")
                    .arg(NODES)
                    .arg(0)
                    .arg(inc)
                    .query_async::<()>(&mut conn.clone())
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rooms_presence_keys_share_its_hash_tag() {
        for key in [users_key("r:1"), refs_key("r:1"), held_key("r:1", "n-1")] {
            assert!(key.starts_with("wsgate:{r:1}:"), "{key}");
        }
        assert!(rooms_key("n-1").contains("{n-1}"));
    }
}
