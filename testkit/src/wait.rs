//! Polling until a condition holds.

use std::time::{Duration, Instant};

/// Polls `ok` every 50 ms until it holds; panics once `limit` has passed.
pub fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "condition not met within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
