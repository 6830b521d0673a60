//! Webhooks: a signed `POST` to WEBHOOK_URL for every recommendation list written, so an
//! application learns of new lists without a Redis subscription (docs/webhooks.md).
//!
//! Off the recomputation path: `Webhooks::list_written` only puts the list on a bounded queue
//! (full: dropped and counted, never waiting). A pool of WEBHOOK_CONCURRENCY tasks delivers: each
//! attempt is signed afresh (HMAC-SHA256 over `<timestamp>.<body>`) and bounded by
//! WEBHOOK_TIMEOUT_MS; timeouts, connection errors, 5xx, 408 and 429 are retried with exponential
//! backoff and jitter, with the same `delivery_id` and body every time; other answers (4xx, 3xx:
//! redirects are not followed) and the last failed attempt put the webhook in the dead-letter
//! stream with the reason. Delivery is at least once: a receiver deduplicates by `delivery_id`.
//!
//! The secret never leaves this module except as signatures; the URL (which may carry
//! credentials) is never logged nor written to the dead-letter stream, only its host is logged.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::clock::{now_ms, Throttle};

use clap::Args;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::error::ConfigError;
use crate::metrics::Metrics;
use crate::redis::Store;

/// The `event` of every webhook.
pub const EVENT: &str = "recommendations.updated";
/// The receiver's window on `X-Webhook-Timestamp` documented in docs/webhooks.md (seconds either side).
pub const TOLERANCE_SECS: u64 = 300;
pub const HEADER_TIMESTAMP: &str = "X-Webhook-Timestamp";
pub const HEADER_SIGNATURE: &str = "X-Webhook-Signature";
pub const HEADER_ID: &str = "X-Webhook-Id";
pub const HEADER_ATTEMPT: &str = "X-Webhook-Attempt";

/// Which writes are announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WebhookEvents {
    /// Lists written by `listen`, `ingest` and `backfill` (a profile changed, or a backfill).
    Recomputed,
    /// Lists written by the API's own requests (`POST /recommend/{id}`, a cache miss of
    /// `GET /recommendations/{id}`, the `recommend` command).
    Requests,
}

/// What made a list be written (the webhook's `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Listen,
    Ingest,
    Backfill,
    Request,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listen => "listen",
            Self::Ingest => "ingest",
            Self::Backfill => "backfill",
            Self::Request => "request",
        }
    }
}

