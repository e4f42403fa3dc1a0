//! Bindings of the batched reward verifier (`crate::reward`). The Python wrapper
//! `gr2.rewards.verify_rewards` prepares contiguous arrays and calls one of the two functions here;
//! the result is a dict of numpy arrays.

use numpy::{IntoPyArray, PyArrayMethods, PyUntypedArrayMethods, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::PyDict;

use crate::error::{catch_panics, Gr2Error};
use crate::py::index::PySidIndex;
use crate::py::constraint::PyTokenMap;
use crate::reward::{self, Candidates, Catalog, Completions, InvalidReason, RewardConfig, RewardKind};

/// The array's memory as a row-major slice; C order only (`as_slice` alone also accepts Fortran
/// order, whose memory order would be misread as rows).
fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    what: &str,
    array: &'a numpy::PyReadonlyArray<'_, T, D>,
) -> PyResult<&'a [T]> {
    let not_c = || Gr2Error::invalid(format!("{what} must be a C-contiguous array (use np.ascontiguousarray)"));
    if !array.is_c_contiguous() {
        return Err(not_c().into());
    }
    array.as_slice().map_err(|_| not_c().into())
}

fn config(alpha: f64, conditional: bool, invalid_reward: f64, metric_ks: Vec<usize>, graded_k: usize, kind: &str) -> PyResult<RewardConfig> {
    let kind = match kind {
        "rank" => RewardKind::Rank,
        "ndcg" => RewardKind::GradedNdcg,
        "auc" => RewardKind::Auc,
        other => return Err(Gr2Error::invalid(format!("reward kind must be 'rank', 'ndcg' or 'auc', got {other:?}")).into()),
    };
    Ok(RewardConfig { alpha, conditional, invalid_reward, metric_ks, graded_k, kind })
}

/// Views of the candidate-side arrays, borrowed for the duration of one call. The candidates are
/// flat (N,) with their SIDs (N, L): rectangular rows of `k` when `offsets` is None, else ragged
/// rows `offsets[b]..offsets[b + 1]`.
struct Inputs<'py> {
    items: PyReadonlyArray1<'py, u64>,
    sids: PyReadonlyArray2<'py, u16>,
    offsets: Option<PyReadonlyArray1<'py, i64>>,
    k: usize,
    targets: PyReadonlyArray1<'py, u64>,
    /// The run's index: SIDs of no candidate are told apart (catalog item vs unknown SID) by
    /// looking them up in it directly, without copying its codes out.
    catalog: Option<Bound<'py, PySidIndex>>,
    relevance: Option<PyReadonlyArray1<'py, f32>>,
}

impl Inputs<'_> {
    fn run<S: AsRef<str> + Sync>(&self, py: Python<'_>, completions: &Completions<'_, S>, cfg: &RewardConfig) -> PyResult<reward::RewardOutput> {
        let b = self.targets.len();
        let sid_shape = self.sids.shape();
        if sid_shape[0] != self.items.len() {
            return Err(Gr2Error::invalid(format!(
                "candidate SIDs have shape {sid_shape:?}, expected ({}, L)",
                self.items.len()
            ))
            .into());
        }
        let offsets: Option<Vec<usize>> = match &self.offsets {
            Some(o) => {
                let raw = contiguous("candidate offsets", o)?;
                if let Some(bad) = raw.iter().find(|&&x| x < 0) {
                    return Err(Gr2Error::invalid(format!("candidate offsets must be >= 0, got {bad}")).into());
                }
                Some(raw.iter().map(|&x| x as usize).collect())
            }
            None => None,
        };
        let cands = Candidates {
            rows: b,
            k: self.k,
            levels: sid_shape[1],
            items: contiguous("candidates", &self.items)?,
            sids: contiguous("candidate SIDs", &self.sids)?,
            targets: contiguous("targets", &self.targets)?,
            relevance: match &self.relevance {
                Some(r) => Some(contiguous("relevance", r)?),
                None => None,
            },
            offsets: offsets.as_deref(),
        };
        let catalog = self.catalog.as_ref().map(|index| Catalog::Index(index.get().sid_index()));
        let out = py.detach(|| reward::verify(completions, &cands, catalog.as_ref(), cfg))?;
        Ok(out)
    }
}

