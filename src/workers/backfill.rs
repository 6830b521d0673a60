//! `model-service backfill`: recompute every profile found by SCAN, with a progress bar and a
//! summary. Memory is bounded by one SCAN page. Every master is scanned in turn (one node outside a
//! cluster); the cursor of each is saved in Redis after every page, so an interrupted run resumes
//! where it stopped (and `Service::refresh` skips what is done).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::service::{Refresh, Service};

pub const CURSOR_KEY: &str = "model_service:backfill:cursor";
const PAGE: usize = 500;

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub scanned: u64,
    pub written: u64,
    pub unchanged: u64,
    pub failed: u64,
    /// Profiles that changed while they were computed (their new value is computed by whoever
    /// wrote it, or by the next run).
    pub superseded: u64,
    /// Keys under `user_profile:` whose name is not UTF-8 (no valid user id), skipped.
    pub skipped_keys: u64,
    /// Failures by error code.
    pub failures: BTreeMap<String, u64>,
    pub resumed: bool,
    pub seconds: f64,
}

pub async fn run(service: Arc<Service>, restart: bool, concurrency: usize) -> anyhow::Result<Summary> {
    service.engine.ready().await?;
    let store = &service.store;
    if restart {
        store.delete(CURSOR_KEY).await?;
    }
    let saved = store.get_string(CURSOR_KEY).await?;
    let mut summary = Summary { resumed: saved.is_some(), ..Default::default() };
    // Count the profiles first (keys only) for the progress bar; on a resumed run the bar shows
    // what remains to be scanned as an upper bound.
    let mut total = 0u64;
    let mut counting = store.scan_start(None).await?;
    while !counting.is_done() {
        total += store.scan_profiles(&mut counting, PAGE * 4).await?.users.len() as u64;
    }
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} profiles ({per_sec}, eta {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut cursor = store.scan_start(saved.as_deref()).await?;
    let mut next_report = total / 10;
    while !cursor.is_done() {
        let page = store.scan_profiles(&mut cursor, PAGE).await?;
        summary.skipped_keys += page.skipped;
        let results: Vec<_> = futures_util::stream::iter(page.users)
            .map(|user| {
                let service = service.clone();
                async move { service.refresh_from(&user, crate::webhook::Origin::Backfill).await }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        for result in results {
            summary.scanned += 1;
            match result {
                Ok(Refresh::Written) => summary.written += 1,
                Ok(Refresh::Unchanged) => summary.unchanged += 1,
                Ok(Refresh::Superseded) => summary.superseded += 1,
                Err(e) => {
                    summary.failed += 1;
                    *summary.failures.entry(e.code().to_string()).or_default() += 1;
                }
            }
        }
        bar.set_position(summary.scanned);
        bar.set_message(format!(
            "{} written, {} unchanged, {} failed",
            summary.written, summary.unchanged, summary.failed
        ));
        if bar.is_hidden() && summary.scanned >= next_report {
            eprintln!("backfill: {}/{} profiles ({} failed)", summary.scanned, total, summary.failed);
            next_report += (total / 10).max(1);
        }
        if !cursor.is_done() {
            store.set_string(CURSOR_KEY, &cursor.encode()).await?;
        }
    }
    store.delete(CURSOR_KEY).await?;
    bar.finish();
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
