//! Experiments (EXPERIMENT_FILE): users split between variants by a stable hash, the same in every
//! mode and on every replica; the variant in answers, metas, /health and /metrics; a shadow set
//! logged as served=false impressions, never served or stored; a reload that swaps every set at
//! once under load; and the read-out ranking today's models above the first version's on 3,000
//! real users, through Redis and through the real Kafka-compatible broker. Real redis-server, the
//! real binary, real TorchScript models.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};
use testkit::*;

/// The documented assignment, computed here independently of the server: the first 8 bytes of
/// SHA-256("salt:user"), big endian, modulo 10,000, against the cumulative shares in percent.
fn expected_variant<'a>(salt: &str, user: &str, variants: &[(&'a str, f64)]) -> &'a str {
    let digest = Sha256::digest(format!("{salt}:{user}").as_bytes());
    let bucket = u64::from_be_bytes(digest[..8].try_into().unwrap()) % 10_000;
    let mut upto = 0.0;
    for (name, share) in variants {
        upto += share;
        if (bucket as f64) / 100.0 < upto {
            return name;
        }
    }
    variants.last().unwrap().0
}

fn write_experiment(dir: &Path, spec: &serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("experiment.json");
    // written beside, then renamed: a reload never reads half a file
    let tmp = dir.join("experiment.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    file
}

fn profile(rows: &[usize]) -> String {
    serde_json::to_string(&rows.iter().map(|&r| item(r)).collect::<Vec<_>>()).unwrap()
}

fn stream(redis: &Redis, key: &str) -> Vec<HashMap<String, String>> {
    let mut conn = redis.conn();
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(key).arg("-").arg("+").query(&mut conn).unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| e.map.into_iter().map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap())).collect())
        .collect()
}

fn post_with_id(server: &Server, path: &str, request_id: &str) -> (u16, serde_json::Value) {
    let r = reqwest::blocking::Client::new().post(server.url(path)).header("x-request-id", request_id).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(serde_json::Value::Null))
}

