//! Compiled stages (STAGE_RUNTIME): DIN and RankNet as AOTInductor packages made by
//! `model_service_py.compile_stages` give the lists the TorchScript files give; `/health` and
//! `check` say which runs; a directory with TorchScript files only is served as before, or refused
//! when the compiled form is required. Real redis-server, the real binary, real TorchScript models
//! and packages compiled here.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use testkit::*;

/// A copy of the test models with their DIN and RankNet compiled for one thread.
fn compiled_models(name: &str) -> PathBuf {
    let dir = make_models(name, &[]);
    let python = std::env::var("MODEL_SERVICE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args(["-m", "model_service_py.compile_stages", "--model-dir"])
        .arg(&dir)
        .args(["--threads", "1"])
        .env("PYTHONPATH", Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts"))
        .output()
        .unwrap();
    assert!(out.status.success(), "compile_stages: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// A healthy server on a fresh compiled copy of the test models (`STAGE_RUNTIME=compiled`), with
/// its Redis.
fn compiled_server(name: &str, env: &[(&str, &str)]) -> (Redis, Server) {
    let dir = compiled_models(name);
    let redis = Redis::start();
    let env: Vec<(&str, &str)> = env.iter().copied().chain([("STAGE_RUNTIME", "compiled")]).collect();
    let server = Server::start_with(redis.port, &dir, &env);
    server.wait_healthy();
    (redis, server)
}

fn runtime(server: &Server) -> String {
    let (status, health) = server.get("/health");
    assert_eq!(status, 200, "{health}");
    health["sets"][0]["runtime"].as_str().unwrap().to_string()
}

/// Anonymous histories of 1 to 60 items (the batches mix lengths when requests overlap).
fn histories() -> Vec<Vec<String>> {
    (0..160).map(|u| (0..1 + (u * 7) % 60).map(|j| item((u * 31 + j * 17) % 300)).collect()).collect()
}

fn ask(port: u16, history: &[String]) -> Vec<String> {
    ask_with(port, history, "")
}

/// `ask` with a bearer token (none when empty).
fn ask_with(port: u16, history: &[String], token: &str) -> Vec<String> {
    let mut request = reqwest::blocking::Client::new().post(format!("http://127.0.0.1:{port}/recommend"));
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    let r = request.json(&json!({"history": history, "k": 10})).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    rec_ids(&r.json().unwrap())
}

#[test]
fn the_compiled_stages_give_the_torchscript_lists_alone_and_in_batches() {
    let dir = compiled_models("compiled-stages");
    let redis = Redis::start();
    let compiled = Server::start_with(redis.port, &dir, &[("STAGE_RUNTIME", "compiled"), ("MAX_BATCH", "8")]);
    let scripted = Server::start_with(redis.port, &dir, &[("STAGE_RUNTIME", "torchscript")]);
    compiled.wait_healthy();
    scripted.wait_healthy();
    assert_eq!(runtime(&compiled), "lightgcn=torchscript din=compiled ranknet=compiled");
    assert_eq!(runtime(&scripted), "lightgcn=torchscript din=torchscript ranknet=torchscript");

    let histories = histories();
    let expected: Vec<Vec<String>> = histories.iter().map(|h| ask(scripted.port, h)).collect();
    // one at a time (batches of one), then eight clients at once (batches of mixed lengths)
    let alone: Vec<Vec<String>> = histories.iter().map(|h| ask(compiled.port, h)).collect();
    let together: Vec<Vec<String>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|c| {
                let (histories, port) = (&histories, compiled.port);
                s.spawn(move || {
                    histories
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % 8 == c)
                        .map(|(i, h)| (i, ask(port, h)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, Vec<String>)> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
        all.sort();
        all.into_iter().map(|(_, l)| l).collect()
    });
    let same = |got: &[Vec<String>]| got.iter().zip(&expected).filter(|(a, b)| a == b).count();
    assert_eq!(same(&alone), histories.len(), "lone requests: compiled lists differ from TorchScript's");
    assert_eq!(same(&together), histories.len(), "batched requests: compiled lists differ from TorchScript's");
    let batched = compiled.metric("model_service_inference_batch_size_count");
    let requests = compiled.metric("model_service_inference_batch_size_sum");
    assert!(requests > batched, "no batch held more than one request ({requests} requests in {batched} batches)");
}

#[test]
fn a_directory_without_matching_packages_is_served_by_torchscript_or_refused_when_compiled_is_required() {
    let redis = Redis::start();
    // TorchScript files only: auto serves them as before
    let plain = Server::start_with(redis.port, test_models(), &[]);
    plain.wait_healthy();
    assert_eq!(runtime(&plain), "lightgcn=torchscript din=torchscript ranknet=torchscript");
    let refused = run_cli(redis.port, test_models(), &["check", "--stage-runtime", "compiled"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("STAGE_RUNTIME=compiled") && why.contains("model.pt2.json"), "{why}");

    // packages compiled for one thread, workers of two: not used (auto), refused (compiled)
    let dir = compiled_models("compiled-threads");
    let two = Server::start_with(redis.port, &dir, &[("TORCH_THREADS", "2")]);
    two.wait_healthy();
    assert_eq!(runtime(&two), "lightgcn=torchscript din=torchscript ranknet=torchscript");
    let mut cmd = bin();
    base_env(&mut cmd, redis.port, &dir);
    let out = cmd.env("TORCH_THREADS", "2").args(["check", "--stage-runtime", "compiled"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("compiled for 1 libtorch threads"));

    // a package of the first compile_stages (RankNet then took a padded batch; its .json names no
    // inputs) is never called with today's inputs
    let meta_file = dir.join("ranknet/model.pt2.json");
    let meta = std::fs::read_to_string(&meta_file).unwrap();
    let mut older: serde_json::Value = serde_json::from_str(&meta).unwrap();
    older.as_object_mut().unwrap().remove("inputs");
    std::fs::write(&meta_file, older.to_string()).unwrap();
    let out = run_cli(redis.port, &dir, &["check", "--stage-runtime", "compiled"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("older compile_stages"), "{out:?}");
    let old_package = Server::start_with(redis.port, &dir, &[]);
    old_package.wait_healthy();
    assert!(runtime(&old_package).ends_with("din=compiled ranknet=torchscript"), "{}", runtime(&old_package));
    std::fs::write(&meta_file, meta).unwrap();

    // a package made from another model.pt is never used
    let other = make_models("compiled-other", &["--seed", "5"]);
    std::fs::copy(other.join("ranknet/model.pt"), dir.join("ranknet/model.pt")).unwrap();
    let swapped = Server::start_with(redis.port, &dir, &[]);
    swapped.wait_healthy();
    assert!(runtime(&swapped).ends_with("ranknet=torchscript"), "{}", runtime(&swapped));
}

#[test]
fn reloads_of_a_compiled_set_keep_the_server_serving() {
    // Every reload makes two copies of the packages in parallel and frees the old set's: made from
    // several threads at once, libtorch's package loaders corrupted the heap within a few dozen
    // reloads (the server aborted with "double free or corruption").
    let (_redis, server) = compiled_server("compiled-reloads", &[("API_TOKEN", "reloads")]);
    let history: Vec<String> = (0..12).map(|j| item(j * 5)).collect();
    let before = ask_with(server.port, &history, "reloads");
    for n in 0..60 {
        let (status, body) = server.post_json(server.port, "/admin/reload", &json!(null), Some("reloads"));
        assert_eq!(status, 200, "reload {n}: {body}");
    }
    assert_eq!(ask_with(server.port, &history, "reloads"), before);
    assert_eq!(runtime(&server), "lightgcn=torchscript din=compiled ranknet=compiled");
}

#[test]
fn a_running_server_keeps_no_unpacked_package_on_disk() {
    // libtorch unpacks every package it loads into a directory of its own under /tmp and removes it
    // only in the loader's destructor, which a killed or crashed server never runs: each start left
    // 6.7 MB per package and copy behind. On the CPU the server removes it once the package is
    // loaded, so the libraries it runs from are already deleted files.
    let (_redis, server) = compiled_server("compiled-unpacked", &[("INFERENCE_WORKERS", "2")]);
    let history: Vec<String> = (0..8).map(|j| item(j * 3)).collect();
    assert_eq!(ask(server.port, &history).len(), 10, "the packages serve after their files are gone");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", server.pid())).unwrap();
    let libraries: Vec<&str> = maps.lines().filter(|l| l.contains(".wrapper.so")).collect();
    assert!(!libraries.is_empty(), "no package library is mapped:\n{maps}");
    let on_disk: Vec<&&str> = libraries.iter().filter(|l| !l.ends_with("(deleted)")).collect();
    assert!(on_disk.is_empty(), "still on disk: {on_disk:#?}");
}
