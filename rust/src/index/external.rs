//! Building an index larger than memory ([`SidIndexWriter`]): the items arrive in chunks, are
//! sorted into runs on disk, and the runs are merged straight into the `.gr2sid` file, so the
//! peak memory is set by the chunk size, not by the number of items.
//!
//! The result is the file [`SidIndex::build`](super::SidIndex::build) followed by
//! [`save`](super::SidIndex::save) would write for the same items in the same order, byte for
//! byte: the same collision repair (`build` module docs), the same repair report, the same errors
//! (a duplicated id names the same two rows, an out-of-range code the same row).
//!
//! Passes (n items, c = `chunk_items`, all files in one temporary folder next to the target):
//! 1. `add`: pack each item's SID, buffer `(id, row, key)` (24 bytes in memory); every c items the
//!    buffer is sorted by id and written as a run (20 bytes per item on disk).
//! 2. `finish`, by id: a k-way merge of those runs finds duplicated ids, writes the sorted ids
//!    (8 B/item) and numbers the items by id (`j`); `(SID, j)` pairs go to SID-sorted runs
//!    (12 B/item on disk, 16 in memory).
//! 3. By SID: a merge of those runs gives the items in (SID, id) order, the order collision repair
//!    works in. Repair needs one (L-1)-prefix at a time, so the stream is repaired in batches that
//!    end on prefix boundaries, exactly as the in-memory build's parallel slices. The repaired
//!    keys and `item_pos` go to two files; `(j, position)` pairs go to runs sorted by `j` (8 B/item)
//!    for the inverse permutation `sid_pos`.
//! 4. Whether a disambiguation level is needed (and its size) is known only now; the file is
//!    written through a temporary file and renamed over the target (as `save` does), section by
//!    section: the sorted ids, `sid_pos` from a merge of the `(j, position)` runs, the keys (with
//!    the disambiguation code appended when needed), `item_pos`. The checksum is computed while
//!    writing and patched into the header.
//!
//! Peak memory: about `24 * c` bytes (the chunk buffer; passes 2 and 3 hold `16 * c` and `8 * c`)
//! plus 1 MiB per run being merged plus the largest (L-1)-prefix group (16 bytes per item; a
//! handful of items with RQ codes). A prefix group is held only up to `K_last * 65536` items
//! (268 MB for K = 256): beyond that no repair can tell its items apart, the build must fail, and
//! the rest of the stream is only counted, to name the same largest group as `build` does.
//! Disk: about 40 bytes per item of temporary files at the peak (end of pass 2) plus the 20 or 24
//! bytes per item of the index file itself. The temporary folder is removed when the build ends,
//! fails or the writer is dropped; one left by a killed process is removed by the next writer for
//! the same target (its pid gone and its lock free).

use std::cmp::Reverse;
use std::collections::binary_heap::PeekMut;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use xxhash_rust::xxh3::Xxh3Default;

use super::build::{check_code_ranges, disambiguation_layout, repair_slice, Entry, Tally};
use super::file::{atomic_write, check_little_endian, encode_report, file_header, pid_may_be_alive, try_lock, ALIGN, CHECKSUMMED_FROM, HEADER_LEN};
use super::{KeyLayout, Keys, RepairReport};
use crate::error::{Gr2Error, Result};

/// Bytes of the read buffer of each run being merged and of each sequential temporary file.
const IO_BLOCK: usize = 1 << 20;
/// Items per repair batch (extended to the end of the prefix it stops in).
const REPAIR_BATCH: usize = 1 << 16;
/// Default chunk size of the Python binding and of [`SidIndexWriter::new`]'s callers.
pub const DEFAULT_CHUNK_ITEMS: usize = 10_000_000;

/// A fixed-size, totally ordered record of a sorted run.
trait Record: Copy + Ord + Send + Sync {
    const SIZE: usize;
    fn put(&self, out: &mut [u8]);
    fn get(bytes: &[u8]) -> Self;
}

fn u64_le(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// An input item: ordered by (id, input row).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ById {
    id: u64,
    row: u32,
    key: u64,
}

impl Record for ById {
    const SIZE: usize = 20;
    fn put(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.id.to_le_bytes());
        out[8..12].copy_from_slice(&self.row.to_le_bytes());
        out[12..20].copy_from_slice(&self.key.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        ById { id: u64_le(b), row: u32_le(&b[8..]), key: u64_le(&b[12..]) }
    }
}

/// `(packed SID, id-order position)`: ordered by (SID, item id).
impl Record for (u64, u32) {
    const SIZE: usize = 12;
    fn put(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.0.to_le_bytes());
        out[8..12].copy_from_slice(&self.1.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        (u64_le(b), u32_le(&b[8..]))
    }
}

/// `(id-order position, SID-order position)`: ordered by the first.
impl Record for (u32, u32) {
    const SIZE: usize = 8;
    fn put(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.0.to_le_bytes());
        out[4..8].copy_from_slice(&self.1.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        (u32_le(b), u32_le(&b[4..]))
    }
}

