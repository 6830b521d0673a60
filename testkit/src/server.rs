//! The model-service binary under test: its environment, one-shot runs (`check`, `recommend`)
//! and servers (`serve`, `listen`) with their HTTP helpers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::http::{blocking_client, json_response};
use crate::models::test_models;
use crate::ports::free_port;
use crate::wait::wait_until;

/// The binary under test: MODEL_SERVICE_BIN when set (to run these tests against another build,
/// e.g. to see a new test fail on the previous version), else this package's: the path `cargo test`
/// gives a test in CARGO_BIN_EXE_model-service, else (a test binary started by hand) the
/// `model-service` that cargo builds beside the test binaries' deps/ directory.
pub fn bin_path() -> PathBuf {
    if let Some(bin) = std::env::var_os("MODEL_SERVICE_BIN").or_else(|| std::env::var_os("CARGO_BIN_EXE_model-service"))
    {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent().and_then(Path::parent).expect("a test binary lies in target/<profile>/deps/").join("model-service")
}

/// A command that runs the binary under test.
pub fn bin() -> Command {
    Command::new(bin_path())
}

/// Environment for the binary: the given Redis port and model dir, everything else default.
pub fn base_env(cmd: &mut Command, redis_port: u16, model_dir: &Path) {
    for var in ["REDIS_URL", "REDIS_PASSWORD", "DEVICE", "HOST", "PORT"] {
        cmd.env_remove(var);
    }
    cmd.env("REDIS_HOST", "127.0.0.1")
        .env("REDIS_PORT", redis_port.to_string())
        .env("MODEL_DIR", model_dir)
        .env("DEVICE", "cpu")
        .env("TORCH_THREADS", "1")
        // The synthetic catalog has 300 items: with the default 1000 LightGCN candidates a batch
        // would keep N minus its longest history, a count that depends on the batch, and with it
        // DIN's per-row standardised features; 200 keeps it fixed, as 1000 is on Amazon-Book.
        .env("LIGHTGCN_CANDIDATES", "200")
        .env("RUST_LOG", std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "model_service=warn".into()));
}

/// Runs the binary to completion. Modes that serve HTTP (`listen`) get a free loopback port: no
/// test may depend on a default port (8001) being free.
pub fn run_cli(redis_port: u16, model_dir: &Path, args: &[&str]) -> Output {
    let mut cmd = bin();
    base_env(&mut cmd, redis_port, model_dir);
    cmd.env("HOST", "127.0.0.1").env("PORT", free_port().to_string());
    cmd.args(args).output().unwrap()
}

/// A running model-service process on a free loopback port, killed when dropped.
pub struct Server {
    pub port: u16,
    child: Child,
}

impl Server {
    pub fn start(redis_port: u16) -> Self {
        Self::start_with(redis_port, test_models(), &[])
    }

    pub fn start_with(redis_port: u16, model_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_mode(redis_port, model_dir, &["serve"], env)
    }

    /// Starts the binary with `args` (`serve`, `listen`, `serve --listen`) and waits for /health/live.
    pub fn start_mode(redis_port: u16, model_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(bin(), redis_port, model_dir, args, env)
    }

    /// `serve` with at most `nofile` open file descriptors (`ulimit -n`).
    pub fn start_with_fd_limit(redis_port: u16, nofile: u32, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("ulimit -n {nofile} && exec \"$0\" \"$@\"")]).arg(bin_path());
        Self::spawn(cmd, redis_port, test_models(), &["serve"], env)
    }

    fn spawn(mut cmd: Command, redis_port: u16, model_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        base_env(&mut cmd, redis_port, model_dir);
        cmd.env("HOST", "127.0.0.1").env("PORT", port.to_string()).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.stdout(Stdio::null()).spawn().unwrap();
        let mut server = Self { port, child };
        wait_until(Duration::from_secs(60), || {
            server.exited().is_some() || server.try_get("/health/live").map(|(s, _)| s == 200).unwrap_or(false)
        });
        if let Some(status) = server.exited() {
            // shown only if the test fails: a test expecting the exit checks it (and its log) itself
            eprintln!("the server on port {port} exited at start ({status})");
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    fn try_get(&self, path: &str) -> Option<(u16, String)> {
        let r = blocking_client().get(self.url(path)).send().ok()?;
        Some((r.status().as_u16(), r.text().ok()?))
    }

    /// Waits until /health says healthy (models warmed up, Redis reachable).
    pub fn wait_healthy(&self) {
        wait_until(Duration::from_secs(60), || match self.try_get("/health") {
            Some((status, _)) => status == 200,
            None => {
                assert!(!self.is_zombie(), "the server (pid {}) exited before it was healthy", self.child.id());
                false
            }
        });
    }

    /// The process has ended and not yet been waited for (it can no longer answer).
    fn is_zombie(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    }

    pub fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = blocking_client().get(self.url(path)).send().unwrap();
        json_response(r)
    }

    pub fn get_text(&self, path: &str) -> (u16, String) {
        self.try_get(path).unwrap()
    }

    pub fn post(&self, path: &str) -> (u16, serde_json::Value) {
        let r = blocking_client().post(self.url(path)).send().unwrap();
        json_response(r)
    }

    /// GET with a bearer token.
    pub fn get_authed(&self, path: &str, token: &str) -> (u16, serde_json::Value) {
        json_response(blocking_client().get(self.url(path)).bearer_auth(token).send().unwrap())
    }

    /// POST without a body, with a bearer token.
    pub fn post_authed(&self, path: &str, token: &str) -> (u16, serde_json::Value) {
        json_response(blocking_client().post(self.url(path)).bearer_auth(token).send().unwrap())
    }

    /// POST with a JSON body and optional bearer token, to `port` (PORT or ADMIN_PORT).
    pub fn post_json(
        &self,
        port: u16,
        path: &str,
        body: &serde_json::Value,
        token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut request = blocking_client().post(format!("http://127.0.0.1:{port}{path}")).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        json_response(request.send().unwrap())
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// `serve` whose log (stderr) goes into a pipe that is closed once it listens, as when the log
    /// collector reading it has gone away.
    pub fn start_with_closed_log(redis_port: u16) -> Self {
        let mut server = Self::start_logged(redis_port, test_models(), &[("RUST_LOG", "info")]);
        drop(server.child.stderr.take());
        server
    }

    /// `serve` with `env`, its log (stderr) kept for `exit_and_log`.
    pub fn start_logged(redis_port: u16, model_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_logged_mode(redis_port, model_dir, &["serve"], env)
    }

    /// The binary with `args` (`listen`, `serve --listen`) and `env`, its log kept for `exit_and_log`.
    pub fn start_logged_mode(redis_port: u16, model_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin_path());
        cmd.stderr(Stdio::piped());
        Self::spawn(cmd, redis_port, model_dir, args, env)
    }

    /// Waits for the process to exit (of a server from `start_logged`): its exit status and log.
    pub fn exit_and_log(&mut self) -> (std::process::ExitStatus, String) {
        let mut log = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
        }
        (self.child.wait().unwrap(), log)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sigterm(&self) {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        self.child.wait().unwrap()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The value of a metric line (exact name with labels) in /metrics, 0 when absent.
    pub fn metric(&self, name_with_labels: &str) -> f64 {
        let (_, text) = self.get_text("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name_with_labels).and_then(|v| v.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
