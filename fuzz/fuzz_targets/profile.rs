//! The profile parser and the history mapping: any bytes stored at user_profile:<id> either parse
//! into a history whose invariants hold, or are refused with a 422 JSON error naming the key.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use model_service::inference::catalog::Catalog;
use model_service::redis::profile::parse_profile;

fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let ids = ["0553092626", "0393316041", "a", "*", ":", "{x}", "\n", "é", "", "a b"];
        Catalog::from_entries(ids.iter().enumerate().map(|(i, id)| (id.to_string(), i as u64)).collect()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let (max_len, bytes) = match data.split_first() {
        Some((&m, rest)) => (usize::from(m % 16) + 1, rest),
        None => (1, data),
    };
    match parse_profile("user_profile:fuzz", bytes, 10_000) {
        Ok(items) => {
            let c = catalog();
            let h = c.history(&items, max_len);
            assert!(h.rows.len() <= max_len);
            let distinct: std::collections::HashSet<i64> = h.rows.iter().copied().collect();
            assert_eq!(distinct.len(), h.rows.len(), "history rows repeat");
            assert!(h.rows.iter().all(|&r| r >= 0 && (r as usize) < c.len()));
            let known: Vec<&String> = items.iter().filter(|i| c.row(i).is_some()).collect();
            assert_eq!(h.unknown, items.len() - known.len());
            let all: std::collections::HashSet<&String> = known.iter().copied().collect();
            assert_eq!(h.rows.len() + h.truncated, all.len());
            if let Some(last) = known.last() {
                assert_eq!(h.rows.last().copied(), c.row(last), "the most recent item is kept last");
            }
        }
        Err(e) => {
            assert_eq!(e.status().as_u16(), 422);
            let body = e.body();
            assert_eq!(body["error"], "invalid_profile");
            assert!(body["detail"].as_str().is_some_and(|d| d.contains("user_profile:fuzz")));
        }
    }
});
