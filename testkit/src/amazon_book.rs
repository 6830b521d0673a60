//! Real users of the Amazon-Book data set (found at AMAZON_BOOK_DIR, by default
//! `../shared/data/amazon-book` beside the checkout), as the store would hold them: reviewer-index
//! user ids prefixed `ab`, items as ASINs.

use std::collections::HashMap;
use std::path::PathBuf;

fn dir() -> PathBuf {
    std::env::var_os("AMAZON_BOOK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::paths::repo().join("../shared/data/amazon-book"))
}

fn read(name: &str) -> String {
    let path = dir().join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the Amazon-Book data set is needed ({}: {e}); set AMAZON_BOOK_DIR", path.display()))
}

/// The first `n` users of `file` (train.txt or test.txt) as (user id, items as ASINs in file order).
pub fn amazon_book_users(file: &str, n: usize) -> Vec<(String, Vec<String>)> {
    let asins: HashMap<String, String> = read("item_list.txt")
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let asin = cols.next()?;
            Some((cols.next()?.to_string(), asin.to_string()))
        })
        .collect();
    read(file)
        .lines()
        .take(n)
        .map(|l| {
            let mut cols = l.split_whitespace();
            let user = format!("ab{}", cols.next().unwrap());
            (user, cols.filter_map(|i| asins.get(i).cloned()).collect())
        })
        .collect()
}
