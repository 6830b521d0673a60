//! The one function that makes a recommendation: validate -> read profile -> rank -> write.
//! Every entry point (HTTP, the `recommend` command) calls `Service::recommend`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::watch;

use crate::engine::Engine;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::model_set::ModelSet;
use crate::store::{ProfileRead, Store};

pub const MAX_USER_ID_BYTES: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Personalized,
    Popular,
}

#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub item_id: String,
    pub score: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Recommendation {
    pub user_id: String,
    pub recommendations: Vec<Item>,
    pub strategy: Strategy,
    pub model_version: String,
    pub unknown_items: usize,
    /// Profile items left out because the profile is longer than MAX_HISTORY (oldest first).
    pub truncated_items: usize,
    pub elapsed_ms: f64,
}

/// What `Service::refresh` did.
#[derive(Debug)]
pub enum Refresh {
    Written,
    /// The stored list was computed from the same profile by the same model version.
    Unchanged,
}

pub struct ServiceConfig {
    pub default_k: usize,
    pub max_k: usize,
    pub max_history: usize,
    pub ttl_secs: u64,
}

/// The outcome of one computation, watched by the requests that share it.
type Flight = watch::Receiver<Option<Result<Recommendation, Error>>>;

pub struct Service {
    pub store: Store,
    pub engine: Engine,
    pub metrics: Metrics,
    cfg: ServiceConfig,
    /// Computations in flight by (user id, k): single flight.
    in_flight: Mutex<HashMap<(String, usize), Flight>>,
}

/// Removes a flight from the map when its leader finishes or is cancelled (client gone).
struct Landing<'a> {
    map: &'a Mutex<HashMap<(String, usize), Flight>>,
    key: (String, usize),
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

/// A user id is 1..=128 bytes of printable characters: no whitespace (Unicode White_Space), and
/// nothing of the Unicode general category Other (control, format such as zero-width and
/// bidirectional overrides, surrogate, private use, unassigned). `*`, `:`, `{` and other
/// punctuation are allowed: keys are built by concatenation and used in plain GET/SET, never as a
/// pattern.
pub fn validate_user_id(user_id: &str) -> Result<(), Error> {
    use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};
    if user_id.is_empty() {
        return Err(Error::InvalidUserId("the user id is empty".into()));
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(Error::InvalidUserId(format!(
            "the user id is {} bytes, at most {MAX_USER_ID_BYTES} are allowed",
            user_id.len()
        )));
    }
    let unprintable = |c: &char| c.is_whitespace() || c.general_category_group() == GeneralCategoryGroup::Other;
    if let Some(c) = user_id.chars().find(unprintable) {
        return Err(Error::InvalidUserId(format!(
            "the user id contains the character {c:?} (U+{:04X}, {:?}): whitespace, control, format (zero-width, \
             bidirectional) and unassigned characters are not allowed",
            c as u32,
            c.general_category()
        )));
    }
    Ok(())
}

