//! Redis: key names, profile parsing, writes with TTL, bounded timeouts and reconnection.

use std::sync::RwLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, ConnectionAddr, IntoConnectionInfo, RedisError};

use crate::config::Config;
use crate::error::{ConfigError, Error};

pub fn profile_key(user_id: &str) -> String {
    format!("user_profile:{user_id}")
}

pub fn recommendations_key(user_id: &str) -> String {
    format!("recommendations:{user_id}")
}

pub struct Store {
    client: Client,
    manager_config: ConnectionManagerConfig,
    conn: RwLock<ConnectionManager>,
    /// Hard bound on one operation, connecting included.
    op_timeout: Duration,
}

impl Store {
    /// Builds the client; nothing connects until the first command, so the service starts (and
    /// reports unhealthy) while Redis is down.
    pub fn new(cfg: &Config) -> Result<Self, ConfigError> {
        let client = client(cfg)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.redis_connect_timeout()))
            .set_response_timeout(Some(cfg.redis_response_timeout()))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(100));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
            .map_err(|e| ConfigError::Invalid(format!("redis: {e}")))?;
        Ok(Self {
            client,
            manager_config,
            conn: RwLock::new(conn),
            op_timeout: cfg.redis_connect_timeout() + cfg.redis_response_timeout(),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs one operation under the hard timeout; after a connection-level failure the manager is
    /// replaced, so the next command dials afresh instead of waiting on a dead connection.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        match tokio::time::timeout(self.op_timeout, op(self.conn())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.code().is_some() && !e.is_connection_refusal() => Err(Error::Redis(e.to_string())),
            Ok(Err(e)) => {
                self.reset();
                Err(Error::RedisUnavailable(e.to_string()))
            }
            Err(_) => {
                self.reset();
                Err(Error::RedisUnavailable(format!("no answer within {} ms", self.op_timeout.as_millis())))
            }
        }
    }

    fn reset(&self) {
        if let Ok(fresh) = ConnectionManager::new_lazy_with_config(self.client.clone(), self.manager_config.clone()) {
            *self.conn.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        }
    }

    pub async fn ping(&self) -> Result<(), Error> {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await }).await.map(|_| ())
    }

    /// Reads `user_profile:<user_id>`: `None` when the key does not exist.
    pub async fn read_profile(&self, user_id: &str) -> Result<Option<Vec<String>>, Error> {
        let key = profile_key(user_id);
        let raw = {
            let key = key.clone();
            self.run(|mut c| async move { c.get::<_, Option<Vec<u8>>>(&key).await }).await
        };
        match raw {
            Ok(None) => Ok(None),
            Ok(Some(bytes)) => parse_profile(&key, &bytes).map(Some),
            Err(Error::Redis(msg)) if msg.contains("WRONGTYPE") => {
                let kind = {
                    let key = key.clone();
                    self.run(|mut c| async move { redis::cmd("TYPE").arg(&key).query_async::<String>(&mut c).await })
                        .await
                        .unwrap_or_else(|_| "non-string".into())
                };
                Err(Error::InvalidProfile {
                    key,
                    reason: format!("the key holds a Redis {kind}, expected a string with a JSON array of item ids"),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Writes `recommendations:<user_id>` as a JSON array of item ids with the TTL, in one SET.
    pub async fn write_recommendations(&self, user_id: &str, item_ids: &[&str], ttl_secs: u64) -> Result<(), Error> {
        let key = recommendations_key(user_id);
        let value = serde_json::to_string(item_ids).map_err(|e| Error::Inference(e.to_string()))?;
        self.run(|mut c| async move { c.set_ex::<_, _, ()>(&key, value, ttl_secs).await }).await
    }
}

fn client(cfg: &Config) -> Result<Client, ConfigError> {
    let bad = |e: RedisError| ConfigError::Invalid(format!("redis address: {e}"));
    let info = match &cfg.redis_url {
        Some(url) => url.as_str().into_connection_info().map_err(bad)?,
        None => {
            let info =
                ConnectionAddr::Tcp(cfg.redis_host.clone(), cfg.redis_port).into_connection_info().map_err(bad)?;
            let mut redis = info.redis_settings().clone().set_db(cfg.redis_db);
            if let Some(password) = cfg.redis_password.as_deref().filter(|p| !p.is_empty()) {
                redis = redis.set_password(password);
            }
            info.set_redis_settings(redis)
        }
    };
    Client::open(info).map_err(bad)
}

/// A profile is a JSON array of item-id strings; anything else is refused with the reason.
pub fn parse_profile(key: &str, bytes: &[u8]) -> Result<Vec<String>, Error> {
    let invalid = |reason: String| Error::InvalidProfile { key: key.to_string(), reason };
    let text = std::str::from_utf8(bytes).map_err(|_| invalid("the value is not UTF-8 text".into()))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("the value is not JSON ({e})")))?;
    let serde_json::Value::Array(items) = value else {
        return Err(invalid(format!("expected a JSON array of item ids, got {}", json_kind(&value))));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            serde_json::Value::String(s) => Ok(s),
            other => Err(invalid(format!("element {i} is {}, expected a string item id", json_kind(&other)))),
        })
        .collect()
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_only_as_arrays_of_strings() {
        assert_eq!(parse_profile("k", br#"["a","b"]"#).unwrap(), vec!["a", "b"]);
        assert_eq!(parse_profile("k", b"[]").unwrap(), Vec::<String>::new());
        let cases: [(&[u8], &str); 5] = [
            (b"not json", "not JSON"),
            (br#"{"a":1}"#, "got an object"),
            (br#"["a", 5]"#, "element 1 is a number"),
            (br#"[["a"]]"#, "element 0 is an array"),
            (b"\xff\xfe", "not UTF-8"),
        ];
        for (input, want) in cases {
            let err = parse_profile("user_profile:x", input).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(want) && text.contains("user_profile:x"), "{text}");
            assert_eq!(err.status().as_u16(), 422);
        }
    }
}
