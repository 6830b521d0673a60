//! A model directory loaded and validated as one unit: its catalog, what is in it (version, dir,
//! device) and one copy of the models per inference worker. Requests hold the set they started
//! with, so a reload swaps catalog and models together and never mixes two versions.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use tch::Device;

use crate::catalog::Catalog;
use crate::error::ConfigError;
use crate::ivf::{CandidateSearch, IvfIndex, SearchSpec};
use crate::models::{Budget, ModelInfo, Models, Ranked, StageStats};

/// How to load a set: where, on what, how many copies, and the serving sizes to warm up at.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub device: Device,
    /// Copies of the models: one per inference worker.
    pub copies: usize,
    /// libtorch intra-op threads of each loading (and serving) thread.
    pub torch_threads: usize,
    pub warm_batch: usize,
    pub warm_budget: Budget,
    /// Largest file of the directory that is read (MAX_MODEL_FILE_BYTES).
    pub max_file_bytes: u64,
    /// Stage 1's candidate search (the IVF index is built once per set, shared by its copies).
    pub search: SearchSpec,
}

/// Opens a file of a model directory for reading, only if it is (after symlinks) a regular file
/// of at most `max_bytes`: a FIFO would hang the reader, a device such as /dev/zero would never
/// end. The type is checked before opening (opening a FIFO blocks) and again on the open file.
pub fn open_model_file(path: &Path, max_bytes: u64) -> Result<std::fs::File, String> {
    let check = |meta: std::fs::Metadata| {
        if !meta.is_file() {
            return Err(format!("{} is not a regular file ({:?})", path.display(), meta.file_type()));
        }
        if meta.len() > max_bytes {
            return Err(format!("{} is {} bytes, over MAX_MODEL_FILE_BYTES ({max_bytes})", path.display(), meta.len()));
        }
        Ok(())
    };
    check(std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?)?;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    check(file.metadata().map_err(|e| format!("{}: {e}", path.display()))?)?;
    Ok(file)
}

pub struct ModelSet {
    pub catalog: Catalog,
    pub info: ModelInfo,
    /// The directory the set was loaded from.
    pub dir: PathBuf,
    /// Worker `i` runs its batches on `copies[i]` (uncontended: the lock only makes the set Sync).
    copies: Vec<Mutex<Models>>,
}

impl ModelSet {
    /// Reads the catalog, loads `spec.copies` copies of the three stages (in parallel, each
    /// checked by a smoke batch) and warms each up at the serving sizes. Any failure refuses the
    /// whole directory.
    pub fn load(dir: &Path, spec: &LoadSpec) -> Result<Self, ConfigError> {
        let started = Instant::now();
        let catalog = Catalog::load(&dir.join("catalog.tsv"), spec.max_file_bytes)?;
        // What Models::load reads, checked the same way before libtorch opens it.
        let read_by_models = std::iter::once(dir.join("manifest.json"))
            .chain(crate::models::STAGES.iter().map(|stage| dir.join(stage).join("model.pt")));
        for file in read_by_models.filter(|f| f.exists()) {
            open_model_file(&file, spec.max_file_bytes)
                .map_err(|reason| ConfigError::Model { dir: dir.display().to_string(), reason })?;
        }
        let err = |reason: String| ConfigError::Model { dir: dir.display().to_string(), reason };
        let threads = spec.torch_threads.max(1);
        let mut copies = each_in_a_thread((0..spec.copies.max(1)).collect(), threads, |_| {
            Models::load(dir, spec.device, catalog.len())
        })?;
        if spec.search.uses_index(catalog.len()) {
            // one index per set, built on the models' device with every core, shared by the copies
            tch::set_num_threads(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as i32);
            match copies[0].item_table() {
                Ok(table) => {
                    let index = IvfIndex::build(&table, &spec.search).map_err(|e| {
                        err(format!("building the IVF index failed: {}", crate::models::torch_error(&e)))
                    })?;
                    for copy in &mut copies {
                        copy.use_index(index.shallow_clone());
                    }
                }
                Err(reason) if spec.search.mode == CandidateSearch::Auto => {
                    tracing::warn!(%reason, "CANDIDATE_SEARCH=auto: this model set is searched exactly");
                }
                Err(reason) => return Err(err(reason)),
            }
        }
        let copies = each_in_a_thread(copies, threads, |models| {
            warm_up(&models, spec).map_err(|reason| err(format!("warm-up failed: {reason}")))?;
            Ok(models)
        })?;
        let copies: Vec<Mutex<Models>> = copies.into_iter().map(Mutex::new).collect();
        let info = copies[0].lock().unwrap_or_else(|e| e.into_inner()).info.clone();
        tracing::info!(
            version = %info.version, dir = %dir.display(), copies = copies.len(),
            ms = started.elapsed().as_millis() as u64, "model directory loaded and warmed up"
        );
        Ok(Self { catalog, info, dir: dir.to_path_buf(), copies })
    }

    /// Runs a batch on worker `worker`'s copy.
    pub fn rank(
        &self,
        worker: usize,
        histories: &[&[i64]],
        excludes: &[&[i64]],
        budget: Budget,
    ) -> Result<(Vec<Ranked>, StageStats), tch::TchError> {
        let copy = &self.copies[worker % self.copies.len()];
        copy.lock().unwrap_or_else(|e| e.into_inner()).rank(histories, excludes, budget)
    }
}

/// Runs `f` on each of `inputs` in a thread of its own (with `threads` libtorch intra-op threads,
/// as the workers use), in parallel; the first failure fails the whole.
fn each_in_a_thread<T: Send>(
    inputs: Vec<T>,
    threads: usize,
    f: impl Fn(T) -> Result<Models, ConfigError> + Sync,
) -> Result<Vec<Models>, ConfigError> {
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = inputs
            .into_iter()
            .map(|input| {
                scope.spawn(move || {
                    tch::set_num_threads(threads as i32);
                    f(input)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(ConfigError::Load("a model loading thread panicked".into()))))
            .collect()
    })
}

/// TorchScript's first calls are slow (profiling executor): run the cascade at the serving sizes
/// (batches of growing history length) before the copy takes traffic.
fn warm_up(models: &Models, spec: &LoadSpec) -> Result<(), String> {
    let n = models.info.num_items as i64;
    let warm: Vec<Vec<i64>> =
        (0..spec.warm_batch.clamp(1, 8) as i64).map(|i| (0..(1 + i * 3).min(n)).collect()).collect();
    let refs: Vec<&[i64]> = warm.iter().map(|h| h.as_slice()).collect();
    for _ in 0..3 {
        models.rank(&refs, &refs, spec.warm_budget).map_err(|e| crate::models::torch_error(&e))?;
    }
    Ok(())
}
