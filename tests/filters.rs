//! Request-time filters: the store-wide set of unavailable items (`items:unavailable`) and a
//! request's `exclude`. Real redis-server (one node and a 3-master cluster), the real binary; the
//! shipped Amazon-Book models with real users' profiles (train.txt of the Amazon-Book data set,
//! `testkit::amazon_book_users`), and the TorchScript test models for the per-request cases.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use redis::ConnectionLike;
use testkit::*;

fn query<T: redis::FromRedisValue>(conn: &mut dyn ConnectionLike, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(conn).unwrap()
}

fn stored(conn: &mut dyn ConnectionLike, user: &str) -> Option<Vec<String>> {
    let value: Option<String> = query(conn, &["GET", &format!("recommendations:{user}")]);
    value.map(|v| serde_json::from_str(&v).unwrap())
}

fn computed_at(conn: &mut dyn ConnectionLike, user: &str) -> Option<String> {
    query(conn, &["HGET", &format!("recommendations_meta:{user}"), "computed_at_ms"])
}

/// Done-when 1 (and 3 on a cluster): `users` ranked by a running `serve --listen`; the 10 items
/// most frequent in their stored lists become unavailable. Within 60 s no stored list holds one,
/// the lists that held none were not rewritten, and every later POST, GET and anonymous POST
/// answer holds none of them and still has k items.
fn unavailable_items_leave_answers_and_stored_lists(
    conn: &mut dyn ConnectionLike,
    server: &Server,
    users: &[(String, Vec<String>)],
) {
    let t = Instant::now();
    wait_until(Duration::from_secs(600), || users.iter().all(|(u, _)| stored(conn, u).is_some()));
    eprintln!("{} users ranked by the listener in {:.1}s", users.len(), t.elapsed().as_secs_f64());
    let before: HashMap<String, (Vec<String>, String)> =
        users.iter().map(|(u, _)| (u.clone(), (stored(conn, u).unwrap(), computed_at(conn, u).unwrap()))).collect();
    let mut frequency: HashMap<&str, usize> = HashMap::new();
    for (list, _) in before.values() {
        for id in list {
            *frequency.entry(id.as_str()).or_default() += 1;
        }
    }
    let mut by_frequency: Vec<(&str, usize)> = frequency.into_iter().collect();
    by_frequency.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let gone: Vec<String> = by_frequency.iter().take(10).map(|(id, _)| id.to_string()).collect();
    let gone_set: HashSet<&String> = gone.iter().collect();
    let holding: HashSet<&String> =
        before.iter().filter(|(_, (list, _))| list.iter().any(|id| gone_set.contains(id))).map(|(u, _)| u).collect();
    assert!(!holding.is_empty() && holding.len() < users.len(), "{} of {} lists hold one", holding.len(), users.len());

    let mut sadd = vec!["SADD", "items:unavailable"];
    sadd.extend(gone.iter().map(String::as_str));
    let _: i64 = query(conn, &sadd);

    // within 60 s no stored list holds one
    let t = Instant::now();
    let clean = |conn: &mut dyn ConnectionLike| {
        users.iter().all(|(u, _)| stored(conn, u).is_some_and(|l| l.iter().all(|id| !gone_set.contains(id))))
    };
    wait_until(Duration::from_secs(60), || clean(conn));
    assert!(clean(conn), "a stored list still holds an unavailable item after 60 s");
    eprintln!("{} lists holding an unavailable item recomputed in {:.1}s", holding.len(), t.elapsed().as_secs_f64());
    // the lists that held none were not rewritten; those that held one were, keeping k items
    let mut untouched = 0;
    for (user, (list, at)) in &before {
        let now_at = computed_at(conn, user).unwrap();
        if holding.contains(user) {
            assert_ne!(&now_at, at, "{user}: its list held an unavailable item");
            assert_eq!(stored(conn, user).unwrap().len(), list.len(), "{user}");
        } else {
            assert_eq!(&now_at, at, "{user}: its list held no unavailable item but was rewritten");
            assert_eq!(&stored(conn, user).unwrap(), list, "{user}");
            untouched += 1;
        }
    }
    assert_eq!(untouched + holding.len(), users.len());
    eprintln!("rewritten: {}, not rewritten: {untouched}", holding.len());
    let (_, health) = server.get("/health");
    assert_eq!(health["unavailable_items"]["items"], 10, "{health}");
    assert!(server.metric("model_service_unavailable_recomputes_total") >= holding.len() as f64);

    // every later answer holds none of them and has k items
    let sample: Vec<&(String, Vec<String>)> = users.iter().step_by((users.len() / 40).max(1)).collect();
    for (user, profile) in sample {
        for (route, (status, body)) in [
            ("POST", server.post(&format!("/recommend/{user}"))),
            ("GET", server.get(&format!("/recommendations/{user}"))),
            (
                "anonymous POST",
                server.post_json(server.port, "/recommend", &serde_json::json!({ "history": profile }), None),
            ),
        ] {
            assert_eq!(status, 200, "{route} {user}: {body}");
            let ids = rec_ids(&body);
            assert_eq!(ids.len(), 10, "{route} {user}: {body}");
            assert!(ids.iter().all(|id| !gone_set.contains(id)), "{route} {user}: {ids:?} holds one of {gone:?}");
        }
    }
}

