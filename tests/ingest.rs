//! Kafka ingestion against a real Kafka-compatible broker (tansu, started here on a free loopback
//! port), a real redis-server and the real binary: profiles built from behaviour events (order,
//! dedupe, cap), recommendations recomputed from the final profiles, kill -9 and restart, dead
//! letters, a broker outage, two instances in one group.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha1::{Digest, Sha1};
use testkit::*;

const TOPIC: &str = "user-behavior";
const DEAD: &str = "user-behavior-dead-letter";
/// Small, so that the cap is exercised by ~10 events per user.
const MAX_ITEMS: usize = 6;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn sha(value: &str) -> String {
    format!("{:x}", Sha1::digest(value.as_bytes()))
}

#[derive(Clone, Debug)]
struct Ev {
    event_id: String,
    user: String,
    item: String,
    event: &'static str,
}

impl Ev {
    fn message(&self, ts: u64) -> (String, Vec<u8>) {
        let json = serde_json::json!({"event_id": self.event_id, "user_id": self.user, "item_id": self.item,
            "event": self.event, "ts": ts});
        (self.user.clone(), serde_json::to_vec(&json).unwrap())
    }
}

/// `n` events over `users` users (prefix `p`): each user draws from 10 items of the synthetic
/// catalog, so items repeat (dedupe) and profiles pass the cap; 1 in 40 is an item the catalog
/// does not know, 1 in 25 a `wishlist` event (not an interaction by default).
fn events(p: &str, users: usize, n: usize, seed: u64) -> Vec<Ev> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let u = (next() % users as u64) as usize;
            let r = next();
            let item = if i % 40 == 7 { format!("UNKNOWN-{}", r % 3) } else { item((u * 7 + (r % 10) as usize) % 300) };
            Ev {
                event_id: format!("{p}-e{i}"),
                user: format!("{p}{u}"),
                item,
                event: if i % 25 == 3 { "wishlist" } else { ["view", "cart", "purchase"][(r % 3) as usize] },
            }
        })
        .collect()
}

/// The profile every user must end with: each interaction moves its item to the end, the oldest
/// items beyond MAX_ITEMS are dropped.
fn expected(events: &[Ev]) -> HashMap<String, Vec<String>> {
    let mut profiles: HashMap<String, Vec<String>> = HashMap::new();
    for e in events.iter().filter(|e| e.event != "wishlist") {
        let p = profiles.entry(e.user.clone()).or_default();
        p.retain(|i| *i != e.item);
        p.push(e.item.clone());
        if p.len() > MAX_ITEMS {
            p.remove(0);
        }
    }
    profiles
}

fn produce(kafka: &Kafka, events: &[Ev]) -> u64 {
    let ts = now_ms();
    let messages: Vec<_> = events.iter().map(|e| e.message(ts)).collect();
    kafka.produce(&kafka.producer(), TOPIC, &messages);
    ts
}

fn ingest(redis: &Redis, kafka: &Kafka, extra: &[(&str, &str)]) -> Server {
    let brokers = kafka.brokers();
    let max = MAX_ITEMS.to_string();
    let mut env = vec![
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KAFKA_TOPIC", TOPIC),
        ("KAFKA_DEAD_LETTER_TOPIC", DEAD),
        ("MAX_PROFILE_ITEMS", max.as_str()),
    ];
    env.extend_from_slice(extra);
    let server = Server::start_mode(redis.port, test_models(), &["ingest"], &env);
    server.wait_healthy();
    server
}

/// Every user's profile as stored (None: absent).
fn profiles(redis: &Redis, users: &[&String]) -> Vec<Option<Vec<String>>> {
    let keys: Vec<String> = users.iter().map(|u| format!("user_profile:{u}")).collect();
    let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut redis.conn()).unwrap();
    values.into_iter().map(|v| v.map(|v| serde_json::from_str(&v).unwrap())).collect()
}

