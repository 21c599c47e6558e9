//! The in-process broker: one node, no Redis.
//!
//! Seq, epoch and capped history per room live in memory; a publish is
//! delivered to the local rooms while the room's log is locked, so seq
//! order and delivery order are the same.
//!
//! Memory is bounded: a room's log exists while the room has a local
//! member or a history (a room joined and left without a message leaves
//! nothing behind); rooms without a message for `idle_ttl` and without
//! local members are forgotten by [`MemoryBroker::sweep`]; and the history
//! of all rooms together is kept under a node-wide byte budget
//! (`--history-budget-bytes`): past it, the rooms least recently published
//! to lose their history and start a new epoch, which PROTOCOL.md allows
//! (their members are told with an unsolicited `joined`).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use wsgate_protocol::MessageParts;

use super::control::ControlMsg;
use super::{
    covers, new_epoch, BoxFut, Broker, BrokerError, Delivery, HistoryPage, Published, RoomHistory,
    Since, IDEMPOTENCY_WINDOW,
};
use crate::metrics::Metrics;

const SHARDS: usize = 32;

/// How often the node sweeps the in-process broker ([`MemoryBroker::sweep`]).
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

struct RoomLog {
    epoch: Arc<str>,
    seq: u64,
    history: VecDeque<(u64, Utf8Bytes)>,
    /// Frame bytes in `history`.
    bytes: usize,
    touched: Instant,
    /// Idempotency keys used within the window: key -> first seq.
    keys: HashMap<Box<str>, u64>,
    /// The same keys, oldest first, to forget them after the window
    /// (tokio's clock, so that tests can advance it).
    key_order: VecDeque<(tokio::time::Instant, Box<str>)>,
}

impl RoomLog {
    fn new() -> RoomLog {
        RoomLog {
            epoch: Arc::from(new_epoch()),
            seq: 0,
            history: VecDeque::new(),
            bytes: 0,
            touched: Instant::now(),
            keys: HashMap::new(),
            key_order: VecDeque::new(),
        }
    }

    /// Forget idempotency keys older than the window.
    fn expire_keys(&mut self, now: tokio::time::Instant) {
        while let Some((at, _)) = self.key_order.front() {
            if now.duration_since(*at) < IDEMPOTENCY_WINDOW {
                break;
            }
            if let Some((_, key)) = self.key_order.pop_front() {
                self.keys.remove(&key);
            }
        }
    }

    /// A new epoch without history; idempotency keys stay (a retry must
    /// not publish twice because the history was evicted).
    fn reset(&mut self) {
        let keys = std::mem::take(&mut self.keys);
        let key_order = std::mem::take(&mut self.key_order);
        *self = RoomLog {
            keys,
            key_order,
            ..RoomLog::new()
        };
    }
}

type Shard = Mutex<HashMap<Box<str>, RoomLog>>;

/// Single-node broker.
pub struct MemoryBroker {
    shards: Box<[Shard]>,
    history: usize,
    /// Most history bytes over all rooms.
    budget: usize,
    /// History bytes over all rooms.
    bytes: AtomicUsize,
    delivery: Delivery,
    metrics: Arc<Metrics>,
}

impl MemoryBroker {
    /// A broker keeping `history` messages per room and at most
    /// `budget_bytes` of history over all rooms, delivering to `delivery`.
    pub fn new(
        history: usize,
        budget_bytes: usize,
        delivery: Delivery,
        metrics: Arc<Metrics>,
    ) -> MemoryBroker {
        MemoryBroker {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            history,
            budget: budget_bytes,
            bytes: AtomicUsize::new(0),
            delivery,
            metrics,
        }
    }

