//! A model directory loaded and validated as one unit: its catalog, what is in it (version, dir,
//! device) and one copy of the models per inference worker. Requests hold the set they started
//! with, so a reload swaps catalog and models together and never mixes two versions.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use tch::Device;

use super::compiled::RuntimeSpec;
use super::error::LoadError;
use super::exclusion::Excluded;
use crate::inference::catalog::Catalog;
use crate::inference::ivf::{CandidateSearch, IvfIndex, SearchSpec};
use crate::inference::models::{Budget, ModelInfo, Models, Ranked, StageStats};

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
    /// TorchScript or the compiled packages (STAGE_RUNTIME).
    pub runtime: RuntimeSpec,
}

/// Opens a file of a model directory for reading, only if it is (after symlinks) a regular file
/// of 1 to `max_bytes` bytes: a FIFO would hang the reader, a device such as /dev/zero would never
/// end, and a procfs or sysfs file (`/proc/self/pagemap`) says it is regular and empty but reads
/// without end. The type is checked before opening (opening a FIFO blocks) and again on the open
/// file. Read it through `read_model_file` (or `take(len)`): never past the size checked here.
pub fn open_model_file(path: &Path, max_bytes: u64) -> Result<(std::fs::File, u64), String> {
    let check = |meta: std::fs::Metadata| {
        if !meta.is_file() {
            return Err(format!("{} is not a regular file ({:?})", path.display(), meta.file_type()));
        }
        if meta.len() == 0 {
            return Err(format!(
                "{} is empty (or a special file, such as one under /proc, that reports no size)",
                path.display()
            ));
        }
        if meta.len() > max_bytes {
            return Err(format!("{} is {} bytes, over MAX_MODEL_FILE_BYTES ({max_bytes})", path.display(), meta.len()));
        }
        Ok(meta.len())
    };
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{} is missing", path.display()),
        _ => format!("{}: {e}", path.display()),
    })?;
    check(meta)?;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = check(file.metadata().map_err(|e| format!("{}: {e}", path.display()))?)?;
    Ok((file, len))
}

/// The whole of a model-directory file, read through `open_model_file`: at most the size it had
/// when opened (a file that grows meanwhile is refused).
pub fn read_model_file(path: &Path, max_bytes: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let (file, len) = open_model_file(path, max_bytes)?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len + 1).read_to_end(&mut bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 != len {
        return Err(format!("{} changed size while being read ({len} -> {} bytes)", path.display(), bytes.len()));
    }
    Ok(bytes)
}

