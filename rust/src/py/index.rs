//! Python binding of the semantic-ID index (`gr2.SidIndex`). Validates numpy inputs strictly,
//! releases the GIL around every pass over the data, and returns freshly owned numpy arrays.

use std::borrow::Cow;
use std::path::PathBuf;

use numpy::ndarray::Array2;
use numpy::prelude::*;
use numpy::{dtype, Element, PyArray1, PyArray2, PyUntypedArray};
use pyo3::exceptions::PyOverflowError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use super::constraint::PySidTrie;
use super::errors::{extract_arg, int_arg, short_repr};
use crate::error::{catch_panics, Gr2Error};
use crate::index::{LoadMode, SidIndex, SidIndexWriter, DEFAULT_CHUNK_ITEMS};

/// A numpy array's data as a row-major slice: borrowed when C-contiguous, copied in logical
/// order otherwise (`as_slice` alone also accepts Fortran order, whose memory order would be
/// misread as rows).
fn row_major<'a, T: Element + Copy, D: numpy::ndarray::Dimension>(
    array: &'a numpy::PyReadonlyArray<'_, T, D>,
) -> Cow<'a, [T]> {
    match array.as_slice() {
        Ok(slice) if array.is_c_contiguous() => Cow::Borrowed(slice),
        _ => Cow::Owned(array.as_array().iter().copied().collect()),
    }
}

/// Checks that `obj` is a numpy array of dtype `T` with `ndim` dimensions (and `columns` columns
/// when given); the error says what was passed and how to fix it.
fn checked_array<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    ndim: usize,
    columns: Option<usize>,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let py = obj.py();
    let type_name = dtype::<T>(py).to_string();
    let shape_text = match (ndim, columns) {
        (1, _) => "(n,)".to_string(),
        (_, Some(c)) => format!("(n, {c})"),
        _ => "(n, levels)".to_string(),
    };
    let wanted = format!("{name} must be a numpy {type_name} array of shape {shape_text}");
    let Ok(array) = obj.cast::<PyUntypedArray>() else {
        let got = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        return Err(Gr2Error::invalid(format!(
            "{wanted}, got a {got}; convert with numpy.asarray({name}, dtype=numpy.{type_name})"
        ))
        .into());
    };
    let describe = || format!("{} array of shape {}", array.dtype(), shape_tuple(array.shape()));
    if !array.dtype().is_equiv_to(&dtype::<T>(py)) {
        return Err(Gr2Error::invalid(format!(
            "{wanted}, got a {}; convert with {name}.astype(numpy.{type_name}) after checking the values fit",
            describe()
        ))
        .into());
    }
    if array.ndim() != ndim || columns.is_some_and(|c| array.shape()[1] != c) {
        return Err(Gr2Error::invalid(format!("{wanted}, got a {}", describe())).into());
    }
    Ok(array.clone())
}

/// A shape the way Python prints it: `(5,)`, `(2, 3)`.
fn shape_tuple(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

fn vector<'py, T: Element>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<numpy::PyReadonlyArray1<'py, T>> {
    let array = checked_array::<T>(obj, name, 1, None)?;
    array.cast_into::<PyArray1<T>>().map_err(PyErr::from)?.try_readonly().map_err(borrow_error(name))
}

fn matrix<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    columns: Option<usize>,
) -> PyResult<numpy::PyReadonlyArray2<'py, T>> {
    let array = checked_array::<T>(obj, name, 2, columns)?;
    array.cast_into::<PyArray2<T>>().map_err(PyErr::from)?.try_readonly().map_err(borrow_error(name))
}

fn borrow_error(name: &str) -> impl Fn(numpy::BorrowError) -> PyErr + '_ {
    move |err| Gr2Error::invalid(format!("{name} cannot be read: {err}")).into()
}

