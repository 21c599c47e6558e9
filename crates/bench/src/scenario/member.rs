//! One connection, one task: connect, join, then read (and, when it is a
//! publisher, publish at a paced rate) until told to stop; optionally
//! reconnect to another node and resume with `since` + `epoch`.
//!
//! The receive path never fully parses a `message` frame: room and seq come
//! from [`peek_message`], the send time from [`peek_sent_ns`]. Counters are
//! flushed to the shared [`Shared`] in batches.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use wsgate_protocol::{peek_message, ServerFrame};

use crate::clock;
use crate::net::{
    self, peek_ack_seq, peek_sent_ns, Conn, ConnectError, Connector, PublishEncoder, Target,
    Transport,
};
use crate::pace::Pacer;
use crate::stats::{Latencies, LatencyBuf, Seen, SeqTracker, FLUSH_NS};

/// Most messages one publisher sends in one wake-up.
const MAX_BURST: u64 = 1_000;
/// Most frames taken from the read buffer per wake-up.
const MAX_BATCH: usize = 64;
/// Delivered-count batch before a flush to the shared counter.
const FLUSH_COUNT: u64 = 64;
/// How `presence_join` and `presence_leave` frames start.
const PRESENCE_EVENT: &str = r#"{"type":"presence_"#;

/// State shared by every member of a run.
pub struct Shared {
    /// End-to-end latencies.
    pub latencies: Latencies,
    /// Messages received (flushed in batches).
    pub delivered: AtomicU64,
    /// Seqs skipped, as seen live (a gap later filled still counts here).
    pub gaps: AtomicU64,
    /// Duplicates seen live.
    pub duplicates: AtomicU64,
    /// Out-of-order arrivals seen live.
    pub out_of_order: AtomicU64,
    /// Publish frames sent.
    pub sent: AtomicU64,
    /// `ack`s received.
    pub acks: AtomicU64,
    /// `rate_limited` errors received.
    pub rate_limited: AtomicU64,
    /// Other `error` frames received.
    pub errors: AtomicU64,
    /// `presence_join` / `presence_leave` events received.
    pub presence_events: AtomicU64,
    /// Connections that ended without being told to (closed by the server, reset).
    pub dropped: AtomicU64,
    /// Latencies count only for messages sent at or after this (clock ns)...
    pub record_from_ns: AtomicU64,
    /// ...and before this.
    pub record_until_ns: AtomicU64,
    /// Highest acked seq per room index.
    pub room_last: Vec<AtomicU64>,
    /// Stops every member.
    pub stop: CancellationToken,
    /// Per-publisher rate, messages per second (0: not publishing).
    pub rate: watch::Sender<f64>,
    /// Members with an index below this stop reading until `stall_until_ns`
    /// (slow readers, to tell lag from loss).
    pub stall_members: AtomicUsize,
    /// Clock ns until which those members stop reading.
    pub stall_until_ns: AtomicU64,
}

impl Shared {
    /// Shared state for `rooms` rooms.
    pub fn new(rooms: usize) -> Arc<Shared> {
        Arc::new(Shared {
            latencies: Latencies::new(16),
            delivered: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            presence_events: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            record_from_ns: AtomicU64::new(u64::MAX),
            record_until_ns: AtomicU64::new(u64::MAX),
            room_last: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            stop: CancellationToken::new(),
            rate: watch::channel(0.0).0,
            stall_members: AtomicUsize::new(0),
            stall_until_ns: AtomicU64::new(0),
        })
    }

    /// Record latencies of messages sent in `[from, until)`.
    pub fn record_window(&self, from: Instant, until: Instant) {
        self.record_from_ns.store(clock::ns_of(from), Relaxed);
        self.record_until_ns.store(clock::ns_of(until), Relaxed);
    }

    /// The highest acked seq of room `idx`.
    pub fn room_last(&self, idx: usize) -> u64 {
        self.room_last.get(idx).map_or(0, |a| a.load(Relaxed))
    }
}

/// What a member publishes.
#[derive(Clone)]
pub struct PublishSpec {
    /// Frame builder for its room.
    pub encoder: Arc<PublishEncoder>,
    /// Index of the room it publishes to.
    pub room_idx: usize,
    /// Start offset after each rate change, to spread publishers.
    pub phase: Duration,
}

