//! Rate limits: the token [`Bucket`] (per connection: publishes and joins)
//! and the per-user publish registry ([`UserLimits`]) that one user's
//! connections on the node and its HTTP API calls share.
//!
//! A publish over a WebSocket takes a token from its connection's bucket
//! and one from its user's; over the HTTP API, from its user's only. Either
//! empty refuses the message (`rate_limited`, HTTP 429). The registry holds
//! an entry per user with a connection on the node or a bucket still
//! refilling, and no other: memory follows activity, not every user ever
//! seen.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::time::Instant;

/// A bucket's shape: refill rate (tokens per second) and size. Kept once
/// per node (from the configuration), not in every bucket: an idle
/// connection holds two buckets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_sec: f64,
    burst: f64,
}

impl Rate {
    /// `per_sec` tokens per second, at most `burst`.
    pub fn new(per_sec: f64, burst: u32) -> Rate {
        Rate {
            per_sec,
            burst: f64::from(burst),
        }
    }
}

/// Token bucket: starts full, refills at its [`Rate`] up to the burst; only
/// what is accepted takes from it.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: Rate) -> Bucket {
        Bucket {
            tokens: rate.burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, rate: Rate) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(rate.burst);
    }

    /// Give back a token taken for something then refused (the broker did
    /// not take the message): only accepted requests take from the bucket.
    pub fn refund(&mut self, rate: Rate) {
        self.tokens = (self.tokens + 1.0).min(rate.burst);
    }

    /// Take one token if there is one.
    pub fn try_take(&mut self, rate: Rate) -> bool {
        self.refill(rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until a token is there (zero when one is).
    pub fn wait(&mut self, rate: Rate) -> Duration {
        self.refill(rate);
        let missing = (1.0 - self.tokens).max(0.0);
        Duration::try_from_secs_f64(missing / rate.per_sec).unwrap_or(Duration::MAX)
    }

    fn is_full(&mut self, rate: Rate) -> bool {
        self.refill(rate);
        self.tokens >= rate.burst
    }
}

/// A refused publish: the user's bucket is empty for `retry_after`.
/// Answers the HTTP API with `429` and `Retry-After` (whole seconds, at
/// least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// How long until the user may publish again.
    pub retry_after: Duration,
}

impl IntoResponse for Limited {
    fn into_response(self) -> Response {
        let secs = self
            .retry_after
            .as_secs()
            .saturating_add(u64::from(self.retry_after.subsec_nanos() > 0))
            .max(1);
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.to_string())],
            Json(json!({
                "error": "rate_limited",
                "message": "publish rate limit of this user exceeded; message dropped",
            })),
        )
            .into_response()
    }
}

const SHARDS: usize = 16;

struct Entry {
    bucket: Bucket,
    /// The user's open connections on this node.
    conns: usize,
}

#[derive(Default)]
struct Shard {
    users: HashMap<Box<str>, Entry>,
    /// Size at which the next sweep of idle, full entries runs.
    sweep_at: usize,
}

/// Per-user publish buckets, keyed by `sub`.
pub struct UserLimits {
    rate: Rate,
    shards: Vec<Mutex<Shard>>,
}

/// Entries below this count per shard are never swept (sweeping costs a scan).
const MIN_SWEEP: usize = 64;

