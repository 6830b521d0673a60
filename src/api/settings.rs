//! The HTTP settings (address, admin address, limits and timeouts of connections, the token,
//! the shutdown grace): the section of the configuration the listeners and routes are built from.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::error::ConfigError;

#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
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
    /// When set, the ranking routes (POST /recommend/{user_id}, GET /recommendations/{user_id},
    /// POST /recommend) and the admin routes require `Authorization: Bearer <API_TOKEN>` (401
    /// otherwise); /health and /metrics stay open (/health shows the model directory in full and
    /// the Redis nodes' addresses only with the token).
    #[arg(long, env = "API_TOKEN", hide_env_values = true, global = true)]
    pub api_token: Option<String>,
    /// Time allowed to finish in-flight HTTP requests and listener work on SIGTERM / Ctrl-C.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 30, global = true)]
    pub shutdown_grace_secs: u64,
}

impl HttpArgs {
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
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.header_read_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout_secs)
    }
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.body_read_timeout_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [("MAX_HEADER_BYTES", self.max_header_bytes), ("MAX_CONNECTIONS", self.max_connections)] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        let timeouts = [
            ("HEADER_READ_TIMEOUT_SECS", self.header_read_timeout_secs),
            ("BODY_READ_TIMEOUT_SECS", self.body_read_timeout_secs),
            ("IDLE_TIMEOUT_SECS", self.idle_timeout_secs),
        ];
        for (name, secs) in timeouts {
            if !(secs > 0.0 && secs <= 86_400.0) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be above 0 and at most 86400 seconds, got {secs}"
                )));
            }
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
        self.listen_addr()?;
        self.admin_addr()?;
        Ok(())
    }
}
