//! The shadow set (docs/experiments.md): which served answers it also ranks (an exact share, no
//! randomness), and the hand-over to its queue, off the request path: its list is logged as an
//! impression with `served=false` and compared with the served one (overlap@k), never served or
//! stored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::filters::UnavailableSet;
use super::Recommendation;
use crate::impressions::{self, Impressions};
use crate::inference::engine::Engine;
use crate::inference::error::InferenceError;
use crate::inference::lineup::Lineup;
use crate::inference::model_set::ModelSet;
use crate::metrics::Metrics;
use crate::redis::profile::ProfileRead;

/// The profile an answer ranked and the lineup it was ranked in, kept for the shadow set.
pub struct ShadowInput {
    lineup: Arc<Lineup<ModelSet>>,
    items: Vec<String>,
}

impl std::fmt::Debug for ShadowInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowInput").field("items", &self.items.len()).finish()
    }
}

/// Counts the served answers; the n-th falls in the sample when `floor(n * sample)` steps, so
/// exactly `sample` of them do.
#[derive(Default)]
pub struct ShadowSample(AtomicU64);

impl ShadowSample {
    /// The shadow set's input for an answer of `read`'s profile, when the lineup has a shadow set
    /// and this answer falls in its sample.
    pub fn input(&self, lineup: &Arc<Lineup<ModelSet>>, read: &ProfileRead) -> Option<Arc<ShadowInput>> {
        let shadow = lineup.shadow.as_ref()?;
        let n = self.0.fetch_add(1, Ordering::Relaxed) as f64;
        if ((n + 1.0) * shadow.sample).floor() <= (n * shadow.sample).floor() {
            return None;
        }
        let items = read.profile.as_ref()?.items.clone();
        Some(Arc::new(ShadowInput { lineup: lineup.clone(), items }))
    }
}

/// The served answer a shadow computation stands beside.
pub struct Served<'a> {
    pub request_id: &'a str,
    pub user_id: &'a str,
    pub rec: &'a Recommendation,
    pub source: &'static str,
}

/// Queues a sampled answer's profile for the shadow set, as long as the served list, with the
/// profile and the unavailable items left out (dropped and counted when its queue is full); when
/// ranked, logs its list as an impression with `served=false` and observes its overlap with the
/// served list. Never waits.
pub fn submit(
    engine: &Engine,
    metrics: &Metrics,
    impressions: &Impressions,
    unavailable: &UnavailableSet,
    max_history: usize,
    input: &ShadowInput,
    served: Served<'_>,
) {
    let Some(shadow) = &input.lineup.shadow else { return };
    let set = shadow.variant.set.clone();
    let history = set.catalog.history(&input.items, max_history);
    let k = served.rec.recommendations.len();
    if history.rows.is_empty() || k == 0 {
        return;
    }
    let mask = unavailable.mask(&set.catalog, &set.info.content_sha);
    let masked = (!mask.is_empty()).then_some(mask);
    let Ok(pending) = engine.shadow(&shadow.variant, history.rows, history.exclude, masked, k) else {
        metrics.shadow.with_label_values(&["dropped_full"]).inc();
        return;
    };
    let (metrics, impressions) = (metrics.clone(), impressions.clone());
    let shown: Vec<String> = served.rec.recommendations.iter().map(|i| i.item_id.clone()).collect();
    let (request_id, user_id, source) = (served.request_id.to_string(), served.user_id.to_string(), served.source);
    let name = shadow.variant.name.clone();
    tokio::spawn(async move {
        let scored = match pending.await {
            Ok(Ok(scored)) => scored,
            Ok(Err(InferenceError::DeadlineExceeded(_))) => {
                metrics.shadow.with_label_values(&["late"]).inc();
                return;
            }
            Ok(Err(_)) | Err(_) => {
                metrics.shadow.with_label_values(&["failed"]).inc();
                return;
            }
        };
        metrics.shadow.with_label_values(&["computed"]).inc();
        let items: Vec<String> = scored.ranked.rows.iter().map(|&row| set.catalog.item_id(row).to_string()).collect();
        let common = items.iter().filter(|id| shown.contains(id)).count();
        metrics.shadow_overlap.observe(common as f64 / shown.len().max(1) as f64);
        if impressions.enabled() {
            let mut impression = impressions::served(&request_id, &user_id, &name, &set.info.version, items, source);
            impression.served = false;
            impressions.log(impression);
        }
    });
}
