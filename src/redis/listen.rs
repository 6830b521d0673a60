//! Listener primitives: keyspace notifications of profile changes, and SCAN of profile keys.

use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use super::keys::PROFILE_PREFIX;
use super::store::Store;
use crate::error::Error;

/// The keyspace-event classes the listener needs: `K` keyspace channel, `$` string writes (SET),
/// `g` generic commands (DEL, RENAME), `x` expiry.
const NEEDED_EVENTS: [char; 4] = ['K', '$', 'g', 'x'];

/// One SCAN page of profile keys.
#[derive(Debug, Default)]
pub struct ScanPage {
    /// The cursor of the next page; 0 when the scan is complete.
    pub next: u64,
    pub users: Vec<String>,
    /// Keys under the profile prefix whose name is not UTF-8 (no valid user id): skipped.
    pub skipped: u64,
}

impl Store {
    /// Makes sure Redis publishes the keyspace events of profile writes, deletions and expiries
    /// (`K$gx`); enables them with CONFIG SET when they are off and that is allowed. Called at
    /// start and on every re-subscription (a restarted Redis forgets a CONFIG SET).
    pub async fn ensure_keyspace_notifications(&self, may_configure: bool) -> Result<(), String> {
        let current: Vec<String> = self
            .query(::redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events"))
            .await
            .map_err(|e| format!("cannot read notify-keyspace-events ({e})"))?;
        let flags = current.get(1).cloned().unwrap_or_default();
        // `A` stands for every class but key misses and new keys.
        let has = |f: char| flags.contains(f) || (f != 'K' && flags.contains('A'));
        let missing: Vec<char> = NEEDED_EVENTS.into_iter().filter(|&f| !has(f)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let wanted: String = flags.chars().chain(missing).collect();
        let advice = format!(
            "Redis does not publish keyspace events for profile changes (notify-keyspace-events is {flags:?}); \
             add the line `notify-keyspace-events {wanted}` to redis.conf (or run CONFIG SET notify-keyspace-events {wanted})"
        );
        if !may_configure {
            return Err(advice);
        }
        self.query::<()>(::redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg(&wanted))
            .await
            .map_err(|e| format!("{advice}; CONFIG SET was refused: {e}"))?;
        tracing::info!(flags = %wanted, "enabled keyspace notifications");
        Ok(())
    }

    /// User ids whose profile was written, deleted or expired, from keyspace notifications, until
    /// the connection drops (the stream then ends; the caller re-subscribes and catches up).
    pub async fn profile_changes(&self) -> Result<BoxStream<'static, String>, Error> {
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
                // A channel name that is not UTF-8 comes back as "?" and is dropped here.
                let user = msg.get_channel_name().strip_prefix(&prefix).map(str::to_string);
                async move { user }
            })
            .boxed())
    }

    /// One SCAN page of profile keys. Cursor 0 starts a scan.
    pub async fn scan_profiles(&self, cursor: u64, count: usize) -> Result<ScanPage, Error> {
        let (next, keys): (u64, Vec<Vec<u8>>) = self
            .query(
                ::redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(format!("{PROFILE_PREFIX}*")).arg("COUNT").arg(count),
            )
            .await?;
        let mut page = ScanPage { next, ..Default::default() };
        for key in keys {
            match String::from_utf8(key) {
                Ok(key) => page.users.extend(key.strip_prefix(PROFILE_PREFIX).map(str::to_string)),
                Err(e) => {
                    page.skipped += 1;
                    tracing::warn!(key = %String::from_utf8_lossy(e.as_bytes()), "skipping a profile key whose name is not UTF-8");
                }
            }
        }
        Ok(page)
    }
}
