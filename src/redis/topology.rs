//! Which Redis the service talks to, and the connections to it: one node (REDIS_URL or
//! REDIS_HOST/PORT), a Redis Cluster (REDIS_CLUSTER_NODES: the redis crate's cluster client routes
//! every command by slot and follows MOVED, ASK and failovers), or the master that Redis Sentinel
//! names (REDIS_SENTINELS + REDIS_SENTINEL_MASTER: asked again after every connection failure).
//! The rest of the Redis layer talks to `Backend` and asks `kind()` only where a cluster cannot do
//! what one node does (commands over keys of different slots, see `store`).

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use ::redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, TlsCertificates, TlsMode, Value,
};
use serde::Serialize;

use super::error::SettingsError;
use super::settings::{RedisArgs, RedisTopology};

/// The kind of Redis deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Single,
    Cluster,
    Sentinel,
}

/// A Redis node by address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One node as `/health` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeState {
    /// host:port; shown only to a request with the API token (`/health`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// `master` or `replica`.
    pub role: String,
    /// `ok`, or what is wrong (`fail`, `pfail`, `disconnected`, `error: ...`).
    pub state: String,
    /// Cluster masters: how many hash slots the node serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
}

/// The topology as `/health` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TopologyReport {
    pub kind: Kind,
    pub nodes: Vec<NodeState>,
    /// Why the nodes could not be listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TopologyReport {
    /// The report without the nodes' addresses (for a request without the API token).
    pub fn without_addresses(mut self) -> Self {
        for node in &mut self.nodes {
            node.addr = None;
        }
        self
    }
}

