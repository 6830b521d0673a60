//! Approximate candidate search for LightGCN (stage 1) on large catalogs: an inverted-file (IVF)
//! index over the item vectors, on the model's device (CPU or CUDA).
//!
//! Built when a model set loads, from the LightGCN export's `item_table()`: k-means of the item
//! vectors into `lists` lists (deterministic: no random draw, so every replica builds the same
//! index) and the items stored list after list, each list dimension-major. A search scores the
//! centroids against the user vector, scans the best `probes` lists (more when they hold fewer
//! items than the candidates asked for plus the excluded ones), and keeps the best-scored items
//! there: on the CPU in a loop of its own over the index's memory, elsewhere in tensor ops. The
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
    /// The item vectors list after list, each list `j` a [D, size_j] block (dimension-major, so
    /// scoring it is D passes over contiguous memory), flattened, on the device.
    blocks: Tensor,
    dim: usize,
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
        let sorted = items.f_index_select(0, &order)?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let dim = items.size()[1] as usize;
        let blocks = Tensor::f_from_slice(&dimension_major(cpu_f32(&sorted)?, &offsets, dim))?.f_to_device(device)?;
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
            blocks,
            dim,
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
            blocks: self.blocks.shallow_clone(),
            dim: self.dim,
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
        self.search_with(users, excludes, c, self.device == Device::Cpu)
    }

    /// `search`, scoring the lists in the CPU's own loop (`on_cpu`) or by tensor ops.
    fn search_with(
        &self,
        users: &Tensor,
        excludes: &[&[i64]],
        c: usize,
        on_cpu: bool,
    ) -> Result<(Tensor, Tensor), TchError> {
        let b = excludes.len();
        let lists = self.lists();
        let by_list = users.f_mm(&self.centroids.f_tr()?)?; // [B, lists]
        let (_, ranked) = by_list.f_sort(1, true)?;
        let ranked = host_i64(&ranked)?;
        // each profile's scanned lists, as (list, where its scores start among the profile's), and
        // each list's scanners, as (profile, the same start)
        let mut probed: Vec<Vec<(usize, usize)>> = Vec::with_capacity(b);
        let mut scanners: Vec<Vec<(usize, usize)>> = vec![Vec::new(); lists];
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
                    mine.push((list, items));
                    scanners[list].push((i, items));
                    items += size;
                }
            }
            probed.push(mine);
        }
        let scan = Scan { probed: &probed, scanners: &scanners, excludes, c };
        let best = if on_cpu { self.best_on_cpu(users, &scan)? } else { self.best_on_device(users, &scan)? };
        let mut best_scores = Vec::with_capacity(b * c);
        let mut best_rows = Vec::with_capacity(b * c);
        for (i, exclude) in excludes.iter().enumerate() {
            let mut sorted_exclude = exclude.to_vec();
            sorted_exclude.sort_unstable();
            let mine = &probed[i];
            let kept = best[i]
                .iter()
                .map(|&(pos, score)| {
                    // the list holding position `pos` of the profile's scores, and the row there
                    let (list, start) = mine[mine.partition_point(|&(_, start)| start <= pos) - 1];
                    (self.rows[self.offsets[list] + pos - start], score)
                })
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

    /// On the CPU: each scanned list scored for each profile scanning it by `score_block` on the
    /// index's memory (a list several profiles scan is then read from cache), then each profile's
    /// best `c + |exclude|` positions (`select_top`). No tensor op per list: at 1M items and 32
    /// probes a batch scans hundreds of lists, and libtorch's per-op cost was most of the stage.
    fn best_on_cpu(&self, users: &Tensor, scan: &Scan) -> Result<Vec<Vec<(usize, f32)>>, TchError> {
        let users = users.f_contiguous()?;
        let (u, blocks, d) = (cpu_f32(&users)?, cpu_f32(&self.blocks)?, self.dim);
        let mut scores: Vec<Vec<f32>> = scan.probed.iter().map(|mine| vec![0f32; self.scanned(mine)]).collect();
        for (list, who) in scan.scanners.iter().enumerate().filter(|(_, who)| !who.is_empty()) {
            let (from, to) = (self.offsets[list], self.offsets[list + 1]);
            let block = blocks.get(from * d..to * d).ok_or_else(short)?;
            for &(profile, start) in who {
                let user = u.get(profile * d..(profile + 1) * d).ok_or_else(short)?;
                score_block(user, block, &mut scores[profile][start..start + to - from]);
            }
        }
        Ok(scores
            .iter()
            .zip(scan.excludes)
            .map(|(s, exclude)| select_top(s, &[], (scan.c + exclude.len()).min(s.len())))
            .collect())
    }

    /// On another device: one product per scanned list with the vectors of the profiles scanning
    /// it, each profile's scores concatenated and `topk` there.
    fn best_on_device(&self, users: &Tensor, scan: &Scan) -> Result<Vec<Vec<(usize, f32)>>, TchError> {
        let mut blocks: Vec<Option<Tensor>> = (0..self.lists()).map(|_| None).collect();
        for (list, who) in scan.scanners.iter().enumerate().filter(|(_, who)| !who.is_empty()) {
            let who: Vec<i64> = who.iter().map(|&(profile, _)| profile as i64).collect();
            let vectors = users.f_index_select(0, &Tensor::f_from_slice(&who)?.f_to_device(self.device)?)?;
            let (from, to) = (self.offsets[list] as i64, self.offsets[list + 1] as i64);
            let d = self.dim as i64;
            let block = self.blocks.f_narrow(0, from * d, (to - from) * d)?.f_view([d, to - from])?;
            blocks[list] = Some(vectors.f_mm(&block)?);
        }
        let mut best = Vec::with_capacity(scan.probed.len());
        for (i, mine) in scan.probed.iter().enumerate() {
            let mut scores = Vec::with_capacity(mine.len());
            for &(list, _) in mine {
                let at = scan.scanners[list].iter().position(|&(profile, _)| profile == i).unwrap_or_default();
                let block =
                    blocks[list].as_ref().ok_or_else(|| TchError::Shape("an IVF list was not scored".into()))?;
                scores.push(block.f_get(at as i64)?);
            }
            let scores = Tensor::f_cat(&scores, 0)?;
            let k = (scan.c + scan.excludes[i].len()).min(self.scanned(mine)) as i64;
            let (values, positions) = scores.f_topk(k, 0, true, true)?;
            let values = Vec::<f32>::try_from(values.f_to_device(Device::Cpu)?)?;
            best.push(host_i64(&positions)?.into_iter().map(|p| p as usize).zip(values).collect());
        }
        Ok(best)
    }

    /// Items in the lists `mine` (list, start) of one profile.
    fn scanned(&self, mine: &[(usize, usize)]) -> usize {
        mine.last().map_or(0, |&(list, start)| start + self.offsets[list + 1] - self.offsets[list])
    }
}

