//! The inference workers: threads that take jobs from one bounded queue, gather what is queued
//! (waiting at most `max_queue_delay` for a batch to fill) into one batch, run it on their own copy
//! of the models of the job's model set, and answer each job through a oneshot channel. A shadow
//! set's jobs have a queue and a worker of their own, at the lowest CPU priority. Also the lineup
//! in service (the model sets of the variants and the shadow set) and its reload (load beside,
//! validate, swap all at once). Nothing here runs on a tokio worker thread.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};

use tokio::sync::{oneshot, watch};

use super::compiled::{RuntimeSpec, StageRuntime};
use super::error::{InferenceError, LoadError};
use super::exclusion::{Excluded, RowMask};
use super::experiment::ExperimentSpec;
use super::lineup::{Candidates, Experiment, Lineup, Shadow, Variant};
use crate::inference::device::DeviceChoice;
use crate::inference::ivf::SearchSpec;
use crate::inference::model_set::{LoadSpec, ModelSet};
use crate::inference::models::{Budget, ModelInfo, Ranked, Stage, StageStats};
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_dir: PathBuf,
    /// An experiment's variants and shadow set, served instead of `model_dir` (EXPERIMENT_FILE).
    pub experiment_file: Option<PathBuf>,
    pub device: DeviceChoice,
    /// Threads that each own a copy of the models and run batches.
    pub workers: usize,
    /// libtorch intra-op threads of each worker.
    pub torch_threads: usize,
    pub max_batch: usize,
    /// How long a worker holding fewer than `max_batch` jobs waits for more before it runs them.
    /// Applies only under load (see `run`).
    pub max_queue_delay: Duration,
    pub queue_capacity: usize,
    /// Shadow computations that may wait for the shadow worker; beyond that they are dropped.
    pub shadow_queue_capacity: usize,
    /// Most of one core the shadow worker uses (0 to 1]: after each batch it pauses so that its
    /// busy time stays within this share (SHADOW_CPU_SHARE).
    pub shadow_cpu_share: f64,
    pub deadline: Duration,
    pub lightgcn_candidates: usize,
    pub din_candidates: usize,
    /// Stage 1's candidate search.
    pub search: SearchSpec,
    pub last_stage: Stage,
    /// Bound on one reload (RELOAD_TIMEOUT_SECS).
    pub reload_timeout: Duration,
    /// Largest model-directory file read (MAX_MODEL_FILE_BYTES).
    pub max_file_bytes: u64,
    /// TorchScript or the compiled packages (STAGE_RUNTIME).
    pub stage_runtime: StageRuntime,
}

impl EngineConfig {
    fn budget(&self, candidates: Candidates, k: usize, explain: bool) -> Budget {
        Budget { lightgcn: candidates.lightgcn, din: candidates.din, k, last_stage: self.last_stage, explain }
    }

    /// LIGHTGCN_CANDIDATES and DIN_CANDIDATES.
    pub fn candidates(&self) -> Candidates {
        Candidates { lightgcn: self.lightgcn_candidates, din: self.din_candidates }
    }

    /// How a model set is loaded for these workers (the device resolved against what libtorch sees).
    pub fn load_spec(&self) -> Result<LoadSpec, LoadError> {
        Ok(LoadSpec {
            device: self.device.resolve(tch::Cuda::device_count().max(0) as usize)?,
            copies: self.workers.max(1),
            torch_threads: self.torch_threads,
            warm_batch: self.max_batch,
            warm_budget: self.budget(self.candidates(), 10, false),
            search: self.search,
            max_file_bytes: self.max_file_bytes,
            runtime: RuntimeSpec { runtime: self.stage_runtime, threads: self.torch_threads },
        })
    }
}

/// What the engine serves and reloads: a model set (`ModelSet`, the cascade on libtorch), or a
/// fake in the unit tests below. Called on the inference worker threads only.
pub trait Ranker: Send + Sync + 'static {
    /// Ranks one batch on `worker`'s copy of the models: for each history the top
    /// `budget.k` rows, leaving out that history's `excludes`. An error fails the whole batch.
    fn rank(
        &self,
        worker: usize,
        histories: &[&[i64]],
        excludes: &[Excluded<'_>],
        budget: Budget,
    ) -> Result<(Vec<Ranked>, StageStats), String>;
    /// What is in service (`/health`, `/metrics`, reload answers).
    fn info(&self) -> &ModelInfo;
    /// The directory it was loaded from (a reload without one reloads this).
    fn dir(&self) -> &Path;
}

