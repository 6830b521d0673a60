//! What a ranking may not recommend: each profile's own rows (a short sorted list per request) and
//! rows shared by many requests (the store's unavailable items), held once as a bit mask over the
//! catalog so that a request pays nothing per shared row.

/// Catalog rows shared by many rankings, as a sorted list and as one bit per catalog row.
#[derive(Debug, Clone, Default)]
pub struct RowMask {
    rows: Vec<i64>,
    bits: Vec<u64>,
}

impl RowMask {
    /// The mask of `rows` over a catalog of `num_items` rows (rows outside it are dropped).
    pub fn new(mut rows: Vec<i64>, num_items: usize) -> Self {
        rows.retain(|&r| usize::try_from(r).is_ok_and(|r| r < num_items));
        rows.sort_unstable();
        rows.dedup();
        let mut bits = vec![0u64; num_items.div_ceil(64)];
        for &r in &rows {
            bits[r as usize / 64] |= 1 << (r % 64);
        }
        Self { rows, bits }
    }

    /// The rows, sorted.
    pub fn rows(&self) -> &[i64] {
        &self.rows
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn contains(&self, row: usize) -> bool {
        self.bits.get(row / 64).is_some_and(|w| w >> (row % 64) & 1 == 1)
    }

    /// The 16 bits of rows `base..base + 16` (`base` a multiple of 16), lowest row lowest.
    pub(crate) fn bits16(&self, base: usize) -> u32 {
        self.bits.get(base / 64).map_or(0, |w| (w >> (base % 64)) as u32 & 0xFFFF)
    }
}

/// The rows one profile's ranking leaves out: its own `rows` (sorted, distinct) and an optional
/// shared `mask`. The two may overlap.
#[derive(Debug, Clone, Copy, Default)]
pub struct Excluded<'a> {
    pub rows: &'a [i64],
    pub mask: Option<&'a RowMask>,
}

impl<'a> Excluded<'a> {
    pub fn new(rows: &'a [i64], mask: Option<&'a RowMask>) -> Self {
        Self { rows, mask: mask.filter(|m| !m.is_empty()) }
    }

    /// At most how many rows are left out (an overlap is counted twice).
    pub fn len(&self) -> usize {
        self.rows.len() + self.mask.map_or(0, RowMask::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, row: i64) -> bool {
        self.rows.binary_search(&row).is_ok()
            || self.mask.is_some_and(|m| usize::try_from(row).is_ok_and(|r| m.contains(r)))
    }

    /// Every row left out, sorted and distinct (for the device paths that mask a score tensor).
    pub fn to_vec(&self) -> Vec<i64> {
        let mut all: Vec<i64> = self.rows.iter().chain(self.mask.map_or(&[][..], RowMask::rows)).copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_holds_its_rows_and_nothing_else() {
        let mask = RowMask::new(vec![70, 3, 3, 15, 64, -1, 200], 100);
        assert_eq!(mask.rows(), &[3, 15, 64, 70]);
        let held: Vec<usize> = (0..130).filter(|&r| mask.contains(r)).collect();
        assert_eq!(held, vec![3, 15, 64, 70]);
        assert_eq!(mask.bits16(0), 1 << 3 | 1 << 15);
        assert_eq!(mask.bits16(64), 1 << 0 | 1 << 6);
        assert_eq!(mask.bits16(16), 0);
        assert_eq!(mask.bits16(128), 0, "past the catalog");
        let ex = Excluded::new(&[1, 3], Some(&mask));
        assert_eq!(ex.len(), 6);
        assert!(ex.contains(1) && ex.contains(70) && !ex.contains(2) && !ex.contains(-5));
        assert_eq!(ex.to_vec(), vec![1, 3, 15, 64, 70]);
        assert!(Excluded::new(&[], Some(&RowMask::new(vec![], 10))).mask.is_none());
    }
}
