//! The API a frontend and an ML engineer expect: cache-first reads, anonymous sessions, per-stage
//! explanations and the OpenAPI document. Real redis-server, real binary, TorchScript test models.

use std::collections::HashSet;

use testkit::*;

fn setup(env: &[(&str, &str)]) -> (Redis, Server) {
    let redis = Redis::start();
    let server = Server::start_with(redis.port, test_models(), env);
    server.wait_healthy();
    (redis, server)
}

fn profile_of(rows: &[usize]) -> String {
    serde_json::to_string(&rows.iter().map(|&r| item(r)).collect::<Vec<_>>()).unwrap()
}

fn scores(body: &serde_json::Value) -> Vec<f64> {
    body["recommendations"].as_array().unwrap().iter().map(|r| r["score"].as_f64().unwrap()).collect()
}

#[test]
fn get_answers_from_redis_when_the_stored_list_is_fresh_and_computes_otherwise() {
    let (redis, server) = setup(&[]);
    redis.set("user_profile:reader", &profile_of(&[4, 10, 16]));
    let (status, first) = server.get("/recommendations/reader?k=5");
    assert_eq!((status, first["source"].as_str()), (200, Some("computed")), "{first}");
    let stored: Vec<String> = serde_json::from_str(&redis.get("recommendations:reader").unwrap()).unwrap();
    assert_eq!(stored, rec_ids(&first));

    // fresh: answered from Redis, same items and scores, no model run
    let batches = server.metric("model_service_inference_batch_size_count");
    let lightgcn_runs =
        server.metric("model_service_stage_duration_seconds_count{stage=\"lightgcn\",variant=\"default\"}");
    let (status, cached) = server.get("/recommendations/reader?k=3");
    assert_eq!((status, cached["source"].as_str()), (200, Some("cache")), "{cached}");
    assert_eq!(rec_ids(&cached), rec_ids(&first)[..3]);
    assert_eq!(scores(&cached), scores(&first)[..3]);
    assert_eq!(cached["strategy"], "personalized");
    assert_eq!(server.metric("model_service_inference_batch_size_count"), batches, "a cache answer runs no model");
    assert_eq!(
        server.metric("model_service_stage_duration_seconds_count{stage=\"lightgcn\",variant=\"default\"}"),
        lightgcn_runs
    );
    assert_eq!(server.metric("model_service_cache_answers_total{outcome=\"hit\"}"), 1.0);

    // a stored list shorter than k is a miss
    let (_, longer) = server.get("/recommendations/reader?k=8");
    assert_eq!(longer["source"], "computed");
    assert_eq!(rec_ids(&longer).len(), 8);

    // a changed profile makes the stored list stale: computed from the new profile
    redis.set("user_profile:reader", &profile_of(&[3, 9]));
    let (_, changed) = server.get("/recommendations/reader?k=5");
    assert_eq!(changed["source"], "computed");
    let (_, posted) = server.post("/recommend/reader?k=5");
    assert_eq!(rec_ids(&changed), rec_ids(&posted), "the cache-first answer equals the computed one");

    // a missing profile gets the popular list, cached like any other
    let (_, cold) = server.get("/recommendations/newcomer?k=4");
    assert_eq!((cold["source"].as_str(), cold["strategy"].as_str()), (Some("computed"), Some("popular")));
    let (_, cold_again) = server.get("/recommendations/newcomer?k=4");
    assert_eq!((cold_again["source"].as_str(), cold_again["strategy"].as_str()), (Some("cache"), Some("popular")));
    assert_eq!(rec_ids(&cold_again), rec_ids(&cold));

    // same errors as POST
    assert_error(&server.get("/recommendations/bad%20id"), 400, "invalid_user_id");
    assert_error(&server.get("/recommendations/reader?k=0"), 400, "invalid_k");
    assert_error(&server.get("/recommendations/reader?k=2&k=3"), 400, "invalid_k");
    redis.set("user_profile:junk", "[1]");
    assert_error(&server.get("/recommendations/junk"), 422, "invalid_profile");
}

