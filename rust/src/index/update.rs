//! Changing a built index without moving any item it holds: [`SidIndex::extend`] adds items,
//! [`SidIndex::remove`] drops some. Both return a new index (the old one is untouched) whose
//! generation is one more.
//!
//! Extension rule (build's repair, restricted to the new items):
//! 1. Every existing item keeps its SID, bit for bit; the level sizes and the number of levels
//!    never change.
//! 2. New items are handled in ascending (SID, item id) order. A new item whose SID no existing
//!    item holds and no smaller-id new item shares keeps it.
//! 3. Every other new item (a *mover*) moves to the free code nearest its own on the *repair
//!    level* (the last level of the input codes) under the same prefix, ties to the lower code; a
//!    code is free when no item (existing, or new and placed) holds it under that prefix. With an
//!    empty index this is exactly what `build` does when no prefix is full.
//! 4. An index with a disambiguation level (see the `build` module): new codes may be given with
//!    the input levels (the disambiguation code is then 0) or with all levels. When a mover's
//!    prefix has no free repair-level code, it takes the free disambiguation code nearest its own
//!    under its SID's first levels.
//! 5. When neither exists the extension fails (`InvalidInput`, naming the item and its row): it
//!    would need a level (or a larger one) that the existing items lack, and adding one would
//!    change their SIDs. Rebuild with `build` over all items instead.
//!
//! The merged arrays are written in one parallel pass each, without sorting the existing items
//! again, so extending by m items costs O(n + m log m) instead of build's O(n log n).

use std::collections::HashSet;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::build::nearest_free;
use super::search::{wide, Key, SortedLookup};
use super::{huge_page_vec, prefetch, Buf, KeyLayout, Keys, SidIndex};
use crate::error::{Gr2Error, Result};

/// Output rows per parallel task when the merged arrays are filled.
const FILL_CHUNK: usize = 1 << 16;

/// A new item: `(packed SID, item id, input row)`; sorting these sorts by (SID, item id).
type NewItem = (u64, u64, u32);

/// Where the repair level and the disambiguation level sit inside a packed key.
struct Geometry {
    repair_level: usize,
    /// Bits below the prefix a mover stays under (repair level + disambiguation level).
    block_shift: u32,
    /// Shift and size of the repair level (the last input level).
    code_shift: u32,
    code_size: u32,
    /// Size of the disambiguation level (always the last, shift 0); None without one.
    disambiguation: Option<u32>,
}

impl Geometry {
    fn of(index: &SidIndex) -> Geometry {
        let layout = &index.layout;
        let repair_level = index.report.levels_in - 1;
        let bits_from = |level: usize| (level..layout.levels()).map(|l| layout.bits(l)).sum::<u32>();
        Geometry {
            repair_level,
            block_shift: bits_from(repair_level),
            code_shift: bits_from(repair_level + 1),
            code_size: layout.sizes()[repair_level],
            disambiguation: index.report.level_appended.then(|| layout.sizes()[repair_level + 1]),
        }
    }

    fn block(&self, key: u64) -> u64 {
        key.checked_shr(self.block_shift).unwrap_or(0)
    }

    fn block_range(&self, key: u64) -> (u64, u64) {
        let low = if self.block_shift >= 64 { u64::MAX } else { (1u64 << self.block_shift) - 1 };
        (key & !low, key | low)
    }

    fn code(&self, key: u64) -> u32 {
        let mask = (1u64 << (self.block_shift - self.code_shift)) - 1;
        ((key >> self.code_shift) & mask) as u32
    }

    fn with_code(&self, key: u64, code: u32) -> u64 {
        let (lo, _) = self.block_range(key);
        lo | (u64::from(code) << self.code_shift)
    }

    /// The disambiguation code's bits (the lowest `code_shift` bits; 0 without the level).
    fn disambiguation_mask(&self) -> u64 {
        (1u64 << self.code_shift) - 1
    }
}

fn mark(occupied: &mut [u64], code: u32) {
    occupied[code as usize / 64] |= 1 << (code % 64);
}

