//! Building an index: validation, sorting, and the deterministic collision repair.
//!
//! Repair strategy (the same one `tests/test_index.py` re-implements in plain Python):
//! 1. Sort items by (SID, item id). A *collision group* is a run of items with the same SID.
//! 2. In every group the item with the smallest id keeps its SID; the others are *movers*.
//! 3. Per (L-1)-prefix, movers are handled in ascending (original SID, item id) order. Each moves
//!    to the free last-level code nearest its original one (|code - original|, ties to the lower
//!    code). A code is free when no item of that prefix holds it (originally or after a move).
//!    So an item whose SID nobody else shares never changes.
//! 4. When a prefix has no free last-level code left, its remaining movers stay where they are
//!    and one disambiguation level is appended to *every* SID: 0 for items alone on their SID,
//!    and within each still-shared SID the items are numbered 0, 1, 2, ... by ascending id (the
//!    kept item is the smallest, so it gets 0). The new level's size is the largest such group.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::layout::KeyLayout;
use super::{huge_page_vec, Buf, Keys, RepairReport};
use crate::error::{Gr2Error, Result};

/// Default level size when the caller gives none: RQ codebooks almost always have 256 codes, so
/// we assume 256 unless a code says otherwise, in which case the size is max code + 1.
pub const DEFAULT_LEVEL_SIZE: u32 = 256;

/// The arrays an index consists of (see `SidIndex` for their meaning).
pub(super) struct Built {
    pub layout: KeyLayout,
    pub report: RepairReport,
    pub sorted_ids: Vec<u64>,
    pub sid_pos: Vec<u32>,
    pub sorted_keys: Keys,
    pub item_pos: Vec<u32>,
}

/// `(packed SID, position of the item in id order)`; sorting these sorts by (SID, item id).
pub(super) type Entry = (u64, u32);

pub(super) fn build(
    item_ids: &[u64],
    codes: &[u16],
    levels: usize,
    level_sizes: Option<&[u32]>,
) -> Result<Built> {
    let n = item_ids.len();
    if levels == 0 {
        return Err(Gr2Error::invalid("codes must have at least one level (got shape (n, 0))"));
    }
    if codes.len() != n * levels {
        return Err(Gr2Error::invalid(format!(
            "codes hold {} values but {n} items x {levels} levels need {}",
            codes.len(),
            n * levels
        )));
    }
    if n >= u32::MAX as usize {
        return Err(Gr2Error::invalid(format!(
            "an index holds fewer than {} items (got {n})",
            u32::MAX
        )));
    }
    let layout = KeyLayout::new(&resolve_level_sizes(codes, levels, level_sizes)?)?;
    check_code_ranges(codes, &layout, 0)?;

    let by_id = sort_by_id(item_ids)?;
    let keys_by_row: Vec<u64> = codes.par_chunks(levels).map(|row| layout.pack(row)).collect();
    let mut by_sid: Vec<Entry> = by_id
        .par_iter()
        .enumerate()
        .map(|(j, &(_, row))| (keys_by_row[row as usize], j as u32))
        .collect();
    drop(keys_by_row);
    let mut sorted_ids = huge_page_vec::<u64>(n);
    sorted_ids.par_extend(by_id.par_iter().map(|&(id, _)| id));
    drop(by_id);
    by_sid.par_sort_unstable();

    let tally = repair(&mut by_sid, &layout);
    let full_prefixes = tally.full_prefixes;
    let mut report = tally.into_report(levels, n as u64);
    let layout = if full_prefixes > 0 {
        let (wider, disambiguated) = append_disambiguation_level(&mut by_sid, &layout)?;
        report.level_appended = true;
        report.items_disambiguated = disambiguated;
        wider
    } else {
        layout
    };

    let sorted_keys = if Keys::width(layout.total_bits()) == 4 {
        let mut keys = huge_page_vec::<u32>(n);
        keys.par_extend(by_sid.par_iter().map(|&(key, _)| key as u32)); // fits: total_bits <= 32
        Keys::Narrow(Buf::Owned(keys))
    } else {
        let mut keys = huge_page_vec::<u64>(n);
        keys.par_extend(by_sid.par_iter().map(|&(key, _)| key));
        Keys::Wide(Buf::Owned(keys))
    };
    let mut item_pos = huge_page_vec::<u32>(n);
    item_pos.par_extend(by_sid.par_iter().map(|&(_, j)| j));
    drop(by_sid);
    let mut sid_pos = huge_page_vec::<u32>(n);
    sid_pos.resize(n, 0);
    for (p, &j) in item_pos.iter().enumerate() {
        sid_pos[j as usize] = p as u32;
    }
    Ok(Built { layout, report, sorted_ids, sid_pos, sorted_keys, item_pos })
}

