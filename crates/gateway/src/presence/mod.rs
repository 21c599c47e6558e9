//! Presence (PROTOCOL.md section 6): who is in a room, across the cluster.
//!
//! A user is present in a room while at least one of its connections, on
//! any node, is a member. This node keeps its own part exactly: per room,
//! its local members by connection and how many local connections each
//! user has. A user's first local connection in a room and its last one
//! are the only changes the rest of the cluster hears about:
//!
//! - with the in-process broker the local part is the whole truth, so a
//!   query reads it and events are sent at once;
//! - with Redis ([`redis`]) the change is written to the room's presence
//!   keys by a per-node batching task, under a per-node lease; Redis
//!   decides when a user becomes present or absent cluster-wide and
//!   announces it on the room's relay channel, and every node with members
//!   in the room turns that into `presence_join` / `presence_leave` for its
//!   local members that opted in.
//!
//! Events are never sent to connections of the user they are about (so a
//! connection never hears of its own user's first join), carry no seq and
//! are not kept in history.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus::{Histogram, HistogramOpts, IntCounter, Opts};
use serde::Serialize;
use wsgate_protocol::{PresenceEvent, ServerFrame, MAX_PRESENCE_USERS};

use crate::api::{room_caller, RoomAction};
use crate::broker::BrokerError;
use crate::http::unavailable;
use crate::metrics::{must, Metrics};
use crate::outbound::ConnHandle;
use crate::App;

pub mod redis;

/// A room's presence as a query answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Present users.
    pub count: u64,
    /// The first [`MAX_PRESENCE_USERS`] of them, sorted.
    pub users: Vec<String>,
}

impl Snapshot {
    /// Whether `users` lists fewer than `count`.
    pub fn truncated(&self) -> bool {
        self.count > self.users.len() as u64
    }
}

/// One local membership.
struct LocalConn {
    conn: Arc<ConnHandle>,
    user: Arc<str>,
    /// Joined with `"presence":true`.
    watch: bool,
}

#[derive(Default)]
struct LocalRoom {
    /// Local connections per user.
    users: BTreeMap<Arc<str>, u32>,
    conns: Vec<LocalConn>,
}

/// Presence metrics (`wsgate_presence_*`): registered once per node
/// ([`new`](Self::new)); clones share the same series.
#[derive(Clone)]
pub struct PresenceMetrics {
    /// Presence queries answered (WebSocket and HTTP).
    pub queries: IntCounter,
    /// `presence_join` / `presence_leave` frames queued to connections.
    pub events: IntCounter,
    /// Time from a dead node's last lease renewal to the removal of its users.
    pub dead_node_removal: Histogram,
}

impl PresenceMetrics {
    /// Create and register the metrics with the node's registry.
    pub fn new(metrics: &Metrics, node: &str) -> PresenceMetrics {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help)
                .namespace("wsgate")
                .const_label("node", node)
        };
        let counter = |name: &str, help: &str| {
            let c = must(IntCounter::with_opts(opts(name, help)));
            metrics.register(Box::new(c.clone()));
            c
        };
        let dead_node_removal = must(Histogram::with_opts(
            HistogramOpts::new(
                "presence_dead_node_removal_seconds",
                "Time from a dead node's last lease renewal until its users were removed",
            )
            .namespace("wsgate")
            .const_label("node", node)
            .buckets(vec![1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0]),
        ));
        metrics.register(Box::new(dead_node_removal.clone()));
        PresenceMetrics {
            queries: counter("presence_queries_total", "Presence queries answered"),
            events: counter(
                "presence_events_total",
                "presence_join and presence_leave frames queued to connections",
            ),
            dead_node_removal,
        }
    }
}