/// What the repair of the new items found and did (added to the index's report).
#[derive(Default)]
struct Tally {
    unique: u64,
    distinct: u64,
    groups: Vec<(u64, u64)>,
    moved: u64,
    max_move_distance: u64,
    full_prefixes: u64,
    disambiguated: u64,
}

impl Tally {
    fn merge(mut self, other: Tally) -> Tally {
        self.unique += other.unique;
        self.distinct += other.distinct;
        self.groups.extend(other.groups);
        self.moved += other.moved;
        self.max_move_distance = self.max_move_distance.max(other.max_move_distance);
        self.full_prefixes += other.full_prefixes;
        self.disambiguated += other.disambiguated;
        self
    }
}

/// A failure tied to an input row (the smallest row wins, so errors are deterministic).
type RowError = (u32, Gr2Error);

impl SidIndex {
    /// A new index holding this index's items with their SIDs unchanged plus `item_ids` (m, none
    /// already present, no duplicates) with row-major `codes` (m x `levels`, `levels` being
    /// [`levels`](Self::levels) or, for an index with a disambiguation level, the input levels).
    /// Collisions are repaired among the new items only (see the module docs); on any error
    /// nothing is built and the error names the first offending row.
    pub fn extend(&self, item_ids: &[u64], codes: &[u16], levels: usize) -> Result<SidIndex> {
        let m = item_ids.len();
        let levels_in = self.report.levels_in;
        if levels != self.levels() && !(self.report.level_appended && levels == levels_in) {
            let accepted = if self.report.level_appended {
                format!("{levels_in} (the input levels) or {}", self.levels())
            } else {
                self.levels().to_string()
            };
            return Err(Gr2Error::invalid(format!(
                "codes have {levels} levels but the SID index takes {accepted}"
            )));
        }
        if codes.len() != m * levels {
            return Err(Gr2Error::invalid(format!(
                "codes hold {} values but {m} items x {levels} levels need {}",
                codes.len(),
                m * levels
            )));
        }
        if self.len() + m >= u32::MAX as usize {
            return Err(Gr2Error::invalid(format!(
                "an index holds fewer than {} items ({} + {m} new)",
                u32::MAX,
                self.len()
            )));
        }
        let generation = self.next_generation()?;
        check_codes(codes, levels, &self.layout)?;
        let by_id = check_new_ids(self, item_ids)?;

        // `pack` of a row without the disambiguation level leaves that level's bits 0.
        let mut new: Vec<NewItem> = codes
            .par_chunks(levels.max(1))
            .zip(item_ids.par_iter())
            .enumerate()
            .map(|(row, (codes, &id))| (self.layout.pack(codes), id, row as u32))
            .collect();
        new.par_sort_unstable();
        let geo = Geometry::of(self);
        let (tally, blocks) = with_keys!(self.sorted_keys, |keys| repair_new(keys, &self.key_lookup, &mut new, &geo))
            .map_err(|(_, err)| err)?;
        Ok(with_keys!(self.sorted_keys, |keys| self.merged(keys, new, by_id, (&geo, &blocks), tally, generation)))
    }

