//! The inference workers: threads that take jobs from one bounded queue, gather what is queued
//! (waiting at most `max_queue_delay` for a batch to fill) into one batch, run it on their own copy
//! of the models of the job's model set, and answer each job through a oneshot channel. Also the
//! model set in service and its reload (load beside, validate, swap). Nothing here runs on a tokio
//! worker thread.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};

use tokio::sync::{oneshot, watch};

use crate::error::{ConfigError, Error};
use crate::inference::device::DeviceChoice;
use crate::inference::ivf::SearchSpec;
use crate::inference::model_set::{LoadSpec, ModelSet};
use crate::inference::models::{Budget, Ranked, Stage, StageStats};
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_dir: PathBuf,
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
}

impl EngineConfig {
    fn budget(&self, k: usize, explain: bool) -> Budget {
        Budget { lightgcn: self.lightgcn_candidates, din: self.din_candidates, k, last_stage: self.last_stage, explain }
    }

    /// How a model set is loaded for these workers (the device resolved against what libtorch sees).
    pub fn load_spec(&self) -> Result<LoadSpec, ConfigError> {
        Ok(LoadSpec {
            device: self.device.resolve(tch::Cuda::device_count().max(0) as usize)?,
            copies: self.workers.max(1),
            torch_threads: self.torch_threads,
            warm_batch: self.max_batch,
            warm_budget: self.budget(10, false),
            search: self.search,
            max_file_bytes: self.max_file_bytes,
        })
    }
}

/// Where the engine is: loading the first model set, serving one, or failed to load at start.
#[derive(Clone)]
pub enum EngineState {
    Loading,
    Ready(Arc<ModelSet>),
    Failed(String),
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

/// What a successful reload replaced.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Reloaded {
    pub model_version: String,
    pub model_dir: String,
    pub previous_version: String,
    pub previous_dir: String,
    pub elapsed_ms: f64,
}

struct Job {
    /// The set whose catalog mapped `history`; the batch runs on the same set.
    set: Arc<ModelSet>,
    history: Vec<i64>,
    exclude: Vec<i64>,
    k: usize,
    explain: bool,
    queued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Scored, Error>>,
}

#[derive(Clone)]
pub struct Engine {
    tx: Sender<Job>,
    state: Arc<watch::Sender<EngineState>>,
    /// One reload at a time: set while a reload's loading thread runs (it clears it when it ends).
    reloading: Arc<AtomicBool>,
    cfg: Arc<EngineConfig>,
    metrics: Metrics,
}

impl Engine {
    /// Starts the inference workers and loads the model set on a background thread; `state()` is
    /// Ready once every worker's copy is loaded and warmed up.
    pub fn start(cfg: EngineConfig, metrics: Metrics) -> Self {
        let (tx, rx) = bounded(cfg.queue_capacity);
        let state = Arc::new(watch::Sender::new(EngineState::Loading));
        let cfg = Arc::new(cfg);
        for n in 0..cfg.workers.max(1) {
            let (cfg, rx, metrics) = (cfg.clone(), rx.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("inference-{n}"))
                .spawn(move || run(n, cfg, rx, metrics))
                .expect("spawning an inference worker");
        }
        let engine = Self { tx, state, reloading: Arc::new(AtomicBool::new(false)), cfg, metrics };
        let loader = engine.clone();
        std::thread::Builder::new()
            .name("model-loader".into())
            .spawn(move || match loader.load(&loader.cfg.model_dir) {
                Ok(set) => loader.swap_in(Arc::new(set)),
                Err(e) => {
                    tracing::error!(error = %e, "model load failed");
                    loader.state.send_replace(EngineState::Failed(e.to_string()));
                }
            })
            .expect("spawning the model loader");
        engine
    }

    pub fn state(&self) -> EngineState {
        self.state.borrow().clone()
    }

    /// The model set in service, if any.
    pub fn current(&self) -> Option<Arc<ModelSet>> {
        match &*self.state.borrow() {
            EngineState::Ready(set) => Some(set.clone()),
            _ => None,
        }
    }

    /// Waits until the first model set is loaded and warmed up, or failed to load.
    pub async fn ready(&self) -> Result<Arc<ModelSet>, ConfigError> {
        let mut state = self.state.subscribe();
        loop {
            match &*state.borrow_and_update() {
                EngineState::Ready(set) => return Ok(set.clone()),
                EngineState::Failed(reason) => return Err(ConfigError::Load(reason.clone())),
                EngineState::Loading => {}
            }
            if state.changed().await.is_err() {
                return Err(ConfigError::Load("the model loader stopped".into()));
            }
        }
    }

