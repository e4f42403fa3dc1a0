//! The `.gr2sid` file: a fixed header, then six sections, each starting on a 64-byte boundary so
//! the arrays can be used straight from a memory map. All integers are little-endian.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "GR2SIDX\0"
//!      8     4  format version (u32, currently 2; version 1 files, with 8-byte keys always,
//!               are still read)
//!     12     4  header length in bytes (u32, 144)
//!     16     8  checksum: xxh3-64 of every byte from offset 24 to the end of the file
//!     24     8  file length in bytes (u64)
//!     32     8  n, the number of items (u64)
//!     40     4  levels (u32)
//!     44     4  reserved, 0
//!     48    96  section table: (offset u64, length u64) for each section, in this order:
//!               level_sizes  u32 x levels
//!               report       u64 x (9 + 2 * histogram entries), see `encode_report`
//!               sorted_ids   u64 x n     item ids ascending
//!               sid_pos      u32 x n     SID-order position of each item of sorted_ids
//!               sorted_keys  u32 x n     packed SIDs ascending, when the level sizes need at
//!                  or u64 x n  most 32 bits in all (u64 otherwise)
//!               item_pos     u32 x n     id-order position of each SID of sorted_keys
//! ```
//!
//! Saving writes a temporary file in the target's directory, fsyncs it, renames it over the
//! target and fsyncs the directory, so a reader sees the old file or the new one, never a mix.
//! Loading memory-maps the file and checks magic, version, length, checksum, section layout and
//! finally the arrays themselves (sorted, in range, the two position arrays inverse to each
//! other), so a damaged file fails with `CorruptFile` instead of answering wrong.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions};
use rayon::prelude::*;
use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

use super::search::{wide, Key};
use super::{Buf, KeyLayout, Keys, RepairReport, SidIndex};
use crate::error::{Gr2Error, Result};

const MAGIC: [u8; 8] = *b"GR2SIDX\0";
pub const FORMAT_VERSION: u32 = 2; // 2: 4-byte keys where the SIDs fit 32 bits
const SECTIONS: usize = 6;
const HEADER_LEN: usize = 48 + SECTIONS * 16;
const CHECKSUMMED_FROM: usize = 24;
const ALIGN: usize = 64;
const SECTION_NAMES: [&str; SECTIONS] = ["level_sizes", "report", "sorted_ids", "sid_pos", "sorted_keys", "item_pos"];
const REPORT_FIXED_WORDS: usize = 9;

fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

fn check_little_endian() -> Result<()> {
    if cfg!(target_endian = "big") {
        return Err(Gr2Error::invalid("SID index files are little-endian; this machine is big-endian"));
    }
    Ok(())
}

fn encode_report(report: &RepairReport) -> Vec<u64> {
    let mut words = vec![
        report.levels_in as u64,
        report.unique_items_before,
        report.distinct_sids_before,
        report.items_moved,
        report.max_move_distance,
        report.full_prefixes,
        u64::from(report.level_appended),
        report.items_disambiguated,
        report.collision_group_sizes.len() as u64,
    ];
    for &(size, count) in &report.collision_group_sizes {
        words.extend([size, count]);
    }
    words
}

impl SidIndex {
    /// Writes the index to `path` atomically (see the module docs).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        check_little_endian()?;
        let path = path.as_ref();
        let level_sizes: &[u32] = self.level_sizes();
        let report = encode_report(&self.report);
        let sections: [&[u8]; SECTIONS] = [
            bytemuck::cast_slice(level_sizes),
            bytemuck::cast_slice(&report),
            bytemuck::cast_slice(self.sorted_ids.as_slice()),
            bytemuck::cast_slice(self.sid_pos.as_slice()),
            with_keys!(self.sorted_keys, |keys| bytemuck::cast_slice(keys)),
            bytemuck::cast_slice(self.item_pos.as_slice()),
        ];
        let mut offsets = [0usize; SECTIONS];
        let mut end = HEADER_LEN;
        for (offset, section) in offsets.iter_mut().zip(&sections) {
            *offset = align_up(end);
            end = *offset + section.len();
        }
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        header.extend_from_slice(&0u64.to_le_bytes()); // checksum, patched below
        header.extend_from_slice(&(end as u64).to_le_bytes());
        header.extend_from_slice(&(self.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.levels() as u32).to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        for (offset, section) in offsets.iter().zip(&sections) {
            header.extend_from_slice(&(*offset as u64).to_le_bytes());
            header.extend_from_slice(&(section.len() as u64).to_le_bytes());
        }
        debug_assert_eq!(header.len(), HEADER_LEN);

        atomic_write(path, |file| {
            let mut out = BufWriter::with_capacity(1 << 20, &mut *file);
            let mut hasher = Xxh3Default::new();
            out.write_all(&header)?;
            hasher.update(&header[CHECKSUMMED_FROM..]);
            let mut written = HEADER_LEN;
            let padding = [0u8; ALIGN];
            for (offset, section) in offsets.iter().zip(&sections) {
                let pad = &padding[..offset - written];
                out.write_all(pad)?;
                hasher.update(pad);
                out.write_all(section)?;
                hasher.update(section);
                written = offset + section.len();
            }
            out.flush()?;
            drop(out);
            file.seek(SeekFrom::Start(16))?;
            file.write_all(&hasher.digest().to_le_bytes())?;
            Ok(())
        })
    }