    /// A new index without `item_ids` (all present, no duplicates); every other item keeps its
    /// SID, and the levels stay as they were. The repair report's counters keep describing the
    /// builds and extensions that placed the items (capped at the new item count): the input
    /// codes of removed items are not stored, so they cannot be recounted.
    pub fn remove(&self, item_ids: &[u64]) -> Result<SidIndex> {
        let generation = self.next_generation()?;
        let ids = self.sorted_ids.as_slice();
        let found: Vec<Option<usize>> = item_ids.par_iter().map(|&id| self.id_lookup.find(ids, id)).collect();
        if let Some(row) = found.par_iter().position_first(|j| j.is_none()) {
            return Err(Gr2Error::UnknownItem(format!(
                "item id {} (row {row}) is not in the SID index ({} items); only items it holds can be removed",
                item_ids[row],
                self.len()
            )));
        }
        let mut gone_ids: Vec<(usize, u32)> =
            found.into_par_iter().enumerate().map(|(row, j)| (j.unwrap_or_default(), row as u32)).collect();
        gone_ids.par_sort_unstable();
        if let Some(i) = gone_ids.par_windows(2).position_first(|w| w[0].0 == w[1].0) {
            let ((j, first), (_, second)) = (gone_ids[i], gone_ids[i + 1]);
            let (first, second) = (first.min(second), first.max(second));
            return Err(Gr2Error::invalid(format!(
                "item id {} appears more than once in the items to remove (rows {first} and {second})",
                ids[j]
            )));
        }
        let gone_ids: Vec<usize> = gone_ids.into_iter().map(|(j, _)| j).collect();
        let sid_pos = self.sid_pos.as_slice();
        let mut gone_keys: Vec<usize> = gone_ids.par_iter().map(|&j| sid_pos[j] as usize).collect();
        gone_keys.par_sort_unstable();

        let n = self.len() - gone_ids.len();
        // a kept element j moves down by #{removed elements before it}
        let (id_shift, key_shift) = (StepCount::new(&gone_ids, self.len()), StepCount::new(&gone_keys, self.len()));
        let item_pos = self.item_pos.as_slice();
        let (sorted_ids, new_sid_pos) = compress_pairs(&gone_ids, self.len(), |j| {
            let (p, before) = key_shift.at(sid_pos, j);
            (ids[j], (p - before) as u32)
        });
        let (sorted_keys, new_item_pos) = with_keys!(self.sorted_keys, |keys| {
            let (kept, item_pos) = compress_pairs(&gone_keys, self.len(), |p| {
                let (j, before) = id_shift.at(item_pos, p);
                (keys[p], (j - before) as u32)
            });
            (OwnedKeys::owned(kept), item_pos)
        });
        let mut report = self.report.clone();
        report.items = n as u64;
        report.unique_items_before = report.unique_items_before.min(n as u64);
        report.distinct_sids_before = report.distinct_sids_before.min(n as u64);
        Ok(SidIndex::from_parts(
            self.layout.clone(),
            report,
            Buf::Owned(sorted_ids),
            Buf::Owned(new_sid_pos),
            sorted_keys,
            Buf::Owned(new_item_pos),
            generation,
            None,
        ))
    }

    fn next_generation(&self) -> Result<u32> {
        self.generation
            .checked_add(1)
            .ok_or_else(|| Gr2Error::invalid("the SID index has reached the last generation (u32::MAX); rebuild it"))
    }

