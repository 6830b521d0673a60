//! Webhooks against a real HTTP receiver written here (std TcpListener, HTTP/1.1 with keep-alive)
//! on a loopback port, a real redis-server and the real binary: one signed webhook per list written
//! by listen, backfill and ingest (checked against the notify channel, which announces every
//! write), signatures verified as docs/webhooks.md tells a receiver to, a receiver down then up,
//! refusals dead-lettered without retry, and recomputation throughput with a slow receiver.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use testkit::*;

const SECRET: &str = "test-webhook-secret-0123456789";
const DEAD: &str = "webhooks:dead";

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The receiver's check of docs/webhooks.md, written here on its own (not the server's code): the
/// timestamp within five minutes of the receiver's clock, and `sha256=<hex>` equal, in constant
/// time, to HMAC-SHA256(secret, "<timestamp>.<raw body>").
fn receiver_check(secret: &[u8], timestamp: &str, signature: &str, body: &[u8], now: u64) -> Result<(), &'static str> {
    let ts: u64 = timestamp.parse().map_err(|_| "timestamp is not an integer")?;
    if ts.abs_diff(now) > 300 {
        return Err("timestamp outside the five-minute window");
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let expected = format!("sha256={expected}");
    let same = expected.len() == signature.len()
        && expected.bytes().zip(signature.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same {
        Ok(())
    } else {
        Err("signature mismatch")
    }
}

#[derive(Clone)]
struct Received {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str).unwrap_or("")
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    fn check(&self, now: u64) -> Result<(), &'static str> {
        receiver_check(
            SECRET.as_bytes(),
            self.header("X-Webhook-Timestamp"),
            self.header("X-Webhook-Signature"),
            &self.body,
            now,
        )
    }
}

#[derive(Clone, Copy)]
enum Answer {
    Ok,
    Status(u16),
    /// Waits, then 200.
    Slow(Duration),
}

