//! `soak`: the trust check. Long-lived subscribers (resuming with `since` +
//! `epoch` whenever their connection drops), publishers that record every
//! `ack`, churners that connect, join, leave and disconnect without pause,
//! and publish storms, for `--duration`, while faults are injected from
//! outside (`benches/soak.sh`: Redis SIGSTOP/SIGCONT and kill/restart, node
//! SIGKILL and restart).
//!
//! Every membership is recorded as [`Segment`]s: one room, one epoch, from
//! the `joined` seq on, with the payload received at each seq, the ranges the
//! server announced as not recoverable (`recovered: false` in the same
//! epoch), and how it ended (a new epoch announced, a `leave`, or still open
//! at the end). At the end, [`evaluate`] checks every acknowledged message
//! against every membership that should have had it:
//!
//! - **lost without notice**: acked at seq S of epoch E in room R, and a
//!   member of R in E that joined before S never received it, although it
//!   received a later seq (a hole) or stayed to the end, and no
//!   `recovered: false` or new epoch covered it;
//!   A member still in an older epoch at the end, that was a member while
//!   a message of a newer epoch was published and did not get it, lost it
//!   without notice too (an epoch change nobody announced to it); one that
//!   got it under the older epoch counts in `wrong_epoch`;
//! - **duplicates**: one seq twice on one membership; two payloads under one
//!   room + epoch + seq; one payload under two seqs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;
use wsgate_protocol::{ClientRequest, Id, ServerFrame};

use super::member::resume_order;
use super::Ctx;
use crate::cli::SoakArgs;
use crate::clock;
use crate::net::{self, Connector, Target, Ws};
use crate::report::{self, Report};

/// Longest seq span one segment records (beyond it: `too_far`).
const MAX_SPAN: u64 = 4_000_000;
/// Largest jump past the highest seq seen that a segment records (a seq
/// further ahead counts as `too_far`): memory follows the messages received.
const MAX_JUMP: u64 = 100_000;
/// Most publishes one publisher has unanswered at once.
const MAX_IN_FLIGHT: usize = 2_000;
/// Longest wait for one answer (`joined`, `left`).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How a segment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Still a member at the end of the run (after the drain): every later
    /// acked seq of its epoch was due.
    Open,
    /// The server announced a new epoch, or `recovered: false`: nothing
    /// after the highest seq seen was due.
    Notice,
    /// Left the room or the connection (or never came back): nothing after
    /// the highest seq seen was due.
    Left,
}

/// One membership of one room in one epoch, as one connection saw it.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Room index.
    pub room: usize,
    /// Epoch (interned by [`Epochs`]).
    pub epoch: u32,
    /// The `joined` seq: every later seq of the epoch was due.
    pub base: u64,
    /// Highest seq seen or announced as skipped.
    pub max: u64,
    got: Vec<u64>,
    noticed: Vec<(u64, u64)>,
    /// How it ended.
    pub close: Close,
    /// Clock ns of its `joined`.
    pub opened_ns: u64,
    /// Clock ns of its end (`u64::MAX` while open).
    pub closed_ns: u64,
    /// Seqs received twice.
    pub duplicates: u64,
    /// Messages at or below the `joined` seq.
    pub below_base: u64,
    /// The first of them.
    pub first_below: Option<u64>,
    /// What opened it: `join`, `joined (new epoch)` (unsolicited),
    /// `rejoin (new epoch)` (a resume answered in another epoch).
    pub origin: &'static str,
    /// Messages beyond [`MAX_SPAN`] after the `joined` seq, or more than
    /// [`MAX_JUMP`] past the highest seen (not recorded).
    pub too_far: u64,
}

impl Segment {
    /// A membership that starts after seq `base` of `epoch`.
    pub fn new(room: usize, epoch: u32, base: u64, now_ns: u64) -> Segment {
        Segment {
            room,
            epoch,
            base,
            max: base,
            got: Vec::new(),
            noticed: Vec::new(),
            close: Close::Open,
            opened_ns: now_ns,
            closed_ns: u64::MAX,
            duplicates: 0,
            below_base: 0,
            first_below: None,
            origin: "join",
            too_far: 0,
        }
    }

    /// Record `payload` (never 0) received at `seq`.
    pub fn receive(&mut self, seq: u64, payload: u64) {
        if seq <= self.base {
            self.below_base += 1;
            self.first_below.get_or_insert(seq);
            return;
        }
        let i = seq - self.base - 1;
        if i >= MAX_SPAN || seq > self.max.saturating_add(MAX_JUMP) {
            self.too_far += 1;
            return;
        }
        let i = i as usize;
        if self.got.len() <= i {
            self.got.resize(i + 1, 0);
        }
        if self.got[i] != 0 {
            self.duplicates += 1;
        } else {
            self.got[i] = payload.max(1);
        }
        self.max = self.max.max(seq);
    }

    /// `recovered: false` in the same epoch: seqs up to `latest` not yet
    /// seen will never come, and the member was told.
    pub fn notice_gap(&mut self, latest: u64) {
        if latest > self.max {
            self.noticed.push((self.max, latest));
            self.max = latest;
        }
    }

    /// End the membership.
    pub fn end(&mut self, how: Close, now_ns: u64) {
        self.close = how;
        self.closed_ns = if how == Close::Open { u64::MAX } else { now_ns };
    }

    /// The payload received at `seq`, if any.
    pub fn payload_at(&self, seq: u64) -> Option<u64> {
        let i = seq.checked_sub(self.base + 1)?;
        let p = *self.got.get(usize::try_from(i).ok()?)?;
        (p != 0).then_some(p)
    }

