//! Making a recommendation: validate -> read profile -> rank -> write. HTTP and the `recommend`
//! command call `Service::recommend`; the listener and backfill call `Service::refresh`.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

pub mod filters;
pub mod ingest_health;
pub mod settings;
pub mod shadow;
pub mod single_flight;

use crate::error::Error;
use crate::impressions::{self, Impressions};
use crate::inference::engine::Engine;
use crate::inference::engine::EngineState;
use crate::inference::error::InferenceError;
use crate::inference::lineup::{Lineup, Variant, DEFAULT_VARIANT};
use crate::inference::model_set::ModelSet;
use crate::metrics::Metrics;
use crate::redis::error::ProfileError;
use crate::redis::profile::ProfileRead;
use crate::redis::store::{ModelId, ProfileLimits, StoredList, Written};
use crate::redis::Store;
use crate::webhook::{ListWritten, Origin, WebhookItem, Webhooks};
use filters::{Exclusions, Filtered, UnavailableCache, UnavailableSet, UnavailableStatus};
use shadow::{Served, ShadowInput, ShadowSample};
use single_flight::SingleFlight;

/// Longest user id, in characters (Unicode scalar values), as JSON Schema's `maxLength` counts
/// them: the OpenAPI document states the same bound.
pub const MAX_USER_ID_CHARS: usize = 128;

/// How the list was made: the cascade on the profile, or the catalog's popularity order (no item of
/// the profile is in the catalog).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Personalized,
    Popular,
}

impl Strategy {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "personalized" => Some(Self::Personalized),
            "popular" => Some(Self::Popular),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Personalized => "personalized",
            Self::Popular => "popular",
        }
    }
}

/// Where the answer came from: computed for this request, or read from Redis (cache-first reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Computed,
    Cache,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Item {
    pub item_id: String,
    /// The last stage's score (RankNet; with the popular strategy, the item's popularity).
    pub score: f32,
    /// With `explain=true`: the item's score and rank after each stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<ItemStages>,
}

/// Where one returned item stood after each stage that ran.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ItemStages {
    pub lightgcn: StagePlace,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub din: Option<StagePlace>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranknet: Option<StagePlace>,
}

#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct StagePlace {
    pub score: f32,
    /// 1 = the stage's best.
    pub rank: usize,
}

/// With `explain=true`: candidates handed on and time spent per stage.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Explanation {
    /// Items each stage handed on (absent for the popular strategy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidates: Option<StageCandidates>,
    /// Milliseconds per step; the model stages are the batch's times.
    pub stage_ms: StageTimes,
    /// What the filters (unavailable items, the request's `exclude`) kept out, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filtered: Option<Filtered>,
}

#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct StageCandidates {
    pub lightgcn: usize,
    pub din: usize,
    pub ranknet: usize,
}

#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct StageTimes {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_read: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lightgcn: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub din: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranknet: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_write: Option<f64>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Recommendation {
    /// The user whose stored profile was ranked; null for a history sent in the request.
    pub user_id: Option<String>,
    pub recommendations: Vec<Item>,
    pub strategy: Strategy,
    /// Cache-first reads only (`GET /recommendations`): `cache` or `computed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    pub model_version: String,
    /// The variant that ranked it: `default` without an experiment (EXPERIMENT_FILE).
    pub variant: String,
    /// Profile entries that are not in the catalog (skipped).
    pub unknown_items: usize,
    /// Profile items the models did not see because the profile is longer than MAX_HISTORY
    /// (oldest first); they are still excluded from the list.
    pub truncated_items: usize,
    /// Ids of the request's `exclude` that are not in the catalog (ignored); absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub unknown_excluded: usize,
    pub elapsed_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<Explanation>,
    /// What the shadow set needs to rank the same profile (only for the answers in its sample).
    #[serde(skip)]
    pub(crate) shadow_input: Option<Arc<ShadowInput>>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What a request asks for besides whose profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ask {
    pub k: usize,
    pub explain: bool,
}

/// What `Service::refresh` did.
#[derive(Debug)]
pub enum Refresh {
    Written,
    /// The stored list was computed from the same profile by the same model version.
    Unchanged,
    /// The profile changed while this computation ran; the change's own event recomputes it.
    Superseded,
}

pub struct ServiceConfig {
    pub default_k: usize,
    pub max_k: usize,
    pub max_history: usize,
    pub ttl_secs: u64,
    pub profile_limits: ProfileLimits,
    /// Most ids a request's `exclude` may hold (MAX_EXCLUDE).
    pub max_exclude: usize,
    /// How old the cached set of unavailable items may grow (UNAVAILABLE_REFRESH_MS).
    pub unavailable_refresh: std::time::Duration,
    /// Largest set of unavailable items taken (MAX_UNAVAILABLE).
    pub max_unavailable: usize,
}

