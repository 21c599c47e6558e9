//! The in-process broker: one node, no Redis.
//!
//! Seq, epoch and capped history per room live in memory; a publish is
//! delivered to the local rooms while the room's log is locked, so seq
//! order and delivery order are the same. Rooms without a message for
//! `idle_ttl` and without local members are forgotten by [`MemoryBroker::sweep`].

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use wsgate_protocol::MessageParts;

use super::control::ControlMsg;
use super::{covers, new_epoch, BoxFut, Broker, BrokerError, HistoryPage, RoomHistory, Since};
use crate::rooms::Rooms;

const SHARDS: usize = 32;

struct RoomLog {
    epoch: Arc<str>,
    seq: u64,
    history: VecDeque<(u64, Utf8Bytes)>,
    touched: Instant,
}

impl RoomLog {
    fn new() -> RoomLog {
        RoomLog {
            epoch: Arc::from(new_epoch()),
            seq: 0,
            history: VecDeque::new(),
            touched: Instant::now(),
        }
    }
}

type Shard = Mutex<HashMap<Box<str>, RoomLog>>;

/// Single-node broker.
pub struct MemoryBroker {
    shards: Box<[Shard]>,
    history: usize,
    rooms: Arc<Rooms>,
}

impl MemoryBroker {
    /// A broker keeping `history` messages per room, delivering to `rooms`.
    pub fn new(history: usize, rooms: Arc<Rooms>) -> MemoryBroker {
        MemoryBroker {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            history,
            rooms,
        }
    }

    fn shard(&self, room: &str) -> std::sync::MutexGuard<'_, HashMap<Box<str>, RoomLog>> {
        let mut h = DefaultHasher::new();
        room.hash(&mut h);
        self.shards[(h.finish() as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Forget rooms idle for `idle_ttl` that have no local member, so that
    /// memory does not grow with every room ever used.
    pub fn sweep(&self, idle_ttl: Duration) {
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|name, log| {
                log.touched.elapsed() < idle_ttl || self.rooms.member_count(name) > 0
            });
        }
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        room: &'a str,
        parts: MessageParts,
    ) -> BoxFut<'a, Result<u64, BrokerError>> {
        let mut shard = self.shard(room);
        let log = shard.entry(Box::from(room)).or_insert_with(RoomLog::new);
        log.seq += 1;
        log.touched = Instant::now();
        let seq = log.seq;
        let frame = Utf8Bytes::from(parts.frame(seq));
        log.history.push_back((seq, frame.clone()));
        while log.history.len() > self.history {
            log.history.pop_front();
        }
        // Deliver under the room log's lock: concurrent publishers to one
        // room are delivered in seq order.
        self.rooms.deliver(room, &log.epoch, seq, &frame);
        drop(shard);
        Box::pin(std::future::ready(Ok(seq)))
    }

    fn subscribe<'a>(&'a self, _room: &'a str) -> BoxFut<'a, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe(&self, _room: &str) {}

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
                out.frames = log
                    .history
                    .iter()
                    .filter(|(s, _)| *s > since.seq)
                    .map(|(_, f)| f.clone())
                    .collect();
            }
        }
        drop(shard);
        Box::pin(std::future::ready(Ok(out)))
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
    use serde_json::value::RawValue;

    fn parts(text: &str) -> MessageParts {
        let data = RawValue::from_string(format!("\"{text}\"")).unwrap();
        MessageParts::new("r", "u", &data, 1)
    }

    async fn broker(history: usize) -> MemoryBroker {
        MemoryBroker::new(history, Arc::new(Rooms::new(Arc::new(Metrics::new("t")))))
    }

    #[tokio::test]
    async fn seq_starts_at_one_and_has_no_gaps() {
        let b = broker(10).await;
        for want in 1..=5 {
            assert_eq!(b.publish("r", parts("x")).await.unwrap(), want);
        }
        assert_eq!(b.publish("other", parts("x")).await.unwrap(), 1);
        let h = b.history("r", None).await.unwrap();
        assert_eq!(h.latest, 5);
        assert!(!h.epoch.is_empty());
    }

    #[tokio::test]
    async fn resume_replays_what_history_still_holds() {
        let b = broker(3).await;
        for _ in 0..5 {
            b.publish("r", parts("x")).await.unwrap();
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
        assert!(h.frames[0].as_str().contains("\"seq\":3,"));
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
            b.publish("r", parts("x")).await.unwrap();
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
        b.publish("r", parts("x")).await.unwrap();
        let epoch = b.history("r", None).await.unwrap().epoch;
        b.sweep(Duration::ZERO);
        let h = b.history("r", None).await.unwrap();
        assert_eq!(h.latest, 0);
        assert_ne!(h.epoch, epoch, "a forgotten room starts a new epoch");
    }
}
