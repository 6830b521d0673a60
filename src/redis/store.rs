//! The request-path store: bounded timeouts and reconnection over the topology's connection, the
//! profile read and the recommendation write, per topology: on one node (or the master Sentinel
//! names) the read is one MULTI and the write one script; on a cluster the three keys of a user
//! lie in different slots, so each step runs in its own slot, ordered so that no reader takes a
//! list for computed from a profile it was not computed from (see `write_recommendations`).

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use ::redis::{Cmd, ErrorKind, FromRedisValue, RedisError, RedisResult, Script, Value};
use sha1::{Digest, Sha1};

use super::error::{Error, ProfileError, SettingsError};
use super::keys::{claim_key, meta_key, profile_key, recommendations_key, HEALTH_KEY};
use super::profile::{parse_profile, ComputedFrom, Profile, ProfileRead, StoredRead};
use super::settings::RedisArgs;
use super::topology::{Backend, Conn, Kind, TopologyReport};
use crate::clock::now_ms;

pub struct Store {
    pub(super) backend: Arc<Backend>,
    /// Hard bound on one operation, connecting included.
    pub(super) op_timeout: Duration,
    /// The Redis client's bound on one command's answer (REDIS_RESPONSE_TIMEOUT_MS): the earliest
    /// an operation can give up once its command is sent.
    response_timeout: Duration,
    pub(super) notify_channel: String,
}

impl Store {
    /// Builds the clients; nothing connects until the first command, so the service starts (and
    /// reports unhealthy) while Redis is down.
    pub fn new(cfg: &RedisArgs) -> Result<Self, SettingsError> {
        Ok(Self {
            backend: Arc::new(Backend::new(cfg)?),
            op_timeout: cfg.connect_timeout() + cfg.response_timeout(),
            response_timeout: cfg.response_timeout(),
            notify_channel: cfg.notify_channel.clone(),
        })
    }