/// Requests share a computation only when they read the same profile value and would rank it
/// with the same models for the same question and the same unavailable items: (user id, ask,
/// items ranked beyond k for the request's exclusions, profile hash, model version, generation of
/// the unavailable set). Each caller then cuts its own exclusions from the shared ranking.
type FlightKey = (String, Ask, usize, String, String, u64);

pub struct Service {
    pub store: Store,
    pub engine: Engine,
    pub metrics: Metrics,
    /// Announces written lists to WEBHOOK_URL (disabled unless set; see `with_webhooks`).
    pub webhooks: Webhooks,
    /// Logs the lists served over HTTP (IMPRESSIONS; disabled unless set, see `with_impressions`).
    pub impressions: Impressions,
    /// What `/health` says of the Kafka ingestion's dead letters (set by the ingestion).
    pub ingest_dead_letter: ingest_health::DeadLetterHealth,
    cfg: ServiceConfig,
    /// The set of unavailable items (`items:unavailable`), cached.
    unavailable: UnavailableCache,
    /// Computations in flight: single flight.
    in_flight: SingleFlight<FlightKey, Result<Recommendation, Error>>,
    /// Which served answers the shadow set also ranks.
    shadow_sample: ShadowSample,
}

/// A user id is 1..=128 characters, all printable: no whitespace (Unicode White_Space), and
/// nothing of the Unicode general category Other (control, format such as zero-width and
/// bidirectional overrides, surrogate, private use, unassigned). `*`, `:`, `{` and other
/// punctuation are allowed: keys are built by concatenation and used in plain GET/SET, never as a
/// pattern.
pub fn validate_user_id(user_id: &str) -> Result<(), Error> {
    if user_id.is_empty() {
        return Err(Error::InvalidUserId("the user id is empty".into()));
    }
    let chars = user_id.chars().count();
    if chars > MAX_USER_ID_CHARS {
        return Err(Error::InvalidUserId(format!(
            "the user id is {chars} characters, at most {MAX_USER_ID_CHARS} are allowed"
        )));
    }
    if let Some(c) = user_id.chars().find(|&c| !user_id_char(c)) {
        use unicode_properties::UnicodeGeneralCategory;
        return Err(Error::InvalidUserId(format!(
            "the user id contains the character {c:?} (U+{:04X}, {:?}): whitespace, control, format (zero-width, \
             bidirectional) and unassigned characters are not allowed",
            c as u32,
            c.general_category()
        )));
    }
    Ok(())
}

/// The one rule for a user id's characters: printable, that is neither whitespace nor of the
/// Unicode category Other (control, format, surrogate, private use, unassigned).
pub fn user_id_char(c: char) -> bool {
    use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};
    !c.is_whitespace() && c.general_category_group() != GeneralCategoryGroup::Other
}

/// `user_id_char` as a JSON Schema `pattern` (the OpenAPI document's): one character class of the
/// allowed ranges of the Basic Multilingual Plane, each bound written `\uXXXX`, which ECMA-262,
/// Python's `re` and Rust's regex all read alike. Characters beyond the BMP are left out of the
/// pattern (engines see them as one code point or as two UTF-16 surrogates); the server accepts
/// those that `user_id_char` allows (assigned, not private use), as the parameter's description says.
pub fn user_id_pattern() -> String {
    let mut class = String::new();
    let mut start: Option<u32> = None;
    // the surrogates (U+D800..U+DFFF) are no chars: they close a range like a refused character
    for cp in 0..=0x1_0000u32 {
        let allowed = cp < 0x1_0000 && char::from_u32(cp).is_some_and(user_id_char);
        match (allowed, start) {
            (true, None) => start = Some(cp),
            (false, Some(first)) => {
                let last = cp - 1;
                class.push_str(&format!("\\u{first:04X}"));
                if last > first {
                    class.push_str(&format!("-\\u{last:04X}"));
                }
                start = None;
            }
            _ => {}
        }
    }
    format!("^[{class}]+$")
}

impl Service {
    pub fn new(store: Store, engine: Engine, metrics: Metrics, cfg: ServiceConfig) -> Self {
        Self {
            store,
            engine,
            metrics,
            webhooks: Webhooks::disabled(),
            impressions: Impressions::disabled(),
            ingest_dead_letter: Default::default(),
            unavailable: UnavailableCache::new(cfg.unavailable_refresh, cfg.max_unavailable),
            cfg,
            in_flight: SingleFlight::default(),
            shadow_sample: ShadowSample::default(),
        }
    }

    /// Announces every list this service writes to `webhooks` (src/webhook.rs).
    pub fn with_webhooks(mut self, webhooks: Webhooks) -> Self {
        self.webhooks = webhooks;
        self
    }

    /// Logs every list this service serves over HTTP to `impressions` (src/impressions.rs).
    pub fn with_impressions(mut self, impressions: Impressions) -> Self {
        self.impressions = impressions;
        self
    }

