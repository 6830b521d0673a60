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
//! What `/health` reports of it is `crate::service::ingest_health::DeadLetterHealth`.

use std::io::Write as _;
use std::path::Path;

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
}
