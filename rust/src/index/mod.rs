//! The semantic-ID index: a bijection between item ids (`u64`) and semantic IDs (one `u16` code
//! per level), built with deterministic collision repair (see [`build`](self::build) module docs),
//! looked up in large batches in both directions, and saved to / loaded from a checksummed file
//! (see the `file` module; loading copies the file into memory unless memory-mapping is asked for,
//! see [`LoadMode`]).
//!
//! Storage, 20 bytes per item when a packed SID fits 32 bits (e.g. up to 4 levels of 256 codes),
//! else 24, plus a bucket table of 1/8 byte per item per direction:
//! - `sorted_ids[j]`  item ids ascending (u64) and `sid_pos[j]` the SID-order position of item j;
//! - `sorted_keys[p]` packed SIDs ascending (u32 or u64, see [`Keys`]) and `item_pos[p]` the
//!   id-order position of SID p.
//!
//! SID order is the lexicographic order of SIDs, so the items under any SID prefix form one
//! contiguous range `p in start..end` ([`SidIndex::prefix_range`], [`SidIndex::children`]) —
//! the view constrained decoding needs.

/// Runs `$body` with `$keys` bound to the key slice (`&[u32]` or `&[u64]`): the code is generic
/// over [`Key`], the macro just instantiates it for each width.
macro_rules! with_keys {
    ($index_keys:expr, |$keys:ident| $body:expr) => {
        match &$index_keys {
            Keys::Narrow(buf) => {
                let $keys: &[u32] = buf.as_slice();
                $body
            }
            Keys::Wide(buf) => {
                let $keys: &[u64] = buf.as_slice();
                $body
            }
        }
    };
}

mod build;
mod external;
mod file;
pub mod layout;
mod search;
mod update;

use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;

pub use build::DEFAULT_LEVEL_SIZE;
pub use external::{SidIndexWriter, DEFAULT_CHUNK_ITEMS};
pub use file::FORMAT_VERSION;
pub use layout::{KeyLayout, MAX_LEVELS};
use search::{wide, Key, SortedLookup, NOT_FOUND};

use crate::error::{Gr2Error, Result};

/// Rows per parallel task in batched lookups.
const LOOKUP_CHUNK: usize = 4096;
/// How many rows ahead the gather passes prefetch: each gather is a random DRAM access, and a
/// plain loop keeps too few of them in flight (measured ~15-25% faster lookups at n = 10M).
const PREFETCH_AHEAD: usize = 16;

/// Hint the CPU to fetch `slice[i]` (nothing when `i` is out of range, e.g. NOT_FOUND).
#[inline(always)]
fn prefetch<T>(slice: &[T], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = slice.get(i) {
        // SAFETY: a prefetch of a valid address has no observable effect besides the cache.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((x as *const T).cast()) }
    }
}

/// What collision repair found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairReport {
    /// Levels of the input codes (the index has `levels_in + 1` when a level was appended).
    pub levels_in: usize,
    pub items: u64,
    /// Items whose input SID no other item shared.
    pub unique_items_before: u64,
    /// Distinct SIDs among the input codes.
    pub distinct_sids_before: u64,
    /// `(group size, number of groups)` for every SID shared by >= 2 items, by ascending size.
    pub collision_group_sizes: Vec<(u64, u64)>,
    /// Items moved to another last-level code.
    pub items_moved: u64,
    /// Largest |new code - original code| of a moved item.
    pub max_move_distance: u64,
    /// Prefixes whose last level ran out of free codes (each forces the appended level).
    pub full_prefixes: u64,
    pub level_appended: bool,
    /// Items with a non-zero code on the appended level.
    pub items_disambiguated: u64,
}

impl RepairReport {
    /// Share of items whose SID no other item shared before repair (1.0 for an empty index).
    pub fn uniqueness_before_repair(&self) -> f64 {
        if self.items == 0 {
            1.0
        } else {
            self.unique_items_before as f64 / self.items as f64
        }
    }

    /// Distinct SIDs before repair divided by the number of items (1.0 for an empty index).
    pub fn distinct_ratio_before(&self) -> f64 {
        if self.items == 0 {
            1.0
        } else {
            self.distinct_sids_before as f64 / self.items as f64
        }
    }

    /// Number of SIDs shared by >= 2 items before repair.
    pub fn collision_groups(&self) -> u64 {
        self.collision_group_sizes.iter().map(|&(_, count)| count).sum()
    }
}

