//! The node's local room registry and fan-out.
//!
//! A room exists here while it has at least one local member. The broker
//! hands every message of a subscribed room to [`Rooms::deliver`] as one
//! shared, already-encoded frame; fan-out clones the `Utf8Bytes` handle (a
//! reference count) into each member's outbound queue, never re-encoding.
//!
//! A member that is joining is *pending*: live messages are buffered for it
//! while its `joined` answer and replay are prepared, then
//! [`Rooms::go_live`] queues the buffered messages newer than the replay,
//! under the room lock, so that replay and live traffic never interleave,
//! duplicate or leave a gap.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use wsgate_protocol::{Joined, ServerFrame};

use crate::metrics::Metrics;
use crate::outbound::{CloseReason, ConnHandle};

const SHARDS: usize = 64;

/// Frames buffered for a pending member: (seq, frame).
type Pending = Vec<(u64, Utf8Bytes)>;

struct Member {
    conn: Arc<ConnHandle>,
    pending: Option<Pending>,
    /// Bytes in `pending`: bounded like the outbound queue.
    pending_bytes: usize,
    /// The seq this member's `joined` reported (or its replay reached):
    /// live messages at or below it were already sent or predate the join.
    /// With Redis, a message published just before the join's history read
    /// can reach the relay after the member went live.
    after: u64,
}

#[derive(Default)]
struct RoomState {
    members: Vec<Member>,
    /// The epoch of the last message delivered here.
    epoch: Option<Arc<str>>,
    /// The seq of the last message delivered here (in `epoch`).
    last_seq: u64,
}

struct Room {
    state: Mutex<RoomState>,
}

type Shard = Mutex<HashMap<Arc<str>, Arc<Room>>>;

/// Local rooms and their members.
pub struct Rooms {
    shards: Box<[Shard]>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data
    // inconsistent in a way that matters more than stopping fan-out would.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Rooms {
    /// An empty registry.
    pub fn new(metrics: Arc<Metrics>) -> Rooms {
        Rooms {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            metrics,
        }
    }

    fn shard(&self, room: &str) -> &Shard {
        let mut h = DefaultHasher::new();
        room.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    fn get(&self, room: &str) -> Option<Arc<Room>> {
        lock(self.shard(room)).get(room).cloned()
    }

    /// Add `conn` to `room` as a pending member (or turn its existing
    /// membership pending again, for a repeated `join`). Returns true when
    /// the connection was not a member before.
    pub fn add_pending(&self, room: &str, conn: &Arc<ConnHandle>) -> bool {
        let mut shard = lock(self.shard(room));
        let entry = match shard.entry(Arc::from(room)) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(v) => {
                self.metrics.rooms_active.inc();
                v.insert(Arc::new(Room {
                    state: Mutex::new(RoomState::default()),
                }))
                .clone()
            }
        };
        let mut state = lock(&entry.state);
        drop(shard);
        if let Some(m) = state
            .members
            .iter_mut()
            .find(|m| Arc::ptr_eq(&m.conn, conn))
        {
            m.pending.get_or_insert_with(Vec::new);
            false
        } else {
            state.members.push(Member {
                conn: conn.clone(),
                pending: Some(Vec::new()),
                pending_bytes: 0,
                after: 0,
            });
            true
        }
    }

    /// Make a pending member live: queue, in order, the buffered messages
    /// with seq above `after.1` in epoch `after.0` (those up to it were
    /// replayed or predate the join); `None` queues every buffered message.
    pub fn go_live(&self, room: &str, conn: &Arc<ConnHandle>, after: Option<(&str, u64)>) {
        let Some(entry) = self.get(room) else { return };
        let mut state = lock(&entry.state);
        let (same_epoch, after) = match after {
            Some((epoch, seq)) => (state.epoch.as_deref().is_none_or(|e| e == epoch), seq),
            None => (true, 0),
        };
        if let Some(m) = state
            .members
            .iter_mut()
            .find(|m| Arc::ptr_eq(&m.conn, conn))
        {
            m.after = if same_epoch { after } else { 0 };
            m.pending_bytes = 0;
            let mut sent = 0;
            for (seq, frame) in m.pending.take().unwrap_or_default() {
                if !same_epoch || seq > after {
                    sent += u64::from(m.conn.send(frame));
                }
            }
            self.metrics.messages_delivered.inc_by(sent);
        }
    }

    /// Remove `conn` from `room`. Returns true when it was a member.
    pub fn remove(&self, room: &str, conn: &Arc<ConnHandle>) -> bool {
        let mut shard = lock(self.shard(room));
        let Some(entry) = shard.get(room).cloned() else {
            return false;
        };
        let mut state = lock(&entry.state);
        let Some(pos) = state
            .members
            .iter()
            .position(|m| Arc::ptr_eq(&m.conn, conn))
        else {
            return false;
        };
        state.members.swap_remove(pos);
        if state.members.is_empty() {
            shard.remove(room);
            self.metrics.rooms_active.dec();
        }
        true
    }

