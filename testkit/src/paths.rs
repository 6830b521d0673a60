//! The checkout and scratch directories under its target/.

use std::path::{Path, PathBuf};

/// The checkout: the directory above this crate's (testkit/).
pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit/ lies in the checkout").to_path_buf()
}

/// A fresh directory under target/ named `name` (unique per test process), emptied if present.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = repo().join("target").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Copies a directory tree (a model directory).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