fn resolve_level_sizes(codes: &[u16], levels: usize, given: Option<&[u32]>) -> Result<Vec<u32>> {
    match given {
        Some(sizes) if sizes.len() != levels => Err(Gr2Error::invalid(format!(
            "codebook_size lists {} level sizes but codes have {levels} levels",
            sizes.len()
        ))),
        Some(sizes) => Ok(sizes.to_vec()),
        None => {
            let max_code = codes.par_iter().copied().max().map_or(0, u32::from);
            Ok(vec![DEFAULT_LEVEL_SIZE.max(max_code + 1); levels])
        }
    }
}

/// Fails on the first code outside its level's size; rows are numbered from `first_row`.
pub(super) fn check_code_ranges(codes: &[u16], layout: &KeyLayout, first_row: usize) -> Result<()> {
    let levels = layout.levels();
    let Some(row) = codes.par_chunks(levels).position_first(|r| layout.first_out_of_range(r).is_some())
    else {
        return Ok(());
    };
    let values = &codes[row * levels..(row + 1) * levels];
    let level = layout.first_out_of_range(values).unwrap_or(0);
    Err(Gr2Error::invalid(format!(
        "codes[{}, {level}] = {} is out of range: level {level} has codebook size {} \
         (codes must be < codebook_size)",
        first_row + row,
        values[level],
        layout.sizes()[level]
    )))
}

/// `(item id, input row)` sorted by id; fails on the smallest duplicated id.
fn sort_by_id(item_ids: &[u64]) -> Result<Vec<(u64, u32)>> {
    let mut by_id: Vec<(u64, u32)> =
        item_ids.par_iter().enumerate().map(|(row, &id)| (id, row as u32)).collect();
    by_id.par_sort_unstable();
    if let Some(i) = by_id.par_windows(2).position_first(|w| w[0].0 == w[1].0) {
        let ((id, first), (_, second)) = (by_id[i], by_id[i + 1]);
        return Err(Gr2Error::invalid(format!(
            "item id {id} appears more than once (rows {first} and {second}); item ids must be unique"
        )));
    }
    Ok(by_id)
}

#[derive(Default)]
pub(super) struct Tally {
    pub unique: u64,
    pub distinct: u64,
    pub groups: BTreeMap<u64, u64>,
    pub moved: u64,
    pub max_move_distance: u64,
    pub full_prefixes: u64,
}

impl Tally {
    pub(super) fn merge(mut self, other: Tally) -> Tally {
        self.unique += other.unique;
        self.distinct += other.distinct;
        for (size, count) in other.groups {
            *self.groups.entry(size).or_default() += count;
        }
        self.moved += other.moved;
        self.max_move_distance = self.max_move_distance.max(other.max_move_distance);
        self.full_prefixes += other.full_prefixes;
        self
    }

    /// The report of a repair over `items` items of `levels_in` levels; whether a level was
    /// appended (and for how many items) is the caller's to fill in.
    pub(super) fn into_report(self, levels_in: usize, items: u64) -> RepairReport {
        RepairReport {
            levels_in,
            items,
            unique_items_before: self.unique,
            distinct_sids_before: self.distinct,
            collision_group_sizes: self.groups.into_iter().collect(),
            items_moved: self.moved,
            max_move_distance: self.max_move_distance,
            full_prefixes: self.full_prefixes,
            level_appended: false,
            items_disambiguated: 0,
        }
    }
}

/// Counts collisions and repairs them prefix by prefix (in parallel over slices that start and
/// end on prefix boundaries; moves never leave their prefix, so slices stay independent).
fn repair(by_sid: &mut [Entry], layout: &KeyLayout) -> Tally {
    let last = layout.levels() - 1;
    let last_bits = layout.bits(last);
    let last_size = layout.sizes()[last];
    let parts = rayon::current_num_threads() * 4;
    split_on_prefixes(by_sid, last_bits, parts)
        .into_par_iter()
        .map(|slice| repair_slice(slice, last_bits, last_size))
        .reduce(Tally::default, Tally::merge)
}

