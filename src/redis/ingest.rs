//! Ingested behaviour events: the append of one event's item to `user_profile:<user_id>`, in one
//! Lua script per event, so the read-modify-write is atomic against the frontend's own writes of
//! the key and against other ingest instances.
//!
//! Idempotence, in the same script as the profile write (so it can never disagree with it):
//! - a per-topic watermark, partition -> the highest offset applied (`ingest_offsets:<topic>`).
//!   Each partition is applied in offset order from its committed offset, and every offset below
//!   the committed one has been applied, so an offset at or below the watermark has been applied
//!   already: a redelivery (after a crash, a rebalance or an uncommitted batch) changes nothing;
//! - the user's most recent event ids (`ingested_events:<user_id>`, `INGEST_DEDUPE_IDS` of them,
//!   `INGEST_DEDUPE_TTL_SECS`): the same event produced twice (a producer retry, at two offsets)
//!   is applied once.

use std::sync::LazyLock;

use ::redis::{RedisResult, Script, Value};

use super::keys::{ingest_offsets_key, ingested_events_key, profile_key};
use super::store::Store;
use crate::error::Error;

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
    /// The stored profile is not a JSON array of strings (or not a string key): the frontend's
    /// value is left alone and the event is refused with the reason.
    BadProfile(String),
}

/// Events per round trip: a pipeline of scripts, each bounded by MAX_PROFILE_BYTES of work.
const CHUNK: usize = 100;

impl Store {
    /// Applies the events in order (one script each, pipelined `CHUNK` at a time) and returns
    /// what each did. A failure (Redis down, timeout) leaves some applied and some not; applying
    /// the same events again is safe (see the module's idempotence).
    pub async fn append_events(
        &self,
        topic: &str,
        events: &[Append<'_>],
        limits: AppendLimits,
    ) -> Result<Vec<Applied>, Error> {
        let offsets = ingest_offsets_key(topic);
        let mut out = Vec::with_capacity(events.len());
        for chunk in events.chunks(CHUNK) {
            let invocations: Vec<_> = chunk
                .iter()
                .map(|e| {
                    let mut call = APPEND_SCRIPT.prepare_invoke();
                    call.key(profile_key(e.user_id)).key(ingested_events_key(e.user_id)).key(&offsets);
                    call.arg(e.item_id)
                        .arg(e.event_id)
                        .arg(e.partition)
                        .arg(e.offset)
                        .arg(limits.max_items)
                        .arg(limits.max_bytes)
                        .arg(limits.dedupe_ids)
                        .arg(limits.dedupe_ttl_secs);
                    call
                })
                .collect();
            let mut pipe = ::redis::pipe();
            pipe.ignore_errors();
            pipe.load_script(&APPEND_SCRIPT).ignore();
            for call in &invocations {
                pipe.invoke_script(call);
            }
            let replies: Vec<RedisResult<Value>> = self
                .run(|mut c| {
                    let pipe = &pipe;
                    async move { pipe.query_async(&mut c).await }
                })
                .await?;
            if replies.len() != chunk.len() {
                return Err(Error::Redis(format!("expected {} script replies, got {}", chunk.len(), replies.len())));
            }
            for reply in replies {
                let (status, detail): (i64, String) = match reply {
                    Ok(v) => ::redis::from_redis_value(v)
                        .map_err(|e| Error::Redis(format!("unexpected reply of the append script: {e}")))?,
                    Err(e) => return Err(self.classify(e)),
                };
                out.push(match status {
                    1 => Applied::Appended { items: detail.parse().unwrap_or_default() },
                    0 if detail == "offset" => Applied::DuplicateOffset,
                    0 => Applied::DuplicateEvent,
                    _ => Applied::BadProfile(detail),
                });
            }
        }
        Ok(out)
    }
}

/// KEYS: profile, the user's recent event ids, the topic's offset watermarks.
/// ARGV: item id, event id, partition, offset, max items, max bytes, ids remembered, their TTL.
/// Returns {1, items in the profile} appended, {0, "offset" | "event_id"} a duplicate, {-1, reason}
/// a stored profile that is not a JSON array of strings (left as it is).
static APPEND_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local applied = redis.call('HGET', KEYS[3], ARGV[3])
if applied and tonumber(applied) >= tonumber(ARGV[4]) then return {0, 'offset'} end
if redis.call('LPOS', KEYS[2], ARGV[2]) then
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
  return {0, 'event_id'}
end
local items = {}
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then
  local raw = redis.call('GET', KEYS[1])
  if not string.find(raw, '^%s*%[') then
    return {-1, 'the stored profile is not a JSON array of item ids'}
  end
  local ok, decoded = pcall(cjson.decode, raw)
  if not ok or type(decoded) ~= 'table' then
    return {-1, 'the stored profile is not JSON'}
  end
  local n = 0
  for _ in pairs(decoded) do n = n + 1 end
  for i = 1, n do
    if type(decoded[i]) ~= 'string' then
      return {-1, 'element ' .. (i - 1) .. ' of the stored profile is not a string item id'}
    end
  end
  items = decoded
elseif kind ~= 'none' then
  return {-1, 'the profile key holds a Redis ' .. kind .. ', expected a string'}
end
local kept = {}
for i = 1, #items do
  if items[i] ~= ARGV[1] then kept[#kept + 1] = cjson.encode(items[i]) end
end
kept[#kept + 1] = cjson.encode(ARGV[1])
local first = math.max(1, #kept - tonumber(ARGV[5]) + 1)
local bytes = 1
for i = first, #kept do bytes = bytes + #kept[i] + 1 end
while bytes > tonumber(ARGV[6]) and first < #kept do
  bytes = bytes - #kept[first] - 1
  first = first + 1
end
redis.call('SET', KEYS[1], '[' .. table.concat(kept, ',', first, #kept) .. ']', 'KEEPTTL')
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[7]) - 1)
redis.call('EXPIRE', KEYS[2], ARGV[8])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
return {1, tostring(#kept - first + 1)}
",
    )
});
