//! HTTP API against a real redis-server and the real binary with TorchScript test models.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use testkit::*;

fn setup() -> (Redis, Server) {
    let redis = Redis::start();
    let server = Server::start(redis.port);
    server.wait_healthy();
    (redis, server)
}

#[test]
fn walkthrough_profile_to_recommendations_in_redis() {
    let (redis, server) = setup();
    redis.set("user_profile:A3RTKL9KB8KLID", r#"["0553092626","0393316041"]"#);

    let (status, body) = server.post("/recommend/A3RTKL9KB8KLID");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], "A3RTKL9KB8KLID");
    assert_eq!(body["strategy"], "personalized");
    assert_eq!(body["model_version"], "synthetic-test");
    assert_eq!(body["unknown_items"], 0);
    assert!(body["elapsed_ms"].as_f64().unwrap() > 0.0);
    let ids = rec_ids(&body);
    assert_eq!(ids.len(), 10);
    assert!(!ids.contains(&item(0)) && !ids.contains(&item(1)), "history items came back: {ids:?}");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 10, "duplicates: {ids:?}");

    let scores: Vec<f64> =
        body["recommendations"].as_array().unwrap().iter().map(|r| r["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "not in score order: {scores:?}");

    let stored: Vec<String> = serde_json::from_str(&redis.get("recommendations:A3RTKL9KB8KLID").unwrap()).unwrap();
    assert_eq!(stored, ids, "Redis holds the same ids in the same order");
    let ttl = redis.ttl("recommendations:A3RTKL9KB8KLID");
    assert!(ttl > 3500 && ttl <= 3600, "ttl {ttl}");
}

#[test]
fn changing_the_profile_changes_the_recommendations_and_k_sets_the_length() {
    let (redis, server) = setup();
    // Items 0..4 and 3..7 are from different clusters of the synthetic catalog (row % 6).
    let a: Vec<String> = [0, 6, 12, 18].iter().map(|&r| item(r)).collect();
    let b: Vec<String> = [3, 9, 15, 21].iter().map(|&r| item(r)).collect();
    redis.set("user_profile:u1", &serde_json::to_string(&a).unwrap());
    let (_, first) = server.post("/recommend/u1?k=20");
    redis.set("user_profile:u1", &serde_json::to_string(&b).unwrap());
    let (status, second) = server.post("/recommend/u1?k=20");
    assert_eq!(status, 200);
    let (ia, ib) = (rec_ids(&first), rec_ids(&second));
    assert_eq!((ia.len(), ib.len()), (20, 20));
    assert_ne!(ia, ib);
    assert!(ib.iter().all(|i| !b.contains(i)), "new history excluded");
    let stored: Vec<String> = serde_json::from_str(&redis.get("recommendations:u1").unwrap()).unwrap();
    assert_eq!(stored, ib, "Redis holds the latest list");

    let (_, five) = server.post("/recommend/u1?k=5");
    assert_eq!(rec_ids(&five), ib[..5].to_vec(), "a shorter list is a prefix of the longer one");
}

#[test]
fn a_missing_or_empty_profile_gets_the_most_popular_items() {
    let (redis, server) = setup();
    let mut by_pop = catalog();
    by_pop.sort_by_key(|(_, p)| std::cmp::Reverse(*p)); // stable: ties keep row order
    let want: Vec<String> = by_pop.iter().take(10).map(|(i, _)| i.clone()).collect();

    let (status, body) = server.post("/recommend/nobody");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["strategy"], "popular");
    assert_eq!(rec_ids(&body), want);
    let stored: Vec<String> = serde_json::from_str(&redis.get("recommendations:nobody").unwrap()).unwrap();
    assert_eq!(stored, want);

    redis.set("user_profile:empty", "[]");
    let (_, body) = server.post("/recommend/empty");
    assert_eq!((body["strategy"].as_str(), rec_ids(&body)), (Some("popular"), want.clone()));

    redis.set("user_profile:ghost", r#"["nope","B000000000"]"#);
    let (_, body) = server.post("/recommend/ghost");
    assert_eq!(body["strategy"], "popular", "only unknown items: cold start");
    assert_eq!(body["unknown_items"], 2);
}

#[test]
fn unknown_items_are_skipped_and_counted() {
    let (redis, server) = setup();
    redis.set("user_profile:mixed", &format!(r#"["{}","unknown-1","{}","unknown-2","unknown-1"]"#, item(4), item(10)));
    let (status, body) = server.post("/recommend/mixed");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["strategy"], "personalized");
    assert_eq!(body["unknown_items"], 3);
    let ids = rec_ids(&body);
    assert!(!ids.contains(&item(4)) && !ids.contains(&item(10)));

    let (_, metrics) = server.get_text("/metrics");
    assert!(metrics.contains("model_service_unknown_items_total 3"), "{metrics}");
}

#[test]
fn bad_requests_get_400_json_and_write_nothing() {
    let (redis, server) = setup();
    redis.set("user_profile:u", &format!(r#"["{}"]"#, item(2)));
    for k in ["0", "101", "-3", "abc", "1.5", ""] {
        assert_error(&server.post(&format!("/recommend/u?k={k}")), 400, "invalid_k");
    }
    let long = "x".repeat(129);
    for id in [long.as_str(), "a%20b", "a%0Ab", "a%07", "%09"] {
        assert_error(&server.post(&format!("/recommend/{id}")), 400, "invalid_user_id");
    }
    assert!(redis.keys("recommendations:*").is_empty(), "nothing may be written on a bad request");

    let (status, body) = server.post(&format!("/recommend/{}", "x".repeat(128)));
    assert_eq!(status, 200, "128 bytes is allowed: {body}");
}

#[test]
fn malformed_profiles_get_422_naming_the_key_and_write_nothing() {
    let (redis, server) = setup();
    let cases = [
        ("notjson", "{not json", "not JSON"),
        ("object", r#"{"items":["a"]}"#, "got an object"),
        ("numbers", "[1, 2, 3]", "element 0 is a number"),
        ("nested", &format!(r#"["{}", ["x"]]"#, item(3)), "element 1 is an array"),
    ];
    for (user, value, reason) in cases {
        redis.set(&format!("user_profile:{user}"), value);
        let resp = server.post(&format!("/recommend/{user}"));
        assert_error(&resp, 422, "invalid_profile");
        let detail = resp.1["detail"].as_str().unwrap();
        assert!(detail.contains(&format!("user_profile:{user}")) && detail.contains(reason), "{detail}");
    }
    redis.cmd(&["RPUSH", "user_profile:alist", "a", "b"]);
    let resp = server.post("/recommend/alist");
    assert_error(&resp, 422, "invalid_profile");
    assert!(resp.1["detail"].as_str().unwrap().contains("list"), "{}", resp.1);
    assert!(redis.keys("recommendations:*").is_empty());
}

#[test]
fn unknown_routes_and_methods_get_json_errors() {
    let (_redis, server) = setup();
    assert_error(&server.get("/nope"), 404, "not_found");
    assert_error(&server.post("/recommend/"), 404, "not_found");
    assert_error(&server.get("/recommend/u"), 405, "method_not_allowed");
}

#[test]
fn health_reports_models_device_and_redis() {
    let (_redis, server) = setup();
    let (status, body) = server.get("/health");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["model_loaded"], true);
    assert_eq!(body["redis"], "ok");
    assert_eq!(body["device"], "cpu");
    assert_eq!(body["model_version"], "synthetic-test");
    assert_eq!(server.get("/health/live").0, 200);
    assert_eq!(server.get("/health/ready").0, 200);
}

#[test]
fn redis_outage_gives_503_fast_and_service_resumes_without_restart() {
    let redis = Redis::start();
    let port = redis.port;
    let server = Server::start(port);
    server.wait_healthy();
    redis.set("user_profile:r", &format!(r#"["{}"]"#, item(5)));
    assert_eq!(server.post("/recommend/r").0, 200);

    redis.stop();
    let t = Instant::now();
    let health = server.get("/health");
    assert!(t.elapsed() < Duration::from_secs(1), "health took {:?}", t.elapsed());
    assert_eq!(health.0, 503);
    assert_eq!(health.1["status"], "unhealthy");
    assert!(health.1["redis"].as_str().unwrap().starts_with("error"), "{}", health.1);
    let t = Instant::now();
    let resp = server.post("/recommend/r");
    assert!(t.elapsed() < Duration::from_secs(1), "recommend took {:?}", t.elapsed());
    assert_error(&resp, 503, "redis_unavailable");
    assert_eq!(server.get("/health/live").0, 200, "the process stays up");

    let redis = Redis::start_on(port);
    redis.set("user_profile:r", &format!(r#"["{}"]"#, item(5)));
    let t = Instant::now();
    wait_until(Duration::from_secs(5), || server.get("/health").0 == 200);
    assert!(t.elapsed() < Duration::from_secs(1), "recovery took {:?}", t.elapsed());
    let (status, body) = server.post("/recommend/r");
    assert_eq!(status, 200, "{body}");
    assert!(redis.get("recommendations:r").is_some());
}

#[test]
fn metrics_pass_promtool_and_show_every_stage() {
    let (redis, server) = setup();
    redis.set("user_profile:m", &format!(r#"["{}","{}"]"#, item(7), item(8)));
    assert_eq!(server.post("/recommend/m").0, 200);
    assert_eq!(server.post("/recommend/cold").0, 200);
    assert_eq!(server.post("/recommend/m?k=0").0, 400);
    let (status, text) = server.get_text("/metrics");
    assert_eq!(status, 200);
    for stage in ["redis_read", "lightgcn", "din", "ranknet", "redis_write"] {
        assert!(
            text.contains(&format!(
                "model_service_stage_duration_seconds_count{{stage=\"{stage}\",variant=\"default\"}}"
            )),
            "no histogram for {stage}:\n{text}"
        );
    }
    for needle in [
        "model_service_http_requests_total{route=\"/recommend/{user_id}\",status=\"200\"} 2",
        "model_service_http_requests_total{route=\"/recommend/{user_id}\",status=\"400\"} 1",
        "model_service_http_request_duration_seconds_bucket",
        "model_service_stage_candidates_count{stage=\"lightgcn\"} 1",
        "model_service_cold_starts_total 1",
        "model_service_model_info{",
        "device=\"cpu\"",
    ] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be installed (Debian package prometheus; scripts/test.sh installs it)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn last_stage_stops_the_cascade_early_for_ablations() {
    let redis = Redis::start();
    let history: Vec<String> = [0, 6, 12].iter().map(|&r| item(r)).collect();
    redis.set("user_profile:s", &serde_json::to_string(&history).unwrap());
    let mut lists = Vec::new();
    for stage in ["lightgcn", "din", "ranknet"] {
        let server = Server::start_with(redis.port, test_models(), &[("LAST_STAGE", stage)]);
        server.wait_healthy();
        let (status, body) = server.post("/recommend/s?k=10");
        assert_eq!(status, 200, "{body}");
        let ids = rec_ids(&body);
        assert_eq!(ids.len(), 10);
        assert!(ids.iter().all(|i| !history.contains(i)));
        let (_, metrics) = server.get_text("/metrics");
        let ran = |s: &str| {
            metrics
                .contains(&format!("model_service_stage_duration_seconds_count{{stage=\"{s}\",variant=\"default\"}} 1"))
        };
        assert_eq!(
            (ran("lightgcn"), ran("din"), ran("ranknet")),
            (true, stage != "lightgcn", stage == "ranknet"),
            "{stage}"
        );
        lists.push(ids);
    }
    assert_ne!(lists[0], lists[1], "DIN re-orders LightGCN's candidates");
    assert_ne!(lists[1], lists[2], "RankNet re-orders DIN's candidates");
}

#[test]
fn every_response_carries_a_request_id() {
    let (_redis, server) = setup();
    let client = reqwest::blocking::Client::new();
    let r = client.post(server.url("/recommend/rid")).header("x-request-id", "abc-123").send().unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123", "a client's id is kept");
    let r = client.get(server.url("/nope")).send().unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36, "a new UUID: {generated}");
    let r = client.get(server.url("/health")).header("x-request-id", "bad id\twith junk").send().unwrap();
    assert_ne!(r.headers()["x-request-id"], "bad id\twith junk");
}

#[test]
fn api_token_guards_post_routes_but_not_health_or_metrics() {
    let redis = Redis::start();
    let server = Server::start_with(redis.port, test_models(), &[("API_TOKEN", "s3cret-token")]);
    server.wait_healthy();
    assert_error(&server.post("/recommend/u"), 401, "unauthorized");
    let client = reqwest::blocking::Client::new();
    let wrong = client.post(server.url("/recommend/u")).bearer_auth("s3cret-tokem").send().unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer");
    assert!(redis.get("recommendations:u").is_none(), "a refused request writes nothing");
    let ok = client.post(server.url("/recommend/u")).bearer_auth("s3cret-token").send().unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert!(redis.get("recommendations:u").is_some());
    assert_eq!(server.get("/health").0, 200);
    assert_eq!(server.get_text("/metrics").0, 200);
}

#[test]
fn a_slow_redis_gives_503_by_the_deadline_not_a_pile_up() {
    let (redis, server) = setup();
    redis.set("user_profile:slow", &format!(r#"["{}"]"#, item(9)));
    let port = redis.port;
    let sleeper = std::thread::spawn(move || {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap().get_connection().unwrap();
        redis::cmd("DEBUG").arg("SLEEP").arg(3).query::<()>(&mut c).unwrap();
    });
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let resp = server.post("/recommend/slow");
    let took = t.elapsed();
    assert_error(&resp, 503, "redis_unavailable");
    assert!(took < Duration::from_millis(1500), "answered after {took:?}: the Redis bounds must cut it short");
    sleeper.join().unwrap();
    wait_until(Duration::from_secs(5), || server.post("/recommend/slow").0 == 200);
}

#[test]
fn sigterm_stops_the_server_with_exit_status_zero() {
    let (redis, mut server) = setup();
    redis.set("user_profile:bye", &format!(r#"["{}"]"#, item(2)));
    assert_eq!(server.post("/recommend/bye").0, 200);
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_server_whose_log_pipe_closed_keeps_answering_and_stops_on_sigterm() {
    let redis = Redis::start();
    let mut server = Server::start_with_closed_log(redis.port);
    server.wait_healthy();
    redis.set("user_profile:unlogged", &format!(r#"["{}"]"#, item(2)));
    // each of these writes log lines into the closed pipe
    for _ in 0..3 {
        let (status, body) = server.post("/recommend/unlogged");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["recommendations"].as_array().map(|r| r.len()), Some(10), "{body}");
    }
    assert_error(&server.post("/recommend/a%20b"), 400, "invalid_user_id");
    assert!(redis.get("recommendations:unlogged").is_some());
    server.sigterm();
    wait_until(Duration::from_secs(20), || server.exited().is_some());
    let status = server.exited();
    assert!(status.is_some_and(|s| s.success()), "SIGTERM did not end the server: {status:?}");
}

#[test]
fn sigterm_while_the_workers_run_requests_whose_clients_left_exits_without_failing_them() {
    // 250 requests queued on the shipped models (200-item histories, a few ms per batch), their
    // clients gone before the answers: the workers are still running those batches when the
    // process ends. libtorch's static destructors ran under them before (the batches failed with
    // "Invalid (backend, op) pair" in each of 3 runs of this test, or the process crashed).
    let redis = Redis::start();
    let models = shipped_models();
    let asins: Vec<String> = catalog_in(&models).into_iter().map(|(id, _)| id).collect();
    let users = 250;
    for u in 0..users {
        let history: Vec<&String> = (0..200).map(|i| &asins[(u * 7919 + i * 104_729) % asins.len()]).collect();
        redis.set(&format!("user_profile:left{u}"), &serde_json::to_string(&history).unwrap());
    }
    let mut server = Server::start_logged(redis.port, &models, &[("RUST_LOG", "info")]);
    server.wait_healthy();
    let address = format!("127.0.0.1:{}", server.port);
    let clients: Vec<std::net::TcpStream> = (0..users)
        .map(|u| {
            let mut c = std::net::TcpStream::connect(&address).unwrap();
            let request = format!("POST /recommend/left{u} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n");
            std::io::Write::write_all(&mut c, request.as_bytes()).unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    drop(clients);
    server.sigterm();
    let (exit, log) = server.exit_and_log();
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(log.contains("shutdown signal received"), "{log}");
    assert!(!log.contains("inference failed"), "a batch failed while the process ended:\n{log}");
}

#[test]
fn concurrent_requests_for_one_user_share_one_computation() {
    let (redis, server) = setup();
    redis.set("user_profile:popular_page", &format!(r#"["{}","{}"]"#, item(4), item(10)));
    let before = server.metric("model_service_inference_batch_size_sum");
    // Hold Redis for a moment so that every request arrives while the first is still reading.
    let port = redis.port;
    let sleeper = std::thread::spawn(move || {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap().get_connection().unwrap();
        redis::cmd("DEBUG").arg("SLEEP").arg(0.3).query::<()>(&mut c).unwrap();
    });
    std::thread::sleep(Duration::from_millis(50));
    let bodies: Vec<(u16, serde_json::Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12).map(|_| s.spawn(|| server.post("/recommend/popular_page?k=7"))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    sleeper.join().unwrap();
    for (status, body) in &bodies {
        assert_eq!(*status, 200, "{body}");
        // the same result object, down to the time it took
        assert_eq!(body, &bodies[0].1);
    }
    assert_eq!(rec_ids(&bodies[0].1).len(), 7);
    let stored: Vec<String> = serde_json::from_str(&redis.get("recommendations:popular_page").unwrap()).unwrap();
    assert_eq!(stored, rec_ids(&bodies[0].1));
    let shared = server.metric("model_service_single_flight_shared_total");
    let ranked = server.metric("model_service_inference_batch_size_sum") - before;
    assert!(shared >= 6.0, "only {shared} of 12 requests shared the computation");
    assert_eq!(ranked + shared, 12.0, "{ranked} ranked, {shared} shared");
    // a different k is a different computation
    let (status, other) = server.post("/recommend/popular_page?k=3");
    assert_eq!(status, 200);
    assert_eq!(rec_ids(&other), rec_ids(&bodies[0].1)[..3]);
}

#[test]
fn an_empty_or_blank_api_token_refuses_to_start() {
    for token in ["", "   ", "\t"] {
        let mut cmd = bin();
        base_env(&mut cmd, free_port(), test_models());
        let t = Instant::now();
        let out = cmd.env("API_TOKEN", token).env("PORT", free_port().to_string()).arg("serve").output().unwrap();
        assert_eq!(out.status.code(), Some(1), "API_TOKEN={token:?} must refuse to start");
        assert!(t.elapsed() < Duration::from_secs(10), "refused after {:?}", t.elapsed());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains("API_TOKEN is set but empty"), "{stderr}");
    }
}

#[test]
fn the_bearer_scheme_name_is_case_insensitive() {
    let redis = Redis::start();
    let server = Server::start_with(redis.port, test_models(), &[("API_TOKEN", "s3cret-token")]);
    server.wait_healthy();
    let client = reqwest::blocking::Client::new();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = client
            .post(server.url("/recommend/case"))
            .header("authorization", format!("{scheme} s3cret-token"))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{scheme}");
    }
    assert!(redis.get("recommendations:case").is_some());
    for wrong in ["Basic s3cret-token", "bearer S3CRET-TOKEN", "bearers3cret-token", "s3cret-token"] {
        let r = client.post(server.url("/recommend/case2")).header("authorization", wrong).send().unwrap();
        assert_eq!(r.status().as_u16(), 401, "{wrong}");
    }
    assert!(redis.get("recommendations:case2").is_none());
    let r = client.post(server.url("/admin/reload")).header("authorization", "BEARER s3cret-token").send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn user_id_and_k_rules_are_what_the_readme_says() {
    let (redis, server) = setup();
    redis.set("user_profile:u", &format!(r#"["{}"]"#, item(2)));
    // zero-width space, bidirectional overrides and isolates, byte order mark, soft hyphen,
    // no-break space, private use
    for id in ["a%E2%80%8Bb", "%E2%80%AEabc", "a%E2%81%A6b", "%EF%BB%BFa", "soft%C2%ADhyphen", "a%C2%A0b", "a%EE%80%80"]
    {
        assert_error(&server.post(&format!("/recommend/{id}")), 400, "invalid_user_id");
    }
    for query in ["k=1&k=2", "k=5&k=5", "k=%205", "k=5%20", "k=+5", "k=%2B5", "k=05x"] {
        assert_error(&server.post(&format!("/recommend/u?{query}")), 400, "invalid_k");
    }
    assert!(redis.keys("recommendations:*").is_empty(), "nothing may be written on a bad request");
    // punctuation, including Redis glob and hash-tag characters, is allowed: keys are never patterns
    for (path_id, id) in [("a*b", "a*b"), ("a:b", "a:b"), ("%7Bx%7D", "{x}"), ("caf%C3%A9", "café")] {
        let (status, body) = server.post(&format!("/recommend/{path_id}?k=05"));
        assert_eq!(status, 200, "{id}: {body}");
        assert_eq!(body["user_id"], id);
        assert_eq!(rec_ids(&body).len(), 5);
        assert!(redis.get(&format!("recommendations:{id}")).is_some(), "{id}");
    }
}

#[test]
fn refusals_before_any_route_runs_are_counted_in_http_requests_total() {
    let redis = Redis::start();
    let server = Server::start_with(redis.port, test_models(), &[("BODY_READ_TIMEOUT_SECS", "1")]);
    server.wait_healthy();
    let port = server.port;
    // the request limiter: a declared body over 16 KiB, a 10 KB target, a transfer coding it does
    // not know, a body that does not arrive
    let oversized = b"POST /recommend/u HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n";
    assert_raw_error(&raw_exchange(port, oversized), 413, "payload_too_large");
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(10_000));
    assert_raw_error(&raw_exchange(port, long.as_bytes()), 414, "uri_too_long");
    let gzip = b"POST /recommend/u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n";
    assert_raw_error(&raw_exchange(port, gzip), 501, "unsupported_transfer_encoding");
    let short = b"POST /recommend/u HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab";
    assert_raw_error(&raw_exchange(port, short), 408, "request_timeout");
    // hyper itself: a request line it cannot parse, 101 header fields
    assert_raw_error(&raw_exchange(port, b"GET /<script> HTTP/1.1\r\nHost: x\r\n\r\n"), 400, "malformed_request");
    let mut many = String::from("GET /health/live HTTP/1.1\r\nHost: x\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-{i}: y\r\n"));
    }
    many.push_str("\r\n");
    assert_raw_error(&raw_exchange(port, many.as_bytes()), 431, "headers_too_large");

    let (_, text) = server.get_text("/metrics");
    for counted in [
        r#"model_service_http_requests_total{route="/recommend/{user_id}",status="413"} 1"#,
        r#"model_service_http_requests_total{route="unmatched",status="414"} 1"#,
        r#"model_service_http_requests_total{route="/recommend/{user_id}",status="501"} 1"#,
        r#"model_service_http_requests_total{route="/recommend/{user_id}",status="408"} 1"#,
        r#"model_service_http_requests_total{route="unmatched",status="400"} 1"#,
        r#"model_service_http_requests_total{route="unmatched",status="431"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == counted), "not counted: {counted}\n{}", http_lines(&text));
    }
}

fn http_lines(metrics: &str) -> String {
    metrics.lines().filter(|l| l.starts_with("model_service_http_requests_total")).collect::<Vec<_>>().join("\n")
}

#[test]
fn help_says_the_token_guards_every_ranking_route() {
    let help = String::from_utf8(bin().arg("--help").output().unwrap().stdout).unwrap();
    let api_token = help.split("--api-token").nth(1).unwrap_or_default();
    let api_token = api_token.split("\n      --").next().unwrap_or_default();
    assert!(api_token.contains("GET /recommendations/{user_id}"), "--help on API_TOKEN: {api_token}");
}

#[test]
fn the_openapi_document_states_max_k_and_the_user_id_rule_the_server_applies() {
    let redis = Redis::start();
    let server = Server::start_with(redis.port, test_models(), &[("MAX_K", "50")]);
    server.wait_healthy();
    redis.set("user_profile:u", &format!(r#"["{}"]"#, item(2)));
    let (status, doc) = server.get("/openapi.json");
    assert_eq!(status, 200);
    for (path, method) in [("/recommend/{user_id}", "post"), ("/recommendations/{user_id}", "get")] {
        let op = &doc["paths"][path][method];
        let param = |name: &str| {
            op["parameters"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["schema"].clone()
        };
        // k's maximum is the configured MAX_K
        assert_eq!(param("k")["maximum"], 50, "{method} {path}: {}", param("k"));
        // the id: 128 characters, and a pattern that refuses what the server refuses
        let id = param("user_id");
        assert_eq!(id["maxLength"], 128, "{id}");
        let pattern = id["pattern"].as_str().unwrap();
        for refused in ["\\u200B", "\\uFEFF", "\\u0378"] {
            assert!(
                !pattern.contains(&format!("{refused}-")) && !pattern.contains(&format!("-{refused}")),
                "{refused}"
            );
        }
        assert!(pattern.starts_with("^[\\u0021-") && pattern.len() > 1000, "{pattern:.200}");
        // a body is read on these routes too: its refusals are documented
        for code in ["408", "413"] {
            assert!(op["responses"].get(code).is_some(), "{method} {path} does not document {code}");
        }
    }
    assert_eq!(doc["components"]["schemas"]["HistoryRequest"]["properties"]["k"]["maximum"], 50);
    assert_error(&server.post("/recommend/u?k=51"), 400, "invalid_k");
    assert_eq!(server.post("/recommend/u?k=50").0, 200);
}

#[test]
fn the_user_id_length_is_counted_in_characters_as_the_document_says() {
    let (_redis, server) = setup();
    let (status, body) = server.post(&format!("/recommend/{}", "%C3%A9".repeat(128)));
    assert_eq!(status, 200, "128 two-byte characters: {body}");
    assert_error(&server.post(&format!("/recommend/{}", "%C3%A9".repeat(129))), 400, "invalid_user_id");
}

#[test]
fn post_recommend_takes_k_in_the_body_only_and_reports_it_as_given() {
    let (_redis, server) = setup();
    let history = serde_json::json!({ "history": [item(2)], "k": 5 });
    let (status, body) = server.post_json(server.port, "/recommend?k=7", &history, None);
    assert_error(&(status, body.clone()), 400, "invalid_request");
    assert!(body["detail"].as_str().unwrap().contains("body"), "{body}");
    let (status, body) = server.post_json(server.port, "/recommend", &history, None);
    assert_eq!((status, rec_ids(&body).len()), (200, 5), "{body}");

    let client = reqwest::blocking::Client::new();
    for k in ["18446744073709551617", "9223372036854775808", "-99999999999999999999", "1e30"] {
        let r = client
            .post(server.url("/recommend"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"history": [], "k": {k}}}"#))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{k}");
        let body: serde_json::Value = r.json().unwrap();
        assert_eq!(body["error"], "invalid_k", "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(k) && !detail.contains("9223372036854775807"), "k={k}: {detail}");
    }
}

#[test]
fn health_shows_the_model_directory_and_redis_addresses_only_with_the_token() {
    let redis = Redis::start();
    let server = Server::start_with(redis.port, test_models(), &[("API_TOKEN", "health-token")]);
    server.wait_healthy();
    let dir = test_models().to_str().unwrap().to_string();
    let name = test_models().file_name().unwrap().to_str().unwrap();
    let addr = format!("127.0.0.1:{}", redis.port);
    for (path, token) in [("/health", None), ("/health/ready", None), ("/health", Some("wrong-token"))] {
        let (status, body) = match token {
            Some(t) => server.get_authed(path, t),
            None => server.get(path),
        };
        assert_eq!(status, 200, "{body}");
        let text = body.to_string();
        assert_eq!(body["model_dir"], name, "{path} {token:?}: {body}");
        assert!(
            !text.contains(&dir) && !text.contains(&addr) && !text.contains("\"addr\""),
            "{path} {token:?}: {text}"
        );
        assert_eq!(body["redis_topology"]["nodes"][0]["role"], "master", "{body}");
    }
    for path in ["/health", "/health/ready"] {
        let (status, body) = server.get_authed(path, "health-token");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model_dir"], dir.as_str(), "{body}");
        assert_eq!(body["redis_topology"]["nodes"][0]["addr"], addr.as_str(), "{body}");
    }
}
