//! Redis: key names, profile parsing, writes with TTL, bounded timeouts and reconnection, and the
//! primitives of the listener (keyspace notifications, the request stream, SCAN).

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisError};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::error::{ConfigError, Error};

pub fn profile_key(user_id: &str) -> String {
    format!("user_profile:{user_id}")
}

pub fn recommendations_key(user_id: &str) -> String {
    format!("recommendations:{user_id}")
}

/// What a stored list was computed from (a hash key beside the list, same TTL).
pub fn meta_key(user_id: &str) -> String {
    format!("recommendations_meta:{user_id}")
}

pub const PROFILE_PREFIX: &str = "user_profile:";

/// A profile as read: its items (oldest first) and the SHA-256 of the stored value.
#[derive(Debug, Clone)]
pub struct Profile {
    pub items: Vec<String>,
    pub sha: String,
}

/// The SHA-256 recorded for a missing profile.
pub const MISSING_PROFILE_SHA: &str = "missing";

/// A profile read together with what the stored recommendations were computed from.
#[derive(Debug, Clone)]
pub struct ProfileRead {
    pub profile: Option<Profile>,
    /// `(profile_sha, model_version)` of the stored list, if any.
    pub computed_from: Option<(String, String)>,
}

impl ProfileRead {
    pub fn sha(&self) -> &str {
        self.profile.as_ref().map(|p| p.sha.as_str()).unwrap_or(MISSING_PROFILE_SHA)
    }
}