/// The node's presence: its local part, and the cluster's through Redis.
pub struct Presence {
    local: Mutex<HashMap<Arc<str>, LocalRoom>>,
    redis: Option<redis::RedisPresence>,
    /// Metrics.
    pub metrics: PresenceMetrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Presence {
    /// Presence of a single node (in-process broker): exact and immediate.
    pub fn memory(metrics: PresenceMetrics) -> Arc<Presence> {
        Arc::new(Presence {
            local: Mutex::default(),
            redis: None,
            metrics,
        })
    }

    /// `conn` of `user` is a member of `room` (again): counted once per
    /// connection; `watch` turns its presence events on or off.
    pub fn join(&self, room: &str, user: &str, conn: &Arc<ConnHandle>, watch: bool) {
        let mut local = lock(&self.local);
        let entry = local.entry(Arc::from(room)).or_default();
        if let Some(c) = entry.conns.iter_mut().find(|c| Arc::ptr_eq(&c.conn, conn)) {
            c.watch = watch;
            return;
        }
        let user: Arc<str> = match entry.users.get_key_value(user) {
            Some((u, _)) => u.clone(),
            None => Arc::from(user),
        };
        entry.conns.push(LocalConn {
            conn: conn.clone(),
            user: user.clone(),
            watch,
        });
        let n = entry.users.entry(user.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            match &self.redis {
                Some(r) => r.changed(room, &user),
                None => self.emit_locked(entry, room, &user, true),
            }
        }
    }

    /// After [`join`](Self::join): wait until the cluster sees `user` in
    /// `room` (Redis: this node's write of it is done, bounded), so that a
    /// query right after a join lists the joining user.
    pub async fn settled(&self, room: &str, user: &str) {
        if let Some(r) = &self.redis {
            r.settled(room, user).await;
        }
    }

    /// `conn` is no longer a member of `room` (idempotent).
    pub fn leave(&self, room: &str, conn: &Arc<ConnHandle>) {
        let mut local = lock(&self.local);
        let Some(entry) = local.get_mut(room) else {
            return;
        };
        let Some(i) = entry.conns.iter().position(|c| Arc::ptr_eq(&c.conn, conn)) else {
            return;
        };
        let user = entry.conns.swap_remove(i).user;
        let gone = match entry.users.get_mut(&user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                entry.users.remove(&user);
                true
            }
        };
        if gone {
            match &self.redis {
                Some(r) => r.changed(room, &user),
                None => self.emit_locked(entry, room, &user, false),
            }
        }
        if entry.conns.is_empty() {
            local.remove(room);
        }
    }

    /// Who is present in `room`.
    pub async fn query(&self, room: &str) -> Result<Snapshot, BrokerError> {
        self.metrics.queries.inc();
        match &self.redis {
            Some(r) => r.query(room).await,
            None => Ok(self.local_snapshot(room)),
        }
    }

    fn local_snapshot(&self, room: &str) -> Snapshot {
        let local = lock(&self.local);
        match local.get(room) {
            Some(r) => Snapshot {
                count: r.users.len() as u64,
                users: r
                    .users
                    .keys()
                    .take(MAX_PRESENCE_USERS)
                    .map(|u| u.to_string())
                    .collect(),
            },
            None => Snapshot {
                count: 0,
                users: Vec::new(),
            },
        }
    }

    /// Whether `user` has a local connection in `room`.
    fn is_local(&self, room: &str, user: &str) -> bool {
        lock(&self.local)
            .get(room)
            .is_some_and(|r| r.users.contains_key(user))
    }

    /// Every (room, user) present on this node.
    fn all_local(&self) -> Vec<(Arc<str>, Arc<str>)> {
        let local = lock(&self.local);
        local
            .iter()
            .flat_map(|(room, r)| r.users.keys().map(|u| (room.clone(), u.clone())))
            .collect()
    }

    /// A cluster-wide presence change of `room` (from the relay).
    pub(crate) fn on_change(&self, room: &str, user: &str, joined: bool) {
        let mut local = lock(&self.local);
        if let Some(entry) = local.get_mut(room) {
            self.emit_locked(entry, room, user, joined);
        }
    }

    /// Queue an event to the room's local members that opted in, except
    /// those of `user` itself.
    fn emit_locked(&self, entry: &LocalRoom, room: &str, user: &str, joined: bool) {
        let mut frame: Option<crate::ws::codec::SharedText> = None;
        let mut sent = 0;
        for c in entry.conns.iter().filter(|c| c.watch && &*c.user != user) {
            let f = frame.get_or_insert_with(|| {
                let event = PresenceEvent {
                    room: room.to_owned(),
                    user: user.to_owned(),
                };
                let frame = if joined {
                    ServerFrame::PresenceJoin(event)
                } else {
                    ServerFrame::PresenceLeave(event)
                };
                crate::ws::codec::SharedText::new(&frame.to_json())
            });
            c.conn.send(f.for_conn(c.conn.encoding()));
            sent += 1;
        }
        self.metrics.events.inc_by(sent);
    }

