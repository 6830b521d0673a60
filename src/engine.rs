//! The inference workers: threads that each own a copy of the models, take jobs from one bounded
//! queue, gather what is queued (waiting at most `max_queue_delay` for a batch to fill) into one
//! batch, and answer each job through a oneshot channel. Nothing here runs on a tokio worker
//! thread.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};

use tokio::sync::{oneshot, watch};

use crate::error::{ConfigError, Error};
use crate::metrics::Metrics;
use crate::models::{Budget, DeviceChoice, ModelInfo, Models, Ranked, Stage, StageStats};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_dir: PathBuf,
    pub device: DeviceChoice,
    /// Threads that each own a copy of the models and run batches.
    pub workers: usize,
    /// libtorch intra-op threads of each worker.
    pub torch_threads: usize,
    pub catalog_len: usize,
    pub max_batch: usize,
    /// How long a worker holding fewer than `max_batch` jobs waits for more before it runs them.
    /// Applies only under load (see `run`).
    pub max_queue_delay: Duration,
    /// Bound on batch size x longest history: DIN's work grows with the padded length, so a long
    /// history is not batched with many short ones.
    pub max_batch_cells: usize,
    pub queue_capacity: usize,
    pub deadline: Duration,
    pub lightgcn_candidates: usize,
    pub din_candidates: usize,
    pub last_stage: Stage,
}

/// Where the engine is: loading and warming up, serving, or failed to load.
#[derive(Debug, Clone)]
pub enum EngineState {
    Loading,
    Ready(Arc<ModelInfo>),
    Failed(String),
}

pub struct Scored {
    pub ranked: Ranked,
    pub stats: StageStats,
}

struct Job {
    history: Vec<i64>,
    k: usize,
    queued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Scored, Error>>,
}

#[derive(Clone)]
pub struct Engine {
    tx: Sender<Job>,
    state: watch::Receiver<EngineState>,
    cfg: Arc<EngineConfig>,
    metrics: Metrics,
}

impl Engine {
    /// Starts the inference workers, which load the models and warm them up; `state()` is Ready
    /// once every worker is.
    pub fn start(cfg: EngineConfig, metrics: Metrics) -> Self {
        let (tx, rx) = bounded(cfg.queue_capacity);
        let (state_tx, state) = watch::channel(EngineState::Loading);
        let state_tx = Arc::new(state_tx);
        let cfg = Arc::new(cfg);
        let loaded = Arc::new(AtomicUsize::new(0));
        for n in 0..cfg.workers.max(1) {
            let (cfg, rx, state_tx, loaded, metrics) =
                (cfg.clone(), rx.clone(), state_tx.clone(), loaded.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("inference-{n}"))
                .spawn(move || run(cfg, rx, state_tx, loaded, metrics))
                .expect("spawning an inference worker");
        }
        Self { tx, state, cfg, metrics }
    }

    pub fn state(&self) -> EngineState {
        self.state.borrow().clone()
    }

    /// Waits until the models are loaded and warmed up, or failed to load.
    pub async fn ready(&self) -> Result<Arc<ModelInfo>, ConfigError> {
        let mut state = self.state.clone();
        loop {
            match &*state.borrow_and_update() {
                EngineState::Ready(info) => return Ok(info.clone()),
                EngineState::Failed(reason) => return Err(ConfigError::Load(reason.clone())),
                EngineState::Loading => {}
            }
            if state.changed().await.is_err() {
                return Err(ConfigError::Load("the inference workers stopped while loading".into()));
            }
        }
    }

    /// Queues one history (non-empty, distinct catalog rows) and waits for its top `k`.
    pub async fn rank(&self, history: Vec<i64>, k: usize) -> Result<Scored, Error> {
        if !matches!(self.state(), EngineState::Ready(_)) {
            return Err(Error::EngineStopped);
        }
        let queued = Instant::now();
        let deadline = queued + self.cfg.deadline;
        let (reply, answer) = oneshot::channel();
        match self.tx.try_send(Job { history, k, queued, deadline, reply }) {
            Ok(()) => self.metrics.queue_depth.inc(),
            Err(TrySendError::Full(_)) => return Err(Error::Overloaded(self.cfg.queue_capacity)),
            Err(TrySendError::Disconnected(_)) => return Err(Error::EngineStopped),
        }
        let ms = self.cfg.deadline.as_millis() as u64;
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::EngineStopped),
            Err(_) => Err(Error::DeadlineExceeded(ms)),
        }
    }
}

