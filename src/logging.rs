//! The log's writer: every record on one line, whatever its fields hold. A field can carry text
//! from outside (a user id from a keyspace event or a stream entry, a Redis error, a path): a line
//! break in it would start a line that a log reader takes for a record of its own (a forged
//! `ERROR`). So line breaks and the other control characters inside a record are written escaped
//! (`\n`, `\r`, `\t`, `\u001b`, and U+2028/U+2029, which some readers also break on), for every
//! field and call site at once; the record's final newline stays. The escapes are valid JSON
//! escapes too: a `LOG_FORMAT=json` record (whose strings serde_json already escapes) stays valid.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Installs the log subscriber: `RUST_LOG` filters (default `model_service=info,warn`), one line
/// per record on stderr (control characters escaped), as text or as JSON objects.
pub fn init(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "model_service=info,warn".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(OneLine::new(std::io::stderr, ansi))
        // A log line that cannot be written is dropped. tracing-subscriber's default reports the
        // failure with eprintln!, which panics when stderr itself is the broken pipe (a log
        // collector that went away): the logging task or thread died, SIGTERM among them.
        .log_internal_errors(false);
    if json {
        logs.json().flatten_event(true).with_current_span(true).init()
    } else {
        logs.init()
    }
}

/// Makes the writers of `inner` escape control characters inside each record. With
/// `keep_ansi` (colours on a terminal) the escape character is kept.
pub struct OneLine<M> {
    inner: M,
    keep_ansi: bool,
}

impl<M> OneLine<M> {
    pub fn new(inner: M, keep_ansi: bool) -> Self {
        Self { inner, keep_ansi }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for OneLine<M> {
    type Writer = Escaping<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        Escaping { inner: self.inner.make_writer(), keep_ansi: self.keep_ansi }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        Escaping { inner: self.inner.make_writer_for(meta), keep_ansi: self.keep_ansi }
    }
}

/// A writer that receives whole records (tracing-subscriber writes each with one `write_all`).
pub struct Escaping<W> {
    inner: W,
    keep_ansi: bool,
}

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, record: &[u8]) -> io::Result<usize> {
        self.inner.write_all(&escape(record, self.keep_ansi))?;
        Ok(record.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn needs_escape(c: char, keep_ansi: bool) -> bool {
    (c.is_control() && !(keep_ansi && c == '\u{1b}')) || matches!(c, '\u{2028}' | '\u{2029}')
}

/// `record` with every control character except its final newline escaped.
pub fn escape(record: &[u8], keep_ansi: bool) -> Cow<'_, [u8]> {
    let text = String::from_utf8_lossy(record);
    let (body, end) = match text.strip_suffix('\n') {
        Some(body) => (body, "\n"),
        None => (&*text, ""),
    };
    if matches!(text, Cow::Borrowed(_)) && !body.chars().any(|c| needs_escape(c, keep_ansi)) {
        return Cow::Borrowed(record);
    }
    let mut out = String::with_capacity(record.len() + 16);
    for c in body.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c, keep_ansi) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push_str(end);
    Cow::Owned(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_stays_one_line_whatever_its_fields_hold() {
        let forged = "2026-01-01T00:00:00Z ERROR model_service: forged";
        let record = format!("2026-01-01T00:00:00Z  WARN model_service::listener: profile cannot be processed user=evil\n{forged}\r\n\u{1b}[2J\u{2028}x\n");
        let out = String::from_utf8(escape(record.as_bytes(), false).into_owned()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out:?}");
        assert!(out.ends_with("\\u2028x\n"), "{out:?}");
        assert!(
            out.contains("user=evil\\n2026-01-01T00:00:00Z ERROR model_service: forged\\r\\n\\u001b[2J"),
            "{out:?}"
        );
        // a clean record is written as it is; colours are kept on a terminal
        assert!(matches!(escape(b"plain line\n", false), Cow::Borrowed(_)));
        assert_eq!(&*escape(b"\x1b[33mWARN\x1b[0m x\ny\n", true), b"\x1b[33mWARN\x1b[0m x\\ny\n");
        // a JSON record stays valid JSON with the same value
        let json = "{\"user\":\"a\u{2028}b\"}\n";
        let out = escape(json.as_bytes(), false);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["user"], "a\u{2028}b");
    }

    #[test]
    fn the_writer_passes_each_record_escaped_and_whole() {
        let mut sink = Vec::new();
        let mut w = Escaping { inner: &mut sink, keep_ansi: false };
        w.write_all(b"one\ntwo\n").unwrap();
        w.write_all(b"three\n").unwrap();
        assert_eq!(sink, b"one\\ntwo\nthree\n");
    }
}
