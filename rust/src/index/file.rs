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
//!     44     4  generation (u32): 0 for an index fresh from `build`, +1 for every `extend` or
//!               `remove` that derived it. Files written before gr2 recorded it hold 0 there
//!               (the field was reserved), and earlier gr2 versions ignore it, so the format
//!               version stays 2 and every file still loads both ways.
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
//! Saving writes a temporary file `.{name}.tmp-{pid}-{nonce}` in the target's directory (locked
//! while written), fsyncs it, renames it over the target and fsyncs the directory, so a reader
//! sees the old file or the new one, never a mix, and the target is never modified in place (an
//! index memory-mapped from the old file keeps the old inode). Temporary files of killed saves to
//! the same target are removed by the next save (writer pid gone and lock free).
//!
//! Loading reads the whole file into memory the index owns ([`LoadMode::Copy`], the default) or
//! memory-maps it ([`LoadMode::Mmap`]), then checks magic, version, length, checksum, section
//! layout and finally the arrays themselves (sorted, in range, the two position arrays inverse to
//! each other), so a damaged file fails with `CorruptFile` instead of answering wrong. A copied-in
//! index never changes afterwards; a mapped one reflects in-place writes to the file and dies
//! with SIGBUS when the file is truncated under it (only a change during the load itself is
//! detected), so map only files that are replaced by rename, never rewritten.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::MmapOptions;
use rayon::prelude::*;
use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

use super::search::{wide, Key};
use super::layout::MAX_LEVELS;
use super::{huge_page_vec, Buf, FileBytes, KeyLayout, Keys, LoadMode, RepairReport, SidIndex};
use crate::error::{Gr2Error, Result};

const MAGIC: [u8; 8] = *b"GR2SIDX\0";
pub const FORMAT_VERSION: u32 = 2; // 2: 4-byte keys where the SIDs fit 32 bits
pub(super) const SECTIONS: usize = 6;
pub(super) const HEADER_LEN: usize = 48 + SECTIONS * 16;
pub(super) const CHECKSUMMED_FROM: usize = 24;
pub(super) const ALIGN: usize = 64;
const SECTION_NAMES: [&str; SECTIONS] = ["level_sizes", "report", "sorted_ids", "sid_pos", "sorted_keys", "item_pos"];
const REPORT_FIXED_WORDS: usize = 9;

fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

pub(super) fn check_little_endian() -> Result<()> {
    if cfg!(target_endian = "big") {
        return Err(Gr2Error::invalid("SID index files are little-endian; this machine is big-endian"));
    }
    Ok(())
}

pub(super) fn encode_report(report: &RepairReport) -> Vec<u64> {
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


/// Where every section of a saved index goes, and its header (checksum still zero).
struct Plan<'a> {
    header: Vec<u8>,
    offsets: [usize; SECTIONS],
    sections: [&'a [u8]; SECTIONS],
    len: usize,
}

impl Plan<'_> {
    /// Writes the file image to `out`, returning the checksum to store at offset 16.
    fn write<W: Write>(&self, out: &mut W) -> std::io::Result<u64> {
        let mut hasher = Xxh3Default::new();
        out.write_all(&self.header)?;
        hasher.update(&self.header[CHECKSUMMED_FROM..]);
        let mut written = HEADER_LEN;
        let padding = [0u8; ALIGN];
        for (offset, section) in self.offsets.iter().zip(&self.sections) {
            let pad = &padding[..offset - written];
            out.write_all(pad)?;
            hasher.update(pad);
            out.write_all(section)?;
            hasher.update(section);
            written = offset + section.len();
        }
        Ok(hasher.digest())
    }
}

/// The header of a file with `n` items, `levels` levels and sections of `lens` bytes (checksum
/// still zero), each section's offset, and the file's length.
pub(super) fn file_header(n: usize, levels: usize, generation: u32, lens: [usize; SECTIONS]) -> (Vec<u8>, [usize; SECTIONS], usize) {
    let mut offsets = [0usize; SECTIONS];
    let mut end = HEADER_LEN;
    for (offset, len) in offsets.iter_mut().zip(lens) {
        *offset = align_up(end);
        end = *offset + len;
    }
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    header.extend_from_slice(&0u64.to_le_bytes()); // checksum, patched once known
    header.extend_from_slice(&(end as u64).to_le_bytes());
    header.extend_from_slice(&(n as u64).to_le_bytes());
    header.extend_from_slice(&(levels as u32).to_le_bytes());
    header.extend_from_slice(&generation.to_le_bytes());
    for (offset, len) in offsets.iter().zip(lens) {
        header.extend_from_slice(&(*offset as u64).to_le_bytes());
        header.extend_from_slice(&(len as u64).to_le_bytes());
    }
    debug_assert_eq!(header.len(), HEADER_LEN);
    (header, offsets, end)
}

