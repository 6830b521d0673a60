//! Ingested behaviour events: the append of a batch's items to `user_profile:<user_id>`, in one
//! Lua script per user (that user's events in order), so the read-modify-write is atomic against
//! the frontend's own writes of the key and against other ingest instances. The script's two bookkeeping
//! keys are named to lie in the profile key's slot (`keys::companion`), so on a cluster the three
//! lie in one slot whatever the user id.
//!
//! Idempotence, in the same script as the profile write (so it can never disagree with it):
//! - per user, a watermark `<topic>:<partition>` -> the highest offset applied to this user
//!   (`ingest_offsets:{user_profile:<id>}`). Each partition is applied in offset order from its
//!   committed offset, every offset below the committed one has been applied, and a user's events
//!   of a batch are applied together or not at all, so an offset at or below the user's watermark
//!   has been applied already: a redelivery (after a crash, a rebalance or a retried batch)
//!   changes nothing;
//! - the user's most recent events (`ingested_events:{user_profile:<id>}`, `INGEST_DEDUPE_IDS`
//!   of them, `INGEST_DEDUPE_TTL_SECS`), each its event id and item id: the same event produced
//!   twice (a producer retry, at two offsets) is applied once; an event id that comes again with
//!   another item is not the same event and not silently dropped either: it is refused (and
//!   dead-lettered) with the reason.
//!
//! A stored profile over MAX_PROFILE_BYTES is refused before it is read (STRLEN), as the API
//! refuses it: parsing megabytes in a script would block Redis for every other client.
//!
//! Both keys expire `INGEST_DEDUPE_TTL_SECS` after the user's last event.

use std::sync::LazyLock;

use ::redis::Script;
use futures_util::StreamExt;

use super::error::Error;
use super::keys::{ingest_offsets_key, ingested_events_key, profile_key};
use super::store::Store;

/// One event to append: who, what, and where it sits in Kafka.
#[derive(Debug, Clone)]
pub struct Append<'a> {
    pub user_id: &'a str,
    pub item_id: &'a str,
    pub event_id: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Bounds and memory of the append.
#[derive(Debug, Clone, Copy)]
pub struct AppendLimits {
    /// MAX_PROFILE_ITEMS: the oldest items are dropped beyond it.
    pub max_items: usize,
    /// MAX_PROFILE_BYTES: the oldest items are dropped until the JSON value fits.
    pub max_bytes: usize,
    /// Event ids remembered per user.
    pub dedupe_ids: usize,
    pub dedupe_ttl_secs: u64,
}

/// What the script did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The item is now the profile's last; the profile holds this many items.
    Appended { items: usize },
    /// The offset was applied before (a redelivery).
    DuplicateOffset,
    /// The event id was applied before (the event was produced twice).
    DuplicateEvent,
    /// The stored profile is over MAX_PROFILE_BYTES, not a JSON array of strings (or not a string
    /// key): the frontend's value is left alone and the event is refused with the reason.
    BadProfile(String),
    /// The event is refused with the reason: its event id was applied before with another item.
    Refused(String),
}

/// One user's event indices in the batch, and what the script did with each.
type UserApplied = (Vec<usize>, Vec<Applied>);

/// Users whose scripts are in flight at once (pipelined on the connection; each script is bounded
/// by its user's events and MAX_PROFILE_BYTES of work).
const IN_FLIGHT: usize = 64;

impl Store {
    /// Applies the events, one script per user holding that user's events in batch order, and
    /// returns what each event did, in the order given. A failure (Redis down, a timeout, a
    /// failover) leaves some users' events applied and others not: applying the same events again
    /// is safe (see the module's idempotence), and a user's events are applied all together or not
    /// at all, so a later event of the user can never be applied before an earlier one.
    pub async fn append_events(
        &self,
        topic: &str,
        events: &[Append<'_>],
        limits: AppendLimits,
    ) -> Result<Vec<Applied>, Error> {
        let mut by_user: Vec<(&str, Vec<usize>)> = Vec::new();
        let mut slot: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (i, e) in events.iter().enumerate() {
            let at = *slot.entry(e.user_id).or_insert_with(|| {
                by_user.push((e.user_id, Vec::new()));
                by_user.len() - 1
            });
            by_user[at].1.push(i);
        }
        let results: Vec<Result<UserApplied, Error>> = futures_util::stream::iter(by_user)
            .map(|(user, indices)| async move {
                let user_events: Vec<&Append<'_>> = indices.iter().map(|&i| &events[i]).collect();
                let applied = self.append_user(topic, user, &user_events, limits).await?;
                Ok((indices, applied))
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let mut out = vec![None; events.len()];
        for result in results {
            let (indices, applied) = result?;
            if applied.len() != indices.len() {
                return Err(Error::Refused(format!(
                    "expected {} results of the append script, got {}",
                    indices.len(),
                    applied.len()
                )));
            }
            for (i, a) in indices.into_iter().zip(applied) {
                out[i] = Some(a);
            }
        }
        Ok(out.into_iter().map(|a| a.expect("every event belongs to one user")).collect())
    }

    /// One user's events in one script (all three keys in the profile's slot).
    async fn append_user(
        &self,
        topic: &str,
        user_id: &str,
        events: &[&Append<'_>],
        limits: AppendLimits,
    ) -> Result<Vec<Applied>, Error> {
        let mut call = APPEND_SCRIPT.prepare_invoke();
        call.key(profile_key(user_id)).key(ingested_events_key(user_id)).key(ingest_offsets_key(user_id));
        call.arg(topic).arg(limits.max_items).arg(limits.max_bytes).arg(limits.dedupe_ids).arg(limits.dedupe_ttl_secs);
        for e in events {
            call.arg(e.item_id).arg(e.event_id).arg(e.partition).arg(e.offset);
        }
        let replies: Vec<(i64, String)> = self
            .run(|mut c| {
                let call = &call;
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        Ok(replies
            .into_iter()
            .map(|(status, detail)| match status {
                1 => Applied::Appended { items: detail.parse().unwrap_or_default() },
                0 if detail == "offset" => Applied::DuplicateOffset,
                0 => Applied::DuplicateEvent,
                -2 => Applied::Refused(detail),
                _ => Applied::BadProfile(detail),
            })
            .collect())
    }
}

/// KEYS: the profile, the user's recent event ids, the user's offset watermarks.
/// ARGV: topic, max items, max bytes, ids remembered, their TTL; then per event, in order: item id,
/// event id, partition, offset.
/// Returns per event {1, items in the profile afterwards} appended, {0, "offset" | "event_id"} a
/// duplicate, {-1, reason} refused: the stored profile is over MAX_PROFILE_BYTES (measured with
/// STRLEN, never read) or not a JSON array of strings (left as it is; nothing of the call is
/// written) or a bookkeeping key was overwritten with another type; {-2, reason} the event itself
/// refused: its id was applied before with another item.
/// The remembered events are entries `<event id> <item id>` (neither holds whitespace); an entry of
/// the first version holds the id only and still marks that id as applied.
static APPEND_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/append_events.lua")));