    /// After a served answer of `user_id`'s profile: logs it as an impression (a no-op when
    /// IMPRESSIONS=off), and when the answer fell in the shadow set's sample queues the same
    /// profile for the shadow set. Never waits.
    pub fn served(&self, request_id: &str, user_id: &str, rec: &Recommendation) {
        let source = match rec.source {
            Some(Source::Cache) => "cache",
            _ => "computed",
        };
        if self.impressions.enabled() {
            let items = rec.recommendations.iter().map(|i| i.item_id.clone()).collect();
            self.impressions.log(impressions::served(
                request_id,
                user_id,
                &rec.variant,
                &rec.model_version,
                items,
                source,
            ));
        }
        if let Some(input) = &rec.shadow_input {
            let unavailable = self.unavailable.current();
            let served = Served { request_id, user_id, rec, source };
            shadow::submit(
                &self.engine,
                &self.metrics,
                &self.impressions,
                &unavailable,
                self.cfg.max_history,
                input,
                served,
            );
        }
    }

    /// The largest `k` (MAX_K).
    pub fn max_k(&self) -> usize {
        self.cfg.max_k
    }

    /// Parses `k` from a request (absent: the default).
    pub fn parse_k(&self, raw: Option<&str>) -> Result<usize, Error> {
        let Some(raw) = raw else { return Ok(self.cfg.default_k) };
        let k = raw.trim().parse::<i64>().map_err(|_| {
            Error::InvalidK(format!("k must be an integer between 1 and {}, got {raw:?}", self.cfg.max_k))
        })?;
        self.check_k(k)
    }

    /// The one range check of k (HTTP query, CLI flag, listener default).
    fn check_k(&self, k: i64) -> Result<usize, Error> {
        let max = self.cfg.max_k;
        if (1..=max as i64).contains(&k) {
            Ok(k as usize)
        } else {
            Err(Error::InvalidK(format!("k must be between 1 and {max}, got {k}")))
        }
    }

    /// `POST /recommend/{user_id}`: reads the profile, ranks it and writes
    /// `recommendations:<user_id>`. The answer reflects the profile as it was when this request
    /// read it, never an older value: concurrent requests share one computation (single flight)
    /// only when they read the same profile value for the same ask and model version; if the
    /// computing one is cancelled, a waiting one computes instead.
    ///
    /// `exclude` (item ids) shapes this answer only: the cascade ranks `k` more items than there
    /// are known excluded ids, the stored list is its first `k` (the list without them), the answer
    /// its first `k` that are not excluded.
    pub async fn recommend(&self, user_id: &str, ask: Ask, exclude: &[String]) -> Result<Recommendation, Error> {
        let mut rec = self.answer(user_id, ask, exclude, false).await?;
        rec.source = None;
        Ok(rec)
    }

    /// `GET /recommendations/{user_id}`: cache-first. The stored list answers when it was computed
    /// from the profile as it is now by the model version in service and holds at least `k` items
    /// besides the unavailable and excluded ones (`"source": "cache"`, no model runs); otherwise
    /// as `recommend`, sharing its single flight. `explain` always computes (the trace is not
    /// stored).
    pub async fn recommendations(&self, user_id: &str, ask: Ask, exclude: &[String]) -> Result<Recommendation, Error> {
        let mut rec = self.answer(user_id, ask, exclude, !ask.explain).await?;
        rec.source.get_or_insert(Source::Computed);
        Ok(rec)
    }

    /// `POST /recommend` with a history in the body (an anonymous session): ranks it with the same
    /// validation, caps and filters as a stored profile, writes nothing.
    /// The variant is the `session_id`'s (as a user id's), else the first variant.
    pub async fn rank_history(
        &self,
        history: &[String],
        session_id: Option<&str>,
        ask: Ask,
        exclude: &[String],
    ) -> Result<Recommendation, Error> {
        let started = Instant::now();
        self.check_k(i64::try_from(ask.k).unwrap_or(i64::MAX))?;
        self.check_exclude(exclude)?;
        let max = self.cfg.profile_limits.max_items;
        if history.len() > max {
            return Err(ProfileError::TooLong { key: "the request body".into(), items: history.len(), max }.into());
        }
        let lineup = self.lineup()?;
        let variant = match session_id {
            Some(session) => lineup.assign(session),
            None => lineup.primary(),
        };
        let unavailable = self.unavailable().await;
        let excl = self.exclusions(exclude, &variant.set);
        let mut explain = ask.explain.then(Explanation::default);
        let wide = Ask { k: ask.k + excl.len(), explain: ask.explain };
        let ranking = self.rank_items(history, wide, variant, &unavailable, explain.as_mut()).await;
        let ranking = self.count(variant, ranking, "computed")?;
        let rec = ranking.into_answer(None, variant, started, explain);
        Ok(self.cut(rec, &excl, ask.k))
    }

    /// The most ids an `exclude` may hold (MAX_EXCLUDE).
    pub fn max_exclude(&self) -> usize {
        self.cfg.max_exclude
    }

    /// The one bound on a request's `exclude`.
    fn check_exclude(&self, exclude: &[String]) -> Result<(), Error> {
        let max = self.cfg.max_exclude;
        if exclude.len() > max {
            return Err(Error::InvalidExclude(format!(
                "exclude holds {} item ids, at most {max} are allowed (MAX_EXCLUDE)",
                exclude.len()
            )));
        }
        Ok(())
    }

