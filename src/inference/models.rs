//! The three TorchScript stages, their tensor contracts (model_output/README.md), and the cascade.
//!
//! Every tensor call uses tch's fallible `f_*` API: a model error becomes a `TchError`, never a
//! panic on an inference worker.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tch::{CModule, Device, Kind, TchError, Tensor};

use super::compiled::{self, Compiled, RuntimeSpec, StageRuntime};

use super::error::LoadError;
use crate::inference::device::device_name;
use crate::inference::exclusion::Excluded;
use crate::inference::ivf::IvfIndex;
use crate::inference::mode::InferenceMode;
use crate::inference::topk::{cpu_f32, host_f32, host_i64, select_top};

pub const STAGES: [&str; 3] = ["lightgcn", "din", "ranknet"];

#[derive(Debug, Clone, Deserialize)]
struct Manifest {
    version: String,
    models: std::collections::BTreeMap<String, StageManifest>,
    catalog: CatalogManifest,
}

#[derive(Debug, Clone, Deserialize)]
struct StageManifest {
    version: String,
    dim: Option<u64>,
    /// The stage's forward arguments (model_output/README.md); absent means interface v1.
    inputs: Option<Vec<String>>,
}

/// The forward arguments each stage may declare in manifest.json: v1 (the default when a stage
/// declares none) and, for DIN, v2, which also takes LightGCN's scores of the candidates.
const LIGHTGCN_INPUTS: [&str; 2] = ["history", "mask"];
const DIN_INPUTS_V1: [&str; 3] = ["history", "mask", "cands"];
const DIN_INPUTS_V2: [&str; 4] = ["history", "mask", "cands", "s1"];
const RANKNET_INPUTS: [&str; 5] = ["history", "mask", "cands", "s1", "s2"];

/// Whether `declared` (absent: v1) is an interface this server can call for `stage`; for DIN,
/// whether it takes s1.
fn check_inputs(stage: &str, declared: Option<&[String]>) -> Result<bool, String> {
    let Some(declared) = declared else { return Ok(false) };
    let is = |want: &[&str]| declared.len() == want.len() && declared.iter().zip(want).all(|(a, b)| a == b);
    let ok = match stage {
        "lightgcn" => is(&LIGHTGCN_INPUTS).then_some(false),
        "din" if is(&DIN_INPUTS_V2) => Some(true),
        "din" => is(&DIN_INPUTS_V1).then_some(false),
        "ranknet" => is(&RANKNET_INPUTS).then_some(false),
        _ => None,
    };
    ok.ok_or_else(|| {
        format!("manifest.json: models.{stage}.inputs {declared:?} is not an interface this server can call")
    })
}

#[derive(Debug, Clone, Deserialize)]
struct CatalogManifest {
    num_items: usize,
}

/// What is in service, for /health, /metrics and `check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub version: String,
    /// The set's content hash (every file it is loaded from): what the cache knows it by, with
    /// the version.
    pub content_sha: String,
    pub stages: Vec<StageInfo>,
    pub num_items: usize,
    pub device: String,
    /// Stage 1's candidate search: `exact`, or `ivf lists=L probes=P`.
    pub candidate_search: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StageInfo {
    pub stage: String,
    pub version: String,
    pub dim: Option<u64>,
    pub file: PathBuf,
    /// `torchscript`, or `compiled` (its model.pt2).
    pub runtime: String,
}

/// The stage whose order is final. `ranknet` (the default) runs the whole cascade; `lightgcn` and
/// `din` stop early, for ablations such as the stage-by-stage quality table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    Lightgcn,
    Din,
    Ranknet,
}

/// Candidate counts of one cascade run.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub lightgcn: usize,
    pub din: usize,
    pub k: usize,
    pub last_stage: Stage,
    /// Also report where each returned item stood after every stage (`Ranked::trace`).
    pub explain: bool,
}

/// Time spent in each stage of one batch, and the candidates each of the first two handed on.
#[derive(Debug, Clone, Default)]
pub struct StageStats {
    /// `None` for a stage that did not run (LAST_STAGE stopped the cascade before it).
    pub lightgcn: Option<Duration>,
    pub din: Option<Duration>,
    pub ranknet: Option<Duration>,
    pub lightgcn_candidates: usize,
    pub din_candidates: usize,
}

