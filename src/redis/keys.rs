//! Every Redis key name and prefix the service reads or writes: the frontend's contract.

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
/// producer sent twice is applied once. The hash tag is the profile key, so on a cluster it lives
/// in the profile's slot (the append script writes both); the name does not start with
/// `user_profile:`, so profile scans never see it.
pub fn ingested_events_key(user_id: &str) -> String {
    format!("ingested_events:{{{}}}", profile_key(user_id))
}

/// Per user, a hash `<topic>:<partition>` -> the highest offset of that partition whose event for
/// this user has been applied to the profile (written by the same script as the profile, so a
/// redelivered event changes nothing). Hash-tagged like `ingested_events_key`.
pub fn ingest_offsets_key(user_id: &str) -> String {
    format!("ingest_offsets:{{{}}}", profile_key(user_id))
}

/// A listener replica's short claim on a user it is recomputing. The hash tag is the profile key,
/// so on a cluster the claim lives in the profile's slot.
pub fn claim_key(user_id: &str) -> String {
    format!("model_service:claim:{{{}}}", profile_key(user_id))
}

pub const PROFILE_PREFIX: &str = "user_profile:";

/// The prefix of `meta_key`: catch-up scans it for lists whose profile is gone.
pub const META_PREFIX: &str = "recommendations_meta:";

/// A short-lived key the readiness check writes (proof that Redis accepts writes).
pub const HEALTH_KEY: &str = "model_service:health";