/// The shared secret; its Debug form is redacted, so no configuration dump shows it.
#[derive(Clone)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl Secret {
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Webhook settings (flattened into the configuration).
#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// URL that receives a signed POST for every recommendation list written (http:// or https://);
    /// unset or empty: no webhooks. Configuration only: never taken from a request.
    #[arg(long, env = "WEBHOOK_URL", hide_env_values = true, global = true)]
    pub webhook_url: Option<String>,
    /// Shared secret of the HMAC-SHA256 signature (`X-Webhook-Signature`); required with
    /// WEBHOOK_URL, at least 16 bytes.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true, global = true)]
    pub webhook_secret: Option<Secret>,
    /// Which writes are announced, comma-separated: `recomputed` (listen, ingest, backfill),
    /// `requests` (the API's own writes).
    #[arg(
        long,
        env = "WEBHOOK_EVENTS",
        value_enum,
        value_delimiter = ',',
        default_value = "recomputed",
        global = true
    )]
    pub webhook_events: Vec<WebhookEvents>,
    /// Bound on one delivery attempt (connect, send, answer), in milliseconds.
    #[arg(long, env = "WEBHOOK_TIMEOUT_MS", default_value_t = 5000, global = true)]
    pub webhook_timeout_ms: u64,
    /// Attempts per webhook before it goes to the dead-letter stream.
    #[arg(long, env = "WEBHOOK_MAX_ATTEMPTS", default_value_t = 8, global = true)]
    pub webhook_max_attempts: u32,
    /// Wait before the second attempt, in milliseconds; doubled for each further one (up to
    /// WEBHOOK_BACKOFF_MAX_MS), each wait drawn between its half and its whole (jitter).
    #[arg(long, env = "WEBHOOK_BACKOFF_MS", default_value_t = 500, global = true)]
    pub webhook_backoff_ms: u64,
    /// Longest wait between two attempts, in milliseconds (also the most a Retry-After is honoured).
    #[arg(long, env = "WEBHOOK_BACKOFF_MAX_MS", default_value_t = 60_000, global = true)]
    pub webhook_backoff_max_ms: u64,
    /// Webhooks waiting for delivery; beyond, new ones are dropped (counted as `dropped`, logged).
    #[arg(long, env = "WEBHOOK_QUEUE", default_value_t = 10_000, global = true)]
    pub webhook_queue: usize,
    /// Deliveries in flight at once (a webhook waiting to retry holds its place).
    #[arg(long, env = "WEBHOOK_CONCURRENCY", default_value_t = 8, global = true)]
    pub webhook_concurrency: usize,
    /// Redis stream of webhooks given up on, with the reason and the body.
    #[arg(long, env = "WEBHOOK_DEAD_LETTER_STREAM", default_value = "webhooks:dead", global = true)]
    pub webhook_dead_letter_stream: String,
    /// The dead-letter stream keeps about its newest this many entries.
    #[arg(long, env = "WEBHOOK_DEAD_LETTER_MAXLEN", default_value_t = 100_000, global = true)]
    pub webhook_dead_letter_maxlen: usize,
    /// At shutdown (and at the end of `backfill`), seconds allowed to deliver what is queued;
    /// what is left then goes to the dead-letter stream (reason `shutdown`).
    #[arg(long, env = "WEBHOOK_DRAIN_SECS", default_value_t = 10.0, global = true)]
    pub webhook_drain_secs: f64,
}

impl WebhookArgs {
    /// The URL when webhooks are on (set and not empty).
    pub fn url(&self) -> Option<&str> {
        self.webhook_url.as_deref().map(str::trim).filter(|u| !u.is_empty())
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.webhook_drain_secs.clamp(0.0, 3600.0))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        let Some(url) = self.url() else { return Ok(()) };
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
            // the URL is not echoed: it may carry credentials
            _ => return bad("WEBHOOK_URL must be an absolute http:// or https:// URL"),
        }
        match &self.webhook_secret {
            None => return bad("WEBHOOK_URL needs WEBHOOK_SECRET (webhooks are always signed)"),
            Some(s) if s.0.len() < 16 => return bad("WEBHOOK_SECRET must be at least 16 bytes"),
            Some(_) => {}
        }
        if self.webhook_events.is_empty() {
            return bad("WEBHOOK_EVENTS must name recomputed, requests or both");
        }
        for (name, value) in [
            ("WEBHOOK_TIMEOUT_MS", self.webhook_timeout_ms),
            ("WEBHOOK_MAX_ATTEMPTS", u64::from(self.webhook_max_attempts)),
            ("WEBHOOK_QUEUE", self.webhook_queue as u64),
            ("WEBHOOK_CONCURRENCY", self.webhook_concurrency as u64),
            ("WEBHOOK_DEAD_LETTER_MAXLEN", self.webhook_dead_letter_maxlen as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.webhook_backoff_max_ms < self.webhook_backoff_ms {
            return bad("WEBHOOK_BACKOFF_MAX_MS must be at least WEBHOOK_BACKOFF_MS");
        }
        if self.webhook_dead_letter_stream.trim().is_empty() {
            return bad("WEBHOOK_DEAD_LETTER_STREAM must not be empty");
        }
        if !(self.webhook_drain_secs >= 0.0 && self.webhook_drain_secs <= 3600.0) {
            return bad("WEBHOOK_DRAIN_SECS must be between 0 and 3600");
        }
        Ok(())
    }
}

