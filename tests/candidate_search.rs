//! The approximate candidate search (CANDIDATE_SEARCH=ivf) against the exact one, on the real
//! binary, a real redis-server and the TorchScript test models: probing every list gives the exact
//! lists, probing one still fills every list, /health names the search in service; SIGTERM during
//! the first load (here the index's k-means) does not wait for it.

use std::collections::HashSet;

use testkit::*;

fn profile(n: usize) -> Vec<String> {
    (0..3 + n % 5).map(|j| item((n * 13 + j * 29) % 300)).collect()
}

fn lists(server: &Server, users: usize) -> Vec<Vec<String>> {
    (0..users)
        .map(|n| {
            let (status, body) = server.post(&format!("/recommend/u{n}?k=10"));
            assert_eq!(status, 200, "{body}");
            rec_ids(&body)
        })
        .collect()
}

fn start(redis: &Redis, env: &[(&str, &str)]) -> Server {
    let server = Server::start_with(redis.port, test_models(), env);
    server.wait_healthy();
    server
}

#[test]
fn ivf_probing_every_list_gives_the_exact_lists_and_health_names_the_search() {
    let redis = Redis::start();
    for n in 0..40 {
        redis.set(&format!("user_profile:u{n}"), &serde_json::to_string(&profile(n)).unwrap());
    }
    let exact = start(&redis, &[("CANDIDATE_SEARCH", "exact")]);
    assert_eq!(exact.get("/health").1["candidate_search"], "exact");
    let want = lists(&exact, 40);
    drop(exact);
    let ivf = start(&redis, &[("CANDIDATE_SEARCH", "ivf"), ("IVF_LISTS", "8"), ("IVF_PROBES", "8")]);
    assert_eq!(ivf.get("/health").1["candidate_search"], "ivf lists=8 probes=8");
    assert_eq!(lists(&ivf, 40), want);
    // auto below IVF_MIN_ITEMS searches exactly; at or above it, through the index
    drop(ivf);
    let auto = start(&redis, &[("CANDIDATE_SEARCH", "auto"), ("IVF_MIN_ITEMS", "301")]);
    assert_eq!(auto.get("/health").1["candidate_search"], "exact");
    drop(auto);
    let auto = start(
        &redis,
        &[("CANDIDATE_SEARCH", "auto"), ("IVF_MIN_ITEMS", "300"), ("IVF_LISTS", "8"), ("IVF_PROBES", "8")],
    );
    assert_eq!(auto.get("/health").1["candidate_search"], "ivf lists=8 probes=8");
}

#[test]
fn ivf_probing_one_list_still_returns_full_lists_without_history_items() {
    let redis = Redis::start();
    for n in 0..40 {
        redis.set(&format!("user_profile:u{n}"), &serde_json::to_string(&profile(n)).unwrap());
    }
    // 16 lists of ~19 items and one probe: too few for 40 candidates, so more lists are scanned
    let server = start(
        &redis,
        &[
            ("CANDIDATE_SEARCH", "ivf"),
            ("IVF_LISTS", "16"),
            ("IVF_PROBES", "1"),
            ("LIGHTGCN_CANDIDATES", "40"),
            ("DIN_CANDIDATES", "20"),
            ("MAX_K", "20"),
        ],
    );
    for (n, list) in lists(&server, 40).into_iter().enumerate() {
        let history: HashSet<String> = profile(n).into_iter().collect();
        let distinct: HashSet<&String> = list.iter().collect();
        assert_eq!(list.len(), 10, "u{n}: {list:?}");
        assert_eq!(distinct.len(), 10, "u{n}: {list:?}");
        assert!(list.iter().all(|i| !history.contains(i)), "u{n}: a history item came back: {list:?}");
        let stored: Vec<String> =
            serde_json::from_str(&redis.get(&format!("recommendations:u{n}")).expect("written")).unwrap();
        assert_eq!(stored, list, "u{n}: Redis holds the list the response gave");
    }
}

#[test]
fn sigterm_while_the_first_model_set_loads_stops_the_server_without_waiting_for_the_load() {
    // the shipped catalog (24,915 items) in as many IVF lists: its k-means takes many seconds
    let redis = Redis::start();
    let env = [("CANDIDATE_SEARCH", "ivf"), ("IVF_LISTS", "24915"), ("RUST_LOG", "info")];
    let mut server = Server::start_logged(redis.port, &shipped_models(), &env);
    let (status, body) = server.get("/health");
    assert_eq!((status, &body["model_loaded"]), (503, &serde_json::json!(false)), "still loading: {body}");
    server.sigterm();
    let (exit, log) = server.exit_and_log();
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(log.contains("shutdown signal received"), "{log}");
    assert!(!log.contains("IVF candidate index built"), "the server finished the load before it stopped:\n{log}");
}
