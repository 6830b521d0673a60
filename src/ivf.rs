//! Approximate candidate search for LightGCN (stage 1) on large catalogs: an inverted-file (IVF)
//! index over the item vectors, in tensor ops, so it runs on the model's device (CPU or CUDA).
//!
//! Built when a model set loads, from the LightGCN export's `item_table()`: k-means of the item
//! vectors into `lists` lists (deterministic: no random draw, so every replica builds the same
//! index) and the items stored list after list. A search scores the centroids
//! against the user vector, scans the best `probes` lists (more when they hold fewer items than
//! the candidates asked for plus the excluded ones), and keeps the best-scored items there. The
//! index belongs to its model set and is swapped with it on reload.

use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind, TchError, Tensor};

use crate::models::{cpu_f32, select_top};

/// Items sampled per list to train the centroids.
const SAMPLE_PER_LIST: usize = 64;
const KMEANS_ITERATIONS: usize = 10;
/// Rows per chunk of the assignment (bounds the [chunk, lists] score matrix).
const ASSIGN_CHUNK: i64 = 16_384;

/// How stage 1 finds its candidates (CANDIDATE_SEARCH).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CandidateSearch {
    /// `ivf` for catalogs of at least IVF_MIN_ITEMS items, `exact` below.
    Auto,
    /// LightGCN scores every item.
    Exact,
    /// The IVF index.
    Ivf,
}

/// The candidate-search settings a model set is loaded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchSpec {
    pub mode: CandidateSearch,
    /// With `auto`, the smallest catalog searched through the index.
    pub min_items: usize,
    /// Lists of the index (0: about the square root of the catalog size).
    pub lists: usize,
    /// Lists probed per search.
    pub probes: usize,
}

impl SearchSpec {
    /// Whether a catalog of `items` items is searched through the index.
    pub fn uses_index(&self, items: usize) -> bool {
        match self.mode {
            CandidateSearch::Exact => false,
            CandidateSearch::Ivf => true,
            CandidateSearch::Auto => items >= self.min_items,
        }
    }
}

pub struct IvfIndex {
    /// [lists, D] on the device.
    centroids: Tensor,
    /// [N, D] item vectors, list after list, on the device.
    items: Tensor,
    /// Position in `items` -> catalog row (shared by the copies of the set).
    rows: Arc<[i64]>,
    /// List `j` is `items[offsets[j]..offsets[j + 1]]`.
    offsets: Arc<[usize]>,
    probes: usize,
    device: Device,
}

