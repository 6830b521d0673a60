//! Request-time filters: the store-wide set of unavailable items (`items:unavailable`, cached in
//! the process) and a request's own exclusions. Both are applied as rows the cascade must leave
//! out before DIN's cut, and to a stored list read from Redis.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustc_hash::FxHashSet;
use serde::Serialize;

use crate::inference::catalog::Catalog;
use crate::inference::exclusion::RowMask;
use crate::redis::filters::UnavailableRead;

/// The set of unavailable items as last read good from Redis.
#[derive(Debug)]
pub struct UnavailableSet {
    pub ids: HashSet<String>,
    /// When it was read (None: never, the empty set before the first read).
    pub loaded_at: Option<Instant>,
    /// Which read it is (each good read a new one): computations on different sets never share.
    pub generation: u64,
    /// The rows of `ids` in one model set's catalog (keyed by its content hash) as the mask the
    /// cascade leaves out: computed once per set and catalog, not per request.
    mask: Mutex<Option<(String, Arc<RowMask>)>>,
}

impl UnavailableSet {
    pub fn new(ids: HashSet<String>, loaded_at: Option<Instant>, generation: u64) -> Self {
        Self { ids, loaded_at, generation, mask: Mutex::new(None) }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// The catalog rows of the unavailable items (ids not in the catalog have none).
    pub fn mask(&self, catalog: &Catalog, catalog_key: &str) -> Arc<RowMask> {
        let mut cached = self.mask.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, mask)) = cached.as_ref() {
            if key == catalog_key {
                return mask.clone();
            }
        }
        let rows: Vec<i64> = self.ids.iter().filter_map(|id| catalog.row(id)).collect();
        let mask = Arc::new(RowMask::new(rows, catalog.len()));
        *cached = Some((catalog_key.to_string(), mask.clone()));
        mask
    }
}

/// The cache of `items:unavailable`: read again when older than UNAVAILABLE_REFRESH_MS (by the
/// first request that finds it so, the others wait for that one read), and at once on its keyspace
/// event (the listener). A read that finds a key of another type or a set over MAX_UNAVAILABLE
/// keeps the last good set (logged, counted, shown by `/health`).
pub struct UnavailableCache {
    current: RwLock<Arc<UnavailableSet>>,
    /// When Redis was last asked (whatever it answered): one read per interval, not one per
    /// request while the key is bad.
    checked_at: Mutex<Option<Instant>>,
    /// Why the last read was refused, while it is.
    problem: Mutex<Option<String>>,
    refreshing: tokio::sync::Mutex<()>,
    pub every: Duration,
    pub max: usize,
}

