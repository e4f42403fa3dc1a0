//! Bindings of the constrained-decoding core (`crate::constraint`): `TokenMap`, `SidTrie` and
//! `ConstraintBatch` (many per-request automata; batched mask fill with the GIL released).

use std::sync::Arc;

use numpy::{IntoPyArray, PyUntypedArrayMethods, PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyReadwriteArray2};
use pyo3::exceptions::PyOverflowError;
use pyo3::prelude::*;

use crate::constraint::{self as core, DecodeState, Framing, ReasoningStart, TokenMapSpec};
use crate::error::{catch_panics, Gr2Error};
use crate::py::index::PySidIndex;

fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
    name: &str,
) -> Result<&'a [T], Gr2Error> {
    // `as_slice` also accepts Fortran order, whose memory order would be misread here.
    if !a.is_c_contiguous() {
        return Err(Gr2Error::invalid(format!("{name} must be a C-contiguous array (np.ascontiguousarray)")));
    }
    a.as_slice().map_err(|_| Gr2Error::invalid(format!("{name} must be a C-contiguous array")))
}

/// Most rows one `ConstraintBatch` may hold, and most copies `add_rerank(repeat=)` makes of each
/// request: resource bounds, so a wrong argument fails fast instead of allocating gigabytes.
pub const MAX_ROWS: usize = 1 << 20;
pub const MAX_REPEAT: usize = 4096;

/// A short description of a Python value for error messages ("a 2-D int64 ndarray", "str 'x'").
fn describe(obj: &Bound<'_, PyAny>) -> String {
    let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
    if let (Ok(dtype), Ok(ndim)) = (obj.getattr("dtype"), obj.getattr("ndim")) {
        return format!("a {ndim}-D {dtype} {ty}");
    }
    match obj.repr() {
        Ok(r) if r.to_string().len() <= 40 => format!("{ty} {r}"),
        _ => ty,
    }
}

/// Extract argument `name`; any conversion failure (wrong type or dtype, overflow, a negative
/// value for an unsigned parameter) becomes an InvalidInputError naming the argument.
fn arg<'a, 'py, T: FromPyObject<'a, 'py>>(obj: &'a Bound<'py, PyAny>, name: &str, expected: &str) -> PyResult<T> {
    obj.extract::<T>().map_err(|e| {
        let e: PyErr = e.into();
        Gr2Error::invalid(format!("{name} must be {expected}, got {} ({e})", describe(obj))).into()
    })
}

fn opt_arg<'a, 'py, T: FromPyObject<'a, 'py>>(
    obj: Option<&'a Bound<'py, PyAny>>,
    name: &str,
    expected: &str,
    default: T,
) -> PyResult<T> {
    match obj {
        Some(o) if !o.is_none() => arg(o, name, expected),
        _ => Ok(default),
    }
}

fn row_index(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    arg::<usize>(obj, name, "a row index (an int >= 0)")
}

fn reasoning_start(name: &str) -> Result<ReasoningStart, Gr2Error> {
    match name {
        "think" => Ok(ReasoningStart::Think),
        "in_think" => Ok(ReasoningStart::InThink),
        "disabled" => Ok(ReasoningStart::Disabled),
        other => Err(Gr2Error::invalid(format!(
            "reasoning must be 'think', 'in_think' or 'disabled', got {other:?}"
        ))),
    }
}

fn framing_args(
    reasoning: Option<&Bound<'_, PyAny>>,
    max_reasoning_tokens: Option<&Bound<'_, PyAny>>,
    default_reasoning: &str,
    default_budget: u32,
    answer_tags: bool,
) -> PyResult<Framing> {
    let name: String = opt_arg(reasoning, "reasoning", "a str", default_reasoning.to_string())?;
    let budget: u32 = opt_arg(max_reasoning_tokens, "max_reasoning_tokens", "an int in 0..2^32", default_budget)?;
    Ok(Framing { reasoning: reasoning_start(&name)?, max_reasoning_tokens: budget, answer_tags })
}

fn repeat_arg(repeat: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
    let repeat: usize = opt_arg(repeat, "repeat", "an int >= 1", 1)?;
    if repeat == 0 || repeat > MAX_REPEAT {
        return Err(Gr2Error::invalid(format!("repeat must be in 1..={MAX_REPEAT}, got {repeat}")).into());
    }
    Ok(repeat)
}

/// Token ids of the SID vocabulary and the format tags (see gr2.tokens.SidTokens).
#[pyclass(name = "TokenMap", module = "gr2._gr2", frozen)]
pub struct PyTokenMap {
    inner: Arc<core::TokenMap>,
}

