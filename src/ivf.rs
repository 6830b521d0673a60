//! Approximate candidate search for LightGCN (stage 1) on large catalogs: an inverted-file (IVF)
//! index over the item vectors, on the model's device (CPU or CUDA).
//!
//! Built when a model set loads, from the LightGCN export's `item_table()`: k-means of the item
//! vectors into `lists` lists (deterministic: no random draw, so every replica builds the same
//! index) and the items stored list after list. A search scores the centroids against the user
//! vector, scans the best `probes` lists (more when they hold fewer items than the candidates
//! asked for plus the excluded ones), and keeps the best-scored items there. On the CPU the scan
//! reads one-byte codes of the vectors in a loop of its own and scores its best items again on
//! the vectors themselves; on other devices it runs in tensor ops. The index belongs to its model
//! set and is swapped with it on reload.

use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind, TchError, Tensor};

use crate::models::{cpu_f32, host_i64, select_top};

/// The CPU scan re-scores this many times the candidates it needs on the full vectors.
const RESCORE: usize = 2;
/// Items per tile of the CPU scan's codes.
const TILE: usize = 64;
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
    vectors: Tensor,
    /// On the CPU, the scan's copy of the vectors (empty elsewhere): one-byte codes, component `k`
    /// of an item of list `j` standing for `low[j * D + k] + step[j * D + k] * code`, each list
    /// in tiles of `TILE` items, each tile a contiguous [D, TILE] block (the last one padded), list
    /// `j`'s tiles from byte `code_at[j]`. A quarter of the bytes of the vectors, which is what
    /// the scan is bound by, read in order; the best items it finds are then scored on the vectors.
    codes: Arc<[u8]>,
    code_at: Arc<[usize]>,
    low: Arc<[f32]>,
    step: Arc<[f32]>,
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
        let sorted = items.f_index_select(0, &order)?.f_contiguous()?;
        let dim = items.size()[1] as usize;
        let codes = if device == Device::Cpu { quantize(cpu_f32(&sorted)?, &offsets, dim) } else { Codes::default() };
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
            vectors: sorted,
            codes: codes.codes.into(),
            code_at: codes.at.into(),
            low: codes.low.into(),
            step: codes.step.into(),
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
            vectors: self.vectors.shallow_clone(),
            codes: Arc::clone(&self.codes),
            code_at: Arc::clone(&self.code_at),
            low: Arc::clone(&self.low),
            step: Arc::clone(&self.step),
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
                    let (list, start) = self.list_at(mine, pos);
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

    /// On the CPU: each scanned list scored on its codes for each profile scanning it
    /// (`score_codes`; a list several profiles scan is then read from cache), each profile's best
    /// `RESCORE` x (c + |exclude|) positions by those scores (`select_top`), and those scored
    /// again on the vectors, of which the best c + |exclude| are kept. No tensor op per list: at
    /// 1M items a batch scans hundreds of lists, and libtorch's per-op cost was most of the stage.
    fn best_on_cpu(&self, users: &Tensor, scan: &Scan) -> Result<Vec<Vec<(usize, f32)>>, TchError> {
        let users = users.f_contiguous()?;
        let (u, vectors, d) = (cpu_f32(&users)?, cpu_f32(&self.vectors)?, self.dim);
        let mut approx: Vec<Vec<f32>> = scan.probed.iter().map(|mine| vec![0f32; self.scanned(mine)]).collect();
        let mut weights = vec![0f32; d];
        for (list, who) in scan.scanners.iter().enumerate().filter(|(_, who)| !who.is_empty()) {
            let (from, to) = (self.offsets[list], self.offsets[list + 1]);
            let codes = self.codes.get(self.code_at[list]..self.code_at[list] + tiles(to - from) * TILE * d);
            let codes = codes.ok_or_else(short)?;
            let (low, step) = (&self.low[list * d..(list + 1) * d], &self.step[list * d..(list + 1) * d]);
            for &(profile, start) in who {
                let user = u.get(profile * d..(profile + 1) * d).ok_or_else(short)?;
                let mut bias = 0f32;
                for k in 0..d {
                    weights[k] = user[k] * step[k];
                    bias += user[k] * low[k];
                }
                score_codes(&weights, bias, codes, &mut approx[profile][start..start + to - from]);
            }
        }
        let mut best = Vec::with_capacity(approx.len());
        for (i, approx) in approx.iter().enumerate() {
            let need = (scan.c + scan.excludes[i].len()).min(approx.len());
            let user = &u[i * d..(i + 1) * d];
            let mine = &scan.probed[i];
            let shortlist = select_top(approx, &[], (RESCORE * need).min(approx.len()));
            let exact: Vec<f32> = shortlist
                .iter()
                .map(|&(pos, _)| {
                    let (list, start) = self.list_at(mine, pos);
                    let at = self.offsets[list] + pos - start;
                    dot(&vectors[at * d..(at + 1) * d], user)
                })
                .collect();
            best.push(select_top(&exact, &[], need).into_iter().map(|(j, score)| (shortlist[j].0, score)).collect());
        }
        Ok(best)
    }

    /// The (list, start) of the profile's scanned lists `mine` holding position `pos` of its scores.
    fn list_at(&self, mine: &[(usize, usize)], pos: usize) -> (usize, usize) {
        mine[mine.partition_point(|&(_, start)| start <= pos) - 1]
    }

    /// On another device: one product per scanned list with the vectors of the profiles scanning
    /// it, each profile's scores concatenated and `topk` there.
    fn best_on_device(&self, users: &Tensor, scan: &Scan) -> Result<Vec<Vec<(usize, f32)>>, TchError> {
        let mut blocks: Vec<Option<Tensor>> = (0..self.lists()).map(|_| None).collect();
        for (list, who) in scan.scanners.iter().enumerate().filter(|(_, who)| !who.is_empty()) {
            let who: Vec<i64> = who.iter().map(|&(profile, _)| profile as i64).collect();
            let vectors = users.f_index_select(0, &Tensor::f_from_slice(&who)?.f_to_device(self.device)?)?;
            let (from, to) = (self.offsets[list] as i64, self.offsets[list + 1] as i64);
            let items = self.vectors.f_narrow(0, from, to - from)?;
            blocks[list] = Some(vectors.f_mm(&items.f_tr()?)?);
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

/// `out[j]` = `bias` + the dot product of `weights` [D] with the codes of item `j`, for the items
/// of one list in tiles (see `IvfIndex::codes`): a tile's `TILE` sums stay in registers while its
/// D rows are read in order. Compiled for AVX-512 and AVX2 as well and picked at run time
/// (multiversion).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw", "x86_64+avx2+fma", "aarch64+neon"))]
fn score_codes(weights: &[f32], bias: f32, codes: &[u8], out: &mut [f32]) {
    let d = weights.len();
    for (out, tile) in out.chunks_mut(TILE).zip(codes.chunks_exact(TILE * d)) {
        let mut acc = [bias; TILE];
        for (&w, row) in weights.iter().zip(tile.chunks_exact(TILE)) {
            for (a, &q) in acc.iter_mut().zip(row) {
                *a += w * f32::from(q);
            }
        }
        out.copy_from_slice(&acc[..out.len()]);
    }
}

/// Tiles of `TILE` items that `n` items take.
fn tiles(n: usize) -> usize {
    n.div_ceil(TILE)
}

/// The dot product of two vectors of one length, in eight lanes.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The one-byte codes of the index (see `IvfIndex::codes`).
#[derive(Default)]
struct Codes {
    codes: Vec<u8>,
    at: Vec<usize>,
    low: Vec<f32>,
    step: Vec<f32>,
}

/// Codes for the [N, D] rows of `sorted` (list after list, list `j` at rows `offsets[j]..offsets[j +
/// 1]`): per list and component, 256 levels evenly between the smallest and the largest value,
/// laid out in tiles (see `IvfIndex::codes`).
fn quantize(sorted: &[f32], offsets: &[usize], d: usize) -> Codes {
    let mut out = Codes::default();
    for bounds in offsets.windows(2) {
        let rows = &sorted[bounds[0] * d..bounds[1] * d];
        let (mut low, mut step) = (Vec::with_capacity(d), Vec::with_capacity(d));
        for k in 0..d {
            let column = rows.chunks_exact(d).map(|row| row[k]);
            let (l, h) = column.fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), x| (l.min(x), h.max(x)));
            low.push(if l.is_finite() { l } else { 0.0 });
            step.push(if h > l { (h - l) / 255.0 } else { 0.0 });
        }
        out.at.push(out.codes.len());
        for tile in rows.chunks(TILE * d) {
            for k in 0..d {
                let codes = tile.chunks_exact(d).map(|row| {
                    if step[k] > 0.0 {
                        ((row[k] - low[k]) / step[k]).round().clamp(0.0, 255.0) as u8
                    } else {
                        0
                    }
                });
                let filled = out.codes.len();
                out.codes.extend(codes);
                out.codes.resize(filled + TILE, 0);
            }
        }
        out.low.extend(low);
        out.step.extend(step);
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
    fn the_cpu_scan_on_codes_keeps_the_exact_top_candidates_of_a_large_list() {
        // 20 lists of about 1,000 items and 20 candidates: the codes pick 40, the vectors the 20
        tch::manual_seed(5);
        let table = Tensor::randn([16, 20_000], (Kind::Float, Device::Cpu));
        let spec = SearchSpec { mode: CandidateSearch::Ivf, min_items: 0, lists: 20, probes: 20 };
        let index = IvfIndex::build(&table, &spec).unwrap();
        let users = Tensor::randn([5, 16], (Kind::Float, Device::Cpu));
        let excludes: [&[i64]; 5] = [&[], &[], &[], &[], &[]];
        let (scores, rows) = lists_of(&index.search(&users, &excludes, 20).unwrap());
        let exact: Vec<f32> = Vec::try_from(users.mm(&table).flatten(0, -1)).unwrap();
        let mut kept = 0;
        for i in 0..5 {
            let want: Vec<i64> =
                select_top(&exact[i * 20_000..(i + 1) * 20_000], &[], 20).iter().map(|&(r, _)| r as i64).collect();
            kept += rows[i * 20..(i + 1) * 20].iter().filter(|r| want.contains(r)).count();
            for (row, score) in rows[i * 20..(i + 1) * 20].iter().zip(&scores[i * 20..(i + 1) * 20]) {
                assert!((exact[i * 20_000 + *row as usize] - score).abs() < 1e-4, "scores are the vectors' own");
            }
        }
        assert!(kept >= 97, "{kept} of the exact 100");
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
