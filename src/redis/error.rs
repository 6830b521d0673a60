//! The Redis layer's errors. What they mean to a caller (status codes, retries) is decided above.

pub use super::profile::ProfileError;

/// An operation of the Redis layer that failed (Clone: requests sharing one computation each
/// receive its outcome).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No connection, or no answer in time: retrying later can help.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error, or with a reply of an unexpected shape.
    #[error("redis refused the command: {0}")]
    Refused(String),
    /// The stored profile cannot be ranked (until the frontend rewrites it).
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// A value this layer could not encode.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The Redis settings do not describe a usable deployment (refused at start).
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct SettingsError(pub String);