    /// The index with the repaired `new` items (sorted by SID) merged in.
    /// `blocks`: the geometry and where each prefix block's existing keys sit (from the repair).
    fn merged<K: OwnedKeys>(
        &self,
        keys: &[K],
        mut new: Vec<NewItem>,
        by_id: NewIds,
        (geo, blocks): (&Geometry, &[Range<usize>]),
        tally: Tally,
        generation: u32,
    ) -> SidIndex {
        new.par_sort_unstable();
        debug_assert!(new.windows(2).all(|w| w[0].0 < w[1].0), "repair left a collision");
        let (n, m) = (self.len(), new.len());
        let ids = self.sorted_ids.as_slice();
        let (sid_pos, item_pos) = (self.sid_pos.as_slice(), self.item_pos.as_slice());

        // New items in id order, with their rank in SID order (and the inverse).
        let mut sid_rank = vec![0u32; m]; // by input row
        for (k, &(_, _, row)) in new.iter().enumerate() {
            sid_rank[row as usize] = k as u32;
        }
        let NewIds { by_id, before: id_before } = by_id;
        let by_id: Vec<(u64, u32)> = by_id.into_iter().map(|(id, row)| (id, sid_rank[row as usize])).collect();
        let mut id_rank = vec![0u32; m];
        for (i, &(_, k)) in by_id.iter().enumerate() {
            id_rank[k as usize] = i as u32;
        }

        // repair moves a new item only inside its block, so the blocks keep their order
        let new_blocks: Vec<&[NewItem]> = new.chunk_by(|a, b| geo.block(a.0) == geo.block(b.0)).collect();
        debug_assert_eq!(new_blocks.len(), blocks.len());
        let key_before: Vec<usize> = new_blocks
            .par_iter()
            .zip(blocks.par_iter())
            .flat_map_iter(|(items, old)| {
                let old_keys = &keys[old.clone()];
                items.iter().map(move |&(key, _, _)| old.start + old_keys.partition_point(|&k| wide(k) < key))
            })
            .collect();
        let new_id_at: Vec<u32> = id_before.iter().enumerate().map(|(i, &b)| (b + i) as u32).collect();
        let new_key_at: Vec<u32> = key_before.iter().enumerate().map(|(k, &b)| (b + k) as u32).collect();
        // old element j lands at j + #{new elements before it}
        let (id_shift, key_shift) = (StepCount::new(&id_before, n), StepCount::new(&key_before, n));

        // id order: (item id, SID position); SID order: (key, id position)
        let (sorted_ids, new_sid_pos) = interleave_pairs(
            &id_before,
            ids,
            |j| {
                let (p, before) = key_shift.at(sid_pos, j);
                (p + before) as u32
            },
            |i| (by_id[i].0, new_key_at[by_id[i].1 as usize]),
        );
        let (sorted_keys, new_item_pos) = interleave_pairs(
            &key_before,
            keys,
            |p| {
                let (j, before) = id_shift.at(item_pos, p);
                (j + before) as u32
            },
            |k| (K::from_wide(new[k].0), new_id_at[id_rank[k] as usize]),
        );

        let mut report = self.report.clone();
        let mut groups: std::collections::BTreeMap<u64, u64> = report.collision_group_sizes.iter().copied().collect();
        for (size, count) in tally.groups {
            *groups.entry(size).or_default() += count;
        }
        report.items += m as u64;
        report.unique_items_before += tally.unique;
        report.distinct_sids_before += tally.distinct;
        report.collision_group_sizes = groups.into_iter().collect();
        report.items_moved += tally.moved;
        report.max_move_distance = report.max_move_distance.max(tally.max_move_distance);
        report.full_prefixes += tally.full_prefixes;
        report.items_disambiguated += tally.disambiguated;
        // the bucket tables from the old ones plus the new items (no pass over the merged arrays)
        let (id_lookup, key_lookup) = rayon::join(
            || self.id_lookup.with_inserted(&sorted_ids, by_id.iter().map(|&(id, _)| id)),
            || self.key_lookup.with_inserted(&sorted_keys, new.iter().map(|&(key, _, _)| key)),
        );
        let sorted_keys = K::owned(sorted_keys);
        SidIndex::from_parts(
            self.layout.clone(),
            report,
            Buf::Owned(sorted_ids),
            Buf::Owned(new_sid_pos),
            sorted_keys,
            Buf::Owned(new_item_pos),
            generation,
            Some((id_lookup, key_lookup)),
        )
    }
}

/// Every code below its level's size; the error names the first bad row and level.
fn check_codes(codes: &[u16], levels: usize, layout: &KeyLayout) -> Result<()> {
    let Some(row) = codes.par_chunks(levels.max(1)).position_first(|r| layout.first_out_of_range(r).is_some()) else {
        return Ok(());
    };
    let values = &codes[row * levels..(row + 1) * levels];
    let level = layout.first_out_of_range(values).unwrap_or(0);
    Err(Gr2Error::invalid(format!(
        "codes[{row}, {level}] = {} is out of range: level {level} of the SID index has size {}",
        values[level],
        layout.sizes()[level]
    )))
}

/// The new items in id order, `(item id, input row)`, with `before[i]` = how many old ids are
/// smaller than `by_id[i]` (found once, for the check and for the merge).
struct NewIds {
    by_id: Vec<(u64, u32)>,
    before: Vec<usize>,
}