/// `hex(HMAC-SHA256(secret, "<timestamp>.<body>"))`: the value after `sha256=` in
/// `X-Webhook-Signature`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a receiver refuses a webhook (`verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The timestamp header is missing or not an integer.
    BadTimestamp,
    /// The timestamp is more than `TOLERANCE_SECS` away from the receiver's clock (a replay).
    Stale,
    /// The signature header is missing, malformed, or does not match the body.
    BadSignature,
}

/// The receiver's check, as docs/webhooks.md gives it in Python and PHP: the timestamp within
/// `tolerance_secs` of `now_secs`, and `sha256=<hex>` equal (in constant time) to the HMAC of
/// `<timestamp>.<raw body>`.
pub fn verify(
    secret: &[u8],
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now_secs: u64,
    tolerance_secs: u64,
) -> Result<(), Refused> {
    let ts: u64 = timestamp.trim().parse().map_err(|_| Refused::BadTimestamp)?;
    if ts.abs_diff(now_secs) > tolerance_secs {
        return Err(Refused::Stale);
    }
    let hex = signature.trim().strip_prefix("sha256=").ok_or(Refused::BadSignature)?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Refused::BadSignature);
    }
    let given: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0)).collect();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given).map_err(|_| Refused::BadSignature)
}

/// One item of a written list.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookItem {
    pub item_id: String,
    pub score: f32,
}

/// A list just written to `recommendations:<user_id>`.
#[derive(Debug, Clone)]
pub struct ListWritten {
    pub user_id: String,
    pub model_version: String,
    pub items: Vec<WebhookItem>,
    pub strategy: &'static str,
    pub origin: Origin,
    pub computed_at_ms: u64,
}

/// The JSON body (docs/webhooks.md).
#[derive(Serialize)]
struct Payload<'a> {
    event: &'static str,
    delivery_id: &'a str,
    user_id: &'a str,
    model_version: &'a str,
    items: &'a [WebhookItem],
    strategy: &'static str,
    source: &'static str,
    computed_at_ms: u64,
}

struct Job {
    delivery_id: String,
    list: ListWritten,
}

/// The handle the service holds: cheap to clone; a disabled one does nothing.
#[derive(Clone, Default)]
pub struct Webhooks {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: mpsc::Sender<Job>,
    recomputed: bool,
    requests: bool,
    closing: AtomicBool,
    /// The "queue full" warning: one a second at most.
    full_warning: Throttle,
    metrics: Metrics,
    phase: watch::Sender<Phase>,
    finished: watch::Receiver<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Deliver what is queued, accept nothing new.
    Draining,
    /// The drain time is over: dead-letter what is left.
    Abort,
}

struct Shared {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Secret,
    max_attempts: u32,
    backoff: Duration,
    backoff_max: Duration,
    timeout: Duration,
    store: Store,
    dead_stream: String,
    dead_maxlen: usize,
    metrics: Metrics,
    phase: watch::Receiver<Phase>,
}

