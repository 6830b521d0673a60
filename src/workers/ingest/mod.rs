//! Behaviour events from Kafka: the streaming ingestion path. A consumer in the group KAFKA_GROUP
//! reads KAFKA_TOPIC in batches; each batch is
//!
//! 1. parsed: a malformed event is sent to KAFKA_DEAD_LETTER_TOPIC with the reason (or, when the
//!    topic refuses it, to INGEST_DEAD_LETTER_FILE: see `dead_letter`), an event whose type is not
//!    in INGEST_EVENT_TYPES is counted as ignored;
//! 2. applied to Redis, one script per user with that user's events in order (`redis::ingest`):
//!    each item moves to the end of `user_profile:<user_id>`, deduplicated, capped, idempotent by
//!    the user's offset watermark and by event id;
//! 3. recomputed: every user of the batch goes through `Service::refresh`, the listener's path
//!    (no second ranking path; a list already computed from the current profile is skipped);
//! 4. committed: the batch's offsets, only after 2 and 3 (and the dead letters) are done.
//!
//! A failed step (Redis or the brokers away) retries the whole batch with backoff: applying it
//! again changes nothing that was applied, so delivery is at least once and the effect on the
//! profiles exactly once. No single event can hold a batch back for good: a dead letter the topic
//! refuses, or fails to take `dead_letter::MAX_ATTEMPTS` times, goes to the file (or the log).
//! SIGTERM finishes the batch in hand, commits synchronously and returns.

pub mod dead_letter;
pub mod event;
pub mod kafka;
pub mod settings;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::error::Error;
use crate::redis::ingest::{Append, AppendLimits, Applied};
use crate::redis::store::ProfileLimits;
use crate::service::{Refresh, Service};
use event::{Event, EventError};
use settings::IngestArgs;

use crate::kafka::KafkaArgs;

