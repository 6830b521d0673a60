//! The listener: recomputes recommendations when profiles change. It computes nothing itself;
//! every recomputation is `Service::refresh`, which skips a profile whose stored list was computed
//! from the same value by the same model version (so replays and duplicates cost one Redis read).
//!
//! Sources: keyspace notifications of `user_profile:*` writes, deletions and expiries from every
//! master (checked and re-enabled on every subscription: a restarted Redis forgets them; on a
//! cluster, subscribed again whenever the masters change); the request stream through a
//! consumer group shared by the replicas (XACK after the write, XAUTOCLAIM of entries left pending,
//! dead-lettering after MAX_ATTEMPTS or a permanent error, trimming of what every group is done
//! with); and catch-up SCANs at start, after every (re-)subscription, as soon as the queue
//! overflowed or a recomputation failed transiently, and periodically.
//!
//! Unavailable items: on the keyspace event of `items:unavailable` (and at least every
//! UNAVAILABLE_REFRESH_MS) the set is read again; when items were added since the listener last
//! looked, every stored list (a SCAN of `recommendations_meta:*`) is queued, and `refresh` rewrites
//! only those that hold an unavailable item (it reads the stored list with the profile while the
//! set is not empty).
//!
//! Replicas share the keyspace and catch-up work through a short per-user claim (a key in the
//! user's slot): every replica receives every event, the one that claims the user computes it,
//! the others skip it and look again once the claim has expired (the holder may have died).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::clock::now_ms;
use crate::error::{ConfigError, Error};
use crate::redis::listen::{Change, ScanOf};
use crate::redis::stream::{StreamConsumer, StreamEntry};
use crate::service::{Refresh, Service};

/// Settings of the listener (`listen`, `serve --listen`, `backfill`).
#[derive(Debug, Clone, Args)]
pub struct ListenerArgs {
    /// Stream of recommendation requests (field `user_id`), consumed through a consumer group.
    #[arg(long, env = "REQUEST_STREAM", default_value = "recommend_requests", global = true)]
    pub request_stream: String,
    #[arg(long, env = "CONSUMER_GROUP", default_value = "model-service", global = true)]
    pub consumer_group: String,
    /// This replica's consumer name (default: hostname-pid).
    #[arg(long, env = "CONSUMER_NAME", global = true)]
    pub consumer_name: Option<String>,
    /// Where entries go after MAX_ATTEMPTS failures or a permanent error, with the reason.
    #[arg(long, env = "DEAD_LETTER_STREAM", default_value = "recommend_requests:dead", global = true)]
    pub dead_letter_stream: String,
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 5, global = true)]
    pub max_attempts: u64,
    /// Most entries kept in the dead-letter stream (the oldest are trimmed).
    #[arg(long, env = "DEAD_LETTER_MAXLEN", default_value_t = 10_000, global = true)]
    pub dead_letter_maxlen: usize,
    /// Entries pending this long (a dead or failing consumer) are claimed and retried.
    #[arg(long, env = "CLAIM_IDLE_MS", default_value_t = 5000, global = true)]
    pub claim_idle_ms: u64,
    /// Interval of the catch-up scan for profiles whose recommendations are missing or stale.
    #[arg(long, env = "CATCHUP_INTERVAL_SECS", default_value_t = 300, global = true)]
    pub catchup_interval_secs: u64,
    /// Recommendations computed at once by the listener.
    #[arg(long, env = "LISTENER_CONCURRENCY", default_value_t = 16, global = true)]
    pub listener_concurrency: usize,
    /// Distinct users waiting in the listener's queue; beyond that, events are dropped and a
    /// catch-up scan recovers them.
    #[arg(long, env = "MAX_PENDING_USERS", default_value_t = 100_000, global = true)]
    pub max_pending_users: usize,
    /// Enable keyspace notifications with CONFIG SET when they are off.
    #[arg(long, env = "CONFIGURE_NOTIFICATIONS", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub configure_notifications: bool,
    /// How long a listener replica holds its claim on a user it is recomputing (a key in the
    /// user's slot); the other replicas skip that user meanwhile and look again once it expires,
    /// so a replica that dies mid-computation delays its users by at most this much.
    #[arg(long, env = "USER_CLAIM_MS", default_value_t = 10_000, global = true)]
    pub user_claim_ms: u64,
}

impl ListenerArgs {
    pub fn consumer(&self) -> String {
        self.consumer_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
            format!("{}-{}", if host.is_empty() { "model-service" } else { &host }, std::process::id())
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("DEAD_LETTER_MAXLEN", self.dead_letter_maxlen),
            ("LISTENER_CONCURRENCY", self.listener_concurrency),
            ("MAX_PENDING_USERS", self.max_pending_users),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }
}

