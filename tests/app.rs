//! The serve wiring in-process: `app::run(config, mode, listener, shutdown)` on a listener the
//! test binds, with a real redis-server and the test models, stopped by the future it was given.

#![recursion_limit = "256"]

use std::time::Duration;

use clap::Parser;
use model_service::app::{self, Mode};
use model_service::config::Cli;
use testkit::{item, rec_ids, test_models, Redis};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_serves_a_recommendation_in_process_and_stops_when_its_shutdown_future_completes() {
    let redis = Redis::start();
    let port = redis.port.to_string();
    let models = test_models().to_str().unwrap().to_string();
    let args = ["model-service", "--redis-host", "127.0.0.1", "--redis-port", &port, "--model-dir", &models];
    let more = ["--device", "cpu", "--torch-threads", "1", "--shutdown-grace-secs", "5", "serve"];
    let cli = Cli::try_parse_from(args.iter().chain(&more)).expect("arguments parse");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // run's future is driven by this task, beside the client's steps (it is not Send: axum's
    // serve loop borrows across awaits)
    let server = app::run(cli.config, Mode::Api { listen: false, ingest: false }, listener, async {
        let _ = stopped.await;
    });

    let http = reqwest::Client::new();
    let client = async {
        let ready = async {
            loop {
                if let Ok(r) = http.get(format!("{base}/health/ready")).send().await {
                    if r.status() == 200 {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), ready).await.expect("ready within 60 s");

        redis.set("user_profile:in-process", &serde_json::json!([item(0), item(1)]).to_string());
        let answer = http.post(format!("{base}/recommend/in-process?k=5")).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        let body: serde_json::Value = answer.json().await.unwrap();
        let ids = rec_ids(&body);
        assert_eq!(ids.len(), 5, "{body}");
        assert!(!ids.contains(&item(0)) && !ids.contains(&item(1)), "the profile's items were recommended: {ids:?}");
        let stored: Vec<String> =
            serde_json::from_str(&redis.get("recommendations:in-process").expect("a stored list")).unwrap();
        assert_eq!(stored[..5], ids[..], "the stored list is not the answer");

        stop.send(()).unwrap();
    };
    let both = async { tokio::join!(server, client).0 };
    let served =
        tokio::time::timeout(Duration::from_secs(120), both).await.expect("run ends after its shutdown future");
    served.expect("run returns Ok on shutdown");
    assert!(http.get(format!("{base}/health/live")).send().await.is_err(), "still listening after run returned");
}
