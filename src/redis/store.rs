//! The request-path store: the client (address, password, TLS), bounded timeouts and reconnection,
//! the profile read and the recommendation write.

use std::sync::{LazyLock, RwLock};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{
    Client, Cmd, ConnectionAddr, FromRedisValue, IntoConnectionInfo, RedisError, RedisResult, Script, Value,
};
use sha1::{Digest, Sha1};

use super::keys::{meta_key, profile_key, recommendations_key, HEALTH_KEY};
use super::profile::{parse_profile, Profile, ProfileRead, StoredRead};
use crate::config::Config;
use crate::error::{ConfigError, Error};

pub struct Store {
    pub(super) client: Client,
    pub(super) manager_config: ConnectionManagerConfig,
    pub(super) conn: RwLock<ConnectionManager>,
    /// Hard bound on one operation, connecting included.
    pub(super) op_timeout: Duration,
    pub(super) db: i64,
    pub(super) notify_channel: String,
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

    pub(super) fn conn(&self) -> ConnectionManager {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs one operation under the hard timeout. A connection found dead (Redis restarted since
    /// the last command: broken pipe, reset) is replaced and the operation tried once more on a
    /// fresh one, so no user request pays for discovering it; after a timeout the manager is
    /// replaced too, so the next command dials afresh instead of waiting on a dead connection.
    /// Every operation given here is idempotent (reads, or writes guarded by a deadline and the
    /// profile's hash), so a second attempt is safe.
    pub(super) async fn run<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let attempts = async {
            match op(self.conn()).await {
                Err(e) if is_dead_connection(&e) => {
                    self.reset();
                    op(self.conn()).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.op_timeout, attempts).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.classify(e)),
            Err(_) => {
                self.reset();
                Err(Error::RedisUnavailable(format!("no answer within {} ms", self.op_timeout.as_millis())))
            }
        }
    }

    /// The error a request sees for a Redis error (resetting the connection after a connection
    /// failure).
    pub(super) fn classify(&self, e: RedisError) -> Error {
        if is_connection_error(&e) {
            self.reset();
            Error::RedisUnavailable(e.to_string())
        } else if is_transient(&e) {
            // Redis is up but cannot serve yet (loading its data after a restart, ...): try again soon.
            Error::RedisUnavailable(e.to_string())
        } else {
            // Redis answered with an error (WRONGTYPE, NOAUTH, OOM, READONLY, MOVED, ...).
            Error::Redis(e.to_string())
        }
    }

    fn reset(&self) {
        if let Ok(fresh) = ConnectionManager::new_lazy_with_config(self.client.clone(), self.manager_config.clone()) {
            *self.conn.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        }
    }

    pub(super) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, Error> {
        self.run(|mut c| async move { cmd.query_async::<T>(&mut c).await }).await
    }

    /// Readiness of the request path: Redis answers *and accepts writes* (a short-lived key), so a
    /// Redis out of memory, a read-only replica or a cluster node that redirects is not "healthy".
    pub async fn check_writable(&self) -> Result<(), Error> {
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(HEALTH_KEY).arg(now_ms()).arg("PX").arg(10_000);
        self.query::<()>(&cmd).await
    }

    /// Reads `user_profile:<user_id>` (at most `max_bytes` of it: a larger value is refused
    /// without being transferred), what the stored recommendations were computed from, Redis's
    /// clock and, with `with_stored_list`, the stored list with its scores, in one MULTI. The
    /// profile is parsed here, with its item cap.
    pub async fn read_profile(
        &self,
        user_id: &str,
        limits: ProfileLimits,
        with_stored_list: bool,
    ) -> Result<ProfileRead, Error> {
        let (key, meta) = (profile_key(user_id), meta_key(user_id));
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .ignore_errors()
            .cmd("TYPE")
            .arg(&key)
            .cmd("STRLEN")
            .arg(&key)
            .cmd("GETRANGE")
            .arg(&key)
            .arg(0)
            .arg(limits.max_bytes)
            .cmd("HMGET")
            .arg(&meta)
            .arg("profile_sha")
            .arg("model_version")
            .arg("scores")
            .arg("strategy")
            .cmd("TIME");
        if with_stored_list {
            pipe.cmd("GET").arg(recommendations_key(user_id));
        }
        let read_at = Instant::now();
        let replies: Vec<RedisResult<Value>> = self
            .run(|mut c| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        let mut replies = replies.into_iter();
        let mut next = || replies.next().unwrap_or_else(|| Ok(Value::Nil)).map_err(|e| self.classify(e));
        let kind: String = from(next()?)?;
        // A key of another type fails these two; `kind` names it below.
        let len: Option<u64> = next().ok().and_then(from_or_none);
        let head: Option<Vec<u8>> = next().ok().and_then(from_or_none);
        type Meta = (Option<String>, Option<String>, Option<String>, Option<String>);
        let (sha, version, scores, strategy): Meta = match next() {
            Ok(v) => from(v).unwrap_or_default(),
            // Not a hash (written by something else): treated as absent; the next write replaces it.
            Err(e) => {
                tracing::warn!(key = %meta, error = %e, "the recommendations' meta key is not a hash; it will be replaced");
                Default::default()
            }
        };
        let (secs, micros): (u64, u64) = from(next()?)?;
        // Read back as written by `write_recommendations`; anything else is no stored list.
        let list: Option<String> = if with_stored_list { next().ok().and_then(from_or_none) } else { None };
        let stored = (|| {
            Some(StoredRead {
                items: serde_json::from_str(&list?).ok()?,
                scores: serde_json::from_str(scores.as_deref()?).ok()?,
                strategy: strategy?,
            })
        })();
        let computed_from = sha.zip(version);
        let redis_ms = secs * 1000 + micros / 1000;
        let profile = match (kind.as_str(), len, head) {
            ("none", ..) => None,
            ("string", Some(len), Some(bytes)) => {
                if len > limits.max_bytes as u64 || bytes.len() > limits.max_bytes {
                    return Err(Error::ProfileTooLarge { key, bytes: len, max: limits.max_bytes });
                }
                Some(Profile { items: parse_profile(&key, &bytes, limits.max_items)?, sha: profile_sha(&bytes) })
            }
            (kind, ..) => {
                return Err(Error::InvalidProfile {
                    key,
                    reason: format!("the key holds a Redis {kind}, expected a string with a JSON array of item ids"),
                })
            }
        };
        Ok(ProfileRead { profile, computed_from, redis_ms, read_at, took: read_at.elapsed(), stored })
    }

    /// Writes `recommendations:<user_id>` (a JSON array of item ids, with the TTL) and what it was
    /// computed from, then announces the user id on the notify channel: one script, so all or
    /// nothing. It writes only if the profile still has the value the list was computed from (a
    /// newer computation is never overwritten by an older one) and only before its deadline in
    /// Redis's own clock, which falls `WRITE_MARGIN` before this call gives up: a write that
    /// answers "unavailable" has not happened and will not happen later.
    pub async fn write_recommendations(
        &self,
        user_id: &str,
        list: &StoredList<'_>,
        ttl_secs: u64,
        from: &ProfileRead,
        model_version: &str,
    ) -> Result<Written, Error> {
        let encode = |e: serde_json::Error| Error::Internal(format!("encoding the list: {e}"));
        let value = serde_json::to_string(list.ids).map_err(encode)?;
        let scores = serde_json::to_string(list.scores).map_err(encode)?;
        let margin = WRITE_MARGIN.min(self.op_timeout / 4);
        let deadline_ms =
            from.redis_ms + (from.read_at.elapsed() + self.op_timeout).saturating_sub(margin).as_millis() as u64;
        let (key, list_key, meta) = (profile_key(user_id), recommendations_key(user_id), meta_key(user_id));
        let (sha, now) = (from.sha().to_string(), now_ms().to_string());
        let outcome: i64 = self
            .run(|mut c| {
                let mut call = WRITE_SCRIPT.prepare_invoke();
                call.key(&key).key(&list_key).key(&meta);
                call.arg(&sha).arg(deadline_ms).arg(&value).arg(ttl_secs).arg(model_version).arg(&now);
                call.arg(&self.notify_channel).arg(user_id).arg(&scores).arg(list.strategy);
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        match outcome {
            1 => Ok(Written::Stored),
            0 => Ok(Written::Superseded),
            _ => Err(Error::RedisUnavailable(
                "Redis ran the write after its deadline; nothing was written (Redis is slow or blocked)".into(),
            )),
        }
    }

    /// Removes `recommendations:<user_id>` and its meta unless they were computed from the profile
    /// as it is now (a profile deleted, rewritten or broken since): what is left in Redis always
    /// matches what the API would answer.
    pub async fn drop_stale_recommendations(&self, user_id: &str) -> Result<bool, Error> {
        let (key, list, meta) = (profile_key(user_id), recommendations_key(user_id), meta_key(user_id));
        let dropped: i64 = self
            .run(|mut c| {
                let mut call = DROP_STALE_SCRIPT.prepare_invoke();
                call.key(&key).key(&list).key(&meta);
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        Ok(dropped == 1)
    }

    pub async fn get_u64(&self, key: &str) -> Result<Option<u64>, Error> {
        self.query(::redis::cmd("GET").arg(key)).await
    }

    pub async fn set_u64(&self, key: &str, value: u64) -> Result<(), Error> {
        self.query(::redis::cmd("SET").arg(key).arg(value)).await
    }

    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        self.query(::redis::cmd("DEL").arg(key)).await
    }
}

/// A computed list as written: `recommendations:<id>` holds the ids; the meta keeps the scores and
/// the strategy, so a cache-first read can answer in full.
pub struct StoredList<'a> {
    pub ids: &'a [&'a str],
    pub scores: &'a [f32],
    pub strategy: &'a str,
}

/// Bounds on reading one profile.
#[derive(Debug, Clone, Copy)]
pub struct ProfileLimits {
    pub max_bytes: usize,
    pub max_items: usize,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Stored,
    /// The profile changed after it was read: the list of its newer value is written by the
    /// computation that read it, not by this one.
    Superseded,
}

/// How long before the caller gives up a write must have run in Redis to count.
const WRITE_MARGIN: Duration = Duration::from_millis(100);

/// KEYS: profile, list, meta. ARGV: profile hash, deadline (ms, Redis clock), list JSON, TTL,
/// model version, computed-at ms, notify channel, user id, scores JSON, strategy. Returns 1
/// written, 0 profile changed, -1 past the deadline.
static WRITE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[2]) then return -1 end
local v = redis.call('GET', KEYS[1])
local sha = 'missing'
if v then sha = redis.sha1hex(v) end
if sha ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'profile_sha', ARGV[1], 'model_version', ARGV[5], 'computed_at_ms', ARGV[6],
  'scores', ARGV[9], 'strategy', ARGV[10])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return 1
",
    )
});