/// New ids must be unique and absent from the index; the error names the first offending row.
fn check_new_ids(index: &SidIndex, item_ids: &[u64]) -> Result<NewIds> {
    let mut by_id: Vec<(u64, u32)> = item_ids.par_iter().enumerate().map(|(row, &id)| (id, row as u32)).collect();
    by_id.par_sort_unstable();
    let ids = index.sorted_ids.as_slice();
    let before = lower_bounds(&index.id_lookup, ids, by_id.iter().map(|&(id, _)| id).collect());
    let present = by_id
        .par_iter()
        .zip(before.par_iter())
        .filter(|&(&(id, _), &b)| ids.get(b) == Some(&id))
        .map(|(&(_, row), _)| row as usize)
        .min();
    // the duplicate whose second occurrence comes first
    let duplicate = by_id.windows(2).filter(|w| w[0].0 == w[1].0).min_by_key(|w| w[1].1);
    match (present, duplicate) {
        (Some(row), dup) if dup.is_none_or(|w| row <= w[1].1 as usize) => Err(Gr2Error::invalid(format!(
            "item id {} (row {row}) is already in the SID index; extend adds new items only (remove it \
             first to give it a new SID)",
            item_ids[row]
        ))),
        (_, Some(w)) => Err(Gr2Error::invalid(format!(
            "item id {} appears more than once among the new items (rows {} and {}); item ids must be unique",
            w[0].0,
            w[0].1.min(w[1].1),
            w[0].1.max(w[1].1)
        ))),
        _ => Ok(NewIds { by_id, before }),
    }
}

/// `lookup.lower_bound(sorted, q)` for every query, in parallel chunks searched in lockstep.
fn lower_bounds<K: Key>(lookup: &SortedLookup, sorted: &[K], queries: Vec<u64>) -> Vec<usize> {
    let mut out = vec![0usize; queries.len()];
    out.par_chunks_mut(BOUNDS_CHUNK)
        .zip(queries.par_chunks(BOUNDS_CHUNK))
        .for_each(|(out, queries)| lookup.lower_bounds(sorted, queries, out));
    out
}

/// Queries per parallel task in [`lower_bounds`].
const BOUNDS_CHUNK: usize = 4096;

/// Repairs the new items (sorted by SID) against the existing keys, prefix block by block; also
/// returns where each block's existing keys sit (blocks in ascending order).
fn repair_new<K: Key>(
    keys: &[K],
    lookup: &SortedLookup,
    new: &mut [NewItem],
    geo: &Geometry,
) -> std::result::Result<(Tally, Vec<Range<usize>>), RowError> {
    let mut blocks: Vec<&mut [NewItem]> = new.chunk_by_mut(|a, b| geo.block(a.0) == geo.block(b.0)).collect();
    // the existing keys of each block: one search for its start, then a scan (a block holds few
    // keys, and repair_block reads all of them anyway)
    let starts = lower_bounds(lookup, keys, blocks.iter().map(|block| geo.block_range(block[0].0).0).collect());
    let ranges: Vec<Range<usize>> = blocks
        .par_iter()
        .zip(starts.par_iter())
        .map(|(block, &start)| {
            let hi = geo.block_range(block[0].0).1;
            start..start + keys[start..].iter().take_while(|&&k| wide(k) <= hi).count()
        })
        .collect();
    // (what the blocks did, the error of the smallest row)
    type Outcome = (Tally, Option<RowError>);
    let (tally, first_error) = blocks
        .par_iter_mut()
        .zip(ranges.par_iter())
        .map(|(block, range)| match repair_block(&keys[range.clone()], block, geo) {
            Ok(tally) => (tally, None),
            Err(e) => (Tally::default(), Some(e)),
        })
        .reduce(
            || (Tally::default(), None),
            |(a, ea): Outcome, (b, eb): Outcome| {
                let first = match (ea, eb) {
                    (Some(x), Some(y)) => Some(if y.0 < x.0 { y } else { x }),
                    (x, y) => x.or(y),
                };
                (a.merge(b), first)
            },
        );
    match first_error {
        Some(e) => Err(e),
        None => Ok((tally, ranges)),
    }
}

