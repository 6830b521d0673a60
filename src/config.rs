//! The commands and their configuration: `Config` flattens each subsystem's own settings (every flag
//! with an environment-variable fallback) and checks the rules that span sections.

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
    #[command(flatten)]
    pub engine: crate::inference::settings::EngineArgs,
    #[command(flatten)]
    pub service: crate::service::settings::ServiceArgs,
    #[command(flatten)]
    pub http: crate::api::settings::HttpArgs,
    /// Log lines as `text` or `json` (one JSON object per line, for log shippers).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub listener: crate::workers::listener::ListenerArgs,
    #[command(flatten)]
    pub kafka: crate::kafka::KafkaArgs,
    #[command(flatten)]
    pub ingest: crate::workers::ingest::settings::IngestArgs,
    #[command(flatten)]
    pub webhook: crate::webhook::WebhookArgs,
    #[command(flatten)]
    pub impressions: crate::impressions::ImpressionsArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Checks that do not need the models or Redis: each section's own, then those across them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.redis.topology()?;
        self.engine.validate()?;
        self.service.validate()?;
        self.http.validate()?;
        self.listener.validate()?;
        self.kafka.validate()?;
        self.ingest.validate()?;
        self.webhook.validate()?;
        self.impressions.validate()?;
        if self.service.max_k > self.engine.din_candidates {
            return Err(ConfigError::Invalid(format!(
                "MAX_K ({}) exceeds DIN_CANDIDATES ({}): the final list is drawn from DIN's candidates",
                self.service.max_k, self.engine.din_candidates
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).expect("parse")
    }

    /// The defaults are one valid configuration: every section validates, the cross-section
    /// rules hold, and the engine's settings can be built (the values themselves are held against
    /// README's table by tests/configuration.rs).
    #[test]
    fn the_defaults_are_a_valid_configuration() {
        let cli = parse(&["model-service", "serve"]);
        assert!(matches!(cli.command, Command::Serve { listen: false, ingest: false }));
        let c = cli.config;
        c.validate().expect("the defaults validate");
        let engine = c.engine.engine_config().expect("the default engine settings");
        assert!(engine.din_candidates >= c.service.max_k && engine.lightgcn_candidates >= engine.din_candidates);
        assert!(c.http.admin_addr().unwrap().is_none(), "the admin routes are on the main port by default");
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
        assert_eq!(ok.http.admin_addr().unwrap().unwrap().to_string(), "127.0.0.1:9001");
        let v6 = parse(&["model-service", "--admin-port", "9001", "--admin-host", "::1", "serve"]).config;
        assert_eq!(v6.http.admin_addr().unwrap().unwrap().to_string(), "[::1]:9001");
        let public = parse(&["model-service", "--admin-port", "9001", "--admin-host", "0.0.0.0", "serve"]).config;
        assert!(public.validate().unwrap_err().to_string().contains("loopback"));
        assert!(parse(&["model-service", "serve"]).config.http.admin_addr().unwrap().is_none());
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
        assert_eq!(c.engine.reload_timeout(), std::time::Duration::from_millis(50));
        assert!(parse(&["model-service", "--max-connections", "0", "serve"]).config.validate().is_err());
    }

    #[test]
    fn kafka_settings_are_checked() {
        let c = parse(&["model-service", "ingest"]).config;
        assert_eq!(
            (c.ingest.kafka_topic.as_str(), c.kafka.kafka_brokers.as_str()),
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
