//! The `model-service` command: parses the configuration and runs a mode (serve, listen, ingest,
//! backfill, recommend, check) on the library in src/lib.rs.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use model_service::api::{routes as http, server};
use model_service::app::{build_service, engine_config};
use model_service::config::{Cli, Command, Config, LogFormat};
use model_service::inference::model_set::{LoadSpec, ModelSet};
use model_service::service::Service;
use model_service::workers::{backfill, ingest, listener};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "model_service=info,warn".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        // One line per record: control characters inside a field are escaped (src/logging.rs).
        .with_writer(model_service::logging::OneLine::new(std::io::stderr, ansi))
        // A log line that cannot be written is dropped. tracing-subscriber's default reports the
        // failure with eprintln!, which panics when stderr itself is the broken pipe (a log
        // collector that went away): the logging task or thread died, SIGTERM among them.
        .log_internal_errors(false);
    match cli.config.log_format {
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => logs.init(),
    }
    let result = cli.config.validate().map_err(anyhow::Error::from).and_then(|()| match cli.command {
        Command::Check => check(&cli.config),
        Command::Serve { listen, ingest } => runtime()?.block_on(serve(cli.config, Mode::Api { listen, ingest })),
        Command::Listen { ingest } => runtime()?.block_on(serve(cli.config, Mode::Ops { listen: true, ingest })),
        Command::Ingest => runtime()?.block_on(serve(cli.config, Mode::Ops { listen: false, ingest: true })),
        Command::Backfill { restart } => runtime()?.block_on(run_backfill(cli.config, restart)),
        Command::Recommend { user_id, k } => runtime()?.block_on(recommend_once(cli.config, user_id, k)),
    });
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("model-service: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Leave without running libtorch's static destructors: threads may still be inside libtorch
    // (a model load cut short by SIGTERM, an inference worker finishing a batch whose callers
    // have gone), and destroying its globals under them fails their work or crashes the process.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let _ = std::io::Write::flush(&mut std::io::stderr());
    // SAFETY: _exit ends the process; no Rust code runs after it.
    unsafe { libc::_exit(if code == ExitCode::SUCCESS { 0 } else { 1 }) }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The HTTP API, optionally with the listener and the Kafka ingestion in the same process.
    Api { listen: bool, ingest: bool },
    /// The listener and/or the Kafka ingestion, with /health and /metrics over HTTP.
    Ops { listen: bool, ingest: bool },
}

async fn serve(cfg: Config, mode: Mode) -> anyhow::Result<ExitCode> {
    // Bind first: a taken port fails in milliseconds, before any model starts loading.
    let addr = cfg.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let access = http::Access::from_config(&cfg);
    let limits = server::Limits::from_config(&cfg);
    let admin_here = cfg.admin_port.is_none();
    let (routes, listen, ingest) = match mode {
        Mode::Api { listen, ingest } => (http::Routes::Api { admin: admin_here }, listen, ingest),
        Mode::Ops { listen, ingest } => (http::Routes::Ops { admin: admin_here }, listen, ingest),
    };
    let admin = match cfg.admin_addr()? {
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
    tracing::info!(%addr, ?mode, model_dir = %cfg.model_dir.display(), "listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = on_signal.send(true);
    });
    tokio::spawn(reload_on_sighup(service.clone()));
    let grace = std::time::Duration::from_secs(cfg.listener.shutdown_grace_secs);
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
                    listener::Listener::new(service.clone(), cfg.listener.clone()).run(stop_rx.clone()).await?;
                }
                anyhow::Ok(())
            };
            let ingesting = async {
                if ingest {
                    let limits = ingest::limits(&cfg);
                    ingest::Ingest::new(service.clone(), cfg.ingest.clone(), limits, grace)
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
    Ok(ExitCode::SUCCESS)
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

async fn run_backfill(cfg: Config, restart: bool) -> anyhow::Result<ExitCode> {
    let service = build_service(&cfg)?;
    let summary = backfill::run(service.clone(), restart, cfg.listener.listener_concurrency).await;
    service.webhooks.shutdown(cfg.webhook.drain()).await;
    let summary = summary?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(if summary.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn shutdown_signal() {
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

async fn recommend_once(cfg: Config, user_id: String, k: Option<usize>) -> anyhow::Result<ExitCode> {
    let service = build_service(&cfg)?;
    service.engine.ready().await?;
    let k = k.unwrap_or(cfg.default_k);
    let answer = service.recommend(&user_id, model_service::service::Ask { k, explain: false }).await;
    service.webhooks.shutdown(cfg.webhook.drain()).await;
    match answer {
        Ok(rec) => {
            println!("{}", serde_json::to_string_pretty(&rec)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("{}", serde_json::to_string_pretty(&model_service::api::error::ApiError::from(e).body())?);
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Loads and validates MODEL_DIR exactly as a reload does (catalog, shapes, smoke batch, warm-up).
fn check(cfg: &Config) -> anyhow::Result<ExitCode> {
    let spec = LoadSpec { copies: 1, ..engine_config(cfg)?.load_spec()? };
    let set = ModelSet::load(&cfg.model_dir, &spec)?;
    let summary = serde_json::json!({
        "status": "ok",
        "model_dir": cfg.model_dir.display().to_string(),
        "model_version": set.info.version,
        "device": set.info.device,
        "catalog_items": set.catalog.len(),
        "stages": set.info.stages,
        "candidates": { "lightgcn": cfg.lightgcn_candidates, "din": cfg.din_candidates },
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(ExitCode::SUCCESS)
}
