//! The Kafka connection (`KAFKA_BROKERS`, `KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_*`, `KAFKA_SSL_*`),
//! shared by the ingestion's consumer and dead-letter producer and by the impressions' producer.

use std::path::PathBuf;

use clap::Args;
use rdkafka::config::ClientConfig;

use crate::error::ConfigError;

/// Where the brokers are and how to reach them.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092", global = true)]
    pub kafka_brokers: String,
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
}

impl KafkaArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.kafka_brokers.trim().is_empty() {
            return bad("KAFKA_BROKERS must not be empty".into());
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
        Ok(())
    }

    /// The settings every client of this service shares: brokers, TLS, SASL, reconnection.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.kafka_brokers)
            .set("client.id", "model-service")
            .set("security.protocol", self.kafka_security_protocol.to_ascii_lowercase())
            // a broker that went away is dialled again with backoff, never in a busy loop
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "5000");
        if let Some(m) = &self.kafka_sasl_mechanism {
            cfg.set("sasl.mechanism", m);
        }
        if let Some(u) = &self.kafka_sasl_username {
            cfg.set("sasl.username", u);
        }
        if let Some(p) = &self.kafka_sasl_password {
            cfg.set("sasl.password", p);
        }
        let path = |p: &PathBuf| p.display().to_string();
        if let Some(p) = &self.kafka_ssl_ca_location {
            cfg.set("ssl.ca.location", path(p));
        }
        if let Some(p) = &self.kafka_ssl_certificate_location {
            cfg.set("ssl.certificate.location", path(p));
        }
        if let Some(p) = &self.kafka_ssl_key_location {
            cfg.set("ssl.key.location", path(p));
        }
        cfg
    }
}