    fn load(&self, dir: &std::path::Path) -> Result<ModelSet, ConfigError> {
        ModelSet::load(dir, &self.cfg.load_spec()?)
    }

    fn swap_in(&self, set: Arc<ModelSet>) {
        self.metrics.set_model_info(&set.info);
        tracing::info!(
            version = %set.info.version, dir = %set.dir.display(), device = %set.info.device,
            items = set.info.num_items, workers = self.cfg.workers, torch_threads = self.cfg.torch_threads,
            "models in service"
        );
        self.state.send_replace(EngineState::Ready(set));
    }

    /// Loads `dir` (default: the directory in service) on a thread of its own while the current set
    /// keeps serving, validates it (catalog, shapes, a smoke batch and warm-up on every copy) and
    /// swaps it in atomically: requests already holding the old set finish on it, later ones get
    /// the new one. A directory that fails validation is refused and the old set keeps serving.
    ///
    /// The loading thread, not this future, holds the one-reload-at-a-time flag: a client that
    /// gives up, or the timeout, does not end the load, so further reloads get 409 until it has
    /// really ended. Past `reload_timeout` the caller gets `ReloadTimeout` and the load's result
    /// is discarded. The thread is not joined: SIGTERM ends the process during a reload.
    pub async fn reload(&self, dir: Option<PathBuf>) -> Result<Reloaded, Error> {
        if self.reloading.swap(true, Ordering::SeqCst) {
            return Err(Error::ReloadInProgress);
        }
        let running = ReloadRunning(self.reloading.clone());
        let previous = match self.state() {
            EngineState::Ready(set) => set,
            EngineState::Loading => return Err(Error::ModelsLoading),
            EngineState::Failed(reason) => {
                return Err(Error::EngineStopped(format!("the models failed to load: {reason}")))
            }
        };
        let dir = dir.unwrap_or_else(|| previous.dir.clone());
        let decided = Arc::new(AtomicU8::new(UNDECIDED));
        let (reply, outcome) = oneshot::channel();
        let (engine, decider) = (self.clone(), decided.clone());
        let started = Instant::now();
        std::thread::Builder::new()
            .name("model-reload".into())
            .spawn(move || {
                let _running = running;
                let loaded = engine.load(&dir);
                let _ = reply.send(engine.finish_reload(loaded, &dir, &previous, started, &decider));
            })
            .map_err(|e| Error::ReloadRefused(format!("cannot start the loading thread: {e}")))?;
        let timeout = self.cfg.reload_timeout;
        match tokio::time::timeout(timeout, outcome).await {
            Ok(outcome) => outcome.unwrap_or_else(|_| Err(Error::ReloadRefused("the loading thread failed".into()))),
            Err(_) if decided.compare_exchange(UNDECIDED, TIMED_OUT, Ordering::SeqCst, Ordering::SeqCst).is_ok() => {
                self.metrics.reloads.with_label_values(&["timeout"]).inc();
                tracing::error!(
                    timeout_s = timeout.as_secs_f64(),
                    "reload timed out; the models in service keep \
                    serving, and reloads are refused until the load has ended"
                );
                Err(Error::ReloadTimeout(timeout.as_secs_f64()))
            }
            // The thread decided just in time: its answer is on the way.
            Err(_) => Err(Error::ReloadTimeout(timeout.as_secs_f64())),
        }
    }

