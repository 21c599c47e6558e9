//! The node's rooms: membership end to end, and fan-out.
//!
//! A room exists here while it has at least one local member; that is the
//! one place the node counts them. [`Rooms::join`] runs a join from start to
//! end: the member is added *pending*, the node subscribes to the room at
//! the broker when it is the room's first local member, waits for the
//! subscription, reads the room's history, answers `joined`, replays a
//! resume, and turns the member live. [`Rooms::leave`] is the one clean-up:
//! it removes the member and unsubscribes the node when it was the last.
//! Membership changes of a room and the broker's `subscribe`/`unsubscribe`
//! calls happen in one order (a per-shard membership lock, never held by
//! fan-out), so interleaved joins and leaves cannot leave a room with local
//! members unsubscribed.
//!
//! The broker pushes every message of a subscribed room into the
//! [`Delivery`] sink these rooms gave it, as its JSON text; deliver encodes
//! it once into its complete WebSocket frame (header and payload, one shared
//! `Bytes`), and fan-out queues that same frame to every live member under
//! the room's lock ([`ConnHandle::enqueue`]), then, with the lock released,
//! writes each member's queue straight into its socket
//! ([`ConnHandle::flush`]: a reference count and one non-blocking write per
//! member, never a re-encoding). While a member is
//! pending, live messages are buffered for it; [`Rooms::go_live`] queues the
//! buffered messages newer than the replay, under the room lock, so that
//! replay and live traffic never interleave, duplicate or leave a gap.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use wsgate_protocol::server::Id;
use wsgate_protocol::{close, Joined, ServerFrame};

use crate::broker::{Broker, BrokerError, RoomHistory, Since};
use crate::metrics::Metrics;
use crate::outbound::{CloseReason, ConnHandle};
use crate::ws::codec::SharedText;

const SHARDS: usize = 64;

thread_local! {
    /// The members a delivery queued its frame to, written after the room's
    /// lock is released; reused from one delivery to the next on a thread
    /// (taken out while in use).
    static FLUSH: std::cell::Cell<Vec<Arc<ConnHandle>>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Frames buffered for a pending member. Boxed in [`Member`]: a live
/// member, the usual case, holds a null pointer instead.
#[derive(Default)]
struct Pending {
    /// (epoch, seq, frame)
    frames: Vec<(Arc<str>, u64, Bytes)>,
    /// Bytes buffered so far: bounded like the outbound queue.
    bytes: usize,
}

struct Member {
    conn: Arc<ConnHandle>,
    pending: Option<Box<Pending>>,
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
    /// Per shard: held while a membership changes together with the
    /// broker's subscription, so that `subscribe` and `unsubscribe` of a
    /// room are called in the order its membership changed. Fan-out never
    /// takes it (a broker may deliver under its own locks).
    membership: Box<[Mutex<()>]>,
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
}

/// Where a broker pushes the messages it relays: the node's rooms. Made
/// before the rooms (a broker is built first), bound to them by
/// [`Rooms::new`]; until then, and once they are gone, it delivers nothing.
/// It holds the rooms weakly: the rooms own the broker, not the reverse.
#[derive(Clone, Default)]
pub struct Delivery(Arc<OnceLock<Weak<Rooms>>>);

impl Delivery {
    fn rooms(&self) -> Option<Arc<Rooms>> {
        self.0.get().and_then(Weak::upgrade)
    }

    /// Fan a message of `room` out to its local members (see
    /// [`Rooms::deliver`]).
    pub fn deliver(&self, room: &str, epoch: &str, seq: u64, frame: &Utf8Bytes) {
        if let Some(rooms) = self.rooms() {
            rooms.deliver(room, epoch, seq, frame);
        }
    }

    /// The room's epoch here and the highest seq known in it: where a gap
    /// fill starts.
    pub fn position(&self, room: &str) -> Option<(Arc<str>, u64)> {
        self.rooms()?.position(room)
    }

    /// Whether `room` has local members.
    pub fn is_local(&self, room: &str) -> bool {
        self.rooms().is_some_and(|r| r.member_count(room) > 0)
    }
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
    conn: &ConnHandle,
    room: &str,
    epoch: &str,
    seq: u64,
    recovered: Option<bool>,
    id: Option<Id>,
) -> Bytes {
    conn.text(
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
    /// message was queued: only queued, under the room's lock, which fixes
    /// its place in the connection's order; the caller writes it with
    /// [`ConnHandle::flush`] once the lock is released.
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
            let notice = joined_frame(
                &self.conn,
                room,
                epoch,
                seq.saturating_sub(1),
                Some(false),
                None,
            );
            self.conn.enqueue(notice);
            self.epoch = Some(epoch.clone());
        }
        self.after = seq;
        self.conn.enqueue(frame)
    }
}