impl SidIndex {
    fn plan<'a>(&'a self, report: &'a [u64]) -> Plan<'a> {
        let sections: [&[u8]; SECTIONS] = [
            bytemuck::cast_slice(self.level_sizes()),
            bytemuck::cast_slice(report),
            bytemuck::cast_slice(self.sorted_ids.as_slice()),
            bytemuck::cast_slice(self.sid_pos.as_slice()),
            with_keys!(self.sorted_keys, |keys| bytemuck::cast_slice(keys)),
            bytemuck::cast_slice(self.item_pos.as_slice()),
        ];
        let lens = sections.map(<[u8]>::len);
        let (header, offsets, end) = file_header(self.len(), self.levels(), self.generation, lens);
        Plan { header, offsets, sections, len: end }
    }

    /// Size in bytes of the file [`save`](Self::save) writes (and of [`to_bytes`](Self::to_bytes)).
    pub fn file_len(&self) -> usize {
        self.plan(&encode_report(&self.report)).len
    }

    /// Writes the index to `path` atomically (see the module docs). Temporary files that an
    /// earlier, killed save to the same path left behind are removed first.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        check_little_endian()?;
        let report = encode_report(&self.report);
        let plan = self.plan(&report);
        atomic_write(path.as_ref(), |file| {
            let mut out = BufWriter::with_capacity(1 << 20, &mut *file);
            let checksum = plan.write(&mut out)?;
            out.flush()?;
            drop(out);
            file.seek(SeekFrom::Start(16))?;
            file.write_all(&checksum.to_le_bytes())?;
            Ok(())
        })
    }

    /// Writes the file image of [`save`](Self::save) into `out`, which must hold exactly
    /// [`file_len`](Self::file_len) bytes.
    pub fn write_bytes_into(&self, out: &mut [u8]) -> Result<()> {
        check_little_endian()?;
        let report = encode_report(&self.report);
        let plan = self.plan(&report);
        if out.len() != plan.len {
            return Err(Gr2Error::invalid(format!("the index needs {} bytes, the buffer holds {}", plan.len, out.len())));
        }
        let mut cursor = std::io::Cursor::new(&mut *out);
        let checksum = plan.write(&mut cursor).map_err(|e| Gr2Error::io("cannot serialise the SID index", e))?;
        out[16..24].copy_from_slice(&checksum.to_le_bytes());
        Ok(())
    }

    /// The bytes [`save`](Self::save) would write (the portable form used for pickling).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.file_len()];
        self.write_bytes_into(&mut out)?;
        Ok(out)
    }

    /// An index from the bytes of a file written by [`save`](Self::save) (or [`to_bytes`]
    /// (Self::to_bytes)), copied and validated exactly as [`load`](Self::load) does.
    pub fn from_bytes(bytes: &[u8]) -> Result<SidIndex> {
        check_little_endian()?;
        let mut words = huge_page_vec::<u64>(bytes.len().div_ceil(8));
        words.resize(bytes.len().div_ceil(8), 0);
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        let file = FileBytes::Owned { words, len: bytes.len() };
        from_file_bytes(file, |msg| Gr2Error::CorruptFile(format!("SID index bytes: {msg}")), true)
    }

    /// Reads a file written by [`save`](Self::save) into memory and validates it
    /// ([`LoadMode::Copy`]): the index never changes afterwards, whatever happens to the file.
    pub fn load(path: impl AsRef<Path>) -> Result<SidIndex> {
        Self::load_with(path, LoadMode::Copy)
    }

    /// Loads and validates a file written by [`save`](Self::save), copied in or memory-mapped
    /// (see [`LoadMode`] for what a mapped index demands of the file).
    pub fn load_with(path: impl AsRef<Path>, mode: LoadMode) -> Result<SidIndex> {
        Self::load_verified(path, mode, true)
    }

    /// [`load_with`](Self::load_with), with the O(n) checks optional: `verify = false` checks the
    /// header and the section table only -- no checksum, no pass over the arrays -- so a mapped
    /// index opens in constant time and is paged in as it is queried. For files this process (or a
    /// trusted pipeline) wrote; a damaged file then gives wrong answers or an InternalError instead
    /// of a CorruptFileError at load.
    pub fn load_verified(path: impl AsRef<Path>, mode: LoadMode, verify: bool) -> Result<SidIndex> {
        check_little_endian()?;
        let path = path.as_ref();
        let io = |what: &str, err| Gr2Error::io(format!("cannot {what} SID index {}", path.display()), err);
        let corrupt = |msg: String| Gr2Error::CorruptFile(format!("SID index {}: {msg}", path.display()));
        // Checked before open: opening a FIFO would block, and a directory opens fine but cannot
        // be read or mapped ("No such device").
        let meta = std::fs::metadata(path).map_err(|e| io("open", e))?;
        check_regular(path, &meta)?;
        let mut file = File::open(path).map_err(|e| io("open", e))?;
        let meta = file.metadata().map_err(|e| io("stat", e))?;
        check_regular(path, &meta)?;
        let file_len = usize::try_from(meta.len()).map_err(|_| corrupt(format!("{} bytes is too large", meta.len())))?;
        if file_len == 0 {
            return Err(corrupt("the file is empty".into()));
        }
        let bytes = match mode {
            LoadMode::Copy => {
                let mut words = huge_page_vec::<u64>(file_len.div_ceil(8));
                words.resize(file_len.div_ceil(8), 0);
                let buf = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..file_len];
                file.read_exact(buf).map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => corrupt(format!("the file shrank below {file_len} bytes while it was read")),
                    _ => io("read", e),
                })?;
                let mut probe = [0u8; 1];
                if file.read(&mut probe).map_err(|e| io("read", e))? != 0 {
                    return Err(corrupt(format!("the file grew past {file_len} bytes while it was read")));
                }
                FileBytes::Owned { words, len: file_len }
            }
            LoadMode::Mmap => {
                let mut options = MmapOptions::new();
                options.len(file_len);
                #[cfg(target_os = "linux")]
                if verify {
                    options.populate(); // every byte is read for the checksum anyway
                }
                // SAFETY: the map is read-only. Modifying the file in place while the index is
                // alive is documented as unsupported for this mode (see `LoadMode::Mmap`);
                // gr2 itself only ever replaces files by rename.
                let map = unsafe { options.map(&file) }.map_err(|e| io("memory-map", e))?;
                FileBytes::Mapped(map)
            }
        };
        let index = from_file_bytes(bytes, corrupt, verify)?;
        if mode == LoadMode::Mmap {
            // What can be checked cheaply: the file did not change size or mtime while it was
            // being validated (a concurrent in-place writer), and the path still names it.
            let after = file.metadata().map_err(|e| io("stat", e))?;
            let still_there = std::fs::metadata(path).ok().is_some_and(|m| same_file(&m, &after));
            if after.len() != meta.len() || after.modified().ok() != meta.modified().ok() || !still_there {
                return Err(corrupt("the file changed while it was being loaded; load it again".into()));
            }
        }
        Ok(index)
    }
}