fn load(conn: &mut dyn ConnectionLike, users: &[(String, Vec<String>)]) {
    for (user, profile) in users {
        let _: () = query(conn, &["SET", &format!("user_profile:{user}"), &serde_json::to_string(profile).unwrap()]);
    }
}

#[test]
fn unavailable_items_never_come_back_for_real_users() {
    let users = amazon_book_users("train.txt", 1500);
    let redis = Redis::start();
    let mut conn = redis.conn();
    load(&mut conn, &users);
    let server = Server::start_mode(redis.port, &shipped_models(), &["serve", "--listen"], &[]);
    server.wait_healthy();
    unavailable_items_leave_answers_and_stored_lists(&mut conn, &server, &users);
}

#[test]
fn unavailable_items_never_come_back_on_a_cluster() {
    let users = amazon_book_users("train.txt", 1500);
    let cluster = Cluster::start_with(3, 0);
    let mut conn = cluster.conn();
    load(&mut conn, &users);
    let seeds = cluster.seeds();
    let server = Server::start_mode(
        cluster.nodes[0].port,
        &shipped_models(),
        &["serve", "--listen"],
        &[("REDIS_CLUSTER_NODES", seeds.as_str())],
    );
    server.wait_healthy();
    unavailable_items_leave_answers_and_stored_lists(&mut conn, &server, &users);
}

fn profile_of(rows: &[usize]) -> String {
    serde_json::to_string(&rows.iter().map(|&r| item(r)).collect::<Vec<_>>()).unwrap()
}

fn serve(env: &[(&str, &str)]) -> (Redis, Server) {
    let redis = Redis::start();
    let server = Server::start_with(redis.port, test_models(), env);
    server.wait_healthy();
    (redis, server)
}

fn stored_list(redis: &Redis, user: &str) -> Vec<String> {
    serde_json::from_str(&redis.get(&format!("recommendations:{user}")).unwrap()).unwrap()
}