impl Rooms {
    /// An empty registry subscribing at `broker`, which delivers into
    /// `delivery` (bound here to the new rooms).
    pub fn new(metrics: Arc<Metrics>, broker: Arc<dyn Broker>, delivery: &Delivery) -> Arc<Rooms> {
        let rooms = Arc::new(Rooms {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            membership: (0..SHARDS).map(|_| Mutex::new(())).collect(),
            broker,
            metrics,
        });
        // A sink is bound once; a second binding would be a wiring bug that
        // leaves the first rooms' delivery as it was.
        let _ = delivery.0.set(Arc::downgrade(&rooms));
        rooms
    }

    fn index(room: &str) -> usize {
        let mut h = DefaultHasher::new();
        room.hash(&mut h);
        (h.finish() as usize) % SHARDS
    }

    fn shard(&self, room: &str) -> &Shard {
        &self.shards[Self::index(room)]
    }

    /// Add `conn` to `room` as a pending member (see
    /// [`add_pending`](Self::add_pending)); the room's first local member
    /// subscribes the node. Returns true when `conn` was not a member.
    pub fn enter(&self, room: &str, conn: &Arc<ConnHandle>) -> bool {
        let _order = lock(&self.membership[Self::index(room)]);
        let first = self.get(room).is_none();
        let new = self.add_pending(room, conn);
        if first {
            self.broker.subscribe(room);
        }
        new
    }

    /// Remove `conn` from `room`; the last local member unsubscribes the
    /// node. Returns true when it was a member. The one clean-up of a
    /// membership: a leave, a failed join, a connection's end.
    pub fn leave(&self, room: &str, conn: &Arc<ConnHandle>) -> bool {
        let _order = lock(&self.membership[Self::index(room)]);
        let was = self.remove(room, conn);
        if was && self.get(room).is_none() {
            self.broker.unsubscribe(room);
        }
        was
    }

    /// Join `room` (or repeat a join: answered in line when live and not a
    /// resume, see [`rejoin`](Self::rejoin)): enter it
    /// pending, wait for the node's subscription, read the history, answer
    /// `joined` (with `id`), replay a recovered resume page by page, then go
    /// live. A new membership that fails is left again; a repeated one
    /// stays with its previous position. A replay cut short closes the
    /// connection (1013) and leaves the member pending until it ends.
    /// `patience`: how long a paced replay waits for the client to read.
    /// The caller records the membership before awaiting this, so that it
    /// is released even if this future is dropped mid-way.
    pub async fn join(
        &self,
        room: &str,
        conn: &Arc<ConnHandle>,
        since: Option<Since<'_>>,
        id: Option<Id>,
        patience: Duration,
    ) -> Result<(), BrokerError> {
        // A repeated join of a live membership, without a resume: it stays
        // live and loses nothing; `joined` is queued behind what it got.
        if since.is_none() && self.rejoin(room, conn, id.clone()) {
            return Ok(());
        }
        let new = self.enter(room, conn);
        if new {
            if let Err(e) = self.broker.ready(room).await {
                self.leave(room, conn);
                return Err(e);
            }
        }
        let mut h = match self.broker.history(room, since).await {
            Ok(h) => h,
            Err(e) => {
                if new {
                    self.leave(room, conn);
                } else {
                    self.go_live(room, conn, None);
                }
                return Err(e);
            }
        };
        conn.send(joined_frame(
            conn,
            room,
            &h.epoch,
            h.latest,
            since.map(|_| h.recovered),
            id,
        ));
        if let (Some(since), true) = (since, h.recovered) {
            let first_page = std::mem::take(&mut h.frames);
            if !self
                .replay(room, conn, since.seq, &h, first_page, patience)
                .await
            {
                return Ok(());
            }
        }
        self.go_live(room, conn, Some((&*h.epoch, h.latest)));
        Ok(())
    }

