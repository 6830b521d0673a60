//! Redis Sentinel: a master, a replica and three sentinels (real redis-server processes, the
//! sentinels run with `--sentinel`); the real binary with REDIS_SENTINELS and
//! REDIS_SENTINEL_MASTER follows a failover without a restart.

use std::time::{Duration, Instant};

use testkit::*;

const TOKEN: &str = "sentinel-token";

#[test]
fn a_failover_gives_503_then_service_resumes_within_10_s_of_the_promotion_without_a_restart() {
    let mut s = Sentinels::start();
    let sentinels = s.addrs();
    let server = Server::start_mode(
        s.master.port,
        test_models(),
        &["serve"],
        &[("REDIS_SENTINELS", &sentinels), ("REDIS_SENTINEL_MASTER", Sentinels::MASTER), ("API_TOKEN", TOKEN)],
    );
    server.wait_healthy();
    // the nodes' addresses are shown to a request with the token
    let (_, health) = server.get_authed("/health", TOKEN);
    assert_eq!(health["redis_topology"]["kind"], "sentinel", "{health}");
    assert_eq!(health["redis_topology"]["nodes"][0]["addr"], format!("127.0.0.1:{}", s.master.port), "{health}");
    s.master.set("user_profile:sen", &serde_json::to_string(&[item(0), item(1)]).unwrap());
    let (status, body) = server.post_authed("/recommend/sen", TOKEN);
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(300)); // the replica has the profile

    let replica_port = s.replica.port;
    s.master.kill();
    let killed = Instant::now();
    let mut during = Vec::new();
    let mut promoted: Option<Instant> = None;
    let resumed = loop {
        let (status, body) = server.post_authed("/recommend/sen", TOKEN);
        if promoted.is_none() && s.master_port() == Some(replica_port) {
            promoted = Some(Instant::now());
        }
        if status == 200 {
            break Instant::now();
        }
        // Redis is unavailable, not erring: the client may retry (the sentinels name no master
        // for a while, then the old master's address refuses connections)
        assert_error(&(status, body.clone()), 503, "redis_unavailable");
        during.push(body["error"].as_str().unwrap_or("?").to_string());
        assert!(killed.elapsed() < Duration::from_secs(60), "no failover within 60 s: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let promoted = promoted.unwrap_or(resumed);
    let after = resumed.saturating_duration_since(promoted);
    eprintln!(
        "master killed: {} answers 503 ({:?}) during the failover; promoted after {:?}; service again {:?} after the promotion",
        during.len(),
        during.iter().collect::<std::collections::BTreeSet<_>>(),
        promoted - killed,
        after
    );
    assert!(!during.is_empty(), "no 503 while the master was down");
    assert!(after <= Duration::from_secs(10), "service resumed {after:?} after the promotion");
    assert_eq!(s.master_port(), Some(replica_port));
    let stored: Option<String> = redis::cmd("GET").arg("recommendations:sen").query(&mut s.replica.conn()).unwrap();
    assert!(stored.is_some(), "the list is written to the promoted replica");
    let (status, health) = server.get_authed("/health/ready", TOKEN);
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["redis_topology"]["nodes"][0]["addr"], format!("127.0.0.1:{replica_port}"), "{health}");
}
