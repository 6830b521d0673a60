//! Approximate candidate search for LightGCN (stage 1) on large catalogs: an inverted-file (IVF)
//! index over the item vectors, on the model's device (CPU or CUDA).
//!
//! Built when a model set loads, from the LightGCN export's `item_table()`: spherical k-means of
//! the item vectors into `lists` lists (deterministic: no random draw, so every replica builds the
//! same index) and the items stored list after list. A search scores the centroids against the user
//! vector, scans the best `probes` lists (more when they hold fewer items than the candidates
//! asked for plus the excluded ones), and keeps the best-scored items there. On the CPU the scan
//! sums one-byte codes of the vectors against one-byte weights in a loop of its own (AVX-512 VNNI
//! where the CPU has it) and scores its best items again on the vectors themselves; on other
//! devices it runs in tensor ops. The index belongs to its model set and is swapped with it on
//! reload.

use std::cmp::Ordering;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind, TchError, Tensor};

use crate::inference::exclusion::Excluded;
use crate::inference::topk::{cpu_f32, host_i64, select_top};

/// The CPU scan re-scores this many times the candidates it needs on the full vectors.
const RESCORE: usize = 2;
/// Items per tile of the CPU scan's codes.
const TILE: usize = 64;
/// Lists of the index by default: this many times the square root of the catalog size. More,
/// smaller lists find more of the exact candidates per scanned item (measured at 1M items: 4
/// times the root needs about half the items of 1 time the root for 95% of the exact top 200).
const LISTS_PER_ROOT: f64 = 4.0;
/// Lists probed by default: one in this many.
const PROBED_SHARE: usize = 8;
/// Items sampled per list to train the centroids.
const SAMPLE_PER_LIST: usize = 32;
const KMEANS_ITERATIONS: usize = 10;
/// Elements of the [rows, lists] score matrix of one chunk of the assignment (4 MiB).
const ASSIGN_ELEMENTS: i64 = 1 << 20;

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
    /// in tiles of `TILE` items, list `j`'s tiles from byte `code_at[j]`. A tile holds the
    /// components in groups of 4 (D padded with zero codes, `padded`): group after group, each
    /// `TILE` x 4 bytes, an item's 4 codes side by side (the operand layout of a VNNI dot product).
    /// A quarter of the bytes of the vectors, which is what the scan is bound by, read in order;
    /// the best items it finds are then scored on the vectors.
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
        let lists =
            if spec.lists == 0 { ((LISTS_PER_ROOT * (n as f64).sqrt()).round() as usize).max(1) } else { spec.lists };
        let lists = lists.min(n.max(1));
        // spherical k-means on a strided sample (deterministic), from strided initial centroids
        let sample_rows = strided(n, (lists * SAMPLE_PER_LIST).min(n), device)?;
        let sample = items.f_index_select(0, &sample_rows)?;
        let init = strided(sample.size()[0] as usize, lists, device)?;
        let mut centroids = unit_rows(&sample.f_index_select(0, &init)?)?;
        for _ in 0..KMEANS_ITERATIONS {
            let assign = assign(&sample, &centroids)?;
            let sums = centroids.f_zeros_like()?.f_index_add(0, &assign, &sample)?;
            let filled = sums.f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?.f_gt(0.0)?;
            centroids = unit_rows(&sums)?.f_where_self(&filled, &centroids)?;
        }
        let assignment = assign(&items, &centroids)?;
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
        let probes = if spec.probes == 0 { lists.div_ceil(PROBED_SHARE) } else { spec.probes.min(lists) };
        let largest = counts.iter().copied().max().unwrap_or(0);
        tracing::info!(
            items = n,
            lists,
            probes,
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
            probes,
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
    /// The `probes` lists of the best centroid scores are probed, and more, best first, while they
    /// hold fewer than `c` items besides the excluded ones. A list several profiles of the batch
    /// scan is read once for all of them.
    pub fn search(&self, users: &Tensor, excludes: &[Excluded<'_>], c: usize) -> Result<(Tensor, Tensor), TchError> {
        self.search_with(users, excludes, c, self.device == Device::Cpu)
    }

    /// `search`, scoring the lists in the CPU's own loop (`on_cpu`) or by tensor ops.
    fn search_with(
        &self,
        users: &Tensor,
        excludes: &[Excluded<'_>],
        c: usize,
        on_cpu: bool,
    ) -> Result<(Tensor, Tensor), TchError> {
        let b = excludes.len();
        let lists = self.lists();
        let by_list = users.f_mm(&self.centroids.f_tr()?)?.f_to_device(Device::Cpu)?.f_contiguous()?; // [B, lists]
        let by_list = cpu_f32(&by_list)?;
        // each profile's scanned lists, as (list, where its items start among the profile's), and
        // each list's scanners, as (profile, the same start)
        let mut probed: Vec<Vec<(usize, usize)>> = Vec::with_capacity(b);
        let mut scanners: Vec<Vec<(usize, usize)>> = vec![Vec::new(); lists];
        for (i, exclude) in excludes.iter().enumerate() {
            let need = c + exclude.len();
            let (mut mine, mut items) = (Vec::new(), 0);
            let order = probe_order(&by_list[i * lists..(i + 1) * lists], self.probes, |first| {
                first.iter().map(|&list| self.offsets[list + 1] - self.offsets[list]).sum::<usize>() >= need
            });
            for (n, list) in order.into_iter().enumerate() {
                if n >= self.probes && items >= need {
                    break;
                }
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
            let kept = best[i]
                .iter()
                .map(|&(at, score)| (self.rows[at], score))
                .filter(|&(row, _)| !exclude.contains(row))
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
    /// (`score_codes`; a list several profiles scan is then read from cache), keeping each
    /// profile's best `RESCORE` x (c + |exclude|) items by those scores as it goes (`Best`), and
    /// those scored again on the vectors, of which the best c + |exclude| are kept. No tensor op
    /// per list: at 1M items a batch scans hundreds of lists, and libtorch's per-op cost was most
    /// of the stage; no score array per profile either, only the items that could still make it.
    fn best_on_cpu(&self, users: &Tensor, scan: &Scan) -> Result<Vec<Vec<(usize, f32)>>, TchError> {
        let users = users.f_contiguous()?;
        let (u, vectors, d) = (cpu_f32(&users)?, cpu_f32(&self.vectors)?, self.dim);
        let need = |i: usize| scan.c + scan.excludes[i].len();
        let mut found: Vec<Best> = (0..scan.probed.len()).map(|i| Best::new(RESCORE * need(i))).collect();
        let mut weights = vec![0i8; padded(d)];
        for (list, who) in scan.scanners.iter().enumerate().filter(|(_, who)| !who.is_empty()) {
            let (from, to) = (self.offsets[list], self.offsets[list + 1]);
            let codes =
                self.codes.get(self.code_at[list]..self.code_at[list] + tiles(to - from) * TILE * weights.len());
            let codes = codes.ok_or_else(short)?;
            let (low, step) = (&self.low[list * d..(list + 1) * d], &self.step[list * d..(list + 1) * d]);
            for &(profile, _) in who {
                let user = u.get(profile * d..(profile + 1) * d).ok_or_else(short)?;
                let (scale, bias) = query_codes(user, low, step, &mut weights);
                score_codes(&weights, scale, bias, codes, from..to, &mut found[profile]);
            }
        }
        let mut best = Vec::with_capacity(found.len());
        for (i, found) in found.into_iter().enumerate() {
            let user = &u[i * d..(i + 1) * d];
            let shortlist = found.into_best();
            let exact: Vec<f32> = shortlist
                .iter()
                .map(|&(_, at)| vectors.get(at * d..(at + 1) * d).map(|item| dot(item, user)).ok_or_else(short))
                .collect::<Result<_, _>>()?;
            best.push(
                select_top(&exact, Excluded::default(), need(i))
                    .into_iter()
                    .map(|(j, score)| (shortlist[j].1, score))
                    .collect(),
            );
        }
        Ok(best)
    }

    /// On another device: one product per scanned list with the vectors of the profiles scanning
    /// it, each profile's scores concatenated and `topk` there. Like `best_on_cpu`, each profile's
    /// best c + |exclude| items as (position in `vectors`, score), best first.
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
            let at = |pos: i64| {
                let (list, start) = mine[mine.partition_point(|&(_, start)| start <= pos as usize) - 1];
                self.offsets[list] + pos as usize - start
            };
            best.push(host_i64(&positions)?.into_iter().map(at).zip(values).collect());
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
    excludes: &'a [Excluded<'a>],
    c: usize,
}

fn short() -> TchError {
    TchError::Shape("an IVF list lies outside the index's tensors".into())
}

/// The user vector `user` as one-byte weights on list codes with these `low` and `step`:
/// `weights` (D padded) and (scale, bias) such that the item of codes `q` scores about
/// `bias + scale * sum(weights[k] * q[k])`. The weights are `user[k] * step[k]` rounded to 255
/// levels of the largest one (an error of the order of the codes' own, which the re-scoring on
/// the vectors removes from the final scores).
fn query_codes(user: &[f32], low: &[f32], step: &[f32], weights: &mut [i8]) -> (f32, f32) {
    let bias: f32 = user.iter().zip(low).map(|(u, l)| u * l).sum();
    let largest = user.iter().zip(step).fold(0f32, |m, (u, s)| m.max((u * s).abs()));
    let scale = largest / 127.0;
    for (k, w) in weights.iter_mut().enumerate() {
        *w = match (user.get(k), step.get(k)) {
            (Some(u), Some(s)) if scale > 0.0 => ((u * s) / scale).round().clamp(-127.0, 127.0) as i8,
            _ => 0,
        };
    }
    (scale, bias)
}

/// One profile's best items of the scan so far, as (approximate score, position in the index):
/// every item scored above `floor` is taken, and when `4 x keep` are taken the best `keep` stay
/// and the lowest of them becomes the floor. Once the floor has risen few items pass it, so the
/// scan keeps no score per scanned item.
struct Best {
    keep: usize,
    floor: f32,
    found: Vec<(f32, usize)>,
}

impl Best {
    fn new(keep: usize) -> Self {
        let keep = keep.max(1);
        Self { keep, floor: f32::NEG_INFINITY, found: Vec::with_capacity(4 * keep) }
    }

    /// The scores `scores` of the items from position `first` on (one tile), those selected by
    /// the bits of `passed` (bit `j` set when `scores[j]` is above the floor, or not comparable).
    fn take(&mut self, first: usize, scores: &[f32], mut passed: u64) {
        while passed != 0 {
            let j = passed.trailing_zeros() as usize;
            passed &= passed - 1;
            if let Some(&score) = scores.get(j) {
                self.found.push((score, first + j));
            }
        }
        if self.found.len() >= 4 * self.keep {
            self.prune();
        }
    }

    fn prune(&mut self) {
        if self.found.len() > self.keep {
            self.found.select_nth_unstable_by(self.keep - 1, |a, b| b.0.total_cmp(&a.0));
            self.found.truncate(self.keep);
            self.floor = self.found[self.keep - 1].0;
        }
    }

    /// The best `keep` (fewer if the scan had fewer), in no particular order.
    fn into_best(mut self) -> Vec<(f32, usize)> {
        self.prune();
        self.found
    }
}

/// Scores the items `items` (positions in the index) of one list on their codes (see
/// `IvfIndex::codes`) and hands each tile's scores to `best`: `bias` + `scale` x the dot product
/// of `weights` (one byte each, D padded) with an item's codes, summed in integers. With AVX-512
/// VNNI one instruction multiplies and adds 16 items' groups of 4 components
/// (`score_codes_vnni`); elsewhere a portable loop gives the same numbers.
fn score_codes(weights: &[i8], scale: f32, bias: f32, codes: &[u8], items: Range<usize>, best: &mut Best) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { score_codes_vnni(weights, scale, bias, codes, items, best) };
        return;
    }
    score_codes_portable(weights, scale, bias, codes, items, best);
}

#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn score_codes_portable(weights: &[i8], scale: f32, bias: f32, codes: &[u8], items: Range<usize>, best: &mut Best) {
    let d = weights.len();
    let mut sums = [0f32; TILE];
    for (first, tile) in items.clone().step_by(TILE).zip(codes.chunks_exact(TILE * d)) {
        let mut acc = [0i32; TILE];
        for (w, group) in weights.chunks_exact(4).zip(tile.chunks_exact(TILE * 4)) {
            for (a, q) in acc.iter_mut().zip(group.chunks_exact(4)) {
                *a += (0..4).map(|b| i32::from(q[b]) * i32::from(w[b])).sum::<i32>();
            }
        }
        let mut passed = 0u64;
        for (j, (sum, a)) in sums.iter_mut().zip(acc).enumerate() {
            *sum = (a as f32).mul_add(scale, bias);
            let at_most_floor = matches!((*sum).partial_cmp(&best.floor), Some(Ordering::Less | Ordering::Equal));
            passed |= u64::from(!at_most_floor) << j;
        }
        best.take(first, &sums[..TILE.min(items.end - first)], passed);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn score_codes_vnni(weights: &[i8], scale: f32, bias: f32, codes: &[u8], items: Range<usize>, best: &mut Best) {
    use std::arch::x86_64::*;
    const LANES: usize = 16;
    let d = weights.len();
    let (scale, bias) = (_mm512_set1_ps(scale), _mm512_set1_ps(bias));
    let mut sums = [0f32; TILE];
    for (first, tile) in items.clone().step_by(TILE).zip(codes.chunks_exact(TILE * d)) {
        let mut acc = [_mm512_setzero_si512(); TILE / LANES];
        for (w, group) in weights.chunks_exact(4).zip(tile.chunks_exact(TILE * 4)) {
            let w = _mm512_set1_epi32(i32::from_le_bytes([w[0], w[1], w[2], w[3]].map(|b| b as u8)));
            for (a, sixteen) in acc.iter_mut().zip(group.chunks_exact(LANES * 4)) {
                // SAFETY: `sixteen` (16 items' 4 codes) is 64 bytes long.
                let q = unsafe { _mm512_loadu_epi8(sixteen.as_ptr().cast()) };
                *a = _mm512_dpbusd_epi32(*a, q, w);
            }
        }
        let floor = _mm512_set1_ps(best.floor);
        let mut passed = 0u64;
        for (n, (a, s)) in acc.iter().zip(sums.chunks_exact_mut(LANES)).enumerate() {
            let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*a), scale, bias);
            passed |= u64::from(_mm512_cmp_ps_mask::<_CMP_NLE_UQ>(v, floor)) << (n * LANES);
            // SAFETY: `s` is 16 floats long.
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), v) };
        }
        best.take(first, &sums[..TILE.min(items.end - first)], passed);
    }
}