/// One prefix block: `old` holds the existing keys under the prefix, `items` the new ones.
fn repair_block<K: Key>(old: &[K], items: &mut [NewItem], geo: &Geometry) -> std::result::Result<Tally, RowError> {
    let in_old = |key: u64| old.binary_search_by(|k| wide(*k).cmp(&key)).is_ok();
    // Most blocks (all, for a small extension of a large index) hold no collision: count them
    // without the bitmap and set the full repair below needs (it would count the same).
    if items.windows(2).all(|w| w[0].0 != w[1].0) && !items.iter().any(|e| in_old(e.0)) {
        let len = items.len() as u64;
        return Ok(Tally { unique: len, distinct: len, ..Tally::default() });
    }
    let mut tally = Tally::default();
    let mut occupied = vec![0u64; (geo.code_size as usize).div_ceil(64)];
    for &k in old {
        mark(&mut occupied, geo.code(wide(k)));
    }
    let mut placed: HashSet<u64> = HashSet::with_capacity(items.len());
    let mut movers = Vec::new();
    let mut start = 0;
    while start < items.len() {
        let key = items[start].0;
        let run = items[start..].iter().take_while(|e| e.0 == key).count();
        let held = in_old(key);
        if !held {
            mark(&mut occupied, geo.code(key));
            placed.insert(key);
            tally.distinct += 1;
        }
        let group = run as u64 + u64::from(held);
        if group == 1 {
            tally.unique += 1;
        } else {
            tally.groups.push((group, 1));
        }
        movers.extend(start + usize::from(!held)..start + run);
        start += run;
    }
    let mut free = geo.code_size - occupied.iter().map(|w| w.count_ones()).sum::<u32>();
    let mut counted_full = false;
    for idx in movers {
        let (key, id, row) = items[idx];
        let code = geo.code(key);
        if let Some(target) = if free > 0 { nearest_free(&occupied, geo.code_size, code) } else { None } {
            mark(&mut occupied, target);
            free -= 1;
            let moved = geo.with_code(key, target);
            placed.insert(moved);
            items[idx].0 = moved;
            tally.moved += 1;
            tally.max_move_distance = tally.max_move_distance.max(u64::from(code.abs_diff(target)));
            continue;
        }
        if !counted_full {
            tally.full_prefixes += 1;
            counted_full = true;
        }
        let taken = |k: u64| in_old(k) || placed.contains(&k);
        let mask = geo.disambiguation_mask();
        let slot = geo
            .disambiguation
            .and_then(|size| nearest_untaken((key & mask) as u32, size, |d| taken((key & !mask) | u64::from(d))));
        let Some(d) = slot else {
            return Err((
                row,
                Gr2Error::invalid(format!(
                    "item id {id} (row {row}) cannot get a unique SID without moving existing items: its \
                     SID is taken and its prefix has no free code on level {} (size {}){}; an extension \
                     never changes existing SIDs or adds a level, so rebuild the index over all items",
                    geo.repair_level,
                    geo.code_size,
                    if geo.disambiguation.is_some() { " nor on the disambiguation level" } else { "" },
                )),
            ));
        };
        let moved = (key & !mask) | u64::from(d);
        placed.insert(moved);
        items[idx].0 = moved;
        tally.disambiguated += u64::from(d != 0);
    }
    Ok(tally)
}

/// The value in `0..size` nearest `own` (ties to the lower) for which `taken` is false.
fn nearest_untaken(own: u32, size: u32, taken: impl Fn(u32) -> bool) -> Option<u32> {
    (0..size).flat_map(|dist| [own.checked_sub(dist), own.checked_add(dist)]).flatten().find(|&d| d < size && !taken(d))
}

/// A key width that can own its keys (`u32` narrow, `u64` wide).
trait OwnedKeys: Key {
    fn owned(keys: Vec<Self>) -> Keys;
}

impl OwnedKeys for u32 {
    fn owned(keys: Vec<u32>) -> Keys {
        Keys::Narrow(Buf::Owned(keys))
    }
}

impl OwnedKeys for u64 {
    fn owned(keys: Vec<u64>) -> Keys {
        Keys::Wide(Buf::Owned(keys))
    }
}

/// Two arrays of `len` elements written in parallel chunks: `fill(first, a, b)` must write every
/// slot of the chunks `a`, `b` that start at position `first` (no zero-filling pass first: at 10M
/// items that pass alone costs a sizeable share of an extension).
fn fill_pairs<A: Send, B: Send>(
    len: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<A>], &mut [MaybeUninit<B>]) + Sync,
) -> (Vec<A>, Vec<B>) {
    let (mut a, mut b) = (huge_page_vec::<A>(len), huge_page_vec::<B>(len));
    a.spare_capacity_mut()[..len]
        .par_chunks_mut(FILL_CHUNK)
        .zip(b.spare_capacity_mut()[..len].par_chunks_mut(FILL_CHUNK))
        .enumerate()
        .for_each(|(c, (ca, cb))| fill(c * FILL_CHUNK, ca, cb));
    // SAFETY: every chunk of both buffers was handed to `fill`, which writes all of its slots
    // (the callers below loop over every slot); a panic in `fill` propagates before this line.
    unsafe {
        a.set_len(len);
        b.set_len(len);
    }
    (a, b)
}