/// `codebook_size`: None, one int for every level, or a sequence with one int per level.
fn level_sizes(codebook_size: Option<&Bound<'_, PyAny>>, levels: usize) -> PyResult<Option<Vec<u32>>> {
    let Some(obj) = codebook_size else { return Ok(None) };
    if obj.is_none() {
        return Ok(None);
    }
    let limit = i64::from(crate::index::layout::MAX_LEVEL_SIZE);
    let is_int = |o: &Bound<'_, PyAny>| o.extract::<i64>().is_ok() || o.extract::<i64>().is_err_and(|e| e.is_instance_of::<PyOverflowError>(o.py()));
    let values: Vec<i64> = if is_int(obj) {
        vec![int_arg(obj, "codebook_size", 1, limit)?; levels]
    } else if let Ok(items) = obj.extract::<Vec<Bound<'_, PyAny>>>() {
        items
            .iter()
            .enumerate()
            .map(|(l, k)| int_arg(k, &format!("codebook_size[{l}]"), 1, limit))
            .collect::<PyResult<_>>()?
    } else {
        return Err(Gr2Error::invalid(format!(
            "codebook_size must be None, an int, or a list of ints (one per level), got {}",
            short_repr(obj)
        ))
        .into());
    };
    Ok(Some(values.into_iter().map(|k| k as u32).collect()))
}

