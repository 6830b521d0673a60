//! When a malformed event cannot be written to KAFKA_DEAD_LETTER_TOPIC. Ingestion must go on past
//! any single event: a batch that cannot be committed stops its partitions for good (a restart
//! meets the same message). So a refusal that will not change by retrying (the topic does not
//! exist, the message is too large for the producer or the brokers, no authorization, an invalid
//! record) sends the event at once to the local dead-letter file, INGEST_DEAD_LETTER_FILE; a
//! transient failure (a timeout, the brokers away) is retried with the batch, at most
//! `MAX_ATTEMPTS` times, then goes the same way. Without a file (or when writing it fails) the
//! event is logged at ERROR with its source and counted, and the batch is committed all the same.
//!
//! The file holds one JSON object per line, appended and synced before the batch commits:
//! `{"ts_ms", "source_topic", "source_partition", "source_offset", "key_base64", "payload_base64",
//! "reason", "dead_letter_topic", "dead_letter_error"}` (key and payload base64, standard alphabet
//! with padding, so that any bytes come back exactly; null when absent).
//!
//! `DeadLetterHealth` is what `/health` reports (`ingest_dead_letter`), shared through the Service.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Message as _;

/// Sends of one dead letter to the topic before a transient failure falls back too.
pub const MAX_ATTEMPTS: u32 = 3;

/// Why a send to the dead-letter topic failed, as the `reason` label of
/// `ingest_dead_letter_failures_total`, and whether retrying can help.
pub fn classify(e: &KafkaError) -> (&'static str, bool) {
    use RDKafkaErrorCode as C;
    let Some(code) = e.rdkafka_error_code() else { return ("transient", false) };
    match code {
        C::UnknownTopic | C::UnknownPartition | C::UnknownTopicOrPartition | C::UnknownTopicId | C::InvalidTopic => {
            ("unknown_topic", true)
        }
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => ("message_too_large", true),
        C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::Authentication
        | C::SaslAuthenticationFailed => ("authorization", true),
        C::InvalidRecord
        | C::InvalidMessage
        | C::BadMessage
        | C::InvalidTimestamp
        | C::PolicyViolation
        | C::InvalidRequiredAcks
        | C::UnsupportedForMessageFormat
        | C::UnsupportedCompressionType
        | C::InvalidArgument => ("invalid_record", true),
        _ => ("transient", false),
    }
}

/// The state `/health` reports: None while this process runs no ingestion.
#[derive(Default)]
pub struct DeadLetterHealth {
    state: Mutex<Option<State>>,
}

struct State {
    file: Option<PathBuf>,
    /// The last send to the topic failed with this; None once one succeeds.
    topic_error: Option<String>,
    /// The last write of the file failed with this; None once one succeeds.
    file_error: Option<String>,
}

impl DeadLetterHealth {
    fn with(&self, f: impl FnOnce(&mut State)) {
        if let Some(state) = self.state.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            f(state)
        }
    }

    /// The ingestion started, falling back to `file`.
    pub fn start(&self, file: Option<&Path>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(State { file: file.map(Path::to_path_buf), topic_error: None, file_error: None });
    }

    pub fn topic_ok(&self) {
        self.with(|s| s.topic_error = None);
    }

    pub fn topic_failed(&self, why: &str) {
        self.with(|s| s.topic_error = Some(why.to_string()));
    }

    pub fn file_written(&self, result: Result<(), &str>) {
        self.with(|s| s.file_error = result.err().map(str::to_string));
    }

    /// `ok`, or `failing: <why>; fallback: file <path>` (`fallback: none` without a file; the
    /// file's own error when writing it fails too). None without ingestion in this process.
    pub fn report(&self) -> Option<String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = state.as_ref()?;
        let Some(why) = &s.topic_error else { return Some("ok".into()) };
        let fallback = match (&s.file, &s.file_error) {
            (None, _) => "none (the events are only logged at ERROR)".to_string(),
            (Some(path), None) => format!("file {}", path.display()),
            (Some(path), Some(e)) => format!("file {} (failing too: {e}; the events are only logged)", path.display()),
        };
        Some(format!("failing: {why}; fallback: {fallback}"))
    }
}

/// One line of the dead-letter file.
pub fn record(m: &OwnedMessage, reason: &str, topic: &str, error: &str, ts_ms: u64) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    serde_json::json!({
        "ts_ms": ts_ms,
        "source_topic": m.topic(),
        "source_partition": m.partition(),
        "source_offset": m.offset(),
        "key_base64": m.key().map(b64),
        "payload_base64": m.payload().map(b64),
        "reason": reason,
        "dead_letter_topic": topic,
        "dead_letter_error": error,
    })
    .to_string()
}

/// Appends the lines to `path` (created if absent) and syncs them to disk.
pub fn append(path: &Path, lines: &[String]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut text = lines.join("\n");
    text.push('\n');
    file.write_all(text.as_bytes())?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_refusals_are_told_from_transient_failures() {
        let produce = KafkaError::MessageProduction;
        assert_eq!(classify(&produce(RDKafkaErrorCode::UnknownTopic)), ("unknown_topic", true));
        assert_eq!(classify(&produce(RDKafkaErrorCode::MessageSizeTooLarge)), ("message_too_large", true));
        assert_eq!(classify(&produce(RDKafkaErrorCode::TopicAuthorizationFailed)), ("authorization", true));
        assert_eq!(classify(&produce(RDKafkaErrorCode::InvalidRecord)), ("invalid_record", true));
        assert_eq!(classify(&produce(RDKafkaErrorCode::MessageTimedOut)), ("transient", false));
        assert_eq!(classify(&produce(RDKafkaErrorCode::AllBrokersDown)), ("transient", false));
        assert_eq!(classify(&KafkaError::Canceled), ("transient", false));
    }

    #[test]
    fn health_says_what_fails_and_where_the_events_go() {
        let h = DeadLetterHealth::default();
        assert_eq!(h.report(), None);
        h.start(Some(Path::new("/var/dead.jsonl")));
        assert_eq!(h.report().as_deref(), Some("ok"));
        h.topic_failed("Message production error: UnknownTopic");
        assert_eq!(
            h.report().as_deref(),
            Some("failing: Message production error: UnknownTopic; fallback: file /var/dead.jsonl")
        );
        h.topic_ok();
        assert_eq!(h.report().as_deref(), Some("ok"));
    }
}
