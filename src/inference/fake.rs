//! A fake `Ranker` for unit tests of the engine and of what sits on it: no model files, no
//! libtorch. The directory's last component names the set (`v1`, `v2`, ...); its answer for a
//! history `[h, ..]` is the rows `[tag, h]`, where `tag` is the set's number, so a test can tell
//! which set served a request. Some histories misbehave on purpose (see the constants).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::engine::{EngineConfig, Loader, Ranker};
use super::error::LoadError;
use super::exclusion::Excluded;
use super::ivf::{CandidateSearch, SearchSpec};
use super::models::{Budget, ModelInfo, Ranked, Stage, StageStats};

/// A history starting with this takes `SLOW_MS` to rank.
pub const SLOW: i64 = 500;
pub const SLOW_MS: u64 = 300;
/// A history starting with this fails its batch with an error.
pub const FAIL: i64 = 900;
/// A history starting with this panics on the worker.
pub const PANIC: i64 = 666;

/// What the fakes of one test saw, shared with the test.
#[derive(Default)]
pub struct Seen {
    /// The size of every batch ranked, in order.
    pub batches: Mutex<Vec<usize>>,
    /// Histories ranked, all sets together.
    pub ranked: AtomicUsize,
    /// Copies of sets dropped (freed).
    pub dropped: AtomicUsize,
}

pub struct Fake {
    info: ModelInfo,
    dir: PathBuf,
    tag: i64,
    seen: Arc<Seen>,
    /// How long dropping this copy takes (`heavy-` sets), as freeing real models does.
    drop_delay: Duration,
}

impl Drop for Fake {
    fn drop(&mut self) {
        std::thread::sleep(self.drop_delay);
        self.seen.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

impl Ranker for Fake {
    fn rank(
        &self,
        _worker: usize,
        histories: &[&[i64]],
        _excludes: &[Excluded<'_>],
        budget: Budget,
    ) -> Result<(Vec<Ranked>, StageStats), String> {
        self.seen.batches.lock().unwrap().push(histories.len());
        self.seen.ranked.fetch_add(histories.len(), Ordering::SeqCst);
        let first = |h: &[i64]| h.first().copied().unwrap_or(0);
        if histories.iter().any(|h| first(h) == SLOW) {
            std::thread::sleep(Duration::from_millis(SLOW_MS));
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
        if histories.iter().any(|h| first(h) == FAIL) {
            return Err("the fake failed this batch".into());
        }
        if histories.iter().any(|h| first(h) == PANIC) {
            panic!("the fake panicked");
        }
        let ranked = histories
            .iter()
            .map(|h| {
                let rows: Vec<i64> = [self.tag, first(h)].into_iter().take(budget.k).collect();
                Ranked { scores: vec![1.0; rows.len()], rows, trace: None }
            })
            .collect();
        let stats = StageStats {
            lightgcn: Some(Duration::ZERO),
            din: None,
            ranknet: None,
            lightgcn_candidates: 2,
            din_candidates: 0,
        };
        Ok((ranked, stats))
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Loads `vN` as the set tagged N; `broken` fails; `slow-vN` takes 400 ms, then is `vN`;
/// `heavy-vN` is `vN` whose copies take 300 ms each to drop.
pub fn loader(seen: Arc<Seen>) -> Loader<Fake> {
    Arc::new(move |dir: &Path, _copies| {
        let mut name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let mut drop_delay = Duration::ZERO;
        if let Some(rest) = name.strip_prefix("heavy-") {
            drop_delay = Duration::from_millis(300);
            name = rest.to_string();
        }
        if let Some(rest) = name.strip_prefix("slow-") {
            std::thread::sleep(Duration::from_millis(400));
            name = rest.to_string();
        }
        let tag = name.strip_prefix('v').and_then(|n| n.parse().ok()).ok_or_else(|| LoadError::Model {
            dir: dir.display().to_string(),
            reason: "not a fake model set".into(),
        })?;
        let info = ModelInfo {
            version: name.clone(),
            content_sha: format!("sha-{name}"),
            stages: Vec::new(),
            num_items: 100,
            device: "cpu".into(),
            candidate_search: "exact".into(),
        };
        Ok(Fake { info, dir: dir.to_path_buf(), tag, seen: seen.clone(), drop_delay })
    })
}

/// Engine settings for the fakes: one worker, batches of up to 4, a 1 s deadline.
pub fn config(model_dir: &str) -> EngineConfig {
    EngineConfig {
        model_dir: model_dir.into(),
        experiment_file: None,
        device: super::device::DeviceChoice::Cpu,
        workers: 1,
        torch_threads: 1,
        max_batch: 4,
        max_queue_delay: Duration::ZERO,
        queue_capacity: 64,
        shadow_queue_capacity: 8,
        shadow_cpu_share: 1.0,
        deadline: Duration::from_secs(1),
        lightgcn_candidates: 10,
        din_candidates: 10,
        search: SearchSpec { mode: CandidateSearch::Exact, min_items: 0, lists: 0, probes: 0 },
        last_stage: Stage::Ranknet,
        reload_timeout: Duration::from_secs(5),
        max_file_bytes: 1 << 20,
        stage_runtime: super::compiled::StageRuntime::Torchscript,
    }
}