/// Runs the binary to completion with the test models and `env`: its stdout.
fn run_cli_with(redis_port: u16, env: &[(&str, &str)], args: &[&str]) -> Vec<u8> {
    let mut cmd = bin();
    base_env(&mut cmd, redis_port, test_models());
    cmd.envs(env.iter().copied()).args(args);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// User -> (variant, served item ids).
type Served = HashMap<String, (String, Vec<String>)>;

const VARIANTS: [(&str, f64); 2] = [("control", 50.0), ("treatment", 50.0)];

#[test]
fn each_user_keeps_one_variant_across_requests_modes_and_replicas_and_the_shadow_set_is_never_served() {
    let v2 = make_models("experiment-v2", &["--version", "synthetic-v2", "--seed", "2"]);
    let v3 = make_models("experiment-v3", &["--version", "synthetic-v3", "--seed", "3"]);
    let dir = scratch_dir("experiment-split");
    let spec = json!({
        "name": "cascade-test", "salt": "s1",
        "variants": [
            {"name": "control", "model_dir": test_models(), "share": 50},
            {"name": "treatment", "model_dir": v2, "share": 50, "lightgcn_candidates": 150, "din_candidates": 50}
        ],
        "shadow": {"name": "next", "model_dir": v3, "sample": 0.5}
    });
    let file = write_experiment(&dir, &spec);
    let file_s = file.to_str().unwrap();
    let redis = Redis::start();
    let users: Vec<String> = (0..120).map(|u| format!("exp{u}")).collect();
    for (u, user) in users.iter().enumerate() {
        redis.set(&format!("user_profile:{user}"), &profile(&[u % 290, (u * 7 + 3) % 290, (u * 13 + 5) % 290]));
    }
    let admin = free_port();
    let admin_s = admin.to_string();
    // the shadow worker unthrottled (SHADOW_CPU_SHARE=1): this test is about what it logs, not its cost
    let env = [
        ("EXPERIMENT_FILE", file_s),
        ("IMPRESSIONS", "redis"),
        ("ADMIN_PORT", admin_s.as_str()),
        ("SHADOW_CPU_SHARE", "1"),
    ];
    let server = Server::start_mode(redis.port, test_models(), &["serve", "--listen"], &env);
    server.wait_healthy();
    let (_, health) = server.get("/health");
    assert_eq!(health["experiment"], "cascade-test");
    let sets: Vec<(String, String, String)> = health["sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let field = |k: &str| s[k].as_str().unwrap().to_string();
            (field("name"), field("role"), field("model_version"))
        })
        .collect();
    let expected_sets = [
        ("control", "variant", "synthetic-test"),
        ("treatment", "variant", "synthetic-v2"),
        ("next", "shadow", "synthetic-v3"),
    ]
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
    assert_eq!(sets, expected_sets);
    assert_eq!(health["sets"][1]["lightgcn_candidates"], 150);

    // POST then the cache-first GET for each user: the variant is the documented hash's, stable,
    // in the answer and in the meta, and ranked by that variant's models
    let version = |variant: &str| if variant == "control" { "synthetic-test" } else { "synthetic-v2" };
    let mut served: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for user in &users {
        let want = expected_variant("s1", user, &VARIANTS);
        let (status, body) = post_with_id(&server, &format!("/recommend/{user}"), &format!("post-{user}"));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["variant"], want, "{user}");
        assert_eq!(body["model_version"], version(want), "{user}: ranked by another variant's set");
        assert_eq!(redis.hget(&format!("recommendations_meta:{user}"), "variant").as_deref(), Some(want));
        let stored: Vec<String> =
            serde_json::from_str(&redis.get(&format!("recommendations:{user}")).unwrap()).unwrap();
        assert_eq!(stored, rec_ids(&body), "{user}: Redis holds another list than the served one");
        let r = reqwest::blocking::Client::new()
            .get(server.url(&format!("/recommendations/{user}")))
            .header("x-request-id", format!("get-{user}"))
            .send()
            .unwrap();
        let cached: serde_json::Value = r.json().unwrap();
        assert_eq!((cached["source"].as_str(), cached["variant"].as_str()), (Some("cache"), Some(want)), "{user}");
        assert_eq!(rec_ids(&cached), rec_ids(&body));
        served.insert(user.clone(), (want.to_string(), rec_ids(&body)));
    }
    let control = served.values().filter(|(v, _)| v == "control").count();
    assert!((40..=80).contains(&control), "a 50/50 split of 120 users gave {control} to control");

    // /metrics: requests and stage latency by variant, every set in model_info
    let metric = |name: &str| server.metric(name);
    assert_eq!(metric("model_service_recommendations_total{outcome=\"computed\",variant=\"control\"}"), control as f64);
    assert_eq!(
        metric("model_service_recommendations_total{outcome=\"cache\",variant=\"treatment\"}"),
        (120 - control) as f64
    );
    assert!(metric("model_service_stage_duration_seconds_count{stage=\"ranknet\",variant=\"treatment\"}") > 0.0);
    let (_, text) = server.get_text("/metrics");
    for set in ["control", "treatment", "next"] {
        let labelled = format!("variant=\"{set}\"");
        assert!(
            text.lines().any(|l| l.starts_with("model_service_model_info{") && l.contains(&labelled)),
            "model_info lacks {set}"
        );
    }

    // impressions: one per served answer (240) with its variant; the shadow set's, served=false,
    // for half of them (sample 0.5), never what was served or stored
    wait_until(Duration::from_secs(30), || {
        ["computed", "dropped_full", "late", "failed"]
            .iter()
            .map(|o| metric(&format!("model_service_shadow_total{{outcome=\"{o}\"}}")))
            .sum::<f64>()
            >= 120.0
    });
    let entries = stream(&redis, "recommendation_impressions");
    let (shown, shadow): (Vec<_>, Vec<_>) = entries.iter().partition(|e| e["served"] == "true");
    assert_eq!(shown.len(), 240);
    for e in &shown {
        let (variant, items) = &served[&e["user_id"]];
        assert_eq!(&e["variant"], variant, "{e:?}");
        assert_eq!(&serde_json::from_str::<Vec<String>>(&e["items"]).unwrap(), items, "{e:?}");
    }
    let computed = metric("model_service_shadow_total{outcome=\"computed\"}");
    assert_eq!(shadow.len() as f64, computed, "one served=false impression per shadow computation");
    assert!(computed >= 100.0, "at this load nearly every sampled answer is shadowed: {computed} of 120");
    let request_ids: HashSet<&str> = shown.iter().map(|e| e["request_id"].as_str()).collect();
    for e in &shadow {
        assert_eq!((e["variant"].as_str(), e["model_version"].as_str()), ("next", "synthetic-v3"));
        assert!(request_ids.contains(e["request_id"].as_str()), "a shadow impression of no served answer");
        let user = &e["user_id"];
        let stored: Vec<String> =
            serde_json::from_str(&redis.get(&format!("recommendations:{user}")).unwrap()).unwrap();
        assert_eq!(stored, served[user].1, "{user}: the stored list changed");
    }
    assert_eq!(metric("model_service_shadow_overlap_ratio_count"), computed);

    // the other modes and a second replica assign the same variants
    let replica = Server::start_with(redis.port, test_models(), &[("EXPERIMENT_FILE", file_s)]);
    replica.wait_healthy();
    for user in users.iter().take(30) {
        let (status, body) = replica.post(&format!("/recommend/{user}"));
        assert_eq!(status, 200);
        assert_eq!(body["variant"].as_str(), Some(served[user].0.as_str()), "replica: {user}");
        assert_eq!(rec_ids(&body), served[user].1, "replica: {user}");
    }
    let out = run_cli_with(redis.port, &[("EXPERIMENT_FILE", file_s)], &["recommend", &users[7]]);
    let cli: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(cli["variant"].as_str(), Some(served[&users[7]].0.as_str()), "the recommend command");
    // the listener recomputes a changed profile with the user's variant
    let user = &users[11];
    let meta = format!("recommendations_meta:{user}");
    let computed_at = redis.hget(&meta, "computed_at_ms");
    redis.set(&format!("user_profile:{user}"), &profile(&[5, 6, 7, 8]));
    wait_until(Duration::from_secs(20), || redis.hget(&meta, "computed_at_ms") != computed_at);
    assert_eq!(redis.hget(&meta, "variant").as_deref(), Some(served[user].0.as_str()), "the listener");

    // a new salt reassigns users: a user whose variant changed is recomputed, never served the
    // other variant's stored list
    let mut respec = spec.clone();
    respec["salt"] = json!("s2");
    write_experiment(&dir, &respec);
    let (status, body) = server.post_json(admin, "/admin/reload", &json!(null), None);
    assert_eq!(status, 200, "{body}");
    let moved: Vec<&String> =
        users.iter().filter(|u| expected_variant("s2", u, &VARIANTS) != served[*u].0).take(10).collect();
    assert!(!moved.is_empty());
    for user in moved {
        let (status, body) = server.get(&format!("/recommendations/{user}"));
        assert_eq!(status, 200);
        let want = expected_variant("s2", user, &VARIANTS);
        assert_eq!((body["variant"].as_str(), body["source"].as_str()), (Some(want), Some("computed")), "{user}");
        assert_eq!(redis.hget(&format!("recommendations_meta:{user}"), "variant").as_deref(), Some(want));
    }

    // anonymous histories: the session id's variant, else the first
    for session in ["sess-1", "sess-2", "sess-3", "sess-4"] {
        let (status, body) = server.post_json(
            server.port,
            "/recommend",
            &json!({"history": [item(3), item(4)], "session_id": session}),
            None,
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["variant"], expected_variant("s2", session, &VARIANTS));
    }
    let (_, body) = server.post_json(server.port, "/recommend", &json!({"history": [item(3)]}), None);
    assert_eq!(body["variant"], "control");
    let (status, body) =
        server.post_json(server.port, "/recommend", &json!({"history": [item(3)], "session_id": ""}), None);
    assert_error(&(status, body), 400, "invalid_request");
}