impl Service {
    pub fn new(store: Store, engine: Engine, metrics: Metrics, cfg: ServiceConfig) -> Self {
        Self { store, engine, metrics, cfg, in_flight: Mutex::new(HashMap::new()) }
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

    /// Reads the profile, ranks and writes `recommendations:<user_id>`. Concurrent calls for the
    /// same user and k share one computation (single flight): the first computes, the others
    /// receive its outcome; if the first is cancelled, a waiting one computes instead.
    pub async fn recommend(&self, user_id: &str, k: usize) -> Result<Recommendation, Error> {
        validate_user_id(user_id)?;
        let key = (user_id.to_string(), k);
        loop {
            let (leader, mut flight) = {
                let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(&key) {
                    Some(flight) => (None, flight.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        map.insert(key.clone(), rx.clone());
                        (Some(tx), rx)
                    }
                }
            };
            if let Some(tx) = leader {
                let _landing = Landing { map: &self.in_flight, key };
                let result = self.compute(user_id, k).await;
                tx.send_replace(Some(result.clone()));
                return result;
            }
            self.metrics.single_flight_shared.inc();
            let shared = flight.wait_for(Option::is_some).await.ok().and_then(|outcome| outcome.clone());
            if let Some(result) = shared {
                return result;
            }
            // the leader was cancelled before it finished: try again (one of us leads)
        }
    }

    async fn compute(&self, user_id: &str, k: usize) -> Result<Recommendation, Error> {
        let started = Instant::now();
        let (read, set) = self.read(user_id, k).await?;
        self.compute_and_write(user_id, k, read, set, started).await
    }

    /// The listener's entry point: recomputes `recommendations:<user_id>` (default k) unless the
    /// stored list was computed from the same profile value by the same model version.
    pub async fn refresh(&self, user_id: &str) -> Result<Refresh, Error> {
        let started = Instant::now();
        let k = self.cfg.default_k;
        let (read, set) = self.read(user_id, k).await?;
        if read.computed_from.as_ref().is_some_and(|(sha, v)| sha == read.sha() && *v == set.info.version) {
            return Ok(Refresh::Unchanged);
        }
        self.compute_and_write(user_id, k, read, set, started).await?;
        Ok(Refresh::Written)
    }

    /// Validates the request and reads the profile; returns it with the model set in service,
    /// which this request uses to the end (a reload meanwhile does not mix versions).
    async fn read(&self, user_id: &str, k: usize) -> Result<(ProfileRead, Arc<ModelSet>), Error> {
        validate_user_id(user_id)?;
        self.check_k(i64::try_from(k).unwrap_or(i64::MAX))?;
        let set = self.engine.current().ok_or(Error::EngineStopped)?;
        let t = Instant::now();
        let read = self.store.read_profile(user_id).await?;
        self.observe_stage("redis_read", t);
        Ok((read, set))
    }

    async fn compute_and_write(
        &self,
        user_id: &str,
        k: usize,
        read: ProfileRead,
        set: Arc<ModelSet>,
        started: Instant,
    ) -> Result<Recommendation, Error> {
        let profile_sha = read.sha().to_string();
        let model_version = set.info.version.clone();
        let items = read.profile.map(|p| p.items).unwrap_or_default();
        let catalog = &set.catalog;
        let history = catalog.history(&items, self.cfg.max_history);
        self.metrics.unknown_items.inc_by(history.unknown as u64);

        let (recommendations, strategy) = if history.rows.is_empty() {
            self.metrics.cold_starts.inc();
            let items: Vec<Item> = catalog
                .most_popular(k, &[])
                .into_iter()
                .map(|row| Item { item_id: catalog.item_id(row).to_string(), score: catalog.popularity(row) as f32 })
                .collect();
            (items, Strategy::Popular)
        } else {
            let scored = self.engine.rank(set.clone(), history.rows, k).await?;
            let s = &scored.stats;
            for (stage, d) in [("lightgcn", s.lightgcn), ("din", s.din), ("ranknet", s.ranknet)] {
                if let Some(d) = d {
                    self.metrics.stage_duration.with_label_values(&[stage]).observe(d.as_secs_f64());
                }
            }
            for (stage, n) in
                [("lightgcn", s.lightgcn_candidates), ("din", s.din_candidates), ("ranknet", scored.ranked.rows.len())]
            {
                self.metrics.stage_candidates.with_label_values(&[stage]).observe(n as f64);
            }
            let items: Vec<Item> = scored
                .ranked
                .rows
                .iter()
                .zip(&scored.ranked.scores)
                .map(|(&row, &score)| Item { item_id: catalog.item_id(row).to_string(), score })
                .collect();
            (items, Strategy::Personalized)
        };

        let t = Instant::now();
        let ids: Vec<&str> = recommendations.iter().map(|i| i.item_id.as_str()).collect();
        self.store.write_recommendations(user_id, &ids, self.cfg.ttl_secs, &profile_sha, &model_version).await?;
        self.observe_stage("redis_write", t);

        Ok(Recommendation {
            user_id: user_id.to_string(),
            recommendations,
            strategy,
            model_version,
            unknown_items: history.unknown,
            truncated_items: history.truncated,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    fn observe_stage(&self, stage: &str, since: Instant) {
        self.metrics.stage_duration.with_label_values(&[stage]).observe(since.elapsed().as_secs_f64());
    }
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
            assert_eq!(validate_user_id(bad).unwrap_err().status().as_u16(), 400, "{bad:?}");
        }
        assert!(validate_user_id(&"x".repeat(129)).unwrap_err().to_string().contains("129 bytes"));
    }

    use unicode_properties::UnicodeGeneralCategory;

    proptest::proptest! {
        #[test]
        fn only_ids_that_make_clean_single_line_keys_are_accepted(id in "(.|\\n|\\r|\\t|[*:{}?\\[\\]]){0,140}") {
            let ok = !id.is_empty()
                && id.len() <= MAX_USER_ID_BYTES
                && !id.chars().any(|c| {
                    c.is_whitespace() || c.general_category_group() == unicode_properties::GeneralCategoryGroup::Other
                });
            proptest::prop_assert_eq!(validate_user_id(&id).is_ok(), ok);
            if ok {
                let key = crate::store::recommendations_key(&id);
                proptest::prop_assert!(!key.contains('\n') && !key.contains('\r') && key.ends_with(&id));
            }
        }
    }
}