impl Ranker for ModelSet {
    fn rank(
        &self,
        worker: usize,
        histories: &[&[i64]],
        excludes: &[Excluded<'_>],
        budget: Budget,
    ) -> Result<(Vec<Ranked>, StageStats), String> {
        ModelSet::rank(self, worker, histories, excludes, budget).map_err(|e| crate::inference::models::torch_error(&e))
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Loads the model directory it is given with that many copies of the models (at start, and at
/// each reload).
pub type Loader<R> = Arc<dyn Fn(&Path, usize) -> Result<R, LoadError> + Send + Sync>;

/// Where the engine is: loading the first lineup, serving one, or failed to load at start.
pub enum EngineState<R = ModelSet> {
    Loading,
    Ready(Arc<Lineup<R>>),
    Failed(String),
}

impl<R> Clone for EngineState<R> {
    fn clone(&self) -> Self {
        match self {
            EngineState::Loading => EngineState::Loading,
            EngineState::Ready(set) => EngineState::Ready(set.clone()),
            EngineState::Failed(reason) => EngineState::Failed(reason.clone()),
        }
    }
}

/// Who decided a reload's outcome: nobody yet, the loading thread (it swapped the set in or
/// refused it), or the timeout (the load's result is discarded).
const UNDECIDED: u8 = 0;
const DECIDED_BY_LOAD: u8 = 1;
const TIMED_OUT: u8 = 2;

/// Held by a reload's loading thread from before it starts until it ends: clears the
/// one-reload-at-a-time flag then.
struct ReloadRunning(Arc<AtomicBool>);

impl Drop for ReloadRunning {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

pub struct Scored {
    pub ranked: Ranked,
    pub stats: StageStats,
}

/// What a successful reload replaced (the first variant's set; with an experiment, every
/// variant's and the shadow set were swapped with it).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Reloaded {
    pub model_version: String,
    pub model_dir: String,
    pub previous_version: String,
    pub previous_dir: String,
    /// With EXPERIMENT_FILE: the experiment now in service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    /// The variants now in service, `name=model version`, and the shadow set's last.
    pub sets: Vec<String>,
    pub elapsed_ms: f64,
}

struct Job<R> {
    /// The set whose catalog mapped `history`; the batch runs on the same set.
    set: Arc<R>,
    candidates: Candidates,
    history: Vec<i64>,
    exclude: Vec<i64>,
    /// Rows shared by many jobs that none may be given (the store's unavailable items).
    masked: Option<Arc<RowMask>>,
    k: usize,
    explain: bool,
    queued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Scored, InferenceError>>,
}

pub struct Engine<R: Ranker = ModelSet> {
    tx: Sender<Job<R>>,
    shadow_tx: Sender<Job<R>>,
    state: Arc<watch::Sender<EngineState<R>>>,
    /// One reload at a time: set while a reload's loading thread runs (it clears it when it ends).
    reloading: Arc<AtomicBool>,
    cfg: Arc<EngineConfig>,
    metrics: Metrics,
    load: Loader<R>,
}

impl<R: Ranker> Clone for Engine<R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shadow_tx: self.shadow_tx.clone(),
            state: self.state.clone(),
            reloading: self.reloading.clone(),
            cfg: self.cfg.clone(),
            metrics: self.metrics.clone(),
            load: self.load.clone(),
        }
    }
}

impl Engine<ModelSet> {
    /// Starts the inference workers and loads `cfg.model_dir` on a background thread; `state()`
    /// is Ready once every worker's copy is loaded and warmed up.
    pub fn start(cfg: EngineConfig, metrics: Metrics) -> Self {
        let spec = cfg.clone();
        let load: Loader<ModelSet> =
            Arc::new(move |dir: &Path, copies| ModelSet::load(dir, &LoadSpec { copies, ..spec.load_spec()? }));
        Self::start_with(cfg, metrics, load)
    }
}

impl<R: Ranker> Engine<R> {
    /// Starts the inference workers (and the shadow worker), and loads the lineup
    /// (`cfg.experiment_file`, else `cfg.model_dir`) on a background thread.
    pub fn start_with(cfg: EngineConfig, metrics: Metrics, load: Loader<R>) -> Self {
        let (tx, rx) = bounded(cfg.queue_capacity);
        let (shadow_tx, shadow_rx) = bounded(cfg.shadow_queue_capacity.max(1));
        let state = Arc::new(watch::Sender::new(EngineState::Loading));
        let cfg = Arc::new(cfg);
        for n in 0..cfg.workers.max(1) {
            let (cfg, rx, metrics) = (cfg.clone(), rx.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("inference-{n}"))
                .spawn(move || run(n, Lane::Serving, cfg, rx, metrics))
                .expect("spawning an inference worker");
        }
        {
            let (cfg, metrics) = (cfg.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("inference-shadow".into())
                .spawn(move || run(0, Lane::Shadow, cfg, shadow_rx, metrics))
                .expect("spawning the shadow worker");
        }
        let engine = Self { tx, shadow_tx, state, reloading: Arc::new(AtomicBool::new(false)), cfg, metrics, load };
        let loader = engine.clone();
        std::thread::Builder::new()
            .name("model-loader".into())
            .spawn(move || match loader.load_lineup(None, None) {
                Ok(lineup) => loader.swap_in(Arc::new(lineup)),
                Err(e) => {
                    tracing::error!(error = %e, "model load failed");
                    loader.state.send_replace(EngineState::Failed(e.to_string()));
                }
            })
            .expect("spawning the model loader");
        engine
    }

    pub fn state(&self) -> EngineState<R> {
        self.state.borrow().clone()
    }

    /// The lineup in service, if any.
    pub fn current(&self) -> Option<Arc<Lineup<R>>> {
        match &*self.state.borrow() {
            EngineState::Ready(lineup) => Some(lineup.clone()),
            _ => None,
        }
    }

    /// Waits until the first lineup is loaded and warmed up, or failed to load.
    pub async fn ready(&self) -> Result<Arc<Lineup<R>>, LoadError> {
        let mut state = self.state.subscribe();
        loop {
            match &*state.borrow_and_update() {
                EngineState::Ready(set) => return Ok(set.clone()),
                EngineState::Failed(reason) => return Err(LoadError::Load(reason.clone())),
                EngineState::Loading => {}
            }
            if state.changed().await.is_err() {
                return Err(LoadError::Load("the model loader stopped".into()));
            }
        }
    }

    /// Loads what is to be served: the experiment file's variants and shadow set when
    /// EXPERIMENT_FILE is set (read again at each reload), else `dir` (default: `cfg.model_dir`)
    /// as the one variant `default`. A directory named by several variants is loaded once; any
    /// set that fails to load fails the whole lineup.
    fn load_lineup(&self, dir: Option<&Path>, previous: Option<&Lineup<R>>) -> Result<Lineup<R>, LoadError> {
        let copies = self.cfg.workers.max(1);
        let Some(file) = &self.cfg.experiment_file else {
            let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| match previous {
                Some(p) => p.primary().set.dir().to_path_buf(),
                None => self.cfg.model_dir.clone(),
            });
            return Ok(Lineup::single(Arc::new((self.load)(&dir, copies)?), self.cfg.candidates()));
        };
        if dir.is_some() {
            return Err(LoadError::Invalid(
                "EXPERIMENT_FILE is set: a reload reads it again and takes no model_dir".into(),
            ));
        }
        let spec = ExperimentSpec::read(file)?;
        let defaults = self.cfg.candidates();
        let candidates = |l: Option<usize>, d: Option<usize>| -> Result<Candidates, LoadError> {
            let c = Candidates { lightgcn: l.unwrap_or(defaults.lightgcn), din: d.unwrap_or(defaults.din) };
            if c.din > c.lightgcn {
                return Err(LoadError::Invalid(format!(
                    "EXPERIMENT_FILE {}: {} DIN candidates exceed {} LightGCN candidates",
                    file.display(),
                    c.din,
                    c.lightgcn
                )));
            }
            Ok(c)
        };
        let mut loaded: Vec<(PathBuf, Arc<R>)> = Vec::new();
        let mut variants = Vec::new();
        for v in &spec.variants {
            let set = match loaded.iter().find(|(dir, _)| *dir == v.model_dir) {
                Some((_, set)) => set.clone(),
                None => {
                    let set = Arc::new((self.load)(&v.model_dir, copies)?);
                    loaded.push((v.model_dir.clone(), set.clone()));
                    set
                }
            };
            let candidates = candidates(v.lightgcn_candidates, v.din_candidates)?;
            variants.push(Variant { name: v.name.clone(), share: v.share, set, candidates });
        }
        // The shadow worker has a copy of its own (one), even of a variant's directory.
        let shadow = match &spec.shadow {
            Some(s) => Some(Shadow {
                variant: Variant {
                    name: s.name.clone(),
                    share: 0.0,
                    set: Arc::new((self.load)(&s.model_dir, 1)?),
                    candidates: candidates(s.lightgcn_candidates, s.din_candidates)?,
                },
                sample: s.sample,
            }),
            None => None,
        };
        let experiment = Some(Experiment { name: spec.name, salt: spec.salt });
        Ok(Lineup { experiment, variants, shadow })
    }

