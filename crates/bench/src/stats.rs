//! Latency histograms and their summary, and per-room seq checking.
//!
//! Receivers buffer latencies locally ([`LatencyBuf`]) and merge them in
//! batches into a sharded [`Latencies`] sink, so the hot path takes no lock
//! per message. [`SeqTracker`] checks one room's seq stream as seen by one
//! connection: gaps (lost), repeats (duplicated) and late arrivals (out of
//! order).

use std::collections::BTreeSet;
use std::ops::AddAssign;
use std::sync::{Mutex, MutexGuard};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency a histogram records exactly (larger values saturate): 2 min.
pub const HIGHEST_NS: u64 = 120_000_000_000;

/// A histogram of nanoseconds, 1 ns to [`HIGHEST_NS`], 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, HIGHEST_NS, 3) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds are valid: {e}"),
    }
}

/// Percentiles of a latency histogram, in milliseconds (microsecond precision).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

/// Nanoseconds as milliseconds rounded to the microsecond.
pub fn ns_to_ms(ns: f64) -> f64 {
    (ns / 1_000.0).round() / 1_000.0
}

impl LatencySummary {
    /// Summarize `h` (all zeros when it is empty).
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary {
                count: 0,
                mean_ms: 0.0,
                p50_ms: 0.0,
                p90_ms: 0.0,
                p99_ms: 0.0,
                p999_ms: 0.0,
                max_ms: 0.0,
            };
        }
        let q = |q: f64| ns_to_ms(h.value_at_quantile(q) as f64);
        LatencySummary {
            count: h.len(),
            mean_ms: ns_to_ms(h.mean()),
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: ns_to_ms(h.max() as f64),
        }
    }

    /// One human line: `p50 0.412 ms  p90 ...`.
    pub fn human(&self) -> String {
        if self.count == 0 {
            return "no samples".to_owned();
        }
        format!(
            "p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A latency sink shared by many connection tasks: a few histograms, each
/// behind its own lock, that [`Latencies::take`] merges.
pub struct Latencies {
    shards: Box<[Mutex<Histogram<u64>>]>,
}

impl Latencies {
    /// A sink with `shards` histograms (at least one).
    pub fn new(shards: usize) -> Latencies {
        Latencies {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(new_histogram()))
                .collect(),
        }
    }

    /// Record a batch of nanosecond values into shard `shard` (modulo the count).
    pub fn record_batch(&self, shard: usize, values: &[u64]) {
        if values.is_empty() {
            return;
        }
        let mut h = lock(&self.shards[shard % self.shards.len()]);
        for &v in values {
            h.saturating_record(v.max(1));
        }
    }

    /// Merge every shard into one histogram and reset them.
    pub fn take(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for shard in self.shards.iter() {
            let mut h = lock(shard);
            // Same bounds everywhere, so adding cannot fail.
            let _ = all.add(&*h);
            h.reset();
        }
        all
    }
}

/// Samples buffered before a [`LatencyBuf`] flushes.
pub const FLUSH_SAMPLES: usize = 256;
/// Longest a [`LatencyBuf`] holds samples (so step boundaries stay sharp).
pub const FLUSH_NS: u64 = 100_000_000;

/// One connection's latency buffer, flushed to a [`Latencies`] sink when it
/// holds [`FLUSH_SAMPLES`] values or is older than [`FLUSH_NS`].
pub struct LatencyBuf {
    values: Vec<u64>,
    shard: usize,
    first_ns: u64,
}

impl LatencyBuf {
    /// A buffer writing to shard `shard`.
    pub fn new(shard: usize) -> LatencyBuf {
        LatencyBuf {
            values: Vec::new(),
            shard,
            first_ns: 0,
        }
    }

    /// Buffer one sample taken at `now_ns`; flush when due.
    #[inline]
    pub fn push(&mut self, latency_ns: u64, now_ns: u64, sink: &Latencies) {
        if self.values.is_empty() {
            self.first_ns = now_ns;
        }
        self.values.push(latency_ns);
        if self.values.len() >= FLUSH_SAMPLES || now_ns.saturating_sub(self.first_ns) >= FLUSH_NS {
            self.flush(sink);
        }
    }

    /// Flush whatever is buffered.
    pub fn flush(&mut self, sink: &Latencies) {
        sink.record_batch(self.shard, &self.values);
        self.values.clear();
    }

    /// Samples not yet flushed.
    pub fn pending(&self) -> usize {
        self.values.len()
    }
}

/// Most holes a [`SeqTracker`] remembers one by one; beyond this, gaps are
/// only counted (a seq arriving late into an uncounted hole reads as a
/// duplicate).
pub const MAX_HOLES: usize = 10_000;

/// What one observed seq was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next seq expected.
    Next,
    /// Ahead of the next expected one: this many seqs were skipped.
    Gap(u64),
    /// Already seen (or at or before where tracking started).
    Duplicate,
    /// Filled an earlier gap: delivered out of order.
    Late,
}