fn bad_data(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Reads fixed-size records (or raw bytes) from a temporary file in large blocks.
struct BlockReader {
    file: File,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

impl BlockReader {
    fn open(path: &Path, block: usize) -> std::io::Result<Self> {
        Ok(BlockReader { file: File::open(path)?, buf: vec![0; block], pos: 0, len: 0 })
    }

    /// The next `size` bytes, or None at the end of the file.
    fn next_bytes(&mut self, size: usize) -> std::io::Result<Option<&[u8]>> {
        if self.len - self.pos < size {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
            while self.len < size {
                let got = self.file.read(&mut self.buf[self.len..])?;
                if got == 0 {
                    if self.len == 0 {
                        return Ok(None);
                    }
                    return Err(bad_data(format!("a temporary build file ends inside a record ({} stray bytes)", self.len)));
                }
                self.len += got;
            }
        }
        let out = &self.buf[self.pos..self.pos + size];
        self.pos += size;
        Ok(Some(out))
    }

    fn next<R: Record>(&mut self) -> std::io::Result<Option<R>> {
        Ok(self.next_bytes(R::SIZE)?.map(R::get))
    }
}

/// Writes records to a file through a large buffer.
struct RecordWriter {
    out: BufWriter<File>,
}

impl RecordWriter {
    fn create(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(RecordWriter { out: BufWriter::with_capacity(IO_BLOCK, file) })
    }

    #[inline]
    fn put<R: Record>(&mut self, record: &R) -> std::io::Result<()> {
        let mut bytes = [0u8; 32];
        record.put(&mut bytes[..R::SIZE]);
        self.out.write_all(&bytes[..R::SIZE])
    }

    fn finish(self) -> std::io::Result<()> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        drop(file);
        Ok(())
    }
}

fn write_run<R: Record>(path: &Path, records: &[R]) -> std::io::Result<()> {
    let mut out = RecordWriter::create(path)?;
    for record in records {
        out.put(record)?;
    }
    out.finish()
}

/// Records buffered up to a capacity, then sorted and written as one run.
struct Runs<R> {
    dir: PathBuf,
    name: &'static str,
    buf: Vec<R>,
    capacity: usize,
    paths: Vec<PathBuf>,
}

impl<R: Record> Runs<R> {
    fn new(dir: &Path, name: &'static str, capacity: usize) -> Self {
        Runs { dir: dir.to_path_buf(), name, buf: Vec::new(), capacity: capacity.max(1), paths: Vec::new() }
    }

    fn push(&mut self, record: R) -> std::io::Result<()> {
        if self.buf.capacity() == 0 {
            self.buf.try_reserve_exact(self.capacity).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::OutOfMemory,
                    format!("no memory for a run of {} items ({e}); use a smaller chunk_items", self.capacity),
                )
            })?;
        }
        self.buf.push(record);
        if self.buf.len() >= self.capacity {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.buf.par_sort_unstable();
        let path = self.dir.join(format!("{}-{}.run", self.name, self.paths.len()));
        write_run(&path, &self.buf)?;
        self.paths.push(path);
        self.buf.clear();
        Ok(())
    }

    /// Writes what is buffered and frees the buffer; the runs' paths.
    fn finish(mut self) -> std::io::Result<Vec<PathBuf>> {
        self.flush()?;
        Ok(self.paths)
    }
}

/// A k-way merge of sorted runs (each reader holds one block).
struct Merge<R: Record> {
    readers: Vec<BlockReader>,
    heap: BinaryHeap<Reverse<(R, usize)>>,
}

impl<R: Record> Merge<R> {
    fn open(paths: &[PathBuf]) -> std::io::Result<Self> {
        let block = (IO_BLOCK / R::SIZE).max(1) * R::SIZE;
        let mut readers = Vec::with_capacity(paths.len());
        let mut heap = BinaryHeap::with_capacity(paths.len());
        for (i, path) in paths.iter().enumerate() {
            let mut reader = BlockReader::open(path, block)?;
            if let Some(first) = reader.next::<R>()? {
                heap.push(Reverse((first, i)));
            }
            readers.push(reader);
        }
        Ok(Merge { readers, heap })
    }

    fn next(&mut self) -> std::io::Result<Option<R>> {
        let Some(mut top) = self.heap.peek_mut() else { return Ok(None) };
        let Reverse((record, run)) = *top;
        match self.readers[run].next::<R>()? {
            Some(following) => *top = Reverse((following, run)),
            None => {
                PeekMut::pop(top);
            }
        }
        Ok(Some(record))
    }
}

fn remove_all(paths: &[PathBuf]) {
    for path in paths {
        let _ = std::fs::remove_file(path);
    }
}

/// The temporary folder of one build; removed (with everything in it) when dropped.
struct TempDir {
    path: PathBuf,
    /// Locked while the build runs: tells a later writer the folder is not stale.
    _lock: File,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn temp_dir_prefix(file_name: &std::ffi::OsStr) -> String {
    format!(".{}.build-", file_name.to_string_lossy())
}

/// Removes build folders of killed writers for the same target (pid gone, lock free).
fn remove_stale_temp_dirs(parent: &Path, file_name: &std::ffi::OsStr) {
    let prefix = temp_dir_prefix(file_name);
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix.as_str())) else { continue };
        let Some((pid, nonce)) = rest.split_once('-') else { continue };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(pid) || !digits(nonce) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || pid_may_be_alive(pid) {
            continue;
        }
        let lock_path = entry.path().join("lock");
        let free = match OpenOptions::new().read(true).open(&lock_path) {
            Ok(file) => try_lock(&file),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        };
        if free {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Streams `(item id, codes)` chunks into an index file larger than memory (module docs). The
/// result equals [`SidIndex::build`](super::SidIndex::build) + `save` on the concatenated chunks.
pub struct SidIndexWriter {
    path: PathBuf,
    layout: KeyLayout,
    chunk_items: usize,
    temp: TempDir,
    runs: Runs<ById>,
    rows: usize,
    /// Set when a write of a run failed: the runs on disk no longer match the rows added.
    broken: Option<String>,
}

impl std::fmt::Debug for SidIndexWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidIndexWriter")
            .field("path", &self.path)
            .field("level_sizes", &self.layout.sizes())
            .field("chunk_items", &self.chunk_items)
            .field("items", &self.rows)
            .finish()
    }
}

