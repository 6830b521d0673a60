//! Deployment artifacts that a test can check here: the Grafana dashboard and the alert rules
//! reference only metric names the server exports (with every metric family populated), and the
//! committed manifests and results name no path of the machine that produced them.

use std::collections::BTreeSet;
use std::time::Duration;

use testkit::*;

/// Every `model_service_*` identifier in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("model_service_") {
        let name: String =
            rest[i..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

/// Names present in a Prometheus exposition (histograms also as _bucket, _sum and _count).
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap().to_string(), parts.next().unwrap());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{name}{suffix}"));
            }
        }
        out.insert(name);
    }
    out
}

fn populated_metrics() -> String {
    let redis = Redis::start();
    let server = Server::start_mode(redis.port, test_models(), &["serve", "--listen"], &[]);
    server.wait_healthy();
    redis.set("user_profile:d", &format!(r#"["{}"]"#, item(3)));
    assert_eq!(server.post("/recommend/d").0, 200);
    assert_eq!(server.post("/recommend/cold").0, 200);
    redis.cmd(&["XADD", "recommend_requests", "*", "user_id", "d2"]);
    wait_until(Duration::from_secs(30), || redis.get("recommendations:d2").is_some());
    redis.set("user_profile:d3", &format!(r#"["{}"]"#, item(4)));
    wait_until(Duration::from_secs(30), || redis.get("recommendations:d3").is_some());
    std::thread::sleep(Duration::from_millis(300));
    server.get_text("/metrics").1
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let exported = exported(&populated_metrics());
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/model-service.json")).unwrap();
    let alerts = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/alerts.yml")).unwrap();
    for (what, text) in [("dashboard", &dashboard), ("alerts.yml", &alerts)] {
        let used = metric_names(text);
        assert!(used.len() >= 5, "{what} uses {used:?}");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{what} references metrics the server does not export: {missing:?}\nexported: {exported:?}"
        );
    }
}

#[test]
fn dashboard_has_the_shape_grafana_imports() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/model-service.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["uid"], "model-service");
    assert!(d["title"].is_string());
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        assert!(["timeseries", "table", "stat"].contains(&p["type"].as_str().unwrap()));
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "{}: gridPos.{k}", p["title"]);
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty());
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| e.contains("model_service_")), "{}", p["title"]);
        }
    }
    let titles: Vec<&str> = panels.iter().map(|p| p["title"].as_str().unwrap()).collect();
    for want in [
        "Request rate by status",
        "Stage latency p99",
        "Inference batch size (mean)",
        "Inference queue",
        "Listener lag p99",
    ] {
        assert!(titles.contains(&want), "missing panel {want}");
    }
}

#[test]
fn committed_manifests_and_results_carry_no_machine_paths() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for dir in ["model_output", "bench/results"] {
        for entry in std::fs::read_dir(repo.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).unwrap();
                for marker in ["/work/", "/tmp/", "/root/", "/home/", "/shared/data"] {
                    assert!(!text.contains(marker), "{} names a machine path ({marker})", path.display());
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 2, "model_output/manifest.json and bench/results/*.json are checked");
}