/// How the cached set stands (`/health`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UnavailableStatus {
    /// Items in the set in use.
    pub items: usize,
    /// Milliseconds since the set in use was read from Redis (null before the first read).
    pub age_ms: Option<u64>,
    /// Why the last read of `items:unavailable` was refused (the last good set serves meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl UnavailableCache {
    pub fn new(every: Duration, max: usize) -> Self {
        Self {
            current: RwLock::new(Arc::new(UnavailableSet::new(HashSet::new(), None, 0))),
            checked_at: Mutex::new(None),
            problem: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            every,
            max,
        }
    }

    pub fn current(&self) -> Arc<UnavailableSet> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether Redis should be asked again.
    pub fn is_due(&self) -> bool {
        self.checked_at.lock().unwrap_or_else(|p| p.into_inner()).is_none_or(|at| at.elapsed() >= self.every)
    }

    pub fn refreshing(&self) -> &tokio::sync::Mutex<()> {
        &self.refreshing
    }

    /// Takes a read's outcome: a good set replaces the one in use (returned: the ids that were not
    /// unavailable before); a refused one keeps it (`Err(why)`).
    pub fn apply(&self, read: UnavailableRead) -> Result<Vec<String>, (&'static str, String)> {
        *self.checked_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let refused = match read {
            UnavailableRead::Items(ids) => {
                let ids: HashSet<String> = ids.into_iter().collect();
                let old = self.current();
                let added = ids.iter().filter(|id| !old.ids.contains(*id)).cloned().collect();
                // A read that finds the same set keeps its generation: requests sharing a
                // computation (single flight) are not split by a refresh that changed nothing.
                let generation = if ids == old.ids { old.generation } else { old.generation + 1 };
                *self.current.write().unwrap_or_else(|p| p.into_inner()) =
                    Arc::new(UnavailableSet::new(ids, Some(Instant::now()), generation));
                *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return Ok(added);
            }
            UnavailableRead::WrongType(kind) => {
                ("wrong_type", format!("items:unavailable is a {kind}, not a set; the last good set is used"))
            }
            UnavailableRead::TooLarge(n) => (
                "too_large",
                format!(
                    "items:unavailable holds {n} items, over MAX_UNAVAILABLE ({}); the last good set is used",
                    self.max
                ),
            ),
        };
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(refused.1.clone());
        Err(refused)
    }

    /// A read that failed (Redis down): counted as checked, the set in use stays.
    pub fn failed(&self, why: String) {
        *self.checked_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    pub fn status(&self) -> UnavailableStatus {
        let set = self.current();
        UnavailableStatus {
            items: set.ids.len(),
            age_ms: set.loaded_at.map(|at| at.elapsed().as_millis() as u64),
            error: self.problem.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// A request's exclusions mapped onto the catalog (borrowing the request's ids).
#[derive(Debug, Clone, Default)]
pub struct Exclusions<'a> {
    /// The ids given that are in the catalog.
    pub ids: FxHashSet<&'a str>,
    /// Ids given that are not in the catalog (ignored).
    pub unknown: Vec<&'a str>,
}

impl<'a> Exclusions<'a> {
    pub fn new(given: &'a [String], catalog: &Catalog) -> Self {
        let mut out = Exclusions::default();
        for id in given {
            if catalog.row(id).is_some() {
                out.ids.insert(id);
            } else {
                out.unknown.push(id);
            }
        }
        out
    }

    /// How many distinct catalog items are excluded.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// With `explain=true`: what the filters kept out of this answer and why.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Filtered {
    /// Items of `items:unavailable` in the catalog, kept out of every stage's candidates (a count:
    /// the set may be large).
    pub unavailable: usize,
    /// Items this request's `exclude` removed from the ranked list.
    pub excluded: Vec<String>,
    /// Ids of `exclude` that are not in the catalog (ignored).
    pub unknown_excluded: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_read_keeps_the_last_good_set() {
        let cache = UnavailableCache::new(Duration::from_millis(1000), 3);
        assert_eq!(cache.apply(UnavailableRead::Items(vec!["a".into(), "b".into()])).unwrap().len(), 2);
        assert!(cache.apply(UnavailableRead::WrongType("string".into())).is_err());
        assert!(cache.apply(UnavailableRead::TooLarge(4)).is_err());
        assert!(cache.current().contains("a") && cache.current().contains("b"));
        assert!(cache.status().error.unwrap().contains("MAX_UNAVAILABLE"));
        assert_eq!(cache.apply(UnavailableRead::Items(vec!["b".into(), "c".into()])).unwrap(), vec!["c".to_string()]);
        assert!(!cache.current().contains("a") && cache.status().error.is_none());
    }

    #[test]
    fn a_read_that_finds_the_same_set_keeps_its_generation() {
        let cache = UnavailableCache::new(Duration::from_millis(1000), 3);
        cache.apply(UnavailableRead::Items(vec!["a".into(), "b".into()])).unwrap();
        let first = cache.current().generation;
        cache.apply(UnavailableRead::Items(vec!["b".into(), "a".into()])).unwrap();
        assert_eq!(cache.current().generation, first, "an unchanged set split the single-flight keys");
        cache.apply(UnavailableRead::Items(vec!["a".into()])).unwrap();
        assert_eq!(cache.current().generation, first + 1);
    }
}