    fn swap_in(&self, lineup: Arc<Lineup<R>>) {
        let rows: Vec<[&str; 6]> = lineup
            .sets()
            .map(|(name, set)| {
                let info = set.info();
                let stage =
                    |stage: &str| info.stages.iter().find(|s| s.stage == stage).map_or("", |s| s.version.as_str());
                [name, &info.version, &info.device, stage("lightgcn"), stage("din"), stage("ranknet")]
            })
            .collect();
        self.metrics.set_model_info(&rows);
        for (variant, set) in lineup.sets() {
            let info = set.info();
            tracing::info!(
                variant, version = %info.version, dir = %set.dir().display(), device = %info.device,
                items = info.num_items, workers = self.cfg.workers, torch_threads = self.cfg.torch_threads,
                "models in service"
            );
        }
        self.state.send_replace(EngineState::Ready(lineup));
    }

    /// Loads `dir` (default: the directory in service; with EXPERIMENT_FILE, the file read again and
    /// every set it names) on a thread of its own while the current lineup keeps serving,
    /// validates each set (catalog, shapes, a smoke batch and warm-up on every copy) and swaps
    /// them in together: requests already holding the old lineup finish on it, later ones get the
    /// new one. If any set fails validation, nothing is swapped and the old lineup keeps serving.
    ///
    /// The loading thread, not this future, holds the one-reload-at-a-time flag: a client that
    /// gives up, or the timeout, does not end the load, so further reloads get 409 until it has
    /// really ended. It frees the old lineup (unless requests still hold it) and clears the flag
    /// before it answers, so a reload answered has ended. Past `reload_timeout` the caller gets
    /// `ReloadTimeout` and the load's result is discarded. The thread is not joined: SIGTERM ends
    /// the process during a reload.
    pub async fn reload(&self, dir: Option<PathBuf>) -> Result<Reloaded, InferenceError> {
        if self.reloading.swap(true, Ordering::SeqCst) {
            return Err(InferenceError::ReloadInProgress);
        }
        let running = ReloadRunning(self.reloading.clone());
        let previous = match self.state() {
            EngineState::Ready(lineup) => lineup,
            EngineState::Loading => return Err(InferenceError::ModelsLoading),
            EngineState::Failed(reason) => {
                return Err(InferenceError::EngineStopped(format!("the models failed to load: {reason}")))
            }
        };
        let decided = Arc::new(AtomicU8::new(UNDECIDED));
        let (reply, outcome) = oneshot::channel();
        let (engine, decider) = (self.clone(), decided.clone());
        let started = Instant::now();
        std::thread::Builder::new()
            .name("model-reload".into())
            .spawn(move || {
                let loaded = engine.load_lineup(dir.as_deref(), Some(&previous));
                let outcome = engine.finish_reload(loaded, &previous, started, &decider);
                drop(previous);
                drop(running);
                let _ = reply.send(outcome);
            })
            .map_err(|e| InferenceError::ReloadRefused(format!("cannot start the loading thread: {e}")))?;
        let timeout = self.cfg.reload_timeout;
        match tokio::time::timeout(timeout, outcome).await {
            Ok(outcome) => {
                outcome.unwrap_or_else(|_| Err(InferenceError::ReloadRefused("the loading thread failed".into())))
            }
            Err(_) if decided.compare_exchange(UNDECIDED, TIMED_OUT, Ordering::SeqCst, Ordering::SeqCst).is_ok() => {
                self.metrics.reloads.with_label_values(&["timeout"]).inc();
                tracing::error!(
                    timeout_s = timeout.as_secs_f64(),
                    "reload timed out; the models in service keep \
                    serving, and reloads are refused until the load has ended"
                );
                Err(InferenceError::ReloadTimeout(timeout.as_secs_f64()))
            }
            // The thread decided just in time: its answer is on the way.
            Err(_) => Err(InferenceError::ReloadTimeout(timeout.as_secs_f64())),
        }
    }