/// One member's plan.
pub struct MemberSpec {
    /// Index among the run's members.
    pub index: usize,
    /// The URL (index into the targets) it connects to first.
    pub url_idx: usize,
    /// Its token.
    pub token: Arc<str>,
    /// The room it joins, and that room's index.
    pub join: Option<(Arc<str>, usize)>,
    /// Join with `"presence":true` (presence events).
    pub presence: bool,
    /// What it publishes.
    pub publish: Option<PublishSpec>,
    /// Reconnect to the next URL and resume when the connection drops.
    pub reconnect: bool,
    /// Record latencies of the messages it receives.
    pub track_latency: bool,
}

/// Live state of one member, read by the scenario while it runs.
#[derive(Default)]
pub struct Live {
    /// Highest seq seen in its room.
    pub max_seq: AtomicU64,
    /// Currently connected (and joined).
    pub connected: AtomicBool,
    /// URL index it is connected to.
    pub url_idx: AtomicUsize,
    /// Times its connection dropped.
    pub disconnects: AtomicU32,
    /// Times it resumed with `recovered: true`.
    pub resumes: AtomicU32,
    /// Times it came back with `recovered: false` (or could not join).
    pub failed_resumes: AtomicU32,
    /// Clock ns of its last resume.
    pub resumed_ns: AtomicU64,
}

/// How the set-up of one member went.
pub struct SetupOutcome {
    /// Member index.
    pub index: usize,
    /// The node id from `welcome`, or why it failed.
    pub result: Result<String, ConnectError>,
    /// Connect + upgrade + welcome (+ join) time.
    pub took: Duration,
}

/// What a member hands back when it ends.
pub struct MemberResult {
    /// Its seq tracker (members that joined a room).
    pub tracker: Option<SeqTracker>,
    /// Its room index.
    pub room_idx: Option<usize>,
    /// Why its connection ended unasked, when it did and did not come back.
    pub dropped: Option<String>,
    /// Time from each drop to the resume that followed, ns.
    pub downtimes_ns: Vec<u64>,
}

/// How a session ended.
enum End {
    Stopped,
    Dropped(String),
}

/// Everything a member task needs.
pub struct Member {
    spec: MemberSpec,
    shared: Arc<Shared>,
    live: Arc<Live>,
    connector: Arc<Connector>,
    targets: Arc<Vec<Target>>,
    tracker: Option<SeqTracker>,
    epoch: String,
    lat: LatencyBuf,
    unflushed: u64,
    flushed_ns: u64,
}

impl Member {
    /// A member, not started.
    pub fn new(
        spec: MemberSpec,
        shared: Arc<Shared>,
        live: Arc<Live>,
        connector: Arc<Connector>,
        targets: Arc<Vec<Target>>,
    ) -> Member {
        let lat = LatencyBuf::new(spec.index);
        Member {
            spec,
            shared,
            live,
            connector,
            targets,
            tracker: None,
            epoch: String::new(),
            lat,
            unflushed: 0,
            flushed_ns: 0,
        }
    }

    /// Connect and join under `gate` (limits handshakes in flight), report
    /// the outcome, then run until stopped.
    pub async fn run(
        mut self,
        gate: Arc<Semaphore>,
        setup: mpsc::UnboundedSender<SetupOutcome>,
    ) -> MemberResult {
        let (first, took) = {
            let _permit = gate.acquire().await;
            let started = Instant::now();
            let first = self.connect(self.spec.url_idx, false).await;
            (first, started.elapsed())
        };
        let mut ws = match first {
            Ok((ws, node)) => {
                let _ = setup.send(SetupOutcome {
                    index: self.spec.index,
                    result: Ok(node),
                    took,
                });
                ws
            }
            Err(e) => {
                let _ = setup.send(SetupOutcome {
                    index: self.spec.index,
                    result: Err(e),
                    took,
                });
                return self.result(None);
            }
        };
        drop(setup);
        let mut downtimes = Vec::new();
        loop {
            match self.session(&mut ws).await {
                End::Stopped => {
                    self.live.connected.store(false, Relaxed);
                    net::close_conn(&mut ws, Duration::from_secs(2)).await;
                    return self.result_with(None, downtimes);
                }
                End::Dropped(why) => {
                    self.live.connected.store(false, Relaxed);
                    self.live.disconnects.fetch_add(1, Relaxed);
                    if self.shared.stop.is_cancelled() {
                        return self.result_with(None, downtimes);
                    }
                    self.shared.dropped.fetch_add(1, Relaxed);
                    if !self.spec.reconnect {
                        return self.result_with(Some(why), downtimes);
                    }
                    let down_at = clock::now_ns();
                    match self.resume().await {
                        Some(new_ws) => {
                            ws = new_ws;
                            downtimes.push(clock::now_ns().saturating_sub(down_at));
                        }
                        None => return self.result_with(Some(why), downtimes),
                    }
                }
            }
        }
    }