/// An HTTP/1.1 webhook receiver on 127.0.0.1:port: records every request, answers as told.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Answer>>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Receiver {
    fn start(port: u16, answer: Answer) -> Self {
        Self::start_recording(port, answer, Arc::new(Mutex::new(Vec::new())))
    }

    fn start_recording(port: u16, answer: Answer, got: Arc<Mutex<Vec<Received>>>) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let r = Self {
            port,
            got,
            answer: Arc::new(Mutex::new(answer)),
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        let (got, answer, stop, conns) = (r.got.clone(), r.answer.clone(), r.stop.clone(), r.conns.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                conns.lock().unwrap().push(stream.try_clone().unwrap());
                let (got, answer) = (got.clone(), answer.clone());
                std::thread::spawn(move || serve_connection(stream, got, answer));
            }
        });
        r
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/recommendations", self.port)
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Stops listening and closes every connection (the port refuses connections afterwards).
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_connection(stream: TcpStream, got: Arc<Mutex<Vec<Received>>>, answer: Arc<Mutex<Answer>>) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        got.lock().unwrap().push(Received { headers, body });
        let answer = *answer.lock().unwrap();
        let (status, extra) = match answer {
            Answer::Ok => (200, ""),
            Answer::Status(302) => (302, "Location: http://127.0.0.1:9/elsewhere\r\n"),
            Answer::Status(s) => (s, ""),
            Answer::Slow(d) => {
                std::thread::sleep(d);
                (200, "")
            }
        };
        let text = if status == 400 { "unknown user id format" } else { "ok" };
        let response = format!(
            "HTTP/1.1 {status} X\r\n{extra}Content-Length: {}\r\nContent-Type: text/plain\r\n\r\n{text}",
            text.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// Counts the user ids published on the notify channel: one message per list written.
fn count_notifications(redis: &Redis) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let mut conn = redis.client().get_connection().unwrap();
    let ready = Arc::new(AtomicBool::new(false));
    let subscribed = ready.clone();
    std::thread::spawn(move || {
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe("recommendations_updated").unwrap();
        subscribed.store(true, Ordering::SeqCst);
        while pubsub.get_message().is_ok() {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    wait_until(Duration::from_secs(5), || ready.load(Ordering::SeqCst));
    count
}

/// A deterministic profile for user `n`.
fn profile(n: usize) -> String {
    let items: Vec<String> = (0..1 + n % 5).map(|i| item((n * 7 + i * 31) % 300)).collect();
    serde_json::to_string(&items).unwrap()
}

fn write_profiles(redis: &Redis, prefix: &str, n: usize) -> Vec<String> {
    let mut conn = redis.conn();
    let mut pipe = redis::pipe();
    let users: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        pipe.cmd("SET").arg(format!("user_profile:{u}")).arg(profile(i)).ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
    users
}

fn wait_written(redis: &Redis, users: &[String], limit: Duration) {
    wait_until(limit, || {
        let keys: Vec<String> = users.iter().map(|u| format!("recommendations:{u}")).collect();
        keys.chunks(500).all(|chunk| {
            let n: usize = redis::cmd("EXISTS").arg(chunk).query(&mut redis.conn()).unwrap();
            n == chunk.len()
        })
    });
}

fn hook_env<'a>(url: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![("WEBHOOK_URL", url), ("WEBHOOK_SECRET", SECRET)];
    env.extend_from_slice(extra);
    env
}

fn listen(redis: &Redis, env: &[(&str, &str)]) -> Server {
    let server = Server::start_mode(redis.port, test_models(), &["listen"], env);
    server.wait_healthy();
    server
}

/// Every webhook is well formed, signed with SECRET, and from `source`; returns them by delivery id.
fn check_all(received: &[Received], source: &str) -> HashMap<String, serde_json::Value> {
    let now = now_secs();
    let mut by_id = HashMap::new();
    for r in received {
        r.check(now).unwrap_or_else(|e| panic!("{e}: {:?}", r.headers));
        // the server's own check agrees with the receiver's
        model_service::webhook::verify(
            SECRET.as_bytes(),
            r.header("X-Webhook-Timestamp"),
            r.header("X-Webhook-Signature"),
            &r.body,
            now,
            300,
        )
        .unwrap();
        assert_eq!(r.header("Content-Type"), "application/json");
        let body = r.json();
        assert_eq!(body["event"], "recommendations.updated");
        assert_eq!(body["source"], source, "{body}");
        assert_eq!(r.header("X-Webhook-Id"), body["delivery_id"].as_str().unwrap());
        assert!(body["user_id"].is_string() && body["model_version"].is_string(), "{body}");
        let items = body["items"].as_array().unwrap();
        assert!(!items.is_empty() && items.iter().all(|i| i["item_id"].is_string() && i["score"].is_number()));
        assert!(body["computed_at_ms"].as_u64().unwrap() / 1000 <= now);
        by_id.insert(body["delivery_id"].as_str().unwrap().to_string(), body);
    }
    by_id
}

#[test]
fn listen_sends_one_signed_webhook_per_list_written_and_tampering_fails_the_check() {
    let redis = Redis::start();
    let receiver = Receiver::start(free_port(), Answer::Ok);
    let url = receiver.url();
    let listener = listen(&redis, &hook_env(&url, &[]));
    let published = count_notifications(&redis);
    let users = write_profiles(&redis, "hook", 1000);
    wait_written(&redis, &users, Duration::from_secs(120));
    // every list written is announced on the channel; as many webhooks must arrive
    wait_until(Duration::from_secs(60), || receiver.count() >= published.load(Ordering::SeqCst).max(1000));
    std::thread::sleep(Duration::from_millis(500));
    let received = receiver.received();
    let published = published.load(Ordering::SeqCst);
    let by_id = check_all(&received, "listen");
    let user_ids: HashSet<&str> = by_id.values().map(|b| b["user_id"].as_str().unwrap()).collect();
    eprintln!(
        "{} lists written (notify channel), {} webhooks received, {} distinct deliveries, {} distinct users",
        published,
        received.len(),
        by_id.len(),
        user_ids.len()
    );
    assert_eq!(received.len(), published, "one webhook per list written");
    assert_eq!(by_id.len(), received.len(), "a delivery id per list (no retries here)");
    assert_eq!(user_ids.len(), 1000);
    assert!(users.iter().all(|u| user_ids.contains(u.as_str())));
    // the webhook carries the list that was written
    let sample = by_id.values().find(|b| b["user_id"] == "hook7").unwrap();
    let stored: Vec<String> = serde_json::from_str(&redis.get("recommendations:hook7").unwrap()).unwrap();
    let sent: Vec<&str> = sample["items"].as_array().unwrap().iter().map(|i| i["item_id"].as_str().unwrap()).collect();
    assert_eq!(sent, stored);
    assert_eq!(sample["model_version"].as_str(), redis.hget("recommendations_meta:hook7", "model_version").as_deref());

    // the documented check refuses a tampered body, an old timestamp and a re-dated signature
    let r = &received[0];
    let (ts, sig) = (r.header("X-Webhook-Timestamp"), r.header("X-Webhook-Signature"));
    let now = now_secs();
    let mut tampered = r.body.clone();
    let at = tampered.iter().position(|&b| b == b'"').unwrap() + 1;
    tampered[at] ^= 0x20;
    assert_eq!(receiver_check(SECRET.as_bytes(), ts, sig, &tampered, now), Err("signature mismatch"));
    let ts_num: u64 = ts.parse().unwrap();
    assert_eq!(
        receiver_check(SECRET.as_bytes(), ts, sig, &r.body, ts_num + 301),
        Err("timestamp outside the five-minute window")
    );
    let redated = (ts_num + 1).to_string();
    assert_eq!(receiver_check(SECRET.as_bytes(), &redated, sig, &r.body, now), Err("signature mismatch"));
    assert_eq!(receiver_check(b"another-secret", ts, sig, &r.body, now), Err("signature mismatch"));
    assert_eq!(receiver_check(SECRET.as_bytes(), ts, sig, &r.body, now), Ok(()));

    assert_eq!(listener.metric("model_service_webhook_deliveries_total{outcome=\"delivered\"}") as usize, published);
    assert_eq!(listener.metric("model_service_webhook_deliveries_total{outcome=\"dropped\"}"), 0.0);
    assert_eq!(listener.metric("model_service_webhook_queue_depth"), 0.0);
    // the API's own writes are not announced by default
    let api = Server::start_with(redis.port, test_models(), &hook_env(&url, &[]));
    api.wait_healthy();
    let before = receiver.count();
    assert_eq!(api.post("/recommend/hook3").0, 200);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(receiver.count(), before, "WEBHOOK_EVENTS=recomputed: no webhook for a request's write");
    // the secret is in no log line and no metric
    let (_, metrics) = listener.get_text("/metrics");
    assert!(!metrics.contains(SECRET));
}

#[test]
fn api_writes_are_announced_with_requests_events() {
    let redis = Redis::start();
    let receiver = Receiver::start(free_port(), Answer::Ok);
    let url = receiver.url();
    redis.set("user_profile:apiuser", &profile(3));
    let api =
        Server::start_with(redis.port, test_models(), &hook_env(&url, &[("WEBHOOK_EVENTS", "recomputed,requests")]));
    api.wait_healthy();
    let (status, body) = api.post("/recommend/apiuser");
    assert_eq!(status, 200, "{body}");
    wait_until(Duration::from_secs(10), || receiver.count() == 1);
    let hook = &check_all(&receiver.received(), "request").into_values().next().unwrap();
    assert_eq!(hook["user_id"], "apiuser");
    let ids: Vec<&str> = hook["items"].as_array().unwrap().iter().map(|i| i["item_id"].as_str().unwrap()).collect();
    assert_eq!(ids, rec_ids(&body));
}

#[test]
fn backfill_sends_a_webhook_per_list_before_it_exits() {
    let redis = Redis::start();
    let receiver = Receiver::start(free_port(), Answer::Ok);
    let users = write_profiles(&redis, "bf", 300);
    let mut cmd = bin();
    base_env(&mut cmd, redis.port, test_models());
    cmd.env("HOST", "127.0.0.1").env("PORT", free_port().to_string());
    cmd.env("WEBHOOK_URL", receiver.url()).env("WEBHOOK_SECRET", SECRET).arg("backfill");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["written"], 300, "{summary}");
    // the process delivered everything before it exited: nothing arrives later
    let received = receiver.received();
    let by_id = check_all(&received, "backfill");
    let user_ids: HashSet<&str> = by_id.values().map(|b| b["user_id"].as_str().unwrap()).collect();
    assert_eq!(received.len(), 300);
    assert_eq!(user_ids.len(), 300);
    assert!(users.iter().all(|u| user_ids.contains(u.as_str())));
}

#[test]
fn a_receiver_down_for_ten_seconds_gets_every_webhook_once_it_is_up() {
    let redis = Redis::start();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hooks");
    let env = hook_env(
        &url,
        &[("WEBHOOK_BACKOFF_MS", "200"), ("WEBHOOK_BACKOFF_MAX_MS", "2000"), ("WEBHOOK_MAX_ATTEMPTS", "30")],
    );
    let listener = listen(&redis, &env);
    let published = count_notifications(&redis);
    let users = write_profiles(&redis, "down", 200);
    wait_written(&redis, &users, Duration::from_secs(60));
    let down_since = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    assert!(listener.metric("model_service_webhook_deliveries_total{outcome=\"retried\"}") > 0.0);
    assert_eq!(listener.metric("model_service_webhook_deliveries_total{outcome=\"delivered\"}"), 0.0);
    let receiver = Receiver::start(port, Answer::Ok);
    let published = published.load(Ordering::SeqCst);
    let delivered = || listener.metric("model_service_webhook_deliveries_total{outcome=\"delivered\"}") as usize;
    wait_until(Duration::from_secs(60), || delivered() >= published);
    let took = down_since.elapsed();
    let received = receiver.received();
    let by_id = check_all(&received, "listen");
    let user_ids: HashSet<&str> = by_id.values().map(|b| b["user_id"].as_str().unwrap()).collect();
    let retried = listener.metric("model_service_webhook_deliveries_total{outcome=\"retried\"}");
    eprintln!(
        "receiver down 10 s: {published} lists written, {} distinct deliveries ({} requests) after {:.1}s, \
         {retried} retries",
        by_id.len(),
        received.len(),
        took.as_secs_f64()
    );
    assert_eq!(by_id.len(), published, "every webhook arrived");
    assert_eq!(user_ids.len(), 200);
    assert!(received.iter().any(|r| r.header("X-Webhook-Attempt").parse::<u32>().unwrap() > 1));
    assert_eq!(listener.metric("model_service_webhook_deliveries_total{outcome=\"dead_lettered\"}"), 0.0);
    let dead: usize = redis::cmd("XLEN").arg(DEAD).query(&mut redis.conn()).unwrap();
    assert_eq!(dead, 0);
}

type StreamEntries = Vec<(String, Vec<(String, String)>)>;

fn dead_letters(redis: &Redis) -> Vec<HashMap<String, String>> {
    let entries: StreamEntries = redis::cmd("XRANGE").arg(DEAD).arg("-").arg("+").query(&mut redis.conn()).unwrap();
    entries.into_iter().map(|(_, fields)| fields.into_iter().collect()).collect()
}

#[test]
fn a_refusing_receiver_gets_one_attempt_and_the_dead_letter_says_why() {
    let redis = Redis::start();
    let receiver = Receiver::start(free_port(), Answer::Status(400));
    let url = receiver.url();
    let listener = listen(&redis, &hook_env(&url, &[("WEBHOOK_BACKOFF_MS", "100")]));
    let users = write_profiles(&redis, "refused", 5);
    wait_written(&redis, &users, Duration::from_secs(30));
    wait_until(Duration::from_secs(20), || dead_letters(&redis).len() >= 5);
    std::thread::sleep(Duration::from_secs(2)); // time for a retry that must not come
    let dead = dead_letters(&redis);
    assert_eq!(receiver.count(), 5, "exactly one attempt per webhook");
    assert_eq!(dead.len(), 5);
    for d in &dead {
        assert_eq!(d["status"], "400", "{d:?}");
        assert_eq!(d["attempts"], "1", "{d:?}");
        assert!(d["reason"].contains("400") && d["reason"].contains("unknown user id format"), "{d:?}");
        assert_eq!(d["source"], "listen");
        let payload: serde_json::Value = serde_json::from_str(&d["payload"]).unwrap();
        assert_eq!(payload["delivery_id"].as_str(), Some(d["delivery_id"].as_str()));
        assert!(!d.values().any(|v| v.contains(SECRET) || v.contains(&url)), "no secret nor URL: {d:?}");
    }
    eprintln!("dead letter of a 400: reason {:?}", dead[0]["reason"]);
    assert_eq!(listener.metric("model_service_webhook_deliveries_total{outcome=\"dead_lettered\"}"), 5.0);
    assert_eq!(listener.metric("model_service_webhook_deliveries_total{outcome=\"retried\"}"), 0.0);

    // a redirect is not followed: dead-lettered at once
    *receiver.answer.lock().unwrap() = Answer::Status(302);
    let users = write_profiles(&redis, "moved", 2);
    wait_written(&redis, &users, Duration::from_secs(30));
    wait_until(Duration::from_secs(20), || dead_letters(&redis).len() >= 7);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(receiver.count(), 7);
    let moved = dead_letters(&redis).into_iter().filter(|d| d["status"] == "302").count();
    assert_eq!(moved, 2);

    // a 503 is retried up to WEBHOOK_MAX_ATTEMPTS (8), then dead-lettered with the count
    *receiver.answer.lock().unwrap() = Answer::Status(503);
    let users = write_profiles(&redis, "unavailable", 1);
    wait_written(&redis, &users, Duration::from_secs(30));
    wait_until(Duration::from_secs(120), || dead_letters(&redis).len() >= 8);
    let last = dead_letters(&redis).pop().unwrap();
    assert_eq!((last["status"].as_str(), last["attempts"].as_str()), ("503", "8"), "{last:?}");
    assert_eq!(receiver.count(), 7 + 8);
}

#[test]
fn a_receiver_that_holds_every_webhook_does_not_hold_up_recomputation() {
    // The receiver answers nothing for two minutes. Were deliveries on the recomputation's path,
    // at most WEBHOOK_CONCURRENCY (8) lists could be written before the first answer; the listener
    // writes all 1,000 while the 8 deliveries wait, and every webhook stays queued, none dropped.
    let receiver = Receiver::start(free_port(), Answer::Slow(Duration::from_secs(120)));
    let url = receiver.url();
    let redis = Redis::start();
    let listener = listen(&redis, &hook_env(&url, &[("WEBHOOK_TIMEOUT_MS", "150000")]));
    let n = 1000;
    let users = write_profiles(&redis, "held-", n);
    wait_written(&redis, &users, Duration::from_secs(90));
    wait_until(Duration::from_secs(10), || receiver.count() == 8);
    assert_eq!(listener.metric("model_service_webhook_deliveries_total{outcome=\"dropped\"}"), 0.0);
    assert_eq!(listener.metric("model_service_webhook_queue_depth"), n as f64, "every webhook waits, undelivered");
    assert_eq!(receiver.count(), 8, "more deliveries than WEBHOOK_CONCURRENCY in flight");
}

#[test]
fn ingest_sends_webhooks_with_source_ingest() {
    let redis = Redis::start();
    let receiver = Receiver::start(free_port(), Answer::Ok);
    let url = receiver.url();
    let kafka = Kafka::start();
    kafka.create_topic("user-behavior", 1);
    kafka.create_topic("user-behavior-dead-letter", 1);
    let brokers = kafka.brokers();
    let env = hook_env(
        &url,
        &[
            ("KAFKA_BROKERS", brokers.as_str()),
            ("KAFKA_TOPIC", "user-behavior"),
            ("KAFKA_DEAD_LETTER_TOPIC", "user-behavior-dead-letter"),
        ],
    );
    let server = Server::start_mode(redis.port, test_models(), &["ingest"], &env);
    server.wait_healthy();
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let messages: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            let user = format!("kafka{i}");
            let json = serde_json::json!({"event_id": format!("e{i}"), "user_id": user, "item_id": item(i * 3),
                "event": "view", "ts": ts});
            (user, serde_json::to_vec(&json).unwrap())
        })
        .collect();
    kafka.produce(&kafka.producer(), "user-behavior", &messages);
    let users: Vec<String> = (0..20).map(|i| format!("kafka{i}")).collect();
    wait_written(&redis, &users, Duration::from_secs(60));
    wait_until(Duration::from_secs(30), || {
        let ids: HashSet<String> =
            receiver.received().iter().map(|r| r.json()["user_id"].as_str().unwrap().to_string()).collect();
        users.iter().all(|u| ids.contains(u))
    });
    let by_id = check_all(&receiver.received(), "ingest");
    assert!(by_id.len() >= 20);
}
