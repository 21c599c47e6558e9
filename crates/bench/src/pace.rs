//! Rate pacing for publishers.
//!
//! A sender at `rate` messages per second, started at `start`, owes message
//! `n` (counting from 0) at `start + n / rate`. The timer wheel has a 1 ms
//! grain, so a fast sender wakes, sends every message that is due (up to a
//! burst cap) and sleeps until the next one is due: the long-run rate is
//! exact and a late wake-up is caught up rather than lost.

use std::time::{Duration, Instant};

/// Absorbs float rounding, so that at exactly `start + n / rate` message `n`
/// counts as due.
const EPSILON: f64 = 1e-6;

/// Messages due within `elapsed` at `rate` per second (message 0 is due at 0).
pub fn due_count(rate: f64, elapsed: Duration) -> u64 {
    if !(rate.is_finite() && rate > 0.0) {
        return 0;
    }
    (elapsed.as_secs_f64() * rate + EPSILON).floor() as u64 + 1
}

/// When message `n` is due, after the start, at `rate` per second.
pub fn due_at(rate: f64, n: u64) -> Duration {
    if !(rate.is_finite() && rate > 0.0) {
        return Duration::MAX;
    }
    // Rounded up to the nanosecond, so that message `n` is due at this instant.
    let ns = (n as f64 / rate * 1e9).ceil();
    if ns >= u64::MAX as f64 {
        return Duration::MAX;
    }
    Duration::from_nanos(ns as u64)
}

/// The rate of each of `senders` sharing `total` messages per second.
pub fn per_sender(total: f64, senders: usize) -> f64 {
    total / senders.max(1) as f64
}

/// Start offset of sender `i` of several sharing `total` per second, so that
/// together they send evenly spaced messages.
pub fn phase(total: f64, i: usize) -> Duration {
    due_at(total, i as u64)
}

/// One sender's pacing state.
#[derive(Debug, Clone)]
pub struct Pacer {
    start: Instant,
    rate: f64,
    sent: u64,
}

impl Pacer {
    /// Pace `rate` messages per second from `start`.
    pub fn new(start: Instant, rate: f64) -> Pacer {
        Pacer {
            start,
            rate,
            sent: 0,
        }
    }

    /// The rate.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Messages taken so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Messages due by `now` and not yet taken.
    pub fn behind(&self, now: Instant) -> u64 {
        if now < self.start {
            return 0;
        }
        due_count(self.rate, now - self.start).saturating_sub(self.sent)
    }

    /// Take the messages to send at `now`, at most `max_burst`.
    pub fn take(&mut self, now: Instant, max_burst: u64) -> u64 {
        let n = self.behind(now).min(max_burst);
        self.sent += n;
        n
    }

    /// When the next message is due (far in the future for a zero rate).
    pub fn next_due(&self) -> Instant {
        self.start
            .checked_add(due_at(self.rate, self.sent))
            .unwrap_or_else(|| self.start + Duration::from_secs(86_400 * 365))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_count_at_boundaries() {
        assert_eq!(due_count(100.0, Duration::ZERO), 1);
        assert_eq!(due_count(100.0, Duration::from_micros(9_999)), 1);
        assert_eq!(due_count(100.0, Duration::from_millis(10)), 2);
        assert_eq!(due_count(100.0, Duration::from_secs(1)), 101);
        assert_eq!(due_count(0.5, Duration::from_secs(3)), 2);
        assert_eq!(due_count(0.0, Duration::from_secs(3)), 0);
        assert_eq!(due_count(f64::NAN, Duration::from_secs(3)), 0);
    }

    #[test]
    fn due_at_inverts_due_count() {
        for rate in [0.3, 1.0, 7.0, 100.0, 333.0, 12_345.0, 1e6] {
            for n in [0u64, 1, 2, 3, 10, 999, 123_457] {
                let at = due_at(rate, n);
                assert_eq!(due_count(rate, at), n + 1, "rate {rate} n {n}");
            }
        }
        assert_eq!(due_at(0.0, 3), Duration::MAX);
    }

    #[test]
    fn splitting_a_rate() {
        assert_eq!(per_sender(100.0, 4), 25.0);
        assert_eq!(per_sender(100.0, 0), 100.0);
        assert_eq!(phase(100.0, 0), Duration::ZERO);
        assert_eq!(phase(100.0, 3), Duration::from_millis(30));
    }

    #[test]
    fn pacer_catches_up_with_a_burst_cap() {
        let start = Instant::now();
        let mut p = Pacer::new(start, 1_000.0);
        assert_eq!(p.take(start, 100), 1);
        assert_eq!(p.next_due(), start + Duration::from_millis(1));
        // Woke 10.5 ms late: 10 more are due.
        let now = start + Duration::from_micros(10_500);
        assert_eq!(p.behind(now), 10);
        assert_eq!(p.take(now, 4), 4);
        assert_eq!(p.take(now, 100), 6);
        assert_eq!(p.take(now, 100), 0);
        assert_eq!(p.sent(), 11);
        assert_eq!(p.next_due(), start + Duration::from_millis(11));
    }

    #[test]
    fn pacer_before_its_start_owes_nothing() {
        let now = Instant::now();
        let mut p = Pacer::new(now + Duration::from_secs(1), 10.0);
        assert_eq!(p.take(now, 10), 0);
        assert_eq!(p.next_due(), now + Duration::from_secs(1));
    }

    #[test]
    fn long_run_rate_is_exact() {
        let start = Instant::now();
        let mut p = Pacer::new(start, 333.0);
        let mut now = start;
        let mut total = 0;
        // Wake every 7 ms for 10 s.
        while now < start + Duration::from_secs(10) {
            total += p.take(now, u64::MAX);
            now += Duration::from_millis(7);
        }
        // The last wake is at 9.996 s: messages 0..=3328 are due by then.
        assert_eq!(total, 3329);
    }
}
