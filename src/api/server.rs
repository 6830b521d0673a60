//! The HTTP/1 serving loop of the public and the admin listener (`axum::serve` has no timeouts, no
//! connection cap, and no way to close idle connections at shutdown):
//!
//! - every connection is served by hyper's HTTP/1 connection, watched by its task: with no request
//!   in flight it is closed when a request head (request line and headers) has not arrived within
//!   the header read timeout of its first byte (slowloris, a partial request line), when a new
//!   connection sends no complete head within the header read timeout, and when a keep-alive
//!   connection stays idle (not a byte of a next request) for the idle timeout after its last
//!   response. The body read timeout is in `http::read_body`;
//! - at most `max_connections` are open. At the cap a new connection makes the connection stalled
//!   the longest close: an idle one (no request in flight; stalled since it opened or its last
//!   response ended, so a socket that never completed a request, idle or dribbling a head, goes
//!   before a keep-alive client between two requests), or one whose request body is still
//!   arriving (stalled since that request began; it is dropped at once, request and all: a body
//!   dribbled a byte a second must not hold a place for `BODY_READ_TIMEOUT_SECS`). One order for
//!   both, so a connection that has just opened (a `/health/live` probe before its head is in)
//!   is the last to go. A probe thus gets through a flood of idle sockets, slow heads or slow
//!   bodies; when every connection has a request being handled (each bounded by the request and
//!   reload deadlines), the new one is closed at once rather than queued;
//! - hyper answers a request it cannot parse itself, with an empty body (400, 414, 431):
//!   `JsonParseErrors` rewrites those answers into the JSON `{"error","detail"}` of
//!   `api::error::ApiError`, with the status refined where the request line says why (505), and
//!   counts them in `http_requests_total` (route `unmatched`: no route ran);
//! - on stop, connections without a request in flight close at once; the others finish their
//!   request within the grace period and close.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Bytes, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::api::error::ApiError;

/// Largest request head hyper buffers per connection (beyond: 431). Room for a 64 KiB request
/// target, which hyper refuses with 414 on its own.
const MAX_HEAD_BUFFER: usize = 128 * 1024;

/// Bytes of each request's start kept to explain hyper's parse errors (the request line).
const HEAD_SNIFF: usize = 1024;

/// Bounds on connections, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time allowed for a request head, from its first byte (from the opening for a new
    /// connection).
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection may wait for the first byte of its next request.
    pub idle_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Limits {
    pub fn new(http: &crate::api::settings::HttpArgs) -> Self {
        Self {
            header_read_timeout: http.header_read_timeout(),
            idle_timeout: http.idle_timeout(),
            max_connections: http.max_connections,
        }
    }
}

