//! Top-k over score rows on the host: the two-pass selection every stage's cut and the IVF search
//! use, and the borrowing of a CPU tensor's values it reads from.

use tch::{Device, Kind, TchError, Tensor};

use super::exclusion::{Excluded, RowMask};

/// The values of a contiguous float32 CPU tensor, borrowed for as long as the tensor.
pub(crate) fn cpu_f32(t: &Tensor) -> Result<&[f32], TchError> {
    if t.device() != Device::Cpu || t.kind() != Kind::Float || !t.is_contiguous() {
        return Err(TchError::Kind(format!(
            "expected a contiguous float32 CPU tensor, got {:?} on {:?}",
            t.kind(),
            t.device()
        )));
    }
    let len = t.numel();
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: a contiguous float32 CPU tensor holds `numel` initialised f32 values at `data_ptr`;
    // the returned slice borrows `t`, which keeps the storage alive, and nothing writes to it
    // meanwhile (the tensor is local to one inference call).
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, len) })
}

/// The `c` highest scores of one row with their positions, best first (ties: lower position
/// first), leaving out the positions in `exclude`; NaN ranks below every number.
///
/// Two passes instead of a sort: the value of rank `r` in an evenly strided sample of the row is a
/// threshold that about `2 (c + |exclude.rows|)` entries reach, one pass keeps those, and only they
/// are ordered, as integer keys (`rank_key`) rather than through a float comparator. Should too few
/// reach it (an unlucky sample), the sample rank grows until the whole row is taken. The positions
/// of `exclude.mask` (however many) are left out of the sample and of the pass, 16 at a time, so
/// they cost nothing per position.
pub fn select_top(scores: &[f32], exclude: Excluded<'_>, c: usize) -> Vec<(usize, f32)> {
    if c == 0 {
        return Vec::new();
    }
    let mut excluded: Vec<usize> = exclude.rows.iter().filter_map(|&r| usize::try_from(r).ok()).collect();
    excluded.sort_unstable();
    let mask = exclude.mask;
    let masked = |pos: usize| mask.is_some_and(|m| m.contains(pos));
    let n = scores.len();
    let want = 2 * (c + excluded.len());
    let mut rank = 32;
    let mut picked: Vec<u64> = Vec::new();
    loop {
        // sample m entries so that rank r of the sample stands for about `want` entries of the row
        let m = (rank * n).div_ceil(want.max(1));
        let take_all = m >= n;
        picked.clear();
        if take_all {
            picked.extend(scores.iter().enumerate().filter(|&(pos, _)| !masked(pos)).map(|(pos, &v)| rank_key(pos, v)));
        } else {
            let stride = n / m;
            let mut sample: Vec<f32> = (0..n)
                .step_by(stride)
                .filter(|&pos| !masked(pos))
                .map(|pos| scores[pos])
                .filter(|v| !v.is_nan())
                .collect();
            if sample.len() > rank {
                let (_, t, _) = sample.select_nth_unstable_by(rank, |x, y| y.total_cmp(x));
                let t = *t;
                keep_at_least(scores, t, mask, &mut picked);
            }
        }
        // `picked` is in position order (both passes append by position), `excluded` sorted: one
        // merge walk instead of a binary search per key
        if !excluded.is_empty() {
            let mut next_excluded = excluded.iter().copied().peekable();
            picked.retain(|&key| {
                let pos = key_position(key);
                while next_excluded.next_if(|&e| e < pos).is_some() {}
                next_excluded.peek() != Some(&pos)
            });
        }
        if picked.len() >= c || take_all {
            break;
        }
        rank *= 4;
    }
    if picked.len() > c {
        picked.select_nth_unstable(c);
        picked.truncate(c);
    }
    picked.sort_unstable();
    picked.into_iter().map(key_position).map(|pos| (pos, scores[pos])).collect()
}