    /// Runs one operation under the hard timeout. A connection found dead (Redis restarted since
    /// the last command: broken pipe, reset) is replaced and the operation tried once more on a
    /// fresh one, so no user request pays for discovering it; after a timeout the connection is
    /// dropped too, so the next command dials afresh instead of waiting on a dead connection.
    /// Every operation given here is idempotent (reads, or writes guarded by a deadline and the
    /// profile's hash), so a second attempt is safe.
    pub(super) async fn run<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let attempts = async {
            match op(self.backend.conn().await?).await {
                Err(e) if is_dead_connection(&e) => {
                    self.backend.reset();
                    op(self.backend.conn().await?).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.op_timeout, attempts).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.classify(e)),
            Err(_) => {
                self.backend.reset();
                Err(Error::Unavailable(format!("no answer within {} ms", self.op_timeout.as_millis())))
            }
        }
    }

    /// The error a request sees for a Redis error (dropping the connection after a connection
    /// failure, or when the node turned replica: the next command finds the master again).
    pub(super) fn classify(&self, e: RedisError) -> Error {
        if is_connection_error(&e) {
            self.backend.reset();
            Error::Unavailable(e.to_string())
        } else if is_transient(&e) {
            // Redis is up but cannot serve yet (loading its data after a restart, a cluster
            // without a master for a slot, ...): try again soon.
            Error::Unavailable(e.to_string())
        } else if e.code() == Some("READONLY") {
            self.backend.reset();
            Error::Unavailable(format!("{e} (the node is a replica now; the next command looks for the master)"))
        } else if matches!(e.code(), Some("MOVED" | "ASK")) && self.backend.kind() != Kind::Cluster {
            Error::Refused(format!("{e} (the node is part of a Redis Cluster: set REDIS_CLUSTER_NODES)"))
        } else {
            // Redis answered with an error (WRONGTYPE, NOAUTH, OOM, ...).
            Error::Refused(e.to_string())
        }
    }

    /// The deployment's kind.
    pub fn topology(&self) -> Kind {
        self.backend.kind()
    }

    /// The topology and each node's state (`/health`).
    pub async fn topology_report(&self) -> TopologyReport {
        match tokio::time::timeout(self.op_timeout, self.backend.report()).await {
            Ok(report) => report,
            Err(_) => TopologyReport {
                kind: self.backend.kind(),
                nodes: vec![],
                error: Some(format!("no answer within {} ms", self.op_timeout.as_millis())),
            },
        }
    }

    pub(super) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, Error> {
        self.run(|mut c| async move { cmd.query_async::<T>(&mut c).await }).await
    }

    /// Readiness of the request path: Redis can serve every key (a cluster with every slot
    /// covered; not a cluster node addressed as a single one), answers *and accepts writes* (a
    /// short-lived key), so a Redis out of memory or a read-only replica is not "healthy".
    pub async fn check_writable(&self) -> Result<(), Error> {
        match tokio::time::timeout(self.op_timeout, self.backend.serving()).await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(Error::Unavailable(reason)),
            Err(_) => return Err(Error::Unavailable(format!("no answer within {} ms", self.op_timeout.as_millis()))),
        }
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(HEALTH_KEY).arg(now_ms()).arg("PX").arg(10_000);
        self.query::<()>(&cmd).await
    }

    /// Reads `user_profile:<user_id>` (at most `max_bytes` of it: a larger value is refused
    /// without being transferred), what the stored recommendations were computed from, Redis's
    /// clock and, with `with_stored_list`, the stored list with its scores. On one node that is one
    /// MULTI. On a cluster the profile (with the clock of its node) is one MULTI in its slot, and
    /// the meta and the list are read beside it. On both the meta counts only when it names the
    /// hash of the list read (`list_sha`): a list deleted or evicted beside its meta, written by
    /// someone else, or of another write than the meta never passes for computed, so it is
    /// recomputed rather than skipped or served. The profile is parsed here, with its item cap.
    pub async fn read_profile(
        &self,
        user_id: &str,
        limits: ProfileLimits,
        with_stored_list: bool,
    ) -> Result<ProfileRead, Error> {
        let (key, meta) = (profile_key(user_id), meta_key(user_id));
        let sharded = self.backend.kind() == Kind::Cluster;
        let mut profile = ::redis::pipe();
        profile.atomic().ignore_errors().cmd("TYPE").arg(&key).cmd("STRLEN").arg(&key);
        profile.cmd("GETRANGE").arg(&key).arg(0).arg(limits.max_bytes);
        let mut hmget = ::redis::cmd("HMGET");
        hmget.arg(&meta).arg("profile_sha").arg("model_version").arg("scores").arg("strategy").arg("list_sha");
        hmget.arg("model_sha").arg("variant");
        let mut get_list = ::redis::cmd("GET");
        get_list.arg(recommendations_key(user_id));
        let read_at = Instant::now();
        let replies: Vec<RedisResult<Value>> = if sharded {
            // One script rather than a MULTI: a single command, which the cluster client follows
            // through MOVED and ASK while its slot migrates.
            self.run(|c| {
                let (hmget, get_list, key) = (&hmget, &get_list, &key);
                let (mut c1, mut c2, mut c3) = (c.clone(), c.clone(), c);
                let mut read = PROFILE_READ_SCRIPT.prepare_invoke();
                read.key(key).arg(limits.max_bytes);
                async move {
                    let (p, m, l) = futures_util::join!(
                        read.invoke_async::<Vec<Value>>(&mut c1),
                        hmget.query_async::<Value>(&mut c2),
                        get_list.query_async::<Value>(&mut c3)
                    );
                    let mut p = p?.into_iter();
                    let mut next = || Ok(p.next().unwrap_or(Value::Nil));
                    let (kind, len, head, time) = (next(), next(), next(), next());
                    Ok(vec![kind, len, head, m, time, l])
                }
            })
            .await?
        } else {
            profile.add_command(hmget).cmd("TIME").add_command(get_list);
            self.run(|mut c| {
                let profile = &profile;
                async move { profile.query_async(&mut c).await }
            })
            .await?
        };
        let mut replies = replies.into_iter();
        let mut next = || replies.next().unwrap_or_else(|| Ok(Value::Nil)).map_err(|e| self.classify(e));
        let kind: String = from(next()?)?;
        // A key of another type fails these two; `kind` names it below.
        let len: Option<u64> = next().ok().and_then(from_or_none);
        let head: Option<Vec<u8>> = next().ok().and_then(from_or_none);
        type Meta = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let (sha, version, scores, strategy, list_sha, model_sha, variant): Meta = match next() {
            Ok(v) => from(v).unwrap_or_default(),
            // Not a hash (written by something else): treated as absent; the next write replaces it.
            Err(e) => {
                tracing::warn!(key = %meta, error = %e, "the recommendations' meta key is not a hash; it will be replaced");
                Default::default()
            }
        };
        let (secs, micros): (u64, u64) = from(next()?)?;
        // Read back as written by `write_recommendations`; anything else is no stored list.
        let list: Option<String> = next().ok().and_then(from_or_none);
        let list_matches = list.as_deref().map(|l| profile_sha(l.as_bytes())) == list_sha;
        let computed_from = sha
            .zip(version)
            .filter(|_| list_matches)
            .map(|(profile_sha, model_version)| ComputedFrom { profile_sha, model_version, model_sha, variant });
        let stored = (|| {
            if !list_matches {
                return None;
            }
            Some(StoredRead {
                items: serde_json::from_str(&list?).ok()?,
                scores: serde_json::from_str(scores.as_deref()?).ok()?,
                strategy: strategy?,
            })
        })()
        .filter(|_| with_stored_list);
        let redis_ms = secs * 1000 + micros / 1000;
        let profile = match (kind.as_str(), len, head) {
            ("none", ..) => None,
            ("string", Some(len), Some(bytes)) => {
                if len > limits.max_bytes as u64 || bytes.len() > limits.max_bytes {
                    return Err(ProfileError::TooLarge { key, bytes: len, max: limits.max_bytes }.into());
                }
                Some(Profile { items: parse_profile(&key, &bytes, limits.max_items)?, sha: profile_sha(&bytes) })
            }
            (kind, ..) => {
                return Err(ProfileError::Invalid {
                    key,
                    reason: format!("the key holds a Redis {kind}, expected a string with a JSON array of item ids"),
                }
                .into())
            }
        };
        Ok(ProfileRead { profile, computed_from, redis_ms, read_at, took: read_at.elapsed(), stored })
    }

    /// Writes `recommendations:<user_id>` (a JSON array of item ids, with the TTL) and what it was
    /// computed from (with the list's own hash, `list_sha`), then announces the user id on the
    /// notify channel. It writes only if the profile still has the value the list was computed
    /// from, and only before its deadline in Redis's own clock, which falls `WRITE_MARGIN` before
    /// this call gives up: a write that answers "unavailable" has not happened and will not happen
    /// later.
    ///
    /// On one node this is one script: all or nothing, and a newer computation is never
    /// overwritten by an older one. On a cluster it is four steps in three slots: the profile is
    /// checked (and the deadline) in its slot, the list is written, then its meta, then the
    /// profile is checked again. A crash between list and meta leaves a list whose meta does not
    /// name it: read as "not computed", so it costs a recomputation, never a stale skip. A profile
    /// changed between the first check and the last is `Overtaken`: the list names the profile it
    /// came from, and the caller recomputes.
    pub async fn write_recommendations(
        &self,
        user_id: &str,
        list: &StoredList<'_>,
        ttl_secs: u64,
        from: &ProfileRead,
        model: &ModelId<'_>,
    ) -> Result<Written, Error> {
        let encode = |e: serde_json::Error| Error::Internal(format!("encoding the list: {e}"));
        let value = serde_json::to_string(list.ids).map_err(encode)?;
        let scores = serde_json::to_string(list.scores).map_err(encode)?;
        // The client may give up as soon as its response timeout after sending (op_timeout only
        // bounds connecting and answering together), so the deadline is counted from that. Redis's
        // clock read `redis_ms` before the read's answer came back, so the local time since that
        // answer (not since the read was sent: a read queued behind a blocked Redis would then
        // count its wait twice and let a write land after its client gave up) added to `redis_ms`
        // never passes Redis's own clock.
        let margin = WRITE_MARGIN.min(self.response_timeout / 4);
        let since_read = (from.read_at + from.took).elapsed();
        let deadline_ms =
            from.redis_ms + (since_read + self.response_timeout).saturating_sub(margin).as_millis() as u64;
        let (key, list_key, meta) = (profile_key(user_id), recommendations_key(user_id), meta_key(user_id));
        let (sha, now) = (from.sha().to_string(), now_ms().to_string());
        let late = |what: &str| {
            Error::Unavailable(format!("Redis ran the write after its deadline; {what} (Redis is slow or blocked)"))
        };
        if self.backend.kind() != Kind::Cluster {
            let outcome: i64 = self
                .run(|mut c| {
                    let mut call = WRITE_SCRIPT.prepare_invoke();
                    call.key(&key).key(&list_key).key(&meta);
                    call.arg(&sha).arg(deadline_ms).arg(&value).arg(ttl_secs).arg(model.version).arg(&now);
                    call.arg(&self.notify_channel).arg(user_id).arg(&scores).arg(list.strategy).arg(model.sha);
                    call.arg(model.variant);
                    async move { call.invoke_async(&mut c).await }
                })
                .await?;
            return match outcome {
                1 => Ok(Written::Stored),
                0 => Ok(Written::Superseded),
                _ => Err(late("nothing was written")),
            };
        }
        let deadline = deadline_ms.to_string();
        match self.script(&GUARD_SCRIPT, &key, &[sha.clone(), deadline.clone()]).await? {
            1 => {}
            0 => return Ok(Written::Superseded),
            _ => return Err(late("nothing was written")),
        }
        let args = [deadline.clone(), value.clone(), ttl_secs.to_string()];
        if self.script(&SET_LIST_SCRIPT, &list_key, &args).await? != 1 {
            return Err(late("nothing was written"));
        }
        let args = [
            deadline,
            sha.clone(),
            model.version.to_string(),
            now,
            scores,
            list.strategy.to_string(),
            profile_sha(value.as_bytes()),
            ttl_secs.to_string(),
            self.notify_channel.clone(),
            user_id.to_string(),
            model.sha.to_string(),
            model.variant.to_string(),
        ];
        if self.script(&SET_META_SCRIPT, &meta, &args).await? != 1 {
            return Err(late("the list was written without its meta, so it counts as not computed"));
        }
        if self.current_sha(user_id).await? != sha {
            return Ok(Written::Overtaken);
        }
        Ok(Written::Stored)
    }

    /// One single-key script of the cluster write.
    async fn script(&self, script: &Script, key: &str, args: &[String]) -> Result<i64, Error> {
        self.run(|mut c| {
            let mut call = script.prepare_invoke();
            call.key(key);
            for a in args {
                call.arg(a);
            }
            async move { call.invoke_async::<i64>(&mut c).await }
        })
        .await
    }

    /// The hash of the profile as it is now (`missing`, or the Redis type of a key that is not a
    /// string).
    async fn current_sha(&self, user_id: &str) -> Result<String, Error> {
        let key = profile_key(user_id);
        self.run(|mut c| {
            let mut call = PROFILE_SHA_SCRIPT.prepare_invoke();
            call.key(&key);
            async move { call.invoke_async(&mut c).await }
        })
        .await
    }

    /// Removes `recommendations:<user_id>` and its meta unless they were computed from the profile
    /// as it is now (a profile deleted, rewritten or broken since): what is left in Redis always
    /// matches what the API would answer. On a cluster: the profile's hash is read in its slot,
    /// the meta removed in its slot unless it names that hash, then the list it named (or any list
    /// without a meta) in the list's slot.
    pub async fn drop_stale_recommendations(&self, user_id: &str) -> Result<bool, Error> {
        let (key, list, meta) = (profile_key(user_id), recommendations_key(user_id), meta_key(user_id));
        if self.backend.kind() != Kind::Cluster {
            let dropped: i64 = self
                .run(|mut c| {
                    let mut call = DROP_STALE_SCRIPT.prepare_invoke();
                    call.key(&key).key(&list).key(&meta);
                    async move { call.invoke_async(&mut c).await }
                })
                .await?;
            return Ok(dropped == 1);
        }
        let current = self.current_sha(user_id).await?;
        let named: Option<String> = self
            .run(|mut c| {
                let mut call = DROP_META_SCRIPT.prepare_invoke();
                call.key(&meta).arg(&current);
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        let Some(named) = named else { return Ok(false) };
        let dropped: i64 = self
            .run(|mut c| {
                let mut call = DROP_LIST_SCRIPT.prepare_invoke();
                call.key(&list).arg(&named);
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        Ok(dropped == 1)
    }

    /// Claims `user_id` for `owner` for `ttl_ms` unless another holds it (a key in the profile's
    /// slot). False when another replica holds it.
    pub async fn claim_user(&self, user_id: &str, owner: &str, ttl_ms: u64) -> Result<bool, Error> {
        let set: Option<String> =
            self.query(::redis::cmd("SET").arg(claim_key(user_id)).arg(owner).arg("NX").arg("PX").arg(ttl_ms)).await?;
        Ok(set.is_some())
    }

    /// Releases `owner`'s claim on `user_id` (one that expired and was taken by another stays).
    pub async fn release_user(&self, user_id: &str, owner: &str) -> Result<(), Error> {
        let key = claim_key(user_id);
        self.run(|mut c| {
            let mut call = RELEASE_SCRIPT.prepare_invoke();
            call.key(&key).arg(owner);
            async move { call.invoke_async::<i64>(&mut c).await }
        })
        .await
        .map(drop)
    }

    pub async fn get_string(&self, key: &str) -> Result<Option<String>, Error> {
        self.query(::redis::cmd("GET").arg(key)).await
    }

    pub async fn set_string(&self, key: &str, value: &str) -> Result<(), Error> {
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

/// The model set a list is computed by: its version, its content hash and the variant it served
/// (all recorded in the meta; a list counts as current only for the same three).
#[derive(Debug, Clone, Copy)]
pub struct ModelId<'a> {
    pub version: &'a str,
    pub sha: &'a str,
    pub variant: &'a str,
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
    /// Written (a cluster), but the profile changed before the write was complete: the stored
    /// list names the profile it came from, and the caller recomputes for the new one.
    Overtaken,
}

/// How long before the caller can give up (the client's response timeout) a write must have run
/// in Redis to count.
const WRITE_MARGIN: Duration = Duration::from_millis(100);

// The scripts are in src/redis/lua/. The write scripts start with `profile_guard.lua` (KEYS[1]
// the profile, ARGV[1] its hash, ARGV[2] the deadline in ms of the Redis clock): it returns -1
// past the deadline, 0 when the profile's hash changed.

/// KEYS: profile, list, meta. ARGV: profile hash, deadline (ms, Redis clock), list JSON, TTL,
/// model version, computed-at ms, notify channel, user id, scores JSON, strategy, model content
/// hash, variant. Returns 1 written, 0 profile changed, -1 past the deadline.
static WRITE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(concat!(include_str!("lua/profile_guard.lua"), include_str!("lua/write_list.lua"))));

/// KEYS: profile, list, meta. Deletes list and meta unless meta's profile hash is the profile's
/// current one. Returns 1 when it deleted.
static DROP_STALE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/drop_stale.lua")));

/// Cluster write, step 1, in the profile's slot. KEYS: profile. ARGV: profile hash, deadline.
/// Returns 1 unchanged, 0 changed, -1 past the deadline.
static GUARD_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(include_str!("lua/profile_guard.lua"), include_str!("lua/cluster_guard.lua")))
});