    /// On the loading thread: swaps a loaded set in unless the reload timed out.
    fn finish_reload(
        &self,
        loaded: Result<Lineup<R>, LoadError>,
        previous: &Lineup<R>,
        started: Instant,
        decided: &AtomicU8,
    ) -> Result<Reloaded, InferenceError> {
        let in_time = decided.compare_exchange(UNDECIDED, DECIDED_BY_LOAD, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        let before = previous.primary().set.clone();
        match loaded {
            Ok(lineup) if in_time => {
                let lineup = Arc::new(lineup);
                let now = lineup.primary().set.clone();
                let outcome = Reloaded {
                    model_version: now.info().version.clone(),
                    model_dir: now.dir().display().to_string(),
                    previous_version: before.info().version.clone(),
                    previous_dir: before.dir().display().to_string(),
                    experiment: lineup.experiment.as_ref().map(|e| e.name.clone()),
                    sets: lineup.sets().map(|(name, set)| format!("{name}={}", set.info().version)).collect(),
                    elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
                };
                self.swap_in(lineup);
                self.metrics.reloads.with_label_values(&["success"]).inc();
                Ok(outcome)
            }
            Ok(lineup) => {
                tracing::warn!(version = %lineup.primary().set.info().version,
                    "a timed-out reload finished loading; discarded");
                Err(InferenceError::ReloadTimeout(self.cfg.reload_timeout.as_secs_f64()))
            }
            Err(e) => {
                if in_time {
                    self.metrics.reloads.with_label_values(&["refused"]).inc();
                }
                tracing::error!(error = %e, version = %before.info().version,
                    "reload refused; the models in service keep serving");
                Err(InferenceError::ReloadRefused(e.to_string()))
            }
        }
    }

    /// Queues one history (non-empty, distinct rows of the variant's catalog) with the rows it must
    /// not be recommended (`exclude`, sorted: the whole profile; `masked`: rows shared by many
    /// requests), and waits for its top `k`, computed by the variant's models with its candidate
    /// counts (with each item's per-stage trace when `explain`).
    pub async fn rank(
        &self,
        variant: &Variant<R>,
        history: Vec<i64>,
        exclude: Vec<i64>,
        masked: Option<Arc<RowMask>>,
        k: usize,
        explain: bool,
    ) -> Result<Scored, InferenceError> {
        let queued = Instant::now();
        let deadline = queued + self.cfg.deadline;
        let (reply, answer) = oneshot::channel();
        let (set, candidates) = (variant.set.clone(), variant.candidates);
        let job = Job { set, candidates, history, exclude, masked, k, explain, queued, deadline, reply };
        match self.tx.try_send(job) {
            Ok(()) => self.metrics.queue_depth.inc(),
            Err(TrySendError::Full(_)) => return Err(InferenceError::Overloaded(self.cfg.queue_capacity)),
            Err(TrySendError::Disconnected(_)) => {
                return Err(InferenceError::EngineStopped("the inference workers have exited".into()))
            }
        }
        let late = InferenceError::DeadlineExceeded(self.cfg.deadline.as_millis() as u64);
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(result)) => result,
            // A worker answers every job it takes (late ones with DeadlineExceeded); a reply
            // dropped unanswered means the worker thread itself is gone.
            Ok(Err(_)) if Instant::now() >= deadline => Err(late),
            Ok(Err(_)) => {
                Err(InferenceError::EngineStopped("an inference worker exited while running the request".into()))
            }
            Err(_) => Err(late),
        }
    }