/// The next-level code under a prefix and the SID-order positions of the items below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Child {
    pub code: u16,
    pub items: Range<usize>,
}

/// The bytes of a whole index file: read into memory the index owns (the default, see
/// [`LoadMode`]) or memory-mapped.
enum FileBytes {
    /// Held as `u64` words so every 64-byte-aligned section can be viewed as `u64`/`u32`.
    Owned { words: Vec<u64>, len: usize },
    Mapped(Mmap),
}

impl FileBytes {
    #[inline]
    fn bytes(&self) -> &[u8] {
        match self {
            FileBytes::Owned { words, len } => &bytemuck::cast_slice(words)[..*len],
            FileBytes::Mapped(map) => map,
        }
    }
}

/// An array that is either owned (fresh from `build`) or a section of a loaded file.
enum Buf<T> {
    Owned(Vec<T>),
    File { file: Arc<FileBytes>, bytes: Range<usize> },
}

impl<T: bytemuck::Pod> Buf<T> {
    #[inline]
    fn as_slice(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            // Sections are validated at load to be in bounds and 64-byte aligned.
            Buf::File { file, bytes } => bytemuck::cast_slice(&file.bytes()[bytes.clone()]),
        }
    }
}

/// How [`SidIndex::load_with`] holds the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadMode {
    /// Read the whole file into memory the index owns and verify it (the default). The loaded
    /// index never changes, whatever later happens to the file.
    #[default]
    Copy,
    /// Memory-map the file (validated once at load; pages shared with the page cache and other
    /// processes). The file must then not be modified in place while the index is alive:
    /// rewriting it changes the index's answers and truncating it kills the process with SIGBUS.
    /// Replacing it by rename (as [`SidIndex::save`] does) is safe: the map keeps the old inode.
    Mmap,
}

/// The packed SIDs in SID order, 4 bytes each when the layout needs at most 32 bits, else 8:
/// the narrow form saves a sixth of the index and halves the bytes the SID-side searches touch.
enum Keys {
    Narrow(Buf<u32>),
    Wide(Buf<u64>),
}

impl Keys {
    /// Bytes per key for a layout of `total_bits`.
    fn width(total_bits: u32) -> usize {
        if total_bits <= 32 {
            4
        } else {
            8
        }
    }

    fn byte_len(&self) -> usize {
        with_keys!(self, |keys| std::mem::size_of_val(keys))
    }
}

