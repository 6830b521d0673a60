//! Connection limits (header, body and idle timeouts, the connection cap, shutdown with idle
//! connections open) and the JSON answers to requests the HTTP layer cannot parse, over raw
//! sockets against a real redis-server and the real binary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use testkit::*;

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    stream
}

/// Reads until the server closes the connection; what was read and when it closed, or what
/// was read and the error when it was still open after the read timeout.
fn read_until_closed(stream: &mut TcpStream) -> (String, Result<Instant, std::io::Error>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into(), Ok(Instant::now())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&got).into(), Ok(Instant::now()))
            }
            Err(e) => return (String::from_utf8_lossy(&got).into(), Err(e)),
        }
    }
}

fn assert_closed_within(name: &str, stream: &mut TcpStream, since: Instant, limit: Duration) -> String {
    let (got, closed) = read_until_closed(stream);
    let at = closed.unwrap_or_else(|e| panic!("{name}: still open after {:?} ({e}); read {got:?}", since.elapsed()));
    assert!(at - since <= limit, "{name}: closed after {:?}, over {limit:?}", at - since);
    got
}

#[test]
fn idle_slow_and_partial_connections_are_closed_within_the_timeouts() {
    let redis = Redis::start();
    let server = Server::start_with(
        redis.port,
        test_models(),
        &[("HEADER_READ_TIMEOUT_SECS", "1"), ("BODY_READ_TIMEOUT_SECS", "1"), ("IDLE_TIMEOUT_SECS", "3")],
    );
    server.wait_healthy();
    let limit = Duration::from_millis(2500);

    let t = Instant::now();
    let mut idle = connect(server.port);
    let mut partial_line = connect(server.port);
    partial_line.write_all(b"GET /heal").unwrap();
    let mut partial_head = connect(server.port);
    partial_head.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut short_body = connect(server.port);
    short_body.write_all(b"POST /recommend/u1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789").unwrap();

    // slowloris: a header byte every 200 ms, never finishing, is cut off all the same
    let mut slow = connect(server.port);
    slow.write_all(b"GET /health/live HTTP/1.1\r\n").unwrap();
    let mut writer = slow.try_clone().unwrap();
    let dribble = std::thread::spawn(move || {
        for _ in 0..40 {
            if writer.write_all(b"x").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    });

    assert_closed_within("idle", &mut idle, t, limit);
    assert_closed_within("partial request line", &mut partial_line, t, limit);
    assert_closed_within("partial head", &mut partial_head, t, limit);
    let answer = assert_closed_within("short body", &mut short_body, t, limit);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains(r#""error":"request_timeout""#), "{answer}");
    assert_closed_within("slowloris", &mut slow, t, limit);
    assert!(dribble.join().unwrap(), "the slow writer was never cut off");

    assert!(redis.get("recommendations:u1").is_none(), "a request without its body writes nothing");

    // A keep-alive connection may wait IDLE_TIMEOUT_SECS (3 s), longer than the header timeout,
    // for its next request; then it is closed.
    let mut keep_alive = connect(server.port);
    let mut buf = [0u8; 1024];
    for pause in [Duration::ZERO, Duration::from_millis(1800)] {
        std::thread::sleep(pause);
        keep_alive.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let n = keep_alive.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 "), "after {pause:?}: {:?}", String::from_utf8_lossy(&buf[..n]));
    }
    let t = Instant::now();
    assert_closed_within("idle keep-alive", &mut keep_alive, t, Duration::from_millis(4500));
    assert!(t.elapsed() >= Duration::from_secs(2), "idle keep-alive closed after {:?}", t.elapsed());
    assert_eq!(server.get("/health/live").0, 200);
}

/// Open sockets, idle or sending a head slowly.
fn flood(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            if i % 2 == 1 {
                s.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ").unwrap();
            }
            s
        })
        .collect()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn at_the_connection_cap_health_live_still_answers() {
    let redis = Redis::start();
    // 256 descriptors for the whole process; 400 sockets would exhaust them without a cap.
    let server = Server::start_with_fd_limit(
        redis.port,
        256,
        &[("MAX_CONNECTIONS", "64"), ("HEADER_READ_TIMEOUT_SECS", "120"), ("INFERENCE_WORKERS", "1")],
    );
    server.wait_healthy();
    redis.set("user_profile:capped", &format!(r#"["{}"]"#, item(3)));
    let held = flood(server.port, 400);
    std::thread::sleep(Duration::from_millis(500));

    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
    for _ in 0..5 {
        let t = Instant::now();
        let r = client.get(server.url("/health/live")).send().expect("/health/live must answer at the cap");
        assert_eq!(r.status().as_u16(), 200);
        assert!(t.elapsed() < Duration::from_secs(2), "/health/live took {:?}", t.elapsed());
    }
    let r = client.post(server.url("/recommend/capped")).send().expect("the API must answer at the cap");
    assert_eq!(r.status().as_u16(), 200);
    assert!(redis.get("recommendations:capped").is_some());
    let fds = open_fds(server.pid());
    assert!(fds < 200, "{fds} descriptors open with MAX_CONNECTIONS=64");
    drop(held);
}

#[test]
fn sigterm_with_idle_connections_open_exits_promptly_and_drains_the_request_in_flight() {
    let redis = Redis::start();
    let mut server = Server::start_with(
        redis.port,
        test_models(),
        &[("SHUTDOWN_GRACE_SECS", "30"), ("HEADER_READ_TIMEOUT_SECS", "60")],
    );
    server.wait_healthy();
    redis.set("user_profile:drain", &format!(r#"["{}"]"#, item(4)));
    let mut held = flood(server.port, 100);
    for _ in 0..20 {
        let mut s = connect(server.port);
        s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        assert!(s.read(&mut buf).unwrap() > 0);
        held.push(s); // idle keep-alive after one response
    }

    // A request in flight when SIGTERM comes: Redis holds it for 300 ms.
    let port = redis.port;
    let sleeper = std::thread::spawn(move || {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap().get_connection().unwrap();
        redis::cmd("DEBUG").arg("SLEEP").arg(0.3).query::<()>(&mut c).unwrap();
    });
    std::thread::sleep(Duration::from_millis(50));
    let url = server.url("/recommend/drain");
    let in_flight = std::thread::spawn(move || {
        let r = reqwest::blocking::Client::new().post(url).send().expect("the request in flight is answered");
        r.status().as_u16()
    });
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let status = server.terminate();
    let took = t.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(3), "exit took {took:?} with idle connections open");
    assert_eq!(in_flight.join().unwrap(), 200);
    assert!(redis.get("recommendations:drain").is_some());
    sleeper.join().unwrap();
}

#[test]
fn requests_the_http_layer_cannot_parse_get_json_errors() {
    let redis = Redis::start();
    let server = Server::start(redis.port);
    server.wait_healthy();
    let port = server.port;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "script in the path",
            b"GET /<script>alert(1)</script> HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "control byte in the path",
            b"GET /recommend/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "bad Content-Length",
            b"POST /recommend/u HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "two Content-Lengths",
            b"POST /recommend/u HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
            400,
            "malformed_request",
        ),
        ("HTTP/1.2", b"GET /health HTTP/1.2\r\nHost: x\r\n\r\n".to_vec(), 505, "http_version_not_supported"),
        ("HTTP/0.9", b"GET /health\r\n\r\n".to_vec(), 505, "http_version_not_supported"),
        (
            "Transfer-Encoding: gzip",
            b"POST /recommend/u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "Transfer-Encoding: gzip, chunked",
            b"POST /recommend/u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(),
            501,
            "unsupported_transfer_encoding",
        ),
        ("101 header fields", many_headers(101), 431, "headers_too_large"),
        (
            "a 70 KB target",
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            414,
            "uri_too_long",
        ),
        (
            "a 10 KB target",
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(10_000)).into_bytes(),
            414,
            "uri_too_long",
        ),
    ];
    for (name, request, status, code) in &cases {
        let answer = raw_exchange(port, request);
        assert!(answer.is_some(), "{name}: no answer");
        eprintln!("{name}: {:?}", answer.as_ref().unwrap().head.lines().next());
        assert_raw_error(&answer, *status, code);
    }
    assert!(redis.keys("recommendations:*").is_empty(), "nothing may be written");
    // 100 fields are still served
    assert_eq!(raw_exchange(port, &many_headers(100)).unwrap().status, 200);
}

fn many_headers(n: usize) -> Vec<u8> {
    let mut request = String::from("GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..n - 2 {
        request.push_str(&format!("X-{i}: y\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// `threads` sockets that each send a `POST /recommend/<id>` head declaring a 1000-byte body
/// (with `token` as bearer token, or none) and then dribble the body a byte every 300 ms,
/// reconnecting as soon as the server answers or closes, until `stop`. Returns the joins, each
/// with how many connections its thread opened.
fn slow_body_flood(
    port: u16,
    threads: usize,
    token: Option<&str>,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<usize>> {
    use std::sync::atomic::Ordering;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    (0..threads)
        .map(|i| {
            let (stop, auth) = (stop.clone(), auth.clone());
            std::thread::spawn(move || {
                let head =
                    format!("POST /recommend/flood{i} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1000\r\n\r\n");
                let mut opened = 0;
                while !stop.load(Ordering::SeqCst) {
                    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    opened += 1;
                    s.set_nonblocking(true).unwrap();
                    let mut ok = s.write_all(head.as_bytes()).is_ok();
                    while ok && !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(300));
                        let mut buf = [0u8; 512];
                        // an answer (401, 408) or the close: reconnect
                        ok = matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                            && s.write_all(b"x").is_ok();
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                opened
            })
        })
        .collect()
}

#[test]
fn a_slow_body_flood_at_the_connection_cap_starves_neither_liveness_nor_authenticated_requests() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const TOKEN: &str = "flood-test-token";
    let redis = Redis::start();
    let server = Server::start_with(
        redis.port,
        test_models(),
        &[
            ("API_TOKEN", TOKEN),
            ("MAX_CONNECTIONS", "8"),
            // longer than the test: the 408 must not be what frees the places
            ("BODY_READ_TIMEOUT_SECS", "60"),
            ("INFERENCE_WORKERS", "1"),
        ],
    );
    server.wait_healthy();
    redis.set("user_profile:flooded", &format!(r#"["{}","{}"]"#, item(3), item(9)));
    let probe =
        reqwest::blocking::Client::builder().timeout(Duration::from_secs(3)).pool_max_idle_per_host(0).build().unwrap();
    let started = Instant::now();
    for flood_token in [None, Some(TOKEN)] {
        let stop = Arc::new(AtomicBool::new(false));
        let flood = slow_body_flood(server.port, 16, flood_token, &stop);
        std::thread::sleep(Duration::from_millis(1500));
        let mut failures = Vec::new();
        for n in 0..10 {
            match probe.get(server.url("/health/live")).send() {
                Ok(r) if r.status().as_u16() == 200 => {}
                Ok(r) => failures.push(format!("probe {n}: {}", r.status())),
                Err(e) => failures.push(format!("probe {n}: {e}")),
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        let ranked = probe.post(server.url("/recommend/flooded")).bearer_auth(TOKEN).send();
        let ranked = ranked.map(|r| r.status().as_u16()).map_err(|e| e.to_string());
        stop.store(true, Ordering::SeqCst);
        let opened: usize = flood.into_iter().map(|t| t.join().unwrap()).sum();
        let flood = if flood_token.is_some() { "a flood with the token" } else { "a flood without the token" };
        eprintln!("{flood}: {opened} connections opened, probes failed: {failures:?}, recommend: {ranked:?}");
        assert!(failures.is_empty(), "{flood}: /health/live failed {} of 10 times: {failures:?}", failures.len());
        assert_eq!(ranked, Ok(200), "{flood}: an authenticated POST /recommend/flooded");
    }
    assert!(redis.get("recommendations:flooded").is_some());
    assert!(redis.keys("recommendations:flood[0-9]*").is_empty(), "a dribbled request wrote a list");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}