/// A SID prefix given as a list/tuple/array of ints.
fn prefix_codes(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u16>> {
    let values: Vec<Bound<'_, PyAny>> = extract_arg(obj, "prefix", "a sequence of ints (codes)")?;
    values
        .iter()
        .enumerate()
        .map(|(i, c)| Ok(int_arg(c, &format!("prefix[{i}]"), 0, i64::from(u16::MAX))? as u16))
        .collect()
}

/// A `path` argument: str or os.PathLike.
fn path_arg(obj: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    extract_arg(obj, "path", "a str or os.PathLike")
}

/// Bijection between item ids (uint64) and semantic IDs (one uint16 code per level), with
/// deterministic collision repair, batched lookups both ways, and a checksummed file format
/// (loaded into owned memory, or memory-mapped on request).
type IdsAndCodes<'py> = (numpy::PyReadonlyArray1<'py, u64>, numpy::PyReadonlyArray2<'py, u16>, usize);

/// `item_ids` (n,) and `codes` (n, L) of build/extend, checked to match, plus L.
fn ids_and_codes<'py>(item_ids: &Bound<'py, PyAny>, codes: &Bound<'py, PyAny>) -> PyResult<IdsAndCodes<'py>> {
    let ids = vector::<u64>(item_ids, "item_ids")?;
    let codes = matrix::<u16>(codes, "codes", None)?;
    let (rows, levels) = (codes.shape()[0], codes.shape()[1]);
    if rows != ids.len() {
        return Err(Gr2Error::invalid(format!(
            "item_ids has {} entries but codes has {rows} rows; they must match",
            ids.len()
        ))
        .into());
    }
    Ok((ids, codes, levels))
}

#[pyclass(frozen, module = "gr2._gr2", name = "SidIndex")]
pub struct PySidIndex {
    inner: SidIndex,
    /// The trie of every item (`SidTrie.from_index`), built on first use and kept: the index never
    /// changes (`extend`/`remove` return new indexes, which start without one).
    catalog_trie: PyOnceLock<Py<PySidTrie>>,
}

impl PySidIndex {
    fn new_holding(inner: SidIndex) -> Self {
        PySidIndex { inner, catalog_trie: PyOnceLock::new() }
    }

    /// The Rust index, for the other bindings (reward verification looks SIDs up in it directly).
    pub(crate) fn sid_index(&self) -> &SidIndex {
        &self.inner
    }

    /// Where `SidTrie.from_index` keeps this index's trie.
    pub(crate) fn catalog_trie(&self) -> &PyOnceLock<Py<PySidTrie>> {
        &self.catalog_trie
    }
}

#[pymethods]
impl PySidIndex {
    /// There is no plain constructor; say which ones exist (instead of PyO3's bare TypeError).
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        Err(Gr2Error::invalid(
            "SidIndex() has no constructor: use SidIndex.build(item_ids, codes), SidIndex.load(path) \
             or SidIndex.from_bytes(data)",
        )
        .into())
    }

    /// Builds an index; `codes[i]` is the SID of `item_ids[i]`. Colliding SIDs are repaired.
    #[staticmethod]
    #[pyo3(signature = (item_ids, codes, codebook_size=None))]
    fn build(
        py: Python<'_>,
        item_ids: &Bound<'_, PyAny>,
        codes: &Bound<'_, PyAny>,
        codebook_size: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        catch_panics(|| {
            let (ids, codes, levels) = ids_and_codes(item_ids, codes)?;
            let sizes = level_sizes(codebook_size, levels)?;
            let (ids, codes) = (row_major(&ids), row_major(&codes));
            let inner = py.detach(|| SidIndex::build(&ids, &codes, levels, sizes.as_deref()))?;
            Ok(PySidIndex::new_holding(inner))
        })
    }

    /// A new index with these items added; every existing item keeps its SID (see the Rust
    /// `update` module for the repair of the new items).
    fn extend(&self, py: Python<'_>, item_ids: &Bound<'_, PyAny>, codes: &Bound<'_, PyAny>) -> PyResult<Self> {
        catch_panics(|| {
            let (ids, codes, levels) = ids_and_codes(item_ids, codes)?;
            let (ids, codes) = (row_major(&ids), row_major(&codes));
            let inner = py.detach(|| self.inner.extend(&ids, &codes, levels))?;
            Ok(PySidIndex::new_holding(inner))
        })
    }

    /// A new index without these items; every other item keeps its SID.
    fn remove(&self, py: Python<'_>, item_ids: &Bound<'_, PyAny>) -> PyResult<Self> {
        catch_panics(|| {
            let ids = vector::<u64>(item_ids, "item_ids")?;
            let ids = row_major(&ids);
            let inner = py.detach(|| self.inner.remove(&ids))?;
            Ok(PySidIndex::new_holding(inner))
        })
    }

    /// 0 for a built index; +1 for every `extend`/`remove` that derived it (saved in the file).
    #[getter]
    fn generation(&self) -> u32 {
        self.inner.generation()
    }

    /// Loads and validates an index file written by `save`: read into memory the index owns
    /// (default), or memory-mapped with `mmap=True` (the file must then never be modified in
    /// place while the index is alive; replacing it by rename, as `save` does, is safe).
    /// `verify=False` skips the checksum and the pass over the arrays (header checks stay).
    #[staticmethod]
    #[pyo3(signature = (path, mmap=None, verify=None))]
    fn load(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        mmap: Option<&Bound<'_, PyAny>>,
        verify: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        catch_panics(|| {
            let verify = match verify {
                Some(flag) if !flag.is_none() => extract_arg::<bool>(flag, "verify", "a bool")?,
                _ => true,
            };
            let path = path_arg(path)?;
            let mode = match mmap {
                None => LoadMode::Copy,
                Some(flag) if flag.is_none() => LoadMode::Copy,
                Some(flag) => {
                    if extract_arg::<bool>(flag, "mmap", "a bool")? {
                        LoadMode::Mmap
                    } else {
                        LoadMode::Copy
                    }
                }
            };
            let inner = py.detach(|| SidIndex::load_verified(&path, mode, verify))?;
            Ok(PySidIndex::new_holding(inner))
        })
    }

    /// Writes the index atomically (temporary file, fsync, rename).
    fn save(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        catch_panics(|| {
            let path = path_arg(path)?;
            Ok(py.detach(|| self.inner.save(&path))?)
        })
    }

    /// The bytes `save` would write (the file format).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        catch_panics(|| {
            let inner = &self.inner;
            PyBytes::new_with(py, inner.file_len(), |buf| inner.write_bytes_into(buf).map_err(PyErr::from))
        })
    }

    /// An index from the bytes of a saved file (`to_bytes`), validated like `load`.
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Self> {
        catch_panics(|| {
            let bytes: PyBackedBytes = extract_arg(data, "data", "bytes or bytearray")?;
            let inner = py.detach(|| SidIndex::from_bytes(&bytes))?;
            Ok(PySidIndex::new_holding(inner))
        })
    }

    /// Pickle support (multiprocessing, Ray): rebuilt from the bytes of the file format.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let py = slf.py();
        let from_bytes = slf.get_type().getattr("from_bytes")?;
        Ok((from_bytes, (slf.get().to_bytes(py)?,)))
    }

    /// Whether the index was loaded with `mmap=True` (its arrays live in the mapped file).
    #[getter]
    fn is_mapped(&self) -> bool {
        self.inner.is_mapped()
    }

    /// SIDs of the given items: uint64 (m,) -> uint16 (m, levels).
    fn sids<'py>(&self, py: Python<'py>, item_ids: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<u16>>> {
        catch_panics(|| {
            let ids = vector::<u64>(item_ids, "item_ids")?;
            let ids = row_major(&ids);
            let levels = self.inner.levels();
            let codes = py.detach(|| self.inner.sids(&ids))?;
            let codes = Array2::from_shape_vec((ids.len(), levels), codes).map_err(|e| Gr2Error::invalid(e.to_string()))?;
            Ok(codes.into_pyarray(py))
        })
    }

    /// Items of the given SIDs: uint16 (m, levels) -> uint64 (m,).
    fn items<'py>(&self, py: Python<'py>, sids: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        catch_panics(|| {
            let sids = matrix::<u16>(sids, "sids", Some(self.inner.levels()))?;
            let sids = row_major(&sids);
            Ok(py.detach(|| self.inner.items(&sids))?.into_pyarray(py))
        })
    }

    /// All item ids, sorted by SID (row i belongs with `codes()[i]`).
    fn item_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        catch_panics(|| Ok(py.detach(|| self.inner.item_ids_by_sid()).into_pyarray(py)))
    }

    /// All SIDs in ascending (lexicographic) order: uint16 (n, levels).
    fn codes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u16>>> {
        catch_panics(|| {
            let codes = py.detach(|| self.inner.codes_by_sid());
            let codes = Array2::from_shape_vec((self.inner.len(), self.inner.levels()), codes)
                .map_err(|e| Gr2Error::invalid(e.to_string()))?;
            Ok(codes.into_pyarray(py))
        })
    }

    /// The distinct next-level codes under a SID prefix (ascending uint16); empty when the prefix
    /// is absent or already a complete SID.
    fn children<'py>(&self, py: Python<'py>, prefix: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray1<u16>>> {
        catch_panics(|| {
            let prefix = prefix_codes(prefix)?;
            let children = self.inner.children(&prefix)?;
            Ok(children.iter().map(|c| c.code).collect::<Vec<_>>().into_pyarray(py))
        })
    }

    /// `(start, end)`: rows of `item_ids()` / `codes()` whose SID starts with `prefix`.
    fn prefix_range(&self, prefix: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
        catch_panics(|| {
            let range = self.inner.prefix_range(&prefix_codes(prefix)?)?;
            Ok((range.start, range.end))
        })
    }

    /// What collision repair found and did (JSON-friendly dict).
    fn repair_report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        catch_panics(|| {
            let r = self.inner.repair_report();
            let dict = PyDict::new(py);
            dict.set_item("items", r.items)?;
            dict.set_item("levels_in", r.levels_in)?;
            dict.set_item("levels_out", self.inner.levels())?;
            dict.set_item("uniqueness_before_repair", r.uniqueness_before_repair())?;
            dict.set_item("unique_items_before", r.unique_items_before)?;
            dict.set_item("distinct_sids_before", r.distinct_sids_before)?;
            dict.set_item("distinct_ratio_before", r.distinct_ratio_before())?;
            dict.set_item("collision_groups", r.collision_groups())?;
            let sizes = PyDict::new(py);
            for &(size, count) in &r.collision_group_sizes {
                sizes.set_item(size, count)?;
            }
            dict.set_item("collision_group_sizes", sizes)?;
            dict.set_item("items_moved", r.items_moved)?;
            dict.set_item("max_move_distance", r.max_move_distance)?;
            dict.set_item("full_prefixes", r.full_prefixes)?;
            dict.set_item("level_appended", r.level_appended)?;
            let appended_size = r.level_appended.then(|| self.inner.level_sizes()[r.levels_in]);
            dict.set_item("appended_level_size", appended_size)?;
            dict.set_item("items_disambiguated", r.items_disambiguated)?;
            Ok(dict)
        })
    }

    /// Number of levels of every SID (L, or L + 1 after a disambiguation level).
    #[getter]
    fn levels(&self) -> usize {
        self.inner.levels()
    }

    /// Exclusive upper bound of the codes of each level.
    #[getter]
    fn level_sizes(&self) -> Vec<u32> {
        self.inner.level_sizes().to_vec()
    }

    /// Share of items whose input SID no other item shared.
    #[getter]
    fn uniqueness_before_repair(&self) -> f64 {
        self.inner.uniqueness_before_repair()
    }

    /// Bytes the index holds for lookups (arrays + bucket tables).
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.memory_bytes()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// `item_id in index` for an integer (int, numpy integer); integers outside the uint64 range
    /// are not contained; anything else (a float such as 10.0, a str) is an InvalidInputError.
    fn __contains__(&self, item_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        catch_panics(|| {
            match item_id.extract::<u64>() {
                Ok(id) => Ok(self.inner.contains(id)),
                Err(err) if err.is_instance_of::<PyOverflowError>(item_id.py()) => Ok(false),
                Err(err) => Err(Gr2Error::invalid(format!(
                    "item_id must be an int (item ids are uint64), got {}: {err}",
                    short_repr(item_id)
                ))
                .into()),
            }
        })
    }

    fn __repr__(&self) -> String {
        let r = self.inner.repair_report();
        format!(
            "SidIndex(items={}, levels={}, level_sizes={:?}, uniqueness_before_repair={:.6}, level_appended={}, generation={})",
            self.inner.len(),
            self.inner.levels(),
            self.inner.level_sizes(),
            r.uniqueness_before_repair(),
            if r.level_appended { "True" } else { "False" },
            self.inner.generation()
        )
    }
}

