//! The model sets in service, swapped and reloaded as one: one per variant (a single one named
//! `default` without an experiment) and an optional shadow set. A request takes the lineup once
//! and keeps its variant's set (and the shadow set) to the end.

use std::sync::Arc;

use super::experiment::{bucket, pick};

/// The variant of every answer while no experiment splits the users.
pub const DEFAULT_VARIANT: &str = "default";

/// Candidates kept after LightGCN and after DIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Candidates {
    pub lightgcn: usize,
    pub din: usize,
}

/// One named way of ranking: a model set and its candidate counts.
pub struct Variant<R> {
    pub name: String,
    /// Percent of the users (100 without an experiment).
    pub share: f64,
    pub set: Arc<R>,
    pub candidates: Candidates,
}

impl<R> Clone for Variant<R> {
    fn clone(&self) -> Self {
        Self { name: self.name.clone(), share: self.share, set: self.set.clone(), candidates: self.candidates }
    }
}

/// A set computed beside a sample of the served answers, never served or stored.
pub struct Shadow<R> {
    pub variant: Variant<R>,
    /// Share of the served answers (0 to 1).
    pub sample: f64,
}

/// The experiment's name and the salt of its assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    pub name: String,
    pub salt: String,
}

pub struct Lineup<R> {
    /// None: one variant, `default`, for everyone.
    pub experiment: Option<Experiment>,
    /// At least one; in the experiment file's order.
    pub variants: Vec<Variant<R>>,
    pub shadow: Option<Shadow<R>>,
}

impl<R> Lineup<R> {
    /// One set for everyone (no experiment).
    pub fn single(set: Arc<R>, candidates: Candidates) -> Self {
        let variant = Variant { name: DEFAULT_VARIANT.into(), share: 100.0, set, candidates };
        Self { experiment: None, variants: vec![variant], shadow: None }
    }

    /// The first variant (the control): what `/health` reports first, and the anonymous answers
    /// without a session id.
    pub fn primary(&self) -> &Variant<R> {
        &self.variants[0]
    }

    /// The variant of a user (or of an anonymous session): by the bucket of (salt, id).
    pub fn assign(&self, id: &str) -> &Variant<R> {
        match &self.experiment {
            Some(e) if self.variants.len() > 1 => {
                let shares: Vec<f64> = self.variants.iter().map(|v| v.share).collect();
                &self.variants[pick(&shares, bucket(&e.salt, id))]
            }
            _ => self.primary(),
        }
    }

    /// Every distinct set, variants first, then the shadow set.
    pub fn sets(&self) -> impl Iterator<Item = (&str, &Arc<R>)> {
        self.variants.iter().chain(self.shadow.as_ref().map(|s| &s.variant)).map(|v| (v.name.as_str(), &v.set))
    }
}