#[test]
fn after_a_reload_the_stored_list_is_stale_and_get_recomputes() {
    let v2 = make_models("read-api-v2", &["--version", "v2", "--seed", "2"]);
    let (redis, server) = setup(&[("API_TOKEN", "t0ken")]);
    redis.set("user_profile:loyal", &profile_of(&[1, 7]));
    let get = |path: &str| {
        let r = reqwest::blocking::Client::new().get(server.url(path)).bearer_auth("t0ken").send().unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().unwrap())
    };
    assert_eq!(get("/recommendations/loyal").1["source"], "computed");
    assert_eq!(get("/recommendations/loyal").1["source"], "cache");
    let body = serde_json::json!({ "model_dir": v2 });
    let (status, reloaded) = server.post_json(server.port, "/admin/reload", &body, Some("t0ken"));
    assert_eq!(status, 200, "{reloaded}");
    let (_, after) = get("/recommendations/loyal");
    assert_eq!((after["source"].as_str(), after["model_version"].as_str()), (Some("computed"), Some("v2")), "{after}");
    assert_eq!(get("/recommendations/loyal").1["source"], "cache");
}

#[test]
fn get_and_post_racing_for_one_user_compute_once() {
    // Redis is held 1 s below: the server's Redis response timeout must outlast it
    let (redis, server) = setup(&[("REDIS_RESPONSE_TIMEOUT_MS", "5000")]);
    redis.set("user_profile:raced", &profile_of(&[6, 12]));
    let before = server.metric("model_service_inference_batch_size_sum");
    // Hold Redis long enough that every request is waiting on its read when it returns, even on a
    // busy machine.
    let port = redis.port;
    let sleeper = std::thread::spawn(move || {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap().get_connection().unwrap();
        redis::cmd("DEBUG").arg("SLEEP").arg(1.0).query::<()>(&mut c).unwrap();
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    let answers: Vec<(u16, serde_json::Value)> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..12)
                .map(|n| {
                    let server = &server;
                    s.spawn(move || {
                        if n % 2 == 0 {
                            server.get("/recommendations/raced")
                        } else {
                            server.post("/recommend/raced")
                        }
                    })
                })
                .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    sleeper.join().unwrap();
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(rec_ids(body), rec_ids(&answers[0].1));
    }
    let ranked = server.metric("model_service_inference_batch_size_sum") - before;
    assert_eq!(ranked, 1.0, "6 GETs and 6 POSTs for one user ran the models {ranked} times");
}

#[test]
fn an_anonymous_history_is_ranked_like_a_stored_profile_and_writes_nothing() {
    let (redis, server) = setup(&[("MAX_PROFILE_ITEMS", "50"), ("MAX_PROFILE_BYTES", "4000")]);
    let history: Vec<String> = [5, 11, 17, 23].iter().map(|&r| item(r)).collect();
    let body = serde_json::json!({"history": history, "k": 6});
    let (status, anon) = server.post_json(server.port, "/recommend", &body, None);
    assert_eq!(status, 200, "{anon}");
    assert!(anon["user_id"].is_null() && anon.get("source").is_none(), "{anon}");
    let ids = rec_ids(&anon);
    assert_eq!(ids.len(), 6);
    let owned: HashSet<&String> = history.iter().collect();
    assert!(ids.iter().all(|id| !owned.contains(id)), "no history item comes back: {ids:?}");
    assert!(redis.keys("recommendations*").is_empty(), "an anonymous ranking writes nothing");

    // the same history stored as a profile gets the same list
    redis.set("user_profile:twin", &serde_json::to_string(&history).unwrap());
    let (_, stored) = server.post("/recommend/twin?k=6");
    assert_eq!(rec_ids(&stored), ids);

    // the same caps and errors as a stored profile
    let long: Vec<String> = (0..60).map(item).collect();
    let resp = server.post_json(server.port, "/recommend", &serde_json::json!({"history": long}), None);
    assert_error(&resp, 422, "profile_too_long");
    let resp = server.post_json(server.port, "/recommend", &serde_json::json!({"history": "0553092626"}), None);
    assert_error(&resp, 422, "invalid_body");
    let resp = server.post_json(server.port, "/recommend", &serde_json::json!({"history": [], "k": 0}), None);
    assert_error(&resp, 400, "invalid_k");
    let huge = serde_json::json!({"history": vec!["x".repeat(100); 100]});
    let resp = server.post_json(server.port, "/recommend", &huge, None);
    assert_error(&resp, 413, "payload_too_large");
    // an empty history is a newcomer: the popular list
    let (_, cold) = server.post_json(server.port, "/recommend", &serde_json::json!({"history": []}), None);
    assert_eq!(cold["strategy"], "popular");
    assert_eq!(
        redis.keys("recommendations:*"),
        vec!["recommendations:twin"],
        "only the stored profile's list is in Redis"
    );
}

