//! An experiment (EXPERIMENT_FILE): the users split between variants, each a model directory with
//! its own candidate counts, by a stable hash of (salt, user id); and optionally a shadow set
//! computed beside a sample of the served answers, never served. docs/experiments.md.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::error::LoadError;

/// Assignment buckets: a share of 1% is 100 buckets.
pub const BUCKETS: u64 = 10_000;

/// Largest experiment file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    pub name: String,
    /// Changing it reshuffles every user (a new experiment on the same variants).
    pub salt: String,
    pub variants: Vec<VariantSpec>,
    #[serde(default)]
    pub shadow: Option<ShadowSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    /// Relative paths are taken from the experiment file's directory.
    pub model_dir: PathBuf,
    /// Percent of the users; the variants' shares sum to 100.
    pub share: f64,
    #[serde(default)]
    pub lightgcn_candidates: Option<usize>,
    #[serde(default)]
    pub din_candidates: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSpec {
    pub name: String,
    pub model_dir: PathBuf,
    /// Share of the served answers (0 to 1) also computed by the shadow set.
    pub sample: f64,
    #[serde(default)]
    pub lightgcn_candidates: Option<usize>,
    #[serde(default)]
    pub din_candidates: Option<usize>,
}

impl ExperimentSpec {
    /// Reads and validates the file; relative model directories are resolved against its directory.
    pub fn read(path: &Path) -> Result<Self, LoadError> {
        let invalid = |why: String| LoadError::Invalid(format!("EXPERIMENT_FILE {}: {why}", path.display()));
        let bytes = super::model_set::read_model_file(path, MAX_FILE_BYTES).map_err(invalid)?;
        let mut spec: Self = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        spec.validate().map_err(invalid)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for v in &mut spec.variants {
            v.model_dir = base.join(&v.model_dir);
        }
        if let Some(s) = &mut spec.shadow {
            s.model_dir = base.join(&s.model_dir);
        }
        Ok(spec)
    }

    fn validate(&self) -> Result<(), String> {
        check_name("the experiment", &self.name)?;
        if self.variants.is_empty() {
            return Err("variants is empty".into());
        }
        let mut names: Vec<&str> = Vec::new();
        for v in &self.variants {
            check_name("a variant", &v.name)?;
            if !(v.share.is_finite() && v.share > 0.0 && v.share <= 100.0) {
                return Err(format!("variant {:?}: share must be above 0 and at most 100, got {}", v.name, v.share));
            }
            if names.contains(&v.name.as_str()) {
                return Err(format!("two variants are named {:?}", v.name));
            }
            names.push(&v.name);
            check_candidates(&v.name, v.lightgcn_candidates, v.din_candidates)?;
        }
        let total: f64 = self.variants.iter().map(|v| v.share).sum();
        if (total - 100.0).abs() > 1e-6 {
            return Err(format!("the variants' shares sum to {total}, not 100"));
        }
        if let Some(s) = &self.shadow {
            check_name("the shadow set", &s.name)?;
            if names.contains(&s.name.as_str()) {
                return Err(format!("the shadow set is named {:?} like a variant", s.name));
            }
            if !(0.0..=1.0).contains(&s.sample) {
                return Err(format!("shadow.sample must be between 0 and 1, got {}", s.sample));
            }
            check_candidates(&s.name, s.lightgcn_candidates, s.din_candidates)?;
        }
        Ok(())
    }
}

/// Names go into answers, Redis metas, impressions and metric labels: 1-64 of `[A-Za-z0-9_.-]`.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!("{what}'s name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 _ . -"))
    }
}

fn check_candidates(name: &str, lightgcn: Option<usize>, din: Option<usize>) -> Result<(), String> {
    if lightgcn == Some(0) || din == Some(0) {
        return Err(format!("{name}: candidate counts must be at least 1"));
    }
    if let (Some(l), Some(d)) = (lightgcn, din) {
        if d > l {
            return Err(format!("{name}: din_candidates ({d}) exceeds lightgcn_candidates ({l})"));
        }
    }
    Ok(())
}

