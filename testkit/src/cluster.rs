//! A Redis Cluster of real redis-server processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::paths::scratch_dir;
use crate::ports::free_port;
use crate::redis_server::Redis;
use crate::wait::wait_until;

/// A Redis Cluster of real redis-server processes on free loopback ports: `masters` masters with
/// `replicas` replicas each, created by `redis-cli --cluster create`.
pub struct Cluster {
    pub nodes: Vec<Redis>,
    pub dir: PathBuf,
}

impl Cluster {
    /// 3 masters, 3 replicas.
    pub fn start() -> Self {
        Self::start_with(3, 1)
    }

    pub fn start_with(masters: usize, replicas: usize) -> Self {
        let dir = scratch_dir(&format!("cluster-{}", free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let nodes: Vec<Redis> = (0..masters * (1 + replicas)).map(|_| Self::node(&dir)).collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .unwrap();
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = Self { nodes, dir };
        cluster.wait_ok();
        // `--cluster create` returns before every replica has taken its role: until then a
        // replica-to-be shows as a master without slots
        wait_until(Duration::from_secs(30), || {
            cluster.nodes.iter().all(|node| {
                let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut node.conn()).unwrap_or_default();
                text.lines().filter(|l| l.split_whitespace().nth(2).is_some_and(|f| f.contains("master"))).count()
                    == masters
            })
        });
        cluster
    }

    /// One cluster-enabled redis-server (not yet part of a cluster); its bus port is a free port too.
    pub fn node(dir: &Path) -> Redis {
        let (port, bus) = (free_port(), free_port());
        let conf = dir.join(format!("nodes-{port}.conf"));
        Redis::spawn(
            port,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
                "--cluster-config-file",
                conf.to_str().unwrap(),
                "--cluster-node-timeout",
                "2000",
                "--dir",
                dir.to_str().unwrap(),
            ],
        )
    }

    /// Waits until every node says `cluster_state:ok` and knows every other node.
    pub fn wait_ok(&self) {
        let n = self.nodes.len();
        wait_until(Duration::from_secs(30), || {
            self.nodes.iter().all(|node| {
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut node.conn()).unwrap_or_default();
                info.contains("cluster_state:ok") && info.contains(&format!("cluster_known_nodes:{n}"))
            })
        });
    }

    /// `host:port,...` of two nodes (seeds for REDIS_CLUSTER_NODES).
    pub fn seeds(&self) -> String {
        format!("127.0.0.1:{},127.0.0.1:{}", self.nodes[0].port, self.nodes[1].port)
    }

    pub fn client(&self) -> redis::cluster::ClusterClient {
        let nodes: Vec<String> = self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}/", n.port)).collect();
        redis::cluster::ClusterClientBuilder::new(nodes).retries(10).build().unwrap()
    }

    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        self.client().get_connection().unwrap()
    }

    /// `(port, id, is_master, master id)` of every node, as the first live node sees them.
    pub fn topology(&self) -> Vec<(u16, String, bool, String)> {
        let text: String = self
            .nodes
            .iter()
            .find_map(|n| redis::cmd("CLUSTER").arg("NODES").query(&mut n.client().get_connection().ok()?).ok())
            .unwrap();
        text.lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let port = f[1].split('@').next().unwrap().rsplit_once(':').unwrap().1.parse().unwrap();
                (port, f[0].to_string(), f[2].contains("master"), f[3].to_string())
            })
            .collect()
    }

    pub fn master_ports(&self) -> Vec<u16> {
        self.topology().into_iter().filter(|n| n.2).map(|n| n.0).collect()
    }

    /// The node handle on `port`.
    pub fn on(&self, port: u16) -> &Redis {
        self.nodes.iter().find(|n| n.port == port).unwrap()
    }

    /// `redis-cli --cluster check`: the cluster's own consistency check (slots covered, every
    /// node agreeing). Returns its output; panics when it fails.
    pub fn check(&self) -> String {
        let out = Command::new("redis-cli")
            .args(["--cluster", "check", &format!("127.0.0.1:{}", self.nodes[0].port)])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success() && text.contains("[OK] All 16384 slots covered."), "{text}");
        text
    }

    pub fn set(&self, key: &str, value: &str) {
        redis::cmd("SET").arg(key).arg(value).query::<()>(&mut self.conn()).unwrap();
    }

    pub fn get(&self, key: &str) -> Option<String> {
        redis::cmd("GET").arg(key).query(&mut self.conn()).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