fn split_on_prefixes(mut rest: &mut [Entry], last_bits: u32, parts: usize) -> Vec<&mut [Entry]> {
    let target = rest.len().div_ceil(parts.max(1)).max(1);
    let mut slices = Vec::with_capacity(parts);
    while rest.len() > target {
        let prefix = rest[target].0 >> last_bits;
        let cut = target + rest[target..].partition_point(|e| e.0 >> last_bits == prefix);
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(cut);
        slices.push(head);
        rest = tail;
    }
    slices.push(rest);
    slices
}

pub(super) fn repair_slice(slice: &mut [Entry], last_bits: u32, last_size: u32) -> Tally {
    let mut tally = Tally::default();
    let mut occupied = vec![0u64; (last_size as usize).div_ceil(64)];
    let mut movers = Vec::new();
    let mut start = 0;
    while start < slice.len() {
        let prefix = slice[start].0 >> last_bits;
        let mut end = start;
        let mut collides = false;
        while end < slice.len() && slice[end].0 >> last_bits == prefix {
            let key = slice[end].0;
            let run_end = end + slice[end..].iter().take_while(|e| e.0 == key).count();
            let size = (run_end - end) as u64;
            tally.distinct += 1;
            if size == 1 {
                tally.unique += 1;
            } else {
                *tally.groups.entry(size).or_default() += 1;
                collides = true;
            }
            end = run_end;
        }
        if collides {
            repair_prefix(&mut slice[start..end], last_bits, last_size, &mut occupied, &mut movers, &mut tally);
        }
        start = end;
    }
    tally
}

/// Moves the movers of one prefix (all items of `items` share the prefix) to free last-level codes.
fn repair_prefix(
    items: &mut [Entry],
    last_bits: u32,
    last_size: u32,
    occupied: &mut [u64],
    movers: &mut Vec<usize>,
    tally: &mut Tally,
) {
    let mask = (1u64 << last_bits) - 1;
    occupied.fill(0);
    movers.clear();
    for idx in 0..items.len() {
        let code = (items[idx].0 & mask) as usize;
        occupied[code / 64] |= 1 << (code % 64);
        if idx > 0 && items[idx - 1].0 == items[idx].0 {
            movers.push(idx);
        }
    }
    let taken: u32 = occupied.iter().map(|w| w.count_ones()).sum();
    let mut free = last_size - taken;
    for &idx in movers.iter() {
        let code = (items[idx].0 & mask) as u32;
        let target = if free > 0 { nearest_free(occupied, last_size, code) } else { None };
        let Some(target) = target else {
            tally.full_prefixes += 1;
            break;
        };
        occupied[target as usize / 64] |= 1 << (target % 64);
        free -= 1;
        items[idx].0 = (items[idx].0 & !mask) | u64::from(target);
        tally.moved += 1;
        tally.max_move_distance = tally.max_move_distance.max(u64::from(code.abs_diff(target)));
    }
    items.sort_unstable();
}

/// The free code nearest `code` in `0..size` (ties to the lower one); `code` itself is taken.
pub(super) fn nearest_free(occupied: &[u64], size: u32, code: u32) -> Option<u32> {
    match (free_below(occupied, code), free_above(occupied, size, code)) {
        (Some(below), Some(above)) => Some(if code - below <= above - code { below } else { above }),
        (below, above) => below.or(above),
    }
}

fn free_below(occupied: &[u64], code: u32) -> Option<u32> {
    let mut word = (code / 64) as usize;
    let mut free = !occupied[word] & ((1u64 << (code % 64)) - 1);
    loop {
        if free != 0 {
            return Some(word as u32 * 64 + 63 - free.leading_zeros());
        }
        if word == 0 {
            return None;
        }
        word -= 1;
        free = !occupied[word];
    }
}