    fn result(&mut self, dropped: Option<String>) -> MemberResult {
        self.result_with(dropped, Vec::new())
    }

    fn result_with(&mut self, dropped: Option<String>, downtimes_ns: Vec<u64>) -> MemberResult {
        self.flush();
        MemberResult {
            tracker: self.tracker.take(),
            room_idx: self.spec.join.as_ref().map(|(_, i)| *i),
            dropped,
            downtimes_ns,
        }
    }

    /// Connect to `url_idx`, read `welcome`, join (resuming when `resume`).
    async fn connect(
        &mut self,
        url_idx: usize,
        resume: bool,
    ) -> Result<(Conn, String), ConnectError> {
        let target = &self.targets[url_idx % self.targets.len()];
        // Publishers stay on WebSocket; readers use the chosen transport.
        let transport = match self.spec.publish {
            Some(_) => Transport::Ws,
            None => self.connector.transport(),
        };
        let (mut ws, welcome) = self
            .connector
            .open_conn(target, &self.spec.token, transport)
            .await?;
        if let Some((room, _)) = &self.spec.join {
            let since = match (&self.tracker, resume) {
                (Some(t), true) => Some((t.last(), self.epoch.as_str())),
                _ => None,
            };
            let joined = self
                .connector
                .join(&mut ws, room, since, self.spec.presence)
                .await?;
            match (&mut self.tracker, resume) {
                (Some(t), true) => {
                    if joined.recovered == Some(true) {
                        self.live.resumes.fetch_add(1, Relaxed);
                        self.live.resumed_ns.store(clock::now_ns(), Relaxed);
                    } else {
                        self.live.failed_resumes.fetch_add(1, Relaxed);
                        if joined.epoch == self.epoch {
                            t.skip_to(joined.seq);
                        } else {
                            t.new_epoch(joined.seq);
                        }
                    }
                }
                _ => self.tracker = Some(SeqTracker::new(joined.seq)),
            }
            self.epoch = joined.epoch;
            if let Some(t) = &self.tracker {
                self.live.max_seq.store(t.last(), Relaxed);
            }
        } else if resume {
            self.live.resumes.fetch_add(1, Relaxed);
            self.live.resumed_ns.store(clock::now_ns(), Relaxed);
        }
        self.live
            .url_idx
            .store(url_idx % self.targets.len(), Relaxed);
        self.live.connected.store(true, Relaxed);
        Ok((ws, welcome.node))
    }