/// Builds an index file larger than memory from chunks of items (Rust: `SidIndexWriter`, the
/// `external` module): `add` sorts chunks into runs on disk, `finish` merges them into the file.
#[pyclass(frozen, module = "gr2._gr2", name = "SidIndexWriter")]
pub struct PySidIndexWriter {
    /// None once finished or closed. A Mutex (not `&mut self`): the GIL is released while a
    /// call works, and a second thread must get a gr2 error, not PyO3's borrow error.
    inner: std::sync::Mutex<Option<SidIndexWriter>>,
}

impl PySidIndexWriter {
    /// Runs `body` on the open writer; `take` removes it from the object first (finish, close).
    fn with_writer<T>(
        &self,
        take: bool,
        body: impl FnOnce(Option<&mut SidIndexWriter>, Option<SidIndexWriter>) -> PyResult<T>,
    ) -> PyResult<T> {
        let mut guard = match self.inner.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(Gr2Error::invalid("this SidIndexWriter is in use by another thread").into())
            }
            Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                let mut guard = poisoned.into_inner();
                *guard = None; // a panic mid-call: drop the writer (and its temporary files)
                self.inner.clear_poison();
                drop(guard);
                return Err(Gr2Error::invalid("this SidIndexWriter failed earlier and was discarded; start a new one").into());
            }
        };
        if take {
            body(None, guard.take())
        } else {
            body(guard.as_mut(), None)
        }
    }
}