impl UserLimits {
    /// Buckets of `rate` per second and `burst`, one per user.
    pub fn new(rate: f64, burst: u32) -> UserLimits {
        UserLimits {
            rate: Rate::new(rate, burst),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn shard(&self, user: &str) -> MutexGuard<'_, Shard> {
        let mut h = DefaultHasher::new();
        user.hash(&mut h);
        let shard = &self.shards[(h.finish() as usize) % SHARDS];
        // Counters only: a panic elsewhere cannot leave them unusable.
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_entry<T>(&self, user: &str, f: impl FnOnce(&mut Entry) -> T) -> T {
        let rate = self.rate;
        let mut shard = self.shard(user);
        if !shard.users.contains_key(user) {
            // Before growing, drop the entries nobody needs any more, so
            // that a stream of one-off HTTP users cannot grow the map.
            if shard.users.len() >= shard.sweep_at.max(MIN_SWEEP) {
                shard
                    .users
                    .retain(|_, e| e.conns > 0 || !e.bucket.is_full(rate));
                shard.sweep_at = shard.users.len() * 2;
            }
            shard.users.insert(
                user.into(),
                Entry {
                    bucket: Bucket::new(self.rate),
                    conns: 0,
                },
            );
        }
        // Just inserted when absent.
        match shard.users.get_mut(user) {
            Some(e) => f(e),
            None => f(&mut Entry {
                bucket: Bucket::new(self.rate),
                conns: 0,
            }),
        }
    }

    /// A connection of `user` opened on this node.
    pub fn attach(&self, user: &str) {
        self.with_entry(user, |e| e.conns += 1);
    }

    /// A connection of `user` closed; the entry goes once the user has no
    /// connection and a full bucket (or at a later sweep, once full).
    pub fn detach(&self, user: &str) {
        let mut shard = self.shard(user);
        if let Some(e) = shard.users.get_mut(user) {
            e.conns = e.conns.saturating_sub(1);
            if e.conns == 0 && e.bucket.is_full(self.rate) {
                shard.users.remove(user);
            }
        }
    }

    /// Take one of `user`'s tokens, or say how long until there is one.
    pub fn try_take(&self, user: &str) -> Result<(), Limited> {
        let rate = self.rate;
        self.with_entry(user, |e| {
            if e.bucket.try_take(rate) {
                Ok(())
            } else {
                Err(Limited {
                    retry_after: e.bucket.wait(rate),
                })
            }
        })
    }

    /// Give back a token taken for a publish the broker then refused.
    pub fn refund(&self, user: &str) {
        if let Some(e) = self.shard(user).users.get_mut(user) {
            e.bucket.refund(self.rate);
        }
    }

    /// Users with an entry now (open connections or a refilling bucket).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).users.len())
            .sum()
    }

    /// Whether no user has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_starts_full_and_refills_at_rate() {
        let r = Rate::new(10.0, 3);
        let mut b = Bucket::new(r);
        assert!(b.try_take(r) && b.try_take(r) && b.try_take(r));
        assert!(!b.try_take(r));
        assert_eq!(b.wait(r), Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.try_take(r), "one token after 1/rate");
        assert!(!b.try_take(r));
        tokio::time::advance(Duration::from_secs(60)).await;
        let taken = (0..10).filter(|_| b.try_take(r)).count();
        assert_eq!(taken, 3, "never more than the burst");
        b.refund(r);
        assert!(b.try_take(r), "a refunded token can be taken again");
        assert!(!b.try_take(r));
    }

    #[tokio::test(start_paused = true)]
    async fn a_users_connections_share_one_bucket() {
        let limits = UserLimits::new(1.0, 2);
        limits.attach("alice");
        limits.attach("alice");
        assert!(limits.try_take("alice").is_ok());
        assert!(limits.try_take("alice").is_ok());
        let limited = limits.try_take("alice").unwrap_err();
        assert_eq!(limited.retry_after, Duration::from_secs(1));
        assert!(
            limits.try_take("bob").is_ok(),
            "another user is not limited"
        );
        limits.refund("alice");
        assert!(limits.try_take("alice").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn entries_go_when_the_user_is_gone_and_the_bucket_full() {
        let limits = UserLimits::new(10.0, 5);
        limits.attach("alice");
        assert!(limits.try_take("alice").is_ok());
        limits.detach("alice");
        assert_eq!(limits.len(), 1, "kept while refilling");
        // HTTP-only users: each leaves an entry behind while it refills.
        for i in 0..1000 {
            assert!(limits.try_take(&format!("api-{i}")).is_ok());
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        // Full again and without connections: swept as the map grows.
        for i in 0..1000 {
            limits.attach(&format!("conn-{i}"));
        }
        assert!(
            limits.len() <= 1000 + SHARDS * MIN_SWEEP,
            "{} entries",
            limits.len()
        );
        for i in 0..1000 {
            limits.detach(&format!("conn-{i}"));
        }
        assert!(limits.len() <= SHARDS * MIN_SWEEP, "{}", limits.len());
        limits.attach("alice");
        limits.detach("alice");
        assert!(!limits.shard("alice").users.contains_key("alice"));
    }
}