    /// A request's exclusions on `set`'s catalog; the ids not in it are counted and ignored.
    fn exclusions<'a>(&self, exclude: &'a [String], set: &ModelSet) -> Exclusions<'a> {
        let excl = Exclusions::new(exclude, &set.catalog);
        self.metrics.exclude_unknown_items.inc_by(excl.unknown.len() as u64);
        excl
    }

    /// The answer to one request from a ranking shared by requests with as many exclusions: its
    /// excluded items left out, cut to `k`.
    fn cut(&self, mut rec: Recommendation, excl: &Exclusions, k: usize) -> Recommendation {
        let mut removed = Vec::new();
        if !excl.is_empty() {
            rec.recommendations.retain(|item| {
                let keep = !excl.ids.contains(item.item_id.as_str());
                if !keep {
                    removed.push(item.item_id.clone());
                }
                keep
            });
        }
        rec.recommendations.truncate(k);
        self.metrics.filtered_items.with_label_values(&["excluded"]).inc_by(removed.len() as u64);
        rec.unknown_excluded = excl.unknown.len();
        if let Some(e) = rec.explain.as_mut() {
            let filtered = e.filtered.get_or_insert_with(Filtered::default);
            filtered.excluded = removed;
            filtered.unknown_excluded = excl.unknown.iter().map(|id| id.to_string()).collect();
        }
        rec
    }

    /// The set of unavailable items in use, read again from Redis first when it is older than
    /// UNAVAILABLE_REFRESH_MS (one read at a time; concurrent callers wait for it).
    pub async fn unavailable(&self) -> Arc<UnavailableSet> {
        if self.unavailable.is_due() {
            let _one = self.unavailable.refreshing().lock().await;
            if self.unavailable.is_due() {
                self.read_unavailable().await;
            }
        }
        self.unavailable.current()
    }

    /// Reads `items:unavailable` now (its keyspace event) and returns the set in use (the last
    /// good one when the read was refused).
    pub async fn reload_unavailable(&self) -> Arc<UnavailableSet> {
        let _one = self.unavailable.refreshing().lock().await;
        self.read_unavailable().await;
        self.unavailable.current()
    }

    /// UNAVAILABLE_REFRESH_MS.
    pub fn unavailable_every(&self) -> std::time::Duration {
        self.unavailable.every
    }

    /// How the cached set stands (`/health`, `/metrics`).
    pub fn unavailable_status(&self) -> UnavailableStatus {
        let status = self.unavailable.status();
        self.metrics.unavailable_age.set(status.age_ms.map_or(0.0, |ms| ms as f64 / 1e3));
        status
    }

    /// One read of `items:unavailable` into the cache; the ids it added.
    async fn read_unavailable(&self) -> Vec<String> {
        match self.store.read_unavailable(self.unavailable.max).await {
            Ok(read) => match self.unavailable.apply(read) {
                Ok(added) => {
                    self.metrics.unavailable_items.set(self.unavailable.current().ids.len() as i64);
                    if !added.is_empty() {
                        tracing::info!(added = added.len(), "items became unavailable");
                    }
                    added
                }
                Err((reason, why)) => {
                    self.metrics.unavailable_refresh_failures.with_label_values(&[reason]).inc();
                    tracing::error!(reason, "{why}");
                    Vec::new()
                }
            },
            Err(e) => {
                self.metrics.unavailable_refresh_failures.with_label_values(&["redis"]).inc();
                tracing::warn!(error = %e, "reading items:unavailable failed; the last good set is used");
                self.unavailable.failed(format!("reading it failed: {e}"));
                Vec::new()
            }
        }
    }

    async fn answer(
        &self,
        user_id: &str,
        ask: Ask,
        exclude: &[String],
        cache_first: bool,
    ) -> Result<Recommendation, Error> {
        let started = Instant::now();
        validate_user_id(user_id)?;
        self.check_k(i64::try_from(ask.k).unwrap_or(i64::MAX))?;
        self.check_exclude(exclude)?;
        let lineup = self.lineup()?;
        let variant = lineup.assign(user_id);
        let unavailable = self.unavailable().await;
        let excl = self.exclusions(exclude, &variant.set);
        let read = self.read(user_id, cache_first, &variant.name).await.map_err(|e| self.failed(variant, e))?;
        if cache_first {
            if let Some(mut hit) = self.cached_answer(user_id, ask.k, &read, variant, &unavailable, &excl, started) {
                self.metrics.cache_answers.with_label_values(&["hit"]).inc();
                self.metrics.recommendations.with_label_values(&[&variant.name, "cache"]).inc();
                hit.shadow_input = self.shadow_sample.input(&lineup, &read);
                return Ok(hit);
            }
            self.metrics.cache_answers.with_label_values(&["miss"]).inc();
        }
        let extra = excl.len();
        let key = (
            user_id.to_string(),
            ask,
            extra,
            read.sha().to_string(),
            format!("{}@{}", variant.name, variant.set.info.content_sha),
            unavailable.generation,
        );
        let compute = || async {
            let written = self
                .compute_and_write(user_id, ask, extra, &read, variant, &unavailable, started, Origin::Request)
                .await;
            match written {
                Ok((rec, Written::Overtaken)) => {
                    // The answer stands for the profile it read; Redis gets the new one's list.
                    if let Err(e) = self.refresh_from(user_id, Origin::Request).await {
                        tracing::warn!(%user_id, error = %e, "recomputing an overtaken write failed");
                    }
                    Ok(rec)
                }
                other => other.map(|(rec, _)| rec),
            }
        };
        let (result, shared) = self.in_flight.run(key, compute).await;
        if shared {
            self.metrics.single_flight_shared.inc();
        }
        let mut rec = self.count(variant, result, "computed")?;
        rec.shadow_input = self.shadow_sample.input(&lineup, &read);
        Ok(self.cut(rec, &excl, ask.k))
    }

    /// Counts a request's outcome by variant (`recommendations_total`).
    fn count<T>(&self, variant: &Variant<ModelSet>, result: Result<T, Error>, ok: &str) -> Result<T, Error> {
        match result {
            Ok(value) => {
                self.metrics.recommendations.with_label_values(&[&variant.name, ok]).inc();
                Ok(value)
            }
            Err(e) => Err(self.failed(variant, e)),
        }
    }

    /// Counts a request of `variant` that failed.
    fn failed(&self, variant: &Variant<ModelSet>, e: Error) -> Error {
        self.metrics.recommendations.with_label_values(&[&variant.name, "error"]).inc();
        e
    }

    /// The stored list as an answer, when it is fresh: computed from this profile value by the
    /// model version in service, with its scores, and at least `k` items long once the items
    /// unavailable now and the request's exclusions are left out.
    #[allow(clippy::too_many_arguments)]
    fn cached_answer(
        &self,
        user_id: &str,
        k: usize,
        read: &ProfileRead,
        variant: &Variant<ModelSet>,
        unavailable: &UnavailableSet,
        excl: &Exclusions,
        started: Instant,
    ) -> Option<Recommendation> {
        let set = &variant.set;
        let stored = read.stored.as_ref()?;
        let strategy = Strategy::parse(&stored.strategy)?;
        if !is_fresh(read, variant) || stored.items.len() < k {
            return None;
        }
        let items = read.profile.as_ref().map(|p| p.items.as_slice()).unwrap_or_default();
        let history = set.catalog.history(items, self.cfg.max_history);
        let (mut gone, mut excluded) = (Vec::new(), Vec::new());
        let recommendations: Vec<Item> = stored
            .items
            .iter()
            .zip(&stored.scores)
            .filter(|(id, _)| {
                if unavailable.contains(id) {
                    gone.push((*id).clone());
                    false
                } else if excl.ids.contains(id.as_str()) {
                    excluded.push((*id).clone());
                    false
                } else {
                    true
                }
            })
            .take(k)
            .map(|(id, &score)| Item { item_id: id.clone(), score, stages: None })
            .collect();
        if recommendations.len() < k {
            return None;
        }
        self.metrics.filtered_items.with_label_values(&["unavailable"]).inc_by(gone.len() as u64);
        self.metrics.filtered_items.with_label_values(&["excluded"]).inc_by(excluded.len() as u64);
        Some(Recommendation {
            user_id: Some(user_id.to_string()),
            recommendations,
            strategy,
            source: Some(Source::Cache),
            model_version: set.info.version.clone(),
            variant: variant.name.clone(),
            unknown_items: history.unknown,
            truncated_items: history.truncated,
            unknown_excluded: excl.unknown.len(),
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            explain: None,
            shadow_input: None,
        })
    }

    /// The listener's and backfill's entry point: recomputes `recommendations:<user_id>` (default
    /// k) unless the stored list was computed from the same profile value by the same model
    /// version. A profile that cannot be ranked removes the stored list (see `read`).
    ///
    /// A write overtaken by a profile change (a cluster, where the check and the write are
    /// separate steps) is recomputed at once, a few times at most.
    ///
    /// The listener's call: a written list is announced with the source `listen`; ingest and
    /// backfill call `refresh_from` with their own.
    pub async fn refresh(&self, user_id: &str) -> Result<Refresh, Error> {
        self.refresh_from(user_id, Origin::Listen).await
    }

    /// `refresh`, naming what asked for it (the webhook's `source`).
    pub async fn refresh_from(&self, user_id: &str, origin: Origin) -> Result<Refresh, Error> {
        validate_user_id(user_id)?;
        for _ in 0..OVERTAKEN_RETRIES {
            let started = Instant::now();
            let lineup = self.lineup()?;
            let variant = lineup.assign(user_id);
            let unavailable = self.unavailable().await;
            // With unavailable items, the stored list is read too: one that holds any is recomputed.
            let read = self.read(user_id, !unavailable.ids.is_empty(), &variant.name).await?;
            if is_fresh(&read, variant) && !holds_unavailable(&read, &unavailable) {
                return Ok(Refresh::Unchanged);
            }
            let ask = Ask { k: self.cfg.default_k, explain: false };
            match self.compute_and_write(user_id, ask, 0, &read, variant, &unavailable, started, origin).await?.1 {
                Written::Stored => return Ok(Refresh::Written),
                Written::Superseded => return Ok(Refresh::Superseded),
                Written::Overtaken => continue,
            }
        }
        Ok(Refresh::Superseded)
    }

    /// Whether the stored list was computed from the profile as it is now by the user's variant
    /// in service (what `refresh` would skip).
    pub async fn is_current(&self, user_id: &str) -> Result<bool, Error> {
        validate_user_id(user_id)?;
        let lineup = self.lineup()?;
        let variant = lineup.assign(user_id);
        let read = self.read(user_id, false, &variant.name).await?;
        Ok(is_fresh(&read, variant))
    }

    /// The lineup in service; each request uses the one it started with to the end (a reload
    /// meanwhile does not mix versions or variants).
    pub fn lineup(&self) -> Result<Arc<Lineup<ModelSet>>, Error> {
        match self.engine.state() {
            EngineState::Ready(lineup) => Ok(lineup),
            EngineState::Loading => Err(InferenceError::ModelsLoading.into()),
            EngineState::Failed(reason) => {
                Err(InferenceError::EngineStopped(format!("the models failed to load: {reason}")).into())
            }
        }
    }

    /// Reads the profile. One that cannot be ranked (malformed, too large, too long) also removes
    /// a stored list that was not computed from it, so Redis never keeps a list the API would not
    /// give now.
    async fn read(&self, user_id: &str, with_stored_list: bool, variant: &str) -> Result<ProfileRead, Error> {
        let t = Instant::now();
        let read =
            self.store.read_profile(user_id, self.cfg.profile_limits, with_stored_list).await.map_err(Error::from);
        self.observe_stage("redis_read", variant, t);
        if let Err(e) = &read {
            if matches!(e, Error::Profile(_)) {
                match self.store.drop_stale_recommendations(user_id).await {
                    Ok(true) => tracing::info!(%user_id, "removed the stored list of a profile that cannot be ranked"),
                    Ok(false) => {}
                    Err(drop) => tracing::warn!(%user_id, error = %drop, "could not remove a stale list"),
                }
            }
        }
        read
    }

    /// Ranks `ask.k + extra` items (the extra ones for a request's exclusions, cut by each
    /// caller), writes the first `ask.k` and answers with all of them.
    #[allow(clippy::too_many_arguments)]
    async fn compute_and_write(
        &self,
        user_id: &str,
        ask: Ask,
        extra: usize,
        read: &ProfileRead,
        variant: &Variant<ModelSet>,
        unavailable: &UnavailableSet,
        started: Instant,
        origin: Origin,
    ) -> Result<(Recommendation, Written), Error> {
        let set = &variant.set;
        let mut explain = ask.explain.then(|| Explanation {
            stage_ms: StageTimes { redis_read: Some(ms(read.took)), ..Default::default() },
            ..Default::default()
        });
        let items = read.profile.as_ref().map(|p| p.items.as_slice()).unwrap_or_default();
        let wide = Ask { k: ask.k + extra, explain: ask.explain };
        let ranking = self.rank_items(items, wide, variant, unavailable, explain.as_mut()).await?;
        let t = Instant::now();
        let stored = &ranking.items[..ranking.items.len().min(ask.k)];
        let ids: Vec<&str> = stored.iter().map(|i| i.item_id.as_str()).collect();
        let scores: Vec<f32> = stored.iter().map(|i| i.score).collect();
        let list = StoredList { ids: &ids, scores: &scores, strategy: ranking.strategy.as_str() };
        let model = ModelId { version: &set.info.version, sha: &set.info.content_sha, variant: &variant.name };
        let written = self.store.write_recommendations(user_id, &list, self.cfg.ttl_secs, read, &model).await?;
        self.observe_stage("redis_write", &variant.name, t);
        if let Some(e) = explain.as_mut() {
            e.stage_ms.redis_write = Some(ms(t.elapsed()));
        }
        if written != Written::Stored {
            self.metrics.writes_superseded.inc();
        } else if self.webhooks.wants(origin) {
            self.webhooks.list_written(ListWritten {
                user_id: user_id.to_string(),
                model_version: set.info.version.clone(),
                items: stored.iter().map(|i| WebhookItem { item_id: i.item_id.clone(), score: i.score }).collect(),
                strategy: ranking.strategy.as_str(),
                origin,
                computed_at_ms: crate::clock::now_ms(),
            });
        }
        Ok((ranking.into_answer(Some(user_id), variant, started, explain), written))
    }

    /// Ranks a profile's items (oldest first) with the variant's set: the cascade, or the popular
    /// list when no item is in the catalog. Every item of the profile and every unavailable item
    /// is excluded, from every stage's candidates (so before DIN's cut).
    async fn rank_items(
        &self,
        items: &[String],
        ask: Ask,
        variant: &Variant<ModelSet>,
        unavailable: &UnavailableSet,
        mut explain: Option<&mut Explanation>,
    ) -> Result<Ranking, Error> {
        let set = &variant.set;
        let catalog = &set.catalog;
        let history = catalog.history(items, self.cfg.max_history);
        self.metrics.unknown_items.inc_by(history.unknown as u64);
        let (unknown, truncated) = (history.unknown, history.truncated);
        let unavailable = unavailable.mask(catalog, &set.info.content_sha);
        if let Some(e) = explain.as_deref_mut() {
            e.filtered.get_or_insert_with(Filtered::default).unavailable = unavailable.len();
        }
        if history.rows.is_empty() {
            self.metrics.cold_starts.inc();
            let items = catalog
                .most_popular(ask.k, unavailable.rows())
                .into_iter()
                .map(|row| Item {
                    item_id: catalog.item_id(row).to_string(),
                    score: catalog.popularity(row) as f32,
                    stages: None,
                })
                .collect();
            return Ok(Ranking { items, strategy: Strategy::Popular, unknown, truncated });
        }
        let masked = (!unavailable.is_empty()).then_some(unavailable);
        let scored = self.engine.rank(variant, history.rows, history.exclude, masked, ask.k, ask.explain).await?;
        let s = &scored.stats;
        for (stage, d) in [("lightgcn", s.lightgcn), ("din", s.din), ("ranknet", s.ranknet)] {
            if let Some(d) = d {
                self.metrics.stage_duration.with_label_values(&[stage, &variant.name]).observe(d.as_secs_f64());
            }
        }
        let ranked = &scored.ranked;
        let counts = [("lightgcn", s.lightgcn_candidates), ("din", s.din_candidates), ("ranknet", ranked.rows.len())];
        for (stage, n) in counts {
            self.metrics.stage_candidates.with_label_values(&[stage]).observe(n as f64);
        }
        if let Some(e) = explain {
            e.candidates = Some(StageCandidates {
                lightgcn: s.lightgcn_candidates,
                din: s.din_candidates,
                ranknet: ranked.rows.len(),
            });
            e.stage_ms.lightgcn = s.lightgcn.map(ms);
            e.stage_ms.din = s.din.map(ms);
            e.stage_ms.ranknet = s.ranknet.map(ms);
        }
        let place = |&(score, rank): &(f32, usize)| StagePlace { score, rank: rank + 1 };
        let items = ranked
            .rows
            .iter()
            .zip(&ranked.scores)
            .enumerate()
            .map(|(i, (&row, &score))| Item {
                item_id: catalog.item_id(row).to_string(),
                score,
                stages: ranked.trace.as_ref().and_then(|t| t.get(i)).and_then(|stages| {
                    Some(ItemStages {
                        lightgcn: place(stages.first()?),
                        din: stages.get(1).map(place),
                        ranknet: stages.get(2).map(place),
                    })
                }),
            })
            .collect();
        Ok(Ranking { items, strategy: Strategy::Personalized, unknown, truncated })
    }

    fn observe_stage(&self, stage: &str, variant: &str, since: Instant) {
        self.metrics.stage_duration.with_label_values(&[stage, variant]).observe(since.elapsed().as_secs_f64());
    }
}