impl IvfIndex {
    /// Builds the index over `table` ([D, N] item vectors, as LightGCN's `item_table()` returns).
    pub fn build(table: &Tensor, spec: &SearchSpec) -> Result<Self, TchError> {
        let _guard = tch::no_grad_guard();
        let started = Instant::now();
        let device = table.device();
        let items = table.f_tr()?.f_contiguous()?.f_to_kind(Kind::Float)?; // [N, D]
        let n = items.size()[0] as usize;
        let lists = if spec.lists == 0 { ((n as f64).sqrt().round() as usize).max(1) } else { spec.lists }.min(n);
        // a strided sample (deterministic), and strided initial centroids from it
        let sample_rows = strided(n, (lists * SAMPLE_PER_LIST).min(n), device)?;
        let sample = items.f_index_select(0, &sample_rows)?;
        let init = strided(sample.size()[0] as usize, lists, device)?;
        let mut centroids = sample.f_index_select(0, &init)?;
        for _ in 0..KMEANS_ITERATIONS {
            let assign = assign(&sample, &centroids)?;
            let counts = assign.f_bincount::<Tensor>(None, lists as i64)?.f_to_kind(Kind::Float)?;
            let sums = centroids.f_zeros_like()?.f_index_add(0, &assign, &sample)?;
            let filled = counts.f_gt(0.0)?.f_unsqueeze(1)?;
            let means = sums.f_div(&counts.f_clamp_min(1.0)?.f_unsqueeze(1)?)?;
            centroids = means.f_where_self(&filled, &centroids)?;
        }
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n as i64 {
            let len = ASSIGN_CHUNK.min(n as i64 - start);
            parts.push(assign(&items.f_narrow(0, start, len)?, &centroids)?);
            start += len;
        }
        let assignment = Tensor::f_cat(&parts, 0)?;
        let (_, order) = assignment.f_sort(0, false)?; // stable on CPU and CUDA for equal keys
        let order = order.f_contiguous()?;
        let counts = host_i64(&assignment.f_bincount::<Tensor>(None, lists as i64)?)?;
        let mut offsets = Vec::with_capacity(lists + 1);
        offsets.push(0usize);
        for c in &counts {
            offsets.push(offsets.last().copied().unwrap_or(0) + *c as usize);
        }
        let sorted = items.f_index_select(0, &order)?.f_contiguous()?;
        let rows = host_i64(&order)?;
        let largest = counts.iter().copied().max().unwrap_or(0);
        tracing::info!(
            items = n,
            lists,
            probes = spec.probes,
            largest_list = largest,
            ms = started.elapsed().as_millis() as u64,
            "IVF candidate index built"
        );
        Ok(Self {
            centroids,
            items: sorted,
            rows: rows.into(),
            offsets: offsets.into(),
            probes: spec.probes.clamp(1, lists),
            device,
        })
    }

    /// Another handle on the same tensors (one per worker's copy of the models).
    pub fn shallow_clone(&self) -> Self {
        Self {
            centroids: self.centroids.shallow_clone(),
            items: self.items.shallow_clone(),
            rows: Arc::clone(&self.rows),
            offsets: Arc::clone(&self.offsets),
            probes: self.probes,
            device: self.device,
        }
    }

