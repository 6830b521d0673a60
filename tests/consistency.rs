//! Every answer reflects the profile it was asked about, and nothing stale, half-written or wrong is
//! left in Redis: long profiles, size caps, single flight across a profile rewrite, writes that
//! answer 503, keys of the wrong type, model loading, deadlines, Redis restarts and readiness.
//! Real redis-server, real binary, TorchScript test models.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use testkit::*;

fn serve(redis: &Redis, env: &[(&str, &str)]) -> Server {
    let server = Server::start_with(redis.port, test_models(), env);
    server.wait_healthy();
    server
}

fn profile_of(rows: impl IntoIterator<Item = usize>) -> String {
    serde_json::to_string(&rows.into_iter().map(item).collect::<Vec<_>>()).unwrap()
}

fn stored(redis: &Redis, user: &str) -> Option<Vec<String>> {
    redis.get(&format!("recommendations:{user}")).map(|v| serde_json::from_str(&v).unwrap())
}

fn sha1(value: &str) -> String {
    use sha1::{Digest, Sha1};
    format!("{:x}", Sha1::digest(value.as_bytes()))
}

#[test]
fn every_item_of_a_long_profile_is_excluded_not_only_the_ones_the_models_see() {
    let redis = Redis::start();
    // The models see the 3 most recent items; the profile holds 250 of the 300 catalog items.
    let server = serve(&redis, &[("MAX_HISTORY", "3")]);
    let rows: Vec<usize> = (0..250).map(|i| (i * 7) % 300).collect();
    let owned: HashSet<String> = rows.iter().map(|&r| item(r)).collect();
    redis.set("user_profile:reader", &profile_of(rows));
    let (status, body) = server.post("/recommend/reader?k=20");
    assert_eq!(status, 200, "{body}");
    let ids = rec_ids(&body);
    assert_eq!(ids.len(), 20);
    let mine: Vec<&String> = ids.iter().filter(|id| owned.contains(*id)).collect();
    assert!(mine.is_empty(), "recommended items the shopper already has: {mine:?}");
    assert_eq!(body["truncated_items"], 247, "{body}");
    assert_eq!(stored(&redis, "reader").unwrap(), ids);
}

#[test]
fn profiles_over_the_caps_get_422_and_leave_no_list_behind() {
    let redis = Redis::start();
    let server = serve(&redis, &[("MAX_PROFILE_BYTES", "2000"), ("MAX_PROFILE_ITEMS", "50")]);
    redis.set("user_profile:big", &profile_of([0, 1, 2]));
    assert_eq!(server.post("/recommend/big").0, 200);
    assert!(stored(&redis, "big").is_some());

    // 300 ids of 13 bytes: over MAX_PROFILE_BYTES
    redis.set("user_profile:big", &profile_of(0..300));
    let resp = server.post("/recommend/big");
    assert_error(&resp, 422, "profile_too_large");
    assert!(resp.1["detail"].as_str().unwrap().contains("user_profile:big"), "{}", resp.1);
    assert!(resp.1["detail"].as_str().unwrap().contains("at most 2000"), "{}", resp.1);
    assert!(stored(&redis, "big").is_none(), "the old list no longer reflects the profile");
    assert!(redis.get("recommendations_meta:big").is_none());

    // 60 ids in 780 bytes: under the byte cap, over MAX_PROFILE_ITEMS
    redis.set("user_profile:long", &profile_of([3]));
    assert_eq!(server.post("/recommend/long").0, 200);
    redis.set("user_profile:long", &profile_of(0..60));
    let resp = server.post("/recommend/long");
    assert_error(&resp, 422, "profile_too_long");
    assert!(stored(&redis, "long").is_none());

    // a malformed profile: the same, and the API answers 422 again (nothing was written meanwhile)
    redis.set("user_profile:junk", &profile_of([4]));
    assert_eq!(server.post("/recommend/junk").0, 200);
    redis.set("user_profile:junk", "{not json");
    assert_error(&server.post("/recommend/junk"), 422, "invalid_profile");
    assert!(stored(&redis, "junk").is_none());
    assert_error(&server.post("/recommend/junk"), 422, "invalid_profile");
}

