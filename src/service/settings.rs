//! The service settings (list lengths, the history the models see, the profile caps, the TTL of
//! stored lists): the section of the configuration the service is built from.

use clap::Args;

use super::ServiceConfig;
use crate::error::ConfigError;
use crate::redis::store::ProfileLimits;

#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// Lifetime of recommendations:<user_id>, in seconds.
    #[arg(long, env = "RECOMMENDATION_TTL", default_value_t = 3600, global = true)]
    pub recommendation_ttl: u64,
    /// List length when the request gives no k.
    #[arg(long, env = "DEFAULT_K", default_value_t = 10, global = true)]
    pub default_k: usize,
    /// Largest k a request may ask for.
    #[arg(long, env = "MAX_K", default_value_t = 100, global = true)]
    pub max_k: usize,
    /// Profile items used: the most recent (last in the JSON array) are kept.
    #[arg(long, env = "MAX_HISTORY", default_value_t = 200, global = true)]
    pub max_history: usize,
    /// Largest stored profile read, in bytes (422 `profile_too_large` beyond; the value is not
    /// transferred).
    #[arg(long, env = "MAX_PROFILE_BYTES", default_value_t = 256 * 1024, global = true)]
    pub max_profile_bytes: usize,
    /// Most item ids a profile may hold (422 `profile_too_long` beyond). Every one of them is
    /// excluded from the recommendations, whatever MAX_HISTORY the models see.
    #[arg(long, env = "MAX_PROFILE_ITEMS", default_value_t = 10_000, global = true)]
    pub max_profile_items: usize,
    /// Most item ids a request's `exclude` may hold (400 `invalid_exclude` beyond).
    #[arg(long, env = "MAX_EXCLUDE", default_value_t = 500, global = true)]
    pub max_exclude: usize,
    /// How old the cached set of unavailable items (`items:unavailable`) may grow before it is
    /// read again, in milliseconds (the listener also reads it on its keyspace event).
    #[arg(long, env = "UNAVAILABLE_REFRESH_MS", default_value_t = 1000, global = true)]
    pub unavailable_refresh_ms: u64,
    /// Largest set of unavailable items taken; a larger one is logged and counted, and the last
    /// good set goes on serving.
    #[arg(long, env = "MAX_UNAVAILABLE", default_value_t = 1_000_000, global = true)]
    pub max_unavailable: usize,
}

impl ServiceArgs {
    pub fn service_config(&self) -> ServiceConfig {
        ServiceConfig {
            default_k: self.default_k,
            max_k: self.max_k,
            max_history: self.max_history,
            ttl_secs: self.recommendation_ttl,
            profile_limits: self.profile_limits(),
            max_exclude: self.max_exclude,
            unavailable_refresh: std::time::Duration::from_millis(self.unavailable_refresh_ms),
            max_unavailable: self.max_unavailable,
        }
    }

    /// The caps on a stored profile (MAX_PROFILE_BYTES, MAX_PROFILE_ITEMS).
    pub fn profile_limits(&self) -> ProfileLimits {
        ProfileLimits { max_bytes: self.max_profile_bytes, max_items: self.max_profile_items }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("DEFAULT_K", self.default_k),
            ("MAX_K", self.max_k),
            ("MAX_HISTORY", self.max_history),
            ("MAX_PROFILE_BYTES", self.max_profile_bytes),
            ("MAX_PROFILE_ITEMS", self.max_profile_items),
            ("MAX_UNAVAILABLE", self.max_unavailable),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.default_k > self.max_k {
            return Err(ConfigError::Invalid(format!("DEFAULT_K ({}) exceeds MAX_K ({})", self.default_k, self.max_k)));
        }
        if self.recommendation_ttl == 0 {
            return Err(ConfigError::Invalid("RECOMMENDATION_TTL must be at least 1 second".into()));
        }
        Ok(())
    }
}