    /// Queues one history for the shadow worker without waiting: `Err(Overloaded)` at once when
    /// its queue is full. The receiver gets the ranking (or `DeadlineExceeded` for a job that
    /// waited past the request deadline, which is then not run).
    pub fn shadow(
        &self,
        shadow: &Variant<R>,
        history: Vec<i64>,
        exclude: Vec<i64>,
        masked: Option<Arc<RowMask>>,
        k: usize,
    ) -> Result<oneshot::Receiver<Result<Scored, InferenceError>>, InferenceError> {
        let queued = Instant::now();
        let (reply, answer) = oneshot::channel();
        let (set, candidates) = (shadow.set.clone(), shadow.candidates);
        let deadline = queued + self.cfg.deadline;
        let job = Job { set, candidates, history, exclude, masked, k, explain: false, queued, deadline, reply };
        match self.shadow_tx.try_send(job) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) => Err(InferenceError::Overloaded(self.cfg.shadow_queue_capacity)),
            Err(TrySendError::Disconnected(_)) => {
                Err(InferenceError::EngineStopped("the shadow worker has exited".into()))
            }
        }
    }
}

/// Which queue a worker serves: the requests', or the shadow set's (one worker, at the lowest CPU
/// priority, one libtorch thread, not counted in the serving queue's metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Serving,
    Shadow,
}

fn run<R: Ranker>(worker: usize, lane: Lane, cfg: Arc<EngineConfig>, rx: Receiver<Job<R>>, metrics: Metrics) {
    let serving = lane == Lane::Serving;
    // Sets this thread's own intra-op thread count (each worker runs its batches with it).
    tch::set_num_threads(if serving { cfg.torch_threads.max(1) as i32 } else { 1 });
    if !serving {
        lowest_priority();
    }
    // Waiting for a batch to fill only pays under concurrent load: a worker waits (at most
    // max_queue_delay) only when its previous batch held more than one request, so a lone request
    // never waits for company that is not coming.
    let mut under_load = false;
    loop {
        let delay = if under_load { cfg.max_queue_delay } else { Duration::ZERO };
        // A shadow job runs alone: one short burst at a time, then the duty cycle's pause.
        let max_batch = if serving { cfg.max_batch.max(1) } else { 1 };
        let Some(jobs) = gather(&rx, max_batch, delay) else { break };
        under_load = jobs.len() > 1;
        let now = Instant::now();
        if serving {
            metrics.queue_depth.sub(jobs.len() as i64);
            for job in &jobs {
                metrics.queue_wait.observe(now.duration_since(job.queued).as_secs_f64());
            }
        }
        // A job whose caller has gone (the client disconnected, or its request was cancelled) has
        // nobody to answer: it is counted and not ranked.
        let (gone, jobs): (Vec<Job<R>>, Vec<Job<R>>) = jobs.into_iter().partition(|j| j.reply.is_closed());
        if serving {
            metrics.jobs_abandoned.inc_by(gone.len() as u64);
        }
        let (live, late): (Vec<Job<R>>, Vec<Job<R>>) = jobs.into_iter().partition(|j| j.deadline > now);
        for job in late {
            // Its caller answers 503 deadline_exceeded at the same moment, if it has not already.
            let _ = job.reply.send(Err(InferenceError::DeadlineExceeded(cfg.deadline.as_millis() as u64)));
        }
        for same_set in by_model_set(live) {
            if serving {
                metrics.batch_size.observe(same_set.len() as f64);
                let cpu = thread_cpu_seconds();
                run_batch(worker, &cfg, same_set);
                metrics.inference_cpu.inc_by((thread_cpu_seconds() - cpu).max(0.0));
            } else {
                // Nice 19 does not keep a shadow batch off the serving threads' core when the
                // other core (or its hyperthread sibling) is idle for a moment: a duty cycle does.
                let t = Instant::now();
                run_batch(worker, &cfg, same_set);
                let share = cfg.shadow_cpu_share.clamp(0.01, 1.0);
                std::thread::sleep(t.elapsed().mul_f64((1.0 - share) / share));
            }
        }
    }
}

/// CPU seconds the calling thread has used (0 where the clock is not available).
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The calling thread at nice 19: the shadow set's work runs on what the serving threads leave.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority on this thread's own id; no memory is touched.
        let tid = unsafe { libc::gettid() };
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) } != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "could not lower the shadow worker's priority");
        }
    }
}