/// Appends the `rank_key` of every score `>= t` (never NaN) outside `mask`, in position order.
/// The comparisons of 16 scores are packed into a bit mask first (one AVX-512 compare where the
/// CPU has it, else a loop the compiler vectorises), so the pass branches once per 16 scores
/// instead of once per score; the masked positions are cleared from it with one operation.
fn keep_at_least(scores: &[f32], t: f32, mask: Option<&RowMask>, out: &mut Vec<u64>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { keep_at_least_avx512(scores, t, mask, out) };
    }
    keep_by(scores, t, mask, out, at_least)
}

/// Bit j set where `chunk[j] >= t` (NaN compares false), in a loop the compiler vectorises.
fn at_least(chunk: &[f32], t: f32) -> u32 {
    chunk.iter().enumerate().fold(0u32, |bits, (j, &v)| bits | u32::from(v >= t) << j)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn keep_at_least_avx512(scores: &[f32], t: f32, mask: Option<&RowMask>, out: &mut Vec<u64>) {
    use std::arch::x86_64::{_mm512_cmp_ps_mask, _mm512_loadu_ps, _mm512_set1_ps, _CMP_GE_OQ};
    let bar = _mm512_set1_ps(t);
    keep_by(scores, t, mask, out, |chunk, _| {
        // SAFETY: `keep_by` passes chunks of exactly 16 floats.
        let v = unsafe { _mm512_loadu_ps(chunk.as_ptr()) };
        u32::from(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, bar))
    })
}

/// `keep_at_least` with `compare` giving bit j set where `chunk[j] >= t` for chunks of 16 scores.
#[inline(always)]
fn keep_by(scores: &[f32], t: f32, mask: Option<&RowMask>, out: &mut Vec<u64>, compare: impl Fn(&[f32], f32) -> u32) {
    let mut chunks = scores.chunks_exact(16);
    let mut base = 0;
    for chunk in &mut chunks {
        let mut bits = compare(chunk, t);
        if let Some(mask) = mask {
            bits &= !mask.bits16(base);
        }
        while bits != 0 {
            let j = bits.trailing_zeros() as usize;
            out.push(number_key(base + j, chunk[j]));
            bits &= bits - 1;
        }
        base += 16;
    }
    for (j, &v) in chunks.remainder().iter().enumerate() {
        if v >= t && !mask.is_some_and(|m| m.contains(base + j)) {
            out.push(number_key(base + j, v));
        }
    }
}

/// A key whose integer order is `select_top`'s: higher score first, NaN after every number, then
/// the lower position (catalog rows fit in 32 bits).
fn rank_key(pos: usize, score: f32) -> u64 {
    if score.is_nan() {
        // below every number
        (u64::from(u32::MAX) << 32) | pos as u64
    } else {
        number_key(pos, score)
    }
}

/// `rank_key` of a score known not to be NaN (one that compared `>=` to a number): the float's
/// order as an unsigned integer's (negative numbers reversed), inverted so that higher comes first.
fn number_key(pos: usize, score: f32) -> u64 {
    let bits = score.to_bits();
    let ascending = if bits >> 31 == 1 { !bits } else { bits | 0x8000_0000 };
    (u64::from(!ascending) << 32) | pos as u64
}

fn key_position(key: u64) -> usize {
    (key & 0xFFFF_FFFF) as usize
}

/// The rows of a [B, n] tensor on the host, as f32 or i64.
pub(crate) fn host_f32(t: &Tensor) -> Result<Vec<f32>, TchError> {
    Vec::try_from(t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)
}

