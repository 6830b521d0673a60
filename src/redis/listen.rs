//! Listener primitives: keyspace notifications of profile changes, and SCAN of profile keys. Both
//! are per node in Redis: on a cluster the notifications come from every master (and end when the
//! set of masters changes, so the caller subscribes again and catches up), and a scan walks every
//! master in turn with a cursor per node.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use super::error::Error;
use super::keys::{profile_key, META_PREFIX, PROFILE_PREFIX, UNAVAILABLE_ITEMS_KEY};
use super::store::Store;
use super::topology::{Kind, Node};

/// The keyspace-event classes the listener needs: `K` keyspace channel, `$` string writes (SET),
/// `g` generic commands (DEL, RENAME), `x` expiry, and the writes of every other type (`h` hash,
/// `l` list, `s` set, `z` sorted set, `t` stream): a profile deleted and re-created as another
/// type (`HSET` after `DEL`) must be seen, or its old list outlives it while the API answers 422.
const NEEDED_EVENTS: [char; 9] = ['K', '$', 'g', 'x', 'h', 'l', 's', 'z', 't'];

/// How often a cluster's masters are listed while subscribed, to follow failovers.
const TOPOLOGY_POLL: Duration = Duration::from_secs(1);

/// What a scan walks: the keys of profiles, or the metas of stored lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanOf {
    Profiles,
    Lists,
}

impl ScanOf {
    fn prefix(self) -> &'static str {
        match self {
            Self::Profiles => PROFILE_PREFIX,
            Self::Lists => META_PREFIX,
        }
    }
}

/// A keyspace event the listener acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The profile of this user was written, deleted or expired.
    Profile(String),
    /// `items:unavailable` was written, deleted or expired.
    Unavailable,
}

/// One SCAN page of profile (or meta) keys, as user ids.
#[derive(Debug, Default)]
pub struct ScanPage {
    pub users: Vec<String>,
    /// Keys under the profile prefix whose name is not UTF-8 (no valid user id): skipped.
    pub skipped: u64,
}

/// Where a scan of every master stands: each node's SCAN cursor, or `None` once that node is done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanCursor {
    nodes: Vec<(Node, Option<u64>)>,
}

impl ScanCursor {
    pub fn is_done(&self) -> bool {
        self.nodes.iter().all(|(_, c)| c.is_none())
    }

    /// `host:port=cursor` or `host:port=done` per node, comma-separated (what backfill saves).
    pub fn encode(&self) -> String {
        let node = |(n, c): &(Node, Option<u64>)| format!("{n}={}", c.map_or("done".into(), |c| c.to_string()));
        self.nodes.iter().map(node).collect::<Vec<_>>().join(",")
    }

    fn decode(text: &str) -> HashMap<String, Option<u64>> {
        text.split(',')
            .filter_map(|part| {
                let (node, cursor) = part.rsplit_once('=')?;
                let cursor = if cursor == "done" { None } else { Some(cursor.parse().ok()?) };
                Some((node.to_string(), cursor))
            })
            .collect()
    }
}

impl Store {
    /// Makes sure Redis publishes the keyspace events of profile writes (of any type), deletions
    /// and expiries (`K$gxhlszt`) on every node that holds data or may after a failover (a cluster's masters and
    /// replicas); enables them with CONFIG SET when they are off and that is allowed. Called at
    /// start and on every re-subscription (a restarted Redis forgets a CONFIG SET).
    pub async fn ensure_keyspace_notifications(&self, may_configure: bool) -> Result<(), String> {
        let nodes = tokio::time::timeout(self.op_timeout, self.backend.data_nodes())
            .await
            .map_err(|_| "cannot list the Redis nodes (no answer)".to_string())?
            .map_err(|e| format!("cannot list the Redis nodes ({e})"))?;
        for node in nodes {
            self.ensure_notifications_on(&node, may_configure).await.map_err(|e| match self.backend.kind() {
                Kind::Cluster => format!("node {node}: {e}"),
                _ => e,
            })?;
        }
        Ok(())
    }