    /// Reconnect to the next URLs in turn, with a short jittered backoff,
    /// until one takes the resume or the run stops.
    async fn resume(&mut self) -> Option<Conn> {
        let from = self.live.url_idx.load(Relaxed);
        let addrs: Vec<SocketAddr> = self.targets.iter().map(|t| t.addr).collect();
        let order = resume_order(&addrs, from, self.spec.index);
        for attempt in 0..10_000u64 {
            if self.shared.stop.is_cancelled() {
                return None;
            }
            let url_idx = order[attempt as usize % order.len()];
            match self.connect(url_idx, true).await {
                Ok((ws, _node)) => return Some(ws),
                Err(_) => {
                    let base =
                        Duration::from_millis(20 << attempt.min(5)).min(Duration::from_millis(500));
                    let pause = base.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                    tokio::select! {
                        _ = self.shared.stop.cancelled() => return None,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        None
    }

    /// Read (and publish) until stopped or dropped.
    async fn session(&mut self, ws: &mut Conn) -> End {
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut rate_rx = self
            .spec
            .publish
            .as_ref()
            .map(|_| self.shared.rate.subscribe());
        let mut pacer = None;
        if let Some(rx) = &mut rate_rx {
            pacer = self.pacer_for(*rx.borrow_and_update());
        }
        // Futures that live across iterations: re-creating them per message
        // (a Notify waiter, a timer entry) would cost more than the message.
        let stop = self.shared.stop.clone();
        let cancelled = stop.cancelled();
        tokio::pin!(cancelled);
        let mut armed = far;
        let sleep = tokio::time::sleep_until(far.into());
        tokio::pin!(sleep);
        loop {
            if self.spec.index < self.shared.stall_members.load(Relaxed) {
                self.stall().await;
            }
            let due = pacer.as_ref().map_or(far, Pacer::next_due);
            if due != armed {
                sleep.as_mut().reset(due.into());
                armed = due;
            }
            tokio::select! {
                biased;
                _ = &mut cancelled => return End::Stopped,
                changed = async {
                    match rate_rx.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match (changed, rate_rx.as_mut()) {
                        (Ok(()), Some(rx)) => pacer = self.pacer_for(*rx.borrow_and_update()),
                        _ => rate_rx = None,
                    }
                }
                _ = &mut sleep, if pacer.is_some() => {
                    if let (Some(p), Some(spec)) = (pacer.as_mut(), self.spec.publish.as_ref()) {
                        let n = p.take(Instant::now(), MAX_BURST);
                        if let Err(e) = publish_burst(ws, &spec.encoder, n).await {
                            return End::Dropped(ConnectError::from(e).kind());
                        }
                        self.shared.sent.fetch_add(n, Relaxed);
                    }
                }
                msg = ws.next() => {
                    if let Some(end) = self.on_ws(msg) {
                        return end;
                    }
                    // Take what is already buffered without going back through
                    // the select (a fresh poll registers the waker again).
                    for _ in 0..MAX_BATCH {
                        match ws.next().now_or_never() {
                            Some(msg) => {
                                if let Some(end) = self.on_ws(msg) {
                                    return end;
                                }
                            }
                            None => break,
                        }
                    }
                }
            }
        }
    }

    /// Stop reading until the shared stall ends (or the run stops).
    async fn stall(&self) {
        let left = self
            .shared
            .stall_until_ns
            .load(Relaxed)
            .saturating_sub(clock::now_ns());
        if left > 0 {
            tokio::select! {
                _ = self.shared.stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_nanos(left)) => {}
            }
        }
    }

    /// Handle one read; `Some` when the connection ended.
    #[inline]
    fn on_ws(
        &mut self,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Option<End> {
        match msg {
            Some(Ok(Message::Text(text))) => {
                self.on_text(text.as_str());
                None
            }
            Some(Ok(Message::Close(frame))) => Some(End::Dropped(
                ConnectError::Closed(frame.map(|f| u16::from(f.code))).kind(),
            )),
            Some(Ok(_)) => None,
            Some(Err(e)) => Some(End::Dropped(ConnectError::from(e).kind())),
            None => Some(End::Dropped(ConnectError::Closed(None).kind())),
        }
    }

    fn pacer_for(&self, rate: f64) -> Option<Pacer> {
        let phase = self
            .spec
            .publish
            .as_ref()
            .map_or(Duration::ZERO, |p| p.phase);
        (rate > 0.0).then(|| Pacer::new(Instant::now() + phase, rate))
    }

    /// Handle one text frame; the hot path is a `message` frame.
    #[inline]
    fn on_text(&mut self, text: &str) {
        if let Some((_room, seq)) = peek_message(text) {
            let now = clock::now_ns();
            if let Some(t) = &mut self.tracker {
                match t.observe(seq) {
                    Seen::Next => {}
                    Seen::Gap(n) => {
                        self.shared.gaps.fetch_add(n, Relaxed);
                    }
                    Seen::Duplicate => {
                        self.shared.duplicates.fetch_add(1, Relaxed);
                    }
                    Seen::Late => {
                        self.shared.out_of_order.fetch_add(1, Relaxed);
                    }
                }
                self.live.max_seq.store(t.last(), Relaxed);
            }
            if self.spec.track_latency {
                if let Some(sent) = peek_sent_ns(text) {
                    if sent >= self.shared.record_from_ns.load(Relaxed)
                        && sent < self.shared.record_until_ns.load(Relaxed)
                    {
                        self.lat
                            .push(now.saturating_sub(sent), now, &self.shared.latencies);
                    }
                }
            }
            self.unflushed += 1;
            if self.unflushed >= FLUSH_COUNT || now.saturating_sub(self.flushed_ns) >= FLUSH_NS {
                self.shared.delivered.fetch_add(self.unflushed, Relaxed);
                self.unflushed = 0;
                self.flushed_ns = now;
            }
            return;
        }
        if text.starts_with(PRESENCE_EVENT) {
            self.shared.presence_events.fetch_add(1, Relaxed);
            return;
        }
        if let Some(seq) = peek_ack_seq(text) {
            self.shared.acks.fetch_add(1, Relaxed);
            if let Some(p) = &self.spec.publish {
                if let Some(last) = self.shared.room_last.get(p.room_idx) {
                    last.fetch_max(seq, Relaxed);
                }
            }
            return;
        }
        match ServerFrame::parse(text) {
            Ok(ServerFrame::Joined(j)) => {
                // Unsolicited: the room's history started again.
                if let Some(t) = &mut self.tracker {
                    if j.epoch != self.epoch {
                        t.new_epoch(j.seq);
                        self.epoch = j.epoch;
                    }
                }
            }
            Ok(ServerFrame::Error(e)) => {
                let counter = match e.code {
                    wsgate_protocol::ErrorCode::RateLimited => &self.shared.rate_limited,
                    _ => &self.shared.errors,
                };
                counter.fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }

    fn flush(&mut self) {
        self.lat.flush(&self.shared.latencies);
        self.shared.delivered.fetch_add(self.unflushed, Relaxed);
        self.unflushed = 0;
    }
}

/// The URLs to try, in turn, after the connection to URL `from` dropped:
/// first those of other addresses (starting at member `index` modulo their
/// count, so that the clients of a dead node spread over the others), then
/// those of the same address (the node may come back).
pub fn resume_order(addrs: &[SocketAddr], from: usize, index: usize) -> Vec<usize> {
    let dead = addrs.get(from).copied();
    let others: Vec<usize> = (0..addrs.len())
        .filter(|&i| Some(addrs[i]) != dead)
        .collect();
    let same: Vec<usize> = (0..addrs.len())
        .filter(|&i| Some(addrs[i]) == dead)
        .collect();
    let mut order = Vec::with_capacity(addrs.len());
    if !others.is_empty() {
        let start = index % others.len();
        order.extend(others[start..].iter().chain(&others[..start]));
    }
    order.extend(same);
    if order.is_empty() {
        order.push(0);
    }
    order
}

/// Send `n` publish frames stamped with the send time, and flush once
/// (publishers are always on WebSocket).
async fn publish_burst(
    ws: &mut Conn,
    encoder: &PublishEncoder,
    n: u64,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let Conn::Ws(ws) = ws else {
        return Ok(());
    };
    for _ in 0..n {
        ws.feed(Message::text(encoder.frame(clock::now_ns())))
            .await?;
    }
    ws.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_spreads_over_the_other_nodes_first() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        assert_eq!(resume_order(&[a, b, c], 0, 0), [1, 2, 0]);
        assert_eq!(resume_order(&[a, b, c], 0, 1), [2, 1, 0]);
        assert_eq!(resume_order(&[a, b, c], 1, 4), [0, 2, 1]);
        // The same node listed twice: both copies come last.
        assert_eq!(resume_order(&[a, a, b], 1, 7), [2, 0, 1]);
        assert_eq!(resume_order(&[a], 0, 3), [0]);
        assert_eq!(resume_order(&[], 0, 3), [0]);
    }
}