    fn shard_index(room: &str) -> usize {
        let mut h = DefaultHasher::new();
        room.hash(&mut h);
        (h.finish() as usize) % SHARDS
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, HashMap<Box<str>, RoomLog>> {
        self.shards[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard(&self, room: &str) -> MutexGuard<'_, HashMap<Box<str>, RoomLog>> {
        self.lock(Self::shard_index(room))
    }

    /// History bytes held over all rooms.
    pub fn history_bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Forget a room's log: its history bytes leave the budget.
    fn forget(&self, log: &RoomLog) {
        self.bytes.fetch_sub(log.bytes, Ordering::AcqRel);
    }

    /// Forget rooms idle for `idle_ttl` that have no local member, and rooms
    /// with neither history nor local members, so that memory does not grow
    /// with every room ever used.
    pub fn sweep(&self, idle_ttl: Duration) {
        for index in 0..SHARDS {
            let mut map = self.lock(index);
            map.retain(|name, log| {
                log.expire_keys(tokio::time::Instant::now());
                // Idempotency keys keep a room for their window; a room
                // without history goes after a sweep period (not at once:
                // its epoch was just handed to a reader), one with history
                // after `idle_ttl`.
                let ttl = if log.history.is_empty() {
                    idle_ttl.min(SWEEP_EVERY)
                } else {
                    idle_ttl
                };
                let idle = log.keys.is_empty() && log.touched.elapsed() >= ttl;
                let keep = !idle || self.delivery.is_local(name);
                if !keep {
                    self.forget(log);
                }
                keep
            });
        }
    }

    /// Bring history under the budget (to 90 % of it): the rooms least
    /// recently published to lose their history and start a new epoch.
    fn evict(&self) {
        let target = self.budget / 10 * 9;
        if self.history_bytes() <= self.budget {
            return;
        }
        let mut oldest: Vec<(Instant, usize, Box<str>)> = Vec::new();
        for index in 0..SHARDS {
            let map = self.lock(index);
            oldest.extend(
                map.iter()
                    .filter(|(_, log)| log.bytes > 0)
                    .map(|(name, log)| (log.touched, index, name.clone())),
            );
        }
        oldest.sort_unstable_by_key(|(touched, _, _)| *touched);
        for (_, index, name) in oldest {
            if self.history_bytes() <= target {
                break;
            }
            let mut map = self.lock(index);
            let Some(log) = map.get_mut(&name) else {
                continue;
            };
            self.forget(log);
            if !self.delivery.is_local(&name) && log.keys.is_empty() {
                map.remove(&name);
            } else {
                log.reset();
            }
            self.metrics.history_evictions.inc();
        }
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        room: &'a str,
        parts: MessageParts,
        key: Option<&'a str>,
    ) -> BoxFut<'a, Result<Published, BrokerError>> {
        let mut shard = self.shard(room);
        let log = shard.entry(Box::from(room)).or_insert_with(RoomLog::new);
        let now = tokio::time::Instant::now();
        log.expire_keys(now);
        if let Some(first) = key.and_then(|k| log.keys.get(k)) {
            let seq = *first;
            return Box::pin(std::future::ready(Ok(Published {
                seq,
                duplicate: true,
            })));
        }
        log.seq += 1;
        log.touched = Instant::now();
        let seq = log.seq;
        if let Some(key) = key {
            log.keys.insert(Box::from(key), seq);
            log.key_order.push_back((now, Box::from(key)));
        }
        let frame = Utf8Bytes::from(parts.frame(seq));
        log.bytes += frame.len();
        let mut freed = 0;
        log.history.push_back((seq, frame.clone()));
        while log.history.len() > self.history {
            if let Some((_, old)) = log.history.pop_front() {
                freed += old.len();
            }
        }
        log.bytes -= freed;
        let grown = frame.len() as isize - freed as isize;
        if grown >= 0 {
            self.bytes.fetch_add(grown.unsigned_abs(), Ordering::AcqRel);
        } else {
            self.bytes.fetch_sub(grown.unsigned_abs(), Ordering::AcqRel);
        }
        // Deliver under the room log's lock: concurrent publishers to one
        // room are delivered in seq order.
        self.delivery.deliver(room, &log.epoch, seq, &frame);
        drop(shard);
        self.evict();
        Box::pin(std::future::ready(Ok(Published {
            seq,
            duplicate: false,
        })))
    }

    fn subscribe(&self, _room: &str) {}

    fn ready<'a>(&'a self, _room: &'a str) -> BoxFut<'a, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// The last local member left: a room without history leaves nothing.
    fn unsubscribe(&self, room: &str) {
        let mut shard = self.shard(room);
        if shard
            .get(room)
            .is_some_and(|log| log.history.is_empty() && log.keys.is_empty())
        {
            shard.remove(room);
        }
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        since: Option<Since<'a>>,
    ) -> BoxFut<'a, Result<RoomHistory, BrokerError>> {
        let mut shard = self.shard(room);
        let log = shard.entry(Box::from(room)).or_insert_with(RoomLog::new);
        let oldest = log.history.front().map(|(s, _)| *s);
        let mut out = RoomHistory {
            epoch: log.epoch.clone(),
            latest: log.seq,
            recovered: false,
            frames: Vec::new(),
        };
        if let Some(since) = since {
            if covers(since, &log.epoch, oldest, log.seq) {
                out.recovered = true;
                // Shared frames (reference counts): the whole replay in one
                // page costs no copy of the history.
                out.frames = log
                    .history
                    .iter()
                    .filter(|(s, _)| *s > since.seq)
                    .cloned()
                    .collect();
            }
        }
        drop(shard);
        Box::pin(std::future::ready(Ok(out)))
    }