impl Webhooks {
    /// No webhooks.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the delivery pool when WEBHOOK_URL is set (within a tokio runtime). `store` is the
    /// dead-letter stream's Redis.
    pub fn start(args: &WebhookArgs, store: Store, metrics: Metrics) -> anyhow::Result<Self> {
        let Some(url) = args.url() else { return Ok(Self::disabled()) };
        let url = reqwest::Url::parse(url).map_err(|_| anyhow::anyhow!("WEBHOOK_URL is not a valid URL"))?;
        let secret = args.webhook_secret.clone().ok_or_else(|| anyhow::anyhow!("WEBHOOK_URL needs WEBHOOK_SECRET"))?;
        let timeout = Duration::from_millis(args.webhook_timeout_ms);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(args.webhook_concurrency)
            .user_agent(concat!("model-service/", env!("CARGO_PKG_VERSION"), " (webhook)"))
            .build()
            .map_err(|e| anyhow::anyhow!("building the webhook client: {e}"))?;
        let (tx, rx) = mpsc::channel(args.webhook_queue);
        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        let (finished_tx, finished_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            client,
            url: url.clone(),
            secret,
            max_attempts: args.webhook_max_attempts,
            backoff: Duration::from_millis(args.webhook_backoff_ms),
            backoff_max: Duration::from_millis(args.webhook_backoff_max_ms),
            timeout,
            store,
            dead_stream: args.webhook_dead_letter_stream.clone(),
            dead_maxlen: args.webhook_dead_letter_maxlen,
            metrics: metrics.clone(),
            phase: phase_rx,
        });
        let concurrency = args.webhook_concurrency;
        tokio::spawn(async move {
            dispatch(shared, rx, concurrency).await;
            let _ = finished_tx.send(true);
        });
        let events = &args.webhook_events;
        tracing::info!(host = url.host_str().unwrap_or(""), events = ?events, queue = args.webhook_queue,
            concurrency, max_attempts = args.webhook_max_attempts, "webhooks on");
        Ok(Self {
            inner: Some(Arc::new(Inner {
                tx,
                recomputed: events.contains(&WebhookEvents::Recomputed),
                requests: events.contains(&WebhookEvents::Requests),
                closing: AtomicBool::new(false),
                full_warning: Throttle::new(1000),
                metrics,
                phase: phase_tx,
                finished: finished_rx,
            })),
        })
    }

    /// Whether a list written for `origin` is announced (check before building a `ListWritten`).
    pub fn wants(&self, origin: Origin) -> bool {
        self.inner.as_ref().is_some_and(|i| match origin {
            Origin::Request => i.requests,
            Origin::Listen | Origin::Ingest | Origin::Backfill => i.recomputed,
        })
    }

    /// Queues the webhook of a written list; never waits. A full queue (or one closed by shutdown)
    /// drops it: counted as `dropped`, with a warning at most once a second.
    pub fn list_written(&self, list: ListWritten) {
        let Some(inner) = &self.inner else { return };
        if !self.wants(list.origin) {
            return;
        }
        let job = Job { delivery_id: uuid::Uuid::new_v4().to_string(), list };
        let refused = if inner.closing.load(Ordering::Relaxed) {
            Some("shutting down")
        } else {
            match inner.tx.try_send(job) {
                Ok(()) => {
                    inner.metrics.webhook_queue.inc();
                    None
                }
                Err(mpsc::error::TrySendError::Full(_)) => Some("the queue is full (WEBHOOK_QUEUE)"),
                Err(mpsc::error::TrySendError::Closed(_)) => Some("the delivery pool has stopped"),
            }
        };
        if let Some(why) = refused {
            inner.metrics.webhook_deliveries.with_label_values(&["dropped"]).inc();
            if inner.full_warning.ready() {
                tracing::warn!(
                    reason = why,
                    "webhook dropped (model_service_webhook_deliveries_total{{outcome=\"dropped\"}} counts them)"
                );
            }
        }
    }

    /// Stops accepting webhooks and delivers what is queued or retrying within `grace`; what is
    /// left then goes to the dead-letter stream with the reason `shutdown`. Returns when done.
    pub async fn shutdown(&self, grace: Duration) {
        let Some(inner) = &self.inner else { return };
        inner.closing.store(true, Ordering::Relaxed);
        let _ = inner.phase.send(Phase::Draining);
        let mut finished = inner.finished.clone();
        if tokio::time::timeout(grace, finished.wait_for(|f| *f)).await.is_err() {
            tracing::warn!(
                grace_secs = grace.as_secs_f64(),
                "webhooks still undelivered at shutdown go to the dead-letter stream"
            );
            let _ = inner.phase.send(Phase::Abort);
            let _ = finished.wait_for(|f| *f).await;
        }
    }
}