impl SidIndexWriter {
    /// A writer for the index file `path`, SIDs of `level_sizes.len()` levels (level `l` holds
    /// codes `0..level_sizes[l]`), sorting `chunk_items` items at a time. Temporary files go in a
    /// new folder inside `temp_parent` (default: the target's folder).
    pub fn new(path: impl AsRef<Path>, level_sizes: &[u32], chunk_items: usize, temp_parent: Option<&Path>) -> Result<Self> {
        check_little_endian()?;
        let path = path.as_ref().to_path_buf();
        let layout = KeyLayout::new(level_sizes)?;
        if chunk_items == 0 {
            return Err(Gr2Error::invalid("chunk_items must be at least 1"));
        }
        let file_name = path
            .file_name()
            .ok_or_else(|| Gr2Error::invalid(format!("cannot build an index at {}: not a file path", path.display())))?
            .to_os_string();
        if path.is_dir() {
            let source = std::io::Error::new(std::io::ErrorKind::IsADirectory, "Is a directory");
            return Err(Gr2Error::io(format!("cannot build an index at {}: it is a directory", path.display()), source));
        }
        let parent = match temp_parent {
            Some(dir) => dir.to_path_buf(),
            None => match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            },
        };
        remove_stale_temp_dirs(&parent, &file_name);
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = parent.join(format!("{}{}-{nonce}", temp_dir_prefix(&file_name), std::process::id()));
        std::fs::create_dir(&dir)
            .map_err(|e| Gr2Error::io(format!("cannot create the temporary build folder {}", dir.display()), e))?;
        let lock = OpenOptions::new().write(true).create_new(true).open(dir.join("lock"));
        let lock = match lock {
            Ok(file) => file,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Gr2Error::io(format!("cannot create a file in {}", dir.display()), e));
            }
        };
        try_lock(&lock);
        let temp = TempDir { path: dir, _lock: lock };
        let runs = Runs::new(&temp.path, "by-id", chunk_items);
        Ok(SidIndexWriter { path, layout, chunk_items, temp, runs, rows: 0, broken: None })
    }

    /// Items added so far.
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn levels(&self) -> usize {
        self.layout.levels()
    }

    /// The temporary folder of this build (removed when the writer finishes or is dropped).
    pub fn temp_dir(&self) -> &Path {
        &self.temp.path
    }

    fn check_usable(&self) -> Result<()> {
        match &self.broken {
            Some(msg) => Err(Gr2Error::invalid(format!(
                "this SidIndexWriter cannot continue after an earlier error ({msg}); start a new one"
            ))),
            None => Ok(()),
        }
    }

    /// Adds items (`codes` row-major, `item_ids.len() x levels`). Codes are checked here (the
    /// error names the row counted over every item added); an invalid chunk adds nothing.
    /// Duplicated ids are found by [`finish`](Self::finish).
    pub fn add(&mut self, item_ids: &[u64], codes: &[u16]) -> Result<()> {
        self.check_usable()?;
        let (n, levels) = (item_ids.len(), self.layout.levels());
        if codes.len() != n * levels {
            return Err(Gr2Error::invalid(format!(
                "codes hold {} values but {n} items x {levels} levels need {}",
                codes.len(),
                n * levels
            )));
        }
        let total = self.rows + n;
        if total >= u32::MAX as usize {
            return Err(Gr2Error::invalid(format!("an index holds fewer than {} items (got {total})", u32::MAX)));
        }
        check_code_ranges(codes, &self.layout, self.rows)?;
        let mut done = 0;
        while done < n {
            if self.runs.buf.capacity() == 0 {
                // Fallible: an absurd chunk_items is an error, not an abort of the process.
                self.runs.buf.try_reserve_exact(self.chunk_items).map_err(|e| {
                    Gr2Error::invalid(format!(
                        "cannot allocate the buffer of {} items (chunk_items; {} bytes each): {e}; use a smaller chunk_items",
                        self.chunk_items,
                        std::mem::size_of::<ById>()
                    ))
                })?;
            }
            let take = (self.chunk_items - self.runs.buf.len()).min(n - done);
            let first_row = self.rows + done;
            let layout = &self.layout;
            self.runs.buf.par_extend(
                item_ids[done..done + take]
                    .par_iter()
                    .zip(codes[done * levels..(done + take) * levels].par_chunks(levels))
                    .enumerate()
                    .map(|(i, (&id, row))| ById { id, row: (first_row + i) as u32, key: layout.pack(row) }),
            );
            done += take;
            if self.runs.buf.len() >= self.chunk_items {
                if let Err(e) = self.runs.flush() {
                    let err = Gr2Error::io(
                        format!(
                            "SID index build of {}: cannot write a sorted run in {}",
                            self.path.display(),
                            self.temp.path.display()
                        ),
                        e,
                    );
                    self.broken = Some(err.to_string());
                    return Err(err);
                }
            }
        }
        self.rows = total;
        Ok(())
    }

    /// Merges the runs into the index file (written atomically: temporary file, fsync, rename)
    /// and removes the temporary files; returns the repair report the file holds.
    pub fn finish(self) -> Result<RepairReport> {
        self.check_usable()?;
        let SidIndexWriter { path, layout, chunk_items, temp, runs, rows: n, .. } = self;
        let dir = temp.path.clone();
        let io = |what: &str| {
            let (dir, target) = (dir.clone(), path.clone());
            let what = what.to_string();
            move |e: std::io::Error| {
                Gr2Error::io(format!("SID index build of {} (in {}): cannot {what}", target.display(), dir.display()), e)
            }
        };
        let by_id_runs = runs.finish().map_err(io("write a sorted run"))?;

        // Pass 2: by id.
        let ids_path = dir.join("sorted_ids.bin");
        let by_sid_runs = {
            let mut merge = Merge::<ById>::open(&by_id_runs).map_err(io("open the sorted runs"))?;
            let mut ids_out = RecordWriter::create(&ids_path).map_err(io("create a temporary file"))?;
            let mut by_sid = Runs::<(u64, u32)>::new(&dir, "by-sid", chunk_items.min(n));
            let mut previous: Option<ById> = None;
            let mut j = 0u32;
            while let Some(item) = merge.next().map_err(io("read a sorted run"))? {
                if let Some(prev) = previous {
                    if prev.id == item.id {
                        return Err(Gr2Error::invalid(format!(
                            "item id {} appears more than once (rows {} and {}); item ids must be unique",
                            item.id, prev.row, item.row
                        )));
                    }
                }
                ids_out.out.write_all(&item.id.to_le_bytes()).map_err(io("write the sorted ids"))?;
                by_sid.push((item.key, j)).map_err(io("write a sorted run"))?;
                j += 1;
                previous = Some(item);
            }
            if j as usize != n {
                return Err(Gr2Error::Internal(format!("the sorted runs hold {j} items, {n} were added")));
            }
            ids_out.finish().map_err(io("write the sorted ids"))?;
            drop(merge);
            remove_all(&by_id_runs);
            by_sid.finish().map_err(io("write a sorted run"))?
        };

        // Pass 3: by SID, with the collision repair.
        let keys_path = dir.join("sorted_keys.bin");
        let item_pos_path = dir.join("item_pos.bin");
        let key_width_in = Keys::width(layout.total_bits());
        let last = layout.levels() - 1;
        let (last_bits, last_size) = (layout.bits(last), layout.sizes()[last]);
        let mut tally = Tally::default();
        let mut largest = 1usize;
        let mut repeated = 0u64;
        let inverse_runs = {
            let mut merge = Merge::<(u64, u32)>::open(&by_sid_runs).map_err(io("open the sorted runs"))?;
            let mut keys_out = RecordWriter::create(&keys_path).map_err(io("create a temporary file"))?;
            let mut pos_out = RecordWriter::create(&item_pos_path).map_err(io("create a temporary file"))?;
            let mut inverse = Runs::<(u32, u32)>::new(&dir, "inverse", chunk_items.min(n));
            let mut batch: Vec<Entry> = Vec::with_capacity(REPAIR_BATCH);
            let mut p = 0u32;
            let (mut previous_key, mut run) = (None, 0usize);
            let prefix = |key: u64| if last_bits >= 64 { 0 } else { key >> last_bits };
            // More items under one prefix than its last level and a disambiguation level can tell
            // apart: the build must fail, and the rest is only counted (bounds the batch).
            let group_limit = last_size as usize * super::layout::MAX_LEVEL_SIZE as usize;
            let mut group_start = 0usize;
            loop {
                let next = merge.next().map_err(io("read a sorted run"))?;
                let flush = match (next, batch.last()) {
                    (_, None) => false,
                    (None, Some(_)) => true,
                    (Some(entry), Some(&tail)) => batch.len() >= REPAIR_BATCH && prefix(entry.0) != prefix(tail.0),
                };
                if flush {
                    tally = tally.merge(repair_slice(&mut batch, last_bits, last_size));
                    for &(key, j) in &batch {
                        run = if previous_key == Some(key) { run + 1 } else { 1 };
                        repeated += u64::from(run > 1);
                        largest = largest.max(run);
                        previous_key = Some(key);
                        let written = if key_width_in == 4 {
                            keys_out.out.write_all(&(key as u32).to_le_bytes())
                        } else {
                            keys_out.out.write_all(&key.to_le_bytes())
                        };
                        written.and_then(|_| pos_out.out.write_all(&j.to_le_bytes())).map_err(io("write the SID arrays"))?;
                        inverse.push((j, p)).map_err(io("write a sorted run"))?;
                        p += 1;
                    }
                    batch.clear();
                    group_start = 0;
                }
                let Some(entry) = next else { break };
                if batch.last().is_some_and(|&tail| prefix(tail.0) != prefix(entry.0)) {
                    group_start = batch.len();
                }
                batch.push(entry);
                if batch.len() - group_start > group_limit {
                    let tail = batch.split_off(group_start);
                    repair_slice(&mut batch, last_bits, last_size);
                    largest = largest.max(largest_run(&batch, previous_key, run));
                    drop(batch);
                    let largest = largest.max(count_degenerate(&mut merge, tail, last_bits, last_size).map_err(io("read a sorted run"))?);
                    return Err(disambiguation_layout(&layout, largest).err().unwrap_or_else(|| {
                        Gr2Error::Internal(format!("{largest} items share one SID, yet the disambiguation level fits"))
                    }));
                }
            }
            keys_out.finish().map_err(io("write the SID arrays"))?;
            pos_out.finish().map_err(io("write the SID arrays"))?;
            drop(merge);
            remove_all(&by_sid_runs);
            inverse.finish().map_err(io("write a sorted run"))?
        };

        // Pass 4: the layout and report are known; write the file.
        let level_appended = tally.full_prefixes > 0;
        let levels_in = layout.levels();
        let final_layout = if level_appended { disambiguation_layout(&layout, largest)? } else { layout.clone() };
        let mut report = tally.into_report(levels_in, n as u64);
        report.level_appended = level_appended;
        report.items_disambiguated = if level_appended { repeated } else { 0 };
        let extra_bits = if level_appended { final_layout.bits(levels_in) } else { 0 };
        let key_width_out = Keys::width(final_layout.total_bits());
        let report_words = encode_report(&report);
        let level_sizes: Vec<u8> = final_layout.sizes().iter().flat_map(|s| s.to_le_bytes()).collect();
        let report_bytes: Vec<u8> = report_words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let lens = [level_sizes.len(), report_bytes.len(), 8 * n, 4 * n, key_width_out * n, 4 * n];
        let (header, offsets, file_len) = file_header(n, final_layout.levels(), 0, lens);
        let temp_files = [ids_path.clone(), keys_path.clone(), item_pos_path.clone()];
        atomic_write(&path, |file| {
            file.write_all(&header[..CHECKSUMMED_FROM])?;
            let mut out = Hashing::new(&mut *file);
            out.put(&header[CHECKSUMMED_FROM..])?;
            out.written = HEADER_LEN;
            out.section(offsets[0], |o| o.put(&level_sizes))?;
            out.section(offsets[1], |o| o.put(&report_bytes))?;
            out.section(offsets[2], |o| copy_file(&ids_path, o))?;
            let _ = std::fs::remove_file(&ids_path);
            out.section(offsets[3], |o| {
                let mut merge = Merge::<(u32, u32)>::open(&inverse_runs)?;
                let mut expected = 0u32;
                while let Some((j, p)) = merge.next()? {
                    if j != expected {
                        return Err(bad_data(format!("the inverse permutation skips item {expected}")));
                    }
                    o.put(&p.to_le_bytes())?;
                    expected += 1;
                }
                Ok(())
            })?;
            remove_all(&inverse_runs);
            out.section(offsets[4], |o| {
                let mut keys = BlockReader::open(&keys_path, IO_BLOCK)?;
                let (mut previous, mut rank) = (None, 0u64);
                while let Some(bytes) = keys.next_bytes(key_width_in)? {
                    let mut key = if key_width_in == 4 { u64::from(u32_le(bytes)) } else { u64_le(bytes) };
                    if level_appended {
                        rank = if previous == Some(key) { rank + 1 } else { 0 };
                        previous = Some(key);
                        key = (key << extra_bits) | rank;
                    }
                    if key_width_out == 4 {
                        o.put(&(key as u32).to_le_bytes())?;
                    } else {
                        o.put(&key.to_le_bytes())?;
                    }
                }
                Ok(())
            })?;
            let _ = std::fs::remove_file(&keys_path);
            out.section(offsets[5], |o| copy_file(&item_pos_path, o))?;
            if out.written != file_len {
                return Err(bad_data(format!("wrote {} bytes, the header declares {file_len}", out.written)));
            }
            let checksum = out.finish()?;
            file.seek(SeekFrom::Start(16))?;
            file.write_all(&checksum.to_le_bytes())?;
            Ok(())
        })
        .map_err(|err| match err {
            Gr2Error::Io { context, source } => Gr2Error::Io { context: format!("{context} (SID index build)"), source },
            other => other,
        })?;
        remove_all(&temp_files);
        drop(temp);
        Ok(report)
    }
}