/// Lists in the order a profile probes them, from their centroids' scores `scores`: the best
/// `probes` first, in no particular order; the rest by score, best first, only when `enough`
/// says the first ones do not hold enough items (the probed set needs no sort of the thousands of
/// scores).
fn probe_order(scores: &[f32], probes: usize, enough: impl Fn(&[usize]) -> bool) -> Vec<usize> {
    let by_score = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..scores.len()).collect();
    let probes = probes.min(order.len());
    if probes == 0 || probes == order.len() {
        order.sort_unstable_by(by_score);
        return order;
    }
    order.select_nth_unstable_by(probes - 1, by_score);
    if !enough(&order[..probes]) {
        order[probes..].sort_unstable_by(by_score);
    }
    order
}

/// D rounded up to whole groups of 4 components.
fn padded(d: usize) -> usize {
    d.div_ceil(4) * 4
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
        let code = |row: &[f32], k: usize| match row.get(k) {
            Some(&x) if step[k] > 0.0 => ((x - low[k]) / step[k]).round().clamp(0.0, 255.0) as u8,
            _ => 0,
        };
        for tile in rows.chunks(TILE * d) {
            for group in (0..padded(d)).step_by(4) {
                let filled = out.codes.len();
                out.codes.extend(tile.chunks_exact(d).flat_map(|row| (group..group + 4).map(move |k| code(row, k))));
                out.codes.resize(filled + TILE * 4, 0);
            }
        }
        out.low.extend(low);
        out.step.extend(step);
    }
    out
}