/// Groups jobs by the model set and candidate counts they are ranked with (more than one group
/// with an experiment's variants, or around a reload).
fn by_model_set<R>(jobs: Vec<Job<R>>) -> Vec<Vec<Job<R>>> {
    let mut groups: Vec<Vec<Job<R>>> = Vec::new();
    for job in jobs {
        match groups.iter_mut().find(|g| Arc::ptr_eq(&g[0].set, &job.set) && g[0].candidates == job.candidates) {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

/// Blocks for one job, then takes what is queued up to `max_batch`, waiting until `max_delay` after
/// the first job's arrival for the batch to fill. `None` when the queue is closed.
fn gather<R>(rx: &Receiver<Job<R>>, max_batch: usize, max_delay: Duration) -> Option<Vec<Job<R>>> {
    let first = rx.recv().ok()?;
    let until = first.queued + max_delay;
    let mut jobs = vec![first];
    while jobs.len() < max_batch {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) if max_delay.is_zero() => break,
            Err(_) => match rx.recv_deadline(until) {
                Ok(job) => jobs.push(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            },
        }
    }
    Some(jobs)
}

fn run_batch<R: Ranker>(worker: usize, cfg: &EngineConfig, jobs: Vec<Job<R>>) {
    let k = jobs.iter().map(|j| j.k).max().unwrap_or(1);
    // Tracing the stages costs a few copies per batch; only batches that hold a request asking pay.
    let explain = jobs.iter().any(|j| j.explain);
    let (set, candidates) = (jobs[0].set.clone(), jobs[0].candidates);
    let histories: Vec<&[i64]> = jobs.iter().map(|j| j.history.as_slice()).collect();
    let excludes: Vec<Excluded<'_>> = jobs.iter().map(|j| Excluded::new(&j.exclude, j.masked.as_deref())).collect();
    let batch = histories.len();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        set.rank(worker, &histories, &excludes, cfg.budget(candidates, k, explain))
    }));
    let result = match outcome {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err("the inference worker caught a panic".to_string()),
    };
    match result {
        Ok((ranked, times)) => {
            for (job, mut r) in jobs.into_iter().zip(ranked) {
                r.rows.truncate(job.k);
                r.scores.truncate(job.k);
                match &mut r.trace {
                    Some(trace) if job.explain => trace.truncate(job.k),
                    _ => r.trace = None,
                }
                let _ = job.reply.send(Ok(Scored { ranked: r, stats: times.clone() }));
            }
        }
        Err(reason) => {
            tracing::error!(%reason, batch, "inference failed");
            for job in jobs {
                let _ = job.reply.send(Err(InferenceError::Failed(reason.clone())));
            }
        }
    }
}

