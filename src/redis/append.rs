//! Appending entries to a capped stream (the webhooks' dead letters, src/webhook.rs; the
//! impressions, src/impressions.rs).

use super::error::Error;
use super::Store;

impl Store {
    /// `XADD <stream> MAXLEN ~ <maxlen> * field value ...`: the stream keeps about its newest
    /// `maxlen` entries (approximate trimming: whole internal nodes at a time).
    pub async fn append_to_stream(&self, stream: &str, maxlen: usize, fields: &[(&str, String)]) -> Result<(), Error> {
        let mut cmd = ::redis::cmd("XADD");
        cmd.arg(stream).arg("MAXLEN").arg("~").arg(maxlen).arg("*");
        for (name, value) in fields {
            cmd.arg(*name).arg(value);
        }
        self.query::<String>(&cmd).await.map(drop)
    }

    /// `XADD`s of `entries` (each a list of fields) to one capped stream, in one pipeline: one
    /// round trip for a batch (one key, so one slot on a cluster).
    pub async fn append_entries(
        &self,
        stream: &str,
        maxlen: usize,
        entries: &[Vec<(&str, String)>],
    ) -> Result<(), Error> {
        let mut pipe = ::redis::pipe();
        for fields in entries {
            let cmd = pipe.cmd("XADD").arg(stream).arg("MAXLEN").arg("~").arg(maxlen).arg("*");
            for (name, value) in fields {
                cmd.arg(*name).arg(value);
            }
            cmd.ignore();
        }
        self.run(|mut c| {
            let pipe = pipe.clone();
            async move { pipe.query_async::<()>(&mut c).await }
        })
        .await
    }
}