/// Waits until every profile is exactly the expected one; returns how long it took.
fn wait_profiles(redis: &Redis, want: &HashMap<String, Vec<String>>, limit: Duration) -> Duration {
    let t = Instant::now();
    let users: Vec<&String> = want.keys().collect();
    let matches =
        || profiles(redis, &users).iter().zip(&users).filter(|(got, u)| got.as_ref() == Some(&want[**u])).count();
    let mut last = 0;
    while t.elapsed() < limit {
        last = matches();
        if last == users.len() {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let wrong: Vec<_> = profiles(redis, &users)
        .into_iter()
        .zip(&users)
        .filter(|(got, u)| got.as_ref() != Some(&want[**u]))
        .take(3)
        .map(|(got, u)| format!("{u}: got {got:?}, want {:?}", want[*u]))
        .collect();
    panic!("{last} of {} profiles as expected after {limit:?}; e.g. {wrong:?}", users.len());
}

/// Waits until every user's stored recommendations were computed from the profile as it is now.
fn wait_recomputed(redis: &Redis, users: &[&String], limit: Duration) {
    wait_until(limit, || {
        let mut conn = redis.conn();
        users.iter().all(|u| {
            let profile: Option<String> = redis::cmd("GET").arg(format!("user_profile:{u}")).query(&mut conn).unwrap();
            let stored: Option<String> = redis::cmd("HGET")
                .arg(format!("recommendations_meta:{u}"))
                .arg("profile_sha")
                .query(&mut conn)
                .unwrap();
            profile.is_some() && stored == profile.map(|p| sha(&p))
        })
    });
}

fn metric(server: &Server, outcome: &str) -> f64 {
    server.metric(&format!("model_service_ingest_events_total{{outcome=\"{outcome}\"}}"))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The bucket bound (seconds) under which a fraction `p` of the server's per-event freshness
/// observations (event `ts` -> that user's recommendations written) fall.
fn freshness_quantile(server: &Server, p: f64) -> String {
    let (_, text) = server.get_text("/metrics");
    let buckets: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("model_service_ingest_freshness_seconds_bucket{le=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(le, n)| (le.to_string(), n.trim().parse().unwrap()))
        .collect();
    let total = buckets.last().map(|b| b.1).unwrap_or_default();
    buckets.iter().find(|(_, n)| *n >= total * p).map(|(le, _)| format!("<= {le} s")).unwrap_or_default()
}

#[test]
fn ten_thousand_events_over_a_thousand_users_build_exact_profiles_and_fresh_recommendations() {
    let redis = Redis::start();
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, 3);
    kafka.create_topic(DEAD, 1);
    let server = ingest(&redis, &kafka, &[]);
    let mut evs = events("u", 1000, 10_000, 1);
    // a producer that sent 50 events twice (same event id, later offset): applied once
    let resent: Vec<Ev> = evs.iter().step_by(200).cloned().collect();
    for (n, e) in resent.iter().enumerate() {
        let at = evs.iter().position(|x| x.event_id == e.event_id).unwrap() + 1 + n;
        evs.insert(at, e.clone());
    }
    let unique: Vec<Ev> = {
        let mut seen = std::collections::HashSet::new();
        evs.iter().filter(|e| seen.insert(e.event_id.clone())).cloned().collect()
    };
    let want = expected(&unique);
    let t = Instant::now();
    let ts = produce(&kafka, &evs);
    let produced = t.elapsed();
    let took = wait_profiles(&redis, &want, Duration::from_secs(300));
    let users: Vec<&String> = want.keys().collect();
    wait_recomputed(&redis, &users, Duration::from_secs(120));
    let all = t.elapsed();

    // freshness: from each user's last event to the recommendations computed from its final profile
    let mut conn = redis.conn();
    let mut lags: Vec<u64> = users
        .iter()
        .map(|u| {
            let at: u64 = redis::cmd("HGET")
                .arg(format!("recommendations_meta:{u}"))
                .arg("computed_at_ms")
                .query(&mut conn)
                .unwrap();
            at.saturating_sub(ts)
        })
        .collect();
    lags.sort_unstable();

    // every list is what the API computes for the final profile
    let api = Server::start(redis.port);
    api.wait_healthy();
    for u in users.iter().step_by(50) {
        let stored: Vec<String> = serde_json::from_str(&redis.get(&format!("recommendations:{u}")).unwrap()).unwrap();
        let (status, body) = api.post(&format!("/recommend/{u}"));
        assert_eq!(status, 200, "{body}");
        assert_eq!(rec_ids(&body), stored, "{u}");
    }
    let interactions = unique.iter().filter(|e| e.event != "wishlist").count() as f64;
    let unknown = unique.iter().filter(|e| e.event != "wishlist" && e.item.starts_with("UNKNOWN")).count() as f64;
    wait_until(Duration::from_secs(5), || metric(&server, "applied") == interactions);
    assert_eq!(metric(&server, "received"), evs.len() as f64);
    assert_eq!(metric(&server, "duplicate"), resent.iter().filter(|e| e.event != "wishlist").count() as f64);
    assert_eq!(metric(&server, "ignored"), (evs.len() as f64) - interactions - metric(&server, "duplicate"));
    assert_eq!(metric(&server, "dead_lettered"), 0.0);
    assert_eq!(server.metric("model_service_ingest_unknown_items_total"), unknown);
    // the unknown items are kept in the profiles
    assert!(want.values().any(|p| p.iter().any(|i| i.starts_with("UNKNOWN"))));
    wait_until(Duration::from_secs(10), || {
        let (_, text) = server.get_text("/metrics");
        (0..3).all(|p| {
            text.contains(&format!("model_service_ingest_consumer_lag{{partition=\"{p}\",topic=\"{TOPIC}\"}} 0"))
        })
    });

    eprintln!(
        "ingest burst: {} events ({} users, 3 partitions) produced in {:.2}s; every profile exact after {:.2}s, \
         every list recomputed after {:.2}s; a user's last event -> its final recommendations: p50 {} ms, \
         p99 {} ms, max {} ms; every applied event -> its user's recommendations (server histogram, {} events): \
         p50 {}, p99 {}",
        evs.len(),
        users.len(),
        produced.as_secs_f64(),
        took.as_secs_f64(),
        all.as_secs_f64(),
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags.last().unwrap(),
        server.metric("model_service_ingest_freshness_seconds_count"),
        freshness_quantile(&server, 0.5),
        freshness_quantile(&server, 0.99),
    );
}

#[test]
fn kill_9_mid_stream_then_restart_loses_nothing_and_applies_nothing_twice() {
    let redis = Redis::start();
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, 3);
    kafka.create_topic(DEAD, 1);
    let evs = events("k", 500, 6000, 2);
    let want = expected(&evs);
    produce(&kafka, &evs[..3000]);
    // one recomputation at a time: a batch spends a while between its Redis writes and its
    // offset commit, and the kill lands there (the offset watermark in Redis has moved, the
    // committed offset not yet), so the restart is redelivered events that were applied
    let mut first = ingest(&redis, &kafka, &[("INGEST_BATCH", "200"), ("INGEST_CONCURRENCY", "1")]);
    wait_until(Duration::from_secs(120), || metric(&first, "applied") >= 800.0);
    first.kill9();
    produce(&kafka, &evs[3000..]);
    // tansu 0.6.0 limitation: when a member joins while the group's leader is dead but not yet
    // timed out, tansu drops the leader mid-rebalance and completes the group without one (every
    // member gets an empty assignment, for good). Kafka itself rebalances correctly; here the
    // replacement joins after the dead consumer's session (session.timeout.ms 10 s) has expired.
    std::thread::sleep(Duration::from_secs(12));
    let second = ingest(&redis, &kafka, &[("INGEST_BATCH", "200")]);
    wait_profiles(&redis, &want, Duration::from_secs(300));
    let users: Vec<&String> = want.keys().collect();
    wait_recomputed(&redis, &users, Duration::from_secs(120));
    // each event applied once: the user's event memory holds each of its events exactly once
    // (`<event id> <item id>`, newest first)
    let mut by_user: HashMap<&str, Vec<String>> = HashMap::new();
    for e in evs.iter().filter(|e| e.event != "wishlist") {
        by_user.entry(e.user.as_str()).or_default().insert(0, format!("{} {}", e.event_id, e.item));
    }
    for (user, ids) in &by_user {
        let stored: Vec<String> = redis::cmd("LRANGE")
            .arg(format!("ingested_events:{{user_profile:{user}}}"))
            .arg(0)
            .arg(-1)
            .query(&mut redis.conn())
            .unwrap();
        assert_eq!(stored, &ids[..ids.len().min(100)], "{user}");
    }
    let (skipped, applied) = (metric(&second, "duplicate"), metric(&second, "applied"));
    eprintln!("after kill -9: the restarted consumer skipped {skipped} redelivered events and applied {applied}");
    assert!(skipped > 0.0, "the kill should land between a batch's Redis writes and its commit");
    assert_eq!(metric(&second, "dead_lettered"), 0.0);
}

#[test]
fn malformed_events_are_dead_lettered_with_reasons_and_a_broker_restart_is_survived() {
    let redis = Redis::start();
    let mut kafka = Kafka::start();
    kafka.create_topic(TOPIC, 3);
    kafka.create_topic(DEAD, 1);
    // a profile the frontend broke: its events are refused (dead-lettered), the value left alone
    redis.cmd(&["HSET", "user_profile:broken", "a", "b"]);
    let mut server = ingest(&redis, &kafka, &[]);
    let bad: Vec<(String, Vec<u8>, &str)> = vec![
        ("x".into(), b"not json".to_vec(), "not an event"),
        ("x".into(), br#"{"event_id":"b1","user_id":"m1","item_id":"i"}"#.to_vec(), "missing field"),
        (
            "x".into(),
            br#"{"event_id":"b2","user_id":"bad id","item_id":"i","event":"view","ts":1}"#.to_vec(),
            "invalid user_id",
        ),
        (
            "x".into(),
            br#"{"event_id":"b3","user_id":"m1","item_id":"","event":"view","ts":1}"#.to_vec(),
            "invalid item_id",
        ),
        ("x".into(), b"\xff\xfe".to_vec(), "not UTF-8"),
        (
            "broken".into(),
            br#"{"event_id":"b4","user_id":"broken","item_id":"0553092626","event":"view","ts":1}"#.to_vec(),
            "profile: the profile key holds a Redis hash",
        ),
    ];
    let good = events("m", 100, 1000, 3);
    let ts = now_ms();
    let mut messages: Vec<(String, Vec<u8>)> = good[..500].iter().map(|e| e.message(ts)).collect();
    messages.extend(bad.iter().map(|(k, v, _)| (k.clone(), v.clone())));
    kafka.produce(&kafka.producer(), TOPIC, &messages);
    wait_profiles(&redis, &expected(&good[..500]), Duration::from_secs(120));
    let dead = kafka.read_all(DEAD, bad.len(), Duration::from_secs(60));
    assert_eq!(dead.len(), bad.len(), "dead letters: {dead:?}");
    for (_, value, why) in &bad {
        let letter = dead.iter().find(|(v, _)| v == value).unwrap_or_else(|| panic!("no dead letter for {value:?}"));
        let reason = letter.1.iter().find(|(k, _)| k == "reason").map(|(_, v)| v.as_str()).unwrap_or_default();
        assert!(reason.contains(why), "reason {reason:?} should say {why:?}");
        assert!(letter.1.iter().any(|(k, v)| k == "source_topic" && v == TOPIC), "{letter:?}");
    }
    assert_eq!(metric(&server, "dead_lettered"), bad.len() as f64);
    assert_eq!(redis.cmd(&["TYPE", "user_profile:broken"]), redis::Value::SimpleString("hash".into()));

    // the broker goes away mid-stream; the consumer waits without spinning and resumes by itself
    kafka.kill();
    let stat = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    std::thread::sleep(Duration::from_secs(1));
    let cpu_before = stat(server.pid());
    std::thread::sleep(Duration::from_secs(4));
    let cpu_ticks = stat(server.pid()) - cpu_before;
    assert!(server.exited().is_none(), "the consumer must survive the outage");
    assert!(cpu_ticks < 100, "{cpu_ticks} CPU ticks in 4 s of broker outage: a busy loop");
    kafka.restart();
    let ts = now_ms();
    let rest: Vec<(String, Vec<u8>)> = good[500..].iter().map(|e| e.message(ts)).collect();
    kafka.produce(&kafka.producer(), TOPIC, &rest);
    wait_profiles(&redis, &expected(&good), Duration::from_secs(180));
    let users: Vec<String> = expected(&good).into_keys().collect();
    wait_recomputed(&redis, &users.iter().collect::<Vec<_>>(), Duration::from_secs(60));
    eprintln!("broker outage: {cpu_ticks} CPU ticks in 4 s while the broker was down");
    assert_eq!(server.terminate().code(), Some(0), "SIGTERM commits and exits 0");
}

#[test]
fn two_instances_in_one_group_split_the_partitions_and_apply_every_event_once() {
    let redis = Redis::start();
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, 3);
    kafka.create_topic(DEAD, 1);
    let a = ingest(&redis, &kafka, &[("INGEST_BATCH", "100")]);
    let b = ingest(&redis, &kafka, &[("INGEST_BATCH", "100")]);
    let evs = events("g", 600, 6000, 4);
    let want = expected(&evs);
    let assigned = |s: &Server| s.metric("model_service_ingest_assigned_partitions");
    // both joined: the group's three partitions are split between them
    wait_until(Duration::from_secs(60), || {
        assigned(&a) + assigned(&b) == 3.0 && assigned(&a) > 0.0 && assigned(&b) > 0.0
    });
    produce(&kafka, &evs);
    wait_profiles(&redis, &want, Duration::from_secs(300));
    let interactions = evs.iter().filter(|e| e.event != "wishlist").count() as f64;
    wait_until(Duration::from_secs(10), || metric(&a, "applied") + metric(&b, "applied") == interactions);
    let (ra, rb) = (metric(&a, "received"), metric(&b, "received"));
    eprintln!(
        "two instances: a received {ra}, b received {rb}; applied {} + {}",
        metric(&a, "applied"),
        metric(&b, "applied")
    );
    assert!(ra > 0.0 && rb > 0.0, "both instances consumed: {ra} {rb}");
    let users: Vec<&String> = want.keys().collect();
    wait_recomputed(&redis, &users, Duration::from_secs(120));
}

/// `ingest` against the cluster and the broker, on TOPIC with DEAD as its dead-letter topic.
fn ingest_on_cluster(cluster: &Cluster, kafka: &Kafka) -> Server {
    let brokers = kafka.brokers();
    let (seeds, max) = (cluster.seeds(), MAX_ITEMS.to_string());
    let env = [
        ("REDIS_CLUSTER_NODES", seeds.as_str()),
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KAFKA_TOPIC", TOPIC),
        ("KAFKA_DEAD_LETTER_TOPIC", DEAD),
        ("MAX_PROFILE_ITEMS", max.as_str()),
    ];
    let server = Server::start_mode(cluster.nodes[0].port, test_models(), &["ingest"], &env);
    server.wait_healthy();
    server
}

/// Waits until every user of `want` has exactly that profile on the cluster and a list computed
/// from it; fails with the users that have not after `limit`.
fn wait_cluster_profiles(cluster: &Cluster, want: &HashMap<String, Vec<String>>, limit: Duration) {
    let mut conn = cluster.conn();
    let t = Instant::now();
    loop {
        let mut wrong = Vec::new();
        for (user, profile) in want {
            let stored: Option<String> =
                redis::cmd("GET").arg(format!("user_profile:{user}")).query(&mut conn).unwrap();
            let sha_of: Option<String> = redis::cmd("HGET")
                .arg(format!("recommendations_meta:{user}"))
                .arg("profile_sha")
                .query(&mut conn)
                .unwrap();
            let exact =
                stored.as_deref().map(|s| serde_json::from_str::<Vec<String>>(s).unwrap()).as_ref() == Some(profile);
            if !exact || sha_of != stored.as_deref().map(sha) {
                wrong.push(format!("{user}: {stored:?}, want {profile:?}, meta {sha_of:?}"));
            }
        }
        if wrong.is_empty() {
            return;
        }
        assert!(t.elapsed() < limit, "{} users wrong, e.g. {:?}", wrong.len(), &wrong[..3.min(wrong.len())]);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn on_a_redis_cluster_every_user_in_every_slot_gets_an_exact_profile_and_fresh_recommendations() {
    let cluster = Cluster::start_with(3, 0);
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, 3);
    kafka.create_topic(DEAD, 1);
    let evs = events("c", 300, 3000, 5);
    let want = expected(&evs);
    produce(&kafka, &evs);
    let server = ingest_on_cluster(&cluster, &kafka);
    wait_cluster_profiles(&cluster, &want, Duration::from_secs(300));
    // the users' profiles (and so their bookkeeping keys) lie on every master
    let per_master: Vec<i64> = cluster
        .master_ports()
        .iter()
        .map(|&p| redis::cmd("DBSIZE").query(&mut cluster.on(p).conn()).unwrap())
        .collect();
    assert!(per_master.iter().all(|&n| n > 100), "keys per master: {per_master:?}");
    assert_eq!(metric(&server, "dead_lettered"), 0.0);
    assert_eq!(metric(&server, "applied") as usize, evs.iter().filter(|e| e.event != "wishlist").count());
}

/// The dead-letter file's lines, as JSON.
fn file_letters(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn unbase64(value: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(value.as_str().unwrap()).unwrap()
}

fn dead_letter_file(name: &str) -> std::path::PathBuf {
    let dir = scratch_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("dead-letters.jsonl")
}

#[test]
fn without_a_dead_letter_topic_a_malformed_event_goes_to_the_file_and_every_batch_is_applied() {
    let redis = Redis::start();
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, 3);
    // no dead-letter topic: the broker does not create it (as Kafka with auto-creation off)
    let file = dead_letter_file("dead-file");
    let path = file.to_str().unwrap();
    let server = ingest(&redis, &kafka, &[("INGEST_BATCH", "300"), ("INGEST_DEAD_LETTER_FILE", path)]);
    let good = events("n", 100, 1200, 6);
    let ts = now_ms();
    let mut messages: Vec<(String, Vec<u8>)> = good.iter().map(|e| e.message(ts)).collect();
    messages.insert(100, ("n1".into(), b"not json".to_vec()));
    let t = Instant::now();
    kafka.produce(&kafka.producer(), TOPIC, &messages);
    let took = wait_profiles(&redis, &expected(&good), Duration::from_secs(60));
    let users: Vec<String> = expected(&good).into_keys().collect();
    wait_recomputed(&redis, &users.iter().collect::<Vec<_>>(), Duration::from_secs(30));
    eprintln!("1,200 events and one malformed, no dead-letter topic: every profile exact after {took:.2?}");
    wait_until(Duration::from_secs(10), || !file_letters(&file).is_empty());
    let letters = file_letters(&file);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(unbase64(&letter["payload_base64"]), b"not json");
    assert_eq!(unbase64(&letter["key_base64"]), b"n1");
    assert!(letter["reason"].as_str().unwrap().contains("not an event"), "{letter}");
    assert_eq!(letter["source_topic"], TOPIC);
    assert!(letter["source_offset"].as_i64().is_some() && letter["ts_ms"].as_u64().is_some(), "{letter}");
    assert!(!letter["dead_letter_error"].as_str().unwrap().is_empty(), "{letter}");
    assert_eq!(metric(&server, "dead_lettered"), 1.0);
    assert_eq!(server.metric("model_service_ingest_dead_letter_fallbacks_total{to=\"file\"}"), 1.0);
    assert_eq!(server.metric("model_service_ingest_dead_letter_failing"), 1.0);
    let (_, text) = server.get_text("/metrics");
    assert!(text.contains("model_service_ingest_dead_letter_failures_total{reason="), "{text}");
    let (status, health) = server.get("/health");
    assert_eq!(status, 200, "{health}");
    let said = health["ingest_dead_letter"].as_str().unwrap();
    assert!(said.starts_with("failing: ") && said.ends_with(&format!("fallback: file {path}")), "{said}");
    eprintln!("the malformed event went to the file after {:.2?}: {letter}; /health: {said}", t.elapsed());
}

#[test]
fn a_dead_letter_too_large_for_the_topic_goes_to_the_file_and_later_events_are_applied() {
    let redis = Redis::start();
    let kafka = Kafka::start();
    // one partition: every later event sits behind the large one
    kafka.create_topic(TOPIC, 1);
    kafka.create_topic(DEAD, 1);
    let file = dead_letter_file("dead-large");
    let path = file.to_str().unwrap();
    let server = ingest(&redis, &kafka, &[("INGEST_DEAD_LETTER_FILE", path)]);
    // 1.1 MB: over the 1 MB the dead-letter producer sends (librdkafka's message.max.bytes)
    let large = vec![b'x'; 1_100_000];
    let producer: rdkafka::producer::BaseProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    kafka.produce(&producer, TOPIC, &[("big".into(), large.clone())]);
    let later = events("l", 5, 20, 7);
    let t = Instant::now();
    produce(&kafka, &later);
    wait_profiles(&redis, &expected(&later), Duration::from_secs(40));
    // applied, recomputed and committed: nothing waits behind the large event
    let users: Vec<String> = expected(&later).into_keys().collect();
    wait_recomputed(&redis, &users.iter().collect::<Vec<_>>(), Duration::from_secs(30));
    wait_until(Duration::from_secs(10), || !file_letters(&file).is_empty());
    let letters = file_letters(&file);
    assert_eq!(letters.len(), 1);
    assert_eq!(unbase64(&letters[0]["payload_base64"]), large);
    assert!(letters[0]["reason"].as_str().unwrap().contains("1100000 bytes"), "{}", letters[0]["reason"]);
    assert_eq!(server.metric("model_service_ingest_dead_letter_failures_total{reason=\"message_too_large\"}"), 1.0);
    let said = server.get("/health").1["ingest_dead_letter"].as_str().unwrap().to_string();
    assert!(said.starts_with("failing: "), "{said}");
    eprintln!(
        "a 1.1 MB event: in the dead-letter file ({}), the 20 later events applied after {:.2?}",
        letters[0]["dead_letter_error"],
        t.elapsed()
    );
}

#[test]
fn a_profile_over_the_byte_cap_is_refused_without_being_parsed_and_others_are_applied() {
    let redis = Redis::start();
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, 3);
    kafka.create_topic(DEAD, 1);
    // 30 MB of valid JSON (the API refuses it with 422 without reading it)
    let huge: Vec<String> = (0..2_000_000).map(|i| format!("H{i:011}")).collect();
    let huge = serde_json::to_string(&huge).unwrap();
    redis.set("user_profile:huge", &huge);
    let server = ingest(&redis, &kafka, &[]);
    let mut evs = events("h", 20, 100, 8);
    evs.insert(10, Ev { event_id: "huge-1".into(), user: "huge".into(), item: item(1), event: "view" });
    let t = Instant::now();
    produce(&kafka, &evs);
    let others: Vec<Ev> = evs.iter().filter(|e| e.user != "huge").cloned().collect();
    wait_profiles(&redis, &expected(&others), Duration::from_secs(60));
    let dead = kafka.read_all(DEAD, 1, Duration::from_secs(30));
    let took = t.elapsed();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0].1.iter().find(|(k, _)| k == "reason").map(|(_, v)| v.clone()).unwrap_or_default();
    assert!(
        reason.contains(&format!("{} bytes", huge.len())) && reason.contains("MAX_PROFILE_BYTES"),
        "the reason should name the size and the cap: {reason}"
    );
    assert_eq!(redis.get("user_profile:huge").map(|v| v.len()), Some(huge.len()), "the profile is left as it is");
    assert_eq!(metric(&server, "retried"), 0.0);
    eprintln!("a {} byte profile: its event dead-lettered ({reason}) after {took:.2?}", huge.len());
}

#[test]
fn an_event_id_reused_with_another_item_is_dead_lettered_and_a_true_duplicate_is_not() {
    let redis = Redis::start();
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, 3);
    kafka.create_topic(DEAD, 1);
    // a user remembered by the first version: its entries hold the event id only
    redis.cmd(&["LPUSH", "ingested_events:{user_profile:r2}", "old-1"]);
    let server = ingest(&redis, &kafka, &[]);
    let ev = |id: &str, user: &str, row: usize| Ev {
        event_id: id.into(),
        user: user.into(),
        item: item(row),
        event: "view",
    };
    produce(&kafka, &[ev("r-1", "r1", 1), ev("r-2", "r1", 2)]);
    wait_profiles(&redis, &expected(&[ev("r-1", "r1", 1), ev("r-2", "r1", 2)]), Duration::from_secs(30));
    // the same event again (a producer retry), an id reused with another item, an old-style entry
    produce(&kafka, &[ev("r-1", "r1", 1), ev("r-2", "r1", 3), ev("old-1", "r2", 4), ev("r-4", "r1", 5)]);
    let dead = kafka.read_all(DEAD, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0].1.iter().find(|(k, _)| k == "reason").map(|(_, v)| v.clone()).unwrap_or_default();
    assert!(reason.contains("event_id reused with a different item"), "{reason}");
    let want = expected(&[ev("r-1", "r1", 1), ev("r-2", "r1", 2), ev("r-4", "r1", 5)]);
    wait_profiles(&redis, &want, Duration::from_secs(30));
    assert_eq!(redis.get("user_profile:r2"), None, "an id remembered by the first version is a duplicate");
    wait_until(Duration::from_secs(10), || metric(&server, "duplicate") == 2.0);
    assert_eq!(metric(&server, "dead_lettered"), 1.0);
    assert_eq!(metric(&server, "applied"), 3.0);
}

#[test]
fn on_a_redis_cluster_user_ids_with_braces_are_ingested_and_recomputed() {
    let cluster = Cluster::start_with(3, 0);
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, 3);
    kafka.create_topic(DEAD, 1);
    let ids = ["a}b", "{x}", "{}y", "a{b}c", "}{", "{", "{{a}}", "plain1", "plain2"];
    let evs: Vec<Ev> = (0..90)
        .map(|i| Ev {
            event_id: format!("b-{i}"),
            user: ids[i % ids.len()].to_string(),
            item: item((i * 13) % 300),
            event: "view",
        })
        .collect();
    let want = expected(&evs);
    produce(&kafka, &evs);
    let server = ingest_on_cluster(&cluster, &kafka);
    wait_cluster_profiles(&cluster, &want, Duration::from_secs(60));
    assert_eq!(metric(&server, "applied"), evs.len() as f64);
    assert_eq!(metric(&server, "retried"), 0.0);
}
