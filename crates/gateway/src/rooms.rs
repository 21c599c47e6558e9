//! The node's local room registry and fan-out.
//!
//! A room exists here while it has at least one local member. The broker
//! hands every message of a subscribed room to [`Rooms::deliver`] as its
//! JSON text; deliver encodes it once into its complete WebSocket frame
//! (header and payload, one shared `Bytes`), and fan-out hands that same
//! frame to every member's [`ConnHandle::send`], which writes it straight
//! into the member's socket when nothing is queued for it (a reference
//! count and one non-blocking write per member, never a re-encoding).
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
use bytes::Bytes;
use wsgate_protocol::server::Id;
use wsgate_protocol::{Joined, ServerFrame};

use crate::metrics::Metrics;
use crate::outbound::{CloseReason, ConnHandle};
use crate::ws::codec::{self, SharedText};

const SHARDS: usize = 64;

/// Frames buffered for a pending member: (epoch, seq, frame).
type Pending = Vec<(Arc<str>, u64, Bytes)>;

struct Member {
    conn: Arc<ConnHandle>,
    pending: Option<Pending>,
    /// Bytes in `pending`: bounded like the outbound queue.
    pending_bytes: usize,
    /// The epoch this member's client knows: from its `joined`, or from the
    /// last unsolicited `joined` that announced a new epoch. `None` only
    /// while a first join is pending.
    epoch: Option<Arc<str>>,
    /// The last seq this member was sent or told about in `epoch` (its
    /// `joined` seq, its replay, or its last live message): live messages at
    /// or below it are not sent again. With Redis, a message published just
    /// before the join's history read can reach the relay after the member
    /// went live.
    after: u64,
}

