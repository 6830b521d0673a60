//! The inference settings (`MODEL_DIR`, `DEVICE`, the workers, batching, the candidate counts, the
//! candidate search): the section of the configuration the engine is built from.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::device::DeviceChoice;
use super::engine::EngineConfig;
use super::error::LoadError;
use super::ivf::SearchSpec;

#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Directory with manifest.json, catalog.tsv and lightgcn/, din/, ranknet/.
    #[arg(long, env = "MODEL_DIR", default_value = "./model_output", global = true)]
    pub model_dir: PathBuf,
    /// An experiment (JSON: name, salt, variants with their model directories and shares, an
    /// optional shadow set; docs/experiments.md): its sets are served instead of MODEL_DIR, each
    /// user's variant picked by a stable hash of (salt, user id). A reload reads it again.
    #[arg(long, env = "EXPERIMENT_FILE", global = true)]
    pub experiment_file: Option<PathBuf>,
    /// auto | cpu | cuda | cuda:N (auto: CUDA when available).
    #[arg(long, env = "DEVICE", default_value = "auto", global = true)]
    pub device: String,
    /// Inference workers: threads that each hold a copy of the models and run batches.
    /// Default measured on 2 cores: two workers with one libtorch thread each beat one worker with
    /// two (README).
    #[arg(long, env = "INFERENCE_WORKERS", default_value_t = 2, global = true)]
    pub inference_workers: usize,
    /// libtorch intra-op threads of each inference worker (0: the machine's cores divided among
    /// the workers, so inference never asks for more threads than there are cores).
    #[arg(long, env = "TORCH_THREADS", default_value_t = 0, global = true)]
    pub torch_threads: usize,
    /// Seconds a reload (POST /admin/reload, SIGHUP) may take; beyond, the request gets 503
    /// `reload_timeout`, the load's result is discarded, and reloads get 409 until it has ended.
    #[arg(long, env = "RELOAD_TIMEOUT_SECS", default_value_t = 120.0, global = true)]
    pub reload_timeout_secs: f64,
    /// Largest file of a model directory (catalog.tsv, manifest.json, */model.pt) that is read;
    /// each must also be a regular file (symlinks are followed).
    #[arg(long, env = "MAX_MODEL_FILE_BYTES", default_value_t = 4 << 30, global = true)]
    pub max_model_file_bytes: u64,
    /// Candidates kept after LightGCN (scored by DIN).
    #[arg(long, env = "LIGHTGCN_CANDIDATES", default_value_t = 600, global = true)]
    pub lightgcn_candidates: usize,
    /// How LightGCN finds its candidates: exact (score every item), ivf (search an inverted-file
    /// index over its item vectors, built when the model set loads: approximate, for large
    /// catalogs; docs/performance.md "Approximate candidate search" has its measured recall), auto (ivf from
    /// IVF_MIN_ITEMS items).
    #[arg(long, env = "CANDIDATE_SEARCH", value_enum, default_value = "exact", global = true)]
    pub candidate_search: super::ivf::CandidateSearch,
    /// With CANDIDATE_SEARCH=auto, the smallest catalog searched through the IVF index.
    #[arg(long, env = "IVF_MIN_ITEMS", default_value_t = 200_000, global = true)]
    pub ivf_min_items: usize,
    /// Lists of the IVF index (0: about 4 times the square root of the catalog size).
    #[arg(long, env = "IVF_LISTS", default_value_t = 0, global = true)]
    pub ivf_lists: usize,
    /// IVF lists scanned per profile (more when they hold too few items for the candidates; 0: one
    /// list in 8).
    #[arg(long, env = "IVF_PROBES", default_value_t = 0, global = true)]
    pub ivf_probes: usize,
    /// Candidates kept after DIN (ordered by RankNet).
    #[arg(long, env = "DIN_CANDIDATES", default_value_t = 100, global = true)]
    pub din_candidates: usize,
    /// The stage whose order is returned: ranknet (the full cascade), or din / lightgcn to stop
    /// early (ablations, the quality table).
    #[arg(long, env = "LAST_STAGE", value_enum, default_value = "ranknet", global = true)]
    pub last_stage: super::models::Stage,
    /// Most requests an inference worker runs as one batch.
    #[arg(long, env = "MAX_BATCH", default_value_t = 16, global = true)]
    pub max_batch: usize,
    /// How long (microseconds) an inference worker holding fewer than MAX_BATCH requests waits
    /// for more before it runs them, when under load (its previous batch held more than one
    /// request); 0 (the default, measured on 2 cores with the shipped models:
    /// docs/performance.md): run what is queued at once.
    #[arg(long, env = "MAX_QUEUE_DELAY_US", default_value_t = 0, global = true)]
    pub max_queue_delay_us: u64,
    /// Which form of DIN and RankNet runs: auto (the compiled AOTInductor package, `<stage>/model.pt2`
    /// made by `model_service_py.compile_stages`, where one matches the stage's model.pt, this CPU
    /// and TORCH_THREADS; else TorchScript), torchscript, or compiled (a directory without matching
    /// packages is refused). `/health` and `check` say which runs.
    #[arg(long, env = "STAGE_RUNTIME", value_enum, default_value = "auto", global = true)]
    pub stage_runtime: super::compiled::StageRuntime,
    /// Requests that may wait for the inference workers; beyond that requests get 429.
    #[arg(long, env = "QUEUE_CAPACITY", default_value_t = 256, global = true)]
    pub queue_capacity: usize,
    /// Shadow computations that may wait for the shadow worker; beyond that they are dropped
    /// (counted in shadow_total{outcome="dropped_full"}), never delaying an answer.
    #[arg(long, env = "SHADOW_QUEUE_CAPACITY", default_value_t = 64, global = true)]
    pub shadow_queue_capacity: usize,
    /// Most of one core the shadow set's worker uses, above 0 and at most 1: after each batch it
    /// pauses so that its busy time stays within this share; what it cannot keep up with is
    /// dropped (shadow_total{outcome="dropped_full"}).
    #[arg(long, env = "SHADOW_CPU_SHARE", default_value_t = 0.1, global = true)]
    pub shadow_cpu_share: f64,
    /// Deadline for one recommendation (queue wait and inference), in milliseconds.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 5000, global = true)]
    pub request_timeout_ms: u64,
}