    /// Memory-maps and validates a file written by [`save`](Self::save).
    pub fn load(path: impl AsRef<Path>) -> Result<SidIndex> {
        check_little_endian()?;
        let path = path.as_ref();
        let io = |what: &str, err| Gr2Error::io(format!("cannot {what} SID index {}", path.display()), err);
        let file = File::open(path).map_err(|e| io("open", e))?;
        let file_len = file.metadata().map_err(|e| io("stat", e))?.len() as usize;
        let corrupt = |msg: String| Gr2Error::CorruptFile(format!("SID index {}: {msg}", path.display()));
        if file_len == 0 {
            return Err(corrupt("the file is empty".into()));
        }
        let mut options = MmapOptions::new();
        #[cfg(target_os = "linux")]
        options.populate();
        // SAFETY: the map is read-only; like every mmap-based reader we assume nobody truncates or
        // rewrites the file in place while it is loaded (gr2 itself only ever replaces files by rename).
        let map = unsafe { options.map(&file) }.map_err(|e| io("memory-map", e))?;
        let layout = parse(&map, file_len).map_err(corrupt)?;
        let map = Arc::new(map);
        let section = |i: usize| layout.sections[i].clone();
        let narrow_keys = layout.key_width == 4;
        let index = SidIndex::from_parts(
            layout.key_layout,
            layout.report,
            mapped(&map, section(2)),
            mapped(&map, section(3)),
            if narrow_keys {
                Keys::Narrow(mapped(&map, section(4)))
            } else {
                Keys::Wide(mapped(&map, section(4)))
            },
            mapped(&map, section(5)),
        );
        check_arrays(&index).map_err(corrupt)?;
        Ok(index)
    }
}

fn mapped<T>(map: &Arc<Mmap>, bytes: Range<usize>) -> Buf<T> {
    Buf::Mapped { map: Arc::clone(map), bytes }
}

