//! The one configuration struct: every flag has an environment-variable fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::error::ConfigError;

#[derive(Debug, Parser)]
#[command(
    name = "model-service",
    version,
    about = "Recommendation server: LightGCN -> DIN -> RankNet between Redis and HTTP"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API.
    Serve {
        /// Also run the listener (see `listen`) in this process.
        #[arg(long, env = "LISTEN")]
        listen: bool,
        /// Also run the Kafka ingestion (see `ingest`) in this process.
        #[arg(long, env = "INGEST")]
        ingest: bool,
    },
    /// Recompute recommendations when profiles change (keyspace notifications, the request
    /// stream, periodic catch-up); serves only /health and /metrics over HTTP.
    Listen {
        /// Also run the Kafka ingestion (see `ingest`) in this process.
        #[arg(long, env = "INGEST")]
        ingest: bool,
    },
    /// Consume behaviour events from Kafka (KAFKA_TOPIC, consumer group KAFKA_GROUP), append each
    /// interaction to `user_profile:<user_id>` and recompute that user's recommendations; serves
    /// only /health and /metrics over HTTP.
    Ingest,
    /// Recompute the recommendations of every profile found by SCAN, then exit (resumable).
    Backfill {
        /// Start from the beginning instead of resuming an interrupted backfill.
        #[arg(long)]
        restart: bool,
    },
    /// Run the pipeline once for USER_ID, write Redis like the server does, print the JSON response.
    Recommend {
        user_id: String,
        /// Number of items to return (default: --default-k).
        #[arg(long)]
        k: Option<usize>,
    },
    /// Load and validate MODEL_DIR, run a smoke batch, print a summary.
    Check,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub redis: crate::redis::settings::RedisArgs,

    /// Directory with manifest.json, catalog.tsv and lightgcn/, din/, ranknet/.
    #[arg(long, env = "MODEL_DIR", default_value = "./model_output", global = true)]
    pub model_dir: PathBuf,
    /// auto | cpu | cuda | cuda:N (auto: CUDA when available).
    #[arg(long, env = "DEVICE", default_value = "auto", global = true)]
    pub device: String,
    /// Inference workers: threads that each hold a copy of the models and run batches.
    /// Default measured on 2 cores: two workers with one libtorch thread each beat one worker with
    /// two (README).
    #[arg(long, env = "INFERENCE_WORKERS", default_value_t = 2, global = true)]
    pub inference_workers: usize,
    /// libtorch intra-op threads of each inference worker (0: the machine's cores divided among
    /// the workers, so inference never asks for more threads than there are cores).
    #[arg(long, env = "TORCH_THREADS", default_value_t = 0, global = true)]
    pub torch_threads: usize,

    #[arg(long, env = "HOST", default_value = "0.0.0.0", global = true)]
    pub host: String,
    #[arg(long, env = "PORT", default_value_t = 8001, global = true)]
    pub port: u16,
    /// Serve the admin routes (POST /admin/reload) on this port of ADMIN_HOST only, instead of on
    /// PORT. There they need API_TOKEN only when it is set; on PORT they always need it.
    #[arg(long, env = "ADMIN_PORT", global = true)]
    pub admin_port: Option<u16>,
    /// Loopback address of the admin port (127.0.0.1, ::1, ...); other addresses are refused.
    #[arg(long, env = "ADMIN_HOST", default_value = "127.0.0.1", global = true)]
    pub admin_host: String,
    /// Largest request target plus headers accepted, in bytes (431 beyond).
    #[arg(long, env = "MAX_HEADER_BYTES", default_value_t = 8192, global = true)]
    pub max_header_bytes: usize,
    /// Seconds allowed to receive a request head (request line and headers), from its first byte
    /// (from the opening for a new connection). The connection is closed beyond.
    #[arg(long, env = "HEADER_READ_TIMEOUT_SECS", default_value_t = 10.0, global = true)]
    pub header_read_timeout_secs: f64,
    /// Seconds a keep-alive connection may stay idle after a response before the first byte of
    /// its next request; closed beyond. Above a load balancer's idle timeout (60 s for most).
    #[arg(long, env = "IDLE_TIMEOUT_SECS", default_value_t = 75.0, global = true)]
    pub idle_timeout_secs: f64,
    /// Seconds allowed to receive a request body once its head has arrived (408 beyond).
    #[arg(long, env = "BODY_READ_TIMEOUT_SECS", default_value_t = 10.0, global = true)]
    pub body_read_timeout_secs: f64,
    /// Connections open at once on each listener. At the cap a new connection closes the oldest
    /// one without a request in flight; when every one has a request in flight it is refused.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 512, global = true)]
    pub max_connections: usize,
    /// Seconds a reload (POST /admin/reload, SIGHUP) may take; beyond, the request gets 503
    /// `reload_timeout`, the load's result is discarded, and reloads get 409 until it has ended.
    #[arg(long, env = "RELOAD_TIMEOUT_SECS", default_value_t = 120.0, global = true)]
    pub reload_timeout_secs: f64,
    /// Largest file of a model directory (catalog.tsv, manifest.json, */model.pt) that is read;
    /// each must also be a regular file (symlinks are followed).
    #[arg(long, env = "MAX_MODEL_FILE_BYTES", default_value_t = 4 << 30, global = true)]
    pub max_model_file_bytes: u64,

    /// Lifetime of recommendations:<user_id>, in seconds.
    #[arg(long, env = "RECOMMENDATION_TTL", default_value_t = 3600, global = true)]
    pub recommendation_ttl: u64,
    /// List length when the request gives no k.
    #[arg(long, env = "DEFAULT_K", default_value_t = 10, global = true)]
    pub default_k: usize,
    /// Largest k a request may ask for.
    #[arg(long, env = "MAX_K", default_value_t = 100, global = true)]
    pub max_k: usize,
    /// Candidates kept after LightGCN (scored by DIN).
    #[arg(long, env = "LIGHTGCN_CANDIDATES", default_value_t = 600, global = true)]
    pub lightgcn_candidates: usize,
    /// How LightGCN finds its candidates: exact (score every item), ivf (search an inverted-file
    /// index over its item vectors, built when the model set loads: approximate, for large
    /// catalogs; docs/performance.md "Approximate candidate search" has its measured recall), auto (ivf from
    /// IVF_MIN_ITEMS items).
    #[arg(long, env = "CANDIDATE_SEARCH", value_enum, default_value = "exact", global = true)]
    pub candidate_search: crate::inference::ivf::CandidateSearch,
    /// With CANDIDATE_SEARCH=auto, the smallest catalog searched through the IVF index.
    #[arg(long, env = "IVF_MIN_ITEMS", default_value_t = 200_000, global = true)]
    pub ivf_min_items: usize,
    /// Lists of the IVF index (0: about 4 times the square root of the catalog size).
    #[arg(long, env = "IVF_LISTS", default_value_t = 0, global = true)]
    pub ivf_lists: usize,
    /// IVF lists scanned per profile (more when they hold too few items for the candidates; 0: one
    /// list in 8).
    #[arg(long, env = "IVF_PROBES", default_value_t = 0, global = true)]
    pub ivf_probes: usize,
    /// Candidates kept after DIN (ordered by RankNet).
    #[arg(long, env = "DIN_CANDIDATES", default_value_t = 100, global = true)]
    pub din_candidates: usize,
    /// The stage whose order is returned: ranknet (the full cascade), or din / lightgcn to stop
    /// early (ablations, the quality table).
    #[arg(long, env = "LAST_STAGE", value_enum, default_value = "ranknet", global = true)]
    pub last_stage: crate::inference::models::Stage,
    /// Profile items used: the most recent (last in the JSON array) are kept.
    #[arg(long, env = "MAX_HISTORY", default_value_t = 200, global = true)]
    pub max_history: usize,
    /// Largest stored profile read, in bytes (422 `profile_too_large` beyond; the value is not
    /// transferred).
    #[arg(long, env = "MAX_PROFILE_BYTES", default_value_t = 256 * 1024, global = true)]
    pub max_profile_bytes: usize,
    /// Most item ids a profile may hold (422 `profile_too_long` beyond). Every one of them is
    /// excluded from the recommendations, whatever MAX_HISTORY the models see.
    #[arg(long, env = "MAX_PROFILE_ITEMS", default_value_t = 10_000, global = true)]
    pub max_profile_items: usize,

    /// Most requests an inference worker runs as one batch.
    #[arg(long, env = "MAX_BATCH", default_value_t = 16, global = true)]
    pub max_batch: usize,
    /// How long (microseconds) an inference worker holding fewer than MAX_BATCH requests waits
    /// for more before it runs them, when under load (its previous batch held more than one
    /// request); 0 (the default, measured on 2 cores with the shipped models:
    /// docs/performance.md): run what is queued at once.
    #[arg(long, env = "MAX_QUEUE_DELAY_US", default_value_t = 0, global = true)]
    pub max_queue_delay_us: u64,
    /// Requests that may wait for the inference workers; beyond that requests get 429.
    #[arg(long, env = "QUEUE_CAPACITY", default_value_t = 256, global = true)]
    pub queue_capacity: usize,
    /// Deadline for one recommendation (queue wait and inference), in milliseconds.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 5000, global = true)]
    pub request_timeout_ms: u64,

    /// When set, the ranking routes (POST /recommend/{user_id}, GET /recommendations/{user_id},
    /// POST /recommend) and the admin routes require `Authorization: Bearer <API_TOKEN>` (401
    /// otherwise); /health and /metrics stay open (/health shows the model directory in full and
    /// the Redis nodes' addresses only with the token).
    #[arg(long, env = "API_TOKEN", hide_env_values = true, global = true)]
    pub api_token: Option<String>,
    /// Log lines as `text` or `json` (one JSON object per line, for log shippers).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub listener: ListenerArgs,
    #[command(flatten)]
    pub ingest: IngestArgs,
    #[command(flatten)]
    pub webhook: crate::webhook::WebhookArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of the listener (`listen`, `serve --listen`, `backfill`).