#[derive(Default)]
struct RoomState {
    members: Vec<Member>,
    /// The room's epoch as this node knows it: from the last message
    /// delivered here, or from the first join of a room that has had no
    /// message delivered here yet (a quiet room).
    epoch: Option<Arc<str>>,
    /// The seq of the last message delivered here (in `epoch`): relay
    /// duplicates at or below it are dropped.
    last_seq: u64,
    /// The highest seq known to exist in `epoch` (delivered here, or the
    /// latest seq a join read): where gap fill and catch-up start.
    known: u64,
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

/// A `joined` frame: the messages that follow have a seq above `seq`.
/// Unsolicited (`recovered: false`, no id) it tells a member its room's
/// epoch changed; as the answer to a repeated join it carries the id.
fn joined_frame(
    room: &str,
    epoch: &str,
    seq: u64,
    recovered: Option<bool>,
    id: Option<Id>,
) -> Bytes {
    codec::text(
        &ServerFrame::Joined(Joined {
            room: room.to_owned(),
            seq,
            epoch: epoch.to_owned(),
            recovered,
            id,
        })
        .to_json(),
    )
}

impl Member {
    /// Send one message of `epoch` to this live member, announcing the
    /// epoch first when the member's client knows another one, and never
    /// sending a seq it was already sent or told about. Returns whether the
    /// message was queued.
    /// `frame` is the message's encoding for this member's connection.
    fn send(&mut self, room: &str, epoch: &Arc<str>, seq: u64, frame: Bytes) -> bool {
        // Per member per message: the pointer check settles the usual case
        // (members hold the room's own `Arc` of its epoch) without
        // comparing the strings.
        let same = self
            .epoch
            .as_ref()
            .is_some_and(|e| Arc::ptr_eq(e, epoch) || **e == **epoch);
        if same {
            if seq <= self.after {
                return false;
            }
        } else {
            let notice = joined_frame(room, epoch, seq.saturating_sub(1), Some(false), None);
            self.conn.send(notice);
            self.epoch = Some(epoch.clone());
        }
        self.after = seq;
        self.conn.send(frame)
    }
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
    /// membership pending again, for a repeated `join` with `since`).
    /// Returns true when the connection was not a member before.
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
                epoch: None,
                after: 0,
            });
            true
        }
    }

    /// A repeated `join` (without `since`) of a room `conn` is a live member
    /// of: the membership stays live and loses nothing; the `joined` answer
    /// is queued right behind the last message the member was sent, and
    /// reports that message's seq (or the seq its last `joined` reported).
    /// Returns false when `conn` is not a live member with a known position
    /// (then the caller joins the slow way).
    pub fn rejoin(&self, room: &str, conn: &Arc<ConnHandle>, id: Option<Id>) -> bool {
        let Some(entry) = self.get(room) else {
            return false;
        };
        let state = lock(&entry.state);
        let Some(m) = state.members.iter().find(|m| Arc::ptr_eq(&m.conn, conn)) else {
            return false;
        };
        match (&m.pending, &m.epoch) {
            (None, Some(epoch)) => {
                m.conn.send(joined_frame(room, epoch, m.after, None, id));
                true
            }
            _ => false,
        }
    }

    /// Make a pending member live. `joined` is the (epoch, seq) its `joined`
    /// answer reported (its replay, if any, reached that seq): buffered
    /// messages are then queued in order, those at or below it in that epoch
    /// skipped, a newer epoch announced. `None` (its history could not be
    /// read) keeps the member's previous position. The first join of a quiet
    /// room records the room's epoch here, so that an epoch change is noticed
    /// even before any message was delivered on this node.
    pub fn go_live(&self, room: &str, conn: &Arc<ConnHandle>, joined: Option<(&str, u64)>) {
        let Some(entry) = self.get(room) else { return };
        let mut guard = lock(&entry.state);
        let state = &mut *guard;
        let joined = joined.map(|(epoch, seq)| {
            let epoch = match &state.epoch {
                Some(known) if **known == *epoch => {
                    state.known = state.known.max(seq);
                    known.clone()
                }
                Some(_) => Arc::from(epoch),
                None => {
                    let e: Arc<str> = Arc::from(epoch);
                    state.epoch = Some(e.clone());
                    state.known = seq;
                    e
                }
            };
            (epoch, seq)
        });
        let Some(m) = state
            .members
            .iter_mut()
            .find(|m| Arc::ptr_eq(&m.conn, conn))
        else {
            return;
        };
        if let Some((epoch, seq)) = joined {
            m.epoch = Some(epoch);
            m.after = seq;
        }
        m.pending_bytes = 0;
        let mut sent = 0;
        for (epoch, seq, frame) in m.pending.take().unwrap_or_default() {
            sent += u64::from(m.send(room, &epoch, seq, frame));
        }
        self.metrics.messages_delivered.inc_by(sent);
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
    /// duplicate); a member whose client knows another epoch is told of the
    /// new one first with an unsolicited `joined` (`recovered: false`).
    pub fn deliver(&self, room: &str, epoch: &str, seq: u64, frame: &Utf8Bytes) {
        let Some(entry) = self.get(room) else { return };
        let mut guard = lock(&entry.state);
        let state = &mut *guard;
        let epoch = match &state.epoch {
            Some(known) if **known == *epoch => {
                if seq <= state.last_seq {
                    return;
                }
                known.clone()
            }
            _ => {
                let e: Arc<str> = Arc::from(epoch);
                state.epoch = Some(e.clone());
                state.known = 0;
                e
            }
        };
        state.last_seq = seq;
        state.known = state.known.max(seq);
        // Encoded once for every member of this node (and compressed at
        // most once, for the members that negotiated permessage-deflate).
        let frame = &SharedText::new(frame.as_str());
        let mut sent = 0u64;
        for m in &mut state.members {
            let frame = frame.for_conn(m.conn.compress_from());
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
                        p.push((epoch.clone(), seq, frame));
                    }
                }
                None => sent += u64::from(m.send(room, &epoch, seq, frame)),
            }
        }
        self.metrics.messages_delivered.inc_by(sent);
    }

    /// The room's epoch on this node and the highest seq known in it (from
    /// deliveries and joins): where gap fill and catch-up start.
    pub fn position(&self, room: &str) -> Option<(Arc<str>, u64)> {
        let entry = self.get(room)?;
        let state = lock(&entry.state);
        state.epoch.clone().map(|e| (e, state.known))
    }

    /// Local members of `room`.
    pub fn member_count(&self, room: &str) -> usize {
        self.get(room).map_or(0, |r| lock(&r.state).members.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Rooms, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new("t"));
        (Rooms::new(metrics.clone()), metrics)
    }

    fn conn(m: &Arc<Metrics>) -> (Arc<ConnHandle>, Arc<ConnHandle>) {
        let h = ConnHandle::new("c", 1 << 20, m.clone());
        (h.clone(), h)
    }

    /// The payloads of the text frames queued (short frames: 2-byte header).
    fn texts(h: &mut Arc<ConnHandle>) -> Vec<String> {
        h.take_queued()
            .iter()
            .map(|f| String::from_utf8_lossy(&f[2..]).into_owned())
            .collect()
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

    #[test]
    fn a_quiet_room_learns_its_epoch_at_the_join_and_announces_a_new_one() {
        let (rooms, m) = setup();
        let (c, mut rx) = conn(&m);
        rooms.add_pending("r", &c);
        rooms.go_live("r", &c, Some(("e1", 5)));
        assert_eq!(
            rooms.position("r").map(|(e, s)| (e.to_string(), s)),
            Some(("e1".into(), 5))
        );
        // The room's keys vanished: a new epoch starts at 1, below the join's 5.
        rooms.deliver("r", "e2", 1, &Utf8Bytes::from("n1"));
        rooms.deliver("r", "e2", 2, &Utf8Bytes::from("n2"));
        let got = texts(&mut rx);
        assert_eq!(
            got[0],
            r#"{"type":"joined","room":"r","seq":0,"epoch":"e2","recovered":false}"#
        );
        assert_eq!(&got[1..], ["n1", "n2"]);
    }

    #[test]
    fn a_rejoin_of_a_live_member_is_answered_in_line_and_loses_nothing() {
        let (rooms, m) = setup();
        let (c, mut rx) = conn(&m);
        rooms.add_pending("r", &c);
        rooms.go_live("r", &c, Some(("e", 3)));
        rooms.deliver("r", "e", 4, &Utf8Bytes::from("m4"));
        assert!(rooms.rejoin("r", &c, Some(Id::Str("j".into()))));
        rooms.deliver("r", "e", 5, &Utf8Bytes::from("m5"));
        assert_eq!(
            texts(&mut rx),
            [
                "m4",
                r#"{"type":"joined","room":"r","seq":4,"epoch":"e","id":"j"}"#,
                "m5"
            ]
        );
        let (other, _) = conn(&m);
        assert!(!rooms.rejoin("r", &other, None), "not a member");
    }
}