/// A connection of any topology; the redis crate's commands, pipelines and scripts run on it.
#[derive(Clone)]
pub enum Conn {
    Manager(ConnectionManager),
    Multiplexed(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Multiplexed(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipe, offset, count),
            Conn::Multiplexed(c) => c.req_packed_commands(pipe, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipe, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Multiplexed(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

enum Source {
    Single(Client),
    /// The client of every command, and the one of blocking stream reads.
    Cluster(ClusterClient, Box<ClusterClient>),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// How to reach any node with the configured password, database and TLS settings.
struct NodeSettings {
    info: ConnectionInfo,
    certs: Option<TlsCertificates>,
}

impl NodeSettings {
    fn info_for(&self, node: &Node) -> RedisResult<ConnectionInfo> {
        let scheme = if self.tls() { "rediss" } else { "redis" };
        Ok(format!("{scheme}://{node}/").into_connection_info()?.set_redis_settings(self.info.redis_settings().clone()))
    }

    fn client(&self, node: &Node) -> RedisResult<Client> {
        let info = self.info_for(node)?;
        match &self.certs {
            Some(certs) => Client::build_with_tls(info, certs.clone()),
            None => Client::open(info),
        }
    }

    fn tls(&self) -> bool {
        matches!(self.info.addr(), ConnectionAddr::TcpTls { .. })
    }
}

pub struct Backend {
    kind: Kind,
    source: Source,
    settings: NodeSettings,
    manager_config: ConnectionManagerConfig,
    response_timeout: Duration,
    /// The shared connection; dialled on first use, and again after `reset`.
    conn: RwLock<Option<Conn>>,
    /// Connections to single cluster nodes (CONFIG and SCAN are per node).
    node_conns: Mutex<HashMap<Node, MultiplexedConnection>>,
    /// The database notifications are published for (0 on a cluster).
    pub db: i64,
}

impl Backend {
    /// Builds the clients; nothing connects until the first command, so the service starts (and
    /// reports unhealthy) while Redis is down.
    pub fn new(cfg: &RedisArgs) -> Result<Self, SettingsError> {
        let bad = |e: RedisError| SettingsError(format!("redis: {e}"));
        let settings = node_settings(cfg)?;
        let (connect, response) = (cfg.connect_timeout(), cfg.response_timeout());
        let (kind, source) = match cfg.topology()? {
            RedisTopology::Single => {
                let client = match &settings.certs {
                    Some(certs) => Client::build_with_tls(settings.info.clone(), certs.clone()),
                    None => Client::open(settings.info.clone()),
                }
                .map_err(bad)?;
                (Kind::Single, Source::Single(client))
            }
            RedisTopology::Cluster(seeds) => {
                let nodes = seeds
                    .into_iter()
                    .map(|(host, port)| settings.info_for(&Node { host, port }))
                    .collect::<RedisResult<Vec<_>>>()
                    .map_err(bad)?;
                let builder = || {
                    let mut builder = ClusterClientBuilder::new(nodes.clone())
                        .connection_timeout(connect)
                        .response_timeout(response)
                        .retries(3)
                        .min_retry_wait(20)
                        .max_retry_wait(200);
                    if let Some(certs) = &settings.certs {
                        builder = builder.certs(certs.clone());
                    }
                    builder
                };
                // Blocking reads (XREADGROUP BLOCK) wait longer than a command may: their client
                // has no overall bound of its own (the builder's would cut every idle read at the
                // response timeout, whatever the connection's), only the connection's, set by
                // `dedicated`.
                let blocking = builder().overall_response_timeout(None).build().map_err(bad)?;
                (Kind::Cluster, Source::Cluster(builder().build().map_err(bad)?, Box::new(blocking)))
            }
            RedisTopology::Sentinel { sentinels, master } => {
                let addrs = sentinels.into_iter().map(|(host, port)| ConnectionAddr::Tcp(host, port));
                let redis = settings.info.redis_settings();
                let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                    .map_err(bad)?
                    .set_client_to_redis_db(redis.db());
                if let Some(password) = redis.password() {
                    builder = builder.set_client_to_redis_password(password);
                }
                if settings.tls() {
                    builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
                    if let Some(certs) = &settings.certs {
                        builder = builder.set_client_to_redis_certificates(certs.clone());
                    }
                }
                (Kind::Sentinel, Source::Sentinel(tokio::sync::Mutex::new(builder.build().map_err(bad)?)))
            }
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect))
            .set_response_timeout(Some(response))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(100));
        let db = if kind == Kind::Cluster { 0 } else { settings.info.redis_settings().db() };
        Ok(Self {
            kind,
            source,
            settings,
            manager_config,
            response_timeout: response,
            conn: RwLock::new(None),
            node_conns: Mutex::default(),
            db,
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The shared connection (dialled now if `reset` dropped it).
    pub async fn conn(&self) -> RedisResult<Conn> {
        if let Some(conn) = self.conn.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(conn);
        }
        let conn = match &self.source {
            Source::Single(client) => {
                Conn::Manager(ConnectionManager::new_lazy_with_config(client.clone(), self.manager_config.clone())?)
            }
            Source::Sentinel(_) => Conn::Manager(ConnectionManager::new_lazy_with_config(
                self.master_client().await?,
                self.manager_config.clone(),
            )?),
            Source::Cluster(client, _) => Conn::Cluster(client.get_async_connection().await?),
        };
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the shared connection: the next command dials afresh (and, with Sentinel, asks the
    /// sentinels which node is the master now).
    pub fn reset(&self) {
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A connection of its own with a longer response bound (blocking stream reads).
    pub async fn dedicated(&self, response_timeout: Duration) -> RedisResult<Conn> {
        let connect = self.response_timeout.max(Duration::from_millis(100));
        match &self.source {
            Source::Cluster(_, client) => {
                let config =
                    ClusterConfig::new().set_connection_timeout(connect).set_response_timeout(response_timeout);
                Ok(Conn::Cluster(client.get_async_connection_with_config(config).await?))
            }
            _ => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect))
                    .set_response_timeout(Some(response_timeout));
                let client = self.master_client().await?;
                Ok(Conn::Multiplexed(client.get_multiplexed_async_connection_with_config(&config).await?))
            }
        }
    }

    /// The client of the one master (single node or Sentinel).
    async fn master_client(&self) -> RedisResult<Client> {
        match &self.source {
            Source::Single(client) => Ok(client.clone()),
            Source::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
            Source::Cluster(..) => {
                Err(RedisError::from((::redis::ErrorKind::InvalidClientConfig, "a cluster has no single master")))
            }
        }
    }

    /// The cluster's nodes as one of them sees them (CLUSTER NODES).
    async fn cluster_nodes(&self) -> RedisResult<Vec<ClusterNode>> {
        let mut conn = self.conn().await?;
        let text: String = ::redis::cmd("CLUSTER").arg("NODES").query_async(&mut conn).await?;
        Ok(parse_cluster_nodes(&text))
    }

    /// The nodes that hold data: every master serving slots (one node outside a cluster).
    pub async fn masters(&self) -> RedisResult<Vec<Node>> {
        match &self.source {
            Source::Cluster(..) => {
                let mut masters: Vec<Node> = self
                    .cluster_nodes()
                    .await?
                    .into_iter()
                    .filter(|n| n.state.role == "master" && n.state.slots.unwrap_or(0) > 0 && n.state.state == "ok")
                    .map(|n| n.node)
                    .collect();
                masters.sort();
                Ok(masters)
            }
            _ => Ok(vec![node_of(self.master_client().await?.get_connection_info())]),
        }
    }

    /// Every node that may publish keyspace events now or after a failover: masters and replicas.
    pub async fn data_nodes(&self) -> RedisResult<Vec<Node>> {
        match &self.source {
            Source::Cluster(..) => Ok(self.cluster_nodes().await?.into_iter().map(|n| n.node).collect()),
            _ => self.masters().await,
        }
    }

    /// Runs `cmd` on one node of a cluster over a connection of that node's own (kept for the next
    /// command, dropped after an error). Outside a cluster the caller uses the shared connection.
    pub async fn on_node<T: ::redis::FromRedisValue>(&self, node: &Node, cmd: &Cmd) -> RedisResult<T> {
        let cached = self.node_conns.lock().unwrap_or_else(|p| p.into_inner()).get(node).cloned();
        let mut conn = match cached {
            Some(conn) => conn,
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.response_timeout))
                    .set_response_timeout(Some(self.response_timeout));
                let conn = self.settings.client(node)?.get_multiplexed_async_connection_with_config(&config).await?;
                self.node_conns.lock().unwrap_or_else(|p| p.into_inner()).insert(node.clone(), conn.clone());
                conn
            }
        };
        let result = cmd.query_async(&mut conn).await;
        if result.is_err() {
            self.node_conns.lock().unwrap_or_else(|p| p.into_inner()).remove(node);
        }
        result
    }

    /// A client of one node (its own connections: pub/sub).
    pub fn node_client(&self, node: &Node) -> RedisResult<Client> {
        match &self.source {
            Source::Single(client) => Ok(client.clone()),
            _ => self.settings.client(node),
        }
    }

    /// Whether this Redis can serve the request path, beyond answering and accepting a write: a
    /// cluster must report `cluster_state:ok` (every slot covered by a reachable master), and a
    /// node addressed as a single node or a Sentinel master must not be a cluster node (it would
    /// redirect most keys with MOVED).
    pub async fn serving(&self) -> Result<(), String> {
        let mut conn = self.conn().await.map_err(|e| e.to_string())?;
        match self.kind {
            Kind::Cluster => {
                let info: String =
                    ::redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn).await.map_err(|e| e.to_string())?;
                let field = |name: &str| {
                    info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).unwrap_or("?").trim().to_string()
                };
                if field("cluster_state") == "ok" {
                    return Ok(());
                }
                Err(format!(
                    "the cluster cannot serve every key: cluster_state:{}, {} of 16384 slots assigned, {} served by a \
                     reachable master",
                    field("cluster_state"),
                    field("cluster_slots_assigned"),
                    field("cluster_slots_ok")
                ))
            }
            Kind::Single | Kind::Sentinel => {
                let info: String =
                    ::redis::cmd("INFO").arg("cluster").query_async(&mut conn).await.map_err(|e| e.to_string())?;
                if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
                    return Err("the Redis node is in cluster mode and redirects keys it does not serve (MOVED); \
                                set REDIS_CLUSTER_NODES to use it as a cluster"
                        .into());
                }
                Ok(())
            }
        }
    }

    /// The nodes and their state, for `/health`.
    pub async fn report(&self) -> TopologyReport {
        let nodes = match &self.source {
            Source::Cluster(..) => self.cluster_nodes().await.map(|nodes| nodes.into_iter().map(|n| n.state).collect()),
            _ => self.master_state().await.map(|n| vec![n]),
        };
        match nodes {
            Ok(nodes) => TopologyReport { kind: self.kind, nodes, error: None },
            Err(e) => TopologyReport { kind: self.kind, nodes: vec![], error: Some(e.to_string()) },
        }
    }

    async fn master_state(&self) -> RedisResult<NodeState> {
        let addr = node_of(self.master_client().await?.get_connection_info()).to_string();
        let mut conn = self.conn().await?;
        let role: RedisResult<Vec<Value>> = ::redis::cmd("ROLE").query_async(&mut conn).await;
        Ok(match role {
            Ok(role) => {
                let name: String =
                    role.into_iter().next().and_then(|v| ::redis::from_redis_value(v).ok()).unwrap_or_default();
                NodeState {
                    addr: Some(addr),
                    role: if name == "master" { "master".into() } else { "replica".into() },
                    state: "ok".into(),
                    slots: None,
                }
            }
            Err(e) => NodeState { addr: Some(addr), role: "unknown".into(), state: format!("error: {e}"), slots: None },
        })
    }
}