#[derive(Debug, Clone, Args)]
pub struct ListenerArgs {
    /// Stream of recommendation requests (field `user_id`), consumed through a consumer group.
    #[arg(long, env = "REQUEST_STREAM", default_value = "recommend_requests", global = true)]
    pub request_stream: String,
    #[arg(long, env = "CONSUMER_GROUP", default_value = "model-service", global = true)]
    pub consumer_group: String,
    /// This replica's consumer name (default: hostname-pid).
    #[arg(long, env = "CONSUMER_NAME", global = true)]
    pub consumer_name: Option<String>,
    /// Where entries go after MAX_ATTEMPTS failures or a permanent error, with the reason.
    #[arg(long, env = "DEAD_LETTER_STREAM", default_value = "recommend_requests:dead", global = true)]
    pub dead_letter_stream: String,
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 5, global = true)]
    pub max_attempts: u64,
    /// Most entries kept in the dead-letter stream (the oldest are trimmed).
    #[arg(long, env = "DEAD_LETTER_MAXLEN", default_value_t = 10_000, global = true)]
    pub dead_letter_maxlen: usize,
    /// Entries pending this long (a dead or failing consumer) are claimed and retried.
    #[arg(long, env = "CLAIM_IDLE_MS", default_value_t = 5000, global = true)]
    pub claim_idle_ms: u64,
    /// Interval of the catch-up scan for profiles whose recommendations are missing or stale.
    #[arg(long, env = "CATCHUP_INTERVAL_SECS", default_value_t = 300, global = true)]
    pub catchup_interval_secs: u64,
    /// Recommendations computed at once by the listener.
    #[arg(long, env = "LISTENER_CONCURRENCY", default_value_t = 16, global = true)]
    pub listener_concurrency: usize,
    /// Distinct users waiting in the listener's queue; beyond that, events are dropped and a
    /// catch-up scan recovers them.
    #[arg(long, env = "MAX_PENDING_USERS", default_value_t = 100_000, global = true)]
    pub max_pending_users: usize,
    /// Enable keyspace notifications with CONFIG SET when they are off.
    #[arg(long, env = "CONFIGURE_NOTIFICATIONS", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub configure_notifications: bool,
    /// How long a listener replica holds its claim on a user it is recomputing (a key in the
    /// user's slot); the other replicas skip that user meanwhile and look again once it expires,
    /// so a replica that dies mid-computation delays its users by at most this much.
    #[arg(long, env = "USER_CLAIM_MS", default_value_t = 10_000, global = true)]
    pub user_claim_ms: u64,
    /// Time allowed to finish in-flight HTTP requests and listener work on SIGTERM / Ctrl-C.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 30, global = true)]
    pub shutdown_grace_secs: u64,
}

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

    fn validate(&self) -> Result<(), ConfigError> {
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

impl ListenerArgs {
    pub fn consumer(&self) -> String {
        self.consumer_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
            format!("{}-{}", if host.is_empty() { "model-service" } else { &host }, std::process::id())
        })
    }
}

