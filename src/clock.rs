//! The wall clock, as the service writes it into Redis, logs and webhooks.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 for a clock set before it).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// At most one "yes" per `every_ms` (wall clock), shared across threads: for warnings that a
/// flood would otherwise repeat on every event.
#[derive(Debug)]
pub struct Throttle {
    last_ms: std::sync::atomic::AtomicU64,
    every_ms: u64,
}

impl Throttle {
    pub const fn new(every_ms: u64) -> Self {
        Self { last_ms: std::sync::atomic::AtomicU64::new(0), every_ms }
    }

    /// True at most once per interval (the caller that wins the interval logs).
    pub fn ready(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = now_ms();
        let last = self.last_ms.load(Relaxed);
        now.saturating_sub(last) >= self.every_ms && self.last_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_says_yes_once_per_interval() {
        let t = Throttle::new(60_000);
        assert!(t.ready());
        assert!(!t.ready() && !t.ready());
        assert!(Throttle::new(0).ready());
    }
}