/// Totals of a seq check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SeqTotals {
    /// Messages observed.
    pub received: u64,
    /// Seqs skipped: a later seq arrived and this one never did, or the
    /// server said the history no longer covers it (`recovered: false`).
    pub lost: u64,
    /// Seqs after the highest one observed, up to the room's last acked seq:
    /// not received by the end. Lag or loss: which one, only the drain that
    /// came before can tell (clients still catching up, or servers idle).
    pub behind: u64,
    /// Seqs observed more than once.
    pub duplicated: u64,
    /// Seqs observed after a higher one.
    pub out_of_order: u64,
    /// Times the history was lost (epoch change, or `recovered: false`).
    pub resyncs: u64,
}

impl AddAssign for SeqTotals {
    fn add_assign(&mut self, o: SeqTotals) {
        self.received += o.received;
        self.lost += o.lost;
        self.behind += o.behind;
        self.duplicated += o.duplicated;
        self.out_of_order += o.out_of_order;
        self.resyncs += o.resyncs;
    }
}

impl SeqTotals {
    /// No loss, nothing behind, no duplicate, no disorder.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.behind == 0 && self.duplicated == 0 && self.out_of_order == 0
    }
}

/// Checks one room's seq stream as one connection sees it.
///
/// Starts after a known seq (the `joined.seq`); every seq above it is
/// expected exactly once. The hot path (`seq == last + 1`) is one compare.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    base: u64,
    max: u64,
    holes: BTreeSet<u64>,
    uncounted_holes: u64,
    lost_for_good: u64,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    resyncs: u64,
}

impl SeqTracker {
    /// Expect every seq after `after`.
    pub fn new(after: u64) -> SeqTracker {
        SeqTracker {
            base: after,
            max: after,
            ..SeqTracker::default()
        }
    }

    /// The highest seq seen (or the starting point): what to resume `since`.
    pub fn last(&self) -> u64 {
        self.max
    }

    /// Seqs skipped so far and not (yet) filled.
    pub fn open_holes(&self) -> u64 {
        self.holes.len() as u64 + self.uncounted_holes
    }

    /// Observe one seq.
    #[inline]
    pub fn observe(&mut self, seq: u64) -> Seen {
        self.received += 1;
        if seq == self.max.wrapping_add(1) {
            self.max = seq;
            return Seen::Next;
        }
        if seq > self.max {
            let gap = seq - self.max - 1;
            let room = (MAX_HOLES - self.holes.len().min(MAX_HOLES)) as u64;
            let remembered = gap.min(room);
            self.holes.extend(self.max + 1..self.max + 1 + remembered);
            self.uncounted_holes += gap - remembered;
            self.max = seq;
            Seen::Gap(gap)
        } else if seq > self.base && self.holes.remove(&seq) {
            self.out_of_order += 1;
            Seen::Late
        } else {
            self.duplicated += 1;
            Seen::Duplicate
        }
    }

    /// The server said the history no longer covers what this connection
    /// missed (`recovered: false`, same epoch): every seq up to `latest` that
    /// was not seen is lost; tracking goes on after `latest`.
    pub fn skip_to(&mut self, latest: u64) {
        self.resyncs += 1;
        if latest > self.max {
            self.lost_for_good += latest - self.max;
            self.max = latest;
        } else {
            // The room went backwards: treat it as a new history.
            self.restart(latest);
            return;
        }
        self.settle_holes();
    }