    /// Every (seq, payload) received.
    pub fn received(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let base = self.base;
        self.got
            .iter()
            .enumerate()
            .filter(|(_, &p)| p != 0)
            .map(move |(i, &p)| (base + 1 + i as u64, p))
    }

    fn is_noticed(&self, seq: u64) -> bool {
        self.noticed.iter().any(|&(lo, hi)| seq > lo && seq <= hi)
    }

    /// Whether seq `seq` of this segment's epoch was due here and is missing
    /// without notice.
    pub fn misses(&self, seq: u64) -> bool {
        if seq <= self.base || self.is_noticed(seq) || seq - self.base > MAX_SPAN {
            return false;
        }
        if seq > self.max {
            return self.close == Close::Open;
        }
        self.payload_at(seq).is_none()
    }

    /// Whether seq `seq` was due here and the member was told it would not come.
    pub fn noticed(&self, seq: u64) -> bool {
        seq > self.base && (self.is_noticed(seq) || (seq > self.max && self.close == Close::Notice))
    }

    /// Open at some time in `[from_ns, until_ns]`.
    pub fn open_during(&self, from_ns: u64, until_ns: u64) -> bool {
        self.opened_ns <= until_ns && self.closed_ns >= from_ns
    }
}

/// An acknowledged publish.
#[derive(Debug, Clone, Copy)]
pub struct Acked {
    /// Room index.
    pub room: usize,
    /// The seq in the `ack`.
    pub seq: u64,
    /// Its payload id.
    pub payload: u64,
    /// Clock ns it was sent.
    pub sent_ns: u64,
    /// Clock ns the `ack` came.
    pub acked_ns: u64,
}

/// The final check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Acknowledged messages.
    pub acked: u64,
    /// (acked message, member) pairs where the member should have had it.
    pub due: u64,
    /// ...and did not, without notice (must be 0).
    pub lost_without_notice: u64,
    /// Distinct acked messages lost without notice to at least one member.
    pub lost_messages: u64,
    /// (acked message, member) pairs the member was told it would not get.
    pub noticed: u64,
    /// One seq received twice on one membership (must be 0).
    pub duplicates: u64,
    /// Two payloads under one room + epoch + seq (must be 0).
    pub conflicts: u64,
    /// One payload under two seqs (must be 0).
    pub payload_twice: u64,
    /// (acked message, member) pairs where the member got the message under
    /// an older epoch than other members: it was not told of the new epoch
    /// (must be 0).
    pub wrong_epoch: u64,
    /// Payloads received under a seq other than their `ack`'s (must be 0).
    pub seq_mismatch: u64,
    /// Acked messages no member received at all (informational: with every
    /// member of that epoch told otherwise, this is announced loss).
    pub received_by_none: u64,
    /// Messages at or below a membership's `joined` seq: neither lost nor
    /// doubled (the membership never had them), but not what a client that
    /// joined at that seq expects; reported apart, with samples.
    pub below_join: u64,
    /// Up to 10 losses, for the report.
    pub samples: Vec<String>,
    /// Up to 10 memberships that got messages at or below their `joined` seq.
    pub below_samples: Vec<String>,
}

impl Verdict {
    /// Nothing lost without notice, nothing doubled.
    pub fn clean(&self) -> bool {
        self.lost_without_notice == 0
            && self.duplicates == 0
            && self.conflicts == 0
            && self.payload_twice == 0
            && self.seq_mismatch == 0
            && self.wrong_epoch == 0
    }
}

/// Check every acked message against every membership (`segments`, each
/// with the index of the connection it belongs to).
pub fn evaluate(acked: &[Acked], segments: &[(usize, Segment)]) -> Verdict {
    let mut v = Verdict {
        acked: acked.len() as u64,
        ..Verdict::default()
    };
    let mut at: HashMap<(usize, u32, u64), u64> = HashMap::new();
    let mut placed: HashMap<u64, (u32, u64)> = HashMap::new();
    let mut conflicts = HashSet::new();
    let mut twice = HashSet::new();
    let mut by_room: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, (_, seg)) in segments.iter().enumerate() {
        v.duplicates += seg.duplicates;
        v.below_join += seg.below_base;
        if let (Some(first), true) = (seg.first_below, v.below_samples.len() < 10) {
            v.below_samples.push(format!(
                "room {} epoch #{} member {}: opened by `{}` at seq {}, then {} messages at or below it, the first at seq {first}",
                seg.room, seg.epoch, segments[i].0, seg.origin, seg.base, seg.below_base
            ));
        }
        by_room.entry(seg.room).or_default().push(i);
        for (seq, p) in seg.received() {
            let first = *at.entry((seg.room, seg.epoch, seq)).or_insert(p);
            if first != p {
                conflicts.insert((seg.room, seg.epoch, seq));
            }
            let first = *placed.entry(p).or_insert((seg.epoch, seq));
            if first.1 != seq {
                twice.insert(p);
            }
        }
    }
    v.conflicts = conflicts.len() as u64;
    v.payload_twice = twice.len() as u64;
    let none = Vec::new();
    for a in acked {
        let epoch = placed.get(&a.payload).map(|&(e, s)| {
            if s != a.seq {
                v.seq_mismatch += 1;
            }
            e
        });
        if epoch.is_none() {
            v.received_by_none += 1;
        }
        // Every member of the room is looked at. Of the acked message's
        // epoch (when someone got it): due after its joined seq. Of an older
        // epoch: due when it was a member while the message was published
        // and was never told of a new epoch (still open at the end). When
        // nobody got it: due as in its own epoch when it was a member while
        // the message was published and got no other payload at that seq
        // (which would put it in another epoch).
        let mut lost = false;
        for &i in by_room.get(&a.room).unwrap_or(&none) {
            let (conn, seg) = &segments[i];
            let same_epoch = epoch == Some(seg.epoch);
            let got = seg.payload_at(a.seq);
            if !same_epoch {
                if !seg.open_during(a.sent_ns, a.acked_ns) {
                    continue;
                }
                if got == Some(a.payload) {
                    // Received, but under an epoch other members saw it in.
                    v.due += 1;
                    v.wrong_epoch += 1;
                    continue;
                }
                // Epochs are numbered as first seen: a member of a newer
                // one than the message's had moved on.
                let stale = epoch.is_some_and(|e| seg.epoch < e && seg.close == Close::Open);
                if got.is_some() || (epoch.is_some() && !stale) {
                    continue;
                }
            }
            if got == Some(a.payload) {
                v.due += 1;
            } else if seg.misses(a.seq) || (!same_epoch && epoch.is_some()) {
                v.due += 1;
                v.lost_without_notice += 1;
                lost = true;
                if v.samples.len() < 10 {
                    v.samples.push(format!(
                        "room {} seq {} (epoch #{}) member {} in epoch #{} (joined at {}, highest {}, {:?})",
                        a.room,
                        a.seq,
                        epoch.map_or_else(|| "?".to_owned(), |e| e.to_string()),
                        conn,
                        seg.epoch,
                        seg.base,
                        seg.max,
                        seg.close
                    ));
                }
            } else if seg.noticed(a.seq) {
                v.noticed += 1;
            }
        }
        if lost {
            v.lost_messages += 1;
        }
    }
    v
}