    /// On the loading thread: swaps a loaded set in unless the reload timed out.
    fn finish_reload(
        &self,
        loaded: Result<ModelSet, ConfigError>,
        dir: &std::path::Path,
        previous: &ModelSet,
        started: Instant,
        decided: &AtomicU8,
    ) -> Result<Reloaded, Error> {
        let in_time = decided.compare_exchange(UNDECIDED, DECIDED_BY_LOAD, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        match loaded {
            Ok(set) if in_time => {
                let set = Arc::new(set);
                let outcome = Reloaded {
                    model_version: set.info.version.clone(),
                    model_dir: set.dir.display().to_string(),
                    previous_version: previous.info.version.clone(),
                    previous_dir: previous.dir.display().to_string(),
                    elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
                };
                self.swap_in(set);
                self.metrics.reloads.with_label_values(&["success"]).inc();
                Ok(outcome)
            }
            Ok(set) => {
                tracing::warn!(dir = %dir.display(), version = %set.info.version,
                    "a timed-out reload finished loading; discarded");
                Err(Error::ReloadTimeout(self.cfg.reload_timeout.as_secs_f64()))
            }
            Err(e) => {
                if in_time {
                    self.metrics.reloads.with_label_values(&["refused"]).inc();
                }
                tracing::error!(dir = %dir.display(), error = %e, version = %previous.info.version,
                    "reload refused; the models in service keep serving");
                Err(Error::ReloadRefused(e.to_string()))
            }
        }
    }

    /// Queues one history (non-empty, distinct rows of `set`'s catalog) with the rows it must not
    /// be recommended (the whole profile), and waits for its top `k`, computed by `set`'s models
    /// (with each item's per-stage trace when `explain`).
    pub async fn rank(
        &self,
        set: Arc<ModelSet>,
        history: Vec<i64>,
        exclude: Vec<i64>,
        k: usize,
        explain: bool,
    ) -> Result<Scored, Error> {
        let queued = Instant::now();
        let deadline = queued + self.cfg.deadline;
        let (reply, answer) = oneshot::channel();
        match self.tx.try_send(Job { set, history, exclude, k, explain, queued, deadline, reply }) {
            Ok(()) => self.metrics.queue_depth.inc(),
            Err(TrySendError::Full(_)) => return Err(Error::Overloaded(self.cfg.queue_capacity)),
            Err(TrySendError::Disconnected(_)) => {
                return Err(Error::EngineStopped("the inference workers have exited".into()))
            }
        }
        let late = Error::DeadlineExceeded(self.cfg.deadline.as_millis() as u64);
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(result)) => result,
            // A worker answers every job it takes (late ones with DeadlineExceeded); a reply
            // dropped unanswered means the worker thread itself is gone.
            Ok(Err(_)) if Instant::now() >= deadline => Err(late),
            Ok(Err(_)) => Err(Error::EngineStopped("an inference worker exited while running the request".into())),
            Err(_) => Err(late),
        }
    }
}

fn run(worker: usize, cfg: Arc<EngineConfig>, rx: Receiver<Job>, metrics: Metrics) {
    // Sets this thread's own intra-op thread count (each worker runs its batches with it).
    tch::set_num_threads(cfg.torch_threads.max(1) as i32);
    // Waiting for a batch to fill only pays under concurrent load: a worker waits (at most
    // max_queue_delay) only when its previous batch held more than one request, so a lone request
    // never waits for company that is not coming.
    let mut under_load = false;
    loop {
        let delay = if under_load { cfg.max_queue_delay } else { Duration::ZERO };
        let Some(jobs) = gather(&rx, cfg.max_batch.max(1), delay) else { break };
        under_load = jobs.len() > 1;
        let now = Instant::now();
        metrics.queue_depth.sub(jobs.len() as i64);
        for job in &jobs {
            metrics.queue_wait.observe(now.duration_since(job.queued).as_secs_f64());
        }
        let (live, late): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| j.deadline > now);
        for job in late {
            // Its caller answers 503 deadline_exceeded at the same moment, if it has not already.
            let _ = job.reply.send(Err(Error::DeadlineExceeded(cfg.deadline.as_millis() as u64)));
        }
        for same_set in by_model_set(live) {
            metrics.batch_size.observe(same_set.len() as f64);
            run_batch(worker, &cfg, same_set);
        }
    }
}

/// Groups jobs by the model set they were mapped with (more than one only around a reload).
fn by_model_set(jobs: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        match groups.iter_mut().find(|g| Arc::ptr_eq(&g[0].set, &job.set)) {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

/// Blocks for one job, then takes what is queued up to `max_batch`, waiting until `max_delay` after
/// the first job's arrival for the batch to fill. `None` when the queue is closed.
fn gather(rx: &Receiver<Job>, max_batch: usize, max_delay: Duration) -> Option<Vec<Job>> {
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

fn run_batch(worker: usize, cfg: &EngineConfig, jobs: Vec<Job>) {
    let k = jobs.iter().map(|j| j.k).max().unwrap_or(1);
    // Tracing the stages costs a few copies per batch; only batches that hold a request asking pay.
    let explain = jobs.iter().any(|j| j.explain);
    let set = jobs[0].set.clone();
    let histories: Vec<&[i64]> = jobs.iter().map(|j| j.history.as_slice()).collect();
    let excludes: Vec<&[i64]> = jobs.iter().map(|j| j.exclude.as_slice()).collect();
    let batch = histories.len();
    let outcome =
        std::panic::catch_unwind(AssertUnwindSafe(|| set.rank(worker, &histories, &excludes, cfg.budget(k, explain))));
    let result = match outcome {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(e)) => Err(crate::inference::models::torch_error(&e)),
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
                let _ = job.reply.send(Err(Error::Inference(reason.clone())));
            }
        }
    }
}