/// Items assigned to the centroid (a unit vector) of their largest dot product, [rows] int64; in
/// chunks whose [rows, lists] scores stay in cache for the argmax (on the CPU, `argmax`: libtorch's
/// was most of the build at 1M items).
fn assign(items: &Tensor, centroids: &Tensor) -> Result<Tensor, TchError> {
    let (n, lists) = (items.size()[0], centroids.size()[0]);
    let chunk = (ASSIGN_ELEMENTS / lists.max(1)).max(1);
    let by_row = centroids.f_tr()?;
    let on_cpu = items.device() == Device::Cpu;
    let (mut parts, mut on_host) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let scores = items.f_narrow(0, start, len)?.f_mm(&by_row)?;
        if on_cpu {
            on_host.extend(cpu_f32(&scores)?.chunks_exact(lists as usize).map(|row| argmax(row) as i64));
        } else {
            parts.push(scores.f_argmax(1, false)?);
        }
        start += len;
    }
    if on_cpu {
        Tensor::f_from_slice(&on_host)
    } else {
        Tensor::f_cat(&parts, 0)
    }
}

/// The position of the largest value of `row` (the first of equals; NaN is never the largest).
#[multiversion::multiversion(targets("x86_64+avx512f", "x86_64+avx2", "aarch64+neon"))]
fn argmax(row: &[f32]) -> usize {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let sixteens = row.chunks_exact(16);
    let tail = sixteens.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for sixteen in sixteens {
        for (m, &x) in lanes.iter_mut().zip(sixteen) {
            *m = if x > *m { x } else { *m };
        }
    }
    let largest = lanes.iter().fold(tail, |m, &x| if x > m { x } else { m });
    row.iter().position(|&x| x == largest).unwrap_or(0)
}

