//! The inference layer's errors: loading a model directory, and running or reloading it.

/// A model directory, or the device it should run on, that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("model directory {dir}: {reason}")]
    Model { dir: String, reason: String },
    #[error("device: {0}")]
    Device(String),
    #[error("{0}")]
    Load(String),
}

/// What a ranking or a reload can end in (Clone: requests sharing one computation each receive
/// its outcome).
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    #[error("inference queue is full ({0} requests waiting)")]
    Overloaded(usize),
    #[error("no result within the deadline of {0} ms")]
    DeadlineExceeded(u64),
    #[error("the models are loading; try again shortly")]
    ModelsLoading,
    #[error("inference engine is not running: {0}")]
    EngineStopped(String),
    #[error("inference failed: {0}")]
    Failed(String),
    #[error("the reload did not finish within {0} s; the models in service keep serving")]
    ReloadTimeout(f64),
    #[error("a reload is already in progress")]
    ReloadInProgress,
    #[error("reload refused, the models in service keep serving: {0}")]
    ReloadRefused(String),
}