#[test]
fn a_request_after_a_profile_rewrite_never_gets_the_list_of_the_old_profile() {
    let redis = Redis::start();
    // One worker, one request per batch: a queue of long profiles keeps request A in flight. The
    // synthetic models rank a filler in about 0.15 ms, and whether the queue outlasts the ~60 ms
    // between A's read and B depends on how fast the machine issues the fillers (1,500 were
    // sometimes all ranked by then): a round in which A was not in flight proves nothing, so it is
    // run again with twice the fillers, and at least one round must have A in flight.
    let env = [
        ("INFERENCE_WORKERS", "1"),
        ("MAX_BATCH", "1"),
        ("QUEUE_CAPACITY", "4000"),
        ("MAX_CONNECTIONS", "4000"),
        ("REQUEST_TIMEOUT_MS", "120000"),
    ];
    let server = serve(&redis, &env);
    let mut rounds = Vec::new();
    for (round, fillers) in [1500, 3000, 3000].into_iter().enumerate() {
        let (a_took, gap) = rewrite_round(&redis, &server, round, fillers);
        rounds.push(format!("{fillers} fillers: A took {a_took:?}, B came {gap:?} after A"));
        if a_took > gap {
            eprintln!("{rounds:?}");
            return;
        }
    }
    panic!("A was never in flight when B arrived, so the test meant nothing: {rounds:?}");
}

/// One round: `fillers` queued requests, then A on the old profile of `shopper<round>`, the
/// profile's rewrite, and B. Checks what B and Redis hold; returns how long A took and how long
/// after A B was sent.
fn rewrite_round(redis: &Redis, server: &Server, round: usize, fillers: usize) -> (Duration, Duration) {
    let shopper = format!("shopper{round}");
    let old = profile_of([0, 6, 12]); // one cluster of the synthetic catalog
    let new = profile_of([3, 9, 15, 21]); // another
    redis.set(&format!("user_profile:{shopper}"), &old);
    let mut pipe = redis::pipe();
    for n in 0..fillers {
        pipe.set(format!("user_profile:filler{round}-{n}"), profile_of((0..200).map(|i| (i * 3 + n) % 300))).ignore();
    }
    pipe.query::<()>(&mut redis.conn()).unwrap();
    let reads =
        || server.metric("model_service_stage_duration_seconds_count{stage=\"redis_read\",variant=\"default\"}");
    let before = reads();
    let shopper_path = format!("/recommend/{shopper}");
    let (a, b, gap) = std::thread::scope(|s| {
        let queued: Vec<_> =
            (0..fillers).map(|n| s.spawn(move || server.post(&format!("/recommend/filler{round}-{n}")).0)).collect();
        // every filler has read its profile and waits for the one worker
        wait_until(Duration::from_secs(60), || reads() >= before + fillers as f64);
        let a_sent = Instant::now();
        let a = s.spawn(|| server.post(&shopper_path));
        // A has read the old profile (and waits behind the fillers) ...
        wait_until(Duration::from_secs(60), || reads() >= before + fillers as f64 + 1.0);
        // ... when the frontend's rewrite is acknowledged, and then B is sent.
        redis.set(&format!("user_profile:{shopper}"), &new);
        let gap = a_sent.elapsed();
        let b = server.post(&shopper_path);
        for f in queued {
            assert_eq!(f.join().unwrap(), 200);
        }
        (a.join().unwrap(), b, gap)
    });
    assert_eq!((a.0, b.0), (200, 200), "{} {}", a.1, b.1);
    let a_took = Duration::from_secs_f64(a.1["elapsed_ms"].as_f64().unwrap() / 1e3);
    // What the new profile gives, asked with nothing else in flight:
    let (_, fresh) = server.post(&shopper_path);
    assert_ne!(rec_ids(&a.1), rec_ids(&fresh), "the two profiles must rank differently for this test to mean anything");
    assert_eq!(rec_ids(&b.1), rec_ids(&fresh), "B arrived after the rewrite and must reflect it");
    // Redis holds the newest list, marked with the profile it came from.
    assert_eq!(stored(redis, &shopper).unwrap(), rec_ids(&fresh));
    assert_eq!(redis.hget(&format!("recommendations_meta:{shopper}"), "profile_sha"), Some(sha1(&new)));
    (a_took, gap)
}