struct Parsed {
    key_layout: KeyLayout,
    key_width: usize,
    report: RepairReport,
    sections: [Range<usize>; SECTIONS],
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks everything the header promises; errors are messages for `CorruptFile`.
fn parse(bytes: &[u8], file_len: usize) -> std::result::Result<Parsed, String> {
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        let start = &bytes[..bytes.len().min(MAGIC.len())];
        return Err(format!("not a gr2 SID index (magic bytes are {start:?}, expected {MAGIC:?})"));
    }
    if bytes.len() < HEADER_LEN {
        return Err(format!("truncated: {} bytes, shorter than the {HEADER_LEN}-byte header", bytes.len()));
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION && version != 1 {
        return Err(format!(
            "format version {version}, but this gr2 reads versions 1 and {FORMAT_VERSION}; rebuild the index"
        ));
    }
    let header_len = u32_at(bytes, 12) as usize;
    if header_len != HEADER_LEN {
        return Err(format!("header length {header_len}, expected {HEADER_LEN} for version {FORMAT_VERSION}"));
    }
    let declared_len = u64_at(bytes, 24);
    if (file_len as u64) < declared_len {
        return Err(format!("truncated: {file_len} bytes, but the header declares {declared_len}"));
    }
    if (file_len as u64) > declared_len {
        return Err(format!("{} unexpected bytes after the declared end ({declared_len} bytes)", file_len as u64 - declared_len));
    }
    let stored = u64_at(bytes, 16);
    let computed = xxh3_64(&bytes[CHECKSUMMED_FROM..]);
    if stored != computed {
        return Err(format!("checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the file is corrupt"));
    }

    // Past the checksum the bytes are as written; the checks below guard against a writer bug.
    let n = u64_at(bytes, 32);
    let levels = u32_at(bytes, 40) as usize;
    if n >= u64::from(u32::MAX) {
        return Err(format!("item count {n} is too large"));
    }
    if levels == 0 || levels > 64 {
        return Err(format!("{levels} levels (expected 1 to 64)"));
    }
    let mut sections: [Range<usize>; SECTIONS] = Default::default();
    let mut previous_end = HEADER_LEN;
    for (i, section) in sections.iter_mut().enumerate() {
        let offset = u64_at(bytes, 48 + 16 * i);
        let len = u64_at(bytes, 56 + 16 * i);
        let name = SECTION_NAMES[i];
        let end = offset.checked_add(len).filter(|&e| e <= file_len as u64);
        let Some(end) = end else {
            return Err(format!("section {name} ({len} bytes at {offset}) runs past the end of the file"));
        };
        if offset % ALIGN as u64 != 0 || (offset as usize) < previous_end {
            return Err(format!("section {name} starts at {offset}: misaligned or overlapping"));
        }
        *section = offset as usize..end as usize;
        previous_end = end as usize;
    }
    let n = n as usize;
    if sections[0].len() != 4 * levels {
        return Err(format!("section {} has {} bytes, expected {}", SECTION_NAMES[0], sections[0].len(), 4 * levels));
    }
    let sizes: Vec<u32> = bytes[sections[0].clone()].chunks_exact(4).map(|c| u32_at(c, 0)).collect();
    let key_layout = KeyLayout::new(&sizes).map_err(|e| format!("bad level sizes: {e}"))?;
    // version 1 stored 8-byte keys whatever the layout
    let key_width = if version == 1 { 8 } else { Keys::width(key_layout.total_bits()) };
    let expected = [4 * levels, sections[1].len(), 8 * n, 4 * n, key_width * n, 4 * n];
    for (i, (section, want)) in sections.iter().zip(expected).enumerate() {
        if section.len() != want {
            return Err(format!("section {} has {} bytes, expected {want}", SECTION_NAMES[i], section.len()));
        }
    }
    let report = decode_report(&bytes[sections[1].clone()], n as u64, levels)?;
    Ok(Parsed { key_layout, key_width, report, sections })
}

fn decode_report(bytes: &[u8], n: u64, levels: usize) -> std::result::Result<RepairReport, String> {
    let words: Vec<u64> = bytes.chunks_exact(8).map(|c| u64_at(c, 0)).collect();
    if bytes.len() % 8 != 0 || words.len() < REPORT_FIXED_WORDS {
        return Err(format!("repair report section has {} bytes, too short", bytes.len()));
    }
    let expected = (words[8] as usize).saturating_mul(2).saturating_add(REPORT_FIXED_WORDS);
    if words.len() != expected {
        return Err(format!("repair report section has {} words, expected {expected}", words.len()));
    }
    let level_appended = words[6] != 0;
    let report = RepairReport {
        levels_in: words[0] as usize,
        items: n,
        unique_items_before: words[1],
        distinct_sids_before: words[2],
        items_moved: words[3],
        max_move_distance: words[4],
        full_prefixes: words[5],
        level_appended,
        items_disambiguated: words[7],
        collision_group_sizes: words[REPORT_FIXED_WORDS..].chunks_exact(2).map(|c| (c[0], c[1])).collect(),
    };
    if report.levels_in + usize::from(level_appended) != levels
        || report.unique_items_before > n
        || report.distinct_sids_before > n
    {
        return Err(format!("repair report is inconsistent with the header ({levels} levels, {n} items)"));
    }
    Ok(report)
}

/// The arrays must describe a bijection: both sorted strictly ascending, keys valid for the
/// layout, positions in range and inverse to each other.
fn check_keys<K: Key>(keys: &[K], layout: &KeyLayout) -> std::result::Result<(), String> {
    if let Some(i) = keys.par_windows(2).position_any(|w| w[0] >= w[1]) {
        return Err(format!("SIDs are not strictly ascending at position {i}"));
    }
    if let Some(i) = keys.par_iter().position_any(|&k| !layout.key_is_valid(wide(k))) {
        return Err(format!("SID at position {i} has a code outside its level size"));
    }
    Ok(())
}

fn check_arrays(index: &SidIndex) -> std::result::Result<(), String> {
    let (ids, sid_pos, item_pos) = (index.sorted_ids.as_slice(), index.sid_pos.as_slice(), index.item_pos.as_slice());
    let n = ids.len();
    if let Some(i) = ids.par_windows(2).position_any(|w| w[0] >= w[1]) {
        return Err(format!("item ids are not strictly ascending at position {i}"));
    }
    with_keys!(index.sorted_keys, |keys| check_keys(keys, &index.layout))?;
    let out_of_range = |v: &[u32]| v.par_iter().position_any(|&p| p as usize >= n);
    if let Some(i) = out_of_range(sid_pos).or_else(|| out_of_range(item_pos)) {
        return Err(format!("position {i} points outside the {n} items"));
    }
    if let Some(j) = sid_pos.par_iter().enumerate().position_any(|(j, &p)| item_pos[p as usize] as usize != j) {
        return Err(format!("item/SID positions are not inverse to each other at item {j}"));
    }
    Ok(())
}

/// Writes a file next to `path`, fsyncs it and renames it over `path`; on any failure the
/// temporary file is removed and `path` is left as it was.
pub(crate) fn atomic_write(path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    let io = |what: &str, err| Gr2Error::io(format!("cannot {what} {}", path.display()), err);
    let file_name = path
        .file_name()
        .ok_or_else(|| Gr2Error::invalid(format!("cannot save to {}: not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(".{}.tmp-{}-{nonce}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| io("create a temporary file for", e))?;
        write(&mut file).map_err(|e| io("write", e))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| io("rename the temporary file onto", e))?;
        // Make the rename itself durable.
        if let Ok(dir) = File::open(&dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