/// Serves `app` on `listener` until `stop` turns true, then closes idle connections at once and
/// waits at most `grace` for the requests in flight. `requests` (`http_requests_total`) counts
/// the answers hyper gives itself, which no route sees.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    stop: watch::Receiver<bool>,
    grace: Duration,
    requests: prometheus::IntCounterVec,
) -> io::Result<()> {
    let open = Connections::default();
    let mut tasks = JoinSet::new();
    let mut until_stop = stop;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = until_stop.wait_for(|stopped| *stopped) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors or the like: wait a moment rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.len() >= limits.max_connections && !open.make_room() {
            tracing::debug!(max = limits.max_connections, "every connection has a request being handled; refusing one");
            continue;
        }
        tasks.spawn(serve_connection(stream, app.clone(), limits, open.add(), requests.clone()));
    }
    drop(listener);
    open.close_all();
    let drained = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(?grace, connections = tasks.len(), "requests still in flight after the grace period; exiting");
        tasks.abort_all();
    }
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    app: axum::Router,
    limits: Limits,
    conn: Connection,
    requests: prometheus::IntCounterVec,
) {
    let _ = stream.set_nodelay(true);
    let state = conn.state.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        // In flight from the call until the response body is written (or dropped).
        let busy = Busy::enter(state.clone());
        let app = app.clone();
        let request = request.map(|body| Body::new(Receiving::new(body, state.clone())));
        async move {
            let response = app.oneshot(request).await?;
            Ok::<_, Infallible>(response.map(|body| {
                body.map_frame(move |frame| {
                    let _in_flight = &busy;
                    frame
                })
            }))
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // hyper counts from when it starts waiting for a head; the watch below is the real bound.
        .header_read_timeout(limits.header_read_timeout + limits.idle_timeout)
        .max_buf_size(MAX_HEAD_BUFFER)
        .serve_connection(TokioIo::new(JsonParseErrors::new(stream, conn.state.clone(), requests)), service);
    tokio::pin!(connection);
    loop {
        // With a request in flight there is no deadline here: look again a little later.
        let wake = conn.state.deadline(&limits).unwrap_or_else(|| Instant::now() + limits.header_read_timeout);
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection closed");
                }
                return;
            }
            _ = conn.state.close.notified() => break,
            _ = tokio::time::sleep_until(wake.into()) => {
                if conn.state.deadline(&limits).is_some_and(|deadline| deadline <= Instant::now()) {
                    return; // head or idle timeout: close
                }
            }
        }
    }
    let shed = conn.state.shed.load(Ordering::SeqCst) && conn.state.receiving().is_some();
    if shed || conn.state.in_flight.load(Ordering::SeqCst) == 0 {
        return; // nothing in flight, or shed while its body still arrives: close now
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// The open connections, oldest first.
#[derive(Clone, Default)]
struct Connections(Arc<Mutex<Registry>>);

#[derive(Default)]
struct Registry {
    next_id: u64,
    open: BTreeMap<u64, Arc<ConnState>>,
}

struct ConnState {
    /// Requests between their call and the end of their response body.
    in_flight: AtomicUsize,
    /// When the connection opened or its last response ended.
    idle_since: Mutex<Instant>,
    /// When the first byte of the request being received arrived (none since the last response).
    head_started: Mutex<Option<Instant>>,
    /// When the request in flight began, while its body is still arriving (none without a body).
    receiving: Mutex<Option<Instant>>,
    /// A response was written on this connection: it is a keep-alive connection between requests.
    served: AtomicBool,
    /// Asked to close (at the cap, or at shutdown).
    closing: AtomicBool,
    /// Asked to close at the cap while its request body was arriving: close without waiting.
    shed: AtomicBool,
    close: Notify,
}

impl ConnState {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            head_started: Mutex::new(None),
            receiving: Mutex::new(None),
            served: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            shed: AtomicBool::new(false),
            close: Notify::new(),
        }
    }

    fn idle_since(&self) -> Instant {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn head_started(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.head_started.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn receiving(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.receiving.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Since when the connection has made no progress that room should be kept for: idle since
    /// it opened or its last response ended, or receiving a request body since that request
    /// began. None while a request is being handled.
    fn stalled_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            Some(self.idle_since())
        } else {
            *self.receiving()
        }
    }

    /// When the connection is to be closed, unless something happens first; none while a request
    /// is in flight (its body and handling have their own bounds).
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(match *self.head_started() {
            Some(first_byte) => first_byte + limits.header_read_timeout,
            None if self.served.load(Ordering::SeqCst) => self.idle_since() + limits.idle_timeout,
            None => self.idle_since() + limits.header_read_timeout,
        })
    }

    fn ask_to_close(&self) -> bool {
        let first = !self.closing.swap(true, Ordering::SeqCst);
        if first {
            self.close.notify_one();
        }
        first
    }
}

impl Connections {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open connections not already asked to close.
    fn len(&self) -> usize {
        self.registry().open.values().filter(|c| !c.closing.load(Ordering::SeqCst)).count()
    }

    fn add(&self) -> Connection {
        let mut registry = self.registry();
        let id = registry.next_id;
        registry.next_id += 1;
        let state = Arc::new(ConnState::new());
        registry.open.insert(id, state.clone());
        Connection { id, state, open: self.clone() }
    }

    /// Asks the connection stalled the longest (idle, or still receiving its request body) to
    /// close, one receiving its body at once; false when every connection has a request being
    /// handled.
    fn make_room(&self) -> bool {
        let registry = self.registry();
        let stalled = registry
            .open
            .values()
            .filter(|c| !c.closing.load(Ordering::SeqCst))
            .filter_map(|c| Some((c.stalled_since()?, c)))
            .min_by_key(|(since, _)| *since);
        stalled.is_some_and(|(_, c)| {
            c.shed.store(true, Ordering::SeqCst);
            c.ask_to_close()
        })
    }

