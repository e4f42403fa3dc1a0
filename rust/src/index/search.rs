//! Exact-match lookup in a sorted, duplicate-free `u64` array, fast for large batches.
//!
//! A plain binary search over 10M keys costs ~23 dependent loads, most of them cache misses. Two
//! tricks bring that down:
//! - a bucket table on `(x - first) >> shift` (about one bucket per [`BUCKET_LOAD`] entries)
//!   narrows each search to a few dozen neighbouring entries, i.e. a handful of cache lines;
//! - queries are searched [`LANES`] at a time in lockstep, round by round, so the CPU overlaps
//!   their memory loads instead of waiting for each search's chain of loads in turn.
//!
//! Dense arrays (`first, first+1, ..., first+n-1`, e.g. item ids `0..n`) need no search at all.

/// Average number of entries per bucket; 4 bytes of table per 32 entries = 1/8 byte per entry.
pub const BUCKET_LOAD: usize = 32;
/// Queries searched in lockstep: each round issues one independent load per lane, so many cache
/// and TLB misses are in flight at once (memory latency, not bandwidth, bounds these searches).
const LANES: usize = 256;
/// Marks "not found" in position outputs.
pub const NOT_FOUND: u32 = u32::MAX;

/// An element of a searched array: item ids are `u64`; packed SIDs are stored as `u32` when the
/// layout needs at most 32 bits, else `u64`. Queries are always `u64`.
pub trait Key: bytemuck::Pod + Ord + Into<u64> + Send + Sync {
    /// The key of a packed SID known to fit this width.
    fn from_wide(x: u64) -> Self;
}
impl Key for u32 {
    #[inline(always)]
    fn from_wide(x: u64) -> Self {
        debug_assert!(x <= u64::from(u32::MAX));
        x as u32
    }
}
impl Key for u64 {
    #[inline(always)]
    fn from_wide(x: u64) -> Self {
        x
    }
}

#[inline(always)]
pub fn wide<T: Key>(x: T) -> u64 {
    x.into()
}

#[derive(Clone, Debug)]
pub struct SortedLookup {
    first: u64,
    len: usize,
    shift: u32,
    /// Bucket `b` covers positions `starts[b]..starts[b + 1]`; empty for dense arrays.
    starts: Vec<u32>,
    dense: bool,
}

impl SortedLookup {
    /// Builds the table for `sorted` (strictly increasing, fewer than `u32::MAX` entries).
    pub fn new<T: Key>(sorted: &[T]) -> Self {
        let len = sorted.len();
        let (Some(first), Some(last)) = (sorted.first().copied().map(wide), sorted.last().copied().map(wide)) else {
            return SortedLookup { first: 0, len: 0, shift: 0, starts: Vec::new(), dense: true };
        };
        let span = last - first;
        if span == (len - 1) as u64 {
            return SortedLookup { first, len, shift: 0, starts: Vec::new(), dense: true };
        }
        let target_buckets = (len / BUCKET_LOAD).max(1) as u64;
        let mut shift = 0;
        while shift < 63 && (span >> shift) >= target_buckets {
            shift += 1;
        }
        let buckets = (span >> shift) as usize + 1;
        let mut starts = vec![0u32; buckets + 1];
        for &x in sorted {
            // Out-of-order values only occur in a file loaded with verification off: skipped here
            // (lookups on that index may then miss), never an out-of-bounds panic at load.
            let bucket = wide(x).checked_sub(first).map(|offset| (offset >> shift) as usize + 1);
            if let Some(count) = bucket.and_then(|b| starts.get_mut(b)) {
                *count += 1;
            }
        }
        for b in 0..buckets {
            starts[b + 1] += starts[b];
        }
        SortedLookup { first, len, shift, starts, dense: false }
    }

    /// Bytes of the table itself (not of the array it indexes).
    pub fn table_bytes(&self) -> usize {
        self.starts.len() * std::mem::size_of::<u32>()
    }

    /// The window `(start, len)` of `sorted` that can hold `x`.
    #[inline(always)]
    fn window(&self, x: u64) -> (usize, usize) {
        let Some(offset) = x.checked_sub(self.first) else { return (0, 0) };
        if self.dense {
            return if offset < self.len as u64 { (offset as usize, 1) } else { (0, 0) };
        }
        let bucket = (offset >> self.shift) as usize;
        if bucket + 1 >= self.starts.len() {
            return (0, 0);
        }
        let start = self.starts[bucket] as usize;
        (start, self.starts[bucket + 1] as usize - start)
    }

