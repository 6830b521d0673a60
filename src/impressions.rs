//! Impressions: one record per list served to a shopper (every 200 answer of
//! `POST /recommend/{user_id}` and `GET /recommendations/{user_id}`), so that what was shown can be
//! joined later with what was bought (`model_service_py.experiment_report`, docs/impressions.md).
//!
//! Off the request path: `Impressions::log` only puts the record on a bounded buffer (full: dropped
//! and counted, never waiting). One writer task drains it in batches to the sink: the Redis stream
//! `IMPRESSIONS_STREAM` (one pipeline of `XADD ... MAXLEN ~` per batch) or the Kafka topic
//! `IMPRESSIONS_TOPIC` (JSON, keyed by user id). A sink that fails drops the batch, counted; an
//! answer never fails or waits for it.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::clock::{now_ms, Throttle};
use crate::error::ConfigError;
use crate::kafka::KafkaArgs;
use crate::metrics::Metrics;
use crate::redis::Store;

/// Where impressions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sink {
    /// Nowhere.
    Off,
    /// The Redis stream IMPRESSIONS_STREAM, on the service's Redis.
    Redis,
    /// The Kafka topic IMPRESSIONS_TOPIC on KAFKA_BROKERS.
    Kafka,
}

/// Impression settings (flattened into the configuration).
#[derive(Debug, Clone, Args)]
pub struct ImpressionsArgs {
    /// Where each served list is logged: off, redis (stream IMPRESSIONS_STREAM) or kafka (topic
    /// IMPRESSIONS_TOPIC on KAFKA_BROKERS).
    #[arg(long, env = "IMPRESSIONS", value_enum, default_value = "off", global = true)]
    pub impressions: Sink,
    /// Redis stream of impressions (IMPRESSIONS=redis).
    #[arg(long, env = "IMPRESSIONS_STREAM", default_value = "recommendation_impressions", global = true)]
    pub impressions_stream: String,
    /// The stream keeps about its newest this many entries (approximate trimming).
    #[arg(long, env = "IMPRESSIONS_MAXLEN", default_value_t = 1_000_000, global = true)]
    pub impressions_maxlen: usize,
    /// Kafka topic of impressions (IMPRESSIONS=kafka).
    #[arg(long, env = "IMPRESSIONS_TOPIC", default_value = "recommendation-impressions", global = true)]
    pub impressions_topic: String,
    /// Impressions waiting for the sink; beyond, new ones are dropped (counted).
    #[arg(long, env = "IMPRESSIONS_BUFFER", default_value_t = 10_000, global = true)]
    pub impressions_buffer: usize,
}

impl ImpressionsArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.impressions_buffer == 0 {
            return bad("IMPRESSIONS_BUFFER must be at least 1");
        }
        if self.impressions_maxlen == 0 {
            return bad("IMPRESSIONS_MAXLEN must be at least 1");
        }
        if self.impressions == Sink::Redis && self.impressions_stream.trim().is_empty() {
            return bad("IMPRESSIONS_STREAM must not be empty");
        }
        if self.impressions == Sink::Kafka && self.impressions_topic.trim().is_empty() {
            return bad("IMPRESSIONS_TOPIC must not be empty");
        }
        Ok(())
    }
}

/// One list shown (or, for a shadow computation, computed and not shown).
#[derive(Debug, Clone, Serialize)]
pub struct Impression {
    pub request_id: String,
    pub user_id: String,
    pub variant: String,
    pub model_version: String,
    /// The item ids in served order.
    pub items: Vec<String>,
    /// `computed` (ranked for this request) or `cache` (the stored list, cache-first GET).
    pub source: &'static str,
    pub served: bool,
    pub ts_ms: u64,
}

impl Impression {
    /// The stream entry's fields (`items` as a JSON array, `served` as `true`/`false`).
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("request_id", self.request_id.clone()),
            ("user_id", self.user_id.clone()),
            ("variant", self.variant.clone()),
            ("model_version", self.model_version.clone()),
            ("items", serde_json::to_string(&self.items).unwrap_or_else(|_| "[]".into())),
            ("source", self.source.to_string()),
            ("served", self.served.to_string()),
            ("ts_ms", self.ts_ms.to_string()),
        ]
    }
}

/// The handle the service holds: cheap to clone; a disabled one does nothing.
#[derive(Clone, Default)]
pub struct Impressions {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: mpsc::Sender<Impression>,
    metrics: Metrics,
    /// The "buffer full" warning: one a second at most.
    full_warning: Throttle,
}

/// The most impressions written in one round trip.
const BATCH: usize = 256;