fn node_of(info: &ConnectionInfo) -> Node {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            Node { host: host.clone(), port: *port }
        }
        other => Node { host: other.to_string(), port: 0 },
    }
}

struct ClusterNode {
    node: Node,
    state: NodeState,
}

/// Parses CLUSTER NODES: `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch>
/// <link-state> <slot ranges...>`. Nodes without an address (`noaddr`, handshakes) are left out.
fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let addr = fields.get(1)?.split(['@', ',']).next()?;
            let flags: Vec<&str> = fields.get(2)?.split(',').collect();
            if flags.iter().any(|f| matches!(*f, "noaddr" | "handshake")) {
                return None;
            }
            let (host, port) = addr.rsplit_once(':')?;
            let node = Node { host: host.trim_matches(['[', ']']).to_string(), port: port.parse().ok()? };
            let master = flags.contains(&"master");
            let state = if flags.contains(&"fail") {
                "fail"
            } else if flags.contains(&"fail?") {
                "pfail"
            } else if fields.get(7) == Some(&"disconnected") {
                "disconnected"
            } else {
                "ok"
            };
            let slots =
                fields.iter().skip(8).filter(|s| !s.starts_with('[')).map(|range| match range.split_once('-') {
                    Some((a, b)) => b.parse::<u32>().unwrap_or(0).saturating_sub(a.parse().unwrap_or(0)) + 1,
                    None => 1,
                });
            let state = NodeState {
                addr: Some(node.to_string()),
                role: if master { "master" } else { "replica" }.into(),
                state: state.into(),
                slots: master.then(|| slots.sum()),
            };
            Some(ClusterNode { node, state })
        })
        .collect()
}