/// Takes webhooks off the queue into at most `concurrency` deliveries at once.
async fn dispatch(shared: Arc<Shared>, mut rx: mpsc::Receiver<Job>, concurrency: usize) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut deliveries = JoinSet::new();
    let mut phase = shared.phase.clone();
    loop {
        while deliveries.try_join_next().is_some() {}
        let current = *phase.borrow_and_update();
        if current == Phase::Abort {
            break;
        }
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            // every handle dropped: nothing can be queued any more
            changed = phase.changed() => if changed.is_err() { break } else { continue },
        };
        let job = if current == Phase::Draining {
            match rx.try_recv() {
                Ok(job) => job,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                job = rx.recv() => match job { Some(job) => job, None => break },
                changed = phase.changed() => if changed.is_err() { break } else { continue },
            }
        };
        let shared = shared.clone();
        deliveries.spawn(async move {
            shared.deliver(job).await;
            drop(slot);
        });
    }
    // Aborted: what is still queued was never attempted.
    rx.close();
    while let Ok(job) = rx.recv().await.ok_or(()) {
        let body = shared.body(&job);
        shared.dead_letter(&job, &body, 0, None, "shutdown: not attempted before the drain time ran out").await;
    }
    while deliveries.join_next().await.is_some() {}
}

/// What one attempt came to.
enum Attempt {
    Delivered,
    /// Try again (after at least the given wait, from a Retry-After).
    Retry {
        reason: String,
        status: Option<u16>,
        after: Option<Duration>,
    },
    GiveUp {
        reason: String,
        status: Option<u16>,
    },
}

impl Shared {
    fn body(&self, job: &Job) -> Vec<u8> {
        let l = &job.list;
        serde_json::to_vec(&Payload {
            event: EVENT,
            delivery_id: &job.delivery_id,
            user_id: &l.user_id,
            model_version: &l.model_version,
            items: &l.items,
            strategy: l.strategy,
            source: l.origin.as_str(),
            computed_at_ms: l.computed_at_ms,
        })
        .unwrap_or_default()
    }

