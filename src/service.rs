//! Making a recommendation: validate -> read profile -> rank -> write. HTTP and the `recommend`
//! command call `Service::recommend`; the listener and backfill call `Service::refresh`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::watch;

use crate::engine::Engine;
use crate::engine::EngineState;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::model_set::ModelSet;
use crate::redis::profile::ProfileRead;
use crate::redis::store::{ProfileLimits, Written};
use crate::redis::Store;

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
    /// The profile changed while this computation ran; the change's own event recomputes it.
    Superseded,
}

pub struct ServiceConfig {
    pub default_k: usize,
    pub max_k: usize,
    pub max_history: usize,
    pub ttl_secs: u64,
    pub profile_limits: ProfileLimits,
}

/// The outcome of one computation, watched by the requests that share it.
type Flight = watch::Receiver<Option<Result<Recommendation, Error>>>;

/// Requests share a computation only when they read the same profile value and would rank it
/// with the same models for the same k: (user id, k, profile hash, model version).
type FlightKey = (String, usize, String, String);

pub struct Service {
    pub store: Store,
    pub engine: Engine,
    pub metrics: Metrics,
    cfg: ServiceConfig,
    /// Computations in flight: single flight.
    in_flight: Mutex<HashMap<FlightKey, Flight>>,
}

/// Removes a flight from the map when its leader finishes or is cancelled (client gone).
struct Landing<'a> {
    map: &'a Mutex<HashMap<FlightKey, Flight>>,
    key: FlightKey,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

/// A user id is 1..=128 bytes with no whitespace or control characters.
pub fn validate_user_id(user_id: &str) -> Result<(), Error> {
    if user_id.is_empty() {
        return Err(Error::InvalidUserId("the user id is empty".into()));
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(Error::InvalidUserId(format!(
            "the user id is {} bytes, at most {MAX_USER_ID_BYTES} are allowed",
            user_id.len()
        )));
    }
    if let Some(c) = user_id.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::InvalidUserId(format!("the user id contains the character {c:?}")));
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

    /// Reads the profile, ranks it and writes `recommendations:<user_id>`. The answer reflects the
    /// profile as it was when this request read it, never an older value: concurrent requests
    /// share one computation (single flight) only when they read the same profile value for the
    /// same k and model version; if the computing one is cancelled, a waiting one computes instead.
    pub async fn recommend(&self, user_id: &str, k: usize) -> Result<Recommendation, Error> {
        let started = Instant::now();
        validate_user_id(user_id)?;
        self.check_k(i64::try_from(k).unwrap_or(i64::MAX))?;
        let set = self.model_set()?;
        let read = self.read(user_id).await?;
        let key = (user_id.to_string(), k, read.sha().to_string(), set.info.version.clone());
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
                let result = self.compute_and_write(user_id, k, &read, set.clone(), started).await.map(|(rec, _)| rec);
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

    /// The listener's and backfill's entry point: recomputes `recommendations:<user_id>` (default
    /// k) unless the stored list was computed from the same profile value by the same model
    /// version. A profile that cannot be ranked removes the stored list (see `read`).
    pub async fn refresh(&self, user_id: &str) -> Result<Refresh, Error> {
        let started = Instant::now();
        validate_user_id(user_id)?;
        let set = self.model_set()?;
        let read = self.read(user_id).await?;
        if read.computed_from.as_ref().is_some_and(|(sha, v)| sha == read.sha() && *v == set.info.version) {
            return Ok(Refresh::Unchanged);
        }
        match self.compute_and_write(user_id, self.cfg.default_k, &read, set, started).await?.1 {
            Written::Stored => Ok(Refresh::Written),
            Written::Superseded => Ok(Refresh::Superseded),
        }
    }

    /// The model set in service; each request uses the one it started with to the end (a reload
    /// meanwhile does not mix versions).
    fn model_set(&self) -> Result<Arc<ModelSet>, Error> {
        match self.engine.state() {
            EngineState::Ready(set) => Ok(set),
            EngineState::Loading => Err(Error::ModelsLoading),
            EngineState::Failed(reason) => Err(Error::EngineStopped(format!("the models failed to load: {reason}"))),
        }
    }

    /// Reads the profile. One that cannot be ranked (malformed, too large, too long) also removes
    /// a stored list that was not computed from it, so Redis never keeps a list the API would not
    /// give now.
    async fn read(&self, user_id: &str) -> Result<ProfileRead, Error> {
        let t = Instant::now();
        let read = self.store.read_profile(user_id, self.cfg.profile_limits).await;
        self.observe_stage("redis_read", t);
        if let Err(e) = &read {
            if e.is_profile_problem() {
                match self.store.drop_stale_recommendations(user_id).await {
                    Ok(true) => tracing::info!(%user_id, "removed the stored list of a profile that cannot be ranked"),
                    Ok(false) => {}
                    Err(drop) => tracing::warn!(%user_id, error = %drop, "could not remove a stale list"),
                }
            }
        }
        read
    }

    async fn compute_and_write(
        &self,
        user_id: &str,
        k: usize,
        read: &ProfileRead,
        set: Arc<ModelSet>,
        started: Instant,
    ) -> Result<(Recommendation, Written), Error> {
        let model_version = set.info.version.clone();
        let items = read.profile.as_ref().map(|p| p.items.as_slice()).unwrap_or_default();
        let catalog = &set.catalog;
        let history = catalog.history(items, self.cfg.max_history);
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
            let scored = self.engine.rank(set.clone(), history.rows, history.exclude, k).await?;
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
        let written = self.store.write_recommendations(user_id, &ids, self.cfg.ttl_secs, read, &model_version).await?;
        self.observe_stage("redis_write", t);
        if written == Written::Superseded {
            self.metrics.writes_superseded.inc();
        }

        let rec = Recommendation {
            user_id: user_id.to_string(),
            recommendations,
            strategy,
            model_version,
            unknown_items: history.unknown,
            truncated_items: history.truncated,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        Ok((rec, written))
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
        for bad in ["", " a", "a b", "a\nb", "a\u{7}", "tab\t"] {
            assert_eq!(validate_user_id(bad).unwrap_err().status().as_u16(), 400, "{bad:?}");
        }
        assert!(validate_user_id(&"x".repeat(129)).unwrap_err().to_string().contains("129 bytes"));
    }

    proptest::proptest! {
        #[test]
        fn only_ids_that_make_clean_single_line_keys_are_accepted(id in "(.|\\n|\\r|\\t|[*:{}?\\[\\]]){0,140}") {
            let ok = !id.is_empty()
                && id.len() <= MAX_USER_ID_BYTES
                && !id.chars().any(|c| c.is_whitespace() || c.is_control());
            proptest::prop_assert_eq!(validate_user_id(&id).is_ok(), ok);
            if ok {
                let key = crate::redis::keys::recommendations_key(&id);
                proptest::prop_assert!(!key.contains('\n') && !key.contains('\r') && key.ends_with(&id));
            }
        }
    }
}
