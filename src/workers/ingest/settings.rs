//! The Kafka ingestion's settings (its topics and group, `INGEST_*`): its section of the
//! configuration; the connection to the brokers is `crate::kafka::KafkaArgs`.

use std::path::PathBuf;

use clap::Args;

use crate::error::ConfigError;

/// Settings of the Kafka ingestion (`ingest`, `serve --ingest`, `listen --ingest`).
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Topic of behaviour events (JSON `{"event_id","user_id","item_id","event","ts"}`, keyed by
    /// user id so that one user's events stay in order).
    #[arg(long, env = "KAFKA_TOPIC", default_value = "user-behavior", global = true)]
    pub kafka_topic: String,
    /// Consumer group: the ingest instances of one deployment share the partitions.
    #[arg(long, env = "KAFKA_GROUP", default_value = "model-service-ingest", global = true)]
    pub kafka_group: String,
    /// Where malformed events go, with the reason in the `reason` header.
    #[arg(long, env = "KAFKA_DEAD_LETTER_TOPIC", default_value = "user-behavior-dead-letter", global = true)]
    pub kafka_dead_letter_topic: String,
    /// Local JSON-lines file for the malformed events the dead-letter topic refuses (it does not
    /// exist, the message is too large, no authorization...) or fails to take 3 times: appended and
    /// synced, then the batch is committed. Unset: such an event is only logged at ERROR (with its
    /// offset) and counted. Ingestion goes on either way.
    #[arg(long, env = "INGEST_DEAD_LETTER_FILE", global = true)]
    pub ingest_dead_letter_file: Option<PathBuf>,
    /// Event types that count as interactions (appended to the profile); others are counted as
    /// `ignored` and committed.
    #[arg(
        long,
        env = "INGEST_EVENT_TYPES",
        default_value = "view,cart,purchase",
        value_delimiter = ',',
        global = true
    )]
    pub ingest_event_types: Vec<String>,
    /// Most events taken from Kafka as one batch (applied to Redis, recomputed and committed together).
    #[arg(long, env = "INGEST_BATCH", default_value_t = 500, global = true)]
    pub ingest_batch: usize,
    /// Recent event ids remembered per user, so that an event a producer sent twice is applied
    /// once.
    #[arg(long, env = "INGEST_DEDUPE_IDS", default_value_t = 100, global = true)]
    pub ingest_dedupe_ids: usize,
    /// How long a user's remembered event ids are kept after the user's last event, in seconds.
    #[arg(long, env = "INGEST_DEDUPE_TTL_SECS", default_value_t = 7 * 86_400, global = true)]
    pub ingest_dedupe_ttl_secs: u64,
    /// Recommendations recomputed at once by the ingestion.
    #[arg(long, env = "INGEST_CONCURRENCY", default_value_t = 16, global = true)]
    pub ingest_concurrency: usize,
}

impl IngestArgs {
    /// The event types as a set, trimmed; empty entries dropped.
    pub fn event_types(&self) -> std::collections::HashSet<String> {
        self.ingest_event_types.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for (name, value) in [
            ("KAFKA_TOPIC", &self.kafka_topic),
            ("KAFKA_GROUP", &self.kafka_group),
            ("KAFKA_DEAD_LETTER_TOPIC", &self.kafka_dead_letter_topic),
        ] {
            if value.trim().is_empty() {
                return bad(format!("{name} must not be empty"));
            }
        }
        if self.kafka_dead_letter_topic == self.kafka_topic {
            return bad("KAFKA_DEAD_LETTER_TOPIC must differ from KAFKA_TOPIC".into());
        }
        if self.event_types().is_empty() {
            return bad("INGEST_EVENT_TYPES must name at least one event type".into());
        }
        for (name, value) in [
            ("INGEST_BATCH", self.ingest_batch),
            ("INGEST_DEDUPE_IDS", self.ingest_dedupe_ids),
            ("INGEST_CONCURRENCY", self.ingest_concurrency),
        ] {
            if value == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if self.ingest_dedupe_ttl_secs == 0 {
            return bad("INGEST_DEDUPE_TTL_SECS must be at least 1".into());
        }
        Ok(())
    }
}