    /// How many entries of `sorted` (the array this table was built from) are < `x`.
    #[inline]
    pub fn lower_bound<T: Key>(&self, sorted: &[T], x: u64) -> usize {
        let Some(offset) = x.checked_sub(self.first) else { return 0 };
        if self.dense || self.len == 0 {
            return offset.min(self.len as u64) as usize;
        }
        let bucket = (offset >> self.shift) as usize;
        if bucket + 1 >= self.starts.len() {
            return self.len;
        }
        // entries of earlier buckets are < x, of later ones > x
        let (start, end) = (self.starts[bucket] as usize, self.starts[bucket + 1] as usize);
        start + sorted[start..end].partition_point(|&k| wide(k) < x)
    }

    /// Position of `x` in `sorted` (the array this table was built from).
    #[inline]
    pub fn find<T: Key>(&self, sorted: &[T], x: u64) -> Option<usize> {
        let (mut base, mut size) = self.window(x);
        if size == 0 {
            return None;
        }
        while size > 1 {
            let half = size / 2;
            let mid = base + half;
            base = if wide(sorted[mid]) > x { base } else { mid };
            size -= half;
        }
        (wide(sorted[base]) == x).then_some(base)
    }

    /// Positions of all `queries` in `sorted`, [`NOT_FOUND`] where absent.
    pub fn find_many<T: Key>(&self, sorted: &[T], queries: &[u64], out: &mut [u32]) {
        debug_assert_eq!(queries.len(), out.len());
        if self.dense {
            for (slot, &x) in out.iter_mut().zip(queries) {
                let (start, size) = self.window(x);
                *slot = if size == 1 { start as u32 } else { NOT_FOUND };
            }
            return;
        }
        for (qs, os) in queries.chunks(LANES).zip(out.chunks_mut(LANES)) {
            let mut base = [0usize; LANES];
            let mut size = [0usize; LANES];
            let mut widest = 0;
            for lane in 0..qs.len() {
                (base[lane], size[lane]) = self.window(qs[lane]);
                widest = widest.max(size[lane]);
            }
            // Branch-free rounds: every lane steps each round (a lane of size <= 1 has half = 0
            // and stays put), so the window sizes, which vary from lane to lane, cost no branch
            // mispredictions. An empty window (size 0) reads sorted[0], harmless when non-empty.
            let mut remaining = widest;
            while remaining > 1 {
                for lane in 0..qs.len() {
                    let half = size[lane] / 2;
                    let mid = base[lane] + half;
                    base[lane] = if wide(sorted[mid]) > qs[lane] { base[lane] } else { mid };
                    size[lane] -= half;
                }
                remaining -= remaining / 2;
            }
            for lane in 0..qs.len() {
                let hit = size[lane] == 1 && wide(sorted[base[lane]]) == qs[lane];
                os[lane] = if hit { base[lane] as u32 } else { NOT_FOUND };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(sorted: &[u64], queries: &[u64]) {
        let table = SortedLookup::new(sorted);
        let mut out = vec![0u32; queries.len()];
        table.find_many(sorted, queries, &mut out);
        for (&q, &got) in queries.iter().zip(&out) {
            let want = sorted.binary_search(&q).ok();
            assert_eq!(table.find(sorted, q), want, "query {q}");
            assert_eq!(got, want.map_or(NOT_FOUND, |p| p as u32), "query {q}");
        }
    }

    #[test]
    fn edge_cases() {
        check(&[], &[0, 1, u64::MAX]);
        check(&[7], &[0, 6, 7, 8, u64::MAX]);
        check(&[0, 1, 2, 3], &[0, 3, 4, u64::MAX]);
        check(&[0, u64::MAX], &[0, 1, u64::MAX - 1, u64::MAX]);
        let skewed: Vec<u64> = (0..1000).chain([1 << 40, u64::MAX - 1]).collect();
        check(&skewed, &[5, 999, 1000, 1 << 40, (1 << 40) + 1, u64::MAX - 1, u64::MAX]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(256)))]

        #[test]
        fn matches_binary_search(
            set in proptest::collection::btree_set(any::<u64>(), 0..300),
            small in proptest::collection::btree_set(0u64..2000, 0..300),
            extra in proptest::collection::vec(any::<u64>(), 0..50),
        ) {
            for values in [set, small] {
                let sorted: Vec<u64> = values.into_iter().collect();
                let mut queries = extra.clone();
                queries.extend(sorted.iter().copied());
                queries.extend(sorted.iter().map(|x| x.wrapping_add(1)));
                check(&sorted, &queries);
            }
        }
    }
}