    fn replay_page<'a>(
        &'a self,
        room: &'a str,
        epoch: &'a str,
        after: u64,
        upto: u64,
    ) -> BoxFut<'a, Result<Vec<(u64, Utf8Bytes)>, BrokerError>> {
        let shard = self.shard(room);
        let page = match shard.get(room) {
            Some(log) if &*log.epoch == epoch => log
                .history
                .iter()
                .filter(|(s, _)| *s > after && *s <= upto)
                .take(super::REPLAY_PAGE_MESSAGES)
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        drop(shard);
        Box::pin(std::future::ready(Ok(page)))
    }

    fn range<'a>(
        &'a self,
        room: &'a str,
        since: u64,
        limit: usize,
    ) -> BoxFut<'a, Result<HistoryPage, BrokerError>> {
        let mut shard = self.shard(room);
        let log = shard.entry(Box::from(room)).or_insert_with(RoomLog::new);
        // The deque is in seq order: skip to the first seq after `since`.
        let start = log.history.partition_point(|(s, _)| *s <= since);
        let frames: Vec<Utf8Bytes> = log
            .history
            .range(start..)
            .take(limit)
            .map(|(_, f)| f.clone())
            .collect();
        let out = HistoryPage {
            epoch: log.epoch.clone(),
            latest: log.seq,
            frames,
        };
        drop(shard);
        Box::pin(std::future::ready(Ok(out)))
    }

    /// One node: there is nobody else to tell, and the node's own
    /// [`Control`](super::control::Control) keeps the revocations.
    fn control<'a>(&'a self, _msg: &'a ControlMsg) -> BoxFut<'a, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn is_up(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::rooms::Rooms;
    use serde_json::value::RawValue;

    fn parts(text: &str) -> MessageParts {
        let data = RawValue::from_string(format!("\"{text}\"")).unwrap();
        MessageParts::new("r", "u", &data, 1)
    }

    async fn broker(history: usize) -> Arc<MemoryBroker> {
        budgeted(history, usize::MAX).0
    }

    fn budgeted(history: usize, budget: usize) -> (Arc<MemoryBroker>, Arc<Rooms>) {
        let metrics = Arc::new(Metrics::new("t"));
        let delivery = Delivery::default();
        let broker = Arc::new(MemoryBroker::new(
            history,
            budget,
            delivery.clone(),
            metrics.clone(),
        ));
        let rooms = Rooms::new(metrics, broker.clone(), &delivery);
        (broker, rooms)
    }

    #[tokio::test]
    async fn seq_starts_at_one_and_has_no_gaps() {
        let b = broker(10).await;
        for want in 1..=5 {
            assert_eq!(b.publish("r", parts("x"), None).await.unwrap().seq, want);
        }
        assert_eq!(b.publish("other", parts("x"), None).await.unwrap().seq, 1);
        let h = b.history("r", None).await.unwrap();
        assert_eq!(h.latest, 5);
        assert!(!h.epoch.is_empty());
    }

    #[tokio::test]
    async fn resume_replays_what_history_still_holds() {
        let b = broker(3).await;
        for _ in 0..5 {
            b.publish("r", parts("x"), None).await.unwrap();
        }
        let epoch = b.history("r", None).await.unwrap().epoch;
        let since = |seq| {
            Some(Since {
                seq,
                epoch: Some(&epoch),
            })
        };
        let h = b.history("r", since(2)).await.unwrap();
        assert!(h.recovered);
        assert_eq!(h.frames.len(), 3, "seqs 3, 4, 5");
        assert_eq!(h.frames[0].0, 3);
        assert!(h.frames[0].1.as_str().contains("\"seq\":3,"));
        assert!(
            !b.history("r", since(1)).await.unwrap().recovered,
            "seq 2 is gone"
        );
        assert!(b.history("r", since(5)).await.unwrap().recovered);
        assert!(!b.history("r", since(6)).await.unwrap().recovered);
        let other = Some(Since {
            seq: 4,
            epoch: Some("nope"),
        });
        assert!(!b.history("r", other).await.unwrap().recovered);
    }

    #[tokio::test]
    async fn range_reads_at_most_limit_after_since() {
        let b = broker(5).await;
        for _ in 0..8 {
            b.publish("r", parts("x"), None).await.unwrap();
        }
        let seqs = |h: &HistoryPage| -> Vec<u64> {
            h.frames
                .iter()
                .map(|f| wsgate_protocol::peek_message(f.as_str()).unwrap().1)
                .collect()
        };
        let h = b.range("r", 5, 2).await.unwrap();
        assert_eq!((h.latest, seqs(&h)), (8, vec![6, 7]));
        let h = b.range("r", 0, 100).await.unwrap();
        assert_eq!(seqs(&h), [4, 5, 6, 7, 8], "history keeps 5");
        assert!(b.range("r", 8, 100).await.unwrap().frames.is_empty());
        assert!(b.range("r", u64::MAX, 1).await.unwrap().frames.is_empty());
    }

    #[tokio::test]
    async fn idle_rooms_are_swept() {
        let b = broker(3).await;
        b.publish("r", parts("x"), None).await.unwrap();
        let epoch = b.history("r", None).await.unwrap().epoch;
        b.sweep(Duration::ZERO);
        let h = b.history("r", None).await.unwrap();
        assert_eq!(h.latest, 0);
        assert_ne!(h.epoch, epoch, "a forgotten room starts a new epoch");
        // A room without history is kept for a sweep period, so that the
        // epoch just handed out stays the room's.
        b.sweep(Duration::from_secs(3600));
        let again = b.history("r", None).await.unwrap();
        assert_eq!(again.epoch, h.epoch);
    }

    #[tokio::test]
    async fn a_room_joined_and_left_without_a_message_leaves_nothing() {
        let (b, rooms) = budgeted(10, usize::MAX);
        let metrics = Arc::new(Metrics::new("t"));
        let conn = crate::outbound::ConnHandle::new("c", 1 << 20, metrics);
        for i in 0..1000 {
            let room = format!("r{i}");
            rooms.enter(&room, &conn);
            b.history(&room, None).await.unwrap();
            rooms.leave(&room, &conn);
        }
        let logs: usize = (0..SHARDS).map(|i| b.lock(i).len()).sum();
        assert_eq!(
            logs, 0,
            "no state for rooms with neither members nor history"
        );
        b.publish("kept", parts("x"), None).await.unwrap();
        b.unsubscribe("kept");
        assert_eq!(
            b.history("kept", None).await.unwrap().latest,
            1,
            "history stays"
        );
    }

    #[tokio::test]
    async fn history_stays_under_the_node_budget_by_evicting_with_a_new_epoch() {
        let budget = 10_000;
        let (b, _rooms) = budgeted(1000, budget);
        b.publish("old", parts("x"), None).await.unwrap();
        let old_epoch = b.history("old", None).await.unwrap().epoch;
        for i in 0..200 {
            b.publish(&format!("room{}", i % 20), parts(&"y".repeat(100)), None)
                .await
                .unwrap();
            assert!(b.history_bytes() <= budget, "over budget after {i}");
        }
        let h = b.history("old", None).await.unwrap();
        assert_ne!(
            h.epoch, old_epoch,
            "the least recently used room was evicted"
        );
        assert_eq!(h.latest, 0);
        assert!(b.metrics.history_evictions.get() > 0);
    }

    #[tokio::test]
    async fn replay_pages_stop_at_the_epoch_and_the_bound() {
        let b = broker(1000).await;
        for _ in 0..600 {
            b.publish("r", parts("x"), None).await.unwrap();
        }
        let epoch = b.history("r", None).await.unwrap().epoch;
        let page = b.replay_page("r", &epoch, 10, 500).await.unwrap();
        assert_eq!(page.len(), crate::broker::REPLAY_PAGE_MESSAGES);
        assert_eq!(page[0].0, 11);
        let tail = b.replay_page("r", &epoch, 490, 500).await.unwrap();
        assert_eq!(
            tail.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (491..=500).collect::<Vec<_>>()
        );
        assert!(b
            .replay_page("r", "other", 10, 500)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idempotency_key_is_honoured_for_the_window_per_room() {
        let b = broker(10).await;
        let first = b.publish("r", parts("a"), Some("k")).await.unwrap();
        assert_eq!(
            first,
            Published {
                seq: 1,
                duplicate: false
            }
        );
        let again = b.publish("r", parts("a"), Some("k")).await.unwrap();
        assert_eq!(
            again,
            Published {
                seq: 1,
                duplicate: true
            }
        );
        assert_eq!(
            b.history("r", None).await.unwrap().latest,
            1,
            "published once"
        );
        let other_room = b.publish("s", parts("a"), Some("k")).await.unwrap();
        assert!(!other_room.duplicate, "keys are per room");
        tokio::time::advance(IDEMPOTENCY_WINDOW + Duration::from_secs(1)).await;
        let later = b.publish("r", parts("a"), Some("k")).await.unwrap();
        assert_eq!(
            later,
            Published {
                seq: 2,
                duplicate: false
            },
            "window passed"
        );
    }
}
