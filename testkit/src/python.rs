//! The Python that generates the test models.

use crate::paths::repo;

/// The Python that has torch: MODEL_SERVICE_PYTHON (set by scripts/test.sh), else python3.
pub(crate) fn python() -> String {
    std::env::var("MODEL_SERVICE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// PYTHONPATH that makes the package scripts/model_service_py importable: this checkout's
/// scripts/ first, then whatever PYTHONPATH already holds.
pub(crate) fn python_path() -> std::ffi::OsString {
    let mut paths = vec![repo().join("scripts")];
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&old).filter(|p| !p.as_os_str().is_empty()));
    }
    std::env::join_paths(paths).expect("a PYTHONPATH entry holds the path separator")
}