#[test]
fn a_changed_experiment_file_swaps_every_set_at_once_under_load_without_a_failed_request() {
    let v2 = make_models("experiment-load-v2", &["--version", "synthetic-v2", "--seed", "2"]);
    let v3 = make_models("experiment-load-v3", &["--version", "synthetic-v3", "--seed", "3"]);
    let v4 = make_models("experiment-load-v4", &["--version", "synthetic-v4", "--seed", "4"]);
    let dir = scratch_dir("experiment-load");
    let before = json!({"name": "e1", "salt": "s", "variants": [
        {"name": "control", "model_dir": test_models(), "share": 50},
        {"name": "treatment", "model_dir": v2, "share": 50}]});
    let after = json!({"name": "e2", "salt": "s", "variants": [
        {"name": "control", "model_dir": v3, "share": 50},
        {"name": "treatment", "model_dir": v4, "share": 50}]});
    let file = write_experiment(&dir, &before);
    let admin = free_port();
    let admin_s = admin.to_string();
    let redis = Redis::start();
    for u in 0..40 {
        redis.set(&format!("user_profile:load{u}"), &profile(&[u * 7 % 290, (u * 11 + 1) % 290]));
    }
    let server = Server::start_with(
        redis.port,
        test_models(),
        &[("EXPERIMENT_FILE", file.to_str().unwrap()), ("INFERENCE_WORKERS", "2"), ("ADMIN_PORT", admin_s.as_str())],
    );
    server.wait_healthy();
    type Answer = (Instant, u16, String, String);
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, answers, port) = (stop.clone(), answers.clone(), server.port);
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::new();
                let mut n = c;
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    let r = http
                        .post(format!("http://127.0.0.1:{port}/recommend/load{}", n % 40))
                        .send()
                        .expect("the connection must not fail");
                    let status = r.status().as_u16();
                    let body: serde_json::Value = r.json().unwrap();
                    let field = |k: &str| body[k].as_str().unwrap_or("").to_string();
                    answers.lock().unwrap().push((began, status, field("variant"), field("model_version")));
                    n += 4;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    write_experiment(&dir, &after);
    let (status, body) = server.post_json(admin, "/admin/reload", &json!(null), None);
    let reloaded_at = Instant::now();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["experiment"], "e2");
    assert_eq!(body["sets"], json!(["control=synthetic-v3", "treatment=synthetic-v4"]));
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let answers = answers.lock().unwrap();
    let failed: Vec<_> = answers.iter().filter(|a| a.1 != 200).collect();
    assert!(failed.is_empty(), "failed requests during the reload: {failed:?}");
    let old = [("control", "synthetic-test"), ("treatment", "synthetic-v2")];
    let new = [("control", "synthetic-v3"), ("treatment", "synthetic-v4")];
    let pair = |a: &Answer| (a.2.clone(), a.3.clone());
    let is = |set: &[(&str, &str)], a: &Answer| set.iter().any(|(v, m)| (v.to_string(), m.to_string()) == pair(a));
    for a in answers.iter() {
        assert!(is(&old, a) || is(&new, a), "an answer from no lineup: {a:?}");
        if a.0 > reloaded_at {
            assert!(is(&new, a), "begun after the reload answered, yet ranked by the old lineup: {a:?}");
        }
    }
    let after_count = answers.iter().filter(|a| a.0 > reloaded_at).count();
    let old_count = answers.iter().filter(|a| is(&old, a)).count();
    assert!(
        after_count > 10 && old_count > 10,
        "too little load around the reload: {after_count} after, {old_count} old"
    );
}

