//! Redis Sentinel: a master, a replica and three sentinels.

use std::path::PathBuf;
use std::time::Duration;

use crate::paths::scratch_dir;
use crate::ports::free_port;
use crate::redis_server::Redis;
use crate::wait::wait_until;

/// A master, a replica and three sentinels on free loopback ports.
pub struct Sentinels {
    pub master: Redis,
    pub replica: Redis,
    pub sentinels: Vec<Redis>,
    pub dir: PathBuf,
}

impl Sentinels {
    pub const MASTER: &'static str = "mymaster";

    pub fn start() -> Self {
        let dir = scratch_dir(&format!("sentinel-{}", free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let master = Redis::start();
        let replica = Redis::spawn(free_port(), &["--replicaof", "127.0.0.1", &master.port.to_string()]);
        wait_until(Duration::from_secs(10), || {
            let info: String = redis::cmd("INFO").arg("replication").query(&mut replica.conn()).unwrap_or_default();
            info.contains("master_link_status:up")
        });
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                let conf = dir.join(format!("sentinel-{port}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\nsentinel monitor {m} 127.0.0.1 {mp} 2\n\
                         sentinel down-after-milliseconds {m} 1000\nsentinel failover-timeout {m} 5000\n",
                        m = Self::MASTER,
                        mp = master.port
                    ),
                )
                .unwrap();
                Redis::spawn_with("redis-server", port, &[conf.to_str().unwrap(), "--sentinel"])
            })
            .collect();
        let s = Self { master, replica, sentinels, dir };
        wait_until(Duration::from_secs(20), || s.master_port() == Some(s.master.port) && s.sees_replica());
        s
    }

    /// `host:port,...` of the sentinels (REDIS_SENTINELS).
    pub fn addrs(&self) -> String {
        self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect::<Vec<_>>().join(",")
    }

    /// The master's port as the first sentinel names it.
    pub fn master_port(&self) -> Option<u16> {
        let addr: Option<Vec<String>> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(Self::MASTER)
            .query(&mut self.sentinels[0].client().get_connection().ok()?)
            .ok()?;
        addr?.get(1)?.parse().ok()
    }

    fn sees_replica(&self) -> bool {
        self.sentinels.iter().all(|s| {
            let Ok(mut c) = s.client().get_connection() else { return false };
            let replicas: Vec<redis::Value> =
                redis::cmd("SENTINEL").arg("replicas").arg(Self::MASTER).query(&mut c).unwrap_or_default();
            !replicas.is_empty()
        })
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