/// Epoch strings as small numbers.
#[derive(Default)]
pub struct Epochs(Mutex<HashMap<String, u32>>);

impl Epochs {
    /// The number of `epoch`.
    pub fn id(&self, epoch: &str) -> u32 {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let next = map.len() as u32 + 1;
        *map.entry(epoch.to_owned()).or_insert(next)
    }

    /// Epochs seen.
    pub fn count(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// What the soak's tasks share.
#[derive(Default)]
struct State {
    stop: CancellationToken,
    publishing: AtomicBool,
    churning: AtomicBool,
    storms: AtomicU64,
    epochs: Epochs,
    /// Messages subscribers received (progress for the drain).
    received: AtomicU64,
    /// Subscribers connected with every room joined.
    ready: AtomicI64,
    drops: AtomicU64,
    resumed: AtomicU64,
    not_recovered: AtomicU64,
    epoch_changes: AtomicU64,
    /// Unsolicited `joined` naming the epoch the member already had.
    same_epoch_notices: AtomicU64,
    sent: AtomicU64,
    acks: AtomicU64,
    in_flight: AtomicI64,
    unanswered: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    churn_connects: AtomicU64,
    churn_joins: AtomicU64,
    churn_failures: AtomicU64,
}

impl State {
    fn count_error(&self, what: String) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(what)
            .or_default() += 1;
    }
}

/// What every task needs to connect.
#[derive(Clone)]
struct Net {
    connector: Arc<Connector>,
    targets: Arc<Vec<Target>>,
    rooms: Arc<Vec<String>>,
    state: Arc<State>,
}

impl Net {
    async fn open(&self, url_idx: usize, token: &str) -> Option<Ws> {
        let target = &self.targets[url_idx % self.targets.len()];
        self.connector
            .open(target, token)
            .await
            .map(|(ws, _)| ws)
            .ok()
    }