/// The `old_a.len() + before.len()` elements of two sorted, disjoint sequences merged: old
/// element `j` is `(old_a[j], old_b(j))`, new element `i` is `new(i)`, and `before[i]`
/// (non-decreasing) is how many old elements precede new element `i`. Each element is a pair,
/// written to two arrays; the runs of `old_a` between new elements are plain copies.
fn interleave_pairs<A: Copy + Send + Sync, B: Send>(
    before: &[usize],
    old_a: &[A],
    old_b: impl Fn(usize) -> B + Sync,
    new: impl Fn(usize) -> (A, B) + Sync,
) -> (Vec<A>, Vec<B>) {
    fill_pairs(old_a.len() + before.len(), |first, a, b| {
        // new element i sits at before[i] + i (strictly increasing)
        let mut i = partition_index(before.len(), |i| before[i] + i < first);
        let mut j = first - i;
        let mut q = 0; // within the chunk
        while q < a.len() {
            // a run of old elements up to the next new one, without a test per element
            let next_new = before.get(i).map_or(usize::MAX, |&bi| bi + i - first);
            let run_end = next_new.min(a.len());
            let len = run_end - q;
            for (sa, &x) in a[q..run_end].iter_mut().zip(&old_a[j..j + len]) {
                sa.write(x);
            }
            for (k, sb) in b[q..run_end].iter_mut().enumerate() {
                sb.write(old_b(j + k));
            }
            j += len;
            q = run_end;
            if q < a.len() {
                let (x, y) = new(i);
                i += 1;
                a[q].write(x);
                b[q].write(y);
                q += 1;
            }
        }
    })
}

/// `#{i : steps[i] <= x}` for a sorted `steps` with values in `0..=n`. Every old element's new
/// position needs one such count at a random `x` (the position arrays are permutations), so the
/// count must cost one cache line that can be prefetched ahead and no branch on how many steps are
/// near `x`: one 16-byte [`Stride`] per [`STEP_STRIDE`] values (the steps before it and the offsets
/// of its first 8 steps), 625 KB at n = 10M, its offsets compared 8 at a time. (The n / 4-byte
/// table this replaced missed the cache on most old items: ~60 ns per item on the shared 2-core
/// box.)
struct StepCount {
    strides: Vec<Stride>,
    /// `steps[i] % STEP_STRIDE`, ascending within each stride: for strides of more than 8 steps.
    low: Vec<u8>,
}

#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Stride {
    /// `#{i : steps[i] < b * STEP_STRIDE}` for stride `b`
    before: u32,
    /// steps inside the stride
    count: u32,
    /// offsets of its first 8 steps inside the stride, ascending (unused bytes: 0xff)
    low: [u8; 8],
}

const STEP_STRIDE: usize = 256;

impl StepCount {
    fn new(steps: &[usize], n: usize) -> Self {
        let buckets = n / STEP_STRIDE + 1;
        let mut strides = Vec::with_capacity(buckets);
        let mut i = 0;
        for b in 0..buckets {
            let before = i;
            let mut low = [u8::MAX; 8];
            while i < steps.len() && steps[i] < (b + 1) * STEP_STRIDE {
                if let Some(slot) = low.get_mut(i - before) {
                    *slot = (steps[i] % STEP_STRIDE) as u8;
                }
                i += 1;
            }
            strides.push(Stride { before: before as u32, count: (i - before) as u32, low });
        }
        let low = steps.iter().map(|&s| (s % STEP_STRIDE) as u8).collect();
        StepCount { strides, low }
    }

    #[inline(always)]
    fn at_most(&self, x: usize) -> usize {
        let stride = &self.strides[x / STEP_STRIDE];
        let within = (x % STEP_STRIDE) as u8;
        let lo = stride.before as usize;
        if stride.count > 8 {
            let hi = lo + stride.count as usize;
            return lo + self.low[lo..hi].partition_point(|&s| s <= within); // clustered steps
        }
        lo + count_at_most(stride.low, within, stride.count)
    }

