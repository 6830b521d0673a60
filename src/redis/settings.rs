//! The Redis settings (`REDIS_*`, `NOTIFY_CHANNEL`): the section of the configuration the Redis
//! layer is handed, and the topology they describe.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::error::SettingsError;

#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Full Redis URL (redis:// or rediss://); overrides the REDIS_HOST/PORT/DB/PASSWORD settings.
    #[arg(long, env = "REDIS_URL", global = true)]
    pub redis_url: Option<String>,
    #[arg(long, env = "REDIS_HOST", default_value = "localhost", global = true)]
    pub redis_host: String,
    #[arg(long, env = "REDIS_PORT", default_value_t = 6379, global = true)]
    pub redis_port: u16,
    #[arg(long, env = "REDIS_DB", default_value_t = 0, global = true)]
    pub redis_db: i64,
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true, global = true)]
    pub redis_password: Option<String>,
    /// Connect to REDIS_HOST:REDIS_PORT over TLS (as a rediss:// REDIS_URL does).
    #[arg(long, env = "REDIS_TLS", default_value_t = false, action = clap::ArgAction::Set, global = true)]
    pub redis_tls: bool,
    /// PEM file of the CA(s) that sign the Redis server's certificate (default: the system's roots).
    #[arg(long, env = "REDIS_TLS_CA_CERT", global = true)]
    pub redis_tls_ca_cert: Option<PathBuf>,
    /// PEM client certificate and key, for Redis servers that require client certificates
    /// (tls-auth-clients yes).
    #[arg(long, env = "REDIS_TLS_CLIENT_CERT", requires = "redis_tls_client_key", global = true)]
    pub redis_tls_client_cert: Option<PathBuf>,
    #[arg(long, env = "REDIS_TLS_CLIENT_KEY", requires = "redis_tls_client_cert", global = true)]
    pub redis_tls_client_key: Option<PathBuf>,
    /// Redis Cluster: seed nodes as `host:port,host:port,...` (any reachable ones; the rest of the
    /// cluster is discovered). Password and TLS settings apply to every node; REDIS_DB must be 0.
    #[arg(long, env = "REDIS_CLUSTER_NODES", global = true)]
    pub redis_cluster_nodes: Option<String>,
    /// Redis Sentinel: the sentinels as `host:port,host:port,...`; the service talks to the master
    /// they name for REDIS_SENTINEL_MASTER and follows failovers.
    #[arg(long, env = "REDIS_SENTINELS", global = true)]
    pub redis_sentinels: Option<String>,
    /// The master's name in the sentinels' configuration (`sentinel monitor <name> ...`).
    #[arg(long, env = "REDIS_SENTINEL_MASTER", global = true)]
    pub redis_sentinel_master: Option<String>,
    /// Bound on connecting to Redis, in milliseconds.
    #[arg(long, env = "REDIS_CONNECT_TIMEOUT_MS", default_value_t = 300, global = true)]
    pub redis_connect_timeout_ms: u64,
    /// Bound on one Redis command, in milliseconds.
    #[arg(long, env = "REDIS_RESPONSE_TIMEOUT_MS", default_value_t = 500, global = true)]
    pub redis_response_timeout_ms: u64,
    /// Channel on which the user id is published after each write of recommendations.
    #[arg(long, env = "NOTIFY_CHANNEL", default_value = "recommendations_updated", global = true)]
    pub notify_channel: String,
}

/// The Redis deployment the settings name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTopology {
    /// One node: REDIS_URL or REDIS_HOST/PORT.
    Single,
    /// Redis Cluster, from these seed nodes.
    Cluster(Vec<(String, u16)>),
    /// The master that these sentinels name for `master`.
    Sentinel { sentinels: Vec<(String, u16)>, master: String },
}

impl RedisArgs {
    /// Which Redis topology the settings describe; a cluster with a database other than 0, or
    /// both a cluster and sentinels, is refused.
    pub fn topology(&self) -> Result<RedisTopology, SettingsError> {
        let list = |name: &str, value: &str| -> Result<Vec<(String, u16)>, SettingsError> {
            let nodes = value
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| {
                    let (host, port) =
                        n.rsplit_once(':').ok_or_else(|| SettingsError(format!("{name}: {n:?} is not host:port")))?;
                    let port = port.parse().map_err(|_| SettingsError(format!("{name}: bad port in {n:?}")))?;
                    Ok((host.trim_matches(['[', ']']).to_string(), port))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if nodes.is_empty() {
                return Err(SettingsError(format!("{name} is set but names no host:port")));
            }
            Ok(nodes)
        };
        // Set but empty (a compose file's `${REDIS_CLUSTER_NODES:-}`) counts as unset.
        fn given(v: &Option<String>) -> Option<&String> {
            v.as_ref().filter(|v| !v.trim().is_empty())
        }
        let (cluster, sentinels, master) =
            (given(&self.redis_cluster_nodes), given(&self.redis_sentinels), given(&self.redis_sentinel_master));
        match (cluster, sentinels, master) {
            (Some(_), Some(_), _) => {
                Err(SettingsError("REDIS_CLUSTER_NODES and REDIS_SENTINELS are both set: choose one topology".into()))
            }
            (Some(nodes), None, _) => {
                let db = self.url_db().unwrap_or(self.redis_db);
                if db != 0 {
                    return Err(SettingsError(format!(
                        "REDIS_CLUSTER_NODES is set with database {db}: a Redis Cluster has only database 0 \
                         (unset REDIS_DB or set it to 0)"
                    )));
                }
                Ok(RedisTopology::Cluster(list("REDIS_CLUSTER_NODES", nodes)?))
            }
            (None, Some(sentinels), Some(master)) => {
                Ok(RedisTopology::Sentinel { sentinels: list("REDIS_SENTINELS", sentinels)?, master: master.clone() })
            }
            (None, Some(_), None) => Err(SettingsError("REDIS_SENTINELS is set without REDIS_SENTINEL_MASTER".into())),
            (None, None, _) => Ok(RedisTopology::Single),
        }
    }

    /// The database of REDIS_URL's path (`redis://host/3`), when it names one.
    fn url_db(&self) -> Option<i64> {
        let url = self.redis_url.as_deref()?;
        let rest = url.split_once("://")?.1;
        let path = rest.split_once('/')?.1.split(['?', '#']).next()?;
        path.parse().ok()
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_connect_timeout_ms)
    }

    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_response_timeout_ms)
    }
}