    /// Sleep a jittered backoff for attempt `n`; false when the run stopped.
    async fn backoff(&self, n: u32) -> bool {
        let base = Duration::from_millis(20 << n.min(5)).min(Duration::from_millis(1000));
        let pause = base.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        tokio::select! {
            _ = self.state.stop.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }

    fn room_index(&self, name: &str) -> Option<usize> {
        self.rooms.iter().position(|r| r == name)
    }
}

#[derive(Deserialize)]
struct Payload {
    k: u64,
}

/// The payload id in a message's `data` (`{"k":N}`), 0 when foreign.
fn payload_of(data: &RawValue) -> u64 {
    serde_json::from_str::<Payload>(data.get()).map_or(0, |p| p.k)
}

fn send_text(text: String) -> WsMessage {
    WsMessage::text(text)
}

fn join_request(room: &str, since: Option<(u64, &str)>, id: String) -> String {
    ClientRequest::Join {
        room: room.to_owned(),
        since: since.map(|(s, _)| s),
        epoch: since.map(|(_, e)| e.to_owned()),
        presence: false,
        id: Some(Id::Str(id)),
    }
    .to_json()
}

/// A subscriber's membership of one of its rooms.
struct Sub {
    room: usize,
    epoch: String,
    seg: Option<Segment>,
    joined: bool,
}

/// One subscriber: returns its segments.
async fn subscriber(net: Net, index: usize, rooms: Vec<usize>, token: String) -> Vec<Segment> {
    let st = net.state.clone();
    let mut subs: Vec<Sub> = rooms
        .into_iter()
        .map(|room| Sub {
            room,
            epoch: String::new(),
            seg: None,
            joined: false,
        })
        .collect();
    let mut done = Vec::new();
    let addrs: Vec<_> = net.targets.iter().map(|t| t.addr).collect();
    let mut url = index % addrs.len();
    let mut attempt = 0u32;
    let mut ready = false;
    let mut member_at_end = false;
    'outer: while !st.stop.is_cancelled() {
        let Some(mut ws) = net.open(url, &token).await else {
            attempt += 1;
            url = resume_order(&addrs, url, index + attempt as usize)[0];
            if !net.backoff(attempt).await {
                break;
            }
            continue;
        };
        let mut joins_ok = true;
        for (k, s) in subs.iter_mut().enumerate() {
            s.joined = false;
            let since = s.seg.as_ref().map(|g| (g.max, s.epoch.as_str()));
            let frame = join_request(&net.rooms[s.room], since, format!("j{k}"));
            if ws.send(send_text(frame)).await.is_err() {
                joins_ok = false;
                break;
            }
        }
        let mut alive = joins_ok;
        while alive {
            let msg = tokio::select! {
                _ = st.stop.cancelled() => {
                    // Still a member of every room: the tail was due.
                    member_at_end = ready;
                    net::close(&mut ws, Duration::from_secs(2)).await;
                    break 'outer;
                }
                msg = ws.next() => msg,
            };
            let text = match msg {
                Some(Ok(WsMessage::Text(t))) => t,
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => {
                    alive = false;
                    continue;
                }
                Some(Ok(_)) => continue,
            };
            let now = clock::now_ns();
            match ServerFrame::parse(text.as_str()) {
                Ok(ServerFrame::Message(m)) => {
                    st.received.fetch_add(1, Relaxed);
                    let Some(room) = net.room_index(&m.room) else {
                        continue;
                    };
                    if let Some(seg) = subs
                        .iter_mut()
                        .find(|s| s.room == room)
                        .and_then(|s| s.seg.as_mut())
                    {
                        seg.receive(m.seq, payload_of(&m.data));
                    }
                }
                Ok(ServerFrame::Joined(j)) => {
                    let Some(room) = net.room_index(&j.room) else {
                        continue;
                    };
                    let Some(s) = subs.iter_mut().find(|s| s.room == room) else {
                        continue;
                    };
                    let epoch = st.epochs.id(&j.epoch);
                    let solicited = j.id.is_some();
                    match s.seg.take() {
                        None => s.seg = Some(Segment::new(room, epoch, j.seq, now)),
                        Some(seg) if j.epoch == s.epoch && j.recovered == Some(true) => {
                            st.resumed.fetch_add(1, Relaxed);
                            s.seg = Some(seg);
                        }
                        Some(mut seg) if j.epoch == s.epoch && j.seq >= seg.max => {
                            if solicited {
                                st.not_recovered.fetch_add(1, Relaxed);
                            } else {
                                st.same_epoch_notices.fetch_add(1, Relaxed);
                            }
                            seg.notice_gap(j.seq);
                            s.seg = Some(seg);
                        }
                        Some(mut seg) => {
                            if solicited {
                                st.not_recovered.fetch_add(1, Relaxed);
                            } else if j.epoch == s.epoch {
                                st.same_epoch_notices.fetch_add(1, Relaxed);
                            } else {
                                st.epoch_changes.fetch_add(1, Relaxed);
                            }
                            seg.end(Close::Notice, now);
                            done.push(seg);
                            let mut next = Segment::new(room, epoch, j.seq, now);
                            next.origin = if solicited {
                                "rejoin (new epoch)"
                            } else {
                                "joined (new epoch)"
                            };
                            s.seg = Some(next);
                        }
                    }
                    s.epoch = j.epoch;
                    if solicited {
                        s.joined = true;
                    }
                    if !ready && subs.iter().all(|s| s.joined) {
                        ready = true;
                        attempt = 0;
                        st.ready.fetch_add(1, Relaxed);
                    }
                }
                Ok(ServerFrame::Error(e)) => {
                    st.count_error(format!("subscriber {}", e.code.as_str()));
                    if e.id.is_some() {
                        // A refused join: start again on a new connection.
                        alive = false;
                    }
                }
                _ => {}
            }
        }
        // The connection ended under us: resume elsewhere.
        st.drops.fetch_add(1, Relaxed);
        if ready {
            st.ready.fetch_sub(1, Relaxed);
            ready = false;
        }
        attempt += 1;
        url = resume_order(&addrs, url, index + attempt as usize)[0];
        if !net.backoff(attempt.min(2)).await {
            break;
        }
    }
    if ready {
        st.ready.fetch_sub(1, Relaxed);
    }
    if !member_at_end {
        // Not (fully) back when the run stopped: nothing more was due.
        close_all(&mut subs, &mut done, Close::Left);
    }
    for s in subs {
        if let Some(seg) = s.seg {
            done.push(seg);
        }
    }
    done
}

fn close_all(subs: &mut [Sub], done: &mut Vec<Segment>, how: Close) {
    let now = clock::now_ns();
    for s in subs {
        if let Some(mut seg) = s.seg.take() {
            seg.end(how, now);
            done.push(seg);
        }
    }
}

/// What a publisher sends: `rate` msg/s to the first `busy` rooms, and
/// `storm` more at once, to any room, at each storm.
#[derive(Clone, Copy)]
struct PublishPlan {
    rate: f64,
    storm: usize,
    busy: usize,
}

/// One publisher: returns what was acked.
async fn publisher(net: Net, index: usize, plan: PublishPlan, token: String) -> Vec<Acked> {
    let PublishPlan { rate, storm, busy } = plan;
    let st = net.state.clone();
    let mut acked = Vec::new();
    let mut counter: u64 = 0;
    let mut storms_seen = st.storms.load(Relaxed);
    let mut url = index % net.targets.len();
    let mut attempt = 0u32;
    let period = Duration::from_secs_f64(1.0 / rate);
    while !st.stop.is_cancelled() {
        let Some(mut ws) = net.open(url, &token).await else {
            attempt += 1;
            url = (url + 1) % net.targets.len();
            if !net.backoff(attempt).await {
                break;
            }
            continue;
        };
        attempt = 0;
        let mut pending: HashMap<u64, (usize, u64, u64)> = HashMap::new();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut burst = 0;
            tokio::select! {
                _ = st.stop.cancelled() => break,
                _ = tick.tick() => {
                    if st.publishing.load(Relaxed) {
                        burst = 1;
                        let storms = st.storms.load(Relaxed);
                        if storms != storms_seen {
                            storms_seen = storms;
                            burst += storm;
                        }
                    }
                }
                msg = ws.next() => {
                    let text = match msg {
                        Some(Ok(WsMessage::Text(t))) => t,
                        Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
                        Some(Ok(_)) => continue,
                    };
                    let frame = ServerFrame::parse(text.as_str());
                    let id = match &frame {
                        Ok(ServerFrame::Ack(a)) => a.id.as_ref(),
                        Ok(ServerFrame::Error(e)) => e.id.as_ref(),
                        _ => None,
                    };
                    let Some((room, payload, sent_ns)) = id
                        .and_then(|i| i.to_string().parse::<u64>().ok())
                        .and_then(|n| pending.remove(&n))
                    else {
                        continue;
                    };
                    st.in_flight.fetch_sub(1, Relaxed);
                    match frame {
                        Ok(ServerFrame::Ack(a)) => {
                            st.acks.fetch_add(1, Relaxed);
                            acked.push(Acked { room, seq: a.seq, payload, sent_ns, acked_ns: clock::now_ns() });
                        }
                        Ok(ServerFrame::Error(e)) => st.count_error(format!("publish {}", e.code.as_str())),
                        _ => {}
                    }
                }
            }
            let burst = burst.min(MAX_IN_FLIGHT.saturating_sub(pending.len()));
            let mut failed = false;
            for n in 0..burst {
                counter += 1;
                let payload = ((index as u64 + 1) << 32) | counter;
                // The steady message (the first) goes to a busy room; storm
                // messages reach the quiet rooms too.
                let span = if n == 0 { busy } else { net.rooms.len() };
                let room = rand::random::<u64>() as usize % span.max(1);
                // Built as JSON, not as a `ClientRequest`, so that optional
                // fields the protocol gains (v1.1 `key`) stay out of it.
                let frame = serde_json::json!({
                    "type": "publish",
                    "room": net.rooms[room],
                    "data": {"k": payload},
                    "id": counter.to_string(),
                })
                .to_string();
                pending.insert(counter, (room, payload, clock::now_ns()));
                st.in_flight.fetch_add(1, Relaxed);
                st.sent.fetch_add(1, Relaxed);
                if ws.feed(send_text(frame)).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if failed || (burst > 0 && ws.flush().await.is_err()) {
                break;
            }
        }
        // Unanswered publishes have an unknown fate: never counted as acked.
        st.unanswered.fetch_add(pending.len() as u64, Relaxed);
        st.in_flight.fetch_sub(pending.len() as i64, Relaxed);
        if st.stop.is_cancelled() {
            net::close(&mut ws, Duration::from_secs(2)).await;
            break;
        }
        url = (url + 1) % net.targets.len();
    }
    acked
}

/// Wait for the answer to a request with id `id`, recording messages of the
/// open segment meanwhile; `Some(frame)` when it came.
async fn await_answer(
    ws: &mut Ws,
    net: &Net,
    id: &str,
    seg: &mut Option<Segment>,
    done: &mut Vec<Segment>,
) -> Option<ServerFrame> {
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    loop {
        let msg = tokio::select! {
            _ = net.state.stop.cancelled() => return None,
            r = tokio::time::timeout_at(deadline, ws.next()) => r.ok()??,
        };
        let text = match msg {
            Ok(WsMessage::Text(t)) => t,
            Ok(WsMessage::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        };
        let frame = ServerFrame::parse(text.as_str()).ok()?;
        if frame.id().is_some_and(|i| i.to_string() == id) {
            return Some(frame);
        }
        churn_frame(net, frame, seg, done);
    }
}

/// A churner's handling of a frame that is not the answer it waits for.
fn churn_frame(net: &Net, frame: ServerFrame, seg: &mut Option<Segment>, done: &mut Vec<Segment>) {
    let Some(g) = seg.as_mut() else {
        return;
    };
    match frame {
        ServerFrame::Message(m) if net.room_index(&m.room) == Some(g.room) => {
            g.receive(m.seq, payload_of(&m.data));
        }
        ServerFrame::Joined(j) if net.room_index(&j.room) == Some(g.room) => {
            let epoch = net.state.epochs.id(&j.epoch);
            if epoch == g.epoch {
                net.state.same_epoch_notices.fetch_add(1, Relaxed);
            } else {
                let now = clock::now_ns();
                let mut next = Segment::new(g.room, epoch, j.seq, now);
                next.origin = "joined (new epoch)";
                let mut old = std::mem::replace(g, next);
                old.end(Close::Notice, now);
                done.push(old);
            }
        }
        _ => {}
    }
}

/// One churner: returns its segments.
async fn churner(net: Net, token: String) -> Vec<Segment> {
    let st = net.state.clone();
    let mut done = Vec::new();
    let mut failures = 0u32;
    while !st.stop.is_cancelled() && st.churning.load(Relaxed) {
        let url = rand::random::<u64>() as usize % net.targets.len();
        let Some(mut ws) = net.open(url, &token).await else {
            st.churn_failures.fetch_add(1, Relaxed);
            failures += 1;
            if !net.backoff(failures).await {
                break;
            }
            continue;
        };
        failures = 0;
        st.churn_connects.fetch_add(1, Relaxed);
        let rounds = 1 + rand::random::<u32>() % 3;
        let mut healthy = true;
        for round in 0..rounds {
            if !healthy || st.stop.is_cancelled() {
                break;
            }
            let room = rand::random::<u64>() as usize % net.rooms.len();
            let id = format!("c{round}");
            let mut seg = None;
            if ws
                .send(send_text(join_request(&net.rooms[room], None, id.clone())))
                .await
                .is_err()
            {
                break;
            }
            match await_answer(&mut ws, &net, &id, &mut seg, &mut done).await {
                Some(ServerFrame::Joined(j)) => {
                    st.churn_joins.fetch_add(1, Relaxed);
                    seg = Some(Segment::new(
                        room,
                        st.epochs.id(&j.epoch),
                        j.seq,
                        clock::now_ns(),
                    ));
                }
                Some(_) => continue,
                None => break,
            }
            // Stay a moment, receiving.
            let stay = Duration::from_millis(100 + rand::random::<u64>() % 1900);
            let until = tokio::time::Instant::now() + stay;
            while healthy {
                let msg = tokio::select! {
                    _ = st.stop.cancelled() => break,
                    r = tokio::time::timeout_at(until, ws.next()) => match r {
                        Err(_) => break,
                        Ok(m) => m,
                    },
                };
                match msg {
                    Some(Ok(WsMessage::Text(t))) => {
                        if let Ok(f) = ServerFrame::parse(t.as_str()) {
                            churn_frame(&net, f, &mut seg, &mut done);
                        }
                    }
                    Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => healthy = false,
                    Some(Ok(_)) => {}
                }
            }
            if healthy {
                let leave = ClientRequest::Leave {
                    room: net.rooms[room].clone(),
                    id: Some(Id::Str(format!("l{round}"))),
                }
                .to_json();
                healthy = ws.send(send_text(leave)).await.is_ok()
                    && await_answer(&mut ws, &net, &format!("l{round}"), &mut seg, &mut done)
                        .await
                        .is_some();
            }
            if let Some(mut g) = seg.take() {
                g.end(Close::Left, clock::now_ns());
                done.push(g);
            }
        }
        if rand::random::<bool>() {
            net::close(&mut ws, Duration::from_secs(2)).await;
        }
        // else: dropped without a Close (an abrupt disconnect).
    }
    done
}

fn spawn_all<T: Send + 'static>(
    tasks: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<JoinHandle<T>> {
    tasks.map(tokio::spawn).collect()
}

async fn join_all<T>(
    handles: Vec<JoinHandle<T>>,
    deadline: tokio::time::Instant,
) -> (Vec<T>, usize) {
    let mut out = Vec::new();
    let mut unfinished = 0;
    for h in handles {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(deadline, h).await {
            Ok(Ok(v)) => out.push(v),
            _ => {
                abort.abort();
                unfinished += 1;
            }
        }
    }
    (out, unfinished)
}

/// Poll `done` every 50 ms until it holds or `limit` passes.
async fn poll_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// Run the scenario.
pub async fn run(ctx: &Ctx, args: &SoakArgs) -> Result<Report> {
    let mut report = Report::new("soak");
    let state = Arc::new(State::default());
    let net = Net {
        connector: ctx.connector.clone(),
        targets: ctx.targets.clone(),
        rooms: Arc::new(
            (0..args.rooms)
                .map(|i| format!("{}.{i}", args.room))
                .collect(),
        ),
        state: state.clone(),
    };
    let sub_token = ctx.tokens.for_user("soak-sub")?;
    let subs = spawn_all((0..args.subscribers).map(|i| {
        let rooms = (0..args.sub_rooms).map(|k| (i + k) % args.rooms).collect();
        subscriber(net.clone(), i, rooms, sub_token.clone())
    }));
    let ready = poll_until(ctx.common.setup_budget(args.subscribers), || {
        state.ready.load(Relaxed) >= args.subscribers as i64
    })
    .await;
    report.line(format!(
        "subscribers: {} of {} connected and joined to {} rooms each ({} rooms)",
        state.ready.load(Relaxed),
        args.subscribers,
        args.sub_rooms,
        args.rooms
    ));
    if !ready {
        report.fail("not every subscriber connected");
    }
    state.publishing.store(true, Relaxed);
    state.churning.store(true, Relaxed);
    let mut pub_tokens = Vec::new();
    for i in 0..args.publishers {
        pub_tokens.push(ctx.tokens.for_user(&format!("soak-pub-{i}"))?);
    }
    let plan = PublishPlan {
        rate: args.rate,
        storm: args.storm,
        busy: args.rooms - args.quiet_rooms,
    };
    let pubs = spawn_all(
        pub_tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| publisher(net.clone(), i, plan, t)),
    );
    let mut churn_tokens = Vec::new();
    for i in 0..args.churners {
        churn_tokens.push(ctx.tokens.for_user(&format!("soak-churn-{i}"))?);
    }
    let churners = spawn_all(churn_tokens.into_iter().map(|t| churner(net.clone(), t)));

    // The load phase: storms on a schedule, a progress line every 30 s.
    let started = Instant::now();
    let end = started + args.duration;
    let mut next_storm = started + args.storm_every;
    let mut next_line = started + Duration::from_secs(30);
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_storm && args.storm > 0 {
            state.storms.fetch_add(1, Relaxed);
            next_storm += args.storm_every;
        }
        if now >= next_line {
            eprintln!("[soak] {}", progress(&state, started));
            next_line += Duration::from_secs(30);
        }
        tokio::time::sleep(Duration::from_millis(100).min(end.saturating_duration_since(now)))
            .await;
    }
    state.publishing.store(false, Relaxed);
    state.churning.store(false, Relaxed);
    let load_s = started.elapsed().as_secs_f64();