fn run(
    cfg: Arc<EngineConfig>,
    rx: Receiver<Job>,
    state: Arc<watch::Sender<EngineState>>,
    loaded: Arc<AtomicUsize>,
    metrics: Metrics,
) {
    // Sets this thread's own intra-op thread count (each worker runs its batches with it).
    tch::set_num_threads(cfg.torch_threads.max(1) as i32);
    let models = match load(&cfg) {
        Ok(models) => models,
        Err(e) => {
            tracing::error!(error = %e, "model load failed");
            state.send_replace(EngineState::Failed(e.to_string()));
            return;
        }
    };
    if loaded.fetch_add(1, Ordering::SeqCst) + 1 == cfg.workers.max(1) {
        let info = Arc::new(models.info.clone());
        metrics.set_model_info(&info);
        tracing::info!(
            version = %info.version, device = %info.device, items = info.num_items,
            workers = cfg.workers, torch_threads = cfg.torch_threads, "models loaded and warmed up"
        );
        state.send_replace(EngineState::Ready(info));
    }

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
        drop(late); // their callers have already answered 503
        for batch in split_by_length(live, cfg.max_batch_cells) {
            metrics.batch_size.observe(batch.len() as f64);
            run_batch(&models, &cfg, batch);
        }
    }
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

fn load(cfg: &EngineConfig) -> Result<Models, ConfigError> {
    let device = cfg.device.resolve(tch::Cuda::device_count().max(0) as usize)?;
    let models = Models::load(&cfg.model_dir, device, cfg.catalog_len)?;
    // TorchScript's first calls are slow (profiling executor): warm up at the serving sizes.
    let n = cfg.catalog_len as i64;
    let warm: Vec<Vec<i64>> =
        (0..cfg.max_batch.clamp(1, 8) as i64).map(|i| (0..(1 + i * 3).min(n)).collect()).collect();
    let refs: Vec<&[i64]> = warm.iter().map(|h| h.as_slice()).collect();
    let budget =
        Budget { lightgcn: cfg.lightgcn_candidates, din: cfg.din_candidates, k: 10, last_stage: cfg.last_stage };
    for _ in 0..3 {
        models.rank(&refs, budget).map_err(|e| ConfigError::Model {
            dir: cfg.model_dir.display().to_string(),
            reason: format!("warm-up failed: {e}"),
        })?;
    }
    Ok(models)
}

/// Sorts jobs by history length and cuts them into batches whose size times longest history stays
/// within `max_cells` (a job alone may exceed it).
fn split_by_length(mut jobs: Vec<Job>, max_cells: usize) -> Vec<Vec<Job>> {
    jobs.sort_by_key(|j| j.history.len());
    let mut out: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        let cells = job.history.len().max(1);
        match out.last_mut() {
            Some(batch) if (batch.len() + 1) * cells <= max_cells => batch.push(job),
            _ => out.push(vec![job]),
        }
    }
    out
}

fn run_batch(models: &Models, cfg: &EngineConfig, jobs: Vec<Job>) {
    let k = jobs.iter().map(|j| j.k).max().unwrap_or(1);
    let budget = Budget { lightgcn: cfg.lightgcn_candidates, din: cfg.din_candidates, k, last_stage: cfg.last_stage };
    let histories: Vec<&[i64]> = jobs.iter().map(|j| j.history.as_slice()).collect();
    let batch = histories.len();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| models.rank(&histories, budget)));
    let result = match outcome {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the inference thread caught a panic".to_string()),
    };
    match result {
        Ok((ranked, times)) => {
            for (job, mut r) in jobs.into_iter().zip(ranked) {
                r.rows.truncate(job.k);
                r.scores.truncate(job.k);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(len: usize) -> Job {
        let (reply, _) = oneshot::channel();
        let now = Instant::now();
        Job { history: vec![0; len], k: 1, queued: now, deadline: now, reply }
    }

    #[test]
    fn batches_group_similar_lengths_within_the_cell_budget() {
        let jobs = [3, 200, 5, 4, 150, 2].into_iter().map(job).collect();
        let lens: Vec<Vec<usize>> =
            split_by_length(jobs, 64).iter().map(|b| b.iter().map(|j| j.history.len()).collect()).collect();
        assert_eq!(lens, vec![vec![2, 3, 4, 5], vec![150], vec![200]]);
        let all_short = (0..20).map(|_| job(3)).collect();
        let sizes: Vec<usize> = split_by_length(all_short, 30).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![10, 10]);
    }
}
