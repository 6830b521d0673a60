//! The `recommend` and `check` subcommands.

use testkit::*;

#[test]
fn recommend_command_prints_the_response_and_writes_redis() {
    let redis = Redis::start();
    redis.set("user_profile:A3RTKL9KB8KLID", r#"["0553092626","0393316041"]"#);
    let out = run_cli(redis.port, test_models(), &["recommend", "A3RTKL9KB8KLID", "--k", "7"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["strategy"], "personalized");
    let ids = rec_ids(&body);
    assert_eq!(ids.len(), 7);
    let stored: Vec<String> = serde_json::from_str(&redis.get("recommendations:A3RTKL9KB8KLID").unwrap()).unwrap();
    assert_eq!(stored, ids);
}

#[test]
fn recommend_command_reports_errors_as_json_and_exits_nonzero() {
    let redis = Redis::start();
    redis.set("user_profile:bad", "[1]");
    let out = run_cli(redis.port, test_models(), &["recommend", "bad"]);
    assert!(!out.status.success());
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["error"], "invalid_profile");
    assert!(redis.get("recommendations:bad").is_none());
}

#[test]
fn check_summarises_a_valid_model_dir() {
    let out = run_cli(1, test_models(), &["check"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["catalog_items"], 300);
    assert_eq!(body["device"], "cpu");
    let stages: Vec<&str> = body["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["lightgcn", "din", "ranknet"]);
    assert_eq!(body["stages"][0]["dim"], 16);
}

#[test]
fn check_fails_clearly_on_missing_or_broken_models() {
    let missing = run_cli(1, std::path::Path::new("/nonexistent/models"), &["check"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("catalog"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    let broken = copy_models("broken");
    std::fs::write(broken.join("din/model.pt"), b"not a torchscript file").unwrap();
    let out = run_cli(1, &broken, &["check"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("din/model.pt") && err.contains("not a loadable TorchScript file"), "{err}");

    let gone = copy_models("gone");
    std::fs::remove_file(gone.join("ranknet/model.pt")).unwrap();
    let err = String::from_utf8_lossy(&run_cli(1, &gone, &["check"]).stderr).to_string();
    assert!(err.contains("ranknet/model.pt is missing"), "{err}");

    let short = copy_models("short");
    let catalog = std::fs::read_to_string(short.join("catalog.tsv")).unwrap();
    let fewer: String = catalog.lines().take(299).map(|l| format!("{l}\n")).collect();
    std::fs::write(short.join("catalog.tsv"), fewer).unwrap();
    let err = String::from_utf8_lossy(&run_cli(1, &short, &["check"]).stderr).to_string();
    assert!(err.contains("300 items but catalog.tsv has 299"), "{err}");
}

#[test]
fn serve_exits_nonzero_when_the_models_cannot_load() {
    let broken = copy_models("serve-broken");
    std::fs::write(broken.join("lightgcn/model.pt"), b"junk").unwrap();
    let mut server = Server::start_with(1, &broken, &[]);
    wait_until(std::time::Duration::from_secs(30), || server.exited().is_some());
    assert!(!server.exited().unwrap().success());
}

/// Without a CUDA device, DEVICE=cuda refuses to start and names the way out, and DEVICE=auto
/// falls back to the CPU. `CUDA_VISIBLE_DEVICES=""` hides every GPU from libtorch, so this holds on
/// a GPU machine too (with a CPU-only libtorch there is none to hide).
#[test]
fn explicit_cuda_without_a_gpu_fails_at_start() {
    let no_gpu = |device: &str| {
        let mut cmd = bin();
        base_env(&mut cmd, 1, test_models());
        cmd.env("CUDA_VISIBLE_DEVICES", "").env("DEVICE", device).arg("check").output().unwrap()
    };
    let out = no_gpu("cuda");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEVICE=cuda:0") && err.contains("DEVICE=cpu"), "{err}");

    let out = no_gpu("auto");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["device"], "cpu");
}

#[test]
fn json_logs_carry_the_request_id() {
    let redis = Redis::start();
    let log = test_models().with_file_name(format!("json-log-{}.txt", std::process::id()));
    let port = free_port();
    let mut cmd = bin();
    base_env(&mut cmd, redis.port, test_models());
    let mut child = cmd
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "model_service=debug")
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .arg("serve")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let client = reqwest::blocking::Client::new();
    let url = format!("http://127.0.0.1:{port}/health");
    wait_until(std::time::Duration::from_secs(60), || {
        client.get(&url).send().map(|r| r.status().as_u16() == 200).unwrap_or(false)
    });
    client.get(&url).header("x-request-id", "trace-me-42").send().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert!(
        lines.iter().any(|l| l["span"]["request_id"] == "trace-me-42" && l["status"] == 200),
        "no log line with the request id:\n{text}"
    );
}

#[test]
fn the_binary_finds_libtorch_by_rpath_and_keeps_torch_cuda_linked() {
    let out = bin().env_remove("LD_LIBRARY_PATH").arg("--version").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let elf = std::process::Command::new("readelf").arg("-d").arg(bin_path()).output().unwrap();
    let text = String::from_utf8_lossy(&elf.stdout);
    let runpath = text
        .lines()
        .find_map(|l| l.split("runpath: [").nth(1).or_else(|| l.split("rpath: [").nth(1)))
        .and_then(|r| r.split(']').next())
        .unwrap_or_else(|| panic!("no RUNPATH/RPATH:\n{text}"));
    let lib = std::path::Path::new(runpath);
    assert!(lib.join("libtorch_cpu.so").exists(), "the rpath {runpath} holds no libtorch");
    if lib.join("libtorch_cuda.so").exists() {
        assert!(text.contains("[libtorch_cuda.so]"), "a CUDA libtorch must stay linked (--no-as-needed):\n{text}");
    }
}

/// The harness finds the binary at run time (testkit is a library, built without this package's
/// CARGO_BIN_EXE_model-service): it must be the one cargo built for these tests, or MODEL_SERVICE_BIN.
#[test]
fn the_harness_runs_the_binary_cargo_built() {
    let want = std::env::var_os("MODEL_SERVICE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_model-service").into());
    assert_eq!(bin_path(), want);
    assert!(want.is_file(), "{}", want.display());
}
