//! The request stream: a consumer group shared by the replicas, claims of stale entries, dead letters.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use ::redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamMaxlen, StreamReadOptions, StreamReadReply,
};
use ::redis::{AsyncCommands, RedisError, Script};

use super::error::Error;
use super::store::{is_connection_error, is_transient, Store};
use super::topology::{Conn, Kind};

impl Store {
    /// A consumer of the request stream in a consumer group, on its own connection (blocking reads
    /// must not hold up the shared one).
    pub async fn stream_consumer(&self, stream: &str, group: &str, consumer: &str) -> Result<StreamConsumer, Error> {
        let block = Duration::from_millis(1000);
        let mut conn = tokio::time::timeout(self.op_timeout, self.backend.dedicated(block + self.op_timeout))
            .await
            .map_err(|_| Error::Unavailable("connecting timed out".into()))?
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let created: Result<(), RedisError> = conn.xgroup_create_mkstream(stream, group, "0").await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(stream_err(e)),
        }
        Ok(StreamConsumer {
            conn,
            sharded: self.backend.kind() == Kind::Cluster,
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
    /// The fields whose value is UTF-8 text.
    pub fields: HashMap<String, String>,
    /// The fields whose value is not UTF-8 (kept apart, so that a `user_id` of bytes is told from
    /// a missing one, and kept as they are in a dead letter).
    pub binary: HashMap<String, Vec<u8>>,
}

impl StreamEntry {
    /// Milliseconds since the epoch when the entry was added (from its id).
    pub fn added_ms(&self) -> Option<u64> {
        self.id.split('-').next()?.parse().ok()
    }
}

pub struct StreamConsumer {
    conn: Conn,
    /// On a cluster the dead-letter stream and the request stream lie in different slots.
    sharded: bool,
    pub stream: String,
    group: String,
    consumer: String,
    block: Duration,
    claim_cursor: String,
}

fn stream_err(e: RedisError) -> Error {
    if is_connection_error(&e) || is_transient(&e) {
        Error::Unavailable(e.to_string())
    } else {
        Error::Refused(e.to_string())
    }
}

fn entries(ids: Vec<::redis::streams::StreamId>) -> Vec<StreamEntry> {
    ids.into_iter()
        .map(|sid| {
            let (mut fields, mut binary) = (HashMap::new(), HashMap::new());
            for (k, v) in sid.map {
                match ::redis::from_redis_value::<String>(v.clone()) {
                    Ok(text) => {
                        fields.insert(k, text);
                    }
                    Err(_) => {
                        if let Ok(bytes) = ::redis::from_redis_value::<Vec<u8>>(v) {
                            binary.insert(k, bytes);
                        }
                    }
                }
            }
            StreamEntry { id: sid.id, fields, binary }
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
        let reply: Vec<(String, String, u64, u64)> = ::redis::cmd("XPENDING")
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

    /// Moves an entry to the dead-letter stream (kept to its newest `dead_maxlen` entries) with the
    /// reason, then acknowledges it: in one MULTI on one node; on a cluster (two slots) the entry is
    /// added, then acknowledged, so a crash between them leaves it pending and dead-lettered twice,
    /// never lost.
    pub async fn dead_letter(
        &mut self,
        dead_stream: &str,
        dead_maxlen: usize,
        entry: &StreamEntry,
        reason: &str,
    ) -> Result<(), Error> {
        let mut fields: Vec<(String, Vec<u8>)> =
            entry.fields.iter().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect();
        fields.extend(entry.binary.iter().map(|(k, v)| (k.clone(), v.clone())));
        fields.push(("reason".into(), reason.into()));
        fields.push(("source_stream".into(), self.stream.clone().into_bytes()));
        fields.push(("source_id".into(), entry.id.clone().into_bytes()));
        if self.sharded {
            self.conn
                .xadd_maxlen::<_, _, _, _, ()>(dead_stream, StreamMaxlen::Equals(dead_maxlen), "*", &fields)
                .await
                .map_err(stream_err)?;
            return self.ack(&entry.id).await;
        }
        ::redis::pipe()
            .atomic()
            .xadd_maxlen(dead_stream, StreamMaxlen::Equals(dead_maxlen), "*", &fields)
            .ignore()
            .xack(&self.stream, &self.group, &[&entry.id])
            .ignore()
            .query_async::<()>(&mut self.conn)
            .await
            .map_err(stream_err)
    }

    /// Trims the entries that every consumer group of the stream is done with (acknowledged, or
    /// older than what a group has been delivered), so the stream does not grow forever. Entries
    /// not yet delivered to a group, or pending in one, stay. Returns how many were removed
    /// (approximate trimming: whole internal nodes at a time).
    pub async fn trim_acknowledged(&mut self) -> Result<u64, Error> {
        TRIM_SCRIPT.key(&self.stream).invoke_async(&mut self.conn).await.map_err(stream_err)
    }

    /// Entries delivered to the group and not acknowledged yet.
    pub async fn pending(&mut self) -> Result<u64, Error> {
        let reply: ::redis::streams::StreamPendingReply =
            self.conn.xpending(&self.stream, &self.group).await.map_err(stream_err)?;
        Ok(reply.count() as u64)
    }
}

/// KEYS: the stream. The oldest id any group still needs: its oldest pending entry, or, with none
/// pending, its last delivered one; XTRIM MINID ~ below that.
static TRIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/trim_acknowledged.lua")));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_entry_time_comes_from_its_id() {
        let e = StreamEntry { id: "1700000000123-4".into(), fields: HashMap::new(), binary: HashMap::new() };
        assert_eq!(e.added_ms(), Some(1_700_000_000_123));
    }
}