/// The user's bucket in `0..BUCKETS`: the first 8 bytes of SHA-256(`salt` `:` `user_id`), big
/// endian, modulo BUCKETS. The same on every replica and in every mode, and reproducible anywhere
/// (Python: `int.from_bytes(hashlib.sha256(f"{salt}:{user_id}".encode()).digest()[:8], "big") % 10000`).
pub fn bucket(salt: &str, user_id: &str) -> u64 {
    let mut hash = Sha256::new();
    hash.update(salt.as_bytes());
    hash.update(b":");
    hash.update(user_id.as_bytes());
    let digest = hash.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % BUCKETS
}

/// The index of the variant whose cumulative share holds `bucket` (shares in percent, in order).
pub fn pick(shares: &[f64], bucket: u64) -> usize {
    let at = bucket as f64 / BUCKETS as f64 * 100.0;
    let mut upto = 0.0;
    for (i, share) in shares.iter().enumerate() {
        upto += share;
        if at < upto {
            return i;
        }
    }
    shares.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<ExperimentSpec, String> {
        let spec: ExperimentSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        spec.validate().map(|_| spec)
    }

    #[test]
    fn a_good_file_is_read_and_bad_ones_are_refused_with_the_reason() {
        let good = r#"{"name":"e1","salt":"s","variants":[{"name":"control","model_dir":"a","share":50},
            {"name":"treatment","model_dir":"b","share":50,"lightgcn_candidates":300,"din_candidates":50}],
            "shadow":{"name":"next","model_dir":"c","sample":0.2}}"#;
        let s = spec(good).unwrap();
        assert_eq!(s.variants[1].lightgcn_candidates, Some(300));
        assert_eq!(s.shadow.as_ref().unwrap().sample, 0.2);
        for (bad, why) in [
            (r#"{"name":"e","salt":"s","variants":[]}"#, "variants is empty"),
            (r#"{"name":"e","salt":"s","variants":[{"name":"a","model_dir":"a","share":60}]}"#, "sum to 60"),
            (
                r#"{"name":"e","salt":"s","variants":[{"name":"a","model_dir":"a","share":50},{"name":"a","model_dir":"b","share":50}]}"#,
                "two variants",
            ),
            (r#"{"name":"e","salt":"s","variants":[{"name":"a b","model_dir":"a","share":100}]}"#, "name"),
            (r#"{"name":"e","salt":"s","variants":[{"name":"a","model_dir":"a","share":100,"x":1}]}"#, "unknown field"),
            (
                r#"{"name":"e","salt":"s","variants":[{"name":"a","model_dir":"a","share":100}],"shadow":{"name":"a","model_dir":"b","sample":0.1}}"#,
                "like a variant",
            ),
            (
                r#"{"name":"e","salt":"s","variants":[{"name":"a","model_dir":"a","share":100}],"shadow":{"name":"b","model_dir":"b","sample":1.5}}"#,
                "sample",
            ),
            (
                r#"{"name":"e","salt":"s","variants":[{"name":"a","model_dir":"a","share":100,"lightgcn_candidates":10,"din_candidates":20}]}"#,
                "exceeds",
            ),
        ] {
            let err = spec(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn relative_directories_are_taken_from_the_files_directory() {
        let dir = std::env::temp_dir().join(format!("experiment-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("e.json");
        std::fs::write(&file, r#"{"name":"e","salt":"s","variants":[{"name":"a","model_dir":"m1","share":100}]}"#)
            .unwrap();
        let s = ExperimentSpec::read(&file).unwrap();
        assert_eq!(s.variants[0].model_dir, dir.join("m1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn assignment_is_stable_reproducible_and_follows_the_shares() {
        // the documented formula, computed by hand for one id (Python gives the same)
        assert_eq!(bucket("s", "u1"), 7699);
        assert_ne!((0..50).map(|i| bucket("a", &i.to_string())).collect::<Vec<_>>(), {
            (0..50).map(|i| bucket("b", &i.to_string())).collect::<Vec<_>>()
        });
        let shares = [30.0, 70.0];
        let n = 20_000;
        let first = (0..n).filter(|i| pick(&shares, bucket("salt", &format!("user{i}"))) == 0).count();
        let share = first as f64 / n as f64;
        assert!((share - 0.30).abs() < 0.015, "{share}");
        assert_eq!(pick(&[50.0, 50.0], 0), 0);
        assert_eq!(pick(&[50.0, 50.0], 4_999), 0);
        assert_eq!(pick(&[50.0, 50.0], 5_000), 1);
        assert_eq!(pick(&[50.0, 50.0], BUCKETS - 1), 1);
    }
}
