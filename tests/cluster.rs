//! Redis Cluster: a 3-master, 3-replica cluster of real redis-server processes (made by
//! `redis-cli --cluster create`), the real binary with REDIS_CLUSTER_NODES. The walk-through for
//! users in every slot range, `recommend`, `check`, `backfill`, the listener through a failover
//! and a reshard, three replicas sharing the work with one killed, and readiness against a cluster
//! that cannot serve every key.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::*;

fn sha1(value: &str) -> String {
    use sha1::{Digest, Sha1};
    format!("{:x}", Sha1::digest(value.as_bytes()))
}

fn profile(n: usize, v: usize) -> String {
    serde_json::to_string(&[item(n % 300), item((n * 7 + v) % 300), item((n + 3 * v + 1) % 300)]).unwrap()
}

fn start(cluster: &Cluster, args: &[&str], extra: &[(&str, &str)]) -> Server {
    let seeds = cluster.seeds();
    let mut vars: Vec<(&str, &str)> = vec![("REDIS_CLUSTER_NODES", &seeds)];
    vars.extend_from_slice(extra);
    let server = Server::start_mode(cluster.nodes[0].port, test_models(), args, &vars);
    server.wait_healthy();
    server
}

/// Writes `user_profile:<prefix><n>` = profile(n, v) for every n, pipelined per node by the
/// cluster client (a chunk that meets a moved slot is written again on a fresh connection).
fn write_profiles(cluster: &Cluster, prefix: &str, range: std::ops::Range<usize>, v: usize) {
    for chunk in range.collect::<Vec<_>>().chunks(200) {
        let mut pipe = redis::cluster::cluster_pipe();
        for &n in chunk {
            pipe.cmd("SET").arg(format!("user_profile:{prefix}{n}")).arg(profile(n, v)).ignore();
        }
        let mut tries = 0;
        while let Err(e) = pipe.query::<()>(&mut cluster.conn()) {
            tries += 1;
            assert!(tries < 20, "writing profiles: {e}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Users whose meta does not name the current profile value.
fn stale(conn: &mut redis::cluster::ClusterConnection, prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range
        .filter_map(|n| {
            let user = format!("{prefix}{n}");
            let mut fresh = || -> redis::RedisResult<bool> {
                let value: Option<String> = redis::cmd("GET").arg(format!("user_profile:{user}")).query(conn)?;
                let meta_key = format!("recommendations_meta:{user}");
                let meta: Option<String> = redis::cmd("HGET").arg(&meta_key).arg("profile_sha").query(conn)?;
                let list: Option<String> = redis::cmd("GET").arg(format!("recommendations:{user}")).query(conn)?;
                let list_sha: Option<String> = redis::cmd("HGET").arg(&meta_key).arg("list_sha").query(conn)?;
                Ok(meta == value.as_deref().map(sha1) && list.as_deref().map(sha1) == list_sha)
            };
            (!fresh().unwrap_or(false)).then_some(user)
        })
        .collect()
}

fn wait_up_to_date(cluster: &Cluster, prefix: &str, range: std::ops::Range<usize>, limit: Duration) {
    let mut conn = cluster.conn();
    let start = Instant::now();
    loop {
        let left = stale(&mut conn, prefix, range.clone());
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{} users not up to date after {limit:?}, e.g. {:?}",
            left.len(),
            &left[..3.min(left.len())]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Keys per master (DBSIZE), to show users spread over all of them.
fn keys_per_master(cluster: &Cluster) -> Vec<i64> {
    cluster.master_ports().into_iter().map(|p| redis::cmd("DBSIZE").query(&mut cluster.on(p).conn()).unwrap()).collect()
}

/// Runs the binary with `args` against the cluster to completion (`recommend`, `check`, `backfill`).
fn cli(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    let mut cmd = bin();
    base_env(&mut cmd, cluster.nodes[0].port, test_models());
    cmd.env("REDIS_CLUSTER_NODES", cluster.seeds()).env("HOST", "127.0.0.1").env("PORT", free_port().to_string());
    cmd.args(args).output().unwrap()
}

#[test]
fn the_walk_through_recommend_check_and_backfill_work_on_a_cluster_for_users_in_every_slot() {
    let cluster = Cluster::start();
    let server = start(&cluster, &["serve"], &[]);
    let (_, health) = server.get("/health");
    assert_eq!(health["redis_topology"]["kind"], "cluster", "{health}");
    let nodes = health["redis_topology"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 6, "{health}");
    assert_eq!(nodes.iter().filter(|n| n["role"] == "master" && n["state"] == "ok").count(), 3, "{health}");

    let mut conn = cluster.conn();
    write_profiles(&cluster, "walk", 0..1000, 0);
    let spread = keys_per_master(&cluster);
    assert!(spread.iter().all(|&n| n > 250), "profiles per master: {spread:?}");
    let mut errors = 0;
    for n in 0..1000 {
        let user = format!("walk{n}");
        let (status, body) = server.post(&format!("/recommend/{user}"));
        if status != 200 {
            errors += 1;
            eprintln!("{user}: {status} {body}");
            continue;
        }
        let stored: Option<String> = redis::cmd("GET").arg(format!("recommendations:{user}")).query(&mut conn).unwrap();
        let stored: Vec<String> = serde_json::from_str(&stored.unwrap()).unwrap();
        assert_eq!(stored, rec_ids(&body), "{user}");
        let ttl: i64 = redis::cmd("TTL").arg(format!("recommendations:{user}")).query(&mut conn).unwrap();
        assert!((3500..=3600).contains(&ttl), "{user}: TTL {ttl}");
        let meta: Option<String> =
            redis::cmd("HGET").arg(format!("recommendations_meta:{user}")).arg("profile_sha").query(&mut conn).unwrap();
        assert_eq!(meta, Some(sha1(&profile(n, 0))), "{user}");
    }
    assert_eq!(errors, 0, "failed requests");
    // cache-first reads are answered from the cluster
    let (status, body) = server.get("/recommendations/walk7");
    assert_eq!((status, body["source"].as_str()), (200, Some("cache")), "{body}");

    // recommend and check
    let cli = |args: &[&str]| cli(&cluster, args);
    let out = cli(&["recommend", "walk3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stored: Vec<String> = serde_json::from_str(&cluster.get("recommendations:walk3").unwrap()).unwrap();
    assert_eq!(rec_ids(&answer), stored);
    assert!(cli(&["check"]).status.success());

    // backfill: 100 profiles changed, the rest unchanged; every master scanned
    write_profiles(&cluster, "walk", 0..100, 1);
    let out = cli(&["backfill"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("backfill on the cluster: {summary}");
    assert_eq!(
        (&summary["scanned"], &summary["written"], &summary["unchanged"], &summary["failed"]),
        (&1000.into(), &100.into(), &900.into(), &0.into()),
        "{summary}"
    );
    assert!(stale(&mut conn, "walk", 0..1000).is_empty());
    assert!(cluster.get("model_service:backfill:cursor").is_none());
    eprintln!("{}", cluster.check());
}

#[test]
fn listen_on_a_cluster_follows_every_master_through_a_failover_and_a_reshard() {
    let cluster = Cluster::start();
    let listener = start(&cluster, &["listen"], &[]);
    let t = Instant::now();
    write_profiles(&cluster, "l", 0..2000, 0);
    wait_up_to_date(&cluster, "l", 0..2000, Duration::from_secs(90));
    eprintln!("2,000 profiles over {:?} masters recomputed in {:?}", keys_per_master(&cluster), t.elapsed());

    // a failover during a burst: profiles written before, during and after end up up to date
    let victim = cluster.master_ports()[0];
    let victim_id = cluster.topology().into_iter().find(|n| n.0 == victim).unwrap().1;
    let replica = cluster.topology().into_iter().find(|n| n.3 == victim_id).unwrap().0;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, stop) = (cluster.client(), stop.clone());
        std::thread::spawn(move || {
            let mut conn = client.get_connection().unwrap();
            let mut round = 1;
            while !stop.load(Ordering::SeqCst) {
                for n in 0..2000 {
                    // retried by the cluster client while the slot moves to the new master
                    let _ = redis::cmd("SET")
                        .arg(format!("user_profile:l{n}"))
                        .arg(profile(n, round))
                        .query::<()>(&mut conn);
                }
                round += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let reply: String = redis::cmd("CLUSTER").arg("FAILOVER").query(&mut cluster.on(replica).conn()).unwrap();
    assert_eq!(reply, "OK");
    wait_until(Duration::from_secs(20), || cluster.master_ports().contains(&replica));
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    write_profiles(&cluster, "l", 0..2000, 99);
    wait_up_to_date(&cluster, "l", 0..2000, Duration::from_secs(120));
    eprintln!("after the failover of {victim} to {replica}: every profile up to date");

    // a reshard under load: requests keep succeeding while 1,000 slots move
    let server = start(&cluster, &["serve"], &[]);
    let failed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (port, failed, done, stop) = (server.port, failed.clone(), done.clone(), stop.clone());
        std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let r = client.post(format!("http://127.0.0.1:{port}/recommend/l{}", n % 2000)).send();
                match r {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        eprintln!("during the reshard: {} {}", r.status(), r.text().unwrap_or_default());
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        eprintln!("during the reshard: {e}");
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
                n += 1;
            }
        })
    };
    let topo = cluster.topology();
    let masters: Vec<&(u16, String, bool, String)> = topo.iter().filter(|n| n.2).collect();
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "reshard", &format!("127.0.0.1:{}", masters[0].0)])
        .args(["--cluster-from", &masters[0].1, "--cluster-to", &masters[1].1, "--cluster-slots", "1000"])
        .args(["--cluster-yes", "--cluster-pipeline", "50"])
        .output()
        .unwrap();
    assert!(out.status.success(), "reshard: {}", String::from_utf8_lossy(&out.stdout));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    eprintln!(
        "reshard of 1,000 slots: {} requests, {} failed",
        done.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    assert!(done.load(Ordering::SeqCst) > 50);
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests failed during the reshard");
    // the listener follows keys in moved slots too
    write_profiles(&cluster, "l", 0..2000, 7);
    wait_up_to_date(&cluster, "l", 0..2000, Duration::from_secs(90));
    cluster.check();
    drop(listener);
}

#[test]
fn every_mode_on_a_cluster_works_for_user_ids_holding_braces() {
    let cluster = Cluster::start_with(3, 0);
    let server = start(&cluster, &["serve", "--listen"], &[]);
    let ids = ["a}b", "{x}", "{}y", "a{b}c", "}{", "{{a}}"];
    let meta_sha = |id: &str| -> Option<String> {
        redis::cmd("HGET")
            .arg(format!("recommendations_meta:{id}"))
            .arg("profile_sha")
            .query(&mut cluster.conn())
            .unwrap()
    };
    // listen: profile writes are recomputed (the claim key lies in the profile's slot)
    for (n, id) in ids.iter().enumerate() {
        cluster.set(&format!("user_profile:{id}"), &profile(n, 0));
    }
    wait_until(Duration::from_secs(30), || {
        ids.iter().enumerate().all(|(n, id)| meta_sha(id) == Some(sha1(&profile(n, 0))))
    });
    assert_eq!(server.metric(r#"model_service_listener_events_total{outcome="failed",source="keyspace"}"#), 0.0);
    // serve: POST computes and writes, GET answers from the cache
    let encode = |id: &str| id.replace('{', "%7B").replace('}', "%7D");
    for id in ids {
        let (status, body) = server.post(&format!("/recommend/{}", encode(id)));
        assert_eq!(status, 200, "{id}: {body}");
        let stored: Vec<String> =
            serde_json::from_str(&cluster.get(&format!("recommendations:{id}")).unwrap()).unwrap();
        assert_eq!(stored, rec_ids(&body), "{id}");
        let (status, body) = server.get(&format!("/recommendations/{}", encode(id)));
        assert_eq!((status, body["source"].as_str()), (200, Some("cache")), "{id}: {body}");
    }
    // recommend and backfill
    let cli = |args: &[&str]| cli(&cluster, args);
    let out = cli(&["recommend", "a}b"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(server);
    for (n, id) in ids.iter().enumerate() {
        cluster.set(&format!("user_profile:{id}"), &profile(n, 1));
    }
    let out = cli(&["backfill"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (summary["written"].as_u64(), summary["failed"].as_u64()),
        (Some(ids.len() as u64), Some(0)),
        "{summary}"
    );
    assert!(ids.iter().enumerate().all(|(n, id)| meta_sha(id) == Some(sha1(&profile(n, 1)))));
}

#[test]
fn three_listener_replicas_share_the_work_and_lose_nothing_when_one_is_killed() {
    let cluster = Cluster::start();
    let replicas: Vec<Server> = (0..3)
        .map(|i| {
            start(&cluster, &["serve", "--listen"], &[("CONSUMER_NAME", &format!("r{i}")), ("USER_CLAIM_MS", "3000")])
        })
        .collect();
    let mut replicas = replicas.into_iter();
    let (mut victim, others) = (replicas.next().unwrap(), replicas.collect::<Vec<_>>());
    // every write is announced on the notify channel (PUBLISH reaches every node of a cluster)
    let announced = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let subscriber = {
        let (client, announced) = (cluster.nodes[0].client(), announced.clone());
        std::thread::spawn(move || {
            let mut conn = client.get_connection().unwrap();
            let mut pubsub = conn.as_pubsub();
            pubsub.subscribe("recommendations_updated").unwrap();
            pubsub.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            while let Ok(msg) = pubsub.get_message() {
                announced.lock().unwrap().push(msg.get_payload().unwrap());
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    write_profiles(&cluster, "r", 0..1000, 0);
    victim.kill9();
    write_profiles(&cluster, "r", 1000..3000, 0);
    wait_up_to_date(&cluster, "r", 0..3000, Duration::from_secs(120));
    subscriber.join().unwrap();
    let announced = announced.lock().unwrap();
    let distinct: HashSet<&String> = announced.iter().collect();
    let duplicates = announced.len() - distinct.len();
    eprintln!(
        "3,000 profile writes, 3 replicas (one killed after 1,000): {} lists written, {duplicates} duplicates",
        announced.len()
    );
    assert_eq!(distinct.len(), 3000);
    assert!(duplicates <= 30, "{duplicates} duplicate computations (more than 1% of 3,000 writes)");
    let per_replica: HashMap<String, f64> = others
        .iter()
        .map(|s| {
            (
                s.port.to_string(),
                s.metric(r#"model_service_listener_events_total{outcome="processed",source="keyspace"}"#),
            )
        })
        .collect();
    eprintln!("lists written by the surviving replicas (keyspace): {per_replica:?}");
}

#[test]
fn readiness_fails_against_a_cluster_with_uncovered_slots_and_a_cluster_node_used_as_a_single_one() {
    let dir = scratch_dir(&format!("cluster-uncovered-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    // a cluster node serving only half of the slots
    let node = Cluster::node(&dir);
    let _: () = redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(0).arg(8000).query(&mut node.conn()).unwrap();
    let seeds = format!("127.0.0.1:{}", node.port);
    let server = Server::start_mode(node.port, test_models(), &["serve"], &[("REDIS_CLUSTER_NODES", &seeds)]);
    wait_until(Duration::from_secs(60), || server.get("/health").1["model_loaded"] == true);
    let (status, body) = server.get("/health/ready");
    eprintln!("uncovered slots: {body}");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "unhealthy");
    assert!(body["detail"].as_str().unwrap().contains("redis"), "{body}");
    assert_eq!(body["redis_topology"]["kind"], "cluster", "{body}");
    let resp = server.post("/recommend/someone");
    assert_eq!(resp.0, 503, "{}", resp.1);
    assert!(resp.1["detail"].as_str().is_some_and(|d| !d.is_empty()));

    // the same cluster node addressed as a single node: it would answer MOVED for most keys
    let single = Server::start_with(node.port, test_models(), &[]);
    wait_until(Duration::from_secs(60), || single.get("/health").1["model_loaded"] == true);
    let (status, body) = single.get("/health/ready");
    eprintln!("cluster node used as a single node: {body}");
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("REDIS_CLUSTER_NODES"), "{body}");

    // a plain (non-cluster) node given as a cluster seed
    let plain = Redis::start();
    let seeds = format!("127.0.0.1:{}", plain.port);
    let server = Server::start_mode(plain.port, test_models(), &["serve"], &[("REDIS_CLUSTER_NODES", &seeds)]);
    wait_until(Duration::from_secs(60), || server.get("/health").1["model_loaded"] == true);
    let (status, body) = server.get("/health/ready");
    eprintln!("non-cluster node as a cluster seed: {body}");
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("cluster"), "{body}");
    let resp = server.post("/recommend/someone");
    assert_eq!(resp.0, 503, "{}", resp.1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cluster_with_a_database_other_than_zero_is_refused_at_start() {
    let out = run_cli(1, test_models(), &["--redis-cluster-nodes", "127.0.0.1:1", "--redis-db", "2", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only database 0"), "{err}");
}

#[test]
fn listen_on_a_cluster_waits_quietly_on_an_idle_request_stream_and_takes_each_entry_at_once() {
    let cluster = Cluster::start();
    let seeds = cluster.seeds();
    let env = [
        ("REDIS_CLUSTER_NODES", seeds.as_str()),
        ("RUST_LOG", "model_service=info"),
        ("CATCHUP_INTERVAL_SECS", "3600"),
    ];
    let mut server = Server::start_logged_mode(cluster.nodes[0].port, test_models(), &["listen"], &env);
    server.wait_healthy();
    // idle for a while: a blocking read that ends with nothing is not a failure
    std::thread::sleep(Duration::from_secs(4));
    let mut conn = cluster.conn();
    let mut slowest = Duration::ZERO;
    for n in 0..12 {
        let user = format!("idle-stream{n}");
        let t = Instant::now();
        redis::cmd("XADD")
            .arg("recommend_requests")
            .arg("*")
            .arg("user_id")
            .arg(&user)
            .query::<String>(&mut conn)
            .unwrap();
        wait_until(Duration::from_secs(15), || cluster.get(&format!("recommendations:{user}")).is_some());
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    server.sigterm();
    let (status, log) = server.exit_and_log();
    assert!(status.success(), "{status:?}");
    let failures = log.lines().filter(|l| l.contains("request stream") && l.contains("WARN")).count();
    assert_eq!(failures, 0, "idle reads logged as failures:\n{log}");
    assert!(slowest < Duration::from_millis(2500), "an entry waited {slowest:?}");
}