/// Done when 1, 3 and 4 of the experiments issue: 3,000 real users split between today's models
/// (control) and the first version's (treatment, model_output/ at f16d5a6); their held-out
/// test.txt items replayed as behaviour events on the Kafka topic after the impressions (also on
/// Kafka); the read-out, reading both topics, ranks the variants as offline Recall@20 of the
/// served lists does, with intervals.
#[test]
fn the_read_out_over_kafka_ranks_3000_real_users_variants_as_offline_recall_does() {
    const USERS: usize = 3000;
    const K: usize = 20;
    let older = older_models();
    let dir = scratch_dir("experiment-real");
    let file = write_experiment(
        &dir,
        &json!({"name": "v2-vs-v1", "salt": "real", "variants": [
            {"name": "control", "model_dir": shipped_models(), "share": 50, "lightgcn_candidates": 600, "din_candidates": 100},
            {"name": "treatment", "model_dir": older, "share": 50, "lightgcn_candidates": 200, "din_candidates": 100}]}),
    );
    let mut kafka = Kafka::start();
    kafka.create_topic("recommendation-impressions", 2);
    kafka.create_topic("user-behavior", 3);
    let brokers = kafka.brokers();
    let redis = Redis::start();
    let train = amazon_book_users("train.txt", USERS);
    let test = amazon_book_users("test.txt", USERS);
    for (user, items) in &train {
        redis.set(&format!("user_profile:{user}"), &serde_json::to_string(items).unwrap());
    }
    let server = Server::start_with(
        redis.port,
        &shipped_models(),
        &[
            ("EXPERIMENT_FILE", file.to_str().unwrap()),
            ("IMPRESSIONS", "kafka"),
            ("KAFKA_BROKERS", brokers.as_str()),
            ("MAX_K", "100"),
        ],
    );
    server.wait_healthy();

    // every user's list, from four clients
    let served: Arc<Mutex<Served>> = Arc::default();
    let users: Arc<Vec<String>> = Arc::new(train.iter().map(|(u, _)| u.clone()).collect());
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (served, users, port) = (served.clone(), users.clone(), server.port);
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::new();
                for user in users.iter().skip(c).step_by(4) {
                    let r = http.post(format!("http://127.0.0.1:{port}/recommend/{user}?k={K}")).send().unwrap();
                    assert_eq!(r.status().as_u16(), 200, "{user}");
                    let body: serde_json::Value = r.json().unwrap();
                    let variant = body["variant"].as_str().unwrap().to_string();
                    served.lock().unwrap().insert(user.clone(), (variant, rec_ids(&body)));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let served = served.lock().unwrap();
    let control = served.values().filter(|(v, _)| v == "control").count();
    let share = control as f64 / USERS as f64;
    println!("control {control} of {USERS} users ({:.1}%)", share * 100.0);
    assert!((0.46..=0.54).contains(&share), "50/50 within 4 points: control has {:.1}%", share * 100.0);
    for (user, (variant, _)) in served.iter() {
        assert_eq!(variant, expected_variant("real", user, &VARIANTS), "{user}");
    }

    // offline Recall@20 of the served lists against the held-out items, per variant
    let held_out: HashMap<&str, &Vec<String>> = test.iter().map(|(u, items)| (u.as_str(), items)).collect();
    let mut recall: HashMap<&str, (f64, usize)> = HashMap::new();
    for (user, (variant, items)) in served.iter() {
        let Some(truth) = held_out.get(user.as_str()).filter(|t| !t.is_empty()) else { continue };
        let hits = truth.iter().filter(|i| items.contains(i)).count();
        let entry = recall.entry(variant.as_str()).or_default();
        entry.0 += hits as f64 / truth.len() as f64;
        entry.1 += 1;
    }
    let offline = |v: &str| recall[v].0 / recall[v].1 as f64;
    println!("offline Recall@20: control {:.4}, treatment {:.4}", offline("control"), offline("treatment"));

    // the held-out items as behaviour events after the impressions, on the ingestion's topic
    wait_until(Duration::from_secs(60), || {
        server.metric("model_service_impressions_total{outcome=\"written\"}") >= USERS as f64
    });
    let after = 1_000 + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut events = Vec::new();
    for (user, items) in &test {
        for (n, item) in items.iter().enumerate() {
            let event = json!({"event_id": format!("{user}-{n}"), "user_id": user, "item_id": item, "event": "purchase", "ts": after + n as u64});
            events.push((user.clone(), serde_json::to_vec(&event).unwrap()));
        }
    }
    kafka.produce(&kafka.producer(), "user-behavior", &events);

    let out_file = dir.join("report.json");
    let report = std::process::Command::new(std::env::var("MODEL_SERVICE_PYTHON").unwrap_or_else(|_| "python3".into()))
        .env("PYTHONPATH", Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts"))
        .args(["-m", "model_service_py.experiment_report", "--kafka-brokers", &brokers, "--k", "20", "--json"])
        .arg(&out_file)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&report.stdout);
    println!("{printed}");
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    let rate = |v: &str| json["variants"][v]["hit_rate"].as_f64().unwrap();
    for v in ["control", "treatment"] {
        let ci = &json["variants"][v]["ci95"];
        assert!(ci[0].as_f64().unwrap() < rate(v) && rate(v) < ci[1].as_f64().unwrap(), "{v}: {ci}");
        assert!(printed.contains(v), "the printed table lacks {v}");
        // each user's events are exactly the held-out items, so the hit rate is the offline recall
        assert!((rate(v) - offline(v)).abs() < 1e-9, "{v}: hit rate {} against offline recall {}", rate(v), offline(v));
    }
    assert!(offline("control") > offline("treatment"), "today's models are ahead offline");
    assert!(rate("control") > rate("treatment"), "the read-out ranks the variants as offline Recall@20 does");
    kafka.kill();
}
