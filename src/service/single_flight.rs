//! Single flight: concurrent callers with the same key share one computation. The first caller
//! (the leader) runs it; the others wait for its outcome. A leader cancelled before it finishes
//! (its client went away) hands over: one of the waiting callers runs the computation instead.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::watch;

pub struct SingleFlight<K, V> {
    in_flight: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self { in_flight: Mutex::new(HashMap::new()) }
    }
}

/// Removes a flight from the map when its leader finishes or is cancelled.
struct Landing<'a, K: Hash + Eq, V> {
    map: &'a Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
    key: Option<K>,
}

impl<K: Hash + Eq, V> Drop for Landing<'_, K, V> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    /// `work`'s outcome, or that of the computation already in flight for `key`; `true` when it
    /// was shared (another caller computed it).
    pub async fn run<F, Fut>(&self, key: K, work: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        loop {
            let (leader, mut flight) = {
                let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(&key) {
                    Some(flight) => (None, flight.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        map.insert(key.clone(), rx.clone());
                        (Some(tx), rx)
                    }
                }
            };
            if let Some(tx) = leader {
                let _landing = Landing { map: &self.in_flight, key: Some(key) };
                let outcome = work().await;
                tx.send_replace(Some(outcome.clone()));
                return (outcome, false);
            }
            if let Some(shared) = flight.wait_for(Option::is_some).await.ok().and_then(|outcome| outcome.clone()) {
                return (shared, true);
            }
            // the leader was cancelled before it finished: try again (one of us leads)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::inference::engine::Engine;
    use crate::inference::error::InferenceError;
    use crate::inference::fake::{self, Seen, SLOW};
    use crate::metrics::Metrics;

    type Rows = Result<Vec<i64>, InferenceError>;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_with_one_key_share_one_ranking_and_other_keys_get_their_own() {
        let seen = Arc::new(Seen::default());
        let engine = Engine::start_with(fake::config("v1"), Metrics::new(), fake::loader(seen.clone()));
        engine.ready().await.unwrap();
        let flights = Arc::new(SingleFlight::<(String, i64), Rows>::default());
        let calls: Vec<_> = (0..10)
            .map(|i| {
                let (engine, flights) = (engine.clone(), flights.clone());
                // eight callers ask for user "a" (the slow history), two for "b"
                let (user, first) = if i < 8 { ("a", SLOW) } else { ("b", 7) };
                tokio::spawn(async move {
                    let lineup = engine.current().unwrap();
                    let work = || async {
                        engine.rank(lineup.primary(), vec![first], vec![], None, 5, false).await.map(|s| s.ranked.rows)
                    };
                    (user, flights.run((user.to_string(), first), work).await)
                })
            })
            .collect();
        let mut shared = 0;
        for call in calls {
            let (user, (rows, was_shared)) = call.await.unwrap();
            let want = if user == "a" { vec![1, SLOW] } else { vec![1, 7] };
            assert_eq!(rows.unwrap(), want, "{user}");
            shared += usize::from(was_shared);
        }
        // "a": one ranking for eight callers; "b": at most two (the second may arrive after the first ended)
        let ranked = seen.ranked.load(Ordering::SeqCst);
        assert!((2..=3).contains(&ranked), "{ranked} histories ranked for 10 callers");
        assert!(shared >= 7, "only {shared} callers shared a computation");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cancelled_leader_hands_the_computation_to_a_waiting_caller() {
        let flights = Arc::new(SingleFlight::<&str, u32>::default());
        let leader = tokio::spawn({
            let flights = flights.clone();
            async move { flights.run("k", || async { std::future::pending::<u32>().await }).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let follower = tokio::spawn({
            let flights = flights.clone();
            async move { flights.run("k", || async { 42 }).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let outcome = tokio::time::timeout(Duration::from_secs(2), follower).await.expect("the follower hung").unwrap();
        assert_eq!(outcome, (42, false), "the follower should have computed it itself");
    }
}