impl PyTokenMap {
    /// The Rust map, for the reward verifier's token-id path.
    pub(crate) fn token_map(&self) -> &core::TokenMap {
        &self.inner
    }
}

#[pymethods]
impl PyTokenMap {
    #[new]
    #[pyo3(signature = (code_ids, *, sid_begin, sid_end, think_open, think_close, answer_open, answer_close,
                        vocab_size, eos=None, reasoning_vocab=None, forbidden_in_reasoning=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        code_ids: &Bound<'_, PyAny>,
        sid_begin: &Bound<'_, PyAny>,
        sid_end: &Bound<'_, PyAny>,
        think_open: &Bound<'_, PyAny>,
        think_close: &Bound<'_, PyAny>,
        answer_open: &Bound<'_, PyAny>,
        answer_close: &Bound<'_, PyAny>,
        vocab_size: &Bound<'_, PyAny>,
        eos: Option<&Bound<'_, PyAny>>,
        reasoning_vocab: Option<&Bound<'_, PyAny>>,
        forbidden_in_reasoning: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        catch_panics(|| {
            let code_ids = arg::<PyReadonlyArray2<'_, i64>>(code_ids, "code_ids", "a (levels, codes) int64 array")?;
            let id = |obj: &Bound<'_, PyAny>, name: &str| arg::<i64>(obj, name, "a token id (int)");
            let (sid_begin, sid_end) = (id(sid_begin, "sid_begin")?, id(sid_end, "sid_end")?);
            let (think_open, think_close) = (id(think_open, "think_open")?, id(think_close, "think_close")?);
            let (answer_open, answer_close) = (id(answer_open, "answer_open")?, id(answer_close, "answer_close")?);
            let eos = match eos {
                Some(e) if !e.is_none() => Some(id(e, "eos")?),
                _ => None,
            };
            let vocab_size: usize = arg(vocab_size, "vocab_size", "an int >= 1")?;
            let reasoning_vocab: Option<usize> = match reasoning_vocab {
                Some(r) if !r.is_none() => Some(arg(r, "reasoning_vocab", "an int >= 1")?),
                _ => None,
            };
            let forbidden_in_reasoning: Option<Vec<i64>> = match forbidden_in_reasoning {
                Some(f) if !f.is_none() => Some(arg(f, "forbidden_in_reasoning", "a list of token ids")?),
                _ => None,
            };
            let arr = code_ids.as_array();
            let rows = arr.outer_iter().map(|r| r.to_vec()).collect();
            let inner = core::TokenMap::new(TokenMapSpec {
                code_ids: rows,
                sid_begin,
                sid_end,
                think_open,
                think_close,
                answer_open,
                answer_close,
                eos,
                vocab_size,
                reasoning_vocab,
                forbidden_in_reasoning: forbidden_in_reasoning.unwrap_or_default(),
            })?;
            Ok(PyTokenMap { inner: Arc::new(inner) })
        })
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    /// int32 words per bitmask row: ceil(vocab_size / 32).
    #[getter]
    fn words(&self) -> usize {
        self.inner.words()
    }

    #[getter]
    fn levels(&self) -> usize {
        self.inner.levels
    }

    /// None for a map that only verifies completions.
    #[getter]
    fn eos(&self) -> Option<u32> {
        self.inner.eos
    }

    /// Sorted ids that free reasoning may not use.
    fn reasoning_forbidden<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.inner.reasoning_forbidden().iter().map(|&t| t as i64).collect::<Vec<_>>().into_pyarray(py)
    }
}

/// A prefix tree over a catalog's SIDs, shared by catalog-mode requests. It holds codes, not token
/// ids: `ConstraintBatch.add_catalog` checks that the batch's token map has a token for each.
#[pyclass(name = "SidTrie", module = "gr2._gr2", frozen)]
pub struct PySidTrie {
    inner: Arc<core::SidTrie>,
}

