//! Bounded waits: how long any single wait may take, and polling until a
//! condition holds.

use std::time::{Duration, Instant};

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// Poll `check` every 20 ms until it returns `Some`, at most [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_for(what, WAIT, check).await
}

/// [`eventually`] with its own bound, for waits longer than [`WAIT`] (a
/// Redis failover): poll `check` every 20 ms, at most `limit`.
pub async fn eventually_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