    // Drain: every publish answered (or its connection gone), every
    // subscriber back and joined, and nothing received for --idle.
    let drain_started = Instant::now();
    let answered = poll_until(args.drain, || state.in_flight.load(Relaxed) <= 0).await;
    let mut last = state.received.load(Relaxed);
    let mut quiet_since = Instant::now();
    let left = args.drain.saturating_sub(drain_started.elapsed());
    let quiet = poll_until(left, || {
        let now = state.received.load(Relaxed);
        if now != last || state.ready.load(Relaxed) < args.subscribers as i64 {
            (last, quiet_since) = (now, Instant::now());
        }
        quiet_since.elapsed() >= args.idle
    })
    .await;
    let back = state.ready.load(Relaxed);
    state.stop.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (sub_segs, sub_unfinished) = join_all(subs, deadline).await;
    let (pub_acks, pub_unfinished) = join_all(pubs, deadline).await;
    let (churn_segs, churn_unfinished) = join_all(churners, deadline).await;

    let mut segments = Vec::new();
    for (i, segs) in sub_segs.into_iter().enumerate() {
        segments.extend(segs.into_iter().map(|s| (i, s)));
    }
    let churn_segments: usize = churn_segs.iter().map(Vec::len).sum();
    for (i, segs) in churn_segs.into_iter().enumerate() {
        segments.extend(segs.into_iter().map(|s| (args.subscribers + i, s)));
    }
    let acked: Vec<Acked> = pub_acks.into_iter().flatten().collect();
    let verdict = evaluate(&acked, &segments);

