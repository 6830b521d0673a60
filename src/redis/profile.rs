//! Profiles as stored by the frontend: a JSON array of item-id strings, parsed with bounds.

/// A stored profile that cannot be ranked: malformed, too large or too long. Retrying does not
/// help until the frontend rewrites it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProfileError {
    #[error("invalid profile at {key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("the profile at {key} is {bytes} bytes, at most {max} are accepted (MAX_PROFILE_BYTES)")]
    TooLarge { key: String, bytes: u64, max: usize },
    #[error("the profile at {key} holds {items} item ids, at most {max} are accepted (MAX_PROFILE_ITEMS)")]
    TooLong { key: String, items: usize, max: usize },
}

/// A profile as read: its items (oldest first) and the hash of the stored value (`profile_sha`).
#[derive(Debug, Clone)]
pub struct Profile {
    pub items: Vec<String>,
    pub sha: String,
}

/// The hash recorded for a missing profile.
pub const MISSING_PROFILE_SHA: &str = "missing";

/// A profile read together with what the stored recommendations were computed from, and when.
#[derive(Debug, Clone)]
pub struct ProfileRead {
    pub profile: Option<Profile>,
    /// What the stored list was computed from, when there is one and its meta names it (the
    /// list's hash, `list_sha`, is the stored list's: a list deleted, evicted or written by
    /// another beside its meta counts as none).
    pub computed_from: Option<ComputedFrom>,
    /// Redis's clock at the read, in ms (a write's deadline is expressed in it).
    pub redis_ms: u64,
    /// This process's clock at the read.
    pub read_at: std::time::Instant,
    /// How long the read took.
    pub took: std::time::Duration,
    /// The stored list with its scores and strategy, when asked for (cache-first reads) and
    /// present and well-formed.
    pub stored: Option<StoredRead>,
}

/// The meta of a stored list: the profile value and the model set it was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputedFrom {
    pub profile_sha: String,
    pub model_version: String,
    /// The set's content hash (absent in metas written before it was recorded).
    pub model_sha: Option<String>,
    /// The variant that computed it (absent in metas written before experiments).
    pub variant: Option<String>,
}

/// `recommendations:<id>` as read back, with the scores and strategy kept in its meta.
#[derive(Debug, Clone)]
pub struct StoredRead {
    pub items: Vec<String>,
    pub scores: Vec<f32>,
    pub strategy: String,
}

impl ProfileRead {
    pub fn sha(&self) -> &str {
        self.profile.as_ref().map(|p| p.sha.as_str()).unwrap_or(MISSING_PROFILE_SHA)
    }
}

/// A profile is a JSON array of at most `max_items` item-id strings; anything else is refused with
/// the reason.
pub fn parse_profile(key: &str, bytes: &[u8], max_items: usize) -> Result<Vec<String>, ProfileError> {
    let invalid = |reason: String| ProfileError::Invalid { key: key.to_string(), reason };
    let text = std::str::from_utf8(bytes).map_err(|_| invalid("the value is not UTF-8 text".into()))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("the value is not JSON ({e})")))?;
    let serde_json::Value::Array(items) = value else {
        return Err(invalid(format!("expected a JSON array of item ids, got {}", json_kind(&value))));
    };
    if items.len() > max_items {
        return Err(ProfileError::TooLong { key: key.to_string(), items: items.len(), max: max_items });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            serde_json::Value::String(s) => Ok(s),
            other => Err(invalid(format!("element {i} is {}, expected a string item id", json_kind(&other)))),
        })
        .collect()
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_only_as_arrays_of_strings() {
        assert_eq!(parse_profile("k", br#"["a","b"]"#, 10).unwrap(), vec!["a", "b"]);
        assert_eq!(parse_profile("k", b"[]", 10).unwrap(), Vec::<String>::new());
        let cases: [(&[u8], &str); 5] = [
            (b"not json", "not JSON"),
            (br#"{"a":1}"#, "got an object"),
            (br#"["a", 5]"#, "element 1 is a number"),
            (br#"[["a"]]"#, "element 0 is an array"),
            (b"\xff\xfe", "not UTF-8"),
        ];
        for (input, want) in cases {
            let err = parse_profile("user_profile:x", input, 10).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(want) && text.contains("user_profile:x"), "{text}");
            assert!(matches!(err, ProfileError::Invalid { .. }), "{err:?}");
        }
    }

    #[test]
    fn a_profile_longer_than_the_cap_is_refused_with_its_length() {
        let err = parse_profile("user_profile:x", br#"["a","b","c"]"#, 2).unwrap_err();
        assert!(matches!(err, ProfileError::TooLong { items: 3, max: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("holds 3 item ids, at most 2"), "{err}");
        assert_eq!(parse_profile("user_profile:x", br#"["a","b"]"#, 2).unwrap().len(), 2);
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics_and_only_accepts_string_arrays(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            if let Ok(items) = parse_profile("user_profile:p", &bytes, usize::MAX) {
                let reparsed: Vec<String> = serde_json::from_slice(&bytes).unwrap();
                proptest::prop_assert_eq!(items, reparsed);
            }
        }

        #[test]
        fn any_list_of_strings_round_trips(items in proptest::collection::vec(".{0,40}", 0..50)) {
            let json = serde_json::to_vec(&items).unwrap();
            proptest::prop_assert_eq!(parse_profile("user_profile:p", &json, 50).unwrap(), items);
        }

        #[test]
        fn nested_or_mixed_json_is_refused_as_invalid(depth in 1usize..64, n in proptest::num::i64::ANY) {
            let nested = format!("{}{}{}", "[".repeat(depth), n, "]".repeat(depth));
            let err = parse_profile("user_profile:p", nested.as_bytes(), 10).unwrap_err();
            let invalid = matches!(err, ProfileError::Invalid { .. });
            proptest::prop_assert!(invalid);
        }
    }
}
