//! Reconnect delays: capped exponential backoff with full jitter.
//!
//! Pure and clock-free: the caller supplies the random number generator and
//! tells it how long each connection lasted, so it can be tested exactly.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with full jitter, reset after a stable period.
///
/// The `n`-th consecutive attempt (counting from 0) waits a uniformly random
/// delay in `[0, min(cap, base * 2^n)]` ("full jitter": clients that lost the
/// same node spread their reconnects instead of arriving as one wave). A
/// connection that stayed up for at least `stable_after` resets the count, so
/// a flapping link keeps backing off and a healthy one starts again from
/// `base`.
///
/// ```
/// use std::time::Duration;
/// use rand::SeedableRng;
/// use wsgate_client::Backoff;
///
/// let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
/// let mut rng = rand::rngs::StdRng::seed_from_u64(7);
/// let first = backoff.next_delay(&mut rng);
/// assert!(first <= Duration::from_millis(100));
/// assert_eq!(backoff.attempt(), 1);
/// assert_eq!(backoff.ceiling(), Duration::from_millis(200));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    stable_after: Duration,
    attempt: u32,
}

impl Default for Backoff {
    /// Base 500 ms, cap 30 s, stable after 10 s.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Backoff {
    /// A schedule from `base` up to `cap` (a `cap` below `base` is raised to
    /// `base`), stable after 10 s.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            stable_after: Duration::from_secs(10),
            attempt: 0,
        }
    }

    /// How long a connection must stay up to reset the schedule.
    pub fn with_stable_after(mut self, stable_after: Duration) -> Backoff {
        self.stable_after = stable_after;
        self
    }

    /// The first ceiling.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// How long a connection must stay up to reset the schedule.
    pub fn stable_after(&self) -> Duration {
        self.stable_after
    }

    /// Consecutive attempts counted since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The largest delay the next call to [`next_delay`](Self::next_delay) can return.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(31);
        self.base
            .checked_mul(factor)
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// The delay before the next attempt, uniformly random in
    /// `[0, ceiling()]` (microsecond steps); counts the attempt.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rng.random_range(0..=micros))
    }

    /// A connection ended after being up for `up`: reset the schedule if it
    /// was up for at least `stable_after`.
    pub fn connection_lasted(&mut self, up: Duration) {
        if up >= self.stable_after {
            self.reset();
        }
    }

    /// Start again from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const BASE: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(3);

    /// An RNG that always answers its range's upper (or lower) end.
    struct Extreme(bool);

    impl rand::RngCore for Extreme {
        fn next_u32(&mut self) -> u32 {
            if self.0 {
                u32::MAX
            } else {
                0
            }
        }
        fn next_u64(&mut self) -> u64 {
            if self.0 {
                u64::MAX
            } else {
                0
            }
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            dst.fill(if self.0 { 0xff } else { 0 });
        }
    }

    #[test]
    fn ceilings_double_from_base_up_to_cap() {
        let mut b = Backoff::new(BASE, CAP);
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay(&mut rng);
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 3000, 3000, 3000]);
    }

    #[test]
    fn delays_stay_within_zero_and_the_ceiling() {
        let mut b = Backoff::new(BASE, CAP);
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..200 {
            let ceiling = b.ceiling();
            let d = b.next_delay(&mut rng);
            assert!(d <= ceiling, "{d:?} above {ceiling:?}");
            assert!(d <= CAP);
        }
    }

    #[test]
    fn full_jitter_reaches_both_ends_of_the_range() {
        let mut high = Backoff::new(BASE, CAP);
        let highs: Vec<u128> = (0..7)
            .map(|_| high.next_delay(&mut Extreme(true)).as_millis())
            .collect();
        assert_eq!(highs, [100, 200, 400, 800, 1600, 3000, 3000]);
        let mut low = Backoff::new(BASE, CAP);
        for _ in 0..7 {
            assert_eq!(low.next_delay(&mut Extreme(false)), Duration::ZERO);
        }
    }

    #[test]
    fn delays_are_randomized() {
        // Many schedules at the same attempt: the delays differ and spread
        // over the range (not all in one half).
        let mut rng = StdRng::seed_from_u64(3);
        let delays: Vec<Duration> = (0..100)
            .map(|_| {
                let mut b = Backoff::new(BASE, CAP);
                b.next_delay(&mut rng);
                b.next_delay(&mut rng);
                b.next_delay(&mut rng) // ceiling 400 ms
            })
            .collect();
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 90,
            "only {} distinct delays",
            distinct.len()
        );
        let low = delays
            .iter()
            .filter(|d| **d < Duration::from_millis(200))
            .count();
        assert!((20..=80).contains(&low), "{low} of 100 in the lower half");
    }

    #[test]
    fn seeded_schedules_repeat() {
        let run = |seed| {
            let mut b = Backoff::new(BASE, CAP);
            let mut rng = StdRng::seed_from_u64(seed);
            (0..10).map(|_| b.next_delay(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }

    #[test]
    fn a_stable_connection_resets_a_short_one_does_not() {
        let mut b = Backoff::new(BASE, CAP).with_stable_after(Duration::from_secs(5));
        let mut rng = StdRng::seed_from_u64(4);
        for _ in 0..4 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.attempt(), 4);
        b.connection_lasted(Duration::from_secs(4));
        assert_eq!(b.attempt(), 4, "a short connection keeps backing off");
        assert_eq!(b.ceiling(), Duration::from_millis(1600));
        b.connection_lasted(Duration::from_secs(5));
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.ceiling(), BASE);
        b.next_delay(&mut rng);
        b.reset();
        assert_eq!(b.attempt(), 0);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..100 {
            assert!(b.next_delay(&mut rng) <= Duration::from_secs(60));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(60));
        let tiny = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(tiny.cap(), Duration::from_secs(5), "cap raised to base");
    }
}