/// A ranked list before it becomes an answer.
struct Ranking {
    items: Vec<Item>,
    strategy: Strategy,
    unknown: usize,
    truncated: usize,
}

impl Ranking {
    fn into_answer(
        self,
        user_id: Option<&str>,
        variant: &Variant<ModelSet>,
        started: Instant,
        explain: Option<Explanation>,
    ) -> Recommendation {
        Recommendation {
            user_id: user_id.map(str::to_string),
            recommendations: self.items,
            strategy: self.strategy,
            source: None,
            model_version: variant.set.info.version.clone(),
            variant: variant.name.clone(),
            unknown_items: self.unknown,
            truncated_items: self.truncated,
            unknown_excluded: 0,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            explain,
            shadow_input: None,
        }
    }
}

/// How often `refresh` recomputes a user whose write a profile change overtook.
const OVERTAKEN_RETRIES: usize = 3;

/// The stored list was computed from this profile value by this variant's model set: the same
/// variant (a meta without one was written before experiments: `default`), the same version and
/// the same content (a directory changed under an unchanged version is another set).
fn is_fresh(read: &ProfileRead, variant: &Variant<ModelSet>) -> bool {
    let set = &variant.set;
    read.computed_from.as_ref().is_some_and(|c| {
        c.profile_sha == read.sha()
            && c.variant.as_deref().unwrap_or(DEFAULT_VARIANT) == variant.name
            && c.model_version == set.info.version
            && c.model_sha.as_deref() == Some(set.info.content_sha.as_str())
    })
}