/// The address, password, database and TLS settings: REDIS_URL, or REDIS_HOST/PORT/DB/PASSWORD
/// (over TLS with REDIS_TLS); a CA file or client certificate when given (TLS only). On a cluster
/// or behind Sentinel, the password, database and TLS apply to every node.
fn node_settings(cfg: &RedisArgs) -> Result<NodeSettings, SettingsError> {
    let bad = |e: RedisError| SettingsError(format!("redis address: {e}"));
    let info = match &cfg.redis_url {
        Some(url) => url.as_str().into_connection_info().map_err(bad)?,
        None => {
            let scheme = if cfg.redis_tls { "rediss" } else { "redis" };
            let host =
                if cfg.redis_host.contains(':') { format!("[{}]", cfg.redis_host) } else { cfg.redis_host.clone() };
            let info =
                format!("{scheme}://{host}:{}/{}", cfg.redis_port, cfg.redis_db).into_connection_info().map_err(bad)?;
            let mut redis = info.redis_settings().clone();
            if let Some(password) = cfg.redis_password.as_deref().filter(|p| !p.is_empty()) {
                redis = redis.set_password(password);
            }
            info.set_redis_settings(redis)
        }
    };
    let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map_err(|e| SettingsError(format!("{what} {}: {e}", path.display())))
    };
    let root_cert = cfg.redis_tls_ca_cert.as_deref().map(|p| read(p, "REDIS_TLS_CA_CERT")).transpose()?;
    let client_tls = match (&cfg.redis_tls_client_cert, &cfg.redis_tls_client_key) {
        (Some(cert), Some(key)) => Some(::redis::ClientTlsConfig {
            client_cert: read(cert, "REDIS_TLS_CLIENT_CERT")?,
            client_key: read(key, "REDIS_TLS_CLIENT_KEY")?,
        }),
        _ => None,
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(NodeSettings { info, certs: None });
    }
    if !tls {
        return Err(SettingsError(
            "REDIS_TLS_CA_CERT / REDIS_TLS_CLIENT_CERT are set but the Redis address is not TLS \
             (use a rediss:// REDIS_URL or REDIS_TLS=true)"
                .into(),
        ));
    }
    Ok(NodeSettings { info, certs: Some(TlsCertificates { client_tls, root_cert }) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_are_parsed_with_role_state_and_slots() {
        let text = "\
07c3 127.0.0.1:30004@31004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@31002,host.example master - 0 1426238316232 2 connected 5461-10922
e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed]
6ec2 127.0.0.1:30005@31005 master,fail - 0 1426238316232 5 connected 10923 10924-16383
aaaa :0@0 master,noaddr - 0 0 0 disconnected
";
        let nodes = parse_cluster_nodes(text);
        let view: Vec<(String, &str, &str, Option<u32>)> = nodes
            .iter()
            .map(|n| (n.node.to_string(), n.state.role.as_str(), n.state.state.as_str(), n.state.slots))
            .collect();
        assert_eq!(
            view,
            vec![
                ("127.0.0.1:30004".into(), "replica", "ok", None),
                ("127.0.0.1:30002".into(), "master", "ok", Some(5462)),
                ("127.0.0.1:30001".into(), "master", "ok", Some(5461)),
                ("127.0.0.1:30005".into(), "master", "fail", Some(5461)),
            ]
        );
    }
}