/// The engine on a fake ranker (`super::fake`): batching, deadlines, the queue bound, failing
/// batches and reloads, in seconds and without model files.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::fake::{self, Fake, Seen, FAIL, PANIC, SLOW};

    async fn started(cfg: EngineConfig) -> (Engine<Fake>, Arc<Seen>) {
        let seen = Arc::new(Seen::default());
        let engine = Engine::start_with(cfg, Metrics::new(), fake::loader(seen.clone()));
        engine.ready().await.expect("the fake set loads");
        (engine, seen)
    }

    /// `rank` in a task of its own (a caller that can wait, or give up, beside the test).
    fn spawn_rank(engine: &Engine<Fake>, first: i64) -> tokio::task::JoinHandle<Result<Vec<i64>, InferenceError>> {
        let engine = engine.clone();
        tokio::spawn(async move { rank(&engine, first).await })
    }

    async fn rank(engine: &Engine<Fake>, first: i64) -> Result<Vec<i64>, InferenceError> {
        let lineup = engine.current().expect("a lineup in service");
        engine.rank(lineup.primary(), vec![first, 1], vec![], None, 10, false).await.map(|s| s.ranked.rows)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_burst_is_ranked_in_batches_and_each_caller_gets_its_own_answer() {
        let (engine, seen) = started(fake::config("v1")).await;
        let calls: Vec<_> = (0..24)
            .map(|i| {
                tokio::spawn({
                    let engine = engine.clone();
                    async move { (i, rank(&engine, i).await) }
                })
            })
            .collect();
        for call in calls {
            let (i, rows) = call.await.unwrap();
            assert_eq!(rows.unwrap(), vec![1, i], "request {i} got another request's answer");
        }
        let batches = seen.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 24, "{batches:?}");
        assert!(batches.iter().all(|&b| b <= 4), "a batch above MAX_BATCH: {batches:?}");
        assert!(batches.iter().any(|&b| b > 1), "requests queued behind a busy worker were never batched: {batches:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn requests_past_their_deadline_get_deadline_exceeded_and_later_ones_are_served() {
        let mut cfg = fake::config("v1");
        cfg.deadline = Duration::from_millis(100);
        cfg.max_batch = 1;
        let (engine, seen) = started(cfg).await;
        let slow = spawn_rank(&engine, SLOW);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // queued behind the slow batch: its deadline passes before a worker takes it
        let queued = rank(&engine, 7).await;
        assert!(matches!(slow.await.unwrap(), Err(InferenceError::DeadlineExceeded(100))));
        assert!(matches!(queued, Err(InferenceError::DeadlineExceeded(100))), "{queued:?}");
        tokio::time::sleep(Duration::from_millis(fake::SLOW_MS)).await;
        assert_eq!(rank(&engine, 8).await.unwrap(), vec![1, 8]);
        // the late job was answered without running: only the slow one and the last one ran
        assert_eq!(seen.ranked.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn jobs_whose_caller_has_gone_are_counted_and_not_ranked() {
        let mut cfg = fake::config("v1");
        cfg.max_batch = 1;
        let (engine, seen) = started(cfg).await;
        let slow = spawn_rank(&engine, SLOW);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // three callers queue behind the slow batch and give up (a client that disconnected)
        let gone: Vec<_> = (0..3).map(|i| spawn_rank(&engine, 10 + i)).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        for call in &gone {
            call.abort();
        }
        assert_eq!(slow.await.unwrap().unwrap(), vec![1, SLOW]);
        assert_eq!(rank(&engine, 8).await.unwrap(), vec![1, 8]);
        assert_eq!(seen.ranked.load(std::sync::atomic::Ordering::SeqCst), 2, "an abandoned job was ranked");
        assert_eq!(engine.metrics.jobs_abandoned.get(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_full_queue_answers_overloaded_at_once() {
        let mut cfg = fake::config("v1");
        cfg.queue_capacity = 2;
        cfg.max_batch = 1;
        let (engine, _) = started(cfg).await;
        let busy = spawn_rank(&engine, SLOW);
        tokio::time::sleep(Duration::from_millis(50)).await; // the worker holds the slow job
        let waiting: Vec<_> = (0..2).map(|i| spawn_rank(&engine, i)).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started_at = Instant::now();
        assert!(matches!(rank(&engine, 9).await, Err(InferenceError::Overloaded(2))));
        assert!(started_at.elapsed() < Duration::from_millis(100), "refusing waited for the queue");
        assert_eq!(busy.await.unwrap().unwrap(), vec![1, SLOW]);
        for w in waiting {
            assert!(w.await.unwrap().is_ok());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failing_or_panicking_batch_fails_its_callers_and_the_worker_serves_on() {
        let (engine, _) = started(fake::config("v1")).await;
        let failed = rank(&engine, FAIL).await;
        assert!(matches!(&failed, Err(InferenceError::Failed(r)) if r.contains("fake failed")), "{failed:?}");
        let panicked = rank(&engine, PANIC).await;
        assert!(matches!(&panicked, Err(InferenceError::Failed(r)) if r.contains("panic")), "{panicked:?}");
        assert_eq!(rank(&engine, 3).await.unwrap(), vec![1, 3], "the worker died with the panic");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_reload_lets_requests_on_the_old_set_finish_there_and_later_ones_get_the_new_set() {
        let (engine, _) = started(fake::config("v1")).await;
        let on_old = spawn_rank(&engine, SLOW);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reloaded = engine.reload(Some("v2".into())).await.expect("v2 loads");
        assert_eq!((reloaded.previous_version.as_str(), reloaded.model_version.as_str()), ("v1", "v2"));
        assert_eq!(on_old.await.unwrap().unwrap(), vec![1, SLOW], "the in-flight request changed sets");
        assert_eq!(rank(&engine, 4).await.unwrap(), vec![2, 4]);
        assert_eq!(engine.current().unwrap().primary().set.info().version, "v2");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_reload_answers_once_it_has_ended_so_the_next_one_starts_even_when_freeing_the_old_set_is_slow() {
        let (engine, seen) = started(fake::config("heavy-v1")).await;
        for (n, next) in ["heavy-v2", "heavy-v3", "heavy-v1"].into_iter().enumerate() {
            let reloaded = engine.reload(Some(next.into())).await;
            assert!(reloaded.is_ok(), "reload {n}: {reloaded:?}");
            assert_eq!(seen.dropped.load(Ordering::SeqCst), n + 1, "reload {n} answered before the old set was freed");
        }
        assert_eq!(rank(&engine, 6).await.unwrap(), vec![1, 6]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_broken_directory_is_refused_and_the_set_in_service_keeps_serving() {
        let (engine, _) = started(fake::config("v1")).await;
        let refused = engine.reload(Some("broken".into())).await;
        assert!(matches!(&refused, Err(InferenceError::ReloadRefused(r)) if r.contains("not a fake")), "{refused:?}");
        assert_eq!(rank(&engine, 5).await.unwrap(), vec![1, 5]);
        assert_eq!(engine.current().unwrap().primary().set.info().version, "v1");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_reload_past_its_timeout_is_discarded_and_no_second_reload_starts_while_it_loads() {
        let mut cfg = fake::config("v1");
        cfg.reload_timeout = Duration::from_millis(100);
        let (engine, _) = started(cfg).await;
        let timed_out = engine.reload(Some("slow-v3".into())).await;
        assert!(matches!(timed_out, Err(InferenceError::ReloadTimeout(_))), "{timed_out:?}");
        assert!(matches!(engine.reload(Some("v2".into())).await, Err(InferenceError::ReloadInProgress)));
        tokio::time::sleep(Duration::from_millis(500)).await; // the slow load ends, discarded
        assert_eq!(engine.current().unwrap().primary().set.info().version, "v1");
        assert_eq!(engine.reload(Some("v2".into())).await.unwrap().model_version, "v2");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_directory_that_fails_at_start_fails_ready_and_refuses_reloads() {
        let seen = Arc::new(Seen::default());
        let engine = Engine::start_with(fake::config("broken"), Metrics::new(), fake::loader(seen));
        let Err(err) = engine.ready().await else { panic!("a broken directory cannot be ready") };
        assert!(err.to_string().contains("not a fake model set"), "{err}");
        assert!(engine.current().is_none());
        assert!(matches!(engine.reload(None).await, Err(InferenceError::EngineStopped(_))));
    }

    fn experiment_file(name: &str, json: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("engine-experiment-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("experiment.json");
        std::fs::write(&file, json).unwrap();
        file
    }

    const TWO_VARIANTS: &str = r#"{"name":"e1","salt":"s1","variants":[
        {"name":"control","model_dir":"v1","share":50},
        {"name":"treatment","model_dir":"v2","share":50,"lightgcn_candidates":5,"din_candidates":3}],
        "shadow":{"name":"next","model_dir":"v3","sample":0.5}}"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_experiment_serves_each_user_its_variants_set_and_reloads_every_set_at_once() {
        let mut cfg = fake::config("unused");
        cfg.experiment_file = Some(experiment_file("split", TWO_VARIANTS));
        let (engine, _) = started(cfg.clone()).await;
        let lineup = engine.current().unwrap();
        assert_eq!(lineup.experiment.as_ref().unwrap().name, "e1");
        let names: Vec<&str> = lineup.sets().map(|(n, _)| n).collect();
        assert_eq!(names, ["control", "treatment", "next"]);
        assert_eq!(lineup.variants[1].candidates, Candidates { lightgcn: 5, din: 3 });
        let mut by_variant = std::collections::HashMap::new();
        for user in 0..400 {
            let variant = lineup.assign(&format!("user{user}"));
            assert_eq!(variant.name, lineup.assign(&format!("user{user}")).name, "assignment is stable");
            let rows = engine.rank(variant, vec![user, 1], vec![], None, 10, false).await.unwrap().ranked.rows;
            let tag = if variant.name == "control" { 1 } else { 2 };
            assert_eq!(rows, vec![tag, user], "user{user} was ranked by another variant's set");
            *by_variant.entry(variant.name.clone()).or_insert(0) += 1;
        }
        let control = by_variant["control"];
        assert!((160..=240).contains(&control), "a 50/50 split gave {by_variant:?}");
        // the shadow set ranks on its own worker, without waiting
        let shadow = lineup.shadow.as_ref().unwrap();
        let rows = engine.shadow(&shadow.variant, vec![42, 1], vec![], None, 10).unwrap().await.unwrap().unwrap();
        assert_eq!(rows.ranked.rows, vec![3, 42]);

        // the file changes: every set is swapped in one step
        std::fs::write(
            cfg.experiment_file.as_ref().unwrap(),
            r#"{"name":"e2","salt":"s1","variants":[{"name":"control","model_dir":"v4","share":100}]}"#,
        )
        .unwrap();
        let reloaded = engine.reload(None).await.unwrap();
        assert_eq!(reloaded.experiment.as_deref(), Some("e2"));
        assert_eq!(reloaded.sets, ["control=v4"]);
        let now = engine.current().unwrap();
        assert!(now.shadow.is_none());
        assert_eq!(
            engine.rank(now.assign("user1"), vec![9, 1], vec![], None, 10, false).await.unwrap().ranked.rows,
            vec![4, 9]
        );
        // a reload naming a directory is refused while an experiment is in service
        assert!(matches!(engine.reload(Some("v5".into())).await, Err(InferenceError::ReloadRefused(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_experiment_with_one_broken_set_is_refused_whole_and_the_old_sets_keep_serving() {
        let mut cfg = fake::config("unused");
        let file = experiment_file("broken", TWO_VARIANTS);
        cfg.experiment_file = Some(file.clone());
        let (engine, _) = started(cfg).await;
        std::fs::write(
            &file,
            r#"{"name":"e2","salt":"s1","variants":[{"name":"control","model_dir":"v4","share":50},
                {"name":"treatment","model_dir":"broken","share":50}]}"#,
        )
        .unwrap();
        let refused = engine.reload(None).await;
        assert!(matches!(&refused, Err(InferenceError::ReloadRefused(r)) if r.contains("not a fake")), "{refused:?}");
        std::fs::write(&file, r#"{"name":"e2","salt":"s1","variants":[{"name":"c","model_dir":"v4","share":60}]}"#)
            .unwrap();
        let refused = engine.reload(None).await;
        assert!(matches!(&refused, Err(InferenceError::ReloadRefused(r)) if r.contains("sum to 60")), "{refused:?}");
        let lineup = engine.current().unwrap();
        let versions: Vec<String> = lineup.sets().map(|(_, s)| s.info().version.clone()).collect();
        assert_eq!(versions, ["v1", "v2", "v3"], "a refused reload swapped something");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_full_shadow_queue_refuses_at_once_and_the_serving_queue_is_unaffected() {
        let mut cfg = fake::config("unused");
        cfg.experiment_file = Some(experiment_file("shadow", TWO_VARIANTS));
        cfg.shadow_queue_capacity = 1;
        let (engine, _) = started(cfg).await;
        let lineup = engine.current().unwrap();
        let shadow = &lineup.shadow.as_ref().unwrap().variant;
        let busy = engine.shadow(shadow, vec![SLOW, 1], vec![], None, 10).unwrap();
        // the shadow worker (at the lowest priority, so late on a busy machine) takes the slow job
        let waiting = Instant::now();
        while !engine.shadow_tx.is_empty() && waiting.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let queued = engine.shadow(shadow, vec![7, 1], vec![], None, 10).expect("queued behind the slow job");
        let started_at = Instant::now();
        assert!(matches!(engine.shadow(shadow, vec![8, 1], vec![], None, 10), Err(InferenceError::Overloaded(1))));
        // a served request does not wait for the shadow worker's slow batch
        let served = engine.rank(lineup.assign("u"), vec![5, 1], vec![], None, 10, false).await.unwrap();
        assert_eq!(served.ranked.rows[1], 5);
        assert!(started_at.elapsed() < Duration::from_millis(200), "a served request waited for the shadow set");
        assert_eq!(busy.await.unwrap().unwrap().ranked.rows, vec![3, SLOW]);
        assert_eq!(queued.await.unwrap().unwrap().ranked.rows, vec![3, 7]);
    }
}