    async fn ensure_notifications_on(&self, node: &Node, may_configure: bool) -> Result<(), String> {
        let current: Vec<String> = self
            .on_node(node, ::redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events"))
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
        self.on_node::<()>(node, ::redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg(&wanted))
            .await
            .map_err(|e| format!("{advice}; CONFIG SET was refused: {e}"))?;
        tracing::info!(flags = %wanted, %node, "enabled keyspace notifications");
        Ok(())
    }

    /// One command on one node, under the operation bound (outside a cluster: on the shared
    /// connection, retried once when it was found dead).
    async fn on_node<T: ::redis::FromRedisValue>(&self, node: &Node, cmd: &::redis::Cmd) -> Result<T, Error> {
        if self.backend.kind() != Kind::Cluster {
            return self.query(cmd).await;
        }
        match tokio::time::timeout(self.op_timeout, self.backend.on_node(node, cmd)).await {
            Ok(result) => result.map_err(|e| self.classify(e)),
            Err(_) => Err(Error::Unavailable(format!("{node}: no answer within {} ms", self.op_timeout.as_millis()))),
        }
    }

    /// User ids whose profile was written, deleted or expired, and changes of `items:unavailable`,
    /// from keyspace notifications of every master, until a subscription drops or (on a cluster)
    /// the set of masters changes: the stream then ends, and the caller subscribes again and
    /// catches up.
    pub async fn profile_changes(&self) -> Result<BoxStream<'static, Change>, Error> {
        let unavailable = |e: ::redis::RedisError| Error::Unavailable(e.to_string());
        let masters = tokio::time::timeout(self.op_timeout, self.backend.masters())
            .await
            .map_err(|_| Error::Unavailable("listing the masters timed out".into()))?
            .map_err(unavailable)?;
        if masters.is_empty() {
            return Err(Error::Unavailable("no master serves any slot".into()));
        }
        let prefix = format!("__keyspace@{}__:{PROFILE_PREFIX}", self.backend.db);
        let pattern = format!("{prefix}*");
        let unavailable_channel = format!("__keyspace@{}__:{UNAVAILABLE_ITEMS_KEY}", self.backend.db);
        let mut streams = Vec::new();
        for node in &masters {
            let client = self.backend.node_client(node).map_err(unavailable)?;
            let mut pubsub = tokio::time::timeout(self.op_timeout, client.get_async_pubsub())
                .await
                .map_err(|_| Error::Unavailable(format!("subscribing to {node} timed out")))?
                .map_err(unavailable)?;
            pubsub.psubscribe(&pattern).await.map_err(unavailable)?;
            // one key: on a cluster only its master publishes it, every master is asked alike
            pubsub.subscribe(&unavailable_channel).await.map_err(unavailable)?;
            let (prefix, unavailable_channel) = (prefix.clone(), unavailable_channel.clone());
            // A channel name that is not UTF-8 comes back as "?" and is dropped here; `None`
            // marks the end of this node's subscription.
            let users = pubsub
                .into_on_message()
                .map(move |msg| {
                    let channel = msg.get_channel_name();
                    if channel == unavailable_channel {
                        return Some(Some(Change::Unavailable));
                    }
                    Some(channel.strip_prefix(&prefix).map(|user| Change::Profile(user.to_string())))
                })
                .chain(futures_util::stream::once(async { None }));
            streams.push(users.boxed());
        }
        if self.backend.kind() == Kind::Cluster {
            streams.push(self.topology_changed(masters).boxed());
        }
        Ok(futures_util::stream::select_all(streams)
            .take_while(|event| std::future::ready(event.is_some()))
            .filter_map(|event| std::future::ready(event.flatten()))
            .boxed())
    }

    /// Yields `None` once the cluster's masters are no longer `masters` (a failover, a node added
    /// or removed); nothing before.
    fn topology_changed(&self, masters: Vec<Node>) -> impl futures_util::Stream<Item = Option<Option<Change>>> {
        let backend = self.backend.clone();
        futures_util::stream::unfold((), move |()| {
            let (backend, masters) = (backend.clone(), masters.clone());
            async move {
                loop {
                    tokio::time::sleep(TOPOLOGY_POLL).await;
                    match tokio::time::timeout(TOPOLOGY_POLL, backend.masters()).await {
                        Ok(Ok(now)) if now != masters => {
                            tracing::info!(before = ?masters, now = ?now, "the cluster's masters changed");
                            return Some((None, ()));
                        }
                        _ => {}
                    }
                }
            }
        })
    }

