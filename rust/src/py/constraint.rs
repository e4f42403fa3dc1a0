//! Bindings of the constrained-decoding core (`crate::constraint`): `TokenMap`, `SidTrie` and
//! `ConstraintBatch` (many per-request automata; batched mask fill with the GIL released).

use std::sync::Arc;

use numpy::{IntoPyArray, PyUntypedArrayMethods, PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyReadwriteArray2};
use pyo3::prelude::*;

use crate::constraint::{self as core, DecodeState, Framing, ReasoningStart, TokenMapSpec};
use crate::error::Gr2Error;

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

/// Token ids of the SID vocabulary and the format tags (see gr2.tokens.SidTokens).
#[pyclass(name = "TokenMap", module = "gr2._gr2", frozen)]
pub struct PyTokenMap {
    inner: Arc<core::TokenMap>,
}

#[pymethods]
impl PyTokenMap {
    #[new]
    #[pyo3(signature = (code_ids, *, sid_begin, sid_end, think_open, think_close, answer_open, answer_close, eos,
                        vocab_size, reasoning_vocab=None, forbidden_in_reasoning=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        code_ids: PyReadonlyArray2<'_, i64>,
        sid_begin: i64,
        sid_end: i64,
        think_open: i64,
        think_close: i64,
        answer_open: i64,
        answer_close: i64,
        eos: i64,
        vocab_size: usize,
        reasoning_vocab: Option<usize>,
        forbidden_in_reasoning: Option<Vec<i64>>,
    ) -> PyResult<Self> {
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

    #[getter]
    fn eos(&self) -> u32 {
        self.inner.eos
    }

    /// Sorted ids that free reasoning may not use.
    fn reasoning_forbidden<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.inner.reasoning_forbidden().iter().map(|&t| t as i64).collect::<Vec<_>>().into_pyarray(py)
    }
}

/// A prefix tree over a catalog's SIDs, shared by catalog-mode requests.
#[pyclass(name = "SidTrie", module = "gr2._gr2", frozen)]
pub struct PySidTrie {
    inner: Arc<core::SidTrie>,
}

