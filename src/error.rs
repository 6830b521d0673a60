//! The errors of the service layer, wrapping those of the Redis and inference layers. How each
//! is answered over HTTP (status, Retry-After, body) is decided in `api::error` only.

use crate::inference::error::{InferenceError, LoadError};
use crate::redis::error::{ProfileError, SettingsError};

/// Errors of configuration and model loading: fatal at start, never seen by a request.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(transparent)]
    Redis(#[from] SettingsError),
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// Errors a recommendation can end in (Clone: requests sharing one computation through single
/// flight each receive its outcome).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("invalid user id: {0}")]
    InvalidUserId(String),
    #[error("invalid k: {0}")]
    InvalidK(String),
    /// A request's `exclude` (too many ids, or not a list of strings).
    #[error("invalid exclude: {0}")]
    InvalidExclude(String),
    /// The stored profile (or a request's history) cannot be ranked.
    #[error(transparent)]
    Profile(ProfileError),
    /// Redis could not be reached, or refused.
    #[error(transparent)]
    Redis(crate::redis::Error),
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::redis::Error> for Error {
    fn from(e: crate::redis::Error) -> Self {
        match e {
            crate::redis::Error::Profile(p) => Error::Profile(p),
            other => Error::Redis(other),
        }
    }
}

impl From<ProfileError> for Error {
    fn from(e: ProfileError) -> Self {
        Error::Profile(e)
    }
}

impl Error {
    /// The machine-readable name of what went wrong: the `error` field of an HTTP answer, the
    /// failure counts of a backfill's summary, the CLI's output.
    pub fn code(&self) -> &'static str {
        use crate::redis::Error as R;
        match self {
            Error::InvalidUserId(_) => "invalid_user_id",
            Error::InvalidK(_) => "invalid_k",
            Error::InvalidExclude(_) => "invalid_exclude",
            Error::Profile(ProfileError::Invalid { .. }) => "invalid_profile",
            Error::Profile(ProfileError::TooLarge { .. }) => "profile_too_large",
            Error::Profile(ProfileError::TooLong { .. }) => "profile_too_long",
            Error::Redis(R::Unavailable(_)) => "redis_unavailable",
            Error::Redis(R::Refused(_)) => "redis_error",
            Error::Redis(R::Profile(_)) => "invalid_profile", // never built: From moves it to Profile
            Error::Redis(R::Internal(_)) | Error::Internal(_) => "internal_error",
            Error::Inference(e) => match e {
                InferenceError::Overloaded(_) => "overloaded",
                InferenceError::DeadlineExceeded(_) => "deadline_exceeded",
                InferenceError::ModelsLoading => "models_loading",
                InferenceError::EngineStopped(_) => "engine_stopped",
                InferenceError::Failed(_) => "inference_failed",
                InferenceError::ReloadTimeout(_) => "reload_timeout",
                InferenceError::ReloadInProgress => "reload_in_progress",
                InferenceError::ReloadRefused(_) => "reload_refused",
            },
        }
    }

    /// Retrying will not help: the request or the stored profile itself is at fault (until the
    /// frontend rewrites it). The listener, the ingestion and the backfill log such a user and
    /// move on instead of retrying.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::Profile(_) | Error::InvalidUserId(_) | Error::InvalidK(_) | Error::InvalidExclude(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_error_from_the_redis_layer_stays_a_profile_error() {
        let from_redis: Error =
            crate::redis::Error::from(ProfileError::TooLong { key: "user_profile:a".into(), items: 9, max: 8 }).into();
        assert!(matches!(from_redis, Error::Profile(ProfileError::TooLong { .. })), "{from_redis:?}");
        assert_eq!(from_redis.code(), "profile_too_long");
        assert!(from_redis.is_permanent());
        let unavailable: Error = crate::redis::Error::Unavailable("refused".into()).into();
        assert_eq!((unavailable.code(), unavailable.is_permanent()), ("redis_unavailable", false));
        assert_eq!(unavailable.to_string(), "redis unavailable: refused");
    }
}