    fn close_all(&self) {
        for c in self.registry().open.values() {
            c.ask_to_close();
        }
    }
}

/// A connection's entry in the registry, removed when its task ends.
struct Connection {
    id: u64,
    state: Arc<ConnState>,
    open: Connections,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.open.registry().open.remove(&self.id);
    }
}

struct Busy(Arc<ConnState>);

impl Busy {
    fn enter(state: Arc<ConnState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request body that tells its connection when it has been received: until its end arrives
/// (or the request is dropped) the connection counts as receiving, which `Connections::make_room`
/// may shed.
struct Receiving {
    inner: Incoming,
    state: Arc<ConnState>,
    done: bool,
}

impl Receiving {
    fn new(inner: Incoming, state: Arc<ConnState>) -> Self {
        let done = inner.is_end_stream();
        if !done {
            *state.receiving() = Some(Instant::now());
        }
        Self { inner, state, done }
    }

    fn finish(&mut self) {
        if !std::mem::replace(&mut self.done, true) {
            *self.state.receiving() = None;
        }
    }
}

impl hyper::body::Body for Receiving {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) || this.inner.is_end_stream() {
            this.finish();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The connection's IO, which recognises hyper's own answer to a request it could not parse (a
/// 4xx/5xx head whose only fields are `content-length: 0`, `date` and `connection: close`: every
/// error response of the application has a JSON body and a content type) and writes the JSON
/// error in its place. It keeps the first bytes of each request to tell why the request was
/// refused, and notes when each request's first byte arrives (for the header read timeout).
struct JsonParseErrors<T> {
    inner: T,
    state: Arc<ConnState>,
    /// `http_requests_total`: each rewritten answer counts as route `unmatched`.
    requests: prometheus::IntCounterVec,
    /// The start of the current request (at most HEAD_SNIFF bytes).
    head: Vec<u8>,
    /// A response was written since the last read: the next bytes read start a new request.
    responded: bool,
    /// A rewritten error response, written before anything else (`sent` bytes of it so far).
    pending: Vec<u8>,
    sent: usize,
}

impl<T> JsonParseErrors<T> {
    fn new(inner: T, state: Arc<ConnState>, requests: prometheus::IntCounterVec) -> Self {
        Self { inner, state, requests, head: Vec::new(), responded: false, pending: Vec::new(), sent: 0 }
    }
}

impl<T: AsyncWrite + Unpin> JsonParseErrors<T> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonParseErrors<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            if std::mem::take(&mut this.responded) {
                this.head.clear();
            }
            this.state.head_started().get_or_insert_with(Instant::now);
            let room = HEAD_SNIFF.saturating_sub(this.head.len());
            this.head.extend_from_slice(&new[..new.len().min(room)]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if let Some((status, answer)) = json_parse_error(buf, &this.head) {
            // Taken whole; written by the flush hyper sends next.
            this.requests.with_label_values(&["unmatched", status.as_str()]).inc();
            this.pending = answer;
            return Poll::Ready(Ok(buf.len()));
        }
        this.responded = true;
        *this.state.head_started() = None;
        this.state.served.store(true, Ordering::SeqCst);
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// When `response` is hyper's bodiless answer to a request it could not parse, the JSON error
/// response to send instead and its status (`request`: the start of the refused request).
fn json_parse_error(response: &[u8], request: &[u8]) -> Option<(axum::http::StatusCode, Vec<u8>)> {
    if response.len() > 512 {
        return None;
    }
    let text = std::str::from_utf8(response).ok()?.strip_suffix("\r\n\r\n")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line.strip_prefix("HTTP/1.1 ").or_else(|| status_line.strip_prefix("HTTP/1.0 "))?;
    let status: u16 = status.get(..3)?.parse().ok()?;
    if !(400..600).contains(&status) {
        return None;
    }
    let (mut empty, mut date) = (false, None);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" if value.trim() == "0" => empty = true,
            "date" => date = Some(value.trim()),
            "connection" if value.trim().eq_ignore_ascii_case("close") => {}
            _ => return None,
        }
    }
    if !empty {
        return None;
    }
    let error = parse_error(status, request);
    let body = error.body().to_string();
    let status = error.status();
    let mut answer = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if let Some(date) = date {
        answer.push_str(&format!("date: {date}\r\n"));
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    Some((status, answer.into_bytes()))
}

/// The error for hyper's `status`, with the reason read from the start of the refused request.
fn parse_error(status: u16, request: &[u8]) -> ApiError {
    match status {
        414 => return ApiError::UriTooLong("the request target is over 64 KiB".into()),
        431 => {
            return ApiError::HeadersTooLarge(format!(
                "the request head is over {} KiB or has more than 100 header fields",
                MAX_HEAD_BUFFER / 1024
            ))
        }
        _ => {}
    }
    let head = String::from_utf8_lossy(request);
    let line = head.split(['\r', '\n']).next().unwrap_or("");
    let words: Vec<&str> = line.split(' ').collect();
    match words.as_slice() {
        [_, _] => {
            return ApiError::HttpVersionNotSupported(
                "the request line has no HTTP version (HTTP/0.9); HTTP/1.1 and HTTP/1.0 are served".into(),
            )
        }
        [_, _, version] if version.starts_with("HTTP/") && !matches!(*version, "HTTP/1.1" | "HTTP/1.0") => {
            return ApiError::HttpVersionNotSupported(format!(
                "{}; HTTP/1.1 and HTTP/1.0 are served",
                version.escape_debug()
            ))
        }
        _ => {}
    }
    let fields: Vec<(String, &str)> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim()))
        .collect();
    let lengths: Vec<&str> = fields.iter().filter(|(n, _)| n == "content-length").map(|(_, v)| *v).collect();
    let codings: Vec<&str> = fields.iter().filter(|(n, _)| n == "transfer-encoding").map(|(_, v)| *v).collect();
    let length_ok = lengths.iter().all(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        && lengths.windows(2).all(|w| w[0] == w[1]);
    let reason = if !length_ok {
        format!("Content-Length must be one non-negative integer, got {lengths:?}")
    } else if !codings.is_empty() && !codings.join(",").trim_end().to_ascii_lowercase().ends_with("chunked") {
        format!("Transfer-Encoding must end in chunked, got {codings:?}")
    } else {
        "the request line or a header field is not valid HTTP/1.1 (a character not allowed in the method, the \
         target or a field, or a line that is not `name: value`)"
            .to_string()
    };
    ApiError::MalformedRequest(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_400: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sun, 29 Nov 2026 20:00:00 GMT\r\n\r\n";

    fn answer(response: &[u8], request: &[u8]) -> (String, serde_json::Value) {
        let (status, bytes) = json_parse_error(response, request).expect("rewritten");
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with(&format!("HTTP/1.1 {} ", status.as_str())), "{head}");
        (head.to_string(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn hypers_bodiless_errors_become_json() {
        let (head, body) = answer(HYPER_400, b"GET /<script> HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("content-type: application/json") && head.contains("connection: close"), "{head}");
        assert!(head.contains("date: Sun, 29 Nov 2026"), "{head}");
        assert_eq!(body["error"], "malformed_request");
        let (head, body) = answer(HYPER_400, b"GET / HTTP/1.2\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 505 HTTP Version Not Supported"), "{head}");
        assert_eq!(body["error"], "http_version_not_supported");
        let (_, body) = answer(HYPER_400, b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        assert!(body["detail"].as_str().unwrap().contains("Content-Length"), "{body}");
        let (_, body) = answer(HYPER_400, b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert!(body["detail"].as_str().unwrap().contains("Transfer-Encoding"), "{body}");
        let (head, body) = answer(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n", b"");
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert_eq!(body["error"], "headers_too_large");
    }

    #[test]
    fn application_responses_pass_unchanged() {
        let json = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert!(json_parse_error(json, b"").is_none());
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert!(json_parse_error(ok, b"").is_none());
        let tagged = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nx-request-id: a\r\n\r\n";
        assert!(json_parse_error(tagged, b"").is_none());
    }
}