#[pymethods]
impl PySidTrie {
    #[new]
    fn new(py: Python<'_>, token_map: &PyTokenMap, item_ids: PyReadonlyArray1<'_, u64>, codes: PyReadonlyArray2<'_, u16>) -> PyResult<Self> {
        let items = contiguous(&item_ids, "item_ids")?;
        let flat = contiguous(&codes, "codes")?;
        let shape = codes.shape();
        if shape[0] != items.len() || shape[1] != token_map.inner.levels {
            return Err(Gr2Error::invalid(format!(
                "codes must be ({}, {}) for {} items, got {:?}",
                items.len(),
                token_map.inner.levels,
                items.len(),
                shape
            ))
            .into());
        }
        let tm = token_map.inner.clone();
        let trie = py.detach(|| core::catalog_trie(&tm, items, flat))?;
        Ok(PySidTrie { inner: Arc::new(trie) })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, item: u64) -> bool {
        self.inner.contains(item)
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
    fn rows_or_all(&self, rows: Option<PyReadonlyArray1<'_, i64>>) -> PyResult<Vec<usize>> {
        match rows {
            None => Ok((0..self.states.len()).collect()),
            Some(r) => r
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

    fn state(&self, row: usize) -> PyResult<&DecodeState> {
        self.states
            .get(row)
            .ok_or_else(|| Gr2Error::invalid(format!("row {row} out of range 0..{}", self.states.len())).into())
    }
}

#[pymethods]
impl PyConstraintBatch {
    #[new]
    fn new(token_map: &PyTokenMap) -> Self {
        PyConstraintBatch { tokens: token_map.inner.clone(), states: Vec::new() }
    }

    fn __len__(&self) -> usize {
        self.states.len()
    }

    /// Add one rerank automaton per row of `candidates` (B, K) uint64 with SIDs `codes`
    /// (B, K, L) uint16, each repeated `repeat` times (consecutive rows). Returns the first new row.
    #[pyo3(signature = (candidates, codes, *, reasoning="think", max_reasoning_tokens=128, repeat=1))]
    fn add_rerank(
        &mut self,
        py: Python<'_>,
        candidates: PyReadonlyArray2<'_, u64>,
        codes: PyReadonlyArray3<'_, u16>,
        reasoning: &str,
        max_reasoning_tokens: u32,
        repeat: usize,
    ) -> PyResult<usize> {
        let framing = Framing { reasoning: reasoning_start(reasoning)?, max_reasoning_tokens, answer_tags: true };
        let (b, k) = (candidates.shape()[0], candidates.shape()[1]);
        let cs = codes.shape();
        if cs[0] != b || cs[1] != k || cs[2] != self.tokens.levels {
            return Err(Gr2Error::invalid(format!(
                "codes must be ({b}, {k}, {}) to match candidates, got {cs:?}",
                self.tokens.levels
            ))
            .into());
        }
        if repeat == 0 {
            return Err(Gr2Error::invalid("repeat must be >= 1").into());
        }
        let cand = contiguous(&candidates, "candidates")?;
        let flat = contiguous(&codes, "codes")?;
        let l = self.tokens.levels;
        let tm = self.tokens.clone();
        let built: Vec<DecodeState> = py.detach(|| {
            use rayon::prelude::*;
            let build = |i: usize| {
                    DecodeState::rerank(tm.clone(), &cand[i * k..(i + 1) * k], &flat[i * k * l..(i + 1) * k * l], framing)
                        .map_err(|e| match e {
                            Gr2Error::InvalidInput(m) => Gr2Error::invalid(format!("request {i}: {m}")),
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

    /// Add `len(exclude)` catalog automata (or `rows` when exclude is None): each emits `n_items`
    /// distinct catalog items not in its exclude array. Returns the first new row.
    #[pyo3(signature = (trie, *, rows=None, n_items=1, exclude=None, reasoning="disabled",
                        max_reasoning_tokens=0, answer_tags=false))]
    #[allow(clippy::too_many_arguments)]
    fn add_catalog(
        &mut self,
        trie: &PySidTrie,
        rows: Option<usize>,
        n_items: usize,
        exclude: Option<Vec<PyReadonlyArray1<'_, u64>>>,
        reasoning: &str,
        max_reasoning_tokens: u32,
        answer_tags: bool,
    ) -> PyResult<usize> {
        let framing = Framing { reasoning: reasoning_start(reasoning)?, max_reasoning_tokens, answer_tags };
        let excludes: Vec<Vec<u64>> = match (exclude, rows) {
            (Some(ex), None) => ex.iter().map(|a| a.as_array().to_vec()).collect(),
            (Some(ex), Some(r)) if ex.len() == r => ex.iter().map(|a| a.as_array().to_vec()).collect(),
            (Some(ex), Some(r)) => {
                return Err(Gr2Error::invalid(format!("rows={r} but {} exclude arrays", ex.len())).into())
            }
            (None, r) => vec![Vec::new(); r.unwrap_or(1)],
        };
        let first = self.states.len();
        let mut built = Vec::with_capacity(excludes.len());
        for ex in &excludes {
            built.push(DecodeState::catalog(self.tokens.clone(), trie.inner.clone(), n_items, ex, framing)?);
        }
        self.states.extend(built);
        Ok(first)
    }

    /// A new batch holding copies of `rows` in that order (beam reordering, forking).
    fn select(&self, rows: Vec<usize>) -> PyResult<Self> {
        let mut states = Vec::with_capacity(rows.len());
        for r in rows {
            states.push(self.state(r)?.clone());
        }
        Ok(PyConstraintBatch { tokens: self.tokens.clone(), states })
    }

    /// Feed `tokens[i]` to row `rows[i]`. Any forbidden token raises ConstraintError and no row changes.
    fn advance(&mut self, py: Python<'_>, rows: PyReadonlyArray1<'_, i64>, tokens: PyReadonlyArray1<'_, i64>) -> PyResult<()> {
        let rows = self.rows_or_all(Some(rows))?;
        let toks = tokens.as_array().to_vec();
        let states = &mut self.states;
        py.detach(|| core::advance_rows(states, &rows, &toks))?;
        Ok(())
    }

    /// Fill `out` (R, ceil(V/32)) int32 with the masks of `rows` (default: all rows, in order).
    #[pyo3(signature = (out, rows=None))]
    fn fill_bitmask(&self, py: Python<'_>, mut out: PyReadwriteArray2<'_, i32>, rows: Option<PyReadonlyArray1<'_, i64>>) -> PyResult<()> {
        let rows = self.rows_or_all(rows)?;
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
        let words_u32: &mut [u32] =
            unsafe { std::slice::from_raw_parts_mut(slice.as_mut_ptr() as *mut u32, slice.len()) };
        let states = &self.states;
        py.detach(|| core::fill_bitmask(states, &rows, words_u32, words))?;
        Ok(())
    }

    /// Compact allowed ids of `rows` as CSR: (offsets int64 (R+1,), ids int32, free bool (R,)).
    /// Free-reasoning rows have an empty list and free=True (their set is the reasoning vocabulary).
    #[pyo3(signature = (rows=None))]
    #[allow(clippy::type_complexity)]
    fn allowed<'py>(
        &self,
        py: Python<'py>,
        rows: Option<PyReadonlyArray1<'_, i64>>,
    ) -> PyResult<(Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<bool>>)> {
        let rows = self.rows_or_all(rows)?;
        let states = &self.states;
        let (off, ids, free) = py.detach(|| core::allowed_lists(states, &rows))?;
        Ok((off.into_pyarray(py), ids.into_pyarray(py), free.into_pyarray(py)))
    }

    /// Every allowed id of one row (the whole reasoning vocabulary for a free row).
    fn allowed_ids<'py>(&self, py: Python<'py>, row: usize) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let ids = self.state(row)?.allowed()?;
        Ok(ids.into_iter().map(|t| t as i64).collect::<Vec<_>>().into_pyarray(py))
    }

    /// Per row: 0 free reasoning, 1 constrained outside a SID, 2 inside a SID, 3 finished.
    fn phases<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u8>> {
        self.states
            .iter()
            .map(|s| {
                if s.is_done() {
                    3
                } else if s.in_sid() {
                    2
                } else if s.is_free() {
                    0
                } else {
                    1
                }
            })
            .collect::<Vec<u8>>()
            .into_pyarray(py)
    }

    /// Items emitted so far by `row`, in order.
    fn emitted<'py>(&self, py: Python<'py>, row: usize) -> PyResult<Bound<'py, PyArray1<u64>>> {
        Ok(self.state(row)?.emitted().to_vec().into_pyarray(py))
    }

    fn reasoning_tokens(&self, row: usize) -> PyResult<u32> {
        Ok(self.state(row)?.reasoning_tokens())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenMap>()?;
    m.add_class::<PySidTrie>()?;
    m.add_class::<PyConstraintBatch>()?;
    Ok(())
}
