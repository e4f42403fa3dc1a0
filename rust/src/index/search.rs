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
        let shift = Self::shift_for(span, len);
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

    /// The bucket width (as a shift) for `len` values spanning `span`.
    fn shift_for(span: u64, len: usize) -> u32 {
        let target_buckets = (len / BUCKET_LOAD).max(1) as u64;
        let mut shift = 0;
        while shift < 63 && (span >> shift) >= target_buckets {
            shift += 1;
        }
        shift
    }

    /// The table of `merged`, which is the array this table was built from with the ascending
    /// values `inserted` added (none of them already there). Always equal to
    /// `SortedLookup::new(merged)`; when the first value and the bucket width stay (the usual case
    /// for a small extension) it is computed from this table and `inserted` alone, without the
    /// pass over `merged`.
    pub fn with_inserted<T: Key>(&self, merged: &[T], inserted: impl IntoIterator<Item = u64>) -> Self {
        let len = merged.len();
        let (Some(first), Some(last)) = (merged.first().copied().map(wide), merged.last().copied().map(wide)) else {
            return Self::new(merged);
        };
        let span = last - first;
        if self.dense || first != self.first || span == (len - 1) as u64 || Self::shift_for(span, len) != self.shift {
            return Self::new(merged);
        }
        let shift = self.shift;
        let buckets = (span >> shift) as usize + 1;
        let old_buckets = self.starts.len() - 1;
        let mut inserted = inserted.into_iter().map(|x| ((x - first) >> shift) as usize).peekable();
        let mut added = 0u32;
        let mut starts = Vec::with_capacity(buckets + 1);
        for b in 0..=buckets {
            // starts[b] = #{values whose bucket is < b}
            while inserted.next_if(|&bucket| bucket < b).is_some() {
                added += 1;
            }
            starts.push(self.starts[b.min(old_buckets)] + added);
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

    /// [`lower_bound`](Self::lower_bound) of every query, [`LANES`] queries in lockstep so their
    /// cache misses overlap (for thousands of queries into a large array).
    pub fn lower_bounds<T: Key>(&self, sorted: &[T], queries: &[u64], out: &mut [usize]) {
        debug_assert_eq!(queries.len(), out.len());
        if self.dense || self.len == 0 {
            for (slot, &x) in out.iter_mut().zip(queries) {
                *slot = self.lower_bound(sorted, x);
            }
            return;
        }
        for (qs, os) in queries.chunks(LANES).zip(out.chunks_mut(LANES)) {
            // os[lane] + size[lane]: the window still searched (entries before it are < x)
            let mut size = [0usize; LANES];
            let mut widest = 0;
            for lane in 0..qs.len() {
                let (start, end) = match qs[lane].checked_sub(self.first) {
                    None => (0, 0),
                    Some(offset) => {
                        let bucket = (offset >> self.shift) as usize;
                        if bucket + 1 >= self.starts.len() {
                            (self.len, self.len)
                        } else {
                            (self.starts[bucket] as usize, self.starts[bucket + 1] as usize)
                        }
                    }
                };
                os[lane] = start;
                size[lane] = end - start;
                widest = widest.max(size[lane]);
            }
            // invariant: sorted[os - 1] < x (or os = window start) and sorted[os + size..] >= x
            let mut remaining = widest;
            while remaining > 0 {
                for lane in 0..qs.len() {
                    let half = size[lane] / 2;
                    let mid = os[lane] + half;
                    // a lane with size 0 compares nothing useful and keeps its state
                    let below = size[lane] > 0 && wide(sorted[mid.min(self.len - 1)]) < qs[lane];
                    os[lane] = if below { mid + 1 } else { os[lane] };
                    size[lane] = if below { size[lane] - half - 1 } else { half };
                }
                remaining /= 2;
            }
        }
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
        let mut bounds = vec![0usize; queries.len()];
        table.lower_bounds(sorted, queries, &mut bounds);
        for (&q, &got) in queries.iter().zip(&bounds) {
            assert_eq!(got, sorted.partition_point(|&k| k < q), "lower bound of {q}");
            assert_eq!(table.lower_bound(sorted, q), got, "lower bound of {q}");
        }
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

    fn same_table(a: &SortedLookup, b: &SortedLookup) -> bool {
        (a.first, a.len, a.shift, &a.starts, a.dense) == (b.first, b.len, b.shift, &b.starts, b.dense)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(256)))]

        #[test]
        fn with_inserted_equals_a_fresh_table(
            set in proptest::collection::btree_set(0u64..5000, 1..400),
            picks in proptest::collection::vec(0u8..4, 400),
            scale_bits in 0u32..44,
        ) {
            // old values, and new ones inserted among them (picks == 0: about a quarter)
            let all: Vec<u64> = set.into_iter().map(|x| x << scale_bits).collect();
            let old: Vec<u64> = all.iter().enumerate().filter(|&(i, _)| picks[i] != 0).map(|(_, &x)| x).collect();
            let inserted: Vec<u64> = all.iter().enumerate().filter(|&(i, _)| picks[i] == 0).map(|(_, &x)| x).collect();
            prop_assume!(!old.is_empty());
            let got = SortedLookup::new(&old).with_inserted(&all, inserted.iter().copied());
            prop_assert!(same_table(&got, &SortedLookup::new(&all)));
            if all.iter().all(|&x| x <= u64::from(u32::MAX)) {
                let (old32, all32): (Vec<u32>, Vec<u32>) =
                    (old.iter().map(|&x| x as u32).collect(), all.iter().map(|&x| x as u32).collect());
                let got = SortedLookup::new(&old32).with_inserted(&all32, inserted.iter().copied());
                prop_assert!(same_table(&got, &SortedLookup::new(&all32)));
            }
        }

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
