//! Wiring: the service (store, engine, metrics, webhooks) built from the configuration, and each
//! command run on it: `run` (serve, listen, ingest: the HTTP listeners, signals, the listener and
//! the ingestion), `backfill`, `recommend` and `check`.

use std::sync::Arc;

use anyhow::Context;

use crate::api::{routes as http, server};
use crate::config::Config;
use crate::impressions::Impressions;
use crate::inference::engine::Engine;
use crate::inference::experiment::ExperimentSpec;
use crate::inference::lineup::DEFAULT_VARIANT;
use crate::inference::model_set::{LoadSpec, ModelSet};
use crate::metrics::Metrics;
use crate::redis::Store;
use crate::service::Service;
use crate::webhook::Webhooks;
use crate::workers::{backfill, ingest, listener};

/// The service with its Redis store and inference engine (the models load in the background).
pub fn build_service(cfg: &Config) -> anyhow::Result<Arc<Service>> {
    // Everything that can be refused without the models is checked before they start loading.
    let store = Store::new(&cfg.redis)?;
    let engine_cfg = cfg.engine.engine_config()?;
    let service_cfg = cfg.service.service_config();
    let metrics = Metrics::new();
    // the dead-letter stream's own client: its writes never queue behind the request path's
    let webhooks = Webhooks::start(&cfg.webhook, Store::new(&cfg.redis)?, metrics.clone())?;
    let impressions = Impressions::start(&cfg.impressions, &cfg.kafka, Store::new(&cfg.redis)?, metrics.clone())?;
    let engine = Engine::start(engine_cfg, metrics.clone());
    Ok(Arc::new(
        Service::new(store, engine, metrics, service_cfg).with_webhooks(webhooks).with_impressions(impressions),
    ))
}

/// What a serving process runs besides `/health` and `/metrics`.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// The HTTP API, optionally with the listener and the Kafka ingestion in the same process.
    Api { listen: bool, ingest: bool },
    /// The listener and/or the Kafka ingestion, with /health and /metrics over HTTP.
    Ops { listen: bool, ingest: bool },
}

/// Serves `mode` on `listener` (and the admin listener when ADMIN_PORT is set) until `shutdown`
/// completes, or a listener or ingestion that cannot go on ends it with an error. Tests call it
/// in-process; the binary binds the configured address first (a taken port fails before any
/// model starts loading).
pub async fn run(
    cfg: Config,
    mode: Mode,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let access = http::Access::new(&cfg.http, cfg.service.max_profile_bytes);
    let limits = server::Limits::new(&cfg.http);
    let admin_here = cfg.http.admin_port.is_none();
    let (routes, listen, ingest) = match mode {
        Mode::Api { listen, ingest } => (http::Routes::Api { admin: admin_here }, listen, ingest),
        Mode::Ops { listen, ingest } => (http::Routes::Ops { admin: admin_here }, listen, ingest),
    };
    let admin = match cfg.http.admin_addr()? {
        Some(admin_addr) => {
            let l = tokio::net::TcpListener::bind(admin_addr)
                .await
                .with_context(|| format!("cannot listen on the admin address {admin_addr}"))?;
            tracing::info!(addr = %admin_addr, "admin routes listening (loopback only)");
            Some(l)
        }
        None => None,
    };
    let service = build_service(&cfg)?;
    tracing::info!(%addr, ?mode, model_dir = %cfg.engine.model_dir.display(), "listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = on_signal.send(true);
    });
    tokio::spawn(reload_on_sighup(service.clone()));
    let grace = cfg.http.shutdown_grace();
    let requests = service.metrics.http_requests.clone();
    let app = http::router(service.clone(), routes, &access);
    let main_server = server::serve(listener, app, limits, stop_rx.clone(), grace, requests.clone());
    let admin_server = async {
        match admin {
            Some(l) => {
                let app = http::router(service.clone(), http::Routes::Admin, &access);
                server::serve(l, app, limits, stop_rx.clone(), grace, requests.clone()).await
            }
            None => Ok(()),
        }
    };
    // The server answers /health/live at once; a model directory that fails to load, or a
    // listener or ingestion that cannot start, ends the process with an error.
    let work = async {
        let result = async {
            let mut stopping = stop_rx.clone();
            tokio::select! {
                ready = service.engine.ready() => {
                    ready?;
                }
                // SIGTERM before the first model set is in service: nothing to wait for (a large
                // catalog's load and index build take seconds to minutes)
                _ = stopping.wait_for(|stop| *stop) => return anyhow::Ok(()),
            }
            let listening = async {
                if listen {
                    listener::Listener::new(service.clone(), cfg.listener.clone(), grace).run(stop_rx.clone()).await?;
                }
                anyhow::Ok(())
            };
            let ingesting = async {
                if ingest {
                    let limits = ingest::limits(&cfg.ingest, cfg.service.profile_limits());
                    ingest::Ingest::new(service.clone(), cfg.kafka.clone(), cfg.ingest.clone(), limits, grace)
                        .run(stop_rx.clone())
                        .await?;
                }
                anyhow::Ok(())
            };
            tokio::try_join!(listening, ingesting)?;
            anyhow::Ok(())
        }
        .await;
        if result.is_err() {
            let _ = stop_tx.send(true);
        }
        result
    };
    let (served, admin_served, worked) = tokio::join!(main_server, admin_server, work);
    // listener and ingestion have stopped: deliver the webhooks still queued (bounded)
    service.webhooks.shutdown(cfg.webhook.drain()).await;
    worked?;
    served.context("HTTP server")?;
    admin_served.context("admin HTTP server")?;
    tracing::info!("shut down");
    Ok(())
}

