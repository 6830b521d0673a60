//! A behaviour event as it arrives from Kafka: JSON
//! `{"event_id": "...", "user_id": "...", "item_id": "...", "event": "view", "ts": 1700000000000}`
//! (`ts` in milliseconds since the epoch), parsed with every reason to refuse it.

use serde::Deserialize;

use crate::service::validate_user_id;

/// Longest item id and event id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Largest message read; a larger one is malformed (an event is ~150 bytes).
pub const MAX_EVENT_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub user_id: String,
    pub item_id: String,
    pub event: String,
    /// Milliseconds since the epoch when the event happened (freshness is measured from it).
    pub ts: u64,
}

/// Why an event cannot be applied; the text goes to the dead-letter topic's `reason` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the message has no value")]
    Empty,
    #[error("the message is {0} bytes, at most {MAX_EVENT_BYTES} are accepted")]
    TooLarge(usize),
    #[error("the message is not UTF-8 text")]
    NotUtf8,
    #[error("the message is not an event: {0}")]
    NotAnEvent(String),
    #[error("invalid {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
}

impl Event {
    pub fn parse(payload: Option<&[u8]>) -> Result<Self, EventError> {
        let bytes = payload.filter(|b| !b.is_empty()).ok_or(EventError::Empty)?;
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(EventError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| EventError::NotUtf8)?;
        let event: Event = serde_json::from_str(text).map_err(|e| EventError::NotAnEvent(e.to_string()))?;
        validate_user_id(&event.user_id)
            .map_err(|e| EventError::InvalidField { field: "user_id", reason: e.to_string() })?;
        for (field, value) in [("item_id", &event.item_id), ("event_id", &event.event_id), ("event", &event.event)] {
            check_id(field, value)?;
        }
        if event.ts == 0 {
            return Err(EventError::InvalidField {
                field: "ts",
                reason: "must be milliseconds since the epoch".into(),
            });
        }
        Ok(event)
    }
}

/// Item ids, event ids and event types: 1..=128 bytes, no whitespace or control characters.
fn check_id(field: &'static str, value: &str) -> Result<(), EventError> {
    let reason = if value.is_empty() {
        "empty".to_string()
    } else if value.len() > MAX_ID_BYTES {
        format!("{} bytes, at most {MAX_ID_BYTES}", value.len())
    } else if let Some(c) = value.chars().find(|c| c.is_whitespace() || c.is_control()) {
        format!("contains the character {c:?}")
    } else {
        return Ok(());
    };
    Err(EventError::InvalidField { field, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_event_parses() {
        let e = Event::parse(Some(
            br#"{"event_id":"e1","user_id":"A3RT","item_id":"0553092626","event":"view","ts":1700000000000}"#
                .as_slice(),
        ))
        .unwrap();
        assert_eq!((e.user_id.as_str(), e.item_id.as_str(), e.ts), ("A3RT", "0553092626", 1_700_000_000_000));
    }

    #[test]
    fn malformed_events_are_refused_with_a_reason() {
        let cases: [(Option<&[u8]>, &str); 9] = [
            (None, "no value"),
            (Some(b"not json".as_slice()), "not an event"),
            (Some(b"\xff\xfe".as_slice()), "not UTF-8"),
            (Some(br#"{"event_id":"e","user_id":"u","item_id":"i","event":"view"}"#.as_slice()), "missing field `ts`"),
            (Some(br#"{"event_id":"e","user_id":"u","item_id":5,"event":"view","ts":1}"#.as_slice()), "not an event"),
            (
                Some(br#"{"event_id":"e","user_id":"a b","item_id":"i","event":"view","ts":1}"#.as_slice()),
                "invalid user_id",
            ),
            (
                Some(br#"{"event_id":"e","user_id":"u","item_id":"","event":"view","ts":1}"#.as_slice()),
                "invalid item_id",
            ),
            (
                Some(br#"{"event_id":"","user_id":"u","item_id":"i","event":"view","ts":1}"#.as_slice()),
                "invalid event_id",
            ),
            (
                Some(br#"{"event_id":"e","user_id":"u","item_id":"i","event":"view","ts":-5}"#.as_slice()),
                "not an event",
            ),
        ];
        for (payload, want) in cases {
            let err = Event::parse(payload).unwrap_err().to_string();
            assert!(err.contains(want), "{payload:?}: {err}");
        }
        let large = vec![b' '; MAX_EVENT_BYTES + 1];
        assert!(matches!(Event::parse(Some(large.as_slice())), Err(EventError::TooLarge(_))));
    }
}
