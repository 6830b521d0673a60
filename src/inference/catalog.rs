//! The item catalog: ASIN <-> model row, and the popularity order used for cold start.

use std::path::Path;

use rustc_hash::FxHashMap;

use super::error::LoadError;

#[derive(Debug)]
pub struct Catalog {
    ids: Vec<String>,
    rows: FxHashMap<String, i64>,
    popularity: Vec<u64>,
    /// Rows by descending popularity (ties by row).
    by_popularity: Vec<i64>,
}

/// A profile mapped onto catalog rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// Known items, oldest first, each once (its latest position kept), at most `max_len` of the
    /// most recent.
    pub rows: Vec<i64>,
    /// Every known item of the profile, sorted: none of them may be recommended.
    pub exclude: Vec<i64>,
    /// Profile entries that are not in the catalog.
    pub unknown: usize,
    /// Known, distinct items dropped because the profile was longer than `max_len`.
    pub truncated: usize,
}

impl Catalog {
    /// Parses `catalog.tsv` as read from `path` (`model_set::read_model_file`): one line per row,
    /// `item_id<TAB>popularity`.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, LoadError> {
        let err = |reason: String| LoadError::Model { dir: path.display().to_string(), reason };
        let text = String::from_utf8(bytes).map_err(|_| err("cannot read catalog: it is not UTF-8 text".into()))?;
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let (id, pop) = line
                .split_once('\t')
                .ok_or_else(|| err(format!("line {}: expected `item_id<TAB>popularity`", n + 1)))?;
            let pop: u64 =
                pop.trim().parse().map_err(|_| err(format!("line {}: popularity is not a number", n + 1)))?;
            entries.push((id.to_string(), pop));
        }
        Self::from_entries(entries).map_err(err)
    }

    pub fn from_entries(entries: Vec<(String, u64)>) -> Result<Self, String> {
        if entries.is_empty() {
            return Err("catalog is empty".into());
        }
        let mut rows = FxHashMap::with_capacity_and_hasher(entries.len(), Default::default());
        let mut ids = Vec::with_capacity(entries.len());
        let mut popularity = Vec::with_capacity(entries.len());
        for (row, (id, pop)) in entries.into_iter().enumerate() {
            if id.is_empty() {
                return Err(format!("row {row}: empty item id"));
            }
            if rows.insert(id.clone(), row as i64).is_some() {
                return Err(format!("item id {id} appears twice"));
            }
            ids.push(id);
            popularity.push(pop);
        }
        let mut by_popularity: Vec<i64> = (0..ids.len() as i64).collect();
        by_popularity.sort_by_key(|&r| (std::cmp::Reverse(popularity[r as usize]), r));
        Ok(Self { ids, rows, popularity, by_popularity })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Never true for a loaded catalog (an empty one is refused).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn item_id(&self, row: i64) -> &str {
        &self.ids[row as usize]
    }

    /// The row of an item id, if it is in the catalog.
    pub fn row(&self, id: &str) -> Option<i64> {
        self.rows.get(id).copied()
    }

    pub fn popularity(&self, row: i64) -> u64 {
        self.popularity[row as usize]
    }

    /// Maps a profile (oldest first) to rows: unknown ids are counted and skipped, repeated items
    /// keep their latest position, and only the `max_len` most recent distinct items are kept for
    /// the models; every known item of the profile is in `exclude`, whatever `max_len` is.
    pub fn history(&self, profile: &[String], max_len: usize) -> History {
        let mut unknown = 0;
        let mut seen = std::collections::HashSet::new();
        let mut newest_first = Vec::new();
        for id in profile.iter().rev() {
            match self.row(id) {
                Some(row) => {
                    if seen.insert(row) {
                        newest_first.push(row);
                    }
                }
                None => unknown += 1,
            }
        }
        let mut exclude = newest_first.clone();
        exclude.sort_unstable();
        let truncated = newest_first.len().saturating_sub(max_len);
        newest_first.truncate(max_len);
        newest_first.reverse();
        History { rows: newest_first, exclude, unknown, truncated }
    }

    /// The `k` most popular rows not in `exclude` (sorted).
    pub fn most_popular(&self, k: usize, exclude: &[i64]) -> Vec<i64> {
        self.by_popularity.iter().copied().filter(|r| exclude.binary_search(r).is_err()).take(k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let entries = [("a", 5), ("b", 9), ("c", 1), ("d", 9), ("e", 0)];
        Catalog::from_entries(entries.iter().map(|(i, p)| (i.to_string(), *p)).collect()).unwrap()
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn unknown_items_are_counted_and_skipped() {
        let h = catalog().history(&ids(&["a", "zz", "c", "0553092626"]), 10);
        assert_eq!(h.rows, vec![0, 2]);
        assert_eq!(h.unknown, 2);
        assert_eq!(h.truncated, 0);
    }

    #[test]
    fn repeated_items_keep_their_latest_position_and_long_profiles_keep_the_most_recent() {
        let h = catalog().history(&ids(&["a", "b", "c", "a", "d"]), 3);
        assert_eq!(h.rows, vec![2, 0, 3], "c, a, d are the three most recent distinct items");
        assert_eq!(h.truncated, 1);
        assert_eq!(h.exclude, vec![0, 1, 2, 3], "b is left out of the models' input but still excluded");
    }

    #[test]
    fn popularity_order_breaks_ties_by_row_and_excludes_history() {
        let c = catalog();
        assert_eq!(c.most_popular(3, &[]), vec![1, 3, 0]);
        assert_eq!(c.most_popular(3, &[3]), vec![1, 0, 2]);
        assert_eq!(c.most_popular(10, &[]).len(), 5);
    }

    proptest::proptest! {
        #[test]
        fn history_rows_are_distinct_known_bounded_and_most_recent(
            profile in proptest::collection::vec("[a-g]|zz|\\*|:|\\{|\\n", 0..60),
            max_len in 1usize..8,
        ) {
            let c = catalog();
            let h = c.history(&profile, max_len);
            let known: Vec<&String> = profile.iter().filter(|id| c.rows.contains_key(*id)).collect();
            proptest::prop_assert_eq!(h.unknown, profile.len() - known.len());
            proptest::prop_assert!(h.rows.len() <= max_len);
            let distinct: std::collections::HashSet<i64> = h.rows.iter().copied().collect();
            proptest::prop_assert_eq!(distinct.len(), h.rows.len());
            let all_distinct: std::collections::HashSet<&String> = known.iter().copied().collect();
            proptest::prop_assert_eq!(h.rows.len() + h.truncated, all_distinct.len());
            let mut every: Vec<i64> = all_distinct.iter().map(|id| c.rows[*id]).collect();
            every.sort_unstable();
            proptest::prop_assert_eq!(&h.exclude, &every);
            // the last known item of the profile is always kept, as the last row
            if let Some(last) = known.last() {
                proptest::prop_assert_eq!(h.rows.last().copied(), c.rows.get(*last).copied());
            }
        }
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let err = Catalog::from_entries(vec![("a".into(), 1), ("a".into(), 2)]).unwrap_err();
        assert!(err.contains("twice"));
    }
}
