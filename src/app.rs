//! Wiring: the service (store, engine, metrics) built from the configuration.

use std::sync::Arc;

use crate::config::Config;
use crate::inference::device::DeviceChoice;
use crate::inference::engine::{Engine, EngineConfig};
use crate::inference::ivf::SearchSpec;
use crate::metrics::Metrics;
use crate::redis::store::ProfileLimits;
use crate::redis::Store;
use crate::service::{Service, ServiceConfig};
use crate::webhook::Webhooks;

/// The engine's settings from the configuration.
pub fn engine_config(cfg: &Config) -> anyhow::Result<EngineConfig> {
    Ok(EngineConfig {
        model_dir: cfg.model_dir.clone(),
        device: DeviceChoice::parse(&cfg.device)?,
        workers: cfg.inference_workers,
        torch_threads: cfg.torch_threads_per_worker(),
        max_batch: cfg.max_batch,
        max_queue_delay: std::time::Duration::from_micros(cfg.max_queue_delay_us),
        queue_capacity: cfg.queue_capacity,
        deadline: cfg.request_timeout(),
        lightgcn_candidates: cfg.lightgcn_candidates,
        din_candidates: cfg.din_candidates,
        search: SearchSpec {
            mode: cfg.candidate_search,
            min_items: cfg.ivf_min_items,
            lists: cfg.ivf_lists,
            probes: cfg.ivf_probes,
        },
        last_stage: cfg.last_stage,
        reload_timeout: cfg.reload_timeout(),
        max_file_bytes: cfg.max_model_file_bytes,
    })
}

/// The service with its Redis store and inference engine (the models load in the background).
pub fn build_service(cfg: &Config) -> anyhow::Result<Arc<Service>> {
    // Everything that can be refused without the models is checked before they start loading.
    let store = Store::new(&cfg.redis)?;
    let engine_cfg = engine_config(cfg)?;
    let service_cfg = ServiceConfig {
        default_k: cfg.default_k,
        max_k: cfg.max_k,
        max_history: cfg.max_history,
        ttl_secs: cfg.recommendation_ttl,
        profile_limits: ProfileLimits { max_bytes: cfg.max_profile_bytes, max_items: cfg.max_profile_items },
    };
    let metrics = Metrics::new();
    // the dead-letter stream's own client: its writes never queue behind the request path's
    let webhooks = Webhooks::start(&cfg.webhook, Store::new(&cfg.redis)?, metrics.clone())?;
    let engine = Engine::start(engine_cfg, metrics.clone());
    Ok(Arc::new(Service::new(store, engine, metrics, service_cfg).with_webhooks(webhooks)))
}