    async fn deliver(&self, job: Job) {
        let body = self.body(&job);
        let mut phase = self.phase.clone();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let outcome = tokio::select! {
                outcome = self.attempt(&job.delivery_id, attempt, &body) => outcome,
                _ = aborted(&mut phase) => {
                    let reason = format!("shutdown: attempt {attempt} cut short by the end of the drain time");
                    return self.dead_letter(&job, &body, attempt, None, &reason).await;
                }
            };
            match outcome {
                Attempt::Delivered => {
                    self.metrics.webhook_deliveries.with_label_values(&["delivered"]).inc();
                    self.metrics.webhook_queue.dec();
                    return;
                }
                Attempt::GiveUp { reason, status } => {
                    return self.dead_letter(&job, &body, attempt, status, &reason).await;
                }
                Attempt::Retry { reason, status, .. } if attempt >= self.max_attempts => {
                    let reason = format!("{attempt} attempts failed, the last: {reason}");
                    return self.dead_letter(&job, &body, attempt, status, &reason).await;
                }
                Attempt::Retry { reason, after, .. } => {
                    self.metrics.webhook_deliveries.with_label_values(&["retried"]).inc();
                    let wait = self.backoff(attempt).max(after.unwrap_or_default().min(self.backoff_max));
                    tracing::debug!(delivery_id = %job.delivery_id, attempt, %reason, wait_ms = wait.as_millis() as u64,
                        "webhook attempt failed, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = aborted(&mut phase) => {
                            let reason = format!("shutdown: {attempt} attempts failed, the last: {reason}");
                            return self.dead_letter(&job, &body, attempt, None, &reason).await;
                        }
                    }
                }
            }
        }
    }

    /// The wait after failed attempt `n` (1-based): `backoff * 2^(n-1)` capped at `backoff_max`,
    /// drawn uniformly between its half and its whole, so receivers coming back are not hit by
    /// every retry at once.
    fn backoff(&self, n: u32) -> Duration {
        let full = self.backoff.saturating_mul(1u32 << (n - 1).min(20)).min(self.backoff_max);
        let unit = (uuid::Uuid::new_v4().as_u128() as u64 >> 11) as f64 / (1u64 << 53) as f64;
        full.mul_f64(0.5 + 0.5 * unit)
    }

    /// One signed POST.
    async fn attempt(&self, delivery_id: &str, attempt: u32, body: &[u8]) -> Attempt {
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        let signature = sign(self.secret.expose(), timestamp, body);
        let started = Instant::now();
        let sent = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(HEADER_TIMESTAMP, timestamp.to_string())
            .header(HEADER_SIGNATURE, format!("sha256={signature}"))
            .header(HEADER_ID, delivery_id)
            .header(HEADER_ATTEMPT, attempt.to_string())
            .body(body.to_vec())
            .send()
            .await;
        let (label, outcome) = match sent {
            Ok(response) => {
                let status = response.status();
                let after = retry_after(&response);
                let snippet = answer_snippet(response).await;
                let what = format!("HTTP {status}{snippet}");
                let code = Some(status.as_u16());
                match status.as_u16() {
                    200..=299 => ("2xx", Attempt::Delivered),
                    300..=399 => (
                        "3xx",
                        Attempt::GiveUp {
                            reason: format!("{what}: redirects are not followed; set WEBHOOK_URL to the final address"),
                            status: code,
                        },
                    ),
                    408 | 429 => ("4xx", Attempt::Retry { reason: what, status: code, after }),
                    400..=499 => {
                        ("4xx", Attempt::GiveUp { reason: format!("{what}: refused by the receiver"), status: code })
                    }
                    500..=599 => ("5xx", Attempt::Retry { reason: what, status: code, after }),
                    _ => ("error", Attempt::GiveUp { reason: format!("{what}: unexpected status"), status: code }),
                }
            }
            Err(e) => {
                // without_url: the URL may carry credentials
                let e = e.without_url();
                if e.is_timeout() {
                    let reason = format!("no answer within {} ms (WEBHOOK_TIMEOUT_MS)", self.timeout.as_millis());
                    ("timeout", Attempt::Retry { reason, status: None, after: None })
                } else if e.is_connect() {
                    (
                        "connect",
                        Attempt::Retry { reason: format!("cannot connect: {}", chain(&e)), status: None, after: None },
                    )
                } else {
                    (
                        "error",
                        Attempt::Retry { reason: format!("request failed: {}", chain(&e)), status: None, after: None },
                    )
                }
            }
        };
        self.metrics.webhook_attempt_duration.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// Puts a webhook given up on into the dead-letter stream (a few tries; if Redis cannot take
    /// it, it is logged in full and counted as `lost`).
    async fn dead_letter(&self, job: &Job, body: &[u8], attempts: u32, status: Option<u16>, reason: &str) {
        self.metrics.webhook_queue.dec();
        let l = &job.list;
        let fields = [
            ("delivery_id", job.delivery_id.clone()),
            ("event", EVENT.to_string()),
            ("user_id", l.user_id.clone()),
            ("source", l.origin.as_str().to_string()),
            ("attempts", attempts.to_string()),
            ("status", status.map(|s| s.to_string()).unwrap_or_default()),
            ("reason", reason.to_string()),
            ("failed_at_ms", now_ms().to_string()),
            ("payload", String::from_utf8_lossy(body).into_owned()),
        ];
        for n in 1..=3u64 {
            match self.store.append_to_stream(&self.dead_stream, self.dead_maxlen, &fields).await {
                Ok(()) => {
                    self.metrics.webhook_deliveries.with_label_values(&["dead_lettered"]).inc();
                    tracing::warn!(delivery_id = %job.delivery_id, user_id = %l.user_id, attempts, reason,
                        stream = %self.dead_stream, "webhook dead-lettered");
                    return;
                }
                Err(e) if n < 3 => {
                    tracing::debug!(error = %e, "writing a webhook dead letter failed, trying again");
                    tokio::time::sleep(Duration::from_millis(500 * n)).await;
                }
                Err(e) => {
                    self.metrics.webhook_deliveries.with_label_values(&["lost"]).inc();
                    tracing::error!(delivery_id = %job.delivery_id, user_id = %l.user_id, attempts, reason,
                        error = %e, payload = %String::from_utf8_lossy(body),
                        "webhook given up on and its dead letter could not be written");
                }
            }
        }
    }
}