fn to_dict<'py>(py: Python<'py>, out: reward::RewardOutput, b: usize, k: usize, nk: usize) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("reward", out.reward.into_pyarray(py))?;
    d.set_item("valid", out.valid.into_pyarray(py))?;
    d.set_item("invalid_reason", out.invalid_reason.into_pyarray(py))?;
    d.set_item("rank_pre", out.rank_pre.into_pyarray(py))?;
    d.set_item("rank_re", out.rank_re.into_pyarray(py))?;
    d.set_item("r_rank", out.r_rank.into_pyarray(py))?;
    d.set_item("r_fmt", out.r_fmt.into_pyarray(py))?;
    d.set_item("copied_order", out.copied_order.into_pyarray(py))?;
    d.set_item("top1_input_pos", out.top1_input_pos.into_pyarray(py))?;
    d.set_item("n_sids", out.n_sids.into_pyarray(py))?;
    d.set_item("ranking", out.ranking.into_pyarray(py).reshape([b, k])?)?;
    d.set_item("recall", out.recall.into_pyarray(py).reshape([b, nk])?)?;
    d.set_item("ndcg", out.ndcg.into_pyarray(py).reshape([b, nk])?)?;
    if !out.auc.is_empty() || b == 0 {
        d.set_item("graded_ndcg", out.graded_ndcg.into_pyarray(py))?;
        d.set_item("auc", out.auc.into_pyarray(py))?;
    }
    Ok(d)
}

/// Verify text completions. See `gr2.rewards.verify_rewards` for the meaning of each argument.
#[pyfunction]
#[pyo3(signature = (texts, trailers, items, sids, cand_offsets, width, targets, catalog, relevance, alpha, conditional, invalid_reward, metric_ks, graded_k, kind))]
#[allow(clippy::too_many_arguments)]
fn _verify_rewards_text<'py>(
    py: Python<'py>,
    texts: Vec<PyBackedStr>,
    trailers: Vec<String>,
    items: PyReadonlyArray1<'py, u64>,
    sids: PyReadonlyArray2<'py, u16>,
    cand_offsets: Option<PyReadonlyArray1<'py, i64>>,
    width: usize,
    targets: PyReadonlyArray1<'py, u64>,
    catalog: Option<Bound<'py, PySidIndex>>,
    relevance: Option<PyReadonlyArray1<'py, f32>>,
    alpha: f64,
    conditional: bool,
    invalid_reward: f64,
    metric_ks: Vec<usize>,
    graded_k: usize,
    kind: &str,
) -> PyResult<Bound<'py, PyDict>> {
    catch_panics(|| {
        let (b, k, nk) = (targets.len(), width, metric_ks.len());
        let cfg = config(alpha, conditional, invalid_reward, metric_ks, graded_k, kind)?;
        let inputs = Inputs { items, sids, offsets: cand_offsets, k, targets, catalog, relevance };
        let completions = Completions::Text { texts: &texts, trailers: &trailers };
        let out = inputs.run(py, &completions, &cfg)?;
        to_dict(py, out, b, k, nk)
    })
}

/// Verify token-id completions given flat ids and B+1 offsets.
#[pyfunction]
#[pyo3(signature = (ids, offsets, token_map, whitespace_ids, trailer_ids, items, sids, cand_offsets, width, targets, catalog, relevance, alpha, conditional, invalid_reward, metric_ks, graded_k, kind))]
#[allow(clippy::too_many_arguments)]
fn _verify_rewards_tokens<'py>(
    py: Python<'py>,
    ids: PyReadonlyArray1<'py, i64>,
    offsets: PyReadonlyArray1<'py, i64>,
    token_map: Bound<'py, PyTokenMap>,
    whitespace_ids: Vec<i64>,
    trailer_ids: Vec<i64>,
    items: PyReadonlyArray1<'py, u64>,
    sids: PyReadonlyArray2<'py, u16>,
    cand_offsets: Option<PyReadonlyArray1<'py, i64>>,
    width: usize,
    targets: PyReadonlyArray1<'py, u64>,
    catalog: Option<Bound<'py, PySidIndex>>,
    relevance: Option<PyReadonlyArray1<'py, f32>>,
    alpha: f64,
    conditional: bool,
    invalid_reward: f64,
    metric_ks: Vec<usize>,
    graded_k: usize,
    kind: &str,
) -> PyResult<Bound<'py, PyDict>> {
    catch_panics(|| {
        let (b, k, nk) = (targets.len(), width, metric_ks.len());
        let cfg = config(alpha, conditional, invalid_reward, metric_ks, graded_k, kind)?;
        let offsets_raw = contiguous("offsets", &offsets)?;
        if let Some(bad) = offsets_raw.iter().find(|&&o| o < 0) {
            return Err(Gr2Error::invalid(format!("token offsets must be >= 0, got {bad}")).into());
        }
        let offsets: Vec<usize> = offsets_raw.iter().map(|&o| o as usize).collect();
        let inputs = Inputs { items, sids, offsets: cand_offsets, k, targets, catalog, relevance };
        let completions: Completions<'_, &str> = Completions::Tokens {
            ids: contiguous("token ids", &ids)?,
            offsets: &offsets,
            map: token_map.get().token_map(),
            whitespace: &whitespace_ids,
            trailers: &trailer_ids,
        };
        let out = inputs.run(py, &completions, &cfg)?;
        to_dict(py, out, b, k, nk)
    })
}