/// How long a batch waits for more events after its first one.
const BATCH_WAIT: Duration = Duration::from_millis(20);
/// Backoff between attempts at a failed batch, and after a failed read.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("kafka: {0}")]
    Kafka(#[source] KafkaError),
    #[error("dead-letter topic: {0}")]
    DeadLetter(String),
    #[error(transparent)]
    Service(#[from] Error),
}

/// What happened to one message, for the metrics (counted once the batch is done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    Duplicate,
    Ignored,
    DeadLettered,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Ignored => "ignored",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// What earlier attempts at a batch did, so that a retried batch counts each message once and
/// does not dead-letter it twice.
#[derive(Default)]
struct Progress {
    outcomes: HashMap<(i32, i64), Outcome>,
    /// Sends of a message's dead letter to the topic that failed (transiently).
    dead_letter_failures: HashMap<(i32, i64), u32>,
    /// Events the append script refused, with the reason: a retried attempt dead-letters them
    /// without applying them again (the script may since see their offset as applied).
    refused: HashMap<(i32, i64), String>,
}

pub struct Ingest {
    service: Arc<Service>,
    kafka: KafkaArgs,
    args: IngestArgs,
    limits: AppendLimits,
    event_types: HashSet<String>,
    grace: Duration,
}

impl Ingest {
    pub fn new(
        service: Arc<Service>,
        kafka: KafkaArgs,
        args: IngestArgs,
        limits: AppendLimits,
        grace: Duration,
    ) -> Arc<Self> {
        let event_types = args.event_types();
        Arc::new(Self { service, kafka, args, limits, event_types, grace })
    }

    fn count(&self, outcome: &str, n: u64) {
        if n > 0 {
            self.service.metrics.ingest_events.with_label_values(&[outcome]).inc_by(n);
        }
    }

    /// Runs until `shutdown` turns true; then finishes the batch in hand (within the grace
    /// period), commits what is done synchronously and returns.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        self.service.engine.ready().await?;
        let consumer = kafka::consumer(&self.kafka, &self.args, self.service.metrics.clone())?;
        let producer = kafka::dead_letter_producer(&self.kafka)?;
        self.service.ingest_dead_letter.start(self.args.ingest_dead_letter_file.as_deref());
        self.service.metrics.ingest_dead_letter_failing.set(0);
        tracing::info!(brokers = %self.kafka.kafka_brokers, topic = %self.args.kafka_topic,
            group = %self.args.kafka_group, "ingest started");
        // partition -> the next offset to commit (the last processed + 1)
        let mut done: HashMap<i32, i64> = HashMap::new();
        loop {
            let batch = tokio::select! {
                batch = self.next_batch(&consumer) => batch,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            self.count("received", batch.len() as u64);
            let mut progress = Progress::default();
            let mut backoff = MIN_BACKOFF;
            let finished = loop {
                let attempt = self.process(&batch, &producer, &mut progress);
                let result = if *shutdown.borrow() {
                    tokio::time::timeout(self.grace, attempt)
                        .await
                        .unwrap_or_else(|_| Err(IngestError::Service(Error::Internal("the grace period ended".into()))))
                } else {
                    attempt.await
                };
                match result {
                    Ok(()) => break true,
                    Err(e) => {
                        self.count("retried", batch.len() as u64);
                        tracing::warn!(error = %e, events = batch.len(), retry_in = ?backoff,
                            "ingest batch failed; retrying it (applying it again is idempotent)");
                        if *shutdown.borrow() {
                            break false;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.wait_for(|s| *s) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            };
            if !finished {
                tracing::warn!("stopping with a batch not done: it is not committed and will be delivered again");
                break;
            }
            for (outcome, n) in progress.counts() {
                self.count(outcome, n);
            }
            for m in &batch {
                let next = done.entry(m.partition()).or_insert(0);
                *next = (*next).max(m.offset() + 1);
            }
            self.commit(&consumer, &mut done, CommitMode::Async);
            if *shutdown.borrow() {
                break;
            }
        }
        self.commit(&consumer, &mut done, CommitMode::Sync);
        tracing::info!("ingest stopped");
        Ok(())
    }

    /// Commits the processed offsets of the partitions this consumer still owns (a revoked
    /// partition's new owner commits its own; committing ours could move it backwards).
    fn commit(&self, consumer: &kafka::Consumer, done: &mut HashMap<i32, i64>, mode: CommitMode) {
        let owned: HashSet<i32> =
            consumer.assignment().map(|tpl| tpl.elements().iter().map(|e| e.partition()).collect()).unwrap_or_default();
        done.retain(|p, _| owned.contains(p));
        if done.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (&partition, &next) in done.iter() {
            if let Err(e) = tpl.add_partition_offset(&self.args.kafka_topic, partition, Offset::Offset(next)) {
                tracing::warn!(error = %e, partition, "cannot build the offset commit");
            }
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                if matches!(mode, CommitMode::Sync) {
                    tracing::info!(offsets = ?done, "ingest: offsets committed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "ingest: committing offsets failed; a later commit covers them"),
        }
    }

    /// The next batch: waits for one message (a failed read backs off, never spins), then takes
    /// what arrives within BATCH_WAIT, up to INGEST_BATCH.
    async fn next_batch(&self, consumer: &kafka::Consumer) -> Vec<OwnedMessage> {
        let mut backoff = MIN_BACKOFF;
        let first = loop {
            match consumer.recv().await {
                Ok(m) => break m.detach(),
                Err(e) => {
                    tracing::debug!(error = %e, "kafka read failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        consumer.context().clear_error();
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < self.args.ingest_batch {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                Ok(Err(_)) | Err(_) => break,
            }
        }
        batch
    }

    /// One attempt at a batch: dead letters, the Redis appends, the recomputations. Returns an
    /// error when any step must be tried again.
    async fn process(
        &self,
        batch: &[OwnedMessage],
        producer: &FutureProducer,
        progress: &mut Progress,
    ) -> Result<(), IngestError> {
        let mut dead: Vec<(&OwnedMessage, String)> = Vec::new();
        let mut events: Vec<(&OwnedMessage, Event)> = Vec::new();
        for m in batch {
            let key = (m.partition(), m.offset());
            if progress.outcomes.get(&key) == Some(&Outcome::DeadLettered) {
                continue;
            }
            if let Some(why) = progress.refused.get(&key) {
                dead.push((m, why.clone()));
                continue;
            }
            match Event::parse(m.payload()) {
                Ok(e) if !self.event_types.contains(&e.event) => {
                    progress.outcomes.insert(key, Outcome::Ignored);
                }
                Ok(e) => events.push((m, e)),
                Err(e) => dead.push((m, reason(&e))),
            }
        }
        let mut appends: Vec<(Append<'_>, u64)> = Vec::new();
        for (m, e) in &events {
            let append = Append {
                user_id: &e.user_id,
                item_id: &e.item_id,
                event_id: &e.event_id,
                partition: m.partition(),
                offset: m.offset(),
            };
            appends.push((append, e.ts));
        }
        let just: Vec<Append<'_>> = appends.iter().map(|(a, _)| a.clone()).collect();
        let applied =
            self.service.store.append_events(&self.args.kafka_topic, &just, self.limits).await.map_err(Error::from)?;
        let set = self.service.engine.current();
        // user -> timestamps of the events applied to it (by this batch, any attempt)
        let mut users: HashMap<&str, Vec<u64>> = HashMap::new();
        for ((append, ts), result) in appends.iter().zip(applied) {
            let key = (append.partition, append.offset);
            let mut refused = None;
            match result {
                Applied::Appended { .. } => {
                    progress.outcomes.insert(key, Outcome::Applied);
                    if set.as_ref().is_some_and(|l| l.primary().set.catalog.row(append.item_id).is_none()) {
                        self.service.metrics.ingest_unknown_items.inc();
                    }
                    users.entry(append.user_id).or_default().push(*ts);
                }
                Applied::DuplicateOffset | Applied::DuplicateEvent => {
                    let was_applied = progress.outcomes.get(&key) == Some(&Outcome::Applied);
                    if !was_applied {
                        progress.outcomes.insert(key, Outcome::Duplicate);
                    }
                    let stamps = users.entry(append.user_id).or_default();
                    if was_applied {
                        stamps.push(*ts);
                    }
                }
                Applied::BadProfile(why) => refused = Some(format!("profile: {why}")),
                Applied::Refused(why) => refused = Some(why),
            }
            if let Some(why) = refused {
                let m = batch.iter().find(|m| (m.partition(), m.offset()) == key).expect("from the batch");
                progress.refused.insert(key, why.clone());
                dead.push((m, why));
            }
        }
        self.dead_letter(&dead, producer, progress).await?;
        self.recompute(users).await
    }

    /// Sends the malformed events to the dead-letter topic (the original key and value, the
    /// reason and the source in headers) and waits for the brokers' acknowledgement. A refusal
    /// that retrying cannot change, or a transient failure for the `MAX_ATTEMPTS`th time, sends
    /// the event to the dead-letter file instead (or only to the log); other failures fail the
    /// attempt (the batch is retried).
    async fn dead_letter(
        &self,
        dead: &[(&OwnedMessage, String)],
        producer: &FutureProducer,
        progress: &mut Progress,
    ) -> Result<(), IngestError> {
        let sends = dead.iter().map(|(m, why)| async move {
            let partition = m.partition().to_string();
            let offset = m.offset().to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: "reason", value: Some(why.as_bytes()) })
                .insert(Header { key: "source_topic", value: Some(m.topic().as_bytes()) })
                .insert(Header { key: "source_partition", value: Some(partition.as_bytes()) })
                .insert(Header { key: "source_offset", value: Some(offset.as_bytes()) });
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.args.kafka_dead_letter_topic).headers(headers);
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            if let Some(payload) = m.payload() {
                record = record.payload(payload);
            }
            let sent = producer.send(record, Duration::from_secs(5)).await;
            (*m, why, sent.map(|_| ()).map_err(|(e, _)| e))
        });
        let health = &self.service.ingest_dead_letter;
        let metrics = &self.service.metrics;
        let mut failed = None;
        let mut fallback: Vec<(&OwnedMessage, &String, String)> = Vec::new();
        for (m, why, sent) in futures_util::future::join_all(sends).await {
            let key = (m.partition(), m.offset());
            match sent {
                Ok(()) => {
                    progress.outcomes.insert(key, Outcome::DeadLettered);
                    health.topic_ok();
                    metrics.ingest_dead_letter_failing.set(0);
                    tracing::warn!(partition = key.0, offset = key.1, reason = %why, "event dead-lettered");
                }
                Err(e) => {
                    let (label, permanent) = dead_letter::classify(&e);
                    metrics.ingest_dead_letter_failures.with_label_values(&[label]).inc();
                    metrics.ingest_dead_letter_failing.set(1);
                    health.topic_failed(&e.to_string());
                    let attempts = progress.dead_letter_failures.entry(key).or_default();
                    *attempts += 1;
                    if permanent || *attempts >= dead_letter::MAX_ATTEMPTS {
                        let error = if permanent { e.to_string() } else { format!("{e} ({attempts} attempts)") };
                        fallback.push((m, why, error));
                    } else {
                        tracing::warn!(partition = key.0, offset = key.1, error = %e, attempts = *attempts,
                            "sending a dead letter failed; retrying the batch");
                        failed = Some(e);
                    }
                }
            }
        }
        if !fallback.is_empty() {
            self.dead_letter_locally(&fallback).await;
            for (m, _, _) in &fallback {
                progress.outcomes.insert((m.partition(), m.offset()), Outcome::DeadLettered);
            }
        }
        match failed {
            Some(e) => Err(IngestError::DeadLetter(e.to_string())),
            None => Ok(()),
        }
    }

    /// The dead letters the topic would not take: appended to INGEST_DEAD_LETTER_FILE, or, without
    /// one or when writing it fails, logged at ERROR. Either way they count as done.
    async fn dead_letter_locally(&self, letters: &[(&OwnedMessage, &String, String)]) {
        let topic = &self.args.kafka_dead_letter_topic;
        let metrics = &self.service.metrics;
        let written = match &self.args.ingest_dead_letter_file {
            Some(path) => {
                let now = now_ms();
                let lines: Vec<String> =
                    letters.iter().map(|(m, why, error)| dead_letter::record(m, why, topic, error, now)).collect();
                let path = path.clone();
                let result = tokio::task::spawn_blocking(move || dead_letter::append(&path, &lines))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                    .map_err(|e| e.to_string());
                self.service.ingest_dead_letter.file_written(result.as_ref().map(|_| ()).map_err(String::as_str));
                result
            }
            None => Err("INGEST_DEAD_LETTER_FILE is not set".to_string()),
        };
        for (m, why, error) in letters {
            let (partition, offset) = (m.partition(), m.offset());
            match &written {
                Ok(()) => {
                    metrics.ingest_dead_letter_fallbacks.with_label_values(&["file"]).inc();
                    tracing::warn!(partition, offset, reason = %why, dead_letter_error = %error,
                        "event dead-lettered to the dead-letter file: the dead-letter topic did not take it");
                }
                Err(file_error) => {
                    metrics.ingest_dead_letter_fallbacks.with_label_values(&["log"]).inc();
                    let payload = m.payload().unwrap_or_default();
                    tracing::error!(source_topic = %m.topic(), partition, offset, reason = %why,
                        dead_letter_error = %error, %file_error, payload_bytes = payload.len(),
                        payload = %String::from_utf8_lossy(&payload[..payload.len().min(1024)]),
                        "an event could not be dead-lettered (neither the topic nor the file took it); \
                         it is skipped and recorded only in this line");
                }
            }
        }
    }

    /// Recomputes every user of the batch through the service (skipped when the stored list is
    /// already computed from the current profile) and records the freshness of the applied
    /// events. A transient failure fails the attempt (retried); a profile that cannot be ranked
    /// is logged and left (the API answers 422 for it too).
    async fn recompute(&self, users: HashMap<&str, Vec<u64>>) -> Result<(), IngestError> {
        let concurrency = self.args.ingest_concurrency.max(1);
        let results: Vec<_> = futures_util::stream::iter(users)
            .map(|(user, stamps)| async move {
                (user, stamps, self.service.refresh_from(user, crate::webhook::Origin::Ingest).await)
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut transient = None;
        for (user, stamps, result) in results {
            match result {
                Ok(Refresh::Written | Refresh::Unchanged) => {
                    let now = now_ms();
                    for ts in stamps {
                        self.service.metrics.ingest_freshness.observe(now.saturating_sub(ts) as f64 / 1e3);
                    }
                }
                // the profile changed meanwhile: its writer's recomputation follows
                Ok(Refresh::Superseded) => {}
                Err(e) if e.is_permanent() => {
                    tracing::warn!(%user, error = %e, "the profile cannot be ranked; its events are applied");
                }
                Err(e) => transient = Some(e),
            }
        }
        match transient {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

impl Progress {
    fn counts(&self) -> Vec<(&'static str, u64)> {
        let mut counts: HashMap<&'static str, u64> = HashMap::new();
        for outcome in self.outcomes.values() {
            *counts.entry(outcome.label()).or_default() += 1;
        }
        counts.into_iter().collect()
    }
}

fn reason(e: &EventError) -> String {
    e.to_string()
}

/// The append's bounds: the profile caps the service reads with, and the event-id memory.
pub fn limits(args: &IngestArgs, profile: ProfileLimits) -> AppendLimits {
    AppendLimits {
        max_items: profile.max_items,
        max_bytes: profile.max_bytes,
        dedupe_ids: args.ingest_dedupe_ids,
        dedupe_ttl_secs: args.ingest_dedupe_ttl_secs,
    }
}