    report.line(format!(
        "load: {load_s:.0} s; {}",
        progress(&state, started)
    ));
    report.line(format!(
        "drain: {:.1} s; publishes answered: {answered}; {back} of {} subscribers back and quiet for {:?}: {quiet}",
        drain_started.elapsed().as_secs_f64(),
        args.subscribers,
        args.idle
    ));
    report.line(format!(
        "churn: {} connections, {} joins, {} memberships checked, {} connect failures",
        state.churn_connects.load(Relaxed),
        state.churn_joins.load(Relaxed),
        churn_segments,
        state.churn_failures.load(Relaxed)
    ));
    let errors = state
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if !errors.is_empty() {
        let parts: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        report.line(format!("errors received: {}", parts.join(", ")));
    }
    report.line(format!(
        "acknowledged messages: {}; (message, member) pairs due {}, of which lost WITHOUT notice {} ({} distinct messages); pairs announced as lost (recovered:false / new epoch) {}",
        report::thousands(verdict.acked as f64),
        report::thousands(verdict.due as f64),
        verdict.lost_without_notice,
        verdict.lost_messages,
        report::thousands(verdict.noticed as f64)
    ));
    report.line(format!(
        "duplicates: {} seqs twice on one membership, {} room+epoch+seq with two payloads, {} payloads under two seqs, {} payloads under a seq other than their ack's; {} (message, member) pairs received under an unannounced older epoch; {} messages at or below a joined seq",
        verdict.duplicates, verdict.conflicts, verdict.payload_twice, verdict.seq_mismatch, verdict.wrong_epoch, verdict.below_join
    ));
    report.line(format!(
        "acked messages nobody received: {} (epochs seen: {}; unsolicited joined naming the epoch the member already had: {})",
        verdict.received_by_none,
        state.epochs.count(),
        state.same_epoch_notices.load(Relaxed)
    ));
    for s in &verdict.samples {
        report.line(format!("  lost: {s}"));
    }
    for s in &verdict.below_samples {
        report.line(format!("  at or below the joined seq: {s}"));
    }
    report.set("verdict", &verdict);
    report.set("load_s", load_s);
    report.set("epochs", state.epochs.count());
    report.set("drops", state.drops.load(Relaxed));
    report.set("resumed", state.resumed.load(Relaxed));
    report.set("not_recovered", state.not_recovered.load(Relaxed));
    report.set("epoch_changes", state.epoch_changes.load(Relaxed));
    report.set("same_epoch_notices", state.same_epoch_notices.load(Relaxed));
    report.set("published", state.sent.load(Relaxed));
    report.set("unanswered", state.unanswered.load(Relaxed));
    report.set("errors", &errors);
    report.set("churn_connects", state.churn_connects.load(Relaxed));
    report.set("churn_joins", state.churn_joins.load(Relaxed));
    if verdict.lost_without_notice > 0 {
        report.fail(format!(
            "{} acknowledged messages lost without notice ({} (message, member) pairs)",
            verdict.lost_messages, verdict.lost_without_notice
        ));
    }
    if !verdict.clean() {
        report.fail("duplicates (a message delivered twice, or two messages under one seq), or a message received under an epoch change nobody announced");
    }
    if verdict.below_join > 0 {
        report.warn(format!(
            "{} messages arrived at or below their membership's joined seq (not counted as duplicates: see the samples)",
            verdict.below_join
        ));
    }
    if verdict.acked == 0 {
        report.fail("no publish was acknowledged");
    }
    if back < args.subscribers as i64 {
        report.fail(format!(
            "{} subscribers were not back at the end",
            args.subscribers as i64 - back
        ));
    }
    let unfinished = sub_unfinished + pub_unfinished + churn_unfinished;
    if unfinished > 0 {
        report.fail(format!("{unfinished} tasks did not end in time"));
    }
    Ok(report)
}