/// The longest run of equal keys in `entries` (sorted), continuing a run of `run` items of
/// `previous` before them.
fn largest_run(entries: &[Entry], mut previous: Option<u64>, mut run: usize) -> usize {
    let mut largest = run;
    for &(key, _) in entries {
        run = if previous == Some(key) { run + 1 } else { 1 };
        largest = largest.max(run);
        previous = Some(key);
    }
    largest
}

/// The largest number of items left on one SID of a prefix after repair, from the prefix's count
/// per last-level code: movers (all but one item of each code, in code order) take the free codes
/// one each until none is left (`build::repair_prefix`).
fn largest_after_repair(counts: &[u64]) -> u64 {
    let mut free = counts.iter().filter(|&&c| c == 0).count() as u64;
    let mut largest = 0;
    for &count in counts.iter().filter(|&&c| c > 0) {
        let moved = (count - 1).min(free);
        free -= moved;
        largest = largest.max(count - moved).max(u64::from(moved > 0));
    }
    largest
}

/// For a build that must fail: the largest SID group after repair over the prefix group `tail`
/// (already read) and the rest of the stream, counted per prefix without holding the items.
fn count_degenerate(
    merge: &mut Merge<(u64, u32)>,
    tail: Vec<Entry>,
    last_bits: u32,
    last_size: u32,
) -> std::io::Result<usize> {
    let mask = if last_bits == 0 { 0 } else { (1u64 << last_bits) - 1 };
    let mut counts = vec![0u64; last_size as usize];
    let mut touched: Vec<usize> = Vec::new();
    let mut current = tail.first().map(|e| e.0 >> last_bits);
    let mut largest = 0u64;
    let entries = tail.into_iter().map(Ok).chain(std::iter::from_fn(|| merge.next().transpose()));
    for entry in entries {
        let (key, _) = entry?;
        if current != Some(key >> last_bits) {
            largest = largest.max(largest_after_repair(&counts));
            for &code in &touched {
                counts[code] = 0;
            }
            touched.clear();
            current = Some(key >> last_bits);
        }
        let code = (key & mask) as usize;
        if counts[code] == 0 {
            touched.push(code);
        }
        counts[code] += 1;
    }
    largest = largest.max(largest_after_repair(&counts));
    Ok(usize::try_from(largest).unwrap_or(usize::MAX))
}