impl EngineArgs {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn reload_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.reload_timeout_secs)
    }
    /// TORCH_THREADS, or the cores divided among the inference workers (at least 1).
    pub fn torch_threads_per_worker(&self) -> usize {
        if self.torch_threads > 0 {
            return self.torch_threads;
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / self.inference_workers.max(1)).max(1)
    }

    /// The engine's settings.
    pub fn engine_config(&self) -> Result<EngineConfig, LoadError> {
        Ok(EngineConfig {
            model_dir: self.model_dir.clone(),
            experiment_file: self.experiment_file.clone(),
            device: DeviceChoice::parse(&self.device)?,
            workers: self.inference_workers,
            torch_threads: self.torch_threads_per_worker(),
            max_batch: self.max_batch,
            max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
            queue_capacity: self.queue_capacity,
            shadow_queue_capacity: self.shadow_queue_capacity,
            shadow_cpu_share: self.shadow_cpu_share,
            deadline: self.request_timeout(),
            lightgcn_candidates: self.lightgcn_candidates,
            din_candidates: self.din_candidates,
            search: SearchSpec {
                mode: self.candidate_search,
                min_items: self.ivf_min_items,
                lists: self.ivf_lists,
                probes: self.ivf_probes,
            },
            last_stage: self.last_stage,
            reload_timeout: self.reload_timeout(),
            max_file_bytes: self.max_model_file_bytes,
            stage_runtime: self.stage_runtime,
        })
    }

    pub fn validate(&self) -> Result<(), LoadError> {
        let positive = [
            ("LIGHTGCN_CANDIDATES", self.lightgcn_candidates),
            ("DIN_CANDIDATES", self.din_candidates),
            ("MAX_BATCH", self.max_batch),
            ("INFERENCE_WORKERS", self.inference_workers),
            ("QUEUE_CAPACITY", self.queue_capacity),
            ("SHADOW_QUEUE_CAPACITY", self.shadow_queue_capacity),
            ("MAX_MODEL_FILE_BYTES", usize::try_from(self.max_model_file_bytes).unwrap_or(usize::MAX)),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(LoadError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.din_candidates > self.lightgcn_candidates {
            return Err(LoadError::Invalid(format!(
                "DIN_CANDIDATES ({}) exceeds LIGHTGCN_CANDIDATES ({})",
                self.din_candidates, self.lightgcn_candidates
            )));
        }
        if !(self.shadow_cpu_share > 0.0 && self.shadow_cpu_share <= 1.0) {
            return Err(LoadError::Invalid(format!(
                "SHADOW_CPU_SHARE must be above 0 and at most 1, got {}",
                self.shadow_cpu_share
            )));
        }
        let secs = self.reload_timeout_secs;
        if !(secs > 0.0 && secs <= 86_400.0) {
            return Err(LoadError::Invalid(format!(
                "RELOAD_TIMEOUT_SECS must be above 0 and at most 86400 seconds, got {secs}"
            )));
        }
        DeviceChoice::parse(&self.device)?;
        if let Some(file) = &self.experiment_file {
            super::experiment::ExperimentSpec::read(file)?;
        }
        Ok(())
    }
}
