//! The health of the ingestion's dead-letter path, as `/health` reports it (`ingest_dead_letter`):
//! the ingestion writes it, the service shows it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

#[cfg(test)]
mod tests {
    use super::*;

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