    /// A scan of every master from the start, or resumed from a saved `ScanCursor::encode`: a node
    /// saved as done is skipped, a saved node resumes at its cursor, a node not saved (a new
    /// master after a failover) is scanned from the start.
    pub async fn scan_start(&self, saved: Option<&str>) -> Result<ScanCursor, Error> {
        let masters = tokio::time::timeout(self.op_timeout, self.backend.masters())
            .await
            .map_err(|_| Error::Unavailable("listing the masters timed out".into()))?
            .map_err(|e| self.classify(e))?;
        let saved = saved.map(ScanCursor::decode).unwrap_or_default();
        let nodes = masters
            .into_iter()
            .map(|node| {
                let cursor = saved.get(&node.to_string()).copied().unwrap_or(Some(0));
                (node, cursor)
            })
            .collect();
        Ok(ScanCursor { nodes })
    }

    /// The next SCAN page of profile keys: from the first node of `cursor` not done yet, whose
    /// cursor it advances.
    pub async fn scan_profiles(&self, cursor: &mut ScanCursor, count: usize) -> Result<ScanPage, Error> {
        self.scan_users(ScanOf::Profiles, cursor, count).await
    }

    /// The next SCAN page of the keys `of` names, as user ids (see `scan_profiles`).
    pub async fn scan_users(&self, of: ScanOf, cursor: &mut ScanCursor, count: usize) -> Result<ScanPage, Error> {
        let prefix = of.prefix();
        let Some((node, position)) = cursor.nodes.iter_mut().find(|(_, c)| c.is_some()) else {
            return Ok(ScanPage::default());
        };
        let at = position.unwrap_or(0);
        let (next, keys): (u64, Vec<Vec<u8>>) = self
            .on_node(node, ::redis::cmd("SCAN").arg(at).arg("MATCH").arg(format!("{prefix}*")).arg("COUNT").arg(count))
            .await?;
        *position = (next != 0).then_some(next);
        let mut page = ScanPage::default();
        for key in keys {
            match String::from_utf8(key) {
                Ok(key) => page.users.extend(key.strip_prefix(prefix).map(str::to_string)),
                Err(e) => {
                    page.skipped += 1;
                    tracing::warn!(key = ?String::from_utf8_lossy(e.as_bytes()), "skipping a key whose name is not UTF-8");
                }
            }
        }
        Ok(page)
    }
}

impl Store {
    /// The users of `users` whose profile key does not exist (one EXISTS each, a few in flight:
    /// on a cluster the keys lie in different slots).
    pub async fn without_profile(&self, users: Vec<String>) -> Result<Vec<String>, Error> {
        let checks = futures_util::stream::iter(users)
            .map(|user| async move {
                let exists: i64 = self.query(::redis::cmd("EXISTS").arg(profile_key(&user))).await?;
                Ok::<_, Error>((exists == 0).then_some(user))
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        checks.into_iter().filter_map(Result::transpose).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_cursor_round_trips_and_resumes_per_node() {
        let node = |port| Node { host: "127.0.0.1".into(), port };
        let cursor = ScanCursor { nodes: vec![(node(7000), Some(42)), (node(7001), None), (node(7002), Some(0))] };
        assert_eq!(cursor.encode(), "127.0.0.1:7000=42,127.0.0.1:7001=done,127.0.0.1:7002=0");
        let saved = ScanCursor::decode(&cursor.encode());
        assert_eq!(saved.get("127.0.0.1:7000"), Some(&Some(42)));
        assert_eq!(saved.get("127.0.0.1:7001"), Some(&None));
        assert!(ScanCursor::decode("12345").is_empty(), "a cursor of another format starts afresh");
        assert!(!cursor.is_done());
        assert!(ScanCursor { nodes: vec![(node(1), None)] }.is_done());
    }
}