/// One batch's plan: each profile's scanned lists and each list's scanners (see `search`).
struct Scan<'a> {
    probed: &'a [Vec<(usize, usize)>],
    scanners: &'a [Vec<(usize, usize)>],
    excludes: &'a [&'a [i64]],
    c: usize,
}

fn short() -> TchError {
    TchError::Shape("an IVF list lies outside the index's tensors".into())
}

/// `out[j]` = the dot product of `user` [D] with column `j` of `block` ([D, n], row-major, n =
/// `out.len()`): D passes of `out += user[k] * block[k]` over contiguous rows, which the compiler
/// vectorises (no reduction across lanes), compiled for AVX-512 and AVX2 as well and picked at run
/// time (multiversion).
#[multiversion::multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma", "aarch64+neon"))]
fn score_block(user: &[f32], block: &[f32], out: &mut [f32]) {
    let n = out.len();
    out.fill(0.0);
    for (&w, row) in user.iter().zip(block.chunks_exact(n.max(1))) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o += w * x;
        }
    }
}

/// The [N, D] rows of `sorted` (list after list, list `j` at rows `offsets[j]..offsets[j + 1]`)
/// with each list's rows transposed to a [D, size] block, flattened.
fn dimension_major(sorted: &[f32], offsets: &[usize], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(sorted.len());
    for bounds in offsets.windows(2) {
        let rows = &sorted[bounds[0] * d..bounds[1] * d];
        for k in 0..d {
            out.extend(rows.chunks_exact(d).map(|row| row[k]));
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn index(n: i64, lists: usize, probes: usize) -> (Tensor, IvfIndex) {
        tch::manual_seed(3);
        let table = Tensor::randn([8, n], (Kind::Float, Device::Cpu));
        let spec = SearchSpec { mode: CandidateSearch::Ivf, min_items: 0, lists, probes };
        let index = IvfIndex::build(&table, &spec).unwrap();
        (table, index)
    }

    fn lists_of(t: &(Tensor, Tensor)) -> (Vec<f32>, Vec<i64>) {
        (Vec::try_from(t.0.flatten(0, -1)).unwrap(), Vec::try_from(t.1.flatten(0, -1)).unwrap())
    }

    #[test]
    fn the_cpu_loop_and_the_tensor_ops_find_the_same_candidates() {
        let (_, index) = index(2_000, 20, 4);
        let users = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
        let excludes: Vec<Vec<i64>> = (0..5).map(|i| (0..2_000).filter(|r| r % (i + 3) == 1).collect()).collect();
        let excludes: Vec<&[i64]> = excludes.iter().map(|e| e.as_slice()).collect();
        let (cpu_scores, cpu_rows) = lists_of(&index.search_with(&users, &excludes, 30, true).unwrap());
        let (ops_scores, ops_rows) = lists_of(&index.search_with(&users, &excludes, 30, false).unwrap());
        assert_eq!(cpu_rows, ops_rows);
        assert!(cpu_scores.iter().zip(&ops_scores).all(|(a, b)| (a - b).abs() < 1e-4), "{cpu_scores:?} {ops_scores:?}");
        assert!(excludes.iter().zip(cpu_rows.chunks(30)).all(|(ex, rows)| rows.iter().all(|r| !ex.contains(r))));
    }

    #[test]
    fn probing_every_list_gives_the_exact_top_candidates() {
        let (table, index) = index(1_000, 16, 16);
        let users = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        let excludes: [&[i64]; 3] = [&[0, 5, 9], &[], &[999]];
        let (scores, rows) = lists_of(&index.search(&users, &excludes, 50).unwrap());
        let exact: Vec<f32> = Vec::try_from(users.mm(&table).flatten(0, -1)).unwrap();
        for (i, exclude) in excludes.iter().enumerate() {
            let want: Vec<(usize, f32)> = select_top(&exact[i * 1_000..(i + 1) * 1_000], exclude, 50);
            let got = &rows[i * 50..(i + 1) * 50];
            assert_eq!(got, want.iter().map(|&(r, _)| r as i64).collect::<Vec<_>>().as_slice(), "profile {i}");
            let close = scores[i * 50..(i + 1) * 50].iter().zip(&want).all(|(a, (_, b))| (a - b).abs() < 1e-4);
            assert!(close, "profile {i}");
        }
    }
}