/// Cluster write, step 2. KEYS: list. ARGV: deadline, list JSON, TTL. Returns 1 written, -1 past
/// the deadline.
static SET_LIST_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/cluster_set_list.lua")));

/// Cluster write, step 3. KEYS: meta. ARGV: deadline, profile hash, model version, computed-at ms,
/// scores JSON, strategy, list hash, TTL, notify channel, user id, model content hash, variant.
/// Returns 1
/// written, -1 past the deadline.
static SET_META_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/cluster_set_meta.lua")));

/// The cluster's profile read, in the profile's slot. KEYS: profile. ARGV: the byte cap. Returns
/// its type, its length and its first bytes (nil unless a string), and the node's TIME.
static PROFILE_READ_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/cluster_read_profile.lua")));

/// KEYS: profile. The hash of its value, `missing`, or the Redis type of a key of another type.
static PROFILE_SHA_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/profile_sha.lua")));

/// Cluster drop, meta step. KEYS: meta. ARGV: the profile's hash now. Keeps a meta that names it
/// (nil); otherwise deletes the meta and returns the list hash it named ('' for no meta).
static DROP_META_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/cluster_drop_meta.lua")));

/// Cluster drop, list step. KEYS: list. ARGV: the hash the removed meta named ('' for none).
/// Deletes the list when it is that one (or there was no meta). Returns 1 when it deleted.
static DROP_LIST_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/cluster_drop_list.lua")));