fn free_above(occupied: &[u64], size: u32, code: u32) -> Option<u32> {
    let mut word = (code / 64) as usize;
    let bit = code % 64;
    let mut free = if bit == 63 { 0 } else { !occupied[word] & (u64::MAX << (bit + 1)) };
    loop {
        let valid_bits = size.saturating_sub(word as u32 * 64).min(64);
        if valid_bits < 64 {
            free &= (1u64 << valid_bits) - 1;
        }
        if free != 0 {
            return Some(word as u32 * 64 + free.trailing_zeros());
        }
        word += 1;
        if word >= occupied.len() {
            return None;
        }
        free = !occupied[word];
    }
}

/// The layout with the disambiguation level appended, for `largest` items sharing one SID after
/// the moves (the error says why the codes cannot be told apart).
pub(super) fn disambiguation_layout(layout: &KeyLayout, largest: usize) -> Result<KeyLayout> {
    if largest > super::layout::MAX_LEVEL_SIZE as usize {
        return Err(Gr2Error::invalid(format!(
            "{largest} items share one SID whose prefix has no free last-level code; a \
             disambiguation level can tell at most {} apart. The codes are too degenerate: use \
             more levels or a larger codebook",
            super::layout::MAX_LEVEL_SIZE
        )));
    }
    layout.with_level(largest as u32).map_err(|err| {
        Gr2Error::invalid(format!(
            "collision repair needs a disambiguation level of size {largest} after the {} input levels, \
             but {err}; use fewer levels or a larger last-level codebook",
            layout.levels()
        ))
    })
}

/// Appends the disambiguation level (see the module docs); returns the new layout and how many
/// items got a non-zero code on it.
fn append_disambiguation_level(by_sid: &mut [Entry], layout: &KeyLayout) -> Result<(KeyLayout, u64)> {
    let mut largest = 1usize;
    let mut run = 0usize;
    for i in 0..by_sid.len() {
        run = if i > 0 && by_sid[i - 1].0 == by_sid[i].0 { run + 1 } else { 1 };
        largest = largest.max(run);
    }
    let wider = disambiguation_layout(layout, largest)?;
    let extra_bits = wider.bits(layout.levels());
    let mut disambiguated = 0;
    let mut previous = None;
    let mut rank = 0u64;
    for entry in by_sid.iter_mut() {
        rank = if previous == Some(entry.0) { rank + 1 } else { 0 };
        previous = Some(entry.0);
        disambiguated += u64::from(rank > 0);
        entry.0 = (entry.0 << extra_bits) | rank;
    }
    Ok((wider, disambiguated))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn occupied_from(codes: &[u32], size: u32) -> Vec<u64> {
        let mut occupied = vec![0u64; (size as usize).div_ceil(64)];
        for &c in codes {
            occupied[c as usize / 64] |= 1 << (c % 64);
        }
        occupied
    }

    fn nearest_free_naive(taken: &[u32], size: u32, code: u32) -> Option<u32> {
        (0..size).filter(|c| !taken.contains(c)).min_by_key(|&c| (c.abs_diff(code), c))
    }

    #[test]
    fn nearest_free_matches_naive() {
        for size in [1u32, 2, 63, 64, 65, 130, 256] {
            for code in 0..size {
                for taken_every in 1..5u32 {
                    let mut taken: Vec<u32> = (0..size).filter(|c| c % taken_every != 1).collect();
                    if !taken.contains(&code) {
                        taken.push(code);
                    }
                    let occupied = occupied_from(&taken, size);
                    assert_eq!(
                        nearest_free(&occupied, size, code),
                        nearest_free_naive(&taken, size, code),
                        "size {size} code {code} every {taken_every}"
                    );
                }
            }
        }
    }

    #[test]
    fn split_respects_prefixes() {
        let mut entries: Vec<Entry> = (0..1000u64).map(|i| ((i / 7) << 4 | (i % 3), i as u32)).collect();
        entries.sort_unstable();
        let copy = entries.clone();
        let slices = split_on_prefixes(&mut entries, 4, 8);
        let mut total = 0;
        let mut last_prefix = None;
        for slice in slices {
            total += slice.len();
            if let (Some(prev), Some(first)) = (last_prefix, slice.first()) {
                assert!(first.0 >> 4 > prev);
            }
            last_prefix = slice.last().map(|e| e.0 >> 4).or(last_prefix);
        }
        assert_eq!(total, copy.len());
    }
}
