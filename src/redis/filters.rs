//! The store-wide filter: the set of unavailable item ids (`items:unavailable`), read whole in one
//! script (one key: on a cluster it lies in one slot).

use std::sync::LazyLock;

use ::redis::{Script, Value};

use super::error::Error;
use super::keys::UNAVAILABLE_ITEMS_KEY;
use super::store::Store;

/// What `items:unavailable` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnavailableRead {
    /// A set (or no key: an empty set) of at most the cap's members.
    Items(Vec<String>),
    /// A key of another Redis type (`string`, `hash`, ...).
    WrongType(String),
    /// A set of more members than the cap.
    TooLarge(u64),
}

/// KEYS: the set. ARGV: the cap. Returns {type, cardinality[, members]}.
static READ_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/read_unavailable.lua")));

impl Store {
    /// Reads `items:unavailable` unless it is not a set or holds more than `max` members (then
    /// only its type or size comes back). Members that are not UTF-8 cannot be catalog ids and are
    /// left out.
    pub async fn read_unavailable(&self, max: usize) -> Result<UnavailableRead, Error> {
        let reply: Vec<Value> = self
            .run(|mut c| {
                let mut call = READ_SCRIPT.prepare_invoke();
                call.key(UNAVAILABLE_ITEMS_KEY).arg(max);
                async move { call.invoke_async::<Vec<Value>>(&mut c).await }
            })
            .await?;
        let unexpected =
            |what: &str| Error::Refused(format!("unexpected reply reading {UNAVAILABLE_ITEMS_KEY}: {what}"));
        let mut reply = reply.into_iter();
        let kind: String =
            reply.next().and_then(|v| ::redis::from_redis_value(v).ok()).ok_or_else(|| unexpected("no type"))?;
        let count: u64 = reply.next().and_then(|v| ::redis::from_redis_value(v).ok()).unwrap_or(0);
        match (kind.as_str(), reply.next()) {
            ("none", _) => Ok(UnavailableRead::Items(Vec::new())),
            ("set", Some(members)) => {
                let members: Vec<Vec<u8>> =
                    ::redis::from_redis_value(members).map_err(|e| unexpected(&e.to_string()))?;
                Ok(UnavailableRead::Items(members.into_iter().filter_map(|m| String::from_utf8(m).ok()).collect()))
            }
            ("set", None) => Ok(UnavailableRead::TooLarge(count)),
            (other, _) => Ok(UnavailableRead::WrongType(other.to_string())),
        }
    }
}