/// KEYS: claim. ARGV: owner. Deletes the claim if the owner still holds it.
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/release_claim.lua")));

/// The hash recorded for a profile value: SHA-1 hex, which Redis computes too (`redis.sha1hex`),
/// so a script can check that a profile is unchanged. Change detection, not security.
pub fn profile_sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha1::digest(bytes))
}

fn from<T: FromRedisValue>(v: Value) -> Result<T, Error> {
    ::redis::from_redis_value(v).map_err(|e| Error::Refused(format!("unexpected reply: {e}")))
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
/// without its master, a busy script, a cluster with a slot no master serves (`CLUSTERDOWN`). The
/// same command succeeds later. `EXECABORT` is how a
/// MULTI of reads (the profile read) ends when Redis refused to queue them for one of these
/// reasons (its reads cannot be refused otherwise).
pub(super) fn is_transient(e: &RedisError) -> bool {
    const CODES: [&str; 6] = ["LOADING", "MASTERDOWN", "TRYAGAIN", "BUSY", "EXECABORT", "CLUSTERDOWN"];
    // during a Sentinel failover the sentinels name no master (or only a demoted one) for a while
    let sentinel_between_masters =
        matches!(e.kind(), ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::NoValidReplicasFoundBySentinel);
    sentinel_between_masters
        || e.code().is_some_and(|c| CODES.contains(&c))
        || CODES.iter().any(|c| e.to_string().contains(&format!("{c} ")))
}