#[pymethods]
impl PySidTrie {
    #[new]
    fn new(py: Python<'_>, item_ids: &Bound<'_, PyAny>, codes: &Bound<'_, PyAny>) -> PyResult<Self> {
        catch_panics(|| {
            let item_ids = arg::<PyReadonlyArray1<'_, u64>>(item_ids, "item_ids", "a 1-D uint64 array")?;
            let codes = arg::<PyReadonlyArray2<'_, u16>>(codes, "codes", "an (n, L) uint16 array")?;
            let items = contiguous(&item_ids, "item_ids")?;
            let flat = contiguous(&codes, "codes")?;
            let (rows, levels) = (codes.shape()[0], codes.shape()[1]);
            if rows != items.len() {
                return Err(Gr2Error::invalid(format!(
                    "codes has {rows} rows but item_ids {} entries; they must match",
                    items.len()
                ))
                .into());
            }
            let trie = py.detach(|| core::SidTrie::build(items, flat, levels))?;
            Ok(PySidTrie { inner: Arc::new(trie) })
        })
    }

    /// The trie of every item of a loaded index, read from the index in Rust (no `item_ids()` /
    /// `codes()` copies through Python). Built once per index and kept with it: later calls
    /// return the same trie (an index never changes; `extend`/`remove` return new ones).
    #[staticmethod]
    fn from_index(py: Python<'_>, index: &Bound<'_, PyAny>) -> PyResult<Py<PySidTrie>> {
        catch_panics(|| {
            let index = arg::<Bound<'_, PySidIndex>>(index, "index", "a gr2.SidIndex")?;
            let index = index.get();
            let trie = index.catalog_trie().get_or_try_init(py, || {
                let sids = index.sid_index();
                let trie = py
                    .detach(|| core::SidTrie::build(&sids.item_ids_by_sid(), &sids.codes_by_sid(), sids.levels()))
                    .map_err(|e| match e {
                        Gr2Error::InvalidInput(m) => Gr2Error::invalid(format!("index: {m}")),
                        other => other,
                    })?;
                Py::new(py, PySidTrie { inner: Arc::new(trie) })
            })?;
            Ok(trie.clone_ref(py))
        })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// `item_id in trie` for an integer; integers outside the uint64 range are not contained;
    /// anything else (a float, a str) is an InvalidInputError (as for `SidIndex`).
    fn __contains__(&self, item_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        match item_id.extract::<u64>() {
            Ok(id) => Ok(self.inner.contains(id)),
            Err(err) if err.is_instance_of::<PyOverflowError>(item_id.py()) => Ok(false),
            Err(err) => Err(Gr2Error::invalid(format!(
                "item_id must be an int (item ids are uint64), got {}: {err}",
                describe(item_id)
            ))
            .into()),
        }
    }
}

/// Many per-request decoding automata. Rows are added with `add_rerank` / `add_catalog`; each step
/// fills masks for any subset of rows in one call and advances them with the sampled tokens.
#[pyclass(name = "ConstraintBatch", module = "gr2._gr2")]
pub struct PyConstraintBatch {
    tokens: Arc<core::TokenMap>,
    states: Vec<DecodeState>,
}

impl PyConstraintBatch {
    fn rows_or_all(&self, rows: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<usize>> {
        match rows {
            None => Ok((0..self.states.len()).collect()),
            Some(r) if r.is_none() => Ok((0..self.states.len()).collect()),
            Some(r) => arg::<PyReadonlyArray1<'_, i64>>(r, "rows", "a 1-D int64 array")?
                .as_array()
                .iter()
                .map(|&x| {
                    if x < 0 || x as usize >= self.states.len() {
                        Err(Gr2Error::invalid(format!("row {x} out of range 0..{}", self.states.len())).into())
                    } else {
                        Ok(x as usize)
                    }
                })
                .collect(),
        }
    }

    fn check_capacity(&self, new_rows: usize) -> PyResult<()> {
        if new_rows > MAX_ROWS.saturating_sub(self.states.len()) {
            return Err(Gr2Error::invalid(format!(
                "a ConstraintBatch holds at most {MAX_ROWS} rows; it has {} and {new_rows} more were asked for",
                self.states.len()
            ))
            .into());
        }
        Ok(())
    }

    /// Build request `i` from `cand[offsets[i]..offsets[i + 1]]` and push it `repeat` times.
    fn push_rerank(
        &mut self,
        py: Python<'_>,
        cand: &[u64],
        flat: &[u16],
        offsets: &[usize],
        framing: Framing,
        repeat: usize,
    ) -> PyResult<usize> {
        let b = offsets.len() - 1;
        self.check_capacity(b.saturating_mul(repeat))?;
        let l = self.tokens.levels;
        let tm = self.tokens.clone();
        let built: Vec<DecodeState> = py.detach(|| {
            use rayon::prelude::*;
            let build = |i: usize| {
                let (lo, hi) = (offsets[i], offsets[i + 1]);
                DecodeState::rerank(tm.clone(), &cand[lo..hi], &flat[lo * l..hi * l], framing).map_err(|e| match e {
                    Gr2Error::InvalidInput(m) => Gr2Error::invalid(format!("request {i}: {m}")),
                    Gr2Error::UnknownItem(m) => Gr2Error::UnknownItem(format!("request {i}: {m}")),
                    other => other,
                })
            };
            if b < core::PARALLEL_MIN_ROWS {
                (0..b).map(build).collect::<Result<Vec<_>, _>>()
            } else {
                (0..b).into_par_iter().map(build).collect::<Result<Vec<_>, _>>()
            }
        })?;
        let first = self.states.len();
        for s in built {
            for _ in 0..repeat {
                self.states.push(s.clone());
            }
        }
        Ok(first)
    }

    fn state(&self, row: usize) -> PyResult<&DecodeState> {
        self.states
            .get(row)
            .ok_or_else(|| Gr2Error::invalid(format!("row {row} out of range 0..{}", self.states.len())).into())
    }
}

#[pymethods]
impl PyConstraintBatch {
    #[new]
    fn new(token_map: &Bound<'_, PyAny>) -> PyResult<Self> {
        let token_map = arg::<Bound<'_, PyTokenMap>>(token_map, "token_map", "a gr2.TokenMap")?;
        let tokens = token_map.get().inner.clone();
        if tokens.eos.is_none() {
            return Err(Gr2Error::invalid("token_map has no eos: decoding ends with EOS, so build the TokenMap with eos=").into());
        }
        Ok(PyConstraintBatch { tokens, states: Vec::new() })
    }