#[test]
fn explain_shows_each_items_place_after_every_stage_and_is_absent_by_default() {
    let (redis, server) = setup(&[]);
    redis.set("user_profile:curious", &profile_of(&[2, 8, 14, 20]));
    let (status, plain) = server.post("/recommend/curious?k=5");
    assert_eq!(status, 200);
    // without explain, the answer has exactly the fields it always had
    let fields: Vec<&String> = plain.as_object().unwrap().keys().collect();
    let want = [
        "elapsed_ms",
        "model_version",
        "recommendations",
        "strategy",
        "truncated_items",
        "unknown_items",
        "user_id",
        "variant",
    ];
    assert_eq!(fields, want, "{plain}");
    let item_fields: Vec<&String> = plain["recommendations"][0].as_object().unwrap().keys().collect();
    assert_eq!(item_fields, ["item_id", "score"]);

    let (status, explained) = server.post("/recommend/curious?k=5&explain=true");
    assert_eq!(status, 200, "{explained}");
    assert_eq!(rec_ids(&explained), rec_ids(&plain), "explaining does not change the list");
    let e = &explained["explain"];
    assert_eq!(e["candidates"]["ranknet"], 5, "{e}");
    assert!(e["candidates"]["lightgcn"].as_u64().unwrap() >= e["candidates"]["din"].as_u64().unwrap());
    for step in ["redis_read", "lightgcn", "din", "ranknet", "redis_write"] {
        assert!(e["stage_ms"][step].as_f64().is_some_and(|ms| ms >= 0.0), "{step}: {e}");
    }
    let din_candidates = e["candidates"]["din"].as_u64().unwrap();
    let lightgcn_candidates = e["candidates"]["lightgcn"].as_u64().unwrap();
    for (i, item) in explained["recommendations"].as_array().unwrap().iter().enumerate() {
        let st = &item["stages"];
        assert_eq!(st["ranknet"]["rank"], i + 1, "{item}");
        assert_eq!(st["ranknet"]["score"], item["score"], "{item}");
        let din_rank = st["din"]["rank"].as_u64().unwrap();
        let lightgcn_rank = st["lightgcn"]["rank"].as_u64().unwrap();
        assert!((1..=din_candidates).contains(&din_rank) && (1..=lightgcn_candidates).contains(&lightgcn_rank));
    }
    // the LightGCN-only ablation: the ranks are LightGCN's own order
    let (_, lgcn) = {
        let (redis2, server2) = setup(&[("LAST_STAGE", "lightgcn")]);
        redis2.set("user_profile:curious", &profile_of(&[2, 8, 14, 20]));
        server2.post("/recommend/curious?k=4&explain=true")
    };
    for (i, item) in lgcn["recommendations"].as_array().unwrap().iter().enumerate() {
        assert_eq!(item["stages"]["lightgcn"]["rank"], i + 1, "{item}");
        assert!(item["stages"].get("din").is_none(), "{item}");
    }
    // GET with explain computes (the trace is not stored); a bad value is refused
    let (_, got) = server.get("/recommendations/curious?k=5&explain=true");
    assert_eq!(got["source"], "computed");
    assert!(got["recommendations"][0]["stages"]["din"]["rank"].as_u64().is_some());
    assert_error(&server.post("/recommend/curious?explain=maybe"), 400, "invalid_request");
}

#[test]
fn the_openapi_document_covers_every_route() {
    let (_redis, server) = setup(&[]);
    let (status, doc) = server.get("/openapi.json");
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/recommend/{user_id}", "post"),
        ("/recommendations/{user_id}", "get"),
        ("/recommend", "post"),
        ("/health", "get"),
        ("/health/ready", "get"),
        ("/health/live", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/admin/reload", "post"),
    ] {
        assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{method} {path} is not documented");
    }
    let errors = &doc["paths"]["/recommend/{user_id}"]["post"]["responses"];
    for code in ["200", "400", "401", "422", "429", "500", "503"] {
        assert!(errors.get(code).is_some(), "POST /recommend/{{user_id}} does not document {code}");
    }
}