/// An empty vector with room for `len` elements whose pages the kernel is asked to back with
/// transparent huge pages: random lookups over hundreds of MB spend most of their time in TLB
/// misses with 4 KiB pages (3x slower gathers measured on the 2-core VM). Only a hint.
pub(crate) fn huge_page_vec<T>(len: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (v.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (v.as_ptr() as usize + len * std::mem::size_of::<T>()) / PAGE * PAGE;
        if end > start + (4 << 20) {
            // SAFETY: advice on whole pages inside our own allocation; it changes no contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// See the module docs. Immutable after construction and `Send + Sync`: share it freely.
pub struct SidIndex {
    layout: KeyLayout,
    report: RepairReport,
    sorted_ids: Buf<u64>,
    sid_pos: Buf<u32>,
    sorted_keys: Keys,
    item_pos: Buf<u32>,
    id_lookup: SortedLookup,
    key_lookup: SortedLookup,
    /// 0 for an index fresh from `build`; +1 for every [`extend`](Self::extend) or
    /// [`remove`](Self::remove) that derived it (saved in the file header).
    generation: u32,
}

impl std::fmt::Debug for SidIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidIndex")
            .field("len", &self.len())
            .field("level_sizes", &self.level_sizes())
            .field("report", &self.report)
            .field("generation", &self.generation)
            .finish()
    }
}

impl SidIndex {
    /// Builds the index from `item_ids` (n, unique) and row-major `codes` (n x `levels`).
    ///
    /// `level_sizes[l]` is the exclusive upper bound of level-l codes (the codebook size); when
    /// `None`, every level gets `max(256, largest code + 1)`. Collisions are repaired as the
    /// `build` module describes, possibly appending one level.
    pub fn build(item_ids: &[u64], codes: &[u16], levels: usize, level_sizes: Option<&[u32]>) -> Result<Self> {
        let built = build::build(item_ids, codes, levels, level_sizes)?;
        Ok(Self::from_parts(
            built.layout,
            built.report,
            Buf::Owned(built.sorted_ids),
            Buf::Owned(built.sid_pos),
            built.sorted_keys,
            Buf::Owned(built.item_pos),
            0,
            None,
        ))
    }

    /// The index over these arrays; `lookups` are the two bucket tables (id side, key side)
    /// when the caller already has them for these arrays, else they are built here.
    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        layout: KeyLayout,
        report: RepairReport,
        sorted_ids: Buf<u64>,
        sid_pos: Buf<u32>,
        sorted_keys: Keys,
        item_pos: Buf<u32>,
        generation: u32,
        lookups: Option<(SortedLookup, SortedLookup)>,
    ) -> Self {
        let (id_lookup, key_lookup) = lookups.unwrap_or_else(|| {
            rayon::join(
                || SortedLookup::new(sorted_ids.as_slice()),
                || with_keys!(sorted_keys, |keys| SortedLookup::new(keys)),
            )
        });
        SidIndex { layout, report, sorted_ids, sid_pos, sorted_keys, item_pos, id_lookup, key_lookup, generation }
    }

    pub fn len(&self) -> usize {
        self.sorted_ids.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Levels of every SID in the index (`L` or `L + 1` after a disambiguation level).
    pub fn levels(&self) -> usize {
        self.layout.levels()
    }

    /// Exclusive upper bound of the codes of each level.
    pub fn level_sizes(&self) -> &[u32] {
        self.layout.sizes()
    }

    pub fn layout(&self) -> &KeyLayout {
        &self.layout
    }

    pub fn repair_report(&self) -> &RepairReport {
        &self.report
    }

    /// How many [`extend`](Self::extend)/[`remove`](Self::remove) steps separate this index from
    /// the `build` it started as (0 for a built index and for files written before gr2 recorded it).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn uniqueness_before_repair(&self) -> f64 {
        self.report.uniqueness_before_repair()
    }

    /// Whether the arrays live in a memory-mapped file ([`LoadMode::Mmap`]).
    pub fn is_mapped(&self) -> bool {
        matches!(&self.sorted_ids, Buf::File { file, .. } if matches!(**file, FileBytes::Mapped(_)))
    }

    /// Bytes held for lookups: the four arrays plus the two bucket tables.
    pub fn memory_bytes(&self) -> usize {
        self.len() * (8 + 4 + 4) + self.sorted_keys.byte_len() + self.id_lookup.table_bytes() + self.key_lookup.table_bytes()
    }

    pub fn contains(&self, item_id: u64) -> bool {
        self.id_lookup.find(self.sorted_ids.as_slice(), item_id).is_some()
    }

    /// SID-order position of an item.
    pub fn position_of_item(&self, item_id: u64) -> Option<usize> {
        let j = self.id_lookup.find(self.sorted_ids.as_slice(), item_id)?;
        Some(self.sid_pos.as_slice()[j] as usize)
    }

    /// SID-order position of a SID (`codes.len()` must equal `levels()`).
    pub fn position_of_sid(&self, codes: &[u16]) -> Option<usize> {
        if codes.len() != self.levels() || self.layout.first_out_of_range(codes).is_some() {
            return None;
        }
        with_keys!(self.sorted_keys, |keys| self.key_lookup.find(keys, self.layout.pack(codes)))
    }

    /// The item at SID-order position `p` (`p < len()`).
    pub fn item_at(&self, p: usize) -> u64 {
        self.sorted_ids.as_slice()[self.item_pos.as_slice()[p] as usize]
    }

    /// The packed SID at SID-order position `p`.
    pub fn key_at(&self, p: usize) -> u64 {
        with_keys!(self.sorted_keys, |keys| wide(keys[p]))
    }

    /// Writes the SID at SID-order position `p` into `out` (`levels()` codes).
    pub fn sid_at(&self, p: usize, out: &mut [u16]) {
        self.layout.unpack(self.key_at(p), out);
    }

    /// All item ids in SID order.
    pub fn item_ids_by_sid(&self) -> Vec<u64> {
        let ids = self.sorted_ids.as_slice();
        self.item_pos.as_slice().par_iter().map(|&j| ids[j as usize]).collect()
    }

    /// All SIDs in SID order, row-major (`len() x levels()`).
    pub fn codes_by_sid(&self) -> Vec<u16> {
        let levels = self.levels();
        let mut out = vec![0u16; self.len() * levels];
        with_keys!(self.sorted_keys, |keys| {
            out.par_chunks_mut(levels).zip(keys.par_iter()).for_each(|(row, &key)| self.layout.unpack(wide(key), row))
        });
        out
    }

    /// The SIDs of `item_ids`, row-major (`item_ids.len() x levels()`).
    pub fn sids(&self, item_ids: &[u64]) -> Result<Vec<u16>> {
        let mut out = vec![0u16; item_ids.len() * self.levels()];
        self.sids_into(item_ids, &mut out)?;
        Ok(out)
    }

    /// Like [`sids`](Self::sids) into a caller's buffer. On an unknown id the error names the
    /// first such id and its row; `out` is then unspecified.
    pub fn sids_into(&self, item_ids: &[u64], out: &mut [u16]) -> Result<()> {
        let levels = self.levels();
        if out.len() != item_ids.len() * levels {
            return Err(Gr2Error::invalid(format!(
                "output holds {} codes but {} items x {levels} levels need {}",
                out.len(),
                item_ids.len(),
                item_ids.len() * levels
            )));
        }
        let first_unknown = with_keys!(self.sorted_keys, |keys| self.sids_rows(keys, item_ids, out));
        match first_unknown {
            None => Ok(()),
            Some(row) => Err(Gr2Error::UnknownItem(format!(
                "item id {} (row {row}) is not in the SID index ({} items)",
                item_ids[row],
                self.len()
            ))),
        }
    }

    /// The items of row-major `sids` (`m x levels()`).
    pub fn items(&self, sids: &[u16]) -> Result<Vec<u64>> {
        let mut out = vec![0u64; sids.len() / self.levels().max(1)];
        self.items_into(sids, &mut out)?;
        Ok(out)
    }

    /// Like [`items`](Self::items) into a caller's buffer. On a SID that maps to no item (or has
    /// a code out of its level's range) the error names the first such SID and its row.
    pub fn items_into(&self, sids: &[u16], out: &mut [u64]) -> Result<()> {
        let levels = self.levels();
        if sids.len() != out.len() * levels {
            return Err(Gr2Error::invalid(format!(
                "SIDs hold {} codes, which is not {} rows x {levels} levels",
                sids.len(),
                out.len()
            )));
        }
        let first_unknown = with_keys!(self.sorted_keys, |keys| self.items_rows(keys, sids, out));
        match first_unknown {
            None => Ok(()),
            Some(row) => Err(self.unknown_sid_error(&sids[row * levels..(row + 1) * levels], row)),
        }
    }

    /// [`sids_into`](Self::sids_into) for one key width; returns the first unknown row.
    fn sids_rows<K: Key>(&self, keys: &[K], item_ids: &[u64], out: &mut [u16]) -> Option<usize> {
        let levels = self.levels();
        let (ids, sid_pos) = (self.sorted_ids.as_slice(), self.sid_pos.as_slice());
        item_ids
            .par_chunks(LOOKUP_CHUNK)
            .zip(out.par_chunks_mut(LOOKUP_CHUNK * levels))
            .enumerate()
            .filter_map(|(chunk, (queries, rows))| {
                let mut pos = [0u32; LOOKUP_CHUNK];
                let pos = &mut pos[..queries.len()];
                self.id_lookup.find_many(ids, queries, pos);
                // Separate passes keep many independent loads in flight.
                let mut unknown = None;
                for i in 0..pos.len() {
                    if let Some(&ahead) = pos.get(i + PREFETCH_AHEAD) {
                        prefetch(sid_pos, ahead as usize);
                    }
                    let p = &mut pos[i];
                    if *p == NOT_FOUND {
                        unknown = unknown.or(Some(i));
                        *p = 0;
                    } else {
                        *p = sid_pos[*p as usize];
                    }
                }
                if let Some(i) = unknown {
                    return Some(chunk * LOOKUP_CHUNK + i);
                }
                for (i, (row, &p)) in rows.chunks_exact_mut(levels).zip(pos.iter()).enumerate() {
                    if let Some(&ahead) = pos.get(i + PREFETCH_AHEAD) {
                        prefetch(keys, ahead as usize);
                    }
                    self.layout.unpack(wide(keys[p as usize]), row);
                }
                None
            })
            .min()
    }

    /// [`items_into`](Self::items_into) for one key width; returns the first unknown row.
    fn items_rows<K: Key>(&self, keys: &[K], sids: &[u16], out: &mut [u64]) -> Option<usize> {
        let levels = self.levels();
        let (ids, item_pos) = (self.sorted_ids.as_slice(), self.item_pos.as_slice());
        sids
            .par_chunks(LOOKUP_CHUNK * levels)
            .zip(out.par_chunks_mut(LOOKUP_CHUNK))
            .enumerate()
            .filter_map(|(chunk, (rows, items))| {
                let mut queries = [0u64; LOOKUP_CHUNK];
                let mut pos = [0u32; LOOKUP_CHUNK];
                let (queries, pos) = (&mut queries[..items.len()], &mut pos[..items.len()]);
                let mut invalid = None;
                for (i, (row, query)) in rows.chunks_exact(levels).zip(queries.iter_mut()).enumerate() {
                    if self.layout.first_out_of_range(row).is_some() {
                        invalid = invalid.or(Some(i));
                    } else {
                        *query = self.layout.pack(row);
                    }
                }
                self.key_lookup.find_many(keys, queries, pos);
                let missing = pos.iter().position(|&p| p == NOT_FOUND);
                let unknown = match (invalid, missing) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let Some(i) = unknown {
                    return Some(chunk * LOOKUP_CHUNK + i);
                }
                // Separate passes keep many independent loads in flight.
                for i in 0..pos.len() {
                    if let Some(&ahead) = pos.get(i + PREFETCH_AHEAD) {
                        prefetch(item_pos, ahead as usize);
                    }
                    pos[i] = item_pos[pos[i] as usize];
                }
                for (i, (item, &j)) in items.iter_mut().zip(pos.iter()).enumerate() {
                    if let Some(&ahead) = pos.get(i + PREFETCH_AHEAD) {
                        prefetch(ids, ahead as usize);
                    }
                    *item = ids[j as usize];
                }
                None
            })
            .min()
    }

    fn unknown_sid_error(&self, sid: &[u16], row: usize) -> Gr2Error {
        match self.layout.first_out_of_range(sid) {
            Some(level) => Gr2Error::UnknownSid(format!(
                "SID {sid:?} (row {row}) is not a valid SID: its level-{level} code {} is >= the \
                 level size {}",
                sid[level],
                self.level_sizes()[level]
            )),
            None => Gr2Error::UnknownSid(format!("SID {sid:?} (row {row}) maps to no item of the SID index")),
        }
    }

    fn check_prefix(&self, prefix: &[u16]) -> Result<()> {
        if prefix.len() > self.levels() {
            return Err(Gr2Error::invalid(format!(
                "prefix {prefix:?} has {} codes but SIDs have {} levels",
                prefix.len(),
                self.levels()
            )));
        }
        if let Some(level) = self.layout.first_out_of_range(prefix) {
            return Err(Gr2Error::invalid(format!(
                "prefix {prefix:?}: level-{level} code {} is >= the level size {}",
                prefix[level],
                self.level_sizes()[level]
            )));
        }
        Ok(())
    }

    /// SID-order positions of the items whose SID starts with `prefix` (empty range if none).
    pub fn prefix_range(&self, prefix: &[u16]) -> Result<Range<usize>> {
        self.check_prefix(prefix)?;
        let (lo, hi) = self.layout.prefix_bounds(prefix);
        Ok(with_keys!(self.sorted_keys, |keys| {
            let start = keys.partition_point(|&k| wide(k) < lo);
            start..start + keys[start..].partition_point(|&k| wide(k) <= hi)
        }))
    }

    /// The distinct next-level codes under `prefix` (ascending) with the range of items below
    /// each. A complete SID (`prefix.len() == levels()`) and an absent prefix have no children.
    pub fn children(&self, prefix: &[u16]) -> Result<Vec<Child>> {
        let range = self.prefix_range(prefix)?;
        let depth = prefix.len();
        if depth == self.levels() {
            return Ok(Vec::new());
        }
        let mut extended = prefix.to_vec();
        extended.push(0);
        let mut children = Vec::new();
        let mut start = range.start;
        while start < range.end {
            let code = self.layout.code(self.key_at(start), depth);
            extended[depth] = code;
            let (_, hi) = self.layout.prefix_bounds(&extended);
            let end = start + with_keys!(self.sorted_keys, |keys| keys[start..range.end].partition_point(|&k| wide(k) <= hi));
            children.push(Child { code, items: start..end });
            start = end;
        }
        Ok(children)
    }
}

#[cfg(test)]
mod tests;