const SCAN_PAGE: usize = 500;
/// How often the request stream is trimmed of what every consumer group is done with.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Distinct users waiting to be recomputed, oldest first. A user already waiting is not queued
/// again (its job reads the latest profile when it runs), so a burst on one user costs one job.
struct Coalescer {
    state: Mutex<(VecDeque<Job>, HashSet<String>)>,
    ready: Notify,
    space: Notify,
    cap: usize,
}

/// A queued user: when the event arrived and where it came from (keyspace or catchup).
type Job = (String, Instant, &'static str);

#[derive(Debug, PartialEq, Eq)]
enum Pushed {
    Queued,
    Coalesced,
    Full,
}

impl Coalescer {
    fn new(cap: usize) -> Self {
        Self { state: Mutex::new((VecDeque::new(), HashSet::new())), ready: Notify::new(), space: Notify::new(), cap }
    }

    fn push(&self, user: String, at: Instant, source: &'static str) -> Pushed {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.1.contains(&user) {
            return Pushed::Coalesced;
        }
        if st.0.len() >= self.cap {
            return Pushed::Full;
        }
        st.1.insert(user.clone());
        st.0.push_back((user, at, source));
        drop(st);
        self.ready.notify_one();
        Pushed::Queued
    }

    /// Like `push`, but waits for room instead of refusing (catch-up scans).
    async fn push_wait(&self, user: String, at: Instant, source: &'static str) {
        loop {
            let space = self.space.notified();
            if self.push(user.clone(), at, source) != Pushed::Full {
                return;
            }
            space.await;
        }
    }

    async fn pop(&self) -> Job {
        loop {
            let ready = self.ready.notified();
            {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(job) = st.0.pop_front() {
                    st.1.remove(&job.0);
                    drop(st);
                    self.space.notify_one();
                    return job;
                }
            }
            ready.await;
        }
    }

    fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }
}

/// What happened to one event, for the metrics.
fn outcome(result: &Result<Refresh, Error>) -> &'static str {
    match result {
        Ok(Refresh::Written) => "processed",
        Ok(Refresh::Unchanged) => "skipped",
        Ok(Refresh::Superseded) => "superseded",
        Err(_) => "failed",
    }
}

pub struct Listener {
    service: Arc<Service>,
    cfg: ListenerArgs,
    /// How long work in flight may take to finish on shutdown (SHUTDOWN_GRACE_SECS).
    grace: Duration,
    consumer: String,
    queue: Coalescer,
    /// Wakes the catch-up scan. A wake-up while a scan runs is kept (one permit), so the users
    /// dropped during a scan are found by the next one.
    catchup: Notify,
    /// Set from the first dropped event until the next scan starts (logs once per overflow).
    overflowed: AtomicBool,
    /// Users claimed by another replica, to look at again once the claim has expired.
    deferred: Mutex<HashSet<String>>,
    /// Wakes the look at `items:unavailable` (its keyspace event).
    unavailable_changed: Notify,
}

impl Listener {
    pub fn new(service: Arc<Service>, cfg: ListenerArgs, grace: Duration) -> Arc<Self> {
        let consumer = cfg.consumer();
        let queue = Coalescer::new(cfg.max_pending_users);
        Arc::new(Self {
            service,
            cfg,
            grace,
            consumer,
            queue,
            catchup: Notify::new(),
            overflowed: AtomicBool::new(false),
            deferred: Mutex::default(),
            unavailable_changed: Notify::new(),
        })
    }

    fn count(&self, source: &str, outcome: &str) {
        self.service.metrics.listener_events.with_label_values(&[source, outcome]).inc();
    }

    /// Runs until `shutdown` turns true, then finishes in-flight work (acknowledging it) within
    /// the grace period. Fails at start when keyspace notifications are off and cannot be enabled.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        self.service.engine.ready().await?;
        self.service
            .store
            .ensure_keyspace_notifications(self.cfg.configure_notifications)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        tracing::info!(consumer = %self.consumer, stream = %self.cfg.request_stream, group = %self.cfg.consumer_group, "listener started");

        let mut background = JoinSet::new();
        background.spawn(self.clone().keyspace_loop());
        background.spawn(self.clone().catchup_loop());
        background.spawn(self.clone().unavailable_loop());
        let mut work = JoinSet::new();
        for _ in 0..self.cfg.listener_concurrency.max(1) {
            work.spawn(self.clone().worker(shutdown.clone()));
        }
        work.spawn(self.clone().stream_loop(shutdown.clone()));