pub struct Store {
    client: Client,
    manager_config: ConnectionManagerConfig,
    conn: RwLock<ConnectionManager>,
    /// Hard bound on one operation, connecting included.
    op_timeout: Duration,
    db: i64,
    notify_channel: String,
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
        let db = client.get_connection_info().redis_settings().db();
        Ok(Self {
            client,
            manager_config,
            conn: RwLock::new(conn),
            op_timeout: cfg.redis_connect_timeout() + cfg.redis_response_timeout(),
            db,
            notify_channel: cfg.notify_channel.clone(),
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
            Ok(Err(e)) if is_connection_error(&e) => {
                self.reset();
                Err(Error::RedisUnavailable(e.to_string()))
            }
            // Redis is up but cannot serve yet (loading its data after a restart, ...): try again soon.
            Ok(Err(e)) if is_transient(&e) => Err(Error::RedisUnavailable(e.to_string())),
            // Redis answered, with an error (WRONGTYPE, NOAUTH, OOM, ...), possibly inside a pipeline.
            Ok(Err(e)) => Err(Error::Redis(e.to_string())),
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

    /// Reads `user_profile:<user_id>` (parsed, with its hash) and what the stored
    /// recommendations were computed from, in one round trip.
    pub async fn read_profile(&self, user_id: &str) -> Result<ProfileRead, Error> {
        let key = profile_key(user_id);
        let raw = {
            let (key, meta) = (key.clone(), meta_key(user_id));
            self.run(|mut c| async move {
                redis::pipe()
                    .get(&key)
                    .cmd("HMGET")
                    .arg(&meta)
                    .arg("profile_sha")
                    .arg("model_version")
                    .query_async::<(Option<Vec<u8>>, (Option<String>, Option<String>))>(&mut c)
                    .await
            })
            .await
        };
        match raw {
            Ok((bytes, (sha, version))) => {
                let profile = match bytes {
                    None => None,
                    Some(bytes) => Some(Profile {
                        items: parse_profile(&key, &bytes)?,
                        sha: format!("{:x}", Sha256::digest(&bytes)),
                    }),
                };
                Ok(ProfileRead { profile, computed_from: sha.zip(version) })
            }
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

    /// Writes `recommendations:<user_id>` (a JSON array of item ids, with the TTL) and what it was
    /// computed from, in one MULTI/EXEC, then announces the user id on the notify channel.
    pub async fn write_recommendations(
        &self,
        user_id: &str,
        item_ids: &[&str],
        ttl_secs: u64,
        profile_sha: &str,
        model_version: &str,
    ) -> Result<(), Error> {
        let key = recommendations_key(user_id);
        let meta = meta_key(user_id);
        let value = serde_json::to_string(item_ids).map_err(|e| Error::Inference(e.to_string()))?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let fields = [
            ("profile_sha", profile_sha.to_string()),
            ("model_version", model_version.to_string()),
            ("computed_at_ms", now_ms.to_string()),
        ];
        let (channel, user) = (self.notify_channel.clone(), user_id.to_string());
        self.run(|mut c| async move {
            redis::pipe()
                .atomic()
                .set_ex(&key, value, ttl_secs)
                .ignore()
                .hset_multiple(&meta, &fields)
                .ignore()
                .expire(&meta, ttl_secs as i64)
                .ignore()
                .publish(&channel, &user)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Makes sure Redis publishes keyspace events for string writes (`K` and `$`); enables them
    /// with CONFIG SET when they are off and that is allowed.
    pub async fn ensure_keyspace_notifications(&self, may_configure: bool) -> Result<(), String> {
        let current: Vec<String> = self
            .run(|mut c| async move {
                redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async(&mut c).await
            })
            .await
            .map_err(|e| format!("cannot read notify-keyspace-events ({e})"))?;
        let flags = current.get(1).cloned().unwrap_or_default();
        let has = |f: char| flags.contains(f) || (f == '$' && flags.contains('A'));
        if has('K') && has('$') {
            return Ok(());
        }
        let wanted: String = {
            let mut f = flags.clone();
            for c in ['K', '$'] {
                if !has(c) {
                    f.push(c);
                }
            }
            f
        };
        let advice = format!(
            "Redis does not publish keyspace events for profile writes (notify-keyspace-events is {flags:?}); \
             add the line `notify-keyspace-events {wanted}` to redis.conf (or run CONFIG SET notify-keyspace-events {wanted})"
        );
        if !may_configure {
            return Err(advice);
        }
        let w = wanted.clone();
        self.run(|mut c| async move {
            redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg(&w).query_async::<()>(&mut c).await
        })
        .await
        .map_err(|e| format!("{advice}; CONFIG SET was refused: {e}"))?;
        tracing::info!(flags = %wanted, "enabled keyspace notifications");
        Ok(())
    }

    /// User ids whose profile was written, from keyspace notifications, until the connection
    /// drops (the stream then ends; the caller re-subscribes and catches up).
    pub async fn profile_writes(&self) -> Result<BoxStream<'static, String>, Error> {
        let mut pubsub = tokio::time::timeout(self.op_timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| Error::RedisUnavailable("subscribing timed out".into()))?
            .map_err(|e| Error::RedisUnavailable(e.to_string()))?;
        let pattern = format!("__keyspace@{}__:{PROFILE_PREFIX}*", self.db);
        pubsub.psubscribe(&pattern).await.map_err(|e| Error::RedisUnavailable(e.to_string()))?;
        let prefix = format!("__keyspace@{}__:{PROFILE_PREFIX}", self.db);
        Ok(pubsub
            .into_on_message()
            .filter_map(move |msg| {
                let user = msg.get_channel_name().strip_prefix(&prefix).map(str::to_string);
                async move { user }
            })
            .boxed())
    }

    /// One SCAN page of profile keys: (next cursor, user ids). Cursor 0 starts and ends a scan.
    pub async fn scan_profiles(&self, cursor: u64, count: usize) -> Result<(u64, Vec<String>), Error> {
        let (next, keys): (u64, Vec<String>) = self
            .run(|mut c| async move {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{PROFILE_PREFIX}*"))
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok((next, keys.into_iter().filter_map(|k| k.strip_prefix(PROFILE_PREFIX).map(str::to_string)).collect()))
    }

    pub async fn get_u64(&self, key: &str) -> Result<Option<u64>, Error> {
        let key = key.to_string();
        self.run(|mut c| async move { c.get::<_, Option<u64>>(&key).await }).await
    }

    pub async fn set_u64(&self, key: &str, value: u64) -> Result<(), Error> {
        let key = key.to_string();
        self.run(|mut c| async move { c.set::<_, _, ()>(&key, value).await }).await
    }

    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        let key = key.to_string();
        self.run(|mut c| async move { c.del::<_, ()>(&key).await }).await
    }

    /// A consumer of the request stream in a consumer group, on its own connection (blocking reads
    /// must not hold up the shared one).
    pub async fn stream_consumer(&self, stream: &str, group: &str, consumer: &str) -> Result<StreamConsumer, Error> {
        let block = Duration::from_millis(1000);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.op_timeout))
            .set_response_timeout(Some(block + self.op_timeout));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Error::RedisUnavailable(e.to_string()))?;
        let created: Result<(), RedisError> = conn.xgroup_create_mkstream(stream, group, "0").await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(Error::Redis(e.to_string())),
        }
        Ok(StreamConsumer {
            conn,
            stream: stream.into(),
            group: group.into(),
            consumer: consumer.into(),
            block,
            claim_cursor: "0-0".into(),
        })
    }
}

/// An entry of the request stream.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    pub id: String,
    pub fields: HashMap<String, String>,
}

impl StreamEntry {
    /// Milliseconds since the epoch when the entry was added (from its id).
    pub fn added_ms(&self) -> Option<u64> {
        self.id.split('-').next()?.parse().ok()
    }
}

pub struct StreamConsumer {
    conn: MultiplexedConnection,
    pub stream: String,
    group: String,
    consumer: String,
    block: Duration,
    claim_cursor: String,
}

/// The connection failed or timed out (as opposed to Redis answering with an error).
fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// Answers of a Redis that is up but not ready: loading its dataset (after a restart), a replica
/// without its master, a busy script. The same command succeeds later.
fn is_transient(e: &RedisError) -> bool {
    const CODES: [&str; 4] = ["LOADING", "MASTERDOWN", "TRYAGAIN", "BUSY"];
    e.code().is_some_and(|c| CODES.contains(&c)) || CODES.iter().any(|c| e.to_string().contains(&format!("{c} ")))
}

fn stream_err(e: RedisError) -> Error {
    if is_connection_error(&e) || is_transient(&e) {
        Error::RedisUnavailable(e.to_string())
    } else {
        Error::Redis(e.to_string())
    }
}

fn entries(ids: Vec<redis::streams::StreamId>) -> Vec<StreamEntry> {
    ids.into_iter()
        .map(|sid| {
            let fields = sid
                .map
                .iter()
                .filter_map(|(k, v)| redis::from_redis_value::<String>(v.clone()).ok().map(|v| (k.clone(), v)))
                .collect();
            StreamEntry { id: sid.id, fields }
        })
        .collect()
}

impl StreamConsumer {
    /// New entries for this consumer, waiting up to a second for some.
    pub async fn read_new(&mut self, count: usize) -> Result<Vec<StreamEntry>, Error> {
        let opts = StreamReadOptions::default()
            .group(&self.group, &self.consumer)
            .count(count)
            .block(self.block.as_millis() as usize);
        let reply: Option<StreamReadReply> =
            self.conn.xread_options(&[&self.stream], &[">"], &opts).await.map_err(stream_err)?;
        Ok(reply.map(|r| r.keys.into_iter().flat_map(|k| entries(k.ids)).collect()).unwrap_or_default())
    }

    /// Takes over entries that another (dead or failing) consumer left pending for `min_idle`.
    pub async fn claim_stale(&mut self, min_idle: Duration, count: usize) -> Result<Vec<StreamEntry>, Error> {
        let opts = StreamAutoClaimOptions::default().count(count);
        let reply: StreamAutoClaimReply = self
            .conn
            .xautoclaim_options(
                &self.stream,
                &self.group,
                &self.consumer,
                min_idle.as_millis() as u64,
                &self.claim_cursor,
                opts,
            )
            .await
            .map_err(stream_err)?;
        self.claim_cursor = reply.next_stream_id.clone();
        Ok(entries(reply.claimed))
    }

    /// How many times the entry has been delivered (1 on its first delivery).
    pub async fn deliveries(&mut self, id: &str) -> Result<u64, Error> {
        let reply: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(id)
            .arg(id)
            .arg(1)
            .query_async(&mut self.conn)
            .await
            .map_err(stream_err)?;
        Ok(reply.first().map(|r| r.3).unwrap_or(1))
    }

    pub async fn ack(&mut self, id: &str) -> Result<(), Error> {
        self.conn.xack::<_, _, _, ()>(&self.stream, &self.group, &[id]).await.map_err(stream_err)
    }

    /// Moves an entry to the dead-letter stream with the reason, then acknowledges it.
    pub async fn dead_letter(&mut self, dead_stream: &str, entry: &StreamEntry, reason: &str) -> Result<(), Error> {
        let mut fields: Vec<(String, String)> = entry.fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        fields.push(("reason".into(), reason.into()));
        fields.push(("source_stream".into(), self.stream.clone()));
        fields.push(("source_id".into(), entry.id.clone()));
        redis::pipe()
            .atomic()
            .xadd(dead_stream, "*", &fields)
            .ignore()
            .xack(&self.stream, &self.group, &[&entry.id])
            .ignore()
            .query_async::<()>(&mut self.conn)
            .await
            .map_err(stream_err)
    }

    /// Entries delivered to the group and not acknowledged yet.
    pub async fn pending(&mut self) -> Result<u64, Error> {
        let reply: redis::streams::StreamPendingReply =
            self.conn.xpending(&self.stream, &self.group).await.map_err(stream_err)?;
        Ok(reply.count() as u64)
    }
}

/// The Redis client: REDIS_URL, or REDIS_HOST/PORT/DB/PASSWORD (over TLS with REDIS_TLS); a
/// CA file or client certificate when given (rediss:// only).
fn client(cfg: &Config) -> Result<Client, ConfigError> {
    let bad = |e: RedisError| ConfigError::Invalid(format!("redis address: {e}"));
    let info = match &cfg.redis_url {
        Some(url) => url.as_str().into_connection_info().map_err(bad)?,
        None => {
            let scheme = if cfg.redis_tls { "rediss" } else { "redis" };
            let host =
                if cfg.redis_host.contains(':') { format!("[{}]", cfg.redis_host) } else { cfg.redis_host.clone() };
            let info =
                format!("{scheme}://{host}:{}/{}", cfg.redis_port, cfg.redis_db).into_connection_info().map_err(bad)?;
            let mut redis = info.redis_settings().clone();
            if let Some(password) = cfg.redis_password.as_deref().filter(|p| !p.is_empty()) {
                redis = redis.set_password(password);
            }
            info.set_redis_settings(redis)
        }
    };
    let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map_err(|e| ConfigError::Invalid(format!("{what} {}: {e}", path.display())))
    };
    let root_cert = cfg.redis_tls_ca_cert.as_deref().map(|p| read(p, "REDIS_TLS_CA_CERT")).transpose()?;
    let client_tls = match (&cfg.redis_tls_client_cert, &cfg.redis_tls_client_key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert, "REDIS_TLS_CLIENT_CERT")?,
            client_key: read(key, "REDIS_TLS_CLIENT_KEY")?,
        }),
        _ => None,
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Client::open(info).map_err(bad);
    }
    if !tls {
        return Err(ConfigError::Invalid(
            "REDIS_TLS_CA_CERT / REDIS_TLS_CLIENT_CERT are set but the Redis address is not TLS \
             (use a rediss:// REDIS_URL or REDIS_TLS=true)"
                .into(),
        ));
    }
    Client::build_with_tls(info, redis::TlsCertificates { client_tls, root_cert }).map_err(bad)
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

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics_and_only_accepts_string_arrays(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            if let Ok(items) = parse_profile("user_profile:p", &bytes) {
                let reparsed: Vec<String> = serde_json::from_slice(&bytes).unwrap();
                proptest::prop_assert_eq!(items, reparsed);
            }
        }

        #[test]
        fn any_list_of_strings_round_trips(items in proptest::collection::vec(".{0,40}", 0..50)) {
            let json = serde_json::to_vec(&items).unwrap();
            proptest::prop_assert_eq!(parse_profile("user_profile:p", &json).unwrap(), items);
        }

        #[test]
        fn nested_or_mixed_json_is_refused_with_422(depth in 1usize..64, n in proptest::num::i64::ANY) {
            let nested = format!("{}{}{}", "[".repeat(depth), n, "]".repeat(depth));
            let err = parse_profile("user_profile:p", nested.as_bytes()).unwrap_err();
            proptest::prop_assert_eq!(err.status().as_u16(), 422);
        }
    }

    #[test]
    fn stream_entry_time_comes_from_its_id() {
        let e = StreamEntry { id: "1700000000123-4".into(), fields: HashMap::new() };
        assert_eq!(e.added_ms(), Some(1_700_000_000_123));
    }
}