/// SIGHUP reloads the model directory in service (validated; refused if broken, see Engine::reload).
async fn reload_on_sighup(service: Arc<Service>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/reload");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the model directory");
            match service.engine.reload(None).await {
                Ok(r) => tracing::info!(version = %r.model_version, previous = %r.previous_version,
                    dir = %r.model_dir, ms = r.elapsed_ms, "models reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP reload failed"),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = service;
}

/// `backfill`: recomputes every profile's list, prints the summary; false when any failed.
pub async fn run_backfill(cfg: Config, restart: bool) -> anyhow::Result<bool> {
    let service = build_service(&cfg)?;
    let summary = backfill::run(service.clone(), restart, cfg.listener.listener_concurrency).await;
    service.webhooks.shutdown(cfg.webhook.drain()).await;
    let summary = summary?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(summary.failed == 0)
}

/// `recommend`: one computation, written to Redis like the server's, printed as JSON (an error
/// as the HTTP API's body); false on an error.
pub async fn recommend_once(cfg: Config, user_id: String, k: Option<usize>) -> anyhow::Result<bool> {
    let service = build_service(&cfg)?;
    service.engine.ready().await?;
    let k = k.unwrap_or(cfg.service.default_k);
    let answer = service.recommend(&user_id, crate::service::Ask { k, explain: false }, &[]).await;
    service.webhooks.shutdown(cfg.webhook.drain()).await;
    match answer {
        Ok(rec) => {
            println!("{}", serde_json::to_string_pretty(&rec)?);
            Ok(true)
        }
        Err(e) => {
            println!("{}", serde_json::to_string_pretty(&crate::api::error::ApiError::from(e).body())?);
            Ok(false)
        }
    }
}

/// SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received, draining in-flight requests");
}

/// Loads and validates MODEL_DIR exactly as a reload does (catalog, shapes, smoke batch, warm-up);
/// with EXPERIMENT_FILE, the file and every set it names.
pub fn check(cfg: &Config) -> anyhow::Result<()> {
    let spec = LoadSpec { copies: 1, ..cfg.engine.engine_config()?.load_spec()? };
    let experiment = match &cfg.engine.experiment_file {
        Some(file) => Some(ExperimentSpec::read(file)?),
        None => None,
    };
    let dirs: Vec<(String, std::path::PathBuf)> = match &experiment {
        Some(e) => e
            .variants
            .iter()
            .map(|v| (v.name.clone(), v.model_dir.clone()))
            .chain(e.shadow.iter().map(|s| (s.name.clone(), s.model_dir.clone())))
            .collect(),
        None => vec![(DEFAULT_VARIANT.to_string(), cfg.engine.model_dir.clone())],
    };
    let mut sets = Vec::new();
    for (name, dir) in &dirs {
        let set = ModelSet::load(dir, &spec)?;
        sets.push(serde_json::json!({
            "variant": name,
            "model_dir": dir.display().to_string(),
            "model_version": set.info.version,
            "device": set.info.device,
            "catalog_items": set.catalog.len(),
            "stages": set.info.stages,
        }));
    }
    let first = sets[0].clone();
    let summary = serde_json::json!({
        "status": "ok",
        "model_dir": first["model_dir"],
        "model_version": first["model_version"],
        "device": first["device"],
        "catalog_items": first["catalog_items"],
        "stages": first["stages"],
        "candidates": { "lightgcn": cfg.engine.lightgcn_candidates, "din": cfg.engine.din_candidates },
        "experiment": experiment.as_ref().map(|e| e.name.clone()),
        "sets": sets,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