        let mut stop = shutdown.clone();
        let _ = stop.wait_for(|s| *s).await;
        tracing::info!("listener stopping: finishing in-flight work");
        background.abort_all();
        let grace = self.grace;
        if tokio::time::timeout(grace, async { while work.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!(?grace, "in-flight work did not finish within the grace period");
            work.abort_all();
        }
        tracing::info!("listener stopped");
        Ok(())
    }

    async fn keyspace_loop(self: Arc<Self>) {
        let store = &self.service.store;
        loop {
            // A Redis restarted since the last subscription has forgotten a CONFIG SET.
            if let Err(e) = store.ensure_keyspace_notifications(self.cfg.configure_notifications).await {
                tracing::error!(error = %e, "keyspace notifications are off; profile changes are found only by catch-up scans");
            }
            match store.profile_changes().await {
                Ok(mut changes) => {
                    // Events published while we were not subscribed are lost: catch up.
                    self.catchup.notify_one();
                    while let Some(change) = changes.next().await {
                        let user = match change {
                            Change::Profile(user) => user,
                            Change::Unavailable => {
                                self.unavailable_changed.notify_one();
                                continue;
                            }
                        };
                        self.count("keyspace", "received");
                        if self.queue.push(user, Instant::now(), "keyspace") == Pushed::Full {
                            self.count("keyspace", "dropped");
                            if !self.overflowed.swap(true, Ordering::SeqCst) {
                                tracing::warn!("listener queue full: dropping events, a catch-up scan follows");
                            }
                            self.catchup.notify_one();
                        }
                        self.service.metrics.listener_queue.set(self.queue.len() as i64);
                    }
                    tracing::warn!("keyspace subscription ended; re-subscribing");
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to keyspace notifications; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn catchup_loop(self: Arc<Self>) {
        let interval = Duration::from_secs(self.cfg.catchup_interval_secs.max(1));
        loop {
            // The first notification comes from keyspace_loop once it has subscribed.
            let _ = tokio::time::timeout(interval, self.catchup.notified()).await;
            self.overflowed.store(false, Ordering::SeqCst);
            let started = Instant::now();
            // Every profile; then every stored list whose profile is gone (deleted while no
            // listener ran, so its deletion event was lost): both go through `refresh`, which
            // rewrites a deleted profile's list as the API answers it.
            let profiles = self.scan_and_queue(ScanOf::Profiles, false, "catchup").await;
            let orphans = self.scan_and_queue(ScanOf::Lists, true, "catchup").await;
            tracing::info!(profiles, orphans, seconds = started.elapsed().as_secs_f64(), "catch-up scan queued");
        }
    }

    /// Reads `items:unavailable` on its keyspace event (at once) and at least every
    /// UNAVAILABLE_REFRESH_MS; when it holds items it did not hold at the last look, queues every
    /// stored list: `refresh` recomputes those that hold an unavailable item and leaves the others.
    async fn unavailable_loop(self: Arc<Self>) {
        let every = self.service.unavailable_every().max(Duration::from_millis(50));
        let mut seen: HashSet<String> = HashSet::new();
        loop {
            let event = tokio::time::timeout(every, self.unavailable_changed.notified()).await.is_ok();
            let set = if event { self.service.reload_unavailable().await } else { self.service.unavailable().await };
            let added = set.ids.iter().filter(|id| !seen.contains(*id)).count();
            seen = set.ids.clone();
            if added == 0 {
                continue;
            }
            let started = Instant::now();
            let lists = self.scan_and_queue(ScanOf::Lists, false, "unavailable").await;
            tracing::info!(
                added,
                lists,
                seconds = started.elapsed().as_secs_f64(),
                "items became unavailable: stored lists queued"
            );
        }
    }

    /// One scan of every master, queueing each user it finds as `source`: each profile
    /// (`ScanOf::Profiles`) or each stored list (`ScanOf::Lists`), with `orphans_only` only the
    /// lists whose profile does not exist. Returns how many it queued; a failure ends the scan
    /// (the next catch-up finds the rest).
    async fn scan_and_queue(&self, of: ScanOf, orphans_only: bool, source: &'static str) -> u64 {
        let store = &self.service.store;
        let mut queued = 0u64;
        let failed = |e: &dyn std::fmt::Display| tracing::warn!(error = %e, source, "scan failed; retrying later");
        let mut cursor = match store.scan_start(None).await {
            Ok(cursor) => cursor,
            Err(e) => {
                failed(&e);
                return queued;
            }
        };
        while !cursor.is_done() {
            let page = match store.scan_users(of, &mut cursor, SCAN_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    failed(&e);
                    break;
                }
            };
            self.service.metrics.scan_skipped_keys.inc_by(page.skipped);
            let users = if orphans_only {
                match store.without_profile(page.users).await {
                    Ok(users) => users,
                    Err(e) => {
                        failed(&e);
                        break;
                    }
                }
            } else {
                page.users
            };
            for user in users {
                queued += 1;
                self.count(source, "received");
                self.queue.push_wait(user, Instant::now(), source).await;
            }
        }
        queued
    }

    async fn worker(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let (user, queued_at, source) = tokio::select! {
                job = self.queue.pop() => job,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            self.service.metrics.listener_queue.set(self.queue.len() as i64);
            let Some(result) = self.refresh_claimed(&user).await else {
                self.count(source, "deferred");
                self.defer(user, source);
                continue;
            };
            self.count(source, outcome(&result));
            match &result {
                Ok(Refresh::Written) => {
                    if source == "unavailable" {
                        self.service.metrics.unavailable_recomputes.inc();
                    }
                    self.service
                        .metrics
                        .listener_lag
                        .with_label_values(&[source])
                        .observe(queued_at.elapsed().as_secs_f64())
                }
                Ok(Refresh::Unchanged | Refresh::Superseded) => {}
                Err(e) if e.is_permanent() => tracing::warn!(%user, error = %e, "profile cannot be processed"),
                Err(e) => {
                    tracing::warn!(%user, error = %e, "recomputation failed; a catch-up scan will retry it");
                    self.catchup.notify_one();
                }
            }
        }
    }

    /// Recomputes `user` under this replica's claim, so that the replicas, which all receive the
    /// same keyspace events and scan the same profiles, compute each change once. `None` when
    /// another replica holds the claim. Changes made while this replica held it were skipped by
    /// the others, so once it is released this replica looks again and goes on while the stored
    /// list is not current.
    async fn refresh_claimed(&self, user: &str) -> Option<Result<Refresh, Error>> {
        let store = &self.service.store;
        let mut first: Option<Result<Refresh, Error>> = None;
        loop {
            match store.claim_user(user, &self.consumer, self.cfg.user_claim_ms).await {
                Ok(true) => {}
                Ok(false) => return first,
                Err(e) => return Some(first.unwrap_or(Err(e.into()))),
            }
            let result = self.service.refresh(user).await;
            if let Err(e) = store.release_user(user, &self.consumer).await {
                tracing::debug!(%user, error = %e, "releasing a claim failed; it expires by itself");
            }
            let changed = matches!(result, Ok(Refresh::Written | Refresh::Superseded));
            let first = first.get_or_insert(result);
            if !changed || !matches!(self.service.is_current(user).await, Ok(false)) {
                return Some(std::mem::replace(first, Ok(Refresh::Unchanged)));
            }
        }
    }

    /// Queues `user` again once a claim held by another replica has expired at the latest: that
    /// replica may have died mid-computation. At most MAX_PENDING_USERS users wait so; beyond, the
    /// periodic catch-up finds them.
    fn defer(self: &Arc<Self>, user: String, source: &'static str) {
        {
            let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
            if deferred.len() >= self.cfg.max_pending_users || !deferred.insert(user.clone()) {
                return;
            }
        }
        let listener = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(listener.cfg.user_claim_ms)).await;
            listener.deferred.lock().unwrap_or_else(|p| p.into_inner()).remove(&user);
            listener.queue.push_wait(user, Instant::now(), source).await;
        });
    }

