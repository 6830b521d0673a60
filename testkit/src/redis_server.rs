//! A single redis-server on a loopback port.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::paths::scratch_dir;
use crate::ports::free_port;
use crate::wait::wait_until;

/// A real redis-server process, killed when dropped.
pub struct Redis {
    pub port: u16,
    child: Child,
}

impl Redis {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let redis = Self::spawn(port, &[]);
        wait_until(Duration::from_secs(10), || redis.client().get_connection().is_ok());
        redis
    }

    /// A redis-server with extra arguments (e.g. `--dir` to load a dump), returned as soon as it
    /// accepts TCP connections: it may still be loading its data.
    pub fn spawn(port: u16, extra: &[&str]) -> Self {
        Self::spawn_with("redis-server", port, &[&["--enable-debug-command", "local"], extra].concat())
    }

    /// `program` (redis-server) with a config file or arguments first in `args` (a sentinel:
    /// `[conf, "--sentinel"]`), on `port`.
    pub fn spawn_with(program: &str, port: u16, args: &[&str]) -> Self {
        let (conf, rest) = match args.first() {
            Some(first) if !first.starts_with("--") => (Some(*first), &args[1..]),
            _ => (None, args),
        };
        let sentinel = rest.contains(&"--sentinel");
        let mut cmd = Command::new(program);
        cmd.args(conf).args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
        if !sentinel {
            // its own directory: an RDB a test makes it write (DEBUG RELOAD, SHUTDOWN SAVE) stays
            // out of the checkout and away from the other servers
            let dir = scratch_dir(&format!("redis-{port}"));
            std::fs::create_dir_all(&dir).unwrap();
            cmd.args(["--save", "", "--appendonly", "no", "--dir"]).arg(&dir);
        }
        let child = cmd
            .args(rest)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        let redis = Self { port, child };
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        redis
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).unwrap()
    }

    pub fn conn(&self) -> redis::Connection {
        self.client().get_connection().unwrap()
    }

    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut self.conn()).unwrap()
    }

    pub fn set(&self, key: &str, value: &str) {
        redis::cmd("SET").arg(key).arg(value).query::<()>(&mut self.conn()).unwrap();
    }

    pub fn get(&self, key: &str) -> Option<String> {
        redis::cmd("GET").arg(key).query(&mut self.conn()).unwrap()
    }

    pub fn ttl(&self, key: &str) -> i64 {
        redis::cmd("TTL").arg(key).query(&mut self.conn()).unwrap()
    }

    /// Adds one request-stream entry `user_id=<prefix><n>` for every n in `range`.
    pub fn request_recommendations(&self, prefix: &str, range: std::ops::Range<usize>) {
        let mut conn = self.conn();
        for n in range {
            redis::cmd("XADD")
                .arg("recommend_requests")
                .arg("*")
                .arg("user_id")
                .arg(format!("{prefix}{n}"))
                .query::<()>(&mut conn)
                .unwrap();
        }
    }

    pub fn hget(&self, key: &str, field: &str) -> Option<String> {
        redis::cmd("HGET").arg(key).arg(field).query(&mut self.conn()).unwrap()
    }

    pub fn keys(&self, pattern: &str) -> Vec<String> {
        redis::cmd("KEYS").arg(pattern).query(&mut self.conn()).unwrap()
    }

    /// SIGKILL, keeping the handle (a master that dies in place).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