/// One history's final list: catalog rows with their RankNet scores, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub rows: Vec<i64>,
    pub scores: Vec<f32>,
    /// With `Budget::explain`: for each row, its (score, 0-based rank) after each stage that ran,
    /// LightGCN first.
    pub trace: Option<Vec<Vec<(f32, usize)>>>,
}

pub struct Models {
    lightgcn: CModule,
    din: CModule,
    ranknet: CModule,
    /// DIN interface v2: forward(history, mask, cands, s1).
    din_takes_s1: bool,
    /// The compiled packages of DIN and RankNet, run instead of their TorchScript modules.
    din_compiled: Option<Compiled>,
    ranknet_compiled: Option<Compiled>,
    device: Device,
    /// Approximate candidate search for stage 1 (None: LightGCN scores every item).
    index: Option<IvfIndex>,
    pub info: ModelInfo,
}

impl Models {
    /// Parses manifest.json (`manifest`: its bytes, read with a cap by the caller), loads the
    /// three stages onto `device` and checks them with a smoke batch against the catalog size.
    pub fn load(
        dir: &Path,
        manifest: &[u8],
        device: Device,
        catalog_len: usize,
        runtime: RuntimeSpec,
    ) -> Result<Self, LoadError> {
        let err = |reason: String| LoadError::Model { dir: dir.display().to_string(), reason };
        let manifest: Manifest =
            serde_json::from_slice(manifest).map_err(|e| err(format!("manifest.json is not valid: {e}")))?;
        if u32::try_from(catalog_len).is_err() {
            return Err(err(format!("catalog.tsv has {catalog_len} items; at most {} are supported", u32::MAX)));
        }
        if manifest.catalog.num_items != catalog_len {
            return Err(err(format!(
                "manifest.json says {} items but catalog.tsv has {catalog_len}",
                manifest.catalog.num_items
            )));
        }
        let mut modules = Vec::new();
        let mut stages = Vec::new();
        let mut din_takes_s1 = false;
        for stage in STAGES {
            let m = manifest.models.get(stage).ok_or_else(|| err(format!("manifest.json has no models.{stage}")))?;
            let takes_s1 = check_inputs(stage, m.inputs.as_deref()).map_err(err)?;
            din_takes_s1 |= stage == "din" && takes_s1;
            let file = dir.join(stage).join("model.pt");
            if !file.is_file() {
                return Err(err(format!("{} is missing", file.display())));
            }
            let mut module = CModule::load_on_device(&file, device).map_err(|e| {
                err(format!("{} is not a loadable TorchScript file: {}", file.display(), torch_error(&e)))
            })?;
            module.set_eval();
            modules.push(module);
            stages.push(StageInfo {
                stage: stage.into(),
                version: m.version.clone(),
                dim: m.dim,
                file,
                runtime: "torchscript".into(),
            });
        }
        let on_cpu = device == Device::Cpu;
        let din_compiled = if din_takes_s1 {
            compiled::load_stage(dir, "din", runtime, on_cpu).map_err(err)?
        } else if runtime.runtime == StageRuntime::Compiled {
            return Err(err("STAGE_RUNTIME=compiled: this DIN (interface v1) has no compiled form".into()));
        } else {
            None
        };
        let ranknet_compiled = compiled::load_stage(dir, "ranknet", runtime, on_cpu).map_err(err)?;
        if din_compiled.is_some() {
            stages[1].runtime = "compiled".into();
        }
        if ranknet_compiled.is_some() {
            stages[2].runtime = "compiled".into();
        }
        let ranknet = modules.pop().expect("three modules");
        let din = modules.pop().expect("three modules");
        let lightgcn = modules.pop().expect("three modules");
        let info = ModelInfo {
            version: manifest.version,
            content_sha: String::new(),
            stages,
            num_items: catalog_len,
            device: device_name(device),
            candidate_search: "exact".into(),
        };
        let models =
            Self { lightgcn, din, ranknet, din_takes_s1, din_compiled, ranknet_compiled, device, index: None, info };
        models.smoke_test().map_err(|reason| err(format!("smoke batch failed: {reason}")))?;
        Ok(models)
    }