    /// Send a resume's replay, `(since, h.latest]`, page by page: a page is
    /// read from the broker only when the previous one is queued, so a
    /// replay never holds a whole history. Paced: a replay may be larger
    /// than the outbound limit; it waits for the client to read instead of
    /// closing it, but no longer than `patience`. Returns false when the
    /// replay could not be completed (the connection is then closing: a
    /// replay cut short must not look whole).
    async fn replay(
        &self,
        room: &str,
        conn: &ConnHandle,
        since: u64,
        h: &RoomHistory,
        first_page: Vec<(u64, Utf8Bytes)>,
        patience: Duration,
    ) -> bool {
        let mut next = since.saturating_add(1);
        let mut page = first_page;
        let mut replayed = 0;
        let complete = loop {
            for (seq, frame) in page {
                if seq != next || !conn.send_paced(conn.text(&frame), patience).await {
                    break;
                }
                next += 1;
                replayed += 1;
            }
            if next > h.latest || conn.is_closing() {
                break next > h.latest;
            }
            page = match self
                .broker
                .replay_page(room, &h.epoch, next - 1, h.latest)
                .await
            {
                Ok(p) if p.first().is_some_and(|(s, _)| *s == next) => p,
                _ => break false,
            };
        };
        self.metrics.messages_delivered.inc_by(replayed);
        if !complete {
            conn.close(CloseReason {
                code: close::TRY_AGAIN_LATER,
                reason: "replay interrupted; resume again",
            });
        }
        complete
    }

    fn get(&self, room: &str) -> Option<Arc<Room>> {
        lock(self.shard(room)).get(room).cloned()
    }

