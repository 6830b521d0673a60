//! Model reload without downtime (POST /admin/reload, SIGHUP), the admin port, and header limits,
//! against a real redis-server and the real binary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::*;

const TOKEN: &str = "admin-token-1";

/// When a request began, its status, the model version that answered, the user.
type Answer = (Instant, u16, String, String);

fn seed_profiles(redis: &Redis, users: usize) {
    for u in 0..users {
        let history: Vec<String> = (0..4).map(|j| item((u * 7 + j * 6) % 300)).collect();
        redis.set(&format!("user_profile:load{u}"), &serde_json::to_string(&history).unwrap());
    }
}

#[test]
fn a_reload_under_continuous_load_loses_no_request_and_serves_the_new_version() {
    let v2 = make_models("models-v2", &["--version", "synthetic-v2", "--seed", "2"]);
    let redis = Redis::start();
    let server = Server::start_with(redis.port, test_models(), &[("API_TOKEN", TOKEN), ("INFERENCE_WORKERS", "2")]);
    server.wait_healthy();
    seed_profiles(&redis, 40);

    // Four clients post without pause; every answer is recorded with when its request began.
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, answers, port) = (stop.clone(), answers.clone(), server.port);
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::new();
                let mut n = c;
                while !stop.load(Ordering::Relaxed) {
                    let user = format!("load{}", n % 40);
                    let began = Instant::now();
                    let r = http
                        .post(format!("http://127.0.0.1:{port}/recommend/{user}"))
                        .bearer_auth(TOKEN)
                        .send()
                        .expect("the connection must not fail");
                    let status = r.status().as_u16();
                    let body: serde_json::Value = r.json().unwrap();
                    let version = body["model_version"].as_str().unwrap_or("").to_string();
                    answers.lock().unwrap().push((began, status, version, user));
                    n += 4;
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(800));
    let (status, body) =
        server.post_json(server.port, "/admin/reload", &json!({ "model_dir": v2.to_str().unwrap() }), Some(TOKEN));
    let reloaded_at = Instant::now();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "reloaded");
    assert_eq!(body["model_version"], "synthetic-v2");
    assert_eq!(body["previous_version"], "synthetic-test");
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }

    let answers = answers.lock().unwrap();
    let before = answers.iter().filter(|a| a.2 == "synthetic-test").count();
    let after = answers.iter().filter(|a| a.2 == "synthetic-v2").count();
    assert!(before > 0 && after > 0, "served {before} before and {after} after the reload");
    let failed: Vec<_> = answers.iter().filter(|a| a.1 != 200).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {:?}", failed.len(), answers.len(), &failed[..1]);
    let stale: Vec<_> = answers.iter().filter(|a| a.0 > reloaded_at && a.2 != "synthetic-v2").collect();
    assert!(stale.is_empty(), "requests begun after the reload answered by the old version: {}", stale.len());

    let (_, health) = server.get_authed("/health", TOKEN);
    assert_eq!(health["model_version"], "synthetic-v2");
    assert_eq!(health["model_dir"], v2.to_str().unwrap());
    assert_eq!(server.metric(r#"model_service_model_reloads_total{outcome="success"}"#), 1.0);
    let (_, metrics) = server.get_text("/metrics");
    let info: Vec<&str> = metrics.lines().filter(|l| l.starts_with("model_service_model_info{")).collect();
    assert_eq!(info.len(), 1, "{info:?}");
    assert!(info[0].contains(r#"version="synthetic-v2""#), "{info:?}");

    // A fresh request: Redis holds the list the new version computed, and says so.
    let (status, body) = server.post_json(server.port, "/recommend/load3", &json!(null), Some(TOKEN));
    assert_eq!(status, 200);
    let stored: Vec<String> = serde_json::from_str(&redis.get("recommendations:load3").unwrap()).unwrap();
    assert_eq!(stored, rec_ids(&body));
    assert_eq!(redis.hget("recommendations_meta:load3", "model_version").as_deref(), Some("synthetic-v2"));
}

#[test]
fn a_broken_model_directory_is_refused_and_the_old_version_keeps_serving() {
    let redis = Redis::start();
    let server = Server::start_with(redis.port, test_models(), &[("API_TOKEN", TOKEN)]);
    server.wait_healthy();
    seed_profiles(&redis, 1);

    let junk = copy_models("reload-junk");
    std::fs::write(junk.join("din/model.pt"), b"not a torchscript file").unwrap();
    let short = copy_models("reload-short");
    let catalog = std::fs::read_to_string(short.join("catalog.tsv")).unwrap();
    let fewer: String = catalog.lines().take(299).map(|l| format!("{l}\n")).collect();
    std::fs::write(short.join("catalog.tsv"), fewer).unwrap();
    let cases = [
        (junk.to_str().unwrap().to_string(), "not a loadable TorchScript file"),
        (short.to_str().unwrap().to_string(), "300 items but catalog.tsv has 299"),
        ("/nonexistent/models".to_string(), "catalog.tsv is missing"),
    ];
    for (dir, why) in &cases {
        let resp = server.post_json(server.port, "/admin/reload", &json!({ "model_dir": dir }), Some(TOKEN));
        assert_error(&resp, 422, "reload_refused");
        assert!(resp.1["detail"].as_str().unwrap().contains(why), "{}", resp.1);
        let (status, body) = server.post_json(server.port, "/recommend/load0", &json!(null), Some(TOKEN));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model_version"], "synthetic-test");
    }
    let bad_body = server.post_json(server.port, "/admin/reload", &json!({ "dir": "/x" }), Some(TOKEN));
    assert_error(&bad_body, 400, "invalid_request");
    let (_, health) = server.get("/health");
    assert_eq!(health["model_version"], "synthetic-test");
    assert_eq!(health["status"], "healthy");
    assert_eq!(server.metric(r#"model_service_model_reloads_total{outcome="refused"}"#), 3.0);
}

#[test]
fn sighup_reloads_the_model_directory_in_service() {
    let live = copy_models("sighup-live");
    let v3 = make_models("models-v3", &["--version", "synthetic-v3", "--seed", "3"]);
    let redis = Redis::start();
    let server = Server::start_with(redis.port, &live, &[]);
    server.wait_healthy();
    assert_eq!(server.get("/health").1["model_version"], "synthetic-test");

    // A deploy replaces the files in place, then signals.
    copy_dir(&v3, &live);
    std::process::Command::new("kill").args(["-HUP", &server.pid().to_string()]).status().unwrap();
    wait_until(Duration::from_secs(30), || server.get("/health").1["model_version"] == "synthetic-v3");
    seed_profiles(&redis, 1);
    let (status, body) = server.post("/recommend/load0");
    assert_eq!(status, 200);
    assert_eq!(body["model_version"], "synthetic-v3");

    // A broken directory on SIGHUP: refused, the process and the version in service stay.
    std::fs::write(live.join("ranknet/model.pt"), b"junk").unwrap();
    std::process::Command::new("kill").args(["-HUP", &server.pid().to_string()]).status().unwrap();
    wait_until(Duration::from_secs(30), || {
        server.metric(r#"model_service_model_reloads_total{outcome="refused"}"#) == 1.0
    });
    assert_eq!(server.get("/health").1["model_version"], "synthetic-v3");
    assert_eq!(server.post("/recommend/load0").0, 200);
}

#[test]
fn admin_routes_need_a_token_on_the_public_port_or_live_on_the_loopback_admin_port() {
    let redis = Redis::start();
    // No token, no admin port: the public port refuses admin routes.
    let open = Server::start(redis.port);
    open.wait_healthy();
    assert_error(&open.post_json(open.port, "/admin/reload", &json!(null), None), 403, "forbidden");

    // Token set: the public port wants it.
    let guarded = Server::start_with(redis.port, test_models(), &[("API_TOKEN", TOKEN)]);
    guarded.wait_healthy();
    assert_error(&guarded.post_json(guarded.port, "/admin/reload", &json!(null), None), 401, "unauthorized");
    assert_error(&guarded.post_json(guarded.port, "/admin/reload", &json!(null), Some("wrong")), 401, "unauthorized");
    let (status, body) = guarded.post_json(guarded.port, "/admin/reload", &json!(null), Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_version"], "synthetic-test");

    // ADMIN_PORT: admin routes only there (no token needed when none is set), not on PORT.
    let admin_port = free_port();
    let split = Server::start_with(redis.port, test_models(), &[("ADMIN_PORT", &admin_port.to_string())]);
    split.wait_healthy();
    assert_error(&split.post_json(split.port, "/admin/reload", &json!(null), None), 404, "not_found");
    let (status, body) = split.post_json(admin_port, "/admin/reload", &json!(null), None);
    assert_eq!(status, 200, "{body}");
    assert_error(&split.post_json(admin_port, "/recommend/u1", &json!(null), None), 404, "not_found");

    // A non-loopback admin address is refused at start.
    let mut public = Server::start_with(
        redis.port,
        test_models(),
        &[("ADMIN_PORT", &free_port().to_string()), ("ADMIN_HOST", "0.0.0.0")],
    );
    wait_until(Duration::from_secs(30), || public.exited().is_some());
    assert!(!public.exited().unwrap().success());
}

#[test]
fn oversized_headers_and_bodies_get_431_and_413_json_and_write_nothing() {
    let redis = Redis::start();
    let server = Server::start(redis.port);
    server.wait_healthy();
    seed_profiles(&redis, 1);
    let http = reqwest::blocking::Client::new();
    let r = http.post(server.url("/recommend/load0")).header("x-padding", "a".repeat(10_000)).send().unwrap();
    assert_eq!(r.status().as_u16(), 431);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["error"], "headers_too_large");
    assert!(body["detail"].as_str().unwrap().contains("8192"), "{body}");
    assert!(redis.get("recommendations:load0").is_none());
    let r = http.post(server.url("/recommend/load0")).body(vec![b'x'; 20_000]).send().unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["error"], "payload_too_large");
    assert!(redis.get("recommendations:load0").is_none());
    let r = http.post(server.url("/recommend/load0")).header("x-padding", "a".repeat(1_000)).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn reload_with_deadline(server: &Server, dir: &std::path::Path) -> (u16, serde_json::Value, Duration) {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let t = Instant::now();
    let r = client
        .post(server.url("/admin/reload"))
        .bearer_auth(TOKEN)
        .json(&json!({ "model_dir": dir.to_str().unwrap() }))
        .send()
        .unwrap_or_else(|e| panic!("{}: no answer within 10 s: {e}", dir.display()));
    let status = r.status().as_u16();
    (status, r.json().unwrap(), t.elapsed())
}

#[test]
fn a_reload_refuses_fifos_devices_procfs_and_oversized_files_at_once() {
    let redis = Redis::start();
    let server = Server::start_with(redis.port, test_models(), &[("API_TOKEN", TOKEN)]);
    server.wait_healthy();
    seed_profiles(&redis, 1);
    let rss_before = rss_kb(server.pid());

    let fifo = copy_models("reload-fifo");
    std::fs::remove_file(fifo.join("catalog.tsv")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(fifo.join("catalog.tsv")).status().unwrap().success());
    let fifo_model = copy_models("reload-fifo-model");
    std::fs::remove_file(fifo_model.join("din/model.pt")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(fifo_model.join("din/model.pt")).status().unwrap().success());
    let zero = copy_models("reload-zero");
    std::fs::remove_file(zero.join("catalog.tsv")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero.join("catalog.tsv")).unwrap();
    let huge = copy_models("reload-huge");
    // sparse: 5 GiB by its size, no disk
    std::fs::OpenOptions::new().write(true).open(huge.join("catalog.tsv")).unwrap().set_len(5 << 30).unwrap();
    // procfs says regular and empty, and reads without end (RSS 0.5 -> 3 GB in 10 s, unbounded)
    let procfs = copy_models("reload-procfs");
    std::fs::remove_file(procfs.join("manifest.json")).unwrap();
    std::os::unix::fs::symlink("/proc/self/pagemap", procfs.join("manifest.json")).unwrap();
    let procfs_model = copy_models("reload-procfs-model");
    std::fs::remove_file(procfs_model.join("ranknet/model.pt")).unwrap();
    std::os::unix::fs::symlink("/proc/self/pagemap", procfs_model.join("ranknet/model.pt")).unwrap();
    let cases = [
        (&procfs, "reports no size"),
        (&procfs_model, "reports no size"),
        (&fifo, "not a regular file"),
        (&fifo_model, "not a regular file"),
        (&zero, "not a regular file"),
        (&huge, "over MAX_MODEL_FILE_BYTES"),
    ];
    for (dir, why) in cases {
        let (status, body, took) = reload_with_deadline(&server, dir);
        assert_eq!((status, body["error"].as_str()), (422, Some("reload_refused")), "{}: {body}", dir.display());
        assert!(body["detail"].as_str().unwrap().contains(why), "{body}");
        assert!(took < Duration::from_secs(5), "{}: refused after {took:?}", dir.display());
        let (status, body) = server.post_json(server.port, "/recommend/load0", &json!(null), Some(TOKEN));
        assert_eq!((status, body["model_version"].as_str()), (200, Some("synthetic-test")), "{body}");
    }
    let grown = rss_kb(server.pid()).saturating_sub(rss_before);
    assert!(grown < 200_000, "memory grew by {grown} kB");
    // the next reload is not blocked by any of them
    let (status, body) = server.post_json(server.port, "/admin/reload", &json!(null), Some(TOKEN));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_timed_out_reload_holds_409_until_its_load_ends_and_sigterm_still_exits() {
    let v2 = make_models("models-v2-timeout", &["--version", "synthetic-v2", "--seed", "2"]);
    let redis = Redis::start();
    let mut server = Server::start_with(
        redis.port,
        test_models(),
        &[("API_TOKEN", TOKEN), ("RELOAD_TIMEOUT_SECS", "0.02"), ("INFERENCE_WORKERS", "4")],
    );
    server.wait_healthy();
    let body = json!({ "model_dir": v2.to_str().unwrap() });
    let first = server.post_json(server.port, "/admin/reload", &body, Some(TOKEN));
    assert_error(&first, 503, "reload_timeout");
    // the load goes on after its client got the answer: another reload is refused meanwhile
    let second = server.post_json(server.port, "/admin/reload", &body, Some(TOKEN));
    assert_error(&second, 409, "reload_in_progress");
    // once the load has ended a reload is accepted again (and times out again, at 20 ms)
    wait_until(Duration::from_secs(30), || server.post_json(server.port, "/admin/reload", &body, Some(TOKEN)).0 != 409);
    // the timed-out loads were discarded: the old version keeps serving
    wait_until(Duration::from_secs(30), || {
        server.post_json(server.port, "/admin/reload", &json!({"model_dir": "/nonexistent"}), Some(TOKEN)).0 == 422
    });
    assert_eq!(server.get("/health").1["model_version"], "synthetic-test");
    assert!(server.metric(r#"model_service_model_reloads_total{outcome="timeout"}"#) >= 2.0);
    assert_eq!(server.metric(r#"model_service_model_reloads_total{outcome="success"}"#), 0.0);

    // SIGTERM while a load runs ends the process
    assert_error(&server.post_json(server.port, "/admin/reload", &body, Some(TOKEN)), 503, "reload_timeout");
    let t = Instant::now();
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "exit took {:?}", t.elapsed());
}

#[test]
fn a_set_changed_under_the_same_version_is_another_set_to_the_cache() {
    let redis = Redis::start();
    let server = Server::start_with(redis.port, test_models(), &[("API_TOKEN", TOKEN)]);
    server.wait_healthy();
    seed_profiles(&redis, 3);
    let (status, first) = server.post_json(server.port, "/recommend/load1", &json!(null), Some(TOKEN));
    assert_eq!(status, 200, "{first}");
    let authed_get = |path: &str| {
        let r = reqwest::blocking::Client::new().get(server.url(path)).bearer_auth(TOKEN).send().unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().unwrap())
    };
    assert_eq!(authed_get("/recommendations/load1").1["source"], "cache");
    let (_, cold) = authed_get("/recommendations/nobody");
    assert_eq!(authed_get("/recommendations/nobody").1["source"], "cache");

    // the same manifest (same version), the popularity column reversed
    let changed = copy_models("reload-same-version");
    let catalog = std::fs::read_to_string(changed.join("catalog.tsv")).unwrap();
    let rows: Vec<(&str, &str)> = catalog.lines().map(|l| l.split_once('\t').unwrap()).collect();
    let reversed: Vec<String> =
        rows.iter().zip(rows.iter().rev()).map(|((id, _), (_, pop))| format!("{id}\t{pop}")).collect();
    std::fs::write(changed.join("catalog.tsv"), reversed.join("\n") + "\n").unwrap();
    let (status, body) =
        server.post_json(server.port, "/admin/reload", &json!({"model_dir": changed.to_str().unwrap()}), Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_version"], "synthetic-test");

    let (_, after) = authed_get("/recommendations/load1");
    assert_eq!(after["source"], "computed", "a list of the old set is not served as current: {after}");
    let (_, cold_after) = authed_get("/recommendations/nobody");
    assert_eq!(cold_after["source"], "computed", "{cold_after}");
    assert_ne!(rec_ids(&cold_after), rec_ids(&cold), "the new popularity orders the popular list");
    assert_eq!(authed_get("/recommendations/nobody").1["source"], "cache", "and is cached for the new set");
}