    /// The room's history started again (new epoch) at `latest`: what was
    /// missing from the old one is lost; tracking restarts after `latest`.
    pub fn new_epoch(&mut self, latest: u64) {
        self.resyncs += 1;
        self.restart(latest);
    }

    fn restart(&mut self, latest: u64) {
        self.settle_holes();
        self.base = latest;
        self.max = latest;
    }

    fn settle_holes(&mut self) {
        self.lost_for_good += self.holes.len() as u64 + self.uncounted_holes;
        self.holes.clear();
        self.uncounted_holes = 0;
    }

    /// Totals; `expected_last` is the room's last seq when known (from the
    /// publishers' acks): seqs after the highest seen up to it are `behind`.
    pub fn totals(&self, expected_last: Option<u64>) -> SeqTotals {
        SeqTotals {
            received: self.received,
            lost: self.lost_for_good + self.open_holes(),
            behind: expected_last.map_or(0, |last| last.saturating_sub(self.max)),
            duplicated: self.duplicated,
            out_of_order: self.out_of_order,
            resyncs: self.resyncs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_a_known_distribution() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 1_000).unwrap();
        }
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 1000);
        // 3 significant digits: within 0.1 %.
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.001 + 0.001;
        assert!(close(s.p50_ms, 0.5), "{s:?}");
        assert!(close(s.p90_ms, 0.9), "{s:?}");
        assert!(close(s.p99_ms, 0.99), "{s:?}");
        assert!(close(s.p999_ms, 0.999), "{s:?}");
        assert!(close(s.max_ms, 1.0), "{s:?}");
        assert!(close(s.mean_ms, 0.5005), "{s:?}");
        assert!(s.human().contains("p99 0.99"), "{}", s.human());
    }

    #[test]
    fn empty_summary_is_zero() {
        let s = LatencySummary::of(&new_histogram());
        assert_eq!(s.count, 0);
        assert_eq!(s.p99_ms, 0.0);
        assert_eq!(s.human(), "no samples");
    }

    #[test]
    fn huge_values_saturate_and_zero_is_recorded() {
        let sink = Latencies::new(2);
        sink.record_batch(0, &[0, HIGHEST_NS * 10]);
        let h = sink.take();
        assert_eq!(h.len(), 2);
        assert!(h.max() >= HIGHEST_NS / 2);
    }

    #[test]
    fn shards_merge_and_reset() {
        let sink = Latencies::new(3);
        sink.record_batch(0, &[1_000, 2_000]);
        sink.record_batch(4, &[3_000]);
        let h = sink.take();
        assert_eq!(h.len(), 3);
        assert_eq!(sink.take().len(), 0);
    }

    #[test]
    fn latency_buf_flushes_by_count_and_age() {
        let sink = Latencies::new(1);
        let mut buf = LatencyBuf::new(0);
        for i in 0..FLUSH_SAMPLES as u64 - 1 {
            buf.push(10, i, &sink);
        }
        assert_eq!(buf.pending(), FLUSH_SAMPLES - 1);
        buf.push(10, 0, &sink);
        assert_eq!(buf.pending(), 0);
        assert_eq!(sink.take().len(), FLUSH_SAMPLES as u64);

        buf.push(10, 1_000, &sink);
        assert_eq!(buf.pending(), 1);
        buf.push(10, 1_000 + FLUSH_NS, &sink);
        assert_eq!(buf.pending(), 0);
        buf.push(10, 5, &sink);
        buf.flush(&sink);
        assert_eq!(sink.take().len(), 3);
    }

    #[test]
    fn in_order_stream_is_clean() {
        let mut t = SeqTracker::new(57);
        for seq in 58..=158 {
            assert_eq!(t.observe(seq), Seen::Next);
        }
        assert_eq!(t.last(), 158);
        let totals = t.totals(Some(158));
        assert_eq!(totals.received, 101);
        assert!(totals.clean(), "{totals:?}");
    }

    #[test]
    fn gaps_duplicates_and_late_arrivals() {
        let mut t = SeqTracker::new(0);
        assert_eq!(t.observe(1), Seen::Next);
        assert_eq!(t.observe(2), Seen::Next);
        assert_eq!(t.observe(5), Seen::Gap(2)); // 3 and 4 missing
        assert_eq!(t.open_holes(), 2);
        assert_eq!(t.observe(4), Seen::Late);
        assert_eq!(t.observe(4), Seen::Duplicate);
        assert_eq!(t.observe(5), Seen::Duplicate);
        assert_eq!(t.observe(6), Seen::Next);
        assert_eq!(t.observe(0), Seen::Duplicate); // at or before the start
        let totals = t.totals(None);
        assert_eq!(
            totals,
            SeqTotals {
                received: 8,
                lost: 1,
                behind: 0,
                duplicated: 3,
                out_of_order: 1,
                resyncs: 0
            }
        );
    }

    #[test]
    fn missing_tail_is_behind_not_lost() {
        let mut t = SeqTracker::new(10);
        t.observe(11);
        t.observe(12);
        assert_eq!(t.totals(Some(15)).behind, 3);
        assert_eq!(t.totals(Some(15)).lost, 0);
        assert!(!t.totals(Some(15)).clean());
        assert_eq!(t.totals(Some(12)).behind, 0);
        assert_eq!(t.totals(Some(5)).behind, 0);
        // A hole below the highest seq seen is lost whatever the drain.
        t.observe(14);
        assert_eq!(t.totals(Some(15)).lost, 1);
        assert_eq!(t.totals(Some(15)).behind, 1);
    }

    #[test]
    fn nothing_received_leaves_everything_expected_behind() {
        let t = SeqTracker::new(3);
        assert_eq!(t.totals(Some(10)).behind, 7);
        assert_eq!(t.totals(None).behind, 0);
    }

    #[test]
    fn huge_gap_is_counted_without_remembering_it() {
        let mut t = SeqTracker::new(0);
        assert_eq!(
            t.observe(MAX_HOLES as u64 + 11),
            Seen::Gap(MAX_HOLES as u64 + 10)
        );
        assert_eq!(t.open_holes(), MAX_HOLES as u64 + 10);
        assert_eq!(t.observe(1), Seen::Late);
        assert_eq!(t.totals(None).lost, MAX_HOLES as u64 + 9);
    }

    #[test]
    fn skip_to_counts_the_unrecovered_gap() {
        let mut t = SeqTracker::new(0);
        t.observe(1);
        t.observe(3); // hole at 2
        t.skip_to(10); // recovered:false, latest 10
        assert_eq!(t.last(), 10);
        assert_eq!(t.observe(11), Seen::Next);
        let totals = t.totals(None);
        assert_eq!(totals.lost, 1 + 7);
        assert_eq!(totals.resyncs, 1);
    }

    #[test]
    fn new_epoch_restarts_without_counting_the_new_history() {
        let mut t = SeqTracker::new(0);
        t.observe(1);
        t.observe(2);
        t.observe(4); // hole at 3, lost with the old epoch
        t.new_epoch(0);
        assert_eq!(t.observe(1), Seen::Next);
        assert_eq!(t.observe(2), Seen::Next);
        let totals = t.totals(Some(2));
        assert_eq!(totals.lost, 1);
        assert_eq!(totals.behind, 0);
        assert_eq!(totals.duplicated, 0);
        assert_eq!(totals.resyncs, 1);
        // A backwards "skip" is a new history too.
        t.skip_to(1);
        assert_eq!(t.observe(2), Seen::Next);
        assert_eq!(t.totals(None).resyncs, 2);
    }

    #[test]
    fn totals_add_up() {
        let mut a = SeqTotals {
            received: 1,
            lost: 2,
            behind: 6,
            duplicated: 3,
            out_of_order: 4,
            resyncs: 5,
        };
        a += a;
        assert_eq!(a.received, 2);
        assert_eq!(a.behind, 12);
        assert_eq!(a.resyncs, 10);
        assert!(!a.clean());
        assert!(SeqTotals::default().clean());
    }
}
