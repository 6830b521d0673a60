//! Appending an entry to a capped stream (the webhooks' dead letters, src/webhook.rs).

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
}