    /// Fan a message out to the room's local members. Messages at or below
    /// the last delivered seq of the same epoch are dropped (a relay
    /// duplicate); a new epoch is announced to members first with an
    /// unsolicited `joined` (`recovered: false`).
    pub fn deliver(&self, room: &str, epoch: &str, seq: u64, frame: &Utf8Bytes) {
        let Some(entry) = self.get(room) else { return };
        let mut state = lock(&entry.state);
        match state.epoch.as_deref() {
            Some(known) if known == epoch => {
                if seq <= state.last_seq {
                    return;
                }
            }
            Some(_) => {
                let announce = Utf8Bytes::from(
                    ServerFrame::Joined(Joined {
                        room: room.to_owned(),
                        seq: seq.saturating_sub(1),
                        epoch: epoch.to_owned(),
                        recovered: Some(false),
                        id: None,
                    })
                    .to_json(),
                );
                for m in &mut state.members {
                    m.after = 0;
                    match &mut m.pending {
                        // A pending member learns the epoch from its `joined`.
                        Some(p) => p.clear(),
                        None => {
                            m.conn.send(announce.clone());
                        }
                    }
                }
                state.epoch = Some(Arc::from(epoch));
            }
            None => state.epoch = Some(Arc::from(epoch)),
        }
        state.last_seq = seq;
        let mut sent = 0u64;
        for m in &mut state.members {
            match &mut m.pending {
                Some(p) => {
                    m.pending_bytes += frame.len();
                    if m.pending_bytes > m.conn.max_bytes() && !p.is_empty() {
                        // Joining into a room busier than the client can take.
                        p.clear();
                        if m.conn.close(CloseReason {
                            code: wsgate_protocol::close::POLICY,
                            reason: "slow consumer",
                        }) {
                            self.metrics.slow_consumer_closes.inc();
                        }
                    } else {
                        p.push((seq, frame.clone()));
                    }
                }
                None if seq <= m.after => {}
                None => sent += u64::from(m.conn.send(frame.clone())),
            }
        }
        self.metrics.messages_delivered.inc_by(sent);
    }

    /// The last seq and epoch delivered in `room` on this node.
    pub fn position(&self, room: &str) -> Option<(Arc<str>, u64)> {
        let entry = self.get(room)?;
        let state = lock(&entry.state);
        state.epoch.clone().map(|e| (e, state.last_seq))
    }

    /// Local members of `room`.
    pub fn member_count(&self, room: &str) -> usize {
        self.get(room).map_or(0, |r| lock(&r.state).members.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn setup() -> (Rooms, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new("t"));
        (Rooms::new(metrics.clone()), metrics)
    }

    fn conn(m: &Arc<Metrics>) -> (Arc<ConnHandle>, Arc<ConnHandle>) {
        let h = ConnHandle::new("c", 1 << 20, m.clone());
        (h.clone(), h)
    }

    fn texts(h: &mut Arc<ConnHandle>) -> Vec<String> {
        let mut batch = VecDeque::new();
        h.try_take(&mut batch);
        batch.iter().map(|t| t.as_str().to_owned()).collect()
    }

    #[test]
    fn pending_members_get_buffered_messages_after_the_replay_point() {
        let (rooms, m) = setup();
        let (c, mut rx) = conn(&m);
        assert!(rooms.add_pending("r", &c));
        rooms.deliver("r", "e", 5, &Utf8Bytes::from("m5"));
        rooms.deliver("r", "e", 6, &Utf8Bytes::from("m6"));
        assert!(texts(&mut rx).is_empty(), "nothing before go_live");
        rooms.go_live("r", &c, Some(("e", 5)));
        rooms.deliver("r", "e", 7, &Utf8Bytes::from("m7"));
        assert_eq!(texts(&mut rx), ["m6", "m7"]);
    }

    #[test]
    fn a_late_relay_message_already_covered_by_the_join_is_not_sent_again() {
        let (rooms, m) = setup();
        let (c, mut rx) = conn(&m);
        rooms.add_pending("r", &c);
        // joined reported seq 8 (replay up to 8); seq 8 reaches the relay late.
        rooms.go_live("r", &c, Some(("e", 8)));
        rooms.deliver("r", "e", 8, &Utf8Bytes::from("m8"));
        rooms.deliver("r", "e", 9, &Utf8Bytes::from("m9"));
        assert_eq!(texts(&mut rx), ["m9"]);
    }

    #[test]
    fn duplicates_are_dropped_and_epoch_changes_announced() {
        let (rooms, m) = setup();
        let (c, mut rx) = conn(&m);
        rooms.add_pending("r", &c);
        rooms.go_live("r", &c, Some(("e1", 0)));
        rooms.deliver("r", "e1", 1, &Utf8Bytes::from("a"));
        rooms.deliver("r", "e1", 1, &Utf8Bytes::from("a-again"));
        rooms.deliver("r", "e2", 1, &Utf8Bytes::from("b"));
        let got = texts(&mut rx);
        assert_eq!(got[0], "a");
        assert_eq!(
            got[1],
            r#"{"type":"joined","room":"r","seq":0,"epoch":"e2","recovered":false}"#
        );
        assert_eq!(got[2], "b");
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn rooms_disappear_with_their_last_member() {
        let (rooms, m) = setup();
        let (a, _ra) = conn(&m);
        let (b, _rb) = conn(&m);
        rooms.add_pending("r", &a);
        assert!(
            !rooms.add_pending("r", &a),
            "second join is not a new membership"
        );
        rooms.add_pending("r", &b);
        assert_eq!(m.rooms_active.get(), 1);
        assert!(rooms.remove("r", &a));
        assert!(!rooms.remove("r", &a));
        assert_eq!(rooms.member_count("r"), 1);
        assert!(rooms.remove("r", &b));
        assert_eq!(m.rooms_active.get(), 0);
        assert_eq!(rooms.member_count("r"), 0);
    }
}