/// The output file, hashed as it is written (the checksum covers every byte from offset 24);
/// small writes are staged into blocks so the hasher and the file see large slices.
struct Hashing<W: Write> {
    out: W,
    stage: Vec<u8>,
    hasher: Xxh3Default,
    written: usize,
}

impl<W: Write> Hashing<W> {
    fn new(out: W) -> Self {
        Hashing { out, stage: Vec::with_capacity(IO_BLOCK), hasher: Xxh3Default::new(), written: 0 }
    }

    fn drain(&mut self) -> std::io::Result<()> {
        self.out.write_all(&self.stage)?;
        self.hasher.update(&self.stage);
        self.stage.clear();
        Ok(())
    }

    #[inline]
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.stage.len() + bytes.len() > IO_BLOCK {
            self.drain()?;
        }
        if bytes.len() >= IO_BLOCK {
            self.out.write_all(bytes)?;
            self.hasher.update(bytes);
        } else {
            self.stage.extend_from_slice(bytes);
        }
        self.written += bytes.len();
        Ok(())
    }

    /// Pads to `offset`, then writes a section.
    fn section(&mut self, offset: usize, body: impl FnOnce(&mut Self) -> std::io::Result<()>) -> std::io::Result<()> {
        let pad = offset
            .checked_sub(self.written)
            .filter(|&p| p < ALIGN)
            .ok_or_else(|| bad_data(format!("section at {offset} but {} bytes written", self.written)))?;
        self.put(&[0u8; ALIGN][..pad])?;
        body(self)
    }

    /// Writes what is staged; the checksum of everything after the header's first 24 bytes.
    fn finish(mut self) -> std::io::Result<u64> {
        self.drain()?;
        self.out.flush()?;
        Ok(self.hasher.digest())
    }
}