    fn __len__(&self) -> usize {
        self.states.len()
    }

    /// Add one rerank automaton per row of `candidates` (B, K) uint64 with SIDs `codes`
    /// (B, K, L) uint16, each repeated `repeat` times (consecutive rows). Returns the first new row.
    #[pyo3(signature = (candidates, codes, *, reasoning=None, max_reasoning_tokens=None, repeat=None))]
    fn add_rerank(
        &mut self,
        py: Python<'_>,
        candidates: &Bound<'_, PyAny>,
        codes: &Bound<'_, PyAny>,
        reasoning: Option<&Bound<'_, PyAny>>,
        max_reasoning_tokens: Option<&Bound<'_, PyAny>>,
        repeat: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        catch_panics(|| {
            let framing = framing_args(reasoning, max_reasoning_tokens, "think", 128, true)?;
            let repeat = repeat_arg(repeat)?;
            let candidates = arg::<PyReadonlyArray2<'_, u64>>(candidates, "candidates", "a (B, K) uint64 array")?;
            let codes = arg::<PyReadonlyArray3<'_, u16>>(codes, "codes", "a (B, K, L) uint16 array")?;
            let (b, k) = (candidates.shape()[0], candidates.shape()[1]);
            let cs = codes.shape();
            if cs[0] != b || cs[1] != k || cs[2] != self.tokens.levels {
                return Err(Gr2Error::invalid(format!(
                    "codes must be ({b}, {k}, {}) to match candidates, got {cs:?}",
                    self.tokens.levels
                ))
                .into());
            }
            let cand = contiguous(&candidates, "candidates")?;
            let flat = contiguous(&codes, "codes")?;
            let offsets: Vec<usize> = (0..=b).map(|i| i * k).collect();
            self.push_rerank(py, cand, flat, &offsets, framing, repeat)
        })
    }