/// Returns once the drain time is over.
async fn aborted(phase: &mut watch::Receiver<Phase>) {
    let _ = phase.wait_for(|p| *p == Phase::Abort).await;
}

/// A Retry-After in seconds (the HTTP-date form is not honoured).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let v = response.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The start of the receiver's answer, for the dead-letter reason (at most 64 KiB is read, so the
/// connection can be reused; 200 characters are kept).
async fn answer_snippet(mut response: reqwest::Response) -> String {
    let mut kept = Vec::new();
    let mut read = 0usize;
    while let Ok(Some(chunk)) = response.chunk().await {
        read += chunk.len();
        if kept.len() < 200 {
            kept.extend_from_slice(&chunk[..chunk.len().min(200 - kept.len())]);
        }
        if read > 64 * 1024 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&kept);
    let text: String = text.chars().filter(|c| !c.is_control()).collect();
    if text.trim().is_empty() {
        String::new()
    } else {
        format!(" ({})", text.trim())
    }
}

/// An error with its causes ("connection refused" is the source of reqwest's "error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        // The same value as Python's hmac.new(b"secret", b"1700000000.{}", hashlib.sha256).hexdigest()
        assert_eq!(
            sign(b"secret", 1_700_000_000, b"{}"),
            "b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
        let body = br#"{"event":"recommendations.updated"}"#;
        let sig = format!("sha256={}", sign(b"0123456789abcdef", 1_700_000_000, body));
        let now = 1_700_000_100;
        assert_eq!(verify(b"0123456789abcdef", "1700000000", &sig, body, now, TOLERANCE_SECS), Ok(()));
        let tampered = br#"{"event":"recommendations.updatee"}"#;
        assert_eq!(
            verify(b"0123456789abcdef", "1700000000", &sig, tampered, now, TOLERANCE_SECS),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            verify(b"0123456789abcdef", "1700000000", &sig, body, now + 301, TOLERANCE_SECS),
            Err(Refused::Stale)
        );
        // a replayed body with a fresh timestamp does not match the old signature
        assert_eq!(
            verify(b"0123456789abcdef", "1700000200", &sig, body, now, TOLERANCE_SECS),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            verify(b"other-secret-0000", "1700000000", &sig, body, now, TOLERANCE_SECS),
            Err(Refused::BadSignature)
        );
        assert_eq!(verify(b"0123456789abcdef", "x", &sig, body, now, TOLERANCE_SECS), Err(Refused::BadTimestamp));
        assert_eq!(
            verify(b"0123456789abcdef", "1700000000", "md5=00", body, now, TOLERANCE_SECS),
            Err(Refused::BadSignature)
        );
    }

    #[test]
    fn secrets_are_redacted_and_settings_checked() {
        let secret: Secret = "super-secret-value-123".parse().unwrap();
        assert!(!format!("{secret:?}").contains("super"));
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            w: WebhookArgs,
        }
        let parse = |args: &[&str]| T::try_parse_from(std::iter::once("t").chain(args.iter().copied())).unwrap().w;
        assert!(parse(&[]).validate().is_ok());
        assert!(parse(&["--webhook-url", ""]).url().is_none());
        assert!(parse(&["--webhook-url", "http://h/x"]).validate().is_err(), "a secret is required");
        assert!(parse(&["--webhook-url", "http://h/x", "--webhook-secret", "short"]).validate().is_err());
        assert!(parse(&["--webhook-url", "ftp://h/x", "--webhook-secret", "0123456789abcdef"]).validate().is_err());
        let ok = parse(&["--webhook-url", "https://h/x", "--webhook-secret", "0123456789abcdef"]);
        assert!(ok.validate().is_ok());
        assert_eq!(ok.webhook_events, vec![WebhookEvents::Recomputed]);
        let both = parse(&["--webhook-events", "recomputed,requests"]);
        assert_eq!(both.webhook_events, vec![WebhookEvents::Recomputed, WebhookEvents::Requests]);
    }
}
