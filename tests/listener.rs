//! Listener mode against a real redis-server: keyspace notifications, the request stream through
//! a consumer group, catch-up after a crash, dead letters, shutdown, and backfill.

use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};
use testkit::*;

fn sha(value: &str) -> String {
    format!("{:x}", Sha1::digest(value.as_bytes()))
}

/// A deterministic profile for user `n`, version `v` (different versions, different items).
fn profile(n: usize, v: usize) -> String {
    let items: Vec<String> = (0..1 + (n + v) % 5).map(|i| item((n * 7 + v * 13 + i * 31) % 300)).collect();
    serde_json::to_string(&items).unwrap()
}

/// True when recommendations:<user> exists and was computed from exactly `value`.
fn up_to_date(redis: &Redis, user: &str, value: &str) -> bool {
    redis.get(&format!("recommendations:{user}")).is_some()
        && redis.hget(&format!("recommendations_meta:{user}"), "profile_sha").as_deref() == Some(&sha(value))
}

fn wait_all_up_to_date(redis: &Redis, expected: &[(String, String)], limit: Duration) {
    wait_until(limit, || expected.iter().all(|(u, v)| up_to_date(redis, u, v)));
}

fn listen(redis: &Redis, env: &[(&str, &str)]) -> Server {
    let server = Server::start_mode(redis.port, test_models(), &["listen"], env);
    server.wait_healthy();
    server
}