#[test]
fn a_request_that_answers_503_has_written_nothing_and_never_will() {
    let redis = Redis::start();
    let server = serve(&redis, &[]);
    let users: Vec<String> = (0..1200).map(|n| format!("u{n}")).collect();
    let mut pipe = redis::pipe();
    for (n, u) in users.iter().enumerate() {
        pipe.set(format!("user_profile:{u}"), profile_of([n % 300, (n * 11) % 300])).ignore();
    }
    pipe.query::<()>(&mut redis.conn()).unwrap();
    let port = redis.port;
    // 32 clients work through the users (one request each) while Redis sleeps for 2 s in the middle:
    // some requests read before the sleep and write during it.
    let results: Vec<(String, u16, serde_json::Value)> = std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap().get_connection().unwrap();
            redis::cmd("DEBUG").arg("SLEEP").arg(2).query::<()>(&mut c).unwrap();
        });
        let handles: Vec<_> = users
            .chunks(users.len() / 32 + 1)
            .map(|chunk| {
                let server = &server;
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|u| {
                            let (status, body) = server.post(&format!("/recommend/{u}"));
                            (u.clone(), status, body)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    std::thread::sleep(Duration::from_millis(300)); // anything queued in Redis has run by now
    let failed: Vec<&(String, u16, serde_json::Value)> = results.iter().filter(|r| r.1 != 200).collect();
    assert!(!failed.is_empty(), "the sleep must make some requests fail for this test to mean anything");
    for (user, status, body) in &results {
        match status {
            200 => assert_eq!(stored(&redis, user).as_ref(), Some(&rec_ids(body)), "{user}"),
            503 => {
                assert_eq!(body["error"], "redis_unavailable", "{body}");
                assert!(stored(&redis, user).is_none(), "{user} got 503 ({body}) but its list was written");
                assert!(redis.get(&format!("recommendations_meta:{user}")).is_none());
            }
            other => panic!("{user}: unexpected {other} {body}"),
        }
    }
}

#[test]
fn a_meta_key_of_the_wrong_type_is_not_blamed_on_the_profile_and_is_replaced() {
    let redis = Redis::start();
    let server = serve(&redis, &[]);
    redis.set("user_profile:typed", &profile_of([5, 11]));
    redis.set("recommendations_meta:typed", "written by something else");
    let (status, body) = server.post("/recommend/typed");
    assert_eq!(status, 200, "{body}");
    assert_eq!(redis.hget("recommendations_meta:typed", "profile_sha"), Some(sha1(&profile_of([5, 11]))));
    // a profile of the wrong type is the profile's problem, named with its key and type
    redis.cmd(&["DEL", "user_profile:listed"]);
    redis.cmd(&["RPUSH", "user_profile:listed", "a"]);
    let resp = server.post("/recommend/listed");
    assert_error(&resp, 422, "invalid_profile");
    let detail = resp.1["detail"].as_str().unwrap();
    assert!(detail.contains("user_profile:listed") && detail.contains("list"), "{detail}");
}

#[test]
fn requests_and_reloads_while_the_models_load_get_a_loading_503_with_retry_after() {
    let redis = Redis::start();
    // Eight copies of the models to load and warm up on two cores: a while after /health/live answers.
    let server = Server::start_with(redis.port, test_models(), &[("INFERENCE_WORKERS", "8"), ("API_TOKEN", "t0ken")]);
    redis.set("user_profile:early", &profile_of([1]));
    let started = Instant::now();
    let mut loading_seen = false;
    loop {
        let r =
            reqwest::blocking::Client::new().post(server.url("/recommend/early")).bearer_auth("t0ken").send().unwrap();
        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().unwrap();
        if status == 200 {
            break;
        }
        assert_eq!((status, body["error"].as_str()), (503, Some("models_loading")), "{body}");
        assert_eq!(retry_after.as_deref(), Some("1"));
        if !loading_seen {
            let reload = server.post_json(server.port, "/admin/reload", &serde_json::json!({}), Some("t0ken"));
            assert_eq!(reload.1["error"], "models_loading", "{}", reload.1);
        }
        loading_seen = true;
        assert!(started.elapsed() < Duration::from_secs(120), "models never loaded");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(loading_seen, "the first request must arrive while the models load for this test to mean anything");
}

#[test]
fn requests_past_their_deadline_are_told_so_not_that_the_engine_stopped() {
    let redis = Redis::start();
    let server = serve(&redis, &[("REQUEST_TIMEOUT_MS", "3"), ("INFERENCE_WORKERS", "1"), ("MAX_BATCH", "2")]);
    let mut pipe = redis::pipe();
    for n in 0..64 {
        pipe.set(format!("user_profile:late{n}"), profile_of((0..120).map(|i| (i * 5 + n) % 300))).ignore();
    }
    pipe.query::<()>(&mut redis.conn()).unwrap();
    let results: Vec<(u16, serde_json::Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|n| {
                let server = &server;
                s.spawn(move || server.post(&format!("/recommend/late{}", n % 16)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let late = results.iter().filter(|r| r.0 == 503).count();
    assert!(late > 0, "a 3 ms deadline must cut some requests short for this test to mean anything");
    for (status, body) in &results {
        match status {
            200 => {}
            503 => assert_eq!(body["error"], "deadline_exceeded", "{body}"),
            429 => assert_eq!(body["error"], "overloaded", "{body}"),
            other => panic!("unexpected {other} {body}"),
        }
    }
}

#[test]
fn the_first_request_after_a_redis_restart_succeeds() {
    let redis = Redis::start();
    let port = redis.port;
    let server = serve(&redis, &[]);
    redis.set("user_profile:back", &profile_of([7]));
    assert_eq!(server.post("/recommend/back").0, 200);
    redis.stop();
    let redis = Redis::start_on(port);
    redis.set("user_profile:back", &profile_of([7, 8]));
    let (status, body) = server.post("/recommend/back");
    assert_eq!(status, 200, "the dead pooled connection must be replaced, not reported: {body}");
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn requests_while_redis_loads_its_data_get_503_redis_unavailable_and_then_succeed() {
    let dir = scratch_dir("redis-loading");
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.to_str().unwrap().to_string();
    let redis = Redis::spawn(free_port(), &["--dir", &dir]);
    wait_until(Duration::from_secs(10), || redis.client().get_connection().is_ok());
    let port = redis.port;
    redis.cmd(&["DEBUG", "POPULATE", "20000"]);
    redis.set("user_profile:patient", &profile_of([3, 4]));
    redis.cmd(&["SAVE"]);
    let server = serve(&redis, &[]);
    assert_eq!(server.post("/recommend/patient").0, 200);
    redis.stop();
    // Loading 20,000 keys at 100 us each, answering LOADING meanwhile: about 2 s.
    let _redis = Redis::spawn(
        port,
        &["--dir", &dir, "--key-load-delay", "100", "--loading-process-events-interval-bytes", "1024"],
    );
    let started = Instant::now();
    let mut loading = 0;
    loop {
        let resp = server.post("/recommend/patient");
        if resp.0 == 200 {
            break;
        }
        assert_error(&resp, 503, "redis_unavailable");
        loading += 1;
        assert!(started.elapsed() < Duration::from_secs(30), "Redis never finished loading: {}", resp.1);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(loading > 0, "some requests must arrive while Redis loads for this test to mean anything");
}

#[test]
fn health_is_unready_while_redis_refuses_writes_and_says_why() {
    let redis = Redis::start();
    let server = serve(&redis, &[]);
    redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.cmd(&["CONFIG", "SET", "maxmemory", "1"]);
    let (status, body) = server.get("/health");
    redis.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("OOM"), "{body}");
    assert_eq!(body["redis"].as_str().map(|s| s.starts_with("error")), Some(true), "{body}");
    wait_until(Duration::from_secs(5), || server.get("/health").0 == 200);
}

#[test]
fn a_taken_port_fails_fast_with_one_clear_line_and_status_1() {
    let redis = Redis::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut cmd = bin();
    base_env(&mut cmd, redis.port, test_models());
    let started = Instant::now();
    let out = cmd.env("HOST", "127.0.0.1").env("PORT", port.to_string()).arg("serve").output().unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status {:?}: {stderr}", out.status);
    assert!(stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?}: the port must be bound before the models load");
}