#[test]
fn exclude_shapes_the_answer_only_on_every_route() {
    let (redis, server) = serve(&[]);
    redis.set("user_profile:shopper", &profile_of(&[4, 10, 16]));
    let (status, first) = server.post("/recommend/shopper?k=6");
    assert_eq!(status, 200, "{first}");
    let list = rec_ids(&first);
    assert_eq!(stored_list(&redis, "shopper"), list);
    let excluded = [list[0].clone(), list[3].clone()];
    let exclude = format!("{},{},not-an-item", excluded[0], excluded[1]);

    // POST: the answer lacks them and has k items; the stored list is the one without exclusions
    let (status, body) = server.post(&format!("/recommend/shopper?k=6&exclude={exclude}"));
    assert_eq!(status, 200, "{body}");
    let ids = rec_ids(&body);
    assert_eq!(ids.len(), 6, "{body}");
    assert!(ids.iter().all(|id| !excluded.contains(id)), "{ids:?}");
    let kept: Vec<&String> = list.iter().filter(|id| !excluded.contains(id)).collect();
    assert_eq!(ids[..4].iter().collect::<Vec<_>>(), kept, "the order of the rest is kept");
    assert_eq!(body["unknown_excluded"], 1, "{body}");
    assert_eq!(stored_list(&redis, "shopper"), list, "the stored list is the one without the exclusions");

    // GET, from the cache and computed: the same
    for path in [
        format!("/recommendations/shopper?k=4&exclude={exclude}"),
        format!("/recommendations/shopper?k=6&exclude={exclude}"),
    ] {
        let (status, body) = server.get(&path);
        assert_eq!(status, 200, "{body}");
        let ids = rec_ids(&body);
        assert_eq!(ids.len(), if path.contains("k=4") { 4 } else { 6 }, "{path}: {body}");
        assert!(ids.iter().all(|id| !excluded.contains(id)), "{path}: {ids:?}");
        assert_eq!(stored_list(&redis, "shopper"), list, "{path}: the stored list is unchanged");
    }
    assert_eq!(server.get(&format!("/recommendations/shopper?k=4&exclude={exclude}")).1["source"], "cache");

    // explain names what was filtered and why
    let (_, explained) = server.post(&format!("/recommend/shopper?k=6&explain=true&exclude={exclude}"));
    let filtered = &explained["explain"]["filtered"];
    let named: HashSet<String> =
        filtered["excluded"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(named, excluded.iter().cloned().collect(), "{explained}");
    assert_eq!(filtered["unknown_excluded"], serde_json::json!(["not-an-item"]), "{explained}");

    // the anonymous POST: the exclusions of its body, and nothing written
    let keys_before = redis.keys("recommendations*").len();
    let history = [item(4), item(10), item(16)];
    let (status, plain) =
        server.post_json(server.port, "/recommend", &serde_json::json!({ "history": history, "k": 6 }), None);
    assert_eq!(status, 200, "{plain}");
    let anon = rec_ids(&plain);
    let body = serde_json::json!({ "history": history, "k": 6, "exclude": [anon[1], anon[2], "nope"] });
    let (status, answer) = server.post_json(server.port, "/recommend", &body, None);
    assert_eq!(status, 200, "{answer}");
    let ids = rec_ids(&answer);
    assert_eq!(ids.len(), 6, "{answer}");
    assert!(!ids.contains(&anon[1]) && !ids.contains(&anon[2]), "{ids:?}");
    assert_eq!(answer["unknown_excluded"], 1);
    assert_eq!(redis.keys("recommendations*").len(), keys_before, "the anonymous POST writes nothing");
    assert!(server.metric("model_service_exclude_unknown_items_total") >= 3.0);
    assert!(server.metric("model_service_filtered_items_total{source=\"excluded\"}") >= 4.0);
}

#[test]
fn bad_exclusions_get_400_and_a_bad_unavailable_set_keeps_the_last_good_one() {
    let (redis, server) = serve(&[("MAX_UNAVAILABLE", "5"), ("UNAVAILABLE_REFRESH_MS", "100")]);
    redis.set("user_profile:shopper", &profile_of(&[4, 10, 16]));
    let many: Vec<String> = (0..501).map(|n| format!("x{n}")).collect();
    let query = many.join(",");
    assert_error(&server.post(&format!("/recommend/shopper?exclude={query}")), 400, "invalid_exclude");
    assert_error(&server.get(&format!("/recommendations/shopper?exclude={query}")), 400, "invalid_exclude");
    let body = serde_json::json!({ "history": [item(4)], "exclude": many });
    assert_error(&server.post_json(server.port, "/recommend", &body, None), 400, "invalid_exclude");
    assert_error(&server.post("/recommend/shopper?exclude=a&exclude=b"), 400, "invalid_exclude");
    let body = serde_json::json!({ "history": [item(4)], "exclude": "a,b" });
    assert_error(&server.post_json(server.port, "/recommend", &body, None), 422, "invalid_body");
    assert_error(&server.post_json(server.port, "/recommend?exclude=a", &body, None), 400, "invalid_request");
    // 500 ids are allowed (the unknown ones ignored and counted)
    let (status, body) = server.post(&format!("/recommend/shopper?exclude={}", many[..500].join(",")));
    assert_eq!((status, &body["unknown_excluded"]), (200, &serde_json::json!(500)), "{body}");

    // a good set, then a key of another type, then a set over MAX_UNAVAILABLE: the last good set serves
    let (_, plain) = server.post("/recommend/shopper?k=5");
    let top = rec_ids(&plain)[0].clone();
    redis.cmd(&["SADD", "items:unavailable", &top]);
    wait_until(Duration::from_secs(5), || server.get("/health").1["unavailable_items"]["items"] == 1);
    // the stored list still holds it: a cache-first read leaves it out, answers from the cache while
    // k items remain, and recomputes (writing a list without it) when fewer do
    let (_, cached) = server.get("/recommendations/shopper?k=4");
    assert_eq!(cached["source"], "cache", "{cached}");
    assert_eq!(rec_ids(&cached), rec_ids(&plain)[1..5], "{cached}");
    assert_eq!(server.metric("model_service_filtered_items_total{source=\"unavailable\"}"), 1.0);
    let (_, computed) = server.get("/recommendations/shopper?k=5");
    assert_eq!(computed["source"], "computed", "{computed}");
    assert_eq!(rec_ids(&computed).len(), 5, "{computed}");
    assert!(!stored_list(&redis, "shopper").contains(&top), "the recomputed list is written without it");
    let check = |why: &str| {
        for (status, body) in [server.post("/recommend/shopper?k=5"), server.get("/recommendations/shopper?k=5")] {
            assert_eq!(status, 200, "{why}: {body}");
            assert_eq!(rec_ids(&body).len(), 5, "{why}: {body}");
            assert!(!rec_ids(&body).contains(&top), "{why}: the unavailable item came back: {body}");
        }
    };
    check("a good set");
    redis.set("items:unavailable", "not a set"); // SET replaces the set at once
                                                 // a request (here the readiness probe) reads the set again once it is due
    wait_until(Duration::from_secs(5), || server.get("/health").1["unavailable_items"]["error"].is_string());
    assert!(server.metric("model_service_unavailable_refresh_failures_total{reason=\"wrong_type\"}") >= 1.0);
    let (status, health) = server.get("/health");
    assert_eq!(status, 200, "serving goes on: {health}");
    assert_eq!(health["unavailable_items"]["items"], 1, "{health}");
    assert!(health["unavailable_items"]["error"].as_str().unwrap().contains("string"), "{health}");
    check("a string at items:unavailable");
    // the string replaced by a set of 6 in one step (no empty set in between)
    let script = "redis.call('DEL', KEYS[1]); return redis.call('SADD', KEYS[1], unpack(ARGV))";
    redis.cmd(&["EVAL", script, "1", "items:unavailable", &top, "a", "b", "c", "d", "e"]);
    wait_until(Duration::from_secs(5), || {
        server.get("/health").1["unavailable_items"]["error"].as_str().is_some_and(|e| e.contains("MAX_UNAVAILABLE"))
    });
    assert!(server.metric("model_service_unavailable_refresh_failures_total{reason=\"too_large\"}") >= 1.0);
    let (status, health) = server.get("/health");
    assert_eq!(status, 200, "{health}");
    assert!(health["unavailable_items"]["error"].as_str().unwrap().contains("MAX_UNAVAILABLE"), "{health}");
    check("a set over MAX_UNAVAILABLE");

    // the item available again is eligible for new computations
    redis.cmd(&["DEL", "items:unavailable"]);
    wait_until(Duration::from_secs(5), || server.get("/health").1["unavailable_items"]["items"] == 0);
    let (_, again) = server.post("/recommend/shopper?k=5");
    assert_eq!(rec_ids(&again), rec_ids(&plain), "{again}");
    assert!(server.get("/health").1["unavailable_items"]["error"].is_null());
}