    /// `(x, self.at_most(x))` for `x = positions[i]`, the element a merge pass streams at `i`; it
    /// also starts loading the stride `positions[i + SHIFT_AHEAD]` will read, so the random
    /// accesses of successive elements overlap instead of each waiting for its cache miss
    /// (halved the merge passes' time at n = 10M).
    #[inline(always)]
    fn at(&self, positions: &[u32], i: usize) -> (usize, usize) {
        if let Some(&ahead) = positions.get(i + SHIFT_AHEAD) {
            prefetch(&self.strides, ahead as usize / STEP_STRIDE);
        }
        let x = positions[i] as usize;
        (x, self.at_most(x))
    }
}

/// How many of the first `count` (<= 8) bytes of `low` are <= `within`.
#[inline(always)]
fn count_at_most(low: [u8; 8], within: u8, count: u32) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_cmpgt_epi8, _mm_loadl_epi64, _mm_movemask_epi8, _mm_set1_epi8, _mm_xor_si128};
        // SAFETY: SSE2 is part of x86_64; the load reads the 8 bytes of `low`.
        let above = unsafe {
            // unsigned s > within as a signed compare of both with the top bit flipped
            let flip = _mm_set1_epi8(i8::MIN);
            let s = _mm_xor_si128(_mm_loadl_epi64(low.as_ptr().cast()), flip);
            let w = _mm_xor_si128(_mm_set1_epi8(within as i8), flip);
            _mm_movemask_epi8(_mm_cmpgt_epi8(s, w)) as u32
        };
        (!above & ((1u32 << count) - 1)).count_ones() as usize
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        low[..count as usize].iter().filter(|&&s| s <= within).count()
    }
}

/// How far ahead (in streamed elements) [`StepCount::at`] prefetches the stride.
const SHIFT_AHEAD: usize = 24;


/// `old(j)` for every `j < n` not in the sorted, duplicate-free `gone`, in order; each element is
/// a pair, written to two arrays.
fn compress_pairs<A: Send, B: Send>(
    gone: &[usize],
    n: usize,
    old: impl Fn(usize) -> (A, B) + Sync,
) -> (Vec<A>, Vec<B>) {
    fill_pairs(n - gone.len(), |first, a, b| {
        // kept element q comes from j = q + #{r : gone[r] - r <= q}
        let mut r = partition_index(gone.len(), |r| gone[r] - r <= first);
        for (q, (sa, sb)) in (first..).zip(a.iter_mut().zip(b.iter_mut())) {
            while r < gone.len() && gone[r] - r <= q {
                r += 1;
            }
            let (x, y) = old(q + r);
            sa.write(x);
            sb.write(y);
        }
    })
}

/// The first `i` in `0..len` for which the monotone predicate `pred` is false.
fn partition_index(len: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod step_count_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(256)))]

        /// Against a plain count, with steps spread out, clustered (many in one stride, or many
        /// equal), at stride ends (offset 255) and at n.
        #[test]
        fn at_most_counts_the_steps(
            n in 1usize..2000,
            raw in proptest::collection::vec((0usize..2001, 0u8..4), 0..300),
        ) {
            let mut steps: Vec<usize> = raw
                .iter()
                .map(|&(s, kind)| match kind {
                    0 => s.min(n),
                    1 => (s % 3) * STEP_STRIDE + STEP_STRIDE - 1, // last offset of a stride
                    2 => n,
                    _ => (s % 8).min(n),                            // clustered at the start
                })
                .filter(|&s| s <= n)
                .collect();
            steps.sort_unstable();
            let counts = StepCount::new(&steps, n);
            let positions: Vec<u32> = (0..n as u32).rev().collect();
            for (i, &x) in positions.iter().enumerate() {
                let want = steps.iter().filter(|&&s| s <= x as usize).count();
                prop_assert_eq!(counts.at_most(x as usize), want, "x = {}", x);
                prop_assert_eq!(counts.at(&positions, i), (x as usize, want));
            }
        }
    }
}