/// The rows of `t` scaled to length 1 (rows of zeros stay zeros).
fn unit_rows(t: &Tensor) -> Result<Tensor, TchError> {
    t.f_div(&t.f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?.f_clamp_min(1e-12)?)
}

/// `k` row indices spread evenly over `0..n`.
fn strided(n: usize, k: usize, device: Device) -> Result<Tensor, TchError> {
    let rows: Vec<i64> = (0..k).map(|i| (i * n / k.max(1)) as i64).collect();
    Tensor::f_from_slice(&rows)?.f_to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::exclusion::RowMask;

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
        let excludes: Vec<Excluded> = excludes.iter().map(|e| Excluded::new(e, None)).collect();
        let (cpu_scores, cpu_rows) = lists_of(&index.search_with(&users, &excludes, 30, true).unwrap());
        let (ops_scores, ops_rows) = lists_of(&index.search_with(&users, &excludes, 30, false).unwrap());
        assert_eq!(cpu_rows, ops_rows);
        assert!(cpu_scores.iter().zip(&ops_scores).all(|(a, b)| (a - b).abs() < 1e-4), "{cpu_scores:?} {ops_scores:?}");
        assert!(excludes.iter().zip(cpu_rows.chunks(30)).all(|(ex, rows)| rows.iter().all(|&r| !ex.contains(r))));
    }

    #[test]
    fn the_cpu_scan_on_codes_keeps_the_exact_top_candidates_of_a_large_list() {
        // 20 lists of about 1,000 items and 20 candidates: the codes pick 40, the vectors the 20
        tch::manual_seed(5);
        let table = Tensor::randn([16, 20_000], (Kind::Float, Device::Cpu));
        let spec = SearchSpec { mode: CandidateSearch::Ivf, min_items: 0, lists: 20, probes: 20 };
        let index = IvfIndex::build(&table, &spec).unwrap();
        let users = Tensor::randn([5, 16], (Kind::Float, Device::Cpu));
        let excludes = [Excluded::default(); 5];
        let (scores, rows) = lists_of(&index.search(&users, &excludes, 20).unwrap());
        let exact: Vec<f32> = Vec::try_from(users.mm(&table).flatten(0, -1)).unwrap();
        let mut kept = 0;
        for i in 0..5 {
            let want: Vec<i64> = select_top(&exact[i * 20_000..(i + 1) * 20_000], Excluded::default(), 20)
                .iter()
                .map(|&(r, _)| r as i64)
                .collect();
            kept += rows[i * 20..(i + 1) * 20].iter().filter(|r| want.contains(r)).count();
            for (row, score) in rows[i * 20..(i + 1) * 20].iter().zip(&scores[i * 20..(i + 1) * 20]) {
                assert!((exact[i * 20_000 + *row as usize] - score).abs() < 1e-4, "scores are the vectors' own");
            }
        }
        assert!(kept >= 97, "{kept} of the exact 100");
    }

    #[test]
    fn the_vnni_scan_scores_what_the_portable_loop_scores() {
        // 3 tiles, the last one partly filled, and D = 12 (three groups of four); nothing pruned
        let d = 12;
        let items = 1_000..1_000 + 2 * TILE + 5;
        let codes: Vec<u8> = (0..3 * TILE * d).map(|i| (i * 7919 % 256) as u8).collect();
        let weights: Vec<i8> = (0..d).map(|k| [-127, 127, -3, 0, 55, -80][k % 6]).collect();
        let mut portable = Best::new(1_000);
        score_codes_portable(&weights, 0.25, -1.5, &codes, items.clone(), &mut portable);
        let wanted: Vec<(f32, usize)> = (0..items.len())
            .map(|j| {
                let tile = &codes[j / TILE * TILE * d..];
                let sum: i32 = (0..d)
                    .map(|k| i32::from(tile[k / 4 * TILE * 4 + j % TILE * 4 + k % 4]) * i32::from(weights[k]))
                    .sum();
                ((sum as f32).mul_add(0.25, -1.5), items.start + j)
            })
            .collect();
        assert_eq!(portable.found, wanted);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512bw") {
            let mut vnni = Best::new(1_000);
            unsafe { score_codes_vnni(&weights, 0.25, -1.5, &codes, items, &mut vnni) };
            assert_eq!(vnni.found, wanted);
        }
    }

    #[test]
    fn the_scan_keeps_the_best_items_whatever_order_they_come_in() {
        let scores: Vec<f32> = (0..1_000).map(|i| ((i * 7_919) % 1_000) as f32).collect();
        let mut best = Best::new(10);
        for (first, tile) in (0..1_000).step_by(TILE).zip(scores.chunks(TILE)) {
            let passed = tile.iter().enumerate().fold(0u64, |m, (j, &v)| m | (u64::from(v > best.floor) << j));
            best.take(first, tile, passed);
        }
        assert!(best.found.len() < 40, "pruned as it went");
        let mut kept: Vec<f32> = best
            .into_best()
            .into_iter()
            .map(|(score, at)| {
                assert_eq!(scores[at], score);
                score
            })
            .collect();
        kept.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(kept, (990..1_000).rev().map(|v| v as f32).collect::<Vec<_>>());
    }

    #[test]
    fn the_best_lists_come_first_and_the_rest_by_score_when_they_are_needed() {
        let scores = [0.1, 0.9, 0.5, -0.3, 0.7, 0.2];
        let enough = probe_order(&scores, 3, |_| true);
        let mut first: Vec<usize> = enough[..3].to_vec();
        first.sort_unstable();
        assert_eq!(first, [1, 2, 4]);
        let more = probe_order(&scores, 3, |first| first.len() > 3);
        assert_eq!(more[3..], [5, 0, 3]);
    }

    #[test]
    fn probing_every_list_gives_the_exact_top_candidates() {
        let (table, index) = index(1_000, 16, 16);
        let users = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        // the unavailable items' mask with the first profile's own rows
        let mask = RowMask::new(vec![1, 2, 500], 1_000);
        let excludes = [Excluded::new(&[0, 5, 9], Some(&mask)), Excluded::default(), Excluded::new(&[999], None)];
        let (scores, rows) = lists_of(&index.search(&users, &excludes, 50).unwrap());
        let exact: Vec<f32> = Vec::try_from(users.mm(&table).flatten(0, -1)).unwrap();
        for (i, exclude) in excludes.iter().enumerate() {
            let want: Vec<(usize, f32)> = select_top(&exact[i * 1_000..(i + 1) * 1_000], *exclude, 50);
            let got = &rows[i * 50..(i + 1) * 50];
            assert_eq!(got, want.iter().map(|&(r, _)| r as i64).collect::<Vec<_>>().as_slice(), "profile {i}");
            let close = scores[i * 50..(i + 1) * 50].iter().zip(&want).all(|(a, (_, b))| (a - b).abs() < 1e-4);
            assert!(close, "profile {i}");
        }
    }
}