/// The stored list read holds an item that is unavailable now.
fn holds_unavailable(read: &ProfileRead, unavailable: &UnavailableSet) -> bool {
    !unavailable.ids.is_empty()
        && read.stored.as_ref().is_some_and(|stored| stored.items.iter().any(|id| unavailable.contains(id)))
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_validated() {
        assert!(validate_user_id("A3RTKL9KB8KLID").is_ok());
        assert!(validate_user_id(&"x".repeat(128)).is_ok());
        for good in ["a*b", "a:b", "{a}", "ü-ß", "用户"] {
            assert!(validate_user_id(good).is_ok(), "{good:?}");
        }
        let format = ["a\u{200B}b", "\u{202E}abc", "\u{FEFF}a", "a\u{2066}", "soft\u{AD}hyphen", "a\u{E0041}"];
        for bad in
            ["", " a", "a b", "a\nb", "a\u{7}", "tab\t", "a\u{A0}b", "a\u{2028}", "a\u{E000}"].iter().chain(&format)
        {
            assert!(matches!(validate_user_id(bad), Err(Error::InvalidUserId(_))), "{bad:?}");
        }
        assert!(validate_user_id(&"x".repeat(129)).unwrap_err().to_string().contains("129 characters"));
        // characters, not bytes: 128 two-byte characters are allowed (the OpenAPI maxLength)
        assert!(validate_user_id(&"é".repeat(128)).is_ok());
        assert!(validate_user_id(&"é".repeat(129)).is_err());
    }

    use unicode_properties::UnicodeGeneralCategory;

    /// Characters no user id may hold, by the class README's HTTP contract names: line breaks and
    /// other controls, whitespace, zero-width and bidirectional formatting, private use,
    /// unassigned.
    const FORBIDDEN: [char; 12] =
        ['\n', '\r', '\t', '\0', '\u{7f}', ' ', '\u{a0}', '\u{2028}', '\u{200b}', '\u{202e}', '\u{e000}', '\u{0378}'];

    proptest::proptest! {
        /// Any id of printable ASCII (what store ids are made of) up to the length limit is
        /// accepted, and its key is one clean line ending in the id.
        #[test]
        fn printable_ascii_ids_within_the_limit_are_accepted(id in "[!-~]{1,128}") {
            proptest::prop_assert!(validate_user_id(&id).is_ok(), "{:?}", id);
            let key = crate::redis::keys::recommendations_key(&id);
            proptest::prop_assert!(!key.contains('\n') && !key.contains('\r') && key.ends_with(&id));
        }

        /// One forbidden character anywhere in an otherwise good id refuses it, with 400
        /// `invalid_user_id`.
        #[test]
        fn one_forbidden_character_anywhere_refuses_the_id(id in "[!-~]{1,100}", at in 0usize..101, which in 0usize..12) {
            let mut chars: Vec<char> = id.chars().collect();
            chars.insert(at.min(chars.len()), FORBIDDEN[which]);
            let bad: String = chars.into_iter().collect();
            proptest::prop_assert!(matches!(validate_user_id(&bad), Err(Error::InvalidUserId(_))), "{:?}", bad);
        }

        /// Letters of any script are ids (user ids are not only ASCII); the length counts
        /// characters, not bytes.
        #[test]
        fn ids_in_any_script_are_counted_in_characters(n in 1usize..=128, letter in proptest::sample::select(vec!['é', 'ж', '中', 'ب', '😀'])) {
            let id: String = std::iter::repeat_n(letter, n).collect();
            proptest::prop_assert!(validate_user_id(&id).is_ok());
            let long: String = std::iter::repeat_n(letter, MAX_USER_ID_CHARS + 1).collect();
            proptest::prop_assert!(validate_user_id(&long).is_err());
        }
    }

    #[test]
    fn the_documented_pattern_admits_exactly_the_bmp_characters_the_server_does() {
        let pattern = user_id_pattern();
        let re = regex_automata::meta::Regex::new(&pattern).unwrap();
        let mut admitted = 0;
        for cp in 0..=0xFFFFu32 {
            let Some(c) = char::from_u32(cp) else { continue };
            let id = c.to_string();
            let server = validate_user_id(&id).is_ok();
            assert_eq!(re.is_match(&id), server, "U+{cp:04X} {:?}: pattern and server disagree", c.general_category());
            admitted += usize::from(server);
        }
        assert!(admitted > 50_000, "{admitted}");
        for refused in ["\u{200B}", "\u{FEFF}", "\u{0378}", "\u{E000}", "a b"] {
            assert!(!re.is_match(refused) && validate_user_id(refused).is_err(), "{refused:?}");
        }
        // beyond the BMP the pattern admits nothing; the server, assigned non-private-use characters
        assert!(!re.is_match("\u{1F600}") && validate_user_id("\u{1F600}").is_ok());
        assert!(validate_user_id("\u{F0000}").is_err() && validate_user_id("\u{E0001}").is_err());
    }
}
