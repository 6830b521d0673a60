//! The Kafka ingestion's settings (`KAFKA_*`, `INGEST_*`): its section of the configuration.

use std::path::PathBuf;

use clap::Args;

use crate::error::ConfigError;

/// Settings of the Kafka ingestion (`ingest`, `serve --ingest`, `listen --ingest`).
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092", global = true)]
    pub kafka_brokers: String,
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
    /// plaintext | ssl | sasl_plaintext | sasl_ssl.
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", default_value = "plaintext", global = true)]
    pub kafka_security_protocol: String,
    /// PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 (with a sasl_* protocol).
    #[arg(long, env = "KAFKA_SASL_MECHANISM", global = true)]
    pub kafka_sasl_mechanism: Option<String>,
    #[arg(long, env = "KAFKA_SASL_USERNAME", global = true)]
    pub kafka_sasl_username: Option<String>,
    #[arg(long, env = "KAFKA_SASL_PASSWORD", hide_env_values = true, global = true)]
    pub kafka_sasl_password: Option<String>,
    /// PEM file of the CA(s) that sign the brokers' certificates (default: the system's roots).
    #[arg(long, env = "KAFKA_SSL_CA_LOCATION", global = true)]
    pub kafka_ssl_ca_location: Option<PathBuf>,
    /// PEM client certificate and key, for brokers that require them.
    #[arg(long, env = "KAFKA_SSL_CERTIFICATE_LOCATION", requires = "kafka_ssl_key_location", global = true)]
    pub kafka_ssl_certificate_location: Option<PathBuf>,
    #[arg(long, env = "KAFKA_SSL_KEY_LOCATION", requires = "kafka_ssl_certificate_location", global = true)]
    pub kafka_ssl_key_location: Option<PathBuf>,
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
            ("KAFKA_BROKERS", &self.kafka_brokers),
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
        let protocol = self.kafka_security_protocol.to_ascii_lowercase();
        if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&protocol.as_str()) {
            return bad(format!(
                "KAFKA_SECURITY_PROTOCOL must be plaintext, ssl, sasl_plaintext or sasl_ssl, got {:?}",
                self.kafka_security_protocol
            ));
        }
        if protocol.starts_with("sasl") {
            let mechanism = self.kafka_sasl_mechanism.as_deref().unwrap_or("");
            if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&mechanism) {
                return bad(format!(
                    "KAFKA_SASL_MECHANISM must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with {protocol}, got {mechanism:?}"
                ));
            }
            if self.kafka_sasl_username.is_none() || self.kafka_sasl_password.is_none() {
                return bad(format!("{protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"));
            }
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