/// What a set serves, by content: SHA-1 over each file's name and bytes (the catalog and
/// manifest as already read, then the three stages, streamed), 12 hex digits. Two directories with
/// one `version` but another catalog or model have different hashes, so the cache never takes
/// one's lists for the other's. Also checks, before libtorch reads anything, that every stage file
/// is a regular file within MAX_MODEL_FILE_BYTES and that the set fits in memory.
fn content_sha(dir: &Path, catalog: &[u8], manifest: &[u8], spec: &LoadSpec) -> Result<String, String> {
    use sha1::{Digest, Sha1};
    use std::io::Read;
    let mut hasher = Sha1::new();
    for (name, bytes) in [("catalog.tsv", catalog), ("manifest.json", manifest)] {
        hasher.update(name.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let mut models_bytes = 0u64;
    for stage in crate::inference::models::STAGES {
        let path = dir.join(stage).join("model.pt");
        let (file, len) = open_model_file(&path, spec.max_file_bytes)?;
        hasher.update(path.strip_prefix(dir).unwrap_or(&path).to_string_lossy().as_bytes());
        hasher.update(len.to_le_bytes());
        let read = std::io::copy(&mut file.take(len), &mut HashWriter(&mut hasher))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if read != len {
            return Err(format!("{} changed size while being read ({len} -> {read} bytes)", path.display()));
        }
        models_bytes += len;
    }
    // Each copy holds the three stages; the catalog is held once (and parsed into about three
    // times its size). A set that cannot fit is refused before it is loaded beside the one in
    // service (which keeps serving).
    let catalog_bytes = (catalog.len() + manifest.len()) as u64;
    let needed = models_bytes.saturating_mul(spec.copies.max(1) as u64).saturating_add(catalog_bytes.saturating_mul(4));
    if let Some(available) = available_memory() {
        if needed > available {
            return Err(format!(
                "the set needs about {needed} bytes of memory ({} copies of {models_bytes} bytes of models, and the \
                 catalog), but only {available} are available",
                spec.copies.max(1)
            ));
        }
    }
    Ok(format!("{:x}", hasher.finalize())[..12].to_string())
}

struct HashWriter<'a>(&'a mut sha1::Sha1);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sha1::Digest::update(self.0, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Memory this process may still take: the smaller of the machine's MemAvailable and the room
/// left under a cgroup v2 limit (a container's). `None` when neither can be read.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    let read = |name: &str| std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(name)).ok();
    let cgroup = read("memory.max")
        .and_then(|max| max.trim().parse::<u64>().ok())
        .map(|max| max.saturating_sub(read("memory.current").and_then(|c| c.trim().parse().ok()).unwrap_or(0)));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
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
    pub fn load(dir: &Path, spec: &LoadSpec) -> Result<Self, LoadError> {
        let started = Instant::now();
        let err = |reason: String| LoadError::Model { dir: dir.display().to_string(), reason };
        // Each file is read once: the catalog and the manifest here, the stages by the hash and
        // then by libtorch.
        let catalog_path = dir.join("catalog.tsv");
        let catalog_bytes = read_model_file(&catalog_path, spec.max_file_bytes).map_err(err)?;
        let manifest = read_model_file(&dir.join("manifest.json"), spec.max_file_bytes).map_err(err)?;
        let sha = content_sha(dir, &catalog_bytes, &manifest, spec).map_err(err)?;
        let catalog = Catalog::parse(&catalog_path, catalog_bytes)?;
        let threads = spec.torch_threads.max(1);
        let mut copies = each_in_a_thread((0..spec.copies.max(1)).collect(), threads, |_| {
            Models::load(dir, &manifest, spec.device, catalog.len(), spec.runtime)
        })?;
        if spec.search.uses_index(catalog.len()) {
            // one index per set, built on the models' device with every core, shared by the copies
            tch::set_num_threads(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as i32);
            match copies[0].item_table() {
                Ok(table) => {
                    let index = IvfIndex::build(&table, &spec.search).map_err(|e| {
                        err(format!("building the IVF index failed: {}", crate::inference::models::torch_error(&e)))
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
        let mut info = copies[0].lock().unwrap_or_else(|e| e.into_inner()).info.clone();
        info.content_sha = sha;
        tracing::info!(
            version = %info.version, sha = %info.content_sha, dir = %dir.display(), copies = copies.len(),
            ms = started.elapsed().as_millis() as u64, "model directory loaded and warmed up"
        );
        Ok(Self { catalog, info, dir: dir.to_path_buf(), copies })
    }

    /// Runs a batch on worker `worker`'s copy.
    pub fn rank(
        &self,
        worker: usize,
        histories: &[&[i64]],
        excludes: &[Excluded<'_>],
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
    f: impl Fn(T) -> Result<Models, LoadError> + Sync,
) -> Result<Vec<Models>, LoadError> {
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
            .map(|h| h.join().unwrap_or_else(|_| Err(LoadError::Load("a model loading thread panicked".into()))))
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
    let excludes: Vec<Excluded> = warm.iter().map(|h| Excluded::new(h, None)).collect();
    for _ in 0..3 {
        models.rank(&refs, &excludes, spec.warm_budget).map_err(|e| crate::inference::models::torch_error(&e))?;
    }
    Ok(())
}