    /// Ragged `add_rerank`: request `i` has the candidates `items[offsets[i]:offsets[i + 1]]`
    /// (uint64, flat (N,)) with SIDs `codes` (N, L) uint16; `offsets` int64 (B + 1,) from 0.
    #[pyo3(signature = (items, codes, offsets, *, reasoning=None, max_reasoning_tokens=None, repeat=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_rerank_ragged(
        &mut self,
        py: Python<'_>,
        items: &Bound<'_, PyAny>,
        codes: &Bound<'_, PyAny>,
        offsets: &Bound<'_, PyAny>,
        reasoning: Option<&Bound<'_, PyAny>>,
        max_reasoning_tokens: Option<&Bound<'_, PyAny>>,
        repeat: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        catch_panics(|| {
            let framing = framing_args(reasoning, max_reasoning_tokens, "think", 128, true)?;
            let repeat = repeat_arg(repeat)?;
            let items = arg::<PyReadonlyArray1<'_, u64>>(items, "items", "a 1-D uint64 array")?;
            let codes = arg::<PyReadonlyArray2<'_, u16>>(codes, "codes", "an (N, L) uint16 array")?;
            let offsets = arg::<PyReadonlyArray1<'_, i64>>(offsets, "offsets", "a 1-D int64 array")?;
            let n = items.len();
            if codes.shape() != [n, self.tokens.levels] {
                return Err(Gr2Error::invalid(format!(
                    "codes must be ({n}, {}) to match items, got {:?}",
                    self.tokens.levels,
                    codes.shape()
                ))
                .into());
            }
            let raw = contiguous(&offsets, "offsets")?;
            if raw.first() != Some(&0) || *raw.last().unwrap() != n as i64 || raw.windows(2).any(|w| w[1] < w[0]) {
                return Err(Gr2Error::invalid(format!(
                    "offsets must rise from 0 to len(items) = {n} (B + 1 row starts)"
                ))
                .into());
            }
            let offs: Vec<usize> = raw.iter().map(|&o| o as usize).collect();
            let cand = contiguous(&items, "items")?;
            let flat = contiguous(&codes, "codes")?;
            self.push_rerank(py, cand, flat, &offs, framing, repeat)
        })
    }

    /// Add `len(exclude)` catalog automata (or `rows` when exclude is None): each emits `n_items`
    /// distinct catalog items not in its exclude array. Returns the first new row.
    #[pyo3(signature = (trie, *, rows=None, n_items=None, exclude=None, reasoning=None,
                        max_reasoning_tokens=None, answer_tags=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_catalog(
        &mut self,
        trie: &Bound<'_, PyAny>,
        rows: Option<&Bound<'_, PyAny>>,
        n_items: Option<&Bound<'_, PyAny>>,
        exclude: Option<&Bound<'_, PyAny>>,
        reasoning: Option<&Bound<'_, PyAny>>,
        max_reasoning_tokens: Option<&Bound<'_, PyAny>>,
        answer_tags: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        catch_panics(|| {
            let trie = arg::<Bound<'_, PySidTrie>>(trie, "trie", "a gr2.SidTrie")?;
            let trie = &trie.get().inner;
            let answer_tags: bool = opt_arg(answer_tags, "answer_tags", "a bool", false)?;
            let framing = framing_args(reasoning, max_reasoning_tokens, "disabled", 0, answer_tags)?;
            let rows: Option<usize> = match rows {
                Some(r) if !r.is_none() => Some(arg(r, "rows", "an int >= 0")?),
                _ => None,
            };
            let n_items: usize = opt_arg(n_items, "n_items", "an int >= 1", 1)?;
            let exclude: Option<Vec<PyReadonlyArray1<'_, u64>>> = match exclude {
                Some(e) if !e.is_none() => Some(arg(e, "exclude", "a list of 1-D uint64 arrays")?),
                _ => None,
            };
            let n_rows = match (&exclude, rows) {
                (Some(ex), None) => ex.len(),
                (Some(ex), Some(r)) if ex.len() == r => r,
                (Some(ex), Some(r)) => {
                    return Err(Gr2Error::invalid(format!("rows={r} but {} exclude arrays", ex.len())).into())
                }
                (None, r) => r.unwrap_or(1),
            };
            self.check_capacity(n_rows)?;
            let excludes: Vec<Vec<u64>> = match exclude {
                Some(ex) => ex.iter().map(|a| a.as_array().to_vec()).collect(),
                None => vec![Vec::new(); n_rows],
            };
            let first = self.states.len();
            let mut built = Vec::with_capacity(excludes.len());
            for (i, ex) in excludes.iter().enumerate() {
                built.push(
                    DecodeState::catalog(self.tokens.clone(), trie.clone(), n_items, ex, framing).map_err(|e| match e {
                        Gr2Error::InvalidInput(m) => Gr2Error::invalid(format!("request {i}: {m}")),
                        Gr2Error::Constraint(m) => Gr2Error::Constraint(format!("request {i}: {m}")),
                        other => other,
                    })?,
                );
            }
            self.states.extend(built);
            Ok(first)
        })
    }

    /// A new batch holding copies of `rows` in that order (beam reordering, forking).
    fn select(&self, rows: &Bound<'_, PyAny>) -> PyResult<Self> {
        catch_panics(|| {
            let rows: Vec<usize> = arg(rows, "rows", "a list of row indices (ints >= 0)")?;
            if rows.len() > MAX_ROWS {
                return Err(Gr2Error::invalid(format!("a ConstraintBatch holds at most {MAX_ROWS} rows, select got {}", rows.len())).into());
            }
            let mut states = Vec::with_capacity(rows.len());
            for r in rows {
                states.push(self.state(r)?.clone());
            }
            Ok(PyConstraintBatch { tokens: self.tokens.clone(), states })
        })
    }

