//! The Kafka clients (rdkafka over the librdkafka it bundles): the consumer in its group, the
//! dead-letter producer, their settings, and the context that turns librdkafka's statistics into
//! the per-partition lag metric and its log lines into ours.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};

use super::settings::IngestArgs;
use super::IngestError;
use crate::kafka::KafkaArgs;
use crate::metrics::Metrics;

/// The consumer's context: lag per partition from librdkafka's statistics, rebalance and commit
/// logs, librdkafka's own log lines through `tracing`.
pub struct IngestContext {
    metrics: Metrics,
    topic: String,
    /// Partitions assigned to this consumer now (the lag gauge is kept for these only).
    assigned: Mutex<Vec<i32>>,
    /// The last error librdkafka reported, to log a repeated one once (a broker outage repeats
    /// the same error every reconnection attempt).
    last_error: Mutex<Option<String>>,
    pub lag: Arc<Mutex<HashMap<i32, i64>>>,
}

impl IngestContext {
    fn new(metrics: Metrics, topic: &str) -> Self {
        Self {
            metrics,
            topic: topic.into(),
            assigned: Mutex::new(Vec::new()),
            last_error: Mutex::new(None),
            lag: Arc::default(),
        }
    }

    /// Forgets the error logged last (called once messages flow again).
    pub fn clear_error(&self) {
        if self.last_error.lock().unwrap_or_else(|p| p.into_inner()).take().is_some() {
            tracing::info!("kafka: the brokers answer again");
        }
    }
}

impl ClientContext for IngestContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {message}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        let assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        lag.clear();
        self.metrics.ingest_consumer_lag.reset();
        let Some(topic) = statistics.topics.get(&self.topic) else { return };
        for (partition, p) in &topic.partitions {
            // -1 is librdkafka's internal "unassigned" partition; a lag of -1 is unknown.
            if *partition < 0 || !assigned.contains(partition) || p.consumer_lag < 0 {
                continue;
            }
            lag.insert(*partition, p.consumer_lag);
            self.metrics
                .ingest_consumer_lag
                .with_label_values(&[self.topic.as_str(), &partition.to_string()])
                .set(p.consumer_lag);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let text = format!("{error}: {reason}");
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() != Some(text.as_str()) {
            tracing::warn!(error = %text, "kafka client error; librdkafka reconnects by itself");
            *last = Some(text);
        }
    }
}

impl ConsumerContext for IngestContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        match rebalance {
            Rebalance::Assign(tpl) => {
                *assigned = tpl.elements().iter().map(|e| e.partition()).collect();
                assigned.sort_unstable();
                tracing::info!(topic = %self.topic, partitions = ?*assigned, "kafka: partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                assigned.retain(|p| !revoked.contains(p));
                tracing::info!(topic = %self.topic, partitions = ?revoked, "kafka: partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "kafka: rebalance failed"),
        }
        self.metrics.ingest_assigned_partitions.set(assigned.len() as i64);
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            // A later commit covers the same offsets; after a rebalance the new owner replays
            // (and skips) what was not committed.
            tracing::debug!(error = %e, offsets = ?offsets.elements().len(), "kafka: offset commit failed");
        }
    }
}

pub type Consumer = StreamConsumer<IngestContext>;

/// The consumer in KAFKA_GROUP, subscribed to KAFKA_TOPIC. Offsets are committed by the
/// ingestion only (after the Redis write), never automatically; a group without a committed
/// offset starts at the earliest event.
pub fn consumer(kafka: &KafkaArgs, args: &IngestArgs, metrics: Metrics) -> Result<Consumer, IngestError> {
    let consumer: Consumer = kafka
        .client_config()
        .set("group.id", &args.kafka_group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "1000")
        .create_with_context(IngestContext::new(metrics, &args.kafka_topic))
        .map_err(IngestError::Kafka)?;
    rdkafka::consumer::Consumer::subscribe(&consumer, &[args.kafka_topic.as_str()]).map_err(IngestError::Kafka)?;
    Ok(consumer)
}

/// The producer of dead letters, acknowledged by all in-sync replicas before the source offset is
/// committed (at least once: a dead letter may be written again after a crash).
pub fn dead_letter_producer(kafka: &KafkaArgs) -> Result<FutureProducer, IngestError> {
    kafka.client_config().set("acks", "all").set("message.timeout.ms", "10000").create().map_err(IngestError::Kafka)
}