fn copy_file<W: Write>(path: &Path, out: &mut Hashing<W>) -> std::io::Result<()> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; IO_BLOCK];
    loop {
        let got = file.read(&mut buf)?;
        if got == 0 {
            return Ok(());
        }
        out.put(&buf[..got])?;
    }
}

#[cfg(test)]
mod tests {

    use proptest::prelude::*;

    use super::super::SidIndex;
    use super::*;

    /// Builds `ids`/`codes` through the writer, adding them in pieces of the given lengths (the
    /// rest in one final piece); the file's bytes.
    fn stream(dir: &Path, ids: &[u64], codes: &[u16], sizes: &[u32], chunk: usize, pieces: &[usize]) -> Result<(Vec<u8>, RepairReport)> {
        let path = dir.join("streamed.gr2sid");
        let levels = sizes.len();
        let mut writer = SidIndexWriter::new(&path, sizes, chunk, None)?;
        let mut at = 0usize;
        for &len in pieces.iter().chain(std::iter::once(&usize::MAX)) {
            let end = at.saturating_add(len).min(ids.len());
            writer.add(&ids[at..end], &codes[at * levels..end * levels])?;
            at = end;
        }
        assert_eq!(writer.len(), ids.len());
        let report = writer.finish()?;
        Ok((std::fs::read(&path).expect("written"), report))
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "streamed.gr2sid")
            .collect()
    }

    /// The writer's file equals `build` + `to_bytes`, or both fail with the same message.
    fn assert_same(ids: &[u64], codes: &[u16], sizes: &[u32], chunk: usize, pieces: &[usize]) {
        let dir = tempfile::tempdir().unwrap();
        let built = SidIndex::build(ids, codes, sizes.len(), Some(sizes));
        let streamed = stream(dir.path(), ids, codes, sizes, chunk, pieces);
        match (built, streamed) {
            (Ok(index), Ok((bytes, report))) => {
                assert_eq!(&report, index.repair_report());
                let want = index.to_bytes().unwrap();
                assert_eq!(bytes.len(), want.len());
                assert!(bytes == want, "file bytes differ from build + save");
                let loaded = SidIndex::from_bytes(&bytes).unwrap();
                assert_eq!(loaded.len(), ids.len());
            }
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            (a, b) => panic!("build gave {:?}, the writer {:?}", a.map(|_| ()), b.map(|_| ())),
        }
        assert_eq!(leftovers(dir.path()), Vec::<String>::new(), "temporary files left behind");
    }

    fn random_ids(n: usize, seed: u64, range: u64) -> Vec<u64> {
        let mut v = crate::index::tests::xorshift_ids(n, seed, range);
        v.rotate_left(n / 3);
        v
    }

    #[test]
    fn empty_one_item_and_empty_chunks() {
        assert_same(&[], &[], &[256, 256, 256, 256], 4, &[]);
        assert_same(&[], &[], &[256, 256, 256, 256], 4, &[0, 0, 0]);
        assert_same(&[7], &[1, 2, 3, 4], &[256, 256, 256, 256], 1, &[0, 0]);
        assert_same(&[u64::MAX], &[255, 255, 255, 255], &[256, 256, 256, 256], 3, &[]);
    }

    #[test]
    fn all_colliding_codes_append_a_level() {
        // 600 items, one SID, a last level of 4 codes: 3 move, the rest are disambiguated.
        let ids = random_ids(600, 11, 1 << 40);
        let codes: Vec<u16> = (0..600).flat_map(|_| [1u16, 2, 3]).collect();
        for chunk in [1, 7, 64, 1000] {
            assert_same(&ids, &codes, &[4, 4, 4], chunk, &[0, 100, 1, 0, 250]);
        }
        // Wide keys after the appended level (32 input bits + 10 more).
        let codes: Vec<u16> = (0..600).flat_map(|_| [9u16, 9, 9, 9]).collect();
        assert_same(&ids, &codes, &[256, 256, 256, 256], 50, &[]);
        // Too degenerate: more than 65536 items on one SID of a 1-code last level.
        let n = 65_538;
        let ids: Vec<u64> = (0..n as u64).rev().collect();
        let codes = vec![0u16; n];
        assert_same(&ids, &codes, &[1], 10_000, &[]);
    }

    #[test]
    fn an_unrepairable_prefix_is_counted_not_held() {
        // Prefix 0 of a [2, 2] layout holds 140,000 items (more than 2 x 65536, so the writer stops
        // buffering it); prefix 1 holds 70,000 on one code. Build and writer fail alike, naming
        // the largest group after repair (100,000 on code (0, 0)).
        let n = 210_000usize;
        let ids: Vec<u64> = (0..n as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        let codes: Vec<u16> = (0..n).flat_map(|i| if i < 100_000 { [0, 0] } else if i < 140_000 { [0, 1] } else { [1, 1] }).collect();
        assert_same(&ids, &codes, &[2, 2], 50_000, &[]);
        let err = SidIndex::build(&ids, &codes, 2, Some(&[2, 2])).unwrap_err().to_string();
        assert!(err.starts_with("100000 items share one SID"), "{err}");
        // Earlier groups (before the crowded prefix) count too: here the largest is in prefix 0
        // (99,999 after one move), prefix 1 (140,000 items) is the one counted.
        let n = 240_000usize;
        let ids: Vec<u64> = (0..n as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        let codes: Vec<u16> = (0..n).flat_map(|i| if i < 100_000 { [0, 1] } else { [1, (i % 2) as u16] }).collect();
        assert_same(&ids, &codes, &[2, 2], 30_000, &[]);
        let err = SidIndex::build(&ids, &codes, 2, Some(&[2, 2])).unwrap_err().to_string();
        assert!(err.starts_with("99999 items share one SID"), "{err}");
        assert_eq!(largest_after_repair(&[5, 0, 0, 1]), 3);
        assert_eq!(largest_after_repair(&[0, 0]), 0);
        assert_eq!(largest_after_repair(&[1, 0]), 1);
        assert_eq!(largest_after_repair(&[3, 3]), 3);
    }

    #[test]
    fn duplicate_ids_across_chunks_name_the_same_rows() {
        let mut ids = random_ids(500, 5, 1000);
        ids[420] = ids[17];
        ids[300] = ids[17];
        ids[499] = ids[3];
        let codes: Vec<u16> = (0..500u16).flat_map(|i| [i % 7, i % 5]).collect();
        for chunk in [1, 10, 128, 1000] {
            assert_same(&ids, &codes, &[8, 8], chunk, &[17, 1, 0, 200]);
        }
    }

    #[test]
    fn out_of_range_codes_name_the_global_row_and_add_nothing() {
        let ids: Vec<u64> = (0..100).collect();
        let mut codes: Vec<u16> = (0..100u16).flat_map(|i| [i % 3, i % 2]).collect();
        codes[2 * 77 + 1] = 2;
        assert_same(&ids, &codes, &[3, 2], 10, &[30, 30]);
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SidIndexWriter::new(dir.path().join("x.gr2sid"), &[3, 2], 10, None).unwrap();
        writer.add(&ids[..50], &codes[..100]).unwrap();
        let err = writer.add(&ids[50..], &codes[100..]).unwrap_err().to_string();
        assert!(err.contains("codes[77, 1] = 2"), "{err}");
        assert_eq!(writer.len(), 50);
        assert!(writer.add(&ids[..1], &codes[..1]).unwrap_err().to_string().contains("codes hold 1 values"));
        let mut fixed = codes.clone();
        fixed[2 * 77 + 1] = 1;
        writer.add(&ids[50..], &fixed[100..]).unwrap();
        let report = writer.finish().unwrap();
        let index = SidIndex::build(&ids, &fixed, 2, Some(&[3, 2])).unwrap();
        assert_eq!(&report, index.repair_report());
        assert_eq!(std::fs::read(dir.path().join("x.gr2sid")).unwrap(), index.to_bytes().unwrap());
    }

    #[test]
    fn bad_arguments_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.gr2sid");
        assert!(SidIndexWriter::new(&target, &[], 10, None).is_err());
        assert!(SidIndexWriter::new(&target, &[0, 4], 10, None).is_err());
        assert!(SidIndexWriter::new(&target, &[65536; 5], 10, None).is_err());
        assert!(SidIndexWriter::new(&target, &[4], 0, None).unwrap_err().to_string().contains("chunk_items"));
        assert!(matches!(SidIndexWriter::new(dir.path(), &[4], 10, None), Err(Gr2Error::Io { .. })));
        let missing = dir.path().join("no/such/folder/x.gr2sid");
        assert!(matches!(SidIndexWriter::new(missing, &[4], 10, None), Err(Gr2Error::Io { .. })));
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn an_impossible_chunk_size_is_an_error_not_an_abort() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SidIndexWriter::new(dir.path().join("x.gr2sid"), &[4], usize::MAX / 4, None).unwrap();
        let err = writer.add(&[1, 2], &[0, 1]).unwrap_err().to_string();
        assert!(err.contains("use a smaller chunk_items"), "{err}");
        assert_eq!(writer.len(), 0);
        writer.finish().unwrap(); // nothing was added: an empty index
        assert_eq!(SidIndex::load(dir.path().join("x.gr2sid")).unwrap().len(), 0);
    }

    #[test]
    fn temporary_folder_is_removed_on_drop_and_stale_ones_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.gr2sid");
        let mut writer = SidIndexWriter::new(&target, &[16, 16], 2, None).unwrap();
        writer.add(&[1, 2, 3, 4, 5], &[1, 1, 2, 2, 3, 3, 4, 4, 5, 5]).unwrap();
        let temp = writer.temp_dir().to_path_buf();
        assert!(std::fs::read_dir(&temp).unwrap().count() >= 3, "runs are on disk");
        drop(writer);
        assert!(!temp.exists());
        assert!(!target.exists());
        // A folder of a dead writer (pid that cannot exist) is removed by the next writer; one whose
        // name does not follow the pattern is left alone.
        let stale = dir.path().join(".x.gr2sid.build-2147483646-1");
        let other = dir.path().join(".x.gr2sid.build-notapid");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("by-id-0.run"), b"junk").unwrap();
        std::fs::create_dir(&other).unwrap();
        let writer = SidIndexWriter::new(&target, &[16, 16], 2, None).unwrap();
        assert!(!stale.exists());
        assert!(other.exists());
        writer.finish().unwrap();
        assert_eq!(SidIndex::load(&target).unwrap().len(), 0);
    }

    #[test]
    fn a_failed_finish_keeps_the_old_file_and_removes_the_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.gr2sid");
        SidIndex::build(&[1], &[0], 1, Some(&[4])).unwrap().save(&target).unwrap();
        let before = std::fs::read(&target).unwrap();
        let mut writer = SidIndexWriter::new(&target, &[4], 2, None).unwrap();
        writer.add(&[5, 6, 5], &[0, 1, 2]).unwrap();
        let err = writer.finish().unwrap_err().to_string();
        assert!(err.contains("item id 5 appears more than once (rows 0 and 2)"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), before);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.gr2sid")]);
    }

    #[test]
    fn a_temp_parent_elsewhere_is_used_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.gr2sid");
        let ids: Vec<u64> = (0..1000).rev().collect();
        let codes: Vec<u16> = (0..1000u16).flat_map(|i| [i % 16, i % 3]).collect();
        let mut writer = SidIndexWriter::new(&target, &[16, 4], 100, Some(scratch.path())).unwrap();
        writer.add(&ids, &codes).unwrap();
        assert!(writer.temp_dir().starts_with(scratch.path()));
        writer.finish().unwrap();
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
        let index = SidIndex::build(&ids, &codes, 2, Some(&[16, 4])).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), index.to_bytes().unwrap());
    }

    #[test]
    fn larger_random_input_with_many_runs() {
        // Sparse ids, 4 levels of 16 codes: many collisions and several full prefixes.
        let n = 30_000;
        let ids = random_ids(n, 99, u64::MAX);
        let mut x = 12345u64;
        let codes: Vec<u16> = (0..n * 4)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) % 16) as u16
            })
            .collect();
        assert_same(&ids, &codes, &[16, 16, 16, 16], 997, &[5000, 0, 1]);
        assert_same(&ids, &codes[..], &[16, 16, 16, 16], n, &[]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(48)))]

        /// Random small datasets (collisions, full prefixes, appended levels, duplicate ids, codes
        /// out of range), random chunk sizes and random splits into `add` calls.
        #[test]
        fn writer_equals_build(
            n in 0usize..150,
            levels in 1usize..4,
            sizes in proptest::collection::vec(1u32..6, 3),
            seed in any::<u64>(),
            dup in any::<bool>(),
            bad_code in any::<bool>(),
            chunk in 1usize..40,
            pieces in proptest::collection::vec(0usize..50, 0..6),
        ) {
            let sizes = sizes[..levels].to_vec();
            let mut ids = random_ids(n, seed, if seed % 2 == 0 { 400 } else { u64::MAX });
            let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
            let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
            let mut codes: Vec<u16> = (0..n * levels).map(|i| (next() % u64::from(sizes[i % levels])) as u16).collect();
            if dup && n > 2 {
                let (a, b) = ((next() % n as u64) as usize, (next() % n as u64) as usize);
                ids[a] = ids[b];
            }
            if bad_code && n > 0 {
                let i = (next() % (n * levels) as u64) as usize;
                codes[i] = sizes[i % levels] as u16;
            }
            assert_same(&ids, &codes, &sizes, chunk, &pieces);
        }
    }
}