    /// Feed `tokens[i]` to row `rows[i]`. Any forbidden token raises ConstraintError and no row changes.
    fn advance(&mut self, py: Python<'_>, rows: &Bound<'_, PyAny>, tokens: &Bound<'_, PyAny>) -> PyResult<()> {
        catch_panics(|| {
            let rows = self.rows_or_all(Some(rows))?;
            let toks = arg::<PyReadonlyArray1<'_, i64>>(tokens, "tokens", "a 1-D int64 array")?.as_array().to_vec();
            let states = &mut self.states;
            py.detach(|| core::advance_rows(states, &rows, &toks))?;
            Ok(())
        })
    }

    /// Fill `out` (R, ceil(V/32)) int32 with the masks of `rows` (default: all rows, in order).
    #[pyo3(signature = (out, rows=None))]
    fn fill_bitmask(&self, py: Python<'_>, out: &Bound<'_, PyAny>, rows: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        catch_panics(|| {
            let rows = self.rows_or_all(rows)?;
            let mut out = arg::<PyReadwriteArray2<'_, i32>>(out, "out", "a writable (R, words) int32 array")?;
            let words = self.tokens.words();
            if out.shape() != [rows.len(), words] {
                return Err(Gr2Error::invalid(format!(
                    "out must be int32 ({}, {words}), got {:?}",
                    rows.len(),
                    out.shape()
                ))
                .into());
            }
            if !out.is_c_contiguous() {
                return Err(Gr2Error::invalid("out must be a C-contiguous int32 array").into());
            }
            let slice = out
                .as_slice_mut()
                .map_err(|_| Gr2Error::invalid("out must be a C-contiguous int32 array"))?;
            // i32 and u32 share size and alignment; the bit pattern is what xgrammar/vLLM read.
            let words_u32: &mut [u32] = bytemuck::cast_slice_mut(slice);
            let states = &self.states;
            py.detach(|| core::fill_bitmask(states, &rows, words_u32, words))?;
            Ok(())
        })
    }

    /// Compact allowed ids of `rows` as CSR: (offsets int64 (R+1,), ids int32, free bool (R,)).
    /// Free-reasoning rows have an empty list and free=True (their set is the reasoning vocabulary).
    #[pyo3(signature = (rows=None))]
    #[allow(clippy::type_complexity)]
    fn allowed<'py>(
        &self,
        py: Python<'py>,
        rows: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<bool>>)> {
        catch_panics(|| {
            let rows = self.rows_or_all(rows)?;
            let states = &self.states;
            let (off, ids, free) = py.detach(|| core::allowed_lists(states, &rows))?;
            Ok((off.into_pyarray(py), ids.into_pyarray(py), free.into_pyarray(py)))
        })
    }

    /// Every allowed id of one row (the whole reasoning vocabulary for a free row).
    fn allowed_ids<'py>(&self, py: Python<'py>, row: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        catch_panics(|| {
            let ids = self.state(row_index(row, "row")?)?.allowed()?;
            Ok(ids.into_iter().map(|t| t as i64).collect::<Vec<_>>().into_pyarray(py))
        })
    }

    /// Per row: 0 free reasoning, 1 constrained outside a SID, 2 inside a SID, 3 finished.
    fn phases<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u8>>> {
        catch_panics(|| {
            let phase = |s: &DecodeState| {
                if s.is_done() {
                    3
                } else if s.in_sid() {
                    2
                } else if s.is_free() {
                    0
                } else {
                    1
                }
            };
            Ok(self.states.iter().map(phase).collect::<Vec<u8>>().into_pyarray(py))
        })
    }

    /// Items emitted so far by `row`, in order.
    fn emitted<'py>(&self, py: Python<'py>, row: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        catch_panics(|| {
            Ok(self.state(row_index(row, "row")?)?.emitted().to_vec().into_pyarray(py))
        })
    }

    fn reasoning_tokens(&self, row: &Bound<'_, PyAny>) -> PyResult<u32> {
        catch_panics(|| {
            Ok(self.state(row_index(row, "row")?)?.reasoning_tokens())
        })
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenMap>()?;
    m.add_class::<PySidTrie>()?;
    m.add_class::<PyConstraintBatch>()?;
    Ok(())
}