impl Impressions {
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the writer task for IMPRESSIONS (within a tokio runtime); `store` is the Redis client
    /// it writes the stream with (its own, so its writes never queue behind the request path's).
    pub fn start(args: &ImpressionsArgs, kafka: &KafkaArgs, store: Store, metrics: Metrics) -> anyhow::Result<Self> {
        let sink = match args.impressions {
            Sink::Off => return Ok(Self::disabled()),
            Sink::Redis => {
                Writer::Redis { store, stream: args.impressions_stream.clone(), maxlen: args.impressions_maxlen }
            }
            Sink::Kafka => {
                let producer: FutureProducer = kafka
                    .client_config()
                    // an impression not delivered within 5 s is dropped (counted), never retried later
                    .set("message.timeout.ms", "5000")
                    .set("linger.ms", "5")
                    .create()?;
                Writer::Kafka { producer, topic: args.impressions_topic.clone() }
            }
        };
        let (tx, rx) = mpsc::channel(args.impressions_buffer);
        tokio::spawn(write(rx, sink, metrics.clone()));
        tracing::info!(sink = ?args.impressions, "impressions are logged");
        Ok(Self { inner: Some(Arc::new(Inner { tx, metrics, full_warning: Throttle::new(1000) })) })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues one impression; never waits (a full buffer drops it, counted).
    pub fn log(&self, impression: Impression) {
        let Some(inner) = &self.inner else { return };
        match inner.tx.try_send(impression) {
            Ok(()) => inner.metrics.impressions_queue_depth.inc(),
            Err(_) => {
                inner.metrics.impressions.with_label_values(&["dropped_full"]).inc();
                if inner.full_warning.ready() {
                    tracing::warn!("the impressions buffer is full (IMPRESSIONS_BUFFER); impressions are dropped");
                }
            }
        }
    }
}

enum Writer {
    Redis { store: Store, stream: String, maxlen: usize },
    Kafka { producer: FutureProducer, topic: String },
}

/// The writer task: batches from the buffer to the sink until every handle is gone.
async fn write(mut rx: mpsc::Receiver<Impression>, sink: Writer, metrics: Metrics) {
    let mut batch = Vec::with_capacity(BATCH);
    let failure_warning = Throttle::new(10_000);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        metrics.impressions_queue_depth.sub(batch.len() as i64);
        let n = batch.len() as u64;
        let failed = match &sink {
            Writer::Redis { store, stream, maxlen } => {
                let entries: Vec<Vec<(&str, String)>> = batch.iter().map(Impression::fields).collect();
                match store.append_entries(stream, *maxlen, &entries).await {
                    Ok(()) => 0,
                    Err(e) => {
                        log_failure(&failure_warning, &e.to_string());
                        n
                    }
                }
            }
            Writer::Kafka { producer, topic } => send_to_kafka(producer, topic, &batch, &failure_warning).await,
        };
        metrics.impressions.with_label_values(&["written"]).inc_by(n - failed);
        metrics.impressions.with_label_values(&["dropped_sink"]).inc_by(failed);
        batch.clear();
    }
}

/// Sends a batch and waits for its deliveries (each bounded by `message.timeout.ms`); returns how
/// many failed.
async fn send_to_kafka(producer: &FutureProducer, topic: &str, batch: &[Impression], warning: &Throttle) -> u64 {
    let mut deliveries = Vec::with_capacity(batch.len());
    let mut failed = 0;
    for impression in batch {
        let payload = serde_json::to_vec(impression).unwrap_or_default();
        let record = FutureRecord::to(topic).key(impression.user_id.as_bytes()).payload(&payload);
        match producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((e, _)) => {
                log_failure(warning, &e.to_string());
                failed += 1;
            }
        }
    }
    for delivery in deliveries {
        match tokio::time::timeout(Duration::from_secs(10), delivery).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((e, _)))) => {
                log_failure(warning, &e.to_string());
                failed += 1;
            }
            _ => failed += 1,
        }
    }
    failed
}

fn log_failure(warning: &Throttle, why: &str) {
    if warning.ready() {
        tracing::warn!(error = %why, "writing impressions failed; they are dropped (impressions_total{{outcome=\"dropped_sink\"}})");
    }
}

/// An impression of an answer served now.
pub fn served(
    request_id: &str,
    user_id: &str,
    variant: &str,
    model_version: &str,
    items: Vec<String>,
    source: &'static str,
) -> Impression {
    Impression {
        request_id: request_id.to_string(),
        user_id: user_id.to_string(),
        variant: variant.to_string(),
        model_version: model_version.to_string(),
        items,
        source,
        served: true,
        ts_ms: now_ms(),
    }
}
