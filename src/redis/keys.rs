//! Every Redis key name and prefix the service reads or writes: the frontend's contract.
//!
//! The service's own per-user keys (`ingested_events:`, `ingest_offsets:`, the listener's claim)
//! must lie in the profile's slot on a Redis Cluster: the append script touches them together with
//! the profile. Their names are built by `companion`, which gives them exactly the profile key's
//! slot for every valid user id, braces included (see its rules).

use std::sync::LazyLock;

pub fn profile_key(user_id: &str) -> String {
    format!("user_profile:{user_id}")
}

pub fn recommendations_key(user_id: &str) -> String {
    format!("recommendations:{user_id}")
}

/// What a stored list was computed from (a hash key beside the list, same TTL).
pub fn meta_key(user_id: &str) -> String {
    format!("recommendations_meta:{user_id}")
}

/// The ids of the user's most recent ingested events (a list, newest first): a behaviour event a
/// producer sent twice is applied once. In the profile's slot (`companion`); the name does not
/// start with `user_profile:`, so profile scans never see it.
pub fn ingested_events_key(user_id: &str) -> String {
    companion("ingested_events", user_id)
}

/// Per user, a hash `<topic>:<partition>` -> the highest offset of that partition whose event for
/// this user has been applied to the profile (written by the same script as the profile, so a
/// redelivered event changes nothing). In the profile's slot (`companion`).
pub fn ingest_offsets_key(user_id: &str) -> String {
    companion("ingest_offsets", user_id)
}

/// A listener replica's short claim on a user it is recomputing, in the profile's slot
/// (`companion`).
pub fn claim_key(user_id: &str) -> String {
    companion("model_service:claim", user_id)
}

/// `<prefix>:...` in exactly the slot of `user_profile:<user_id>`, for every user id. Redis hashes
/// a key's tag (the text between its first `{` and the first `}` after it, when not empty),
/// else the whole key. The prefix holds no brace, so:
/// - an id without `{` or `}`: `<prefix>:{user_profile:<id>}`, the tag being the whole profile
///   key (the names used since the first version, kept);
/// - a profile key with a tag (`a{b}c`, `{x}`): `<prefix>:user_profile:<id>`, whose first `{` and
///   first `}` after it are the profile key's own, so the tag is the same;
/// - a profile key without one (`a}b`, `{}y`, `{`), hashed whole: `<prefix>:{<t>}user_profile:<id>`
///   where `<t>` is the tag of the profile key's slot from `SLOT_TAGS`.
fn companion(prefix: &str, user_id: &str) -> String {
    let profile = profile_key(user_id);
    if !user_id.contains(['{', '}']) {
        format!("{prefix}:{{{profile}}}")
    } else if hash_tag(profile.as_bytes()).is_some() {
        format!("{prefix}:{profile}")
    } else {
        let tag = &SLOT_TAGS[usize::from(slot(profile.as_bytes()))];
        format!("{prefix}:{{{tag}}}{profile}")
    }
}

/// The key's hash tag by Redis's rule: after the first `{`, up to the first `}` after it, when
/// that is not empty.
fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let close = key[open + 1..].iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

/// The key's Redis Cluster slot: CRC16 (XMODEM) of its hash tag, or of the whole key, mod 16384.
fn slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key).unwrap_or(key)) % SLOTS
}

const SLOTS: u16 = 16384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the checksum of Redis Cluster.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// For every slot, the first string (shortest first, then in the order of `ALPHABET`) that
/// hashes to it: 1 to 3 characters cover all 16384 slots. Key names depend on it, so the order
/// must never change.
static SLOT_TAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut tags: Vec<Option<String>> = vec![None; usize::from(SLOTS)];
    let mut missing = tags.len();
    let mut candidates: Vec<Vec<u8>> = vec![Vec::new()];
    while missing > 0 {
        candidates =
            candidates.iter().flat_map(|c| ALPHABET.iter().map(move |&a| [c.as_slice(), &[a]].concat())).collect();
        for c in &candidates {
            let at = &mut tags[usize::from(crc16(c) % SLOTS)];
            if at.is_none() {
                *at = Some(String::from_utf8(c.clone()).expect("ASCII"));
                missing -= 1;
            }
        }
    }
    tags.into_iter().map(|t| t.expect("every slot has a tag")).collect()
});

pub const PROFILE_PREFIX: &str = "user_profile:";

/// The prefix of `meta_key`: catch-up scans it for lists whose profile is gone.
pub const META_PREFIX: &str = "recommendations_meta:";

/// The set of item ids that are not to be recommended (out of stock, withdrawn): one key, so on
/// a cluster it lies in one slot.
pub const UNAVAILABLE_ITEMS_KEY: &str = "items:unavailable";

/// A short-lived key the readiness check writes (proof that Redis accepts writes).
pub const HEALTH_KEY: &str = "model_service:health";

#[cfg(test)]
mod tests {
    use super::*;
    use ::redis::cluster_routing::Slot;
    use proptest::prelude::*;

    /// Every companion key lies in the profile key's slot, as the redis crate computes slots.
    fn same_slot(user_id: &str) {
        let profile = Slot::for_key(profile_key(user_id));
        for key in [ingested_events_key(user_id), ingest_offsets_key(user_id), claim_key(user_id)] {
            assert_eq!(Slot::for_key(&key), profile, "{key:?} for the user id {user_id:?}");
        }
    }

    #[test]
    fn companion_keys_share_the_profile_slot_whatever_braces_the_id_holds() {
        for id in [
            "A3RTKL9KB8KLID",
            "a}b",
            "{x}",
            "{}y",
            "a{b}c",
            "}{",
            "{",
            "}",
            "{{a}}",
            "{}",
            "}}",
            "a{}b}",
            "{{}}",
            "x{y",
            "é{ü}",
            "💡}",
        ] {
            same_slot(id);
        }
    }

    #[test]
    fn ids_without_braces_keep_the_names_of_the_first_version() {
        assert_eq!(ingested_events_key("A3RT"), "ingested_events:{user_profile:A3RT}");
        assert_eq!(ingest_offsets_key("A3RT"), "ingest_offsets:{user_profile:A3RT}");
        assert_eq!(claim_key("A3RT"), "model_service:claim:{user_profile:A3RT}");
        assert_eq!(ingested_events_key("a{b}c"), "ingested_events:user_profile:a{b}c");
    }

    #[test]
    fn every_slot_has_a_short_tag_of_its_own() {
        assert_eq!(SLOT_TAGS.len(), 16384);
        for (slot, tag) in SLOT_TAGS.iter().enumerate() {
            assert!((1..=3).contains(&tag.len()), "{tag:?}");
            assert_eq!(Slot::for_key(format!("{{{tag}}}")), Slot::new(slot as u16).unwrap());
        }
    }

    proptest! {
        #[test]
        fn companion_keys_share_the_profile_slot_for_ids_with_braces(
            id in "[a-z{}:é]{1,12}",
        ) {
            same_slot(&id);
        }

        #[test]
        fn crc16_slots_agree_with_the_redis_crate(key in proptest::collection::vec(any::<u8>(), 0..40)) {
            prop_assert_eq!(Slot::new(slot(&key)).unwrap(), Slot::for_key(&key));
        }
    }
}