    async fn stream_loop(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let mut consumer: Option<StreamConsumer> = None;
        let claim_every = Duration::from_millis((self.cfg.claim_idle_ms / 2).max(100));
        let mut last_claim = Instant::now() - claim_every;
        let mut last_trim = Instant::now();
        while !*shutdown.borrow() {
            let c = match consumer.as_mut() {
                Some(c) => c,
                None => {
                    let made = self
                        .service
                        .store
                        .stream_consumer(&self.cfg.request_stream, &self.cfg.consumer_group, &self.consumer)
                        .await;
                    match made {
                        Ok(c) => consumer.insert(c),
                        Err(e) => {
                            tracing::warn!(error = %e, "request stream unavailable; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    }
                }
            };
            let batch = if last_claim.elapsed() >= claim_every {
                last_claim = Instant::now();
                c.claim_stale(Duration::from_millis(self.cfg.claim_idle_ms), 32).await
            } else {
                c.read_new(self.cfg.listener_concurrency.max(1)).await
            };
            if last_trim.elapsed() >= TRIM_EVERY {
                last_trim = Instant::now();
                match c.trim_acknowledged().await {
                    Ok(removed) if removed > 0 => tracing::debug!(removed, "request stream trimmed"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "trimming the request stream failed"),
                }
            }
            match batch {
                Ok(entries) => {
                    if let Err(e) = self.handle_entries(c, entries).await {
                        tracing::warn!(error = %e, "request stream connection failed; reconnecting");
                        consumer = None;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the request stream failed; reconnecting");
                    consumer = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Processes a batch concurrently, then acknowledges (or dead-letters) each entry. An entry
    /// whose recomputation failed transiently stays pending and is claimed again after
    /// CLAIM_IDLE_MS (the retry backoff), until MAX_ATTEMPTS.
    async fn handle_entries(&self, c: &mut StreamConsumer, entries: Vec<StreamEntry>) -> Result<(), Error> {
        if entries.is_empty() {
            self.service.metrics.listener_pending.set(c.pending().await? as i64);
            return Ok(());
        }
        let results = futures_util::future::join_all(entries.iter().map(|entry| async move {
            match entry.fields.get("user_id") {
                None if entry.binary.contains_key("user_id") => {
                    Err(Error::InvalidUserId("the stream entry's user_id is not UTF-8".into()))
                }
                None => Err(Error::InvalidUserId("the stream entry has no user_id field".into())),
                Some(user) => self.service.refresh(user).await,
            }
        }))
        .await;
        for (entry, result) in entries.iter().zip(results) {
            self.count("stream", "received");
            match result {
                Ok(refresh) => {
                    c.ack(&entry.id).await?;
                    let ok = Ok(refresh);
                    self.count("stream", outcome(&ok));
                    if let (Ok(Refresh::Written), Some(added)) = (&ok, entry.added_ms()) {
                        let lag = now_ms().saturating_sub(added) as f64 / 1e3;
                        self.service.metrics.listener_lag.with_label_values(&["stream"]).observe(lag);
                    }
                }
                Err(e) if e.is_permanent() => {
                    c.dead_letter(&self.cfg.dead_letter_stream, self.cfg.dead_letter_maxlen, entry, &e.to_string())
                        .await?;
                    self.count("stream", "dead_lettered");
                    tracing::warn!(id = %entry.id, reason = %e, "stream entry dead-lettered");
                }
                Err(e) => {
                    let attempts = c.deliveries(&entry.id).await?;
                    if attempts >= self.cfg.max_attempts {
                        let reason = format!("gave up after {attempts} attempts: {e}");
                        c.dead_letter(&self.cfg.dead_letter_stream, self.cfg.dead_letter_maxlen, entry, &reason)
                            .await?;
                        self.count("stream", "dead_lettered");
                        tracing::warn!(id = %entry.id, %reason, "stream entry dead-lettered");
                    } else {
                        self.count("stream", "failed");
                        tracing::warn!(id = %entry.id, attempts, error = %e, "stream entry failed; it will be retried");
                    }
                }
            }
        }
        self.service.metrics.listener_pending.set(c.pending().await? as i64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bursts_on_one_user_coalesce_and_the_queue_is_bounded() {
        let q = Coalescer::new(2);
        let t = Instant::now();
        assert_eq!(q.push("a".into(), t, "keyspace"), Pushed::Queued);
        assert_eq!(q.push("a".into(), t, "catchup"), Pushed::Coalesced);
        assert_eq!(q.push("b".into(), t, "keyspace"), Pushed::Queued);
        assert_eq!(q.push("c".into(), t, "keyspace"), Pushed::Full);
        assert_eq!(q.pop().await.0, "a");
        assert_eq!(q.push("a".into(), t, "keyspace"), Pushed::Queued, "a user taken off the queue can be queued again");
        assert_eq!((q.pop().await.0, q.pop().await.0), ("b".to_string(), "a".to_string()));
        assert_eq!(q.len(), 0);
    }

    #[tokio::test]
    async fn push_wait_waits_for_room() {
        let q = Arc::new(Coalescer::new(1));
        q.push("a".into(), Instant::now(), "keyspace");
        let q2 = q.clone();
        let waiting = tokio::spawn(async move { q2.push_wait("b".into(), Instant::now(), "catchup").await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        assert_eq!(q.pop().await.0, "a");
        waiting.await.unwrap();
        assert_eq!(q.pop().await.0, "b");
    }
}