    /// Add `conn` to `room` as a pending member (or turn its existing
    /// membership pending again, for a repeated `join` with `since`).
    /// Returns true when the connection was not a member before. The
    /// registry alone: [`enter`](Self::enter) also subscribes.
    fn add_pending(&self, room: &str, conn: &Arc<ConnHandle>) -> bool {
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
            m.pending.get_or_insert_with(Box::default);
            false
        } else {
            state.members.push(Member {
                conn: conn.clone(),
                pending: Some(Box::default()),
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
    fn rejoin(&self, room: &str, conn: &Arc<ConnHandle>, id: Option<Id>) -> bool {
        let Some(entry) = self.get(room) else {
            return false;
        };
        let state = lock(&entry.state);
        let Some(m) = state.members.iter().find(|m| Arc::ptr_eq(&m.conn, conn)) else {
            return false;
        };
        match (&m.pending, &m.epoch) {
            (None, Some(epoch)) => {
                m.conn
                    .send(joined_frame(&m.conn, room, epoch, m.after, None, id));
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
    fn go_live(&self, room: &str, conn: &Arc<ConnHandle>, joined: Option<(&str, u64)>) {
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
        let mut sent = 0;
        let pending = m.pending.take().map(|p| p.frames).unwrap_or_default();
        for (epoch, seq, frame) in pending {
            sent += u64::from(m.send(room, &epoch, seq, frame));
        }
        drop(guard);
        conn.flush();
        self.metrics.messages_delivered.inc_by(sent);
    }

    /// Remove `conn` from `room`. Returns true when it was a member. The
    /// registry alone: [`leave`](Self::leave) also unsubscribes.
    fn remove(&self, room: &str, conn: &Arc<ConnHandle>) -> bool {
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
    ///
    /// The frame is queued to every live member under the room's lock (its
    /// place in each connection's order, behind anything sent before and
    /// ahead of a `left` or a repeated `joined`), and written into the
    /// members' sockets after the lock is released: joins and leaves of
    /// the room do not wait for the writes.
    pub fn deliver(&self, room: &str, epoch: &str, seq: u64, frame: &Utf8Bytes) {
        let Some(entry) = self.get(room) else { return };
        let mut queued = FLUSH.take();
        self.deliver_locked(&entry, room, epoch, seq, frame, &mut queued);
        for conn in queued.drain(..) {
            conn.flush();
        }
        FLUSH.set(queued);
    }

    /// [`deliver`](Self::deliver)'s work under the room's lock: the members
    /// the frame was queued to are pushed onto `queued`.
    fn deliver_locked(
        &self,
        entry: &Room,
        room: &str,
        epoch: &str,
        seq: u64,
        frame: &Utf8Bytes,
        queued: &mut Vec<Arc<ConnHandle>>,
    ) {
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
            let frame = frame.for_conn(m.conn.encoding());
            match &mut m.pending {
                Some(p) => {
                    p.bytes += frame.len();
                    if p.bytes > m.conn.max_bytes() && !p.frames.is_empty() {
                        // Joining into a room busier than the client can take.
                        p.frames.clear();
                        m.conn.slow_consumer();
                    } else {
                        p.frames.push((epoch.clone(), seq, frame));
                    }
                }
                None => {
                    if m.send(room, &epoch, seq, frame) {
                        sent += 1;
                        queued.push(m.conn.clone());
                    }
                }
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

    fn setup() -> (Arc<Rooms>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new("t"));
        let delivery = Delivery::default();
        let broker = Arc::new(crate::broker::memory::MemoryBroker::new(
            10,
            usize::MAX,
            delivery.clone(),
            metrics.clone(),
        ));
        (Rooms::new(metrics.clone(), broker, &delivery), metrics)
    }

    fn conn(m: &Arc<Metrics>) -> Arc<ConnHandle> {
        ConnHandle::new("c", 1 << 20, m.clone())
    }

    /// The payloads of the text frames queued for `h` (short frames: a
    /// 2-byte header), taken out of its queue.
    fn texts(h: &ConnHandle) -> Vec<String> {
        h.take_queued()
            .iter()
            .map(|f| String::from_utf8_lossy(&f[2..]).into_owned())
            .collect()
    }

    #[test]
    fn pending_members_get_buffered_messages_after_the_replay_point() {
        let (rooms, m) = setup();
        let c = conn(&m);
        assert!(rooms.add_pending("r", &c));
        rooms.deliver("r", "e", 5, &Utf8Bytes::from("m5"));
        rooms.deliver("r", "e", 6, &Utf8Bytes::from("m6"));
        assert!(texts(&c).is_empty(), "nothing before go_live");
        rooms.go_live("r", &c, Some(("e", 5)));
        rooms.deliver("r", "e", 7, &Utf8Bytes::from("m7"));
        assert_eq!(texts(&c), ["m6", "m7"]);
    }

    #[test]
    fn a_late_relay_message_already_covered_by_the_join_is_not_sent_again() {
        let (rooms, m) = setup();
        let c = conn(&m);
        rooms.add_pending("r", &c);
        // joined reported seq 8 (replay up to 8); seq 8 reaches the relay late.
        rooms.go_live("r", &c, Some(("e", 8)));
        rooms.deliver("r", "e", 8, &Utf8Bytes::from("m8"));
        rooms.deliver("r", "e", 9, &Utf8Bytes::from("m9"));
        assert_eq!(texts(&c), ["m9"]);
    }

    #[test]
    fn duplicates_are_dropped_and_epoch_changes_announced() {
        let (rooms, m) = setup();
        let c = conn(&m);
        rooms.add_pending("r", &c);
        rooms.go_live("r", &c, Some(("e1", 0)));
        rooms.deliver("r", "e1", 1, &Utf8Bytes::from("a"));
        rooms.deliver("r", "e1", 1, &Utf8Bytes::from("a-again"));
        rooms.deliver("r", "e2", 1, &Utf8Bytes::from("b"));
        let got = texts(&c);
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
        let a = conn(&m);
        let b = conn(&m);
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
        let c = conn(&m);
        rooms.add_pending("r", &c);
        rooms.go_live("r", &c, Some(("e1", 5)));
        assert_eq!(
            rooms.position("r").map(|(e, s)| (e.to_string(), s)),
            Some(("e1".into(), 5))
        );
        // The room's keys vanished: a new epoch starts at 1, below the join's 5.
        rooms.deliver("r", "e2", 1, &Utf8Bytes::from("n1"));
        rooms.deliver("r", "e2", 2, &Utf8Bytes::from("n2"));
        let got = texts(&c);
        assert_eq!(
            got[0],
            r#"{"type":"joined","room":"r","seq":0,"epoch":"e2","recovered":false}"#
        );
        assert_eq!(&got[1..], ["n1", "n2"]);
    }

    #[test]
    fn a_rejoin_of_a_live_member_is_answered_in_line_and_loses_nothing() {
        let (rooms, m) = setup();
        let c = conn(&m);
        rooms.add_pending("r", &c);
        rooms.go_live("r", &c, Some(("e", 3)));
        rooms.deliver("r", "e", 4, &Utf8Bytes::from("m4"));
        assert!(rooms.rejoin("r", &c, Some(Id::Str("j".into()))));
        rooms.deliver("r", "e", 5, &Utf8Bytes::from("m5"));
        assert_eq!(
            texts(&c),
            [
                "m4",
                r#"{"type":"joined","room":"r","seq":4,"epoch":"e","id":"j"}"#,
                "m5"
            ]
        );
        let other = conn(&m);
        assert!(!rooms.rejoin("r", &other, None), "not a member");
    }
}