/// p99 of a Prometheus histogram from its cumulative buckets (upper bound of the bucket).
fn p99(server: &Server, metric: &str, labels: &str) -> f64 {
    let (_, text) = server.get_text("/metrics");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}_bucket{{")) && l.contains(labels))
        .map(|l| {
            let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
            (le, l.rsplit(' ').next().unwrap().parse().unwrap())
        })
        .collect();
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    buckets.iter().find(|b| b.1 >= 0.99 * total).map(|b| b.0).unwrap_or(f64::NAN)
}

#[test]
fn a_thousand_profile_writes_all_get_correct_recommendations() {
    let redis = Redis::start();
    let listener = listen(&redis, &[]);
    let flags: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query(&mut redis.conn()).unwrap();
    assert!(flags[1].contains('K') && flags[1].contains('$'), "listen enabled keyspace events: {flags:?}");

    let mut conn = redis.conn();
    let expected: Vec<(String, String)> = (0..1000).map(|n| (format!("burst{n}"), profile(n, 0))).collect();
    let t = Instant::now();
    for (user, value) in &expected {
        redis::cmd("SET").arg(format!("user_profile:{user}")).arg(value).query::<()>(&mut conn).unwrap();
    }
    wait_all_up_to_date(&redis, &expected, Duration::from_secs(120));
    eprintln!(
        "1000 profile writes recomputed in {:.2}s; listener lag p99 <= {}s",
        t.elapsed().as_secs_f64(),
        p99(&listener, "model_service_listener_lag_seconds", "source=\"keyspace\"")
    );
    // "correct": the list the listener wrote is the list the API computes for the same profile
    let api = Server::start(redis.port);
    api.wait_healthy();
    for (user, _) in expected.iter().step_by(97) {
        let stored: Vec<String> =
            serde_json::from_str(&redis.get(&format!("recommendations:{user}")).unwrap()).unwrap();
        let (status, body) = api.post(&format!("/recommend/{user}"));
        assert_eq!(status, 200);
        assert_eq!(rec_ids(&body), stored, "{user}");
    }
    // A profile the start-up catch-up scan queued before its keyspace event arrived is counted
    // under source="catchup" (the event coalesces into the queued entry): count both.
    let processed = ["keyspace", "catchup"]
        .iter()
        .map(|s| {
            listener.metric(&format!("model_service_listener_events_total{{outcome=\"processed\",source=\"{s}\"}}"))
        })
        .sum::<f64>();
    assert!(processed >= 1000.0, "processed {processed}");
}

#[test]
fn kill_9_mid_burst_then_restart_leaves_every_profile_up_to_date() {
    let redis = Redis::start();
    let mut listener = listen(&redis, &[]);
    let mut latest: Vec<(String, String)> = (0..400).map(|n| (format!("crash{n}"), profile(n, 0))).collect();
    let mut conn = redis.conn();
    for (i, (user, value)) in latest.iter().enumerate() {
        redis::cmd("SET").arg(format!("user_profile:{user}")).arg(value).query::<()>(&mut conn).unwrap();
        if i == 150 {
            listener.kill9();
        }
    }
    // while it is down: rewrite some profiles, so their stored lists (if any) are stale
    for (n, (user, value)) in latest.iter_mut().enumerate().step_by(3) {
        *value = profile(n, 1);
        redis::cmd("SET").arg(format!("user_profile:{user}")).arg(&*value).query::<()>(&mut conn).unwrap();
    }
    let _listener = listen(&redis, &[]);
    wait_all_up_to_date(&redis, &latest, Duration::from_secs(120));
}

#[test]
fn two_listeners_share_the_stream_with_no_entry_processed_twice() {
    let redis = Redis::start();
    let a = listen(&redis, &[("CONSUMER_NAME", "a")]);
    let b = listen(&redis, &[("CONSUMER_NAME", "b")]);
    let mut conn = redis.conn();
    redis.request_recommendations("s", 0..1000);
    let received = |s: &Server| s.metric("model_service_listener_events_total{outcome=\"received\",source=\"stream\"}");
    wait_until(Duration::from_secs(120), || received(&a) + received(&b) >= 1000.0);
    wait_until(Duration::from_secs(10), || (0..1000).all(|n| redis.get(&format!("recommendations:s{n}")).is_some()));
    std::thread::sleep(Duration::from_millis(500));
    let (ra, rb) = (received(&a), received(&b));
    assert_eq!(ra + rb, 1000.0, "every entry delivered exactly once (a {ra}, b {rb})");
    assert!(ra > 0.0 && rb > 0.0, "both consumers took work (a {ra}, b {rb})");
    let processed =
        |s: &Server| s.metric("model_service_listener_events_total{outcome=\"processed\",source=\"stream\"}");
    assert_eq!(processed(&a) + processed(&b), 1000.0);
    let pending: Vec<redis::Value> =
        redis::cmd("XPENDING").arg("recommend_requests").arg("model-service").query(&mut conn).unwrap();
    assert_eq!(pending[0], redis::Value::Int(0), "everything acknowledged");
}

#[test]
fn a_malformed_profile_is_dead_lettered_with_its_reason_and_the_listener_goes_on() {
    let redis = Redis::start();
    let listener = listen(&redis, &[]);
    redis.set("user_profile:bad", "[1, 2]");
    redis.set("user_profile:good", &profile(1, 0));
    let mut conn = redis.conn();
    for user in ["bad", "good", "bad id"] {
        redis::cmd("XADD").arg("recommend_requests").arg("*").arg("user_id").arg(user).query::<()>(&mut conn).unwrap();
    }
    redis::cmd("XADD").arg("recommend_requests").arg("*").arg("other").arg("x").query::<()>(&mut conn).unwrap();
    wait_until(Duration::from_secs(30), || {
        redis::cmd("XLEN").arg("recommend_requests:dead").query::<u64>(&mut redis.conn()).unwrap() == 3
    });
    let dead: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg("recommend_requests:dead").arg("-").arg("+").query(&mut conn).unwrap();
    let reasons: Vec<(Option<String>, String)> =
        dead.ids.iter().map(|e| (e.get::<String>("user_id"), e.get::<String>("reason").unwrap())).collect();
    assert!(reasons[0].0.as_deref() == Some("bad") && reasons[0].1.contains("element 0 is a number"), "{reasons:?}");
    assert!(reasons[1].0.as_deref() == Some("bad id") && reasons[1].1.contains("invalid user id"), "{reasons:?}");
    assert!(reasons[2].0.is_none() && reasons[2].1.contains("no user_id field"), "{reasons:?}");
    assert!(up_to_date(&redis, "good", &profile(1, 0)));
    assert!(redis.get("recommendations:bad").is_none());
    // and it keeps going
    redis.set("user_profile:after", &profile(2, 0));
    wait_until(Duration::from_secs(30), || up_to_date(&redis, "after", &profile(2, 0)));
    assert_eq!(
        listener.metric("model_service_listener_events_total{outcome=\"dead_lettered\",source=\"stream\"}"),
        3.0
    );
}

#[test]
fn a_request_whose_user_id_is_not_utf8_is_dead_lettered_as_such() {
    let redis = Redis::start();
    let _listener = listen(&redis, &[]);
    redis.set("user_profile:fine", &profile(3, 0));
    let mut conn = redis.conn();
    let bytes: &[u8] = b"u\xff\xfe";
    redis::cmd("XADD").arg("recommend_requests").arg("*").arg("user_id").arg(bytes).query::<()>(&mut conn).unwrap();
    redis::cmd("XADD").arg("recommend_requests").arg("*").arg("user_id").arg("fine").query::<()>(&mut conn).unwrap();
    wait_until(Duration::from_secs(30), || {
        redis::cmd("XLEN").arg("recommend_requests:dead").query::<u64>(&mut redis.conn()).unwrap() == 1
    });
    let dead: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg("recommend_requests:dead").arg("-").arg("+").query(&mut conn).unwrap();
    let reason: String = dead.ids[0].get("reason").unwrap();
    assert!(reason.contains("user_id is not UTF-8"), "{reason}");
    // the dead letter keeps the bytes as they came
    assert_eq!(dead.ids[0].get::<Vec<u8>>("user_id").as_deref(), Some(bytes));
    wait_until(Duration::from_secs(30), || up_to_date(&redis, "fine", &profile(3, 0)));
}

#[test]
fn listen_refuses_to_start_when_notifications_are_off_and_may_not_be_enabled() {
    let redis = Redis::start();
    let mut server =
        Server::start_mode(redis.port, test_models(), &["listen"], &[("CONFIGURE_NOTIFICATIONS", "false")]);
    wait_until(Duration::from_secs(60), || server.exited().is_some());
    assert!(!server.exited().unwrap().success());
    // Hold the default port (if nothing else does): the CLI run must not depend on it being free.
    let _default_port = std::net::TcpListener::bind(("0.0.0.0", 8001)).ok();
    let out = run_cli(redis.port, test_models(), &["--configure-notifications", "false", "listen"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("add the line `notify-keyspace-events K$gxhlszt` to redis.conf"), "{err}");
}

#[test]
fn sigterm_finishes_in_flight_work_and_exits_zero() {
    let redis = Redis::start();
    let mut listener = Server::start_mode(redis.port, test_models(), &["serve", "--listen"], &[]);
    listener.wait_healthy();
    redis.set("user_profile:t", &profile(3, 0));
    wait_until(Duration::from_secs(30), || up_to_date(&redis, "t", &profile(3, 0)));
    assert_eq!(listener.post("/recommend/t").0, 200, "serve --listen also serves the API");
    let mut conn = redis.conn();
    redis.request_recommendations("q", 0..200);
    std::thread::sleep(Duration::from_millis(100));
    let status = listener.terminate();
    assert!(status.success(), "{status:?}");
    // whatever was taken was finished and acknowledged: nothing is left pending
    let pending: Vec<redis::Value> =
        redis::cmd("XPENDING").arg("recommend_requests").arg("model-service").query(&mut conn).unwrap();
    assert_eq!(pending[0], redis::Value::Int(0));
}

#[test]
fn backfill_recomputes_every_profile_then_skips_unchanged_ones() {
    let redis = Redis::start();
    let mut conn = redis.conn();
    let expected: Vec<(String, String)> = (0..1500).map(|n| (format!("bf{n}"), profile(n, 0))).collect();
    let mut pipe = redis::pipe();
    for (user, value) in &expected {
        pipe.set(format!("user_profile:{user}"), value).ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();

    let out = run_cli(redis.port, test_models(), &["backfill"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (summary["scanned"].as_u64(), summary["written"].as_u64(), summary["failed"].as_u64()),
        (Some(1500), Some(1500), Some(0))
    );
    assert!(expected.iter().all(|(u, v)| up_to_date(&redis, u, v)));

    redis.set("user_profile:bf7", &profile(7, 1));
    redis.set("user_profile:broken", "{}");
    let out = run_cli(redis.port, test_models(), &["backfill"]);
    assert!(!out.status.success(), "a failed profile makes the exit status non-zero");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["written"], 1, "{summary}");
    assert_eq!(summary["unchanged"], 1499, "{summary}");
    assert_eq!(summary["failures"]["invalid_profile"], 1, "{summary}");
    assert!(redis.get("model_service:backfill:cursor").is_none(), "a finished backfill leaves no cursor");
}

#[test]
fn every_write_is_announced_on_the_notify_channel() {
    let redis = Redis::start();
    let server = Server::start(redis.port);
    server.wait_healthy();
    let mut sub = redis.conn();
    let mut pubsub = sub.as_pubsub();
    pubsub.subscribe("recommendations_updated").unwrap();
    pubsub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    redis.set("user_profile:announced", &profile(4, 0));
    assert_eq!(server.post("/recommend/announced").0, 200);
    let msg = pubsub.get_message().unwrap();
    assert_eq!(msg.get_payload::<String>().unwrap(), "announced");
    assert_eq!(server.post("/recommend/bad%20id").0, 400);
    pubsub.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(pubsub.get_message().is_err(), "a refused request announces nothing");
}

#[test]
fn a_burst_larger_than_the_queue_is_recomputed_within_seconds_by_the_catch_up_it_triggers() {
    let redis = Redis::start();
    let _listener = listen(&redis, &[("MAX_PENDING_USERS", "5"), ("CATCHUP_INTERVAL_SECS", "3600")]);
    std::thread::sleep(Duration::from_millis(300)); // the start-up catch-up of an empty Redis is over
    let expected: Vec<(String, String)> = (0..400).map(|n| (format!("over{n}"), profile(n, 0))).collect();
    let mut pipe = redis::pipe();
    for (user, value) in &expected {
        pipe.set(format!("user_profile:{user}"), value).ignore();
    }
    pipe.query::<()>(&mut redis.conn()).unwrap();
    wait_all_up_to_date(&redis, &expected, Duration::from_secs(30));
}

#[test]
fn deleted_or_broken_profiles_leave_what_the_api_would_answer() {
    let redis = Redis::start();
    let listener = Server::start_mode(redis.port, test_models(), &["serve", "--listen"], &[]);
    listener.wait_healthy();
    redis.set("user_profile:gone", &profile(1, 0));
    redis.set("user_profile:broken", &profile(2, 0));
    wait_until(Duration::from_secs(20), || {
        up_to_date(&redis, "gone", &profile(1, 0)) && up_to_date(&redis, "broken", &profile(2, 0))
    });
    let personal = redis.get("recommendations:gone").unwrap();

    redis.cmd(&["DEL", "user_profile:gone"]);
    redis.set("user_profile:broken", "[1, 2");
    wait_until(Duration::from_secs(10), || {
        redis.get("recommendations:gone").is_some_and(|v| v != personal)
            && redis.get("recommendations:broken").is_none()
    });
    // what is stored is what the API answers now: the popular list, and nothing (422)
    let (status, body) = listener.post("/recommend/gone");
    assert_eq!((status, body["strategy"].as_str()), (200, Some("popular")), "{body}");
    let stored: Vec<String> = serde_json::from_str(&redis.get("recommendations:gone").unwrap()).unwrap();
    assert_eq!(stored, rec_ids(&body));
    assert_eq!(listener.post("/recommend/broken").0, 422);
    assert!(redis.get("recommendations_meta:broken").is_none());
}

#[test]
fn keyspace_notifications_are_re_enabled_after_a_redis_restart() {
    let redis = Redis::start();
    let port = redis.port;
    let _listener = listen(&redis, &[("CATCHUP_INTERVAL_SECS", "3600")]);
    redis.stop();
    let redis = Redis::start_on(port);
    // the listener re-subscribes (PUBSUB NUMPAT counts its pattern) ...
    wait_until(Duration::from_secs(20), || redis.cmd(&["PUBSUB", "NUMPAT"]) == redis::Value::Int(1));
    std::thread::sleep(Duration::from_millis(300)); // ... and its catch-up of the empty Redis is over
    let expected: Vec<(String, String)> = (0..50).map(|n| (format!("again{n}"), profile(n, 1))).collect();
    for (user, value) in &expected {
        redis.set(&format!("user_profile:{user}"), value);
    }
    wait_all_up_to_date(&redis, &expected, Duration::from_secs(15));
}

#[test]
fn a_profile_key_whose_name_is_not_utf8_is_skipped_not_fatal() {
    let redis = Redis::start();
    let mut conn = redis.conn();
    redis::cmd("SET").arg(b"user_profile:\xff\xfe".as_slice()).arg(profile(0, 0)).query::<()>(&mut conn).unwrap();
    let expected: Vec<(String, String)> = (0..10).map(|n| (format!("stale{n}"), profile(n, 2))).collect();
    for (user, value) in &expected {
        redis.set(&format!("user_profile:{user}"), value);
    }
    // the listener's start-up catch-up finds every valid profile
    let _listener = listen(&redis, &[("CATCHUP_INTERVAL_SECS", "3600")]);
    wait_all_up_to_date(&redis, &expected, Duration::from_secs(15));
    drop(_listener);
    // backfill counts the key, skips it and finishes with a summary
    redis.set("user_profile:stale3", &profile(3, 3));
    let out = run_cli(redis.port, test_models(), &["backfill"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((summary["written"].as_u64(), summary["skipped_keys"].as_u64()), (Some(1), Some(1)), "{summary}");
}

#[test]
fn the_request_stream_and_its_dead_letters_are_trimmed() {
    let redis = Redis::start();
    let _listener = listen(&redis, &[("DEAD_LETTER_MAXLEN", "10")]);
    let mut pipe = redis::pipe();
    for n in 0..600 {
        redis.set(&format!("user_profile:s{n}"), &profile(n, 0));
        pipe.cmd("XADD").arg("recommend_requests").arg("*").arg("user_id").arg(format!("s{n}")).ignore();
    }
    for n in 0..30 {
        pipe.cmd("XADD").arg("recommend_requests").arg("*").arg("junk").arg(n).ignore();
    }
    pipe.query::<()>(&mut redis.conn()).unwrap();
    let len = |key: &str| match redis.cmd(&["XLEN", key]) {
        redis::Value::Int(n) => n,
        other => panic!("{other:?}"),
    };
    wait_until(Duration::from_secs(30), || len("recommend_requests") < 150);
    assert_eq!(len("recommend_requests:dead"), 10, "the newest DEAD_LETTER_MAXLEN dead letters are kept");
    assert!((0..600).all(|n| redis.get(&format!("recommendations:s{n}")).is_some()), "trimming lost no request");
}

#[test]
fn a_user_id_with_a_line_break_cannot_forge_a_log_line() {
    let redis = Redis::start();
    let mut server =
        Server::start_logged_mode(redis.port, test_models(), &["listen"], &[("RUST_LOG", "model_service=info")]);
    server.wait_healthy();
    let forged = "2026-01-01T00:00:00.000000Z ERROR model_service: forged line";
    let failed = || server.metric(r#"model_service_listener_events_total{outcome="failed",source="keyspace"}"#);
    let t = Instant::now();
    // written again each second: the listener may subscribe a moment after /health is ready
    while failed() < 1.0 && t.elapsed() < Duration::from_secs(20) {
        redis.set(&format!("user_profile:evil\n{forged}\r"), "[]");
        std::thread::sleep(Duration::from_millis(1000));
    }
    let processed = failed();
    server.sigterm();
    let (exit, log) = server.exit_and_log();
    assert!(processed >= 1.0, "the listener did not process the key:\n{log}");
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(!log.lines().any(|l| l.starts_with(forged) || l.contains("\r")), "a forged line:\n{log}");
    let warned = log.lines().find(|l| l.contains("profile cannot be processed")).unwrap_or_else(|| panic!("{log}"));
    assert!(warned.contains(&format!("evil\\n{forged}\\r")), "the id, escaped, on the warning's line: {warned}");
}

#[test]
fn lists_of_profiles_deleted_while_no_listener_ran_are_rewritten_by_the_next_catch_up() {
    let redis = Redis::start();
    let mut listener = listen(&redis, &[("CATCHUP_INTERVAL_SECS", "2")]);
    let expected: Vec<(String, String)> = (0..300).map(|n| (format!("gone{n}"), profile(n, 0))).collect();
    let mut conn = redis.conn();
    for (user, value) in &expected {
        redis::cmd("SET").arg(format!("user_profile:{user}")).arg(value).query::<()>(&mut conn).unwrap();
    }
    wait_all_up_to_date(&redis, &expected, Duration::from_secs(120));
    listener.kill9();
    // deleted while no listener runs: their deletion events are lost
    let deleted: Vec<&String> = expected.iter().map(|(u, _)| u).step_by(3).collect();
    for user in &deleted {
        redis::cmd("DEL").arg(format!("user_profile:{user}")).query::<()>(&mut conn).unwrap();
    }
    let _listener = listen(&redis, &[("CATCHUP_INTERVAL_SECS", "2")]);
    // what the API answers for a user without a profile: the popular list, from no profile
    let server = Server::start(redis.port);
    server.wait_healthy();
    let (status, answer) = server.post("/recommend/never-had-a-profile");
    assert_eq!((status, answer["strategy"].as_str()), (200, Some("popular")), "{answer}");
    let popular = serde_json::to_string(&rec_ids(&answer)).unwrap();
    wait_until(Duration::from_secs(30), || {
        deleted.iter().all(|u| {
            redis.hget(&format!("recommendations_meta:{u}"), "profile_sha").as_deref() == Some("missing")
                && redis.get(&format!("recommendations:{u}")).as_deref() == Some(popular.as_str())
        })
    });
    // the others kept theirs
    let kept: Vec<(String, String)> =
        expected.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(_, p)| p.clone()).collect();
    assert!(kept.iter().all(|(u, v)| up_to_date(&redis, u, v)));
}

#[test]
fn a_profile_re_created_as_another_type_loses_its_list_without_waiting_for_catch_up() {
    let redis = Redis::start();
    let _listener = listen(&redis, &[("CATCHUP_INTERVAL_SECS", "3600")]);
    let users: Vec<(String, String)> = (0..4).map(|n| (format!("retyped{n}"), profile(n, 0))).collect();
    for (user, value) in &users {
        redis.set(&format!("user_profile:{user}"), value);
    }
    wait_all_up_to_date(&redis, &users, Duration::from_secs(60));
    let mut conn = redis.conn();
    let recreate: [&[&str]; 4] = [&["HSET", "f", "v"], &["RPUSH", "a"], &["SADD", "a"], &["XADD", "*", "f", "v"]];
    for (user, _) in &users {
        redis::cmd("DEL").arg(format!("user_profile:{user}")).query::<()>(&mut conn).unwrap();
    }
    // the deletion is seen: each gets the popular list, as the API answers for no profile
    wait_until(Duration::from_secs(10), || {
        users
            .iter()
            .all(|(u, _)| redis.hget(&format!("recommendations_meta:{u}"), "profile_sha").as_deref() == Some("missing"))
    });
    for ((user, _), cmd) in users.iter().zip(recreate) {
        let key = format!("user_profile:{user}");
        let mut c = redis::cmd(cmd[0]);
        c.arg(&key).arg(&cmd[1..]);
        c.query::<redis::Value>(&mut conn).unwrap();
    }
    // the API answers 422 for such a profile, so no list may stay beside it
    wait_until(Duration::from_secs(10), || {
        users.iter().all(|(u, _)| redis.get(&format!("recommendations:{u}")).is_none())
    });
}

#[test]
fn a_list_deleted_or_replaced_beside_its_meta_is_recomputed_not_skipped_or_served() {
    let redis = Redis::start();
    let server = Server::start(redis.port);
    server.wait_healthy();
    redis.set("user_profile:evicted", &profile(1, 0));
    redis.set("user_profile:foreign", &profile(2, 0));
    for user in ["evicted", "foreign"] {
        assert_eq!(server.post(&format!("/recommend/{user}")).0, 200);
    }
    let computed = redis.get("recommendations:evicted").unwrap();
    // eviction removes keys one at a time: the list goes, its meta stays
    redis::cmd("DEL").arg("recommendations:evicted").query::<()>(&mut redis.conn()).unwrap();
    // someone else writes a list beside the meta: as long as ours, in another order
    let ours: Vec<String> = serde_json::from_str(&redis.get("recommendations:foreign").unwrap()).unwrap();
    let theirs = serde_json::to_string(&ours.iter().rev().collect::<Vec<_>>()).unwrap();
    redis.set("recommendations:foreign", &theirs);

    let (status, answer) = server.get("/recommendations/foreign");
    assert_eq!((status, answer["source"].as_str()), (200, Some("computed")), "a foreign list is not served: {answer}");
    assert_eq!(rec_ids(&answer), ours);
    assert_eq!(redis.get("recommendations:foreign"), Some(serde_json::to_string(&ours).unwrap()));

    let out = run_cli(redis.port, test_models(), &["backfill"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((summary["written"].as_u64(), summary["unchanged"].as_u64()), (Some(1), Some(1)), "{summary}");
    assert_eq!(redis.get("recommendations:evicted"), Some(computed), "backfill rewrote the evicted list");
}