pub(crate) fn host_i64(t: &Tensor) -> Result<Vec<i64>, TchError> {
    Vec::try_from(t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_top_matches_a_full_sort_without_the_excluded_rows() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as f32 / (1u64 << 31) as f32
        };
        for (n, c) in [(1000, 200), (50, 50), (30, 10), (5, 1)] {
            // coarse values so that ties occur
            let scores: Vec<f32> = (0..n).map(|_| (next() * 20.0).floor()).collect();
            let exclude: Vec<i64> = (0..n as i64).filter(|i| i % 7 == 3).collect();
            let mut want: Vec<(usize, f32)> =
                scores.iter().copied().enumerate().filter(|(p, _)| !exclude.contains(&(*p as i64))).collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            want.truncate(c);
            assert_eq!(select_top(&scores, Excluded::new(&exclude, None), c), want, "n={n} c={c}");
            // the same rows as a shared mask, or split between the two
            let mask = RowMask::new(exclude.clone(), n);
            assert_eq!(select_top(&scores, Excluded::new(&[], Some(&mask)), c), want, "mask, n={n} c={c}");
            let (odd, even): (Vec<i64>, Vec<i64>) = exclude.iter().partition(|&&r| r % 2 == 1);
            let even = RowMask::new(even, n);
            assert_eq!(select_top(&scores, Excluded::new(&odd, Some(&even)), c), want, "split, n={n} c={c}");
        }
    }

    #[test]
    fn select_top_holds_for_rows_that_fool_the_sample() {
        let n = 30_000usize;
        let patterns: Vec<(&str, Vec<f32>)> = vec![
            ("ascending", (0..n).map(|i| i as f32).collect()),
            ("descending", (0..n).map(|i| -(i as f32)).collect()),
            ("constant", vec![0.5; n]),
            ("sawtooth 7", (0..n).map(|i| (i % 7) as f32).collect()),
            ("high off the grid", (0..n).map(|i| if i % 64 == 0 { 0.0 } else { (i % 977) as f32 }).collect()),
            ("mostly NaN", (0..n).map(|i| if i % 1000 == 0 { i as f32 } else { f32::NAN }).collect()),
        ];
        let exclude: Vec<i64> = (0..n as i64).step_by(101).collect();
        for (name, scores) in patterns {
            let mut want: Vec<(usize, f32)> =
                scores.iter().copied().enumerate().filter(|(p, _)| !exclude.contains(&(*p as i64))).collect();
            want.sort_by(|a, b| (!b.1.is_nan()).cmp(&!a.1.is_nan()).then(b.1.total_cmp(&a.1)).then(a.0.cmp(&b.0)));
            want.truncate(200);
            let mask = RowMask::new(exclude.clone(), n);
            for (how, excluded) in [("list", Excluded::new(&exclude, None)), ("mask", Excluded::new(&[], Some(&mask)))]
            {
                let got = select_top(&scores, excluded, 200);
                assert_eq!(got.len(), 200, "{name}, {how}");
                let same =
                    got.iter().zip(&want).all(|(g, w)| g.0 == w.0 && (g.1 == w.1 || (g.1.is_nan() && w.1.is_nan())));
                assert!(same, "{name}, {how}: {:?} vs {:?}", &got[..5], &want[..5]);
            }
        }
    }

    #[test]
    fn the_vector_pass_keeps_what_the_portable_one_keeps() {
        let n = 1000;
        let scores: Vec<f32> = (0..n)
            .map(|i| match i % 13 {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                2 => -0.0,
                _ => ((i * 7919) % 101) as f32 - 50.0,
            })
            .collect();
        let mask = RowMask::new((0..n as i64).step_by(5).collect(), n);
        for t in [-50.0, -0.0, 0.0, 17.0, 50.0, f32::NEG_INFINITY] {
            for mask in [None, Some(&mask)] {
                let (mut vector, mut portable) = (Vec::new(), Vec::new());
                keep_at_least(&scores, t, mask, &mut vector);
                keep_by(&scores, t, mask, &mut portable, at_least);
                assert_eq!(vector, portable, "t={t} masked={}", mask.is_some());
            }
        }
    }

    #[test]
    fn select_top_ranks_nan_last_and_returns_what_there_is() {
        let scores = [f32::NAN, 1.0, f32::NEG_INFINITY, 3.0, f32::NAN, 2.0];
        assert_eq!(select_top(&scores, Excluded::new(&[3], None), 3), vec![(5, 2.0), (1, 1.0), (2, f32::NEG_INFINITY)]);
        let all = select_top(&scores, Excluded::default(), 10);
        assert_eq!(all.iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 5, 1, 2, 0, 4]);
        assert!(select_top(&scores, Excluded::default(), 0).is_empty());
    }
}