fn progress(st: &State, started: Instant) -> String {
    format!(
        "t={:.0}s published {} acked {} received {} drops {} resumed {} not-recovered {} epoch-changes {} churn {}",
        started.elapsed().as_secs_f64(),
        st.sent.load(Relaxed),
        st.acks.load(Relaxed),
        st.received.load(Relaxed),
        st.drops.load(Relaxed),
        st.resumed.load(Relaxed),
        st.not_recovered.load(Relaxed),
        st.epoch_changes.load(Relaxed),
        st.churn_connects.load(Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(room: usize, seq: u64, payload: u64) -> Acked {
        Acked {
            room,
            seq,
            payload,
            sent_ns: 100,
            acked_ns: 200,
        }
    }

    #[test]
    fn a_hole_is_lost_without_notice() {
        let mut s = Segment::new(0, 1, 5, 0);
        s.receive(6, 106);
        s.receive(8, 108);
        let v = evaluate(
            &[acked(0, 6, 106), acked(0, 7, 107), acked(0, 8, 108)],
            &[(0, s)],
        );
        assert_eq!(v.lost_without_notice, 1);
        assert_eq!(v.lost_messages, 1);
        assert_eq!(v.due, 3);
        assert!(!v.clean());
        assert_eq!(v.samples.len(), 1);
    }

    #[test]
    fn an_open_tail_is_due_and_a_noticed_one_is_not() {
        let mut open = Segment::new(0, 1, 5, 0);
        open.receive(6, 106);
        let mut told = open.clone();
        told.end(Close::Notice, 150);
        let mut left = open.clone();
        left.end(Close::Left, 150);
        let all = [acked(0, 6, 106), acked(0, 7, 107)];
        // 7 reached nobody: its epoch is unknown, the members of the room
        // at the time are checked.
        let v = evaluate(&all, &[(0, open)]);
        assert_eq!(v.lost_without_notice, 1);
        let v = evaluate(&all, &[(0, told)]);
        assert_eq!((v.lost_without_notice, v.noticed), (0, 1));
        let v = evaluate(&all, &[(0, left)]);
        assert_eq!((v.lost_without_notice, v.noticed), (0, 0));
        assert!(v.clean());
    }

    #[test]
    fn recovered_false_covers_its_gap_only() {
        let mut s = Segment::new(0, 1, 0, 0);
        s.receive(1, 1001);
        s.notice_gap(4); // 2..=4 announced
        s.receive(5, 1005);
        s.receive(7, 1007); // 6 missing: not announced
        let all: Vec<Acked> = (1..=7).map(|q| acked(0, q, 1000 + q)).collect();
        let v = evaluate(&all, &[(0, s)]);
        assert_eq!(v.noticed, 3);
        assert_eq!(v.lost_without_notice, 1);
    }

    #[test]
    fn a_member_that_joined_later_or_another_epoch_is_not_due() {
        let mut late = Segment::new(0, 1, 10, 0);
        late.receive(11, 1011);
        let mut other = Segment::new(0, 2, 0, 0);
        other.receive(3, 2003); // another message at seq 3, epoch 2
        let mut got = Segment::new(0, 1, 0, 0);
        got.receive(3, 1003);
        got.end(Close::Left, 300);
        let v = evaluate(
            &[acked(0, 3, 1003), acked(0, 11, 1011)],
            &[(0, late), (1, other), (2, got)],
        );
        assert_eq!(v.lost_without_notice, 0, "{v:?}");
        assert!(v.clean());
    }

    #[test]
    fn an_unannounced_epoch_change_is_loss_without_notice() {
        // Member 0 joined room 0 in epoch 1 at seq 5 and was never told of
        // epoch 2: it misses 2:1..=5 and gets 2:6 as if it were 1:6.
        let mut stale = Segment::new(0, 1, 5, 50);
        stale.receive(6, 2006);
        let mut told = Segment::new(0, 2, 0, 60);
        for q in 1..=6 {
            told.receive(q, 2000 + q);
        }
        let all: Vec<Acked> = (1..=6).map(|q| acked(0, q, 2000 + q)).collect();
        let v = evaluate(&all, &[(1, told.clone()), (0, stale.clone())]);
        assert_eq!(v.lost_without_notice, 5, "{v:?}");
        assert_eq!(v.wrong_epoch, 1);
        assert_eq!(v.payload_twice, 0);
        assert!(!v.clean());
        // Told (closed by the notice), it is not due anything of epoch 2.
        stale.end(Close::Notice, 70);
        let v = evaluate(&all, &[(1, told), (0, stale)]);
        assert_eq!(v.lost_without_notice, 0, "{v:?}");
    }

    #[test]
    fn duplicates_conflicts_and_moved_payloads() {
        let mut a = Segment::new(0, 1, 0, 0);
        a.receive(1, 11);
        a.receive(1, 11);
        a.receive(2, 12);
        let mut b = Segment::new(0, 1, 0, 0);
        b.receive(1, 99); // another payload under room 0, epoch 1, seq 1
        b.receive(3, 12); // payload 12 under a second seq
        b.receive(0, 5); // at the joined seq
        let v = evaluate(&[], &[(0, a), (1, b)]);
        assert_eq!(v.duplicates, 1);
        assert_eq!(v.conflicts, 1);
        assert_eq!(v.payload_twice, 1);
        assert_eq!(v.below_join, 1);
        assert_eq!(v.below_samples.len(), 1);
        assert!(!v.clean());
        let mut early = Segment::new(0, 1, 5, 0);
        early.receive(3, 7);
        assert!(evaluate(&[], &[(0, early)]).clean());
    }

    #[test]
    fn seqs_far_beyond_the_join_are_not_recorded() {
        let mut s = Segment::new(0, 1, 0, 0);
        s.receive(MAX_SPAN + 5, 1);
        s.receive(MAX_JUMP + 1, 1);
        assert_eq!(s.too_far, 2);
        assert_eq!(s.max, 0);
        assert!(!s.misses(MAX_SPAN + 5));
        s.receive(MAX_JUMP, 1);
        assert_eq!((s.too_far, s.max), (2, MAX_JUMP));
    }

    #[test]
    fn payload_ids_are_read_from_data() {
        let raw = RawValue::from_string(r#"{"k":42}"#.to_owned()).unwrap();
        assert_eq!(payload_of(&raw), 42);
        let raw = RawValue::from_string(r#"{"t":1}"#.to_owned()).unwrap();
        assert_eq!(payload_of(&raw), 0);
    }
}