fn closed() -> PyErr {
    Gr2Error::invalid("this SidIndexWriter is finished or closed; start a new one").into()
}

#[pymethods]
impl PySidIndexWriter {
    /// `level_sizes`: one int per level (codes of level l are < level_sizes[l]).
    #[new]
    #[pyo3(signature = (path, level_sizes, *, chunk_items=None, temp_dir=None))]
    fn new(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        level_sizes: &Bound<'_, PyAny>,
        chunk_items: Option<&Bound<'_, PyAny>>,
        temp_dir: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        catch_panics(|| {
            let path = path_arg(path)?;
            let values: Vec<Bound<'_, PyAny>> =
                extract_arg(level_sizes, "level_sizes", "a sequence of ints (one codebook size per level)")?;
            let limit = i64::from(crate::index::layout::MAX_LEVEL_SIZE);
            let sizes: Vec<u32> = values
                .iter()
                .enumerate()
                .map(|(l, k)| Ok(int_arg(k, &format!("level_sizes[{l}]"), 1, limit)? as u32))
                .collect::<PyResult<_>>()?;
            let chunk = match chunk_items {
                Some(obj) if !obj.is_none() => int_arg(obj, "chunk_items", 1, i64::from(u32::MAX))? as usize,
                _ => DEFAULT_CHUNK_ITEMS,
            };
            let temp_parent: Option<PathBuf> = match temp_dir {
                Some(obj) if !obj.is_none() => Some(extract_arg(obj, "temp_dir", "a str or os.PathLike")?),
                _ => None,
            };
            let writer = py.detach(|| SidIndexWriter::new(&path, &sizes, chunk, temp_parent.as_deref()))?;
            Ok(PySidIndexWriter { inner: std::sync::Mutex::new(Some(writer)) })
        })
    }