/// One parse as a dict: `think` (start, end) or None, `answer` (start, end), `sids` [(start, end)],
/// `codes` (n, levels) uint16; positions through `unit` (byte offset -> str index for a text).
fn parts_to_dict<'py>(py: Python<'py>, p: reward::CompletionParts, unit: impl Fn(usize) -> usize) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let span = |(s, e): (usize, usize)| (unit(s), unit(e));
    d.set_item("think", p.think.map(span))?;
    d.set_item("answer", span(p.answer))?;
    d.set_item("sids", p.sids.into_iter().map(span).collect::<Vec<_>>())?;
    let n = p.codes.len() / p.levels;
    d.set_item("codes", p.codes.into_pyarray(py).reshape([n, p.levels])?)?;
    Ok(d)
}

/// The verifier's parse of text completions with the spans of their parts, positions as `str`
/// indices; None for a malformed completion. `levels` None: each answer's first SID's count.
#[pyfunction]
#[pyo3(signature = (texts, trailers, levels))]
fn _parse_completions_text<'py>(
    py: Python<'py>,
    texts: Vec<PyBackedStr>,
    trailers: Vec<String>,
    levels: Option<usize>,
) -> PyResult<Vec<Option<Bound<'py, PyDict>>>> {
    catch_panics(|| {
        let parsed = reward::parse_completions(&Completions::Text { texts: &texts, trailers: &trailers }, levels)?;
        texts
            .iter()
            .zip(parsed)
            .map(|(text, parts)| {
                // every span edge is the byte after or before an ASCII tag, so a char boundary
                let chars = |byte: usize| text[..byte].chars().count();
                parts.map(|p| parts_to_dict(py, p, chars)).transpose()
            })
            .collect()
    })
}

/// The verifier's parse of one token-id completion with its spans (token positions); None when
/// malformed.
#[pyfunction]
#[pyo3(signature = (ids, token_map, whitespace_ids, trailer_ids))]
fn _parse_completion_tokens<'py>(
    py: Python<'py>,
    ids: Vec<i64>,
    token_map: Bound<'py, PyTokenMap>,
    whitespace_ids: Vec<i64>,
    trailer_ids: Vec<i64>,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    catch_panics(|| {
        let offsets = [0, ids.len()];
        let rows: Completions<'_, &str> = Completions::Tokens {
            ids: &ids,
            offsets: &offsets,
            map: token_map.get().token_map(),
            whitespace: &whitespace_ids,
            trailers: &trailer_ids,
        };
        let parsed = reward::parse_completions(&rows, None)?.pop().flatten();
        parsed.map(|p| parts_to_dict(py, p, |i| i)).transpose()
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_parse_completions_text, m)?)?;
    m.add_function(wrap_pyfunction!(_parse_completion_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(_verify_rewards_text, m)?)?;
    m.add_function(wrap_pyfunction!(_verify_rewards_tokens, m)?)?;
    m.add("INVALID_REASON_NAMES", InvalidReason::NAMES.to_vec())?;
    m.add("NO_ITEM", reward::NO_ITEM)?;
    Ok(())
}