    /// Runs a small batch through every stage (shapes are checked in `rank`) and checks the values
    /// against the catalog.
    pub fn smoke_test(&self) -> Result<(), String> {
        let n = self.info.num_items as i64;
        let histories: Vec<Vec<i64>> = vec![(0..n.min(5)).collect(), vec![n - 1], (0..n.min(40)).rev().collect()];
        let refs: Vec<&[i64]> = histories.iter().map(|h| h.as_slice()).collect();
        let budget = Budget {
            lightgcn: 20.min(self.info.num_items),
            din: 10.min(self.info.num_items),
            k: 5,
            last_stage: Stage::Ranknet,
            explain: true,
        };
        let sorted: Vec<Vec<i64>> =
            histories.iter().map(|h| h.iter().copied().collect::<BTreeSet<_>>().into_iter().collect()).collect();
        let excludes: Vec<Excluded> = sorted.iter().map(|h| Excluded::new(h, None)).collect();
        let (ranked, _) = self.rank(&refs, &excludes, budget).map_err(|e| torch_error(&e))?;
        for (hist, r) in histories.iter().zip(&ranked) {
            if r.scores.iter().any(|s| !s.is_finite()) {
                return Err("ranknet returned non-finite scores".into());
            }
            if r.rows.iter().any(|row| hist.contains(row)) {
                return Err("a history item came back as a recommendation".into());
            }
            let trace = r.trace.as_deref().unwrap_or_default();
            let consistent = trace.len() == r.rows.len()
                && trace.iter().zip(&r.scores).enumerate().all(|(i, (t, s))| t.len() == 3 && t[2] == (*s, i));
            if !consistent {
                return Err("the per-stage trace does not match the final list".into());
            }
        }
        Ok(())
    }

    /// LightGCN's [D, N] item vectors (`item_table()` of the export), for the IVF index.
    pub fn item_table(&self) -> Result<Tensor, String> {
        let none: [&Tensor; 0] = [];
        let table = self.lightgcn.method_ts("item_table", &none).map_err(|e| {
            format!(
                "the LightGCN export has no item_table() (re-export it with model_service_py.reexport): {}",
                torch_error(&e)
            )
        })?;
        let size = table.size();
        if size.len() != 2 || size[1] != self.info.num_items as i64 {
            return Err(format!("LightGCN's item_table() is {size:?}, expected [dim, {}]", self.info.num_items));
        }
        Ok(table)
    }

    /// From now on stage 1 searches `index` instead of scoring every item.
    pub fn use_index(&mut self, index: IvfIndex) {
        self.info.candidate_search = format!("ivf lists={} probes={}", index.lists(), index.probes());
        self.index = Some(index);
    }

    fn history_tensors(&self, histories: &[&[i64]]) -> Result<(Tensor, Tensor), TchError> {
        let b = histories.len();
        let l = histories.iter().map(|h| h.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0i64; b * l];
        let mut mask = vec![false; b * l];
        for (i, h) in histories.iter().enumerate() {
            ids[i * l..i * l + h.len()].copy_from_slice(h);
            mask[i * l..i * l + h.len()].fill(true);
        }
        let shape = [b as i64, l as i64];
        let h = Tensor::f_from_slice(&ids)?.f_view(shape)?.f_to_device(self.device)?;
        let m = Tensor::f_from_slice(&mask)?.f_view(shape)?.f_to_device(self.device)?;
        Ok((h, m))
    }

    fn sync(&self) {
        if let Device::Cuda(n) = self.device {
            tch::Cuda::synchronize(n as i64);
        }
    }