    pub fn lists(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn probes(&self) -> usize {
        self.probes
    }

    /// The `c` best-scored rows for each user vector (`users` [B, D]) among the probed lists, the
    /// rows in its `exclude` left out, best first: ([B, c] scores, [B, c] rows) on the device.
    /// Lists are probed in the order of their centroid's score, at least `probes` of them and
    /// until they hold `c` items besides the excluded ones. A list several profiles of the batch
    /// scan is read once for all of them.
    pub fn search(&self, users: &Tensor, excludes: &[&[i64]], c: usize) -> Result<(Tensor, Tensor), TchError> {
        let b = excludes.len();
        let lists = self.lists();
        let by_list = users.f_mm(&self.centroids.f_tr()?)?; // [B, lists]
        let (_, ranked) = by_list.f_sort(1, true)?;
        let ranked = host_i64(&ranked)?;
        // the lists each profile scans, and the profiles scanning each list
        let mut probed: Vec<Vec<usize>> = Vec::with_capacity(b);
        let mut scanners: Vec<Vec<usize>> = vec![Vec::new(); lists];
        for (i, exclude) in excludes.iter().enumerate() {
            let need = c + exclude.len();
            let (mut mine, mut items) = (Vec::new(), 0);
            for (n, &list) in ranked[i * lists..(i + 1) * lists].iter().enumerate() {
                if n >= self.probes && items >= need {
                    break;
                }
                let list = list as usize;
                let size = self.offsets[list + 1] - self.offsets[list];
                if size > 0 {
                    mine.push(list);
                    scanners[list].push(i);
                    items += size;
                }
            }
            probed.push(mine);
        }
        // each scanned list read once per batch: one product with the vectors of every profile
        // scanning it, [profiles, items of the list]
        let mut blocks: Vec<Option<Tensor>> = (0..lists).map(|_| None).collect();
        for (list, who) in scanners.iter().enumerate().filter(|(_, who)| !who.is_empty()) {
            let vectors = if who.len() == 1 {
                users.f_narrow(0, who[0] as i64, 1)?
            } else {
                let who: Vec<i64> = who.iter().map(|&i| i as i64).collect();
                users.f_index_select(0, &Tensor::f_from_slice(&who)?.f_to_device(self.device)?)?
            };
            let (from, to) = (self.offsets[list], self.offsets[list + 1]);
            let items = self.items.f_narrow(0, from as i64, (to - from) as i64)?;
            blocks[list] = Some(vectors.f_mm(&items.f_tr()?)?);
        }
        let mut best_scores = Vec::with_capacity(b * c);
        let mut best_rows = Vec::with_capacity(b * c);
        for (i, exclude) in excludes.iter().enumerate() {
            let mut scores = Vec::with_capacity(probed[i].len());
            let mut rows: Vec<i64> = Vec::new();
            for &list in &probed[i] {
                let at = scanners[list].iter().position(|&u| u == i).unwrap_or_default();
                let block =
                    blocks[list].as_ref().ok_or_else(|| TchError::Shape("an IVF list was not scored".into()))?;
                scores.push(block.f_get(at as i64)?);
                rows.extend_from_slice(&self.rows[self.offsets[list]..self.offsets[list + 1]]);
            }
            let scores = Tensor::f_cat(&scores, 0)?;
            let need = c + exclude.len();
            let top = self.top(&scores, need.min(rows.len()))?;
            let mut sorted_exclude = exclude.to_vec();
            sorted_exclude.sort_unstable();
            let kept = top
                .into_iter()
                .map(|(pos, score)| (rows[pos], score))
                .filter(|(row, _)| sorted_exclude.binary_search(row).is_err())
                .take(c);
            let before = best_rows.len();
            for (row, score) in kept {
                best_rows.push(row);
                best_scores.push(score);
            }
            if best_rows.len() - before != c {
                return Err(TchError::Shape(format!(
                    "IVF search found {} of {c} candidates for a profile",
                    best_rows.len() - before
                )));
            }
        }
        let shape = [b as i64, c as i64];
        Ok((
            Tensor::f_from_slice(&best_scores)?.f_view(shape)?.f_to_device(self.device)?,
            Tensor::f_from_slice(&best_rows)?.f_view(shape)?.f_to_device(self.device)?,
        ))
    }

    /// The `k` best (position, score) of one user's scanned scores, best first.
    fn top(&self, scores: &Tensor, k: usize) -> Result<Vec<(usize, f32)>, TchError> {
        if self.device == Device::Cpu {
            let scores = scores.f_contiguous()?;
            return Ok(select_top(cpu_f32(&scores)?, &[], k));
        }
        let (values, positions) = scores.f_topk(k as i64, 0, true, true)?;
        let values: Vec<f32> = Vec::<f32>::try_from(values.f_to_device(Device::Cpu)?)?;
        let positions = host_i64(&positions)?;
        Ok(positions.into_iter().map(|p| p as usize).zip(values).collect())
    }
}

/// Items assigned to their nearest centroid (Euclidean: the largest 2 x.c - |c|^2), [rows] int64.
fn assign(items: &Tensor, centroids: &Tensor) -> Result<Tensor, TchError> {
    let norms = centroids.f_square()?.f_sum_dim_intlist(1, false, Kind::Float)?;
    items.f_mm(&centroids.f_tr()?)?.f_mul_scalar(2.0)?.f_sub(&norms)?.f_argmax(1, false)
}

/// `k` row indices spread evenly over `0..n`.
fn strided(n: usize, k: usize, device: Device) -> Result<Tensor, TchError> {
    let rows: Vec<i64> = (0..k).map(|i| (i * n / k.max(1)) as i64).collect();
    Tensor::f_from_slice(&rows)?.f_to_device(device)
}

fn host_i64(t: &Tensor) -> Result<Vec<i64>, TchError> {
    Vec::<i64>::try_from(t.f_to_device(Device::Cpu)?.f_contiguous()?.f_view(-1)?)
}