/// KEYS: profile, list, meta. Deletes list and meta unless meta's profile hash is the profile's
/// current one. Returns 1 when it deleted.
static DROP_STALE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local sha = 'missing'
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then sha = redis.sha1hex(redis.call('GET', KEYS[1])) elseif kind ~= 'none' then sha = kind end
local stored = false
if redis.call('TYPE', KEYS[3])['ok'] == 'hash' then stored = redis.call('HGET', KEYS[3], 'profile_sha') end
if stored == sha then return 0 end
if redis.call('DEL', KEYS[2], KEYS[3]) > 0 then return 1 end
return 0
",
    )
});

/// The hash recorded for a profile value: SHA-1 hex, which Redis computes too (`redis.sha1hex`),
/// so a script can check that a profile is unchanged. Change detection, not security.
pub fn profile_sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha1::digest(bytes))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

fn from<T: FromRedisValue>(v: Value) -> Result<T, Error> {
    ::redis::from_redis_value(v).map_err(|e| Error::Redis(format!("unexpected reply: {e}")))
}

fn from_or_none<T: FromRedisValue>(v: Value) -> Option<T> {
    ::redis::from_redis_value(v).ok()
}

/// A connection that was dead before the command reached Redis (a restart since the last
/// command): retried once on a fresh connection. Timeouts are not: the command may be running.
fn is_dead_connection(e: &RedisError) -> bool {
    (e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()) && !e.is_timeout()
}

/// The connection failed or timed out (as opposed to Redis answering with an error).
pub(super) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// Answers of a Redis that is up but not ready: loading its dataset (after a restart), a replica
/// without its master, a busy script. The same command succeeds later. `EXECABORT` is how a
/// MULTI of reads (the profile read) ends when Redis refused to queue them for one of these
/// reasons (its reads cannot be refused otherwise).
pub(super) fn is_transient(e: &RedisError) -> bool {
    const CODES: [&str; 5] = ["LOADING", "MASTERDOWN", "TRYAGAIN", "BUSY", "EXECABORT"];
    e.code().is_some_and(|c| CODES.contains(&c)) || CODES.iter().any(|c| e.to_string().contains(&format!("{c} ")))
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
