//! The tansu broker (Kafka-compatible): a real broker per test, a producer and a reader.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::paths::scratch_dir;
use crate::ports::free_port;
use crate::wait::wait_until;

/// The `tansu` broker binary (a Kafka-compatible broker, installed by scripts/setup.sh):
/// TANSU_BIN (set by scripts/setup.sh), else the one setup installs under the model-service cache,
/// else `tansu` on PATH.
pub fn tansu_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANSU_BIN") {
        return bin.into();
    }
    let cache = std::env::var_os("MODEL_SERVICE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/model-service"));
    let installed = cache.join("tansu-0.6.0/bin/tansu");
    if installed.exists() {
        installed
    } else {
        "tansu".into()
    }
}

/// A message as read back: its value and its headers (name, value as text).
pub type Letter = (Vec<u8>, Vec<(String, String)>);

/// A real Kafka-compatible broker (tansu) on a free loopback port, storing topics, events and
/// committed offsets in SQLite under a scratch directory, so a restart keeps them.
pub struct Kafka {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Kafka {
    pub fn start() -> Self {
        let port = free_port();
        let dir = scratch_dir(&format!("kafka-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut kafka = Self { port, dir, child: None };
        kafka.restart();
        kafka
    }

    /// (Re)starts the broker on the same port and storage; returns once it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("broker.log")).unwrap();
        let child = Command::new(tansu_bin())
            .current_dir(&self.dir)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            // TEST_TANSU_LOG=info (or debug) keeps the broker's log in broker.log
            .env("RUST_LOG", std::env::var("TEST_TANSU_LOG").unwrap_or_else(|_| "off".into()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tansu must be installed (scripts/setup.sh installs it; or set TANSU_BIN)");
        self.child = Some(child);
        wait_until(Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok());
    }

    /// SIGKILL: the broker goes away at once, mid-stream.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(tansu_bin())
            .args(["topic", "create", name, "--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .args(["--partitions", &partitions.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "tansu topic create {name}: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn producer(&self) -> rdkafka::producer::BaseProducer {
        rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("linger.ms", "5")
            .create()
            .unwrap()
    }

    /// Produces `(key, value)` messages to `topic` and waits until every one is acknowledged.
    pub fn produce(&self, producer: &rdkafka::producer::BaseProducer, topic: &str, messages: &[(String, Vec<u8>)]) {
        use rdkafka::producer::{BaseRecord, Producer};
        for (key, value) in messages {
            let mut record = BaseRecord::to(topic).key(key.as_str()).payload(value.as_slice());
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(60)).expect("every message acknowledged");
    }

    /// Reads `topic` from the beginning until `n` messages arrived (at most `limit`): each as its
    /// value and headers.
    pub fn read_all(&self, topic: &str, n: usize, limit: Duration) -> Vec<Letter> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", format!("test-reader-{}", free_port()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let start = Instant::now();
        let mut out = Vec::new();
        while out.len() < n && start.elapsed() < limit {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((m.payload().unwrap_or_default().to_vec(), headers));
            }
        }
        out
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        self.kill();
    }
}