    /// The `c` best-scored catalog rows of every profile, the rows in its `exclude` left out, best
    /// first: ([B, c] scores, [B, c] rows). On the CPU `select_top` over each row of the score
    /// matrix; elsewhere the excluded rows are masked with -inf and `topk` runs on the device.
    fn top_candidates(&self, scores: Tensor, excludes: &[Excluded<'_>], c: i64) -> Result<(Tensor, Tensor), TchError> {
        if self.device == Device::Cpu {
            let scores = scores.f_contiguous()?;
            let values = cpu_f32(&scores)?;
            let n = self.info.num_items;
            let mut rows = Vec::with_capacity(excludes.len() * c as usize);
            let mut best = Vec::with_capacity(rows.capacity());
            for (i, exclude) in excludes.iter().enumerate() {
                for (row, score) in select_top(&values[i * n..(i + 1) * n], *exclude, c as usize) {
                    rows.push(row as i64);
                    best.push(score);
                }
            }
            let shape = [excludes.len() as i64, c];
            return Ok((Tensor::f_from_slice(&best)?.f_view(shape)?, Tensor::f_from_slice(&rows)?.f_view(shape)?));
        }
        let (rows, cols): (Vec<i64>, Vec<i64>) =
            excludes.iter().enumerate().flat_map(|(i, ex)| ex.to_vec().into_iter().map(move |c| (i as i64, c))).unzip();
        let rows = Tensor::f_from_slice(&rows)?.f_to_device(self.device)?;
        let cols = Tensor::f_from_slice(&cols)?.f_to_device(self.device)?;
        let neg_inf = Tensor::f_full([], f64::NEG_INFINITY, (Kind::Float, self.device))?;
        let mut scores = scores;
        let scores = scores.f_index_put_(&[Some(rows), Some(cols)], &neg_inf, false)?;
        scores.f_topk(c, 1, true, true)
    }

    /// The cascade for a batch of profiles: `histories` (non-empty, distinct catalog rows each) are
    /// what the models see, `excludes` (distinct rows each, a superset of the history) what may
    /// not be recommended. LightGCN scores the catalog, excluded rows are left out, the top
    /// `budget.lightgcn` go to DIN, DIN's top `budget.din` go to RankNet, RankNet's top `budget.k`
    /// are returned.
    pub fn rank(
        &self,
        histories: &[&[i64]],
        excludes: &[Excluded<'_>],
        budget: Budget,
    ) -> Result<(Vec<Ranked>, StageStats), TchError> {
        let _mode = InferenceMode::enter();
        let n = self.info.num_items;
        let longest = excludes.iter().map(Excluded::len).max().unwrap_or(0);
        // Every row excludes at most `longest` items, so this many other items always exist.
        let c1 = budget.lightgcn.min(n.saturating_sub(longest)) as i64;
        let c2 = budget.din.min(c1 as usize) as i64;
        let k = budget.k.min(c2 as usize) as i64;
        let mut times =
            StageStats { lightgcn_candidates: c1 as usize, din_candidates: c2 as usize, ..Default::default() };
        if histories.is_empty() || k == 0 {
            return Ok((
                histories.iter().map(|_| Ranked { rows: vec![], scores: vec![], trace: None }).collect(),
                times,
            ));
        }
        let (h, m) = self.history_tensors(histories)?;

        let b = histories.len() as i64;
        let t = Instant::now();
        let (s1, cand1) = match &self.index {
            Some(index) => {
                let users = self.lightgcn.method_ts("user_vectors", &[&h, &m])?;
                index.search(&users, excludes, c1 as usize)?
            }
            None => {
                let scores = self.lightgcn.forward_ts(&[&h, &m])?;
                expect_shape("lightgcn", &scores, [b, n as i64])?;
                self.top_candidates(scores, excludes, c1)?
            }
        };
        self.sync();
        times.lightgcn = Some(t.elapsed());
        if budget.last_stage == Stage::Lightgcn {
            let mut ranked = to_ranked(&cand1.f_narrow(1, 0, k)?, &s1.f_narrow(1, 0, k)?)?;
            if budget.explain {
                add_traces(&mut ranked, &s1, None, None)?;
            }
            return Ok((ranked, times));
        }

        let t = Instant::now();
        let s2 = if let Some(din) = &self.din_compiled {
            self.compiled_din(din, histories, (&h, &m), &cand1, &s1)?
        } else if self.din_takes_s1 {
            self.din.forward_ts(&[&h, &m, &cand1, &s1])?
        } else {
            self.din.forward_ts(&[&h, &m, &cand1])?
        };
        expect_shape("din", &s2, [b, c1])?;
        let (s2_top, pos2) = s2.f_topk(c2, 1, true, true)?;
        let cand2 = cand1.f_gather(1, &pos2, false)?;
        let s1_top = s1.f_gather(1, &pos2, false)?;
        self.sync();
        times.din = Some(t.elapsed());
        if budget.last_stage == Stage::Din {
            let mut ranked = to_ranked(&cand2.f_narrow(1, 0, k)?, &s2_top.f_narrow(1, 0, k)?)?;
            if budget.explain {
                add_traces(&mut ranked, &s1, Some((&pos2, &s2_top)), None)?;
            }
            return Ok((ranked, times));
        }

        let t = Instant::now();
        let s3 = match &self.ranknet_compiled {
            Some(ranknet) => {
                let (hist, rows) = packed_history(histories)?;
                ranknet.forward(&[&hist, &rows, &cand2, &s1_top, &s2_top]).map_err(TchError::Torch)?
            }
            None => self.ranknet.forward_ts(&[&h, &m, &cand2, &s1_top, &s2_top])?,
        };
        expect_shape("ranknet", &s3, [b, c2])?;
        let (s3_top, pos3) = s3.f_topk(k, 1, true, true)?;
        let mut ranked = to_ranked(&cand2.f_gather(1, &pos3, false)?, &s3_top)?;
        times.ranknet = Some(t.elapsed());
        if budget.explain {
            add_traces(&mut ranked, &s1, Some((&pos2, &s2_top)), Some((&pos3, &s3_top)))?;
        }
        Ok((ranked, times))
    }
}

impl Models {
    /// The compiled DIN over the batch in groups of profiles with histories of about the same
    /// length: a call's cost follows its rows x its longest history, plus about as much per call
    /// as 18 padded items in one row (measured: docs/measurement-history.md, "DIN in groups of
    /// like lengths"), so profiles sorted by length are called together while the padding they
    /// add costs less than another call would. The rows' scores are put back in batch order
    /// ([B, c1]).
    /// `padded`: the batch's history and mask, already built (used as is when one group holds
    /// the whole batch: the order of a call's rows does not change their scores).
    fn compiled_din(
        &self,
        din: &Compiled,
        histories: &[&[i64]],
        padded: (&Tensor, &Tensor),
        cand1: &Tensor,
        s1: &Tensor,
    ) -> Result<Tensor, TchError> {
        let groups = like_length_groups(histories);
        if groups.len() == 1 {
            return din.forward(&[padded.0, padded.1, cand1, s1]).map_err(TchError::Torch);
        }
        let mut outs = Vec::with_capacity(groups.len());
        for group in &groups {
            let rows: Vec<&[i64]> = group.iter().map(|&i| histories[i]).collect();
            let (h, m) = self.history_tensors(&rows)?;
            let index = Tensor::f_from_slice(&group.iter().map(|&i| i as i64).collect::<Vec<_>>())?
                .f_to_device(cand1.device())?;
            outs.push(
                din.forward(&[&h, &m, &cand1.f_index_select(0, &index)?, &s1.f_index_select(0, &index)?])
                    .map_err(TchError::Torch)?,
            );
        }
        // the groups' rows one after another; `at[i]`: where batch row i stands among them
        let mut at = vec![0i64; histories.len()];
        for (p, &i) in groups.iter().flatten().enumerate() {
            at[i] = p as i64;
        }
        Tensor::f_cat(&outs, 0)?.f_index_select(0, &Tensor::f_from_slice(&at)?.f_to_device(cand1.device())?)
    }
}

/// A padded item slot in one row against the fixed cost of a call, in the compiled DIN's measured
/// cost model (about 1.4 us per row and history item, 25 us per call).
const DIN_CALL_IN_ITEM_SLOTS: usize = 18;

/// The batch's rows in groups for the compiled DIN: sorted by history length, a row joins the
/// group before it while the padding it adds (every row there padded to its length) stays within
/// `DIN_CALL_IN_ITEM_SLOTS`.
fn like_length_groups(histories: &[&[i64]]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..histories.len()).collect();
    order.sort_by_key(|&i| histories[i].len());
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in order {
        let len = histories[i].len();
        let joins = |group: &Vec<usize>| {
            let longest = group.last().map_or(len, |&j| histories[j].len());
            group.len() * (len - longest) <= DIN_CALL_IN_ITEM_SLOTS
        };
        match groups.last_mut() {
            Some(group) if joins(group) => group.push(i),
            _ => groups.push(vec![i]),
        }
    }
    groups
}

/// The batch's history items packed row after row ([T]) and the row each belongs to ([T]), the
/// compiled RankNet's input (model_output/README.md).
fn packed_history(histories: &[&[i64]]) -> Result<(Tensor, Tensor), TchError> {
    let hist: Vec<i64> = histories.iter().flat_map(|h| h.iter().copied()).collect();
    let rows: Vec<i64> =
        histories.iter().enumerate().flat_map(|(i, h)| std::iter::repeat_n(i as i64, h.len())).collect();
    Ok((Tensor::f_from_slice(&hist)?, Tensor::f_from_slice(&rows)?))
}

/// libtorch's message without the C++ stack trace it appends (for logs and error bodies).
pub fn torch_error(e: &TchError) -> String {
    let text = e.to_string();
    let end = ["\nException raised from", "\nframe #"].iter().filter_map(|m| text.find(m)).min().unwrap_or(text.len());
    text[..end].trim_end().to_string()
}

/// A stage's scores must be [batch, candidates] (model_output/README.md).
fn expect_shape(stage: &str, scores: &Tensor, expected: [i64; 2]) -> Result<(), TchError> {
    if scores.size() == expected {
        Ok(())
    } else {
        Err(TchError::Shape(format!("{stage} returned scores of shape {:?}, expected {expected:?}", scores.size())))
    }
}

/// [B, k] rows and scores (any device) to one `Ranked` per history.
fn to_ranked(rows: &Tensor, scores: &Tensor) -> Result<Vec<Ranked>, TchError> {
    let k = rows.size().get(1).copied().unwrap_or(0).max(1) as usize;
    let rows: Vec<i64> = Vec::try_from(rows.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
    let scores = host_f32(scores)?;
    Ok(rows
        .chunks(k)
        .zip(scores.chunks(k))
        .map(|(r, s)| Ranked { rows: r.to_vec(), scores: s.to_vec(), trace: None })
        .collect())
}

/// Fills `Ranked::trace`: where each returned item stood after each stage. `s1` holds LightGCN's
/// scores in its own order; `din` DIN's order of LightGCN's candidates (positions into them) with
/// its scores; `ranknet` RankNet's order of DIN's candidates with its scores. The final item `i`
/// stood at `j = ranknet.pos[i]` after DIN (else `i`) and at `din.pos[j]` after LightGCN (else `j`).
fn add_traces(
    ranked: &mut [Ranked],
    s1: &Tensor,
    din: Option<(&Tensor, &Tensor)>,
    ranknet: Option<(&Tensor, &Tensor)>,
) -> Result<(), TchError> {
    let b = ranked.len().max(1);
    let width = |t: &Tensor| t.size().get(1).copied().unwrap_or(0) as usize;
    let (w1, s1) = (width(s1), host_f32(s1)?);
    let din = din.map(|(p, s)| Ok::<_, TchError>((width(p), host_i64(p)?, host_f32(s)?))).transpose()?;
    let ranknet = ranknet.map(|(p, s)| Ok::<_, TchError>((width(p), host_i64(p)?, host_f32(s)?))).transpose()?;
    for (row, r) in ranked.iter_mut().enumerate().take(b) {
        let trace = (0..r.rows.len())
            .map(|i| {
                let mut stages = Vec::with_capacity(3);
                let j = ranknet.as_ref().map_or(i, |(w, pos, _)| pos[row * w + i] as usize);
                let first = din.as_ref().map_or(j, |(w, pos, _)| pos[row * w + j] as usize);
                stages.push((s1[row * w1 + first], first));
                if let Some((w, _, s2)) = &din {
                    stages.push((s2[row * w + j], j));
                }
                if let Some((w, _, s3)) = &ranknet {
                    stages.push((s3[row * w + i], i));
                }
                stages
            })
            .collect();
        r.trace = Some(trace);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_din_takes_like_lengths_together_and_keeps_apart_what_padding_would_cost() {
        let groups = |lens: &[usize]| {
            let items: Vec<Vec<i64>> = lens.iter().map(|&n| (1..=n as i64).collect()).collect();
            like_length_groups(&items.iter().map(Vec::as_slice).collect::<Vec<_>>())
        };
        // sorted 3 3 4 10 11 | 30 40 48: 10 pads the three rows before it by 6 (18 slots, a
        // call's worth), 30 would pad five rows by 19; 40 and 48 pad one row by 10, two by 8
        assert_eq!(groups(&[10, 3, 30, 3, 48, 4, 40, 11]), vec![vec![1, 3, 5, 0, 7], vec![2, 6, 4]]);
        // 10 after four rows of 3 would pad 28 slots: a call of its own is cheaper
        assert_eq!(groups(&[3, 3, 10, 3, 3]), vec![vec![0, 1, 3, 4], vec![2]]);
        assert_eq!(groups(&[7]), vec![vec![0]]);
        assert_eq!(groups(&[]), Vec::<Vec<usize>>::new());
    }

    #[test]
    fn traces_follow_each_item_back_through_the_stages() {
        // LightGCN order: scores 9, 8, 7, 6 (rows of its candidates 0..4); DIN keeps positions
        // [2, 0, 3] with scores [.9, .8, .7]; RankNet reorders DIN's to [1, 2] with scores [5, 4].
        let s1 = Tensor::from_slice(&[9f32, 8., 7., 6.]).view([1, 4]);
        let (pos2, s2) =
            (Tensor::from_slice(&[2i64, 0, 3]).view([1, 3]), Tensor::from_slice(&[0.9f32, 0.8, 0.7]).view([1, 3]));
        let (pos3, s3) = (Tensor::from_slice(&[1i64, 2]).view([1, 2]), Tensor::from_slice(&[5f32, 4.]).view([1, 2]));
        let mut ranked = vec![Ranked { rows: vec![10, 30], scores: vec![5., 4.], trace: None }];
        add_traces(&mut ranked, &s1, Some((&pos2, &s2)), Some((&pos3, &s3))).unwrap();
        let want = vec![vec![(9., 0), (0.8, 1), (5., 0)], vec![(6., 3), (0.7, 2), (4., 1)]];
        assert_eq!(ranked[0].trace.as_ref().unwrap(), &want);
        add_traces(&mut ranked, &s1, Some((&pos2, &s2)), None).unwrap();
        assert_eq!(ranked[0].trace.as_ref().unwrap(), &vec![vec![(7., 2), (0.9, 0)], vec![(9., 0), (0.8, 1)]]);
    }

    #[test]
    fn stage_inputs_are_checked() {
        let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(check_inputs("din", None), Ok(false));
        assert_eq!(check_inputs("din", Some(&v(&DIN_INPUTS_V1))), Ok(false));
        assert_eq!(check_inputs("din", Some(&v(&DIN_INPUTS_V2))), Ok(true));
        assert_eq!(check_inputs("ranknet", Some(&v(&RANKNET_INPUTS))), Ok(false));
        assert_eq!(check_inputs("lightgcn", Some(&v(&LIGHTGCN_INPUTS))), Ok(false));
        assert!(check_inputs("din", Some(&v(&["history", "mask", "cands", "s2"]))).is_err());
        assert!(check_inputs("ranknet", Some(&v(&DIN_INPUTS_V2))).is_err());
        assert!(check_inputs("lightgcn", Some(&v(&["history"]))).is_err());
    }
}
