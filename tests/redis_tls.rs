//! Redis over TLS (rediss://, REDIS_TLS) with AUTH and client certificates, against a real
//! redis-server started with --tls-port and certificates made by openssl for the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testkit::*;

const PASSWORD: &str = "tls-secret";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl must be installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn certificates() -> PathBuf {
    let dir = scratch_dir("tls-certs");
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=test-ca",
            "-days",
            "2",
        ],
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        let (key, csr, crt, ext) =
            (format!("{who}.key"), format!("{who}.csr"), format!("{who}.crt"), format!("{who}.ext"));
        openssl(
            &dir,
            &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"],
        );
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
                "-CAcreateserial",
            ],
        );
    }
    dir
}

struct TlsRedis {
    port: u16,
    certs: PathBuf,
    child: Child,
}

impl TlsRedis {
    fn start(certs: &Path) -> Self {
        let port = free_port();
        let file = |f: &str| certs.join(f).to_str().unwrap().to_string();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--tls-cert-file", &file("server.crt"), "--tls-key-file", &file("server.key")])
            .args(["--tls-ca-cert-file", &file("ca.crt"), "--tls-auth-clients", "yes"])
            .args(["--requirepass", PASSWORD, "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let redis = Self { port, certs: certs.to_path_buf(), child };
        wait_until(Duration::from_secs(10), || redis.cli(&["PING"]).as_deref() == Some("PONG"));
        redis
    }

    /// redis-cli over TLS with the client certificate; stdout trimmed, None on failure.
    fn cli(&self, args: &[&str]) -> Option<String> {
        let file = |f: &str| self.certs.join(f).to_str().unwrap().to_string();
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert", &file("ca.crt"), "--cert", &file("client.crt"), "--key", &file("client.key")])
            .args(["-p", &self.port.to_string(), "--user", "default", "--pass", PASSWORD, "--no-auth-warning"])
            .args(args)
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn rediss_with_auth_and_client_certificates_serves_and_an_untrusted_setup_reports_why() {
    let certs = certificates();
    let redis = TlsRedis::start(&certs);
    let file = |f: &str| certs.join(f).to_str().unwrap().to_string();
    let (ca, cert, key) = (file("ca.crt"), file("client.crt"), file("client.key"));
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}", redis.port);
    assert_eq!(redis.cli(&["SET", "user_profile:tls1", r#"["0553092626","0393316041"]"#]).as_deref(), Some("OK"));

    // A rediss:// URL with the password, the CA and the client certificate.
    let by_url = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_TLS_CA_CERT", &ca),
        ("REDIS_TLS_CLIENT_CERT", &cert),
        ("REDIS_TLS_CLIENT_KEY", &key),
    ];
    let server = Server::start_with(redis.port, test_models(), &by_url);
    server.wait_healthy();
    let (status, body) = server.post("/recommend/tls1");
    assert_eq!(status, 200, "{body}");
    let stored: Vec<String> = serde_json::from_str(&redis.cli(&["GET", "recommendations:tls1"]).unwrap()).unwrap();
    assert_eq!(stored, rec_ids(&body));
    drop(server);

    // The same through REDIS_TLS=true and REDIS_HOST/PORT/PASSWORD.
    let port = redis.port.to_string();
    let by_fields = [
        ("REDIS_TLS", "true"),
        ("REDIS_PORT", port.as_str()),
        ("REDIS_PASSWORD", PASSWORD),
        ("REDIS_TLS_CA_CERT", &ca),
        ("REDIS_TLS_CLIENT_CERT", &cert),
        ("REDIS_TLS_CLIENT_KEY", &key),
    ];
    let server = Server::start_with(redis.port, test_models(), &by_fields);
    server.wait_healthy();
    assert_eq!(server.post("/recommend/tls1").0, 200);
    drop(server);

    // Not trusting the server's CA (system roots only): unhealthy, and requests get 503.
    let untrusted = [("REDIS_URL", url.as_str()), ("REDIS_TLS_CLIENT_CERT", &cert), ("REDIS_TLS_CLIENT_KEY", &key)];
    let server = Server::start_with(redis.port, test_models(), &untrusted);
    wait_until(Duration::from_secs(30), || server.get("/health").1["model_loaded"] == true);
    let (status, health) = server.get("/health");
    assert_eq!(status, 503, "{health}");
    let detail = health["detail"].as_str().unwrap().to_lowercase();
    assert!(detail.contains("redis") && detail.contains("certificate"), "{health}");
    assert_error(&server.post("/recommend/tls1"), 503, "redis_unavailable");
    drop(server);

    // Without the client certificate Redis refuses the handshake; with a wrong password, AUTH fails.
    let wrong_pass = format!("rediss://:nope@127.0.0.1:{}", redis.port);
    let cases = [
        (vec![("REDIS_URL", url.as_str()), ("REDIS_TLS_CA_CERT", ca.as_str())], "certificate"),
        (
            vec![
                ("REDIS_URL", wrong_pass.as_str()),
                ("REDIS_TLS_CA_CERT", &ca),
                ("REDIS_TLS_CLIENT_CERT", &cert),
                ("REDIS_TLS_CLIENT_KEY", &key),
            ],
            "authentication",
        ),
    ];
    for (env, why) in cases {
        let server = Server::start_with(redis.port, test_models(), &env);
        wait_until(Duration::from_secs(30), || server.get("/health").1["model_loaded"] == true);
        let (status, health) = server.get("/health");
        assert_eq!(status, 503, "{health}");
        assert!(health["detail"].as_str().unwrap().to_lowercase().contains(why), "{health}");
        let (status, body) = server.post("/recommend/tls1");
        assert_eq!(status, 503, "{body}");
    }

    // A CA file with a plain redis:// address is a configuration error at start.
    let plain = [("REDIS_TLS_CA_CERT", ca.as_str())];
    let mut server = Server::start_with(redis.port, test_models(), &plain);
    wait_until(Duration::from_secs(30), || server.exited().is_some());
    assert!(!server.exited().unwrap().success());
}