    /// The node is stopping (drain): its users leave the cluster's presence
    /// at once, not when its lease runs out.
    pub async fn stop(&self) {
        if let Some(r) = &self.redis {
            r.stop().await;
        }
    }
}

#[derive(Serialize)]
struct HttpAnswer<'a> {
    room: &'a str,
    count: u64,
    users: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
}

/// `GET /api/rooms/{room}/presence`, with the API key or a Bearer token
/// whose `rooms` grant covers the room.
pub async fn http_get(
    State(app): State<Arc<App>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Err(r) = room_caller(&app, &headers, &uri, &room, RoomAction::Read) {
        return r.into_response();
    }
    match app.presence.query(&room).await {
        Ok(s) => (
            StatusCode::OK,
            Json(HttpAnswer {
                room: &room,
                count: s.count,
                truncated: s.truncated(),
                users: s.users,
            }),
        )
            .into_response(),
        Err(e) => unavailable("1", &format!("{e}; retry later")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(metrics: &Arc<Metrics>) -> Arc<ConnHandle> {
        ConnHandle::new("c", 1 << 20, metrics.clone())
    }

    #[test]
    fn users_count_once_and_leave_with_their_last_connection() {
        let metrics = Arc::new(Metrics::new("n"));
        let p = Presence::memory(PresenceMetrics::new(&metrics, "n"));
        let (a1, a2, b) = (conn(&metrics), conn(&metrics), conn(&metrics));
        p.join("r", "alice", &a1, false);
        p.join("r", "alice", &a2, false);
        p.join("r", "bob", &b, true);
        p.join("r", "bob", &b, true);
        let s = p.local_snapshot("r");
        assert_eq!(s.count, 2);
        assert_eq!(s.users, ["alice", "bob"]);
        p.leave("r", &a1);
        assert_eq!(p.local_snapshot("r").count, 2);
        p.leave("r", &a2);
        p.leave("r", &a2);
        assert_eq!(p.local_snapshot("r").users, ["bob"]);
        // bob watches: one leave event about alice, none about himself.
        assert_eq!(p.metrics.events.get(), 1);
        p.leave("r", &b);
        assert_eq!(p.local_snapshot("r").count, 0);
        assert!(lock(&p.local).is_empty(), "empty room kept");
    }

    #[test]
    fn the_ttl_flag_defaults_to_15s_and_refuses_less_than_1s() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut args = vec!["wsgate", "--jwt-secret", "s"];
            args.extend_from_slice(extra);
            crate::config::Cli::try_parse_from(args)
                .unwrap()
                .serve
                .into_config()
                .map(|(c, _)| c.presence.presence_ttl)
        };
        assert_eq!(parse(&[]).unwrap(), std::time::Duration::from_secs(15));
        assert_eq!(
            parse(&["--presence-ttl", "2s"]).unwrap(),
            std::time::Duration::from_secs(2)
        );
        let err = parse(&["--presence-ttl", "500ms"]).unwrap_err().to_string();
        assert!(err.contains("--presence-ttl"), "{err}");
    }

    #[test]
    fn a_snapshot_lists_at_most_the_cap() {
        let metrics = Arc::new(Metrics::new("n"));
        let p = Presence::memory(PresenceMetrics::new(&metrics, "n"));
        for i in 0..=MAX_PRESENCE_USERS {
            p.join("r", &format!("u{i:05}"), &conn(&metrics), false);
        }
        let s = p.local_snapshot("r");
        assert_eq!(s.count, MAX_PRESENCE_USERS as u64 + 1);
        assert_eq!(s.users.len(), MAX_PRESENCE_USERS);
        assert!(s.truncated());
        assert_eq!(s.users[0], "u00000");
    }
}
