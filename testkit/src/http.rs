//! HTTP helpers: the JSON client of a server, error-shape assertions, raw exchanges on a socket.

use std::time::Duration;

/// A blocking client with a 30 s timeout.
pub(crate) fn blocking_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// The status and JSON body of a response; panics when it is not `application/json`.
pub(crate) fn json_response(r: reqwest::blocking::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    let ctype = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let text = r.text().unwrap();
    assert!(ctype.starts_with("application/json"), "status {status}: content-type {ctype:?}, body {text}");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
}

/// Asserts an error response: the status and the JSON `{"error", "detail"}` shape.
pub fn assert_error(resp: &(u16, serde_json::Value), status: u16, code: &str) {
    assert_eq!(resp.0, status, "{}", resp.1);
    assert_eq!(resp.1["error"], code, "{}", resp.1);
    assert!(resp.1["detail"].as_str().is_some_and(|d| !d.is_empty()), "{}", resp.1);
}

/// An HTTP answer read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Status line and header fields, as sent.
    pub head: String,
    pub body: String,
}

impl RawResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Sends `request` as raw bytes on a new connection and reads until the server closes it (at
/// most 10 s); `None` when nothing came back.
pub fn raw_exchange(port: u16, request: &[u8]) -> Option<RawResponse> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A server that answers before reading everything may reset the rest of a large request.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(RawResponse { status, head: head.to_string(), body: body.to_string() })
}

/// Asserts a raw answer is the JSON error `code` with `status`.
pub fn assert_raw_error(answer: &Option<RawResponse>, status: u16, code: &str) {
    let answer = answer.as_ref().expect("an answer");
    assert_eq!(answer.status, status, "{answer:?}");
    assert!(answer.head.to_ascii_lowercase().contains("content-type: application/json"), "{answer:?}");
    let body = answer.json();
    assert_eq!(body["error"], code, "{answer:?}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{answer:?}");
}

/// The item ids of a recommendation response, in order.
pub fn rec_ids(body: &serde_json::Value) -> Vec<String> {
    body["recommendations"].as_array().unwrap().iter().map(|r| r["item_id"].as_str().unwrap().to_string()).collect()
}