impl Config {
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        let text = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        text.parse().map_err(|_| ConfigError::Invalid(format!("HOST/PORT do not form an address: {text}")))
    }

    /// The admin listener's address, when ADMIN_PORT is set; ADMIN_HOST must be a loopback address.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(port) = self.admin_port else { return Ok(None) };
        let ip: std::net::IpAddr = self.admin_host.trim_matches(['[', ']']).parse().map_err(|_| {
            ConfigError::Invalid(format!("ADMIN_HOST must be a loopback IP address, got {:?}", self.admin_host))
        })?;
        if !ip.is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "ADMIN_HOST must be a loopback address (127.0.0.1 or ::1), got {ip}: the admin routes are not \
                 served beyond this machine"
            )));
        }
        Ok(Some(SocketAddr::new(ip, port)))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.header_read_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout_secs)
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.body_read_timeout_secs)
    }

    pub fn reload_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.reload_timeout_secs)
    }

    /// TORCH_THREADS, or the cores divided among the inference workers (at least 1).
    pub fn torch_threads_per_worker(&self) -> usize {
        if self.torch_threads > 0 {
            return self.torch_threads;
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / self.inference_workers.max(1)).max(1)
    }

    /// Checks that do not need the models or Redis.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("DEFAULT_K", self.default_k),
            ("MAX_K", self.max_k),
            ("LIGHTGCN_CANDIDATES", self.lightgcn_candidates),
            ("DIN_CANDIDATES", self.din_candidates),
            ("MAX_HISTORY", self.max_history),
            ("MAX_PROFILE_BYTES", self.max_profile_bytes),
            ("MAX_PROFILE_ITEMS", self.max_profile_items),
            ("DEAD_LETTER_MAXLEN", self.listener.dead_letter_maxlen),
            ("MAX_BATCH", self.max_batch),
            ("INFERENCE_WORKERS", self.inference_workers),
            ("QUEUE_CAPACITY", self.queue_capacity),
            ("LISTENER_CONCURRENCY", self.listener.listener_concurrency),
            ("MAX_PENDING_USERS", self.listener.max_pending_users),
            ("MAX_HEADER_BYTES", self.max_header_bytes),
            ("MAX_CONNECTIONS", self.max_connections),
            ("MAX_MODEL_FILE_BYTES", usize::try_from(self.max_model_file_bytes).unwrap_or(usize::MAX)),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.default_k > self.max_k {
            return Err(ConfigError::Invalid(format!("DEFAULT_K ({}) exceeds MAX_K ({})", self.default_k, self.max_k)));
        }
        if self.din_candidates > self.lightgcn_candidates {
            return Err(ConfigError::Invalid(format!(
                "DIN_CANDIDATES ({}) exceeds LIGHTGCN_CANDIDATES ({})",
                self.din_candidates, self.lightgcn_candidates
            )));
        }
        if self.max_k > self.din_candidates {
            return Err(ConfigError::Invalid(format!(
                "MAX_K ({}) exceeds DIN_CANDIDATES ({}): the final list is drawn from DIN's candidates",
                self.max_k, self.din_candidates
            )));
        }
        let timeouts = [
            ("HEADER_READ_TIMEOUT_SECS", self.header_read_timeout_secs),
            ("BODY_READ_TIMEOUT_SECS", self.body_read_timeout_secs),
            ("IDLE_TIMEOUT_SECS", self.idle_timeout_secs),
            ("RELOAD_TIMEOUT_SECS", self.reload_timeout_secs),
        ];
        for (name, secs) in timeouts {
            if !(secs > 0.0 && secs <= 86_400.0) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be above 0 and at most 86400 seconds, got {secs}"
                )));
            }
        }
        if self.recommendation_ttl == 0 {
            return Err(ConfigError::Invalid("RECOMMENDATION_TTL must be at least 1 second".into()));
        }
        if let Some(token) = &self.api_token {
            if token.trim().is_empty() {
                return Err(ConfigError::Invalid(
                    "API_TOKEN is set but empty: an empty token would switch authentication off; set a token, \
                     or unset API_TOKEN"
                        .into(),
                ));
            }
            if token.trim() != token || token.chars().any(|c| c.is_control()) {
                return Err(ConfigError::Invalid(
                    "API_TOKEN has leading or trailing whitespace or control characters: a client cannot send it \
                     in an Authorization header"
                        .into(),
                ));
            }
        }
        self.redis.topology()?;
        self.listen_addr()?;
        self.admin_addr()?;
        self.ingest.validate()?;
        self.webhook.validate()?;
        crate::inference::device::DeviceChoice::parse(&self.device)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).expect("parse")
    }

    #[test]
    fn defaults_match_the_python_service() {
        let cli = parse(&["model-service", "serve"]);
        assert!(matches!(cli.command, Command::Serve { listen: false, ingest: false }));
        let c = cli.config;
        assert_eq!((c.redis.redis_host.as_str(), c.redis.redis_port, c.redis.redis_db), ("localhost", 6379, 0));
        assert_eq!(c.listen_addr().unwrap().to_string(), "0.0.0.0:8001");
        assert_eq!((c.recommendation_ttl, c.default_k, c.max_k), (3600, 10, 100));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn inconsistent_candidate_counts_are_refused() {
        let cli = parse(&["model-service", "--lightgcn-candidates", "50", "--din-candidates", "100", "serve"]);
        let err = cli.config.validate().unwrap_err().to_string();
        assert!(err.contains("DIN_CANDIDATES"), "{err}");
    }

    #[test]
    fn the_admin_port_is_loopback_only() {
        let ok = parse(&["model-service", "--admin-port", "9001", "serve"]).config;
        assert_eq!(ok.admin_addr().unwrap().unwrap().to_string(), "127.0.0.1:9001");
        let v6 = parse(&["model-service", "--admin-port", "9001", "--admin-host", "::1", "serve"]).config;
        assert_eq!(v6.admin_addr().unwrap().unwrap().to_string(), "[::1]:9001");
        let public = parse(&["model-service", "--admin-port", "9001", "--admin-host", "0.0.0.0", "serve"]).config;
        assert!(public.validate().unwrap_err().to_string().contains("loopback"));
        assert!(parse(&["model-service", "serve"]).config.admin_addr().unwrap().is_none());
    }

    #[test]
    fn an_empty_or_blank_api_token_is_refused() {
        for token in ["", " ", "\t  "] {
            let cli = parse(&["model-service", "--api-token", token, "serve"]);
            let err = cli.config.validate().unwrap_err().to_string();
            assert!(err.contains("API_TOKEN is set but empty") && !err.contains('\n'), "{err}");
        }
        let padded = parse(&["model-service", "--api-token", " secret", "serve"]).config;
        assert!(padded.validate().unwrap_err().to_string().contains("whitespace"));
        assert!(parse(&["model-service", "--api-token", "s3cret", "serve"]).config.validate().is_ok());
    }

    #[test]
    fn timeouts_must_be_positive() {
        for (flag, name) in [
            ("--header-read-timeout-secs", "HEADER_READ_TIMEOUT_SECS"),
            ("--body-read-timeout-secs", "BODY_READ_TIMEOUT_SECS"),
            ("--idle-timeout-secs", "IDLE_TIMEOUT_SECS"),
            ("--reload-timeout-secs", "RELOAD_TIMEOUT_SECS"),
        ] {
            for value in ["0", "NaN", "1e9"] {
                let err = parse(&["model-service", flag, value, "serve"]).config.validate().unwrap_err().to_string();
                assert!(err.contains(name), "{err}");
            }
        }
        let c = parse(&["model-service", "--reload-timeout-secs", "0.05", "serve"]).config;
        assert_eq!(c.reload_timeout(), Duration::from_millis(50));
        assert!(parse(&["model-service", "--max-connections", "0", "serve"]).config.validate().is_err());
    }

    #[test]
    fn kafka_settings_are_checked() {
        let c = parse(&["model-service", "ingest"]).config;
        assert_eq!(
            (c.ingest.kafka_topic.as_str(), c.ingest.kafka_brokers.as_str()),
            ("user-behavior", "localhost:9092")
        );
        assert_eq!(c.ingest.event_types().len(), 3);
        let types = parse(&["model-service", "--ingest-event-types", "purchase, cart", "ingest"]).config;
        assert!(types.ingest.event_types().contains("cart"));
        for (args, want) in [
            (&["--kafka-security-protocol", "tls"][..], "KAFKA_SECURITY_PROTOCOL"),
            (&["--kafka-security-protocol", "sasl_ssl"][..], "KAFKA_SASL_MECHANISM"),
            (&["--kafka-security-protocol", "sasl_ssl", "--kafka-sasl-mechanism", "PLAIN"][..], "KAFKA_SASL_USERNAME"),
            (&["--kafka-dead-letter-topic", "user-behavior"][..], "differ"),
            (&["--ingest-event-types", ","][..], "INGEST_EVENT_TYPES"),
            (&["--ingest-batch", "0"][..], "INGEST_BATCH"),
        ] {
            let mut argv = vec!["model-service"];
            argv.extend_from_slice(args);
            argv.push("ingest");
            let err = parse(&argv).config.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_redis_topology_comes_from_the_settings() {
        let single = parse(&["model-service", "serve"]).config;
        assert_eq!(single.redis.topology().unwrap(), crate::redis::settings::RedisTopology::Single);
        let cluster = parse(&["model-service", "--redis-cluster-nodes", "a:7000, [::1]:7001", "serve"]).config;
        assert_eq!(
            cluster.redis.topology().unwrap(),
            crate::redis::settings::RedisTopology::Cluster(vec![("a".into(), 7000), ("::1".into(), 7001)])
        );
        for args in [
            &["model-service", "--redis-cluster-nodes", "a:7000", "--redis-db", "2", "serve"][..],
            &["model-service", "--redis-cluster-nodes", "a:7000", "--redis-url", "redis://a:7000/3", "serve"],
        ] {
            let err = parse(args).config.validate().unwrap_err().to_string();
            assert!(err.contains("only database 0"), "{err}");
        }
        let bad = parse(&["model-service", "--redis-cluster-nodes", "a", "serve"]).config;
        assert!(bad.validate().unwrap_err().to_string().contains("host:port"));
        let sentinel =
            parse(&["model-service", "--redis-sentinels", "s:26379", "--redis-sentinel-master", "m", "serve"]).config;
        assert_eq!(
            sentinel.redis.topology().unwrap(),
            crate::redis::settings::RedisTopology::Sentinel {
                sentinels: vec![("s".into(), 26379)],
                master: "m".into()
            }
        );
        let nameless = parse(&["model-service", "--redis-sentinels", "s:1", "serve"]).config;
        assert!(nameless.validate().unwrap_err().to_string().contains("REDIS_SENTINEL_MASTER"));
        let empty = parse(&["model-service", "--redis-cluster-nodes", "", "--redis-sentinels", " ", "serve"]).config;
        assert_eq!(empty.redis.topology().unwrap(), crate::redis::settings::RedisTopology::Single);
    }

    #[test]
    fn bad_device_is_refused() {
        let cli = parse(&["model-service", "--device", "tpu", "check"]);
        assert!(cli.config.validate().unwrap_err().to_string().contains("DEVICE"));
    }
}