    /// Adds items: uint64 (m,) ids and uint16 (m, levels) codes. An invalid chunk (wrong dtype or
    /// shape, a code out of range; the error names the row counted over all items added) adds
    /// nothing. Duplicated ids are reported by `finish`.
    fn add(&self, py: Python<'_>, item_ids: &Bound<'_, PyAny>, codes: &Bound<'_, PyAny>) -> PyResult<()> {
        catch_panics(|| {
            self.with_writer(false, |writer, _| {
                let writer = writer.ok_or_else(closed)?;
                let ids = vector::<u64>(item_ids, "item_ids")?;
                let codes = matrix::<u16>(codes, "codes", Some(writer.levels()))?;
                if codes.shape()[0] != ids.len() {
                    return Err(Gr2Error::invalid(format!(
                        "item_ids has {} entries but codes has {} rows; they must match",
                        ids.len(),
                        codes.shape()[0]
                    ))
                    .into());
                }
                let (ids, codes) = (row_major(&ids), row_major(&codes));
                Ok(py.detach(|| writer.add(&ids, &codes))?)
            })
        })
    }

    /// Merges everything added into the index file (atomic: temporary file, fsync, rename) and
    /// removes the temporary files. The writer is closed afterwards, whether it succeeded or not.
    fn finish(&self, py: Python<'_>) -> PyResult<()> {
        catch_panics(|| {
            self.with_writer(true, |_, writer| {
                let writer = writer.ok_or_else(closed)?;
                py.detach(|| writer.finish())?;
                Ok(())
            })
        })
    }

    /// Discards an unfinished build (removes its temporary files); a no-op once closed.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        catch_panics(|| {
            self.with_writer(true, |_, writer| {
                py.detach(|| drop(writer));
                Ok(())
            })
        })
    }

    /// Items added so far (0 once finished or closed).
    fn __len__(&self) -> PyResult<usize> {
        catch_panics(|| self.with_writer(false, |writer, _| Ok(writer.map_or(0, |w| w.len()))))
    }

    /// Whether `finish` or `close` was called.
    #[getter]
    fn closed(&self) -> PyResult<bool> {
        catch_panics(|| self.with_writer(false, |writer, _| Ok(writer.is_none())))
    }

    /// The folder holding this build's temporary files (None once closed).
    #[getter]
    fn temp_dir(&self) -> PyResult<Option<PathBuf>> {
        catch_panics(|| self.with_writer(false, |writer, _| Ok(writer.map(|w| w.temp_dir().to_path_buf()))))
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Leaving a `with` block closes the writer: an unfinished build is discarded.
    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        match self.inner.try_lock() {
            Ok(guard) => match guard.as_ref() {
                Some(w) => format!("SidIndexWriter(items={}, levels={}, open)", w.len(), w.levels()),
                None => "SidIndexWriter(closed)".to_string(),
            },
            Err(_) => "SidIndexWriter(busy)".to_string(),
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySidIndex>()?;
    m.add_class::<PySidIndexWriter>()
}
