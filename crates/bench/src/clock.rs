//! One monotonic clock for the whole process.
//!
//! Publishers write [`now_ns`] into a message's `data`; receivers in the same
//! process subtract it from their own [`now_ns`]. Both read the same
//! [`Instant`] base, so the difference is a true end-to-end latency, free of
//! wall-clock steps.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static BASE: OnceLock<Instant> = OnceLock::new();

/// The clock's zero: the first time any function here was called.
pub fn base() -> Instant {
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since [`base`].
pub fn now_ns() -> u64 {
    ns_of(Instant::now())
}

/// `at` in nanoseconds since [`base`] (0 for instants before it).
pub fn ns_of(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(base()).as_nanos()).unwrap_or(u64::MAX)
}

/// The instant `ns` nanoseconds after [`base`].
pub fn instant_of(ns: u64) -> Instant {
    base() + Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_monotonic() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
        let at = instant_of(a);
        assert_eq!(ns_of(at), a);
        assert_eq!(ns_of(base()), 0);
    }
}