/// A directory or other non-regular file at `path` is refused with a message saying so.
fn check_regular(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    if meta.is_dir() {
        let source = std::io::Error::new(std::io::ErrorKind::IsADirectory, "Is a directory");
        return Err(Gr2Error::io(format!("cannot load SID index {}: it is a directory, not an index file", path.display()), source));
    }
    if !meta.is_file() {
        return Err(Gr2Error::invalid(format!(
            "cannot load SID index {}: not a regular file (a device, FIFO or socket)",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.len() == b.len()
}

/// Parses and validates the bytes of a whole file into an index viewing them.
fn from_file_bytes(file: FileBytes, corrupt: impl Fn(String) -> Gr2Error, verify: bool) -> Result<SidIndex> {
    let bytes = file.bytes();
    if bytes.is_empty() {
        return Err(corrupt("the file is empty".into()));
    }
    let layout = parse(bytes, bytes.len(), verify).map_err(&corrupt)?;
    let file = Arc::new(file);
    let section = |i: usize| layout.sections[i].clone();
    let narrow_keys = layout.key_width == 4;
    let index = SidIndex::from_parts(
        layout.key_layout,
        layout.report,
        in_file(&file, section(2)),
        in_file(&file, section(3)),
        if narrow_keys {
            Keys::Narrow(in_file(&file, section(4)))
        } else {
            Keys::Wide(in_file(&file, section(4)))
        },
        in_file(&file, section(5)),
        layout.generation,
        None,
    );
    if verify {
        check_arrays(&index).map_err(corrupt)?;
    }
    Ok(index)
}

fn in_file<T>(file: &Arc<FileBytes>, bytes: Range<usize>) -> Buf<T> {
    Buf::File { file: Arc::clone(file), bytes }
}

struct Parsed {
    key_layout: KeyLayout,
    key_width: usize,
    report: RepairReport,
    sections: [Range<usize>; SECTIONS],
    generation: u32,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks everything the header promises; errors are messages for `CorruptFile`.
fn parse(bytes: &[u8], file_len: usize, verify: bool) -> std::result::Result<Parsed, String> {
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
    let computed = if verify { xxh3_64(&bytes[CHECKSUMMED_FROM..]) } else { stored };
    if stored != computed {
        return Err(format!("checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the file is corrupt"));
    }

    // Past the checksum the bytes are as written; the checks below guard against a writer bug.
    let n = u64_at(bytes, 32);
    let levels = u32_at(bytes, 40) as usize;
    let generation = u32_at(bytes, 44);
    if n >= u64::from(u32::MAX) {
        return Err(format!("item count {n} is too large"));
    }
    if levels == 0 || levels > MAX_LEVELS {
        return Err(format!("{levels} levels (expected 1 to {MAX_LEVELS})"));
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
    Ok(Parsed { key_layout, key_width, report, sections, generation })
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


/// The prefix of the temporary files [`atomic_write`] creates for `file_name`; the full name is
/// `{prefix}{pid}-{nonce}`.
fn temp_prefix(file_name: &std::ffi::OsStr) -> String {
    format!(".{}.tmp-", file_name.to_string_lossy())
}

/// Whether process `pid` may still be running (true when it cannot be told).
pub(super) fn pid_may_be_alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return true };
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        if unsafe { libc::kill(pid, 0) } == 0 {
            return true;
        }
        std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        true
    }
}

/// Takes an exclusive advisory lock (`flock`) without waiting; false when another open file
/// description holds one (or locks are unavailable). Released when `file` is closed.
/// (`File::try_lock` needs Rust 1.89; the crate's MSRV is 1.85.)
pub(crate) fn try_lock(file: &File) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        false
    }
}

/// Removes the temporary files that killed saves to `file_name` in `dir` left behind. A file
/// counts as stale only when its name is exactly `{temp_prefix}{pid}-{nonce}` (digits), its
/// writer `pid` no longer exists, and nobody holds the lock every writer keeps on it while it
/// writes (the lock also covers a writer in another PID namespace). Errors are ignored: this is
/// housekeeping, never a reason to fail a save.
fn remove_stale_temp_files(dir: &Path, file_name: &std::ffi::OsStr) {
    let prefix = temp_prefix(file_name);
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix.as_str())) else { continue };
        let Some((pid, nonce)) = rest.split_once('-') else { continue };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(pid) || !digits(nonce) {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || pid_may_be_alive(pid) {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = OpenOptions::new().read(true).open(&path) else { continue };
        if try_lock(&file) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Writes a file next to `path`, fsyncs it and renames it over `path`; on any failure the
/// temporary file is removed and `path` is left as it was. The target is never modified in place,
/// so a reader that memory-mapped the old file keeps seeing it (the old inode).
pub(crate) fn atomic_write(path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    let io = |what: &str, err| Gr2Error::io(format!("cannot {what} {}", path.display()), err);
    let file_name = path
        .file_name()
        .ok_or_else(|| Gr2Error::invalid(format!("cannot save to {}: not a file path", path.display())))?;
    if path.is_dir() {
        let source = std::io::Error::new(std::io::ErrorKind::IsADirectory, "Is a directory");
        return Err(Gr2Error::io(format!("cannot save to {}: it is a directory", path.display()), source));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    remove_stale_temp_files(&dir, file_name);
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!("{}{}-{nonce}", temp_prefix(file_name), std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| io("create a temporary file for", e))?;
        // Held until the file is closed: tells `remove_stale_temp_files` the writer is alive.
        try_lock(&file);
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
