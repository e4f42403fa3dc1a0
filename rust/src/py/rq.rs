//! Python binding of `crate::rq`: `gr2.RQCodebooks`. Checks dtype and shape explicitly (so bad
//! input raises gr2.InvalidInputError with a fix, never a pyo3 TypeError), borrows numpy input
//! without copying when it is C-contiguous, and releases the GIL around encode/decode.

use numpy::ndarray::{Array2, Array3};
use numpy::prelude::*;
use numpy::{dtype, Element, PyArray, PyArray2, PyArray3, PyUntypedArray};
use pyo3::prelude::*;

use super::errors::int_arg;
use crate::error::{catch_panics, Gr2Error};
use crate::rq::{RqCodebooks, MAX_BEAM};

/// `obj` as a numpy array of element type `T` and `ndim` dimensions, or InvalidInputError
/// saying what was expected, what was given and how to fix it.
fn typed_array<'a, 'py, T: Element, D: numpy::ndarray::Dimension>(
    obj: &'a Bound<'py, PyAny>,
    name: &str,
    dtype_name: &str,
    shape_doc: &str,
) -> PyResult<&'a Bound<'py, PyArray<T, D>>> {
    let py = obj.py();
    let Ok(untyped) = obj.cast::<PyUntypedArray>() else {
        let type_name = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(Gr2Error::invalid(format!(
            "{name} must be a numpy.ndarray of {dtype_name} with shape {shape_doc}, got {type_name}; \
             use np.asarray({name}, dtype=np.{dtype_name})"
        ))
        .into());
    };
    let got = untyped.dtype();
    if !got.is_equiv_to(&dtype::<T>(py)) {
        return Err(Gr2Error::invalid(format!(
            "{name} must be {dtype_name}, got {got}; use {name}.astype(np.{dtype_name})"
        ))
        .into());
    }
    let ndim = D::NDIM.unwrap_or(untyped.ndim());
    if untyped.ndim() != ndim {
        return Err(Gr2Error::invalid(format!(
            "{name} must have shape {shape_doc}, got shape {:?} ({} dimensions)",
            untyped.shape(),
            untyped.ndim()
        ))
        .into());
    }
    obj.cast::<PyArray<T, D>>()
        .map_err(|_| Gr2Error::invalid(format!("{name}: unexpected array type")).into())
}

/// The array's memory as a row-major slice, only when it is C-contiguous (`as_slice` alone
/// would also accept Fortran order, whose memory is column-major).
fn c_contiguous_slice<'a, T: Element, D: numpy::ndarray::Dimension>(
    view: &'a numpy::PyReadonlyArray<'_, T, D>,
) -> Option<&'a [T]> {
    if view.is_c_contiguous() {
        view.as_slice().ok()
    } else {
        None
    }
}

fn shape_error(msg: String) -> PyErr {
    Gr2Error::invalid(msg).into()
}

/// `__reduce__`'s answer: the class and the arguments that rebuild the object.
type Reduced<'py> = (Bound<'py, PyAny>, (Bound<'py, PyArray3<f32>>,));

/// Residual-quantization codebooks: L levels of K codes in D dimensions.
///
/// The codebooks are always copied (the encoder keeps its own packed layout), so any memory
/// layout is accepted; the dtype must be float32.
#[pyclass(name = "RQCodebooks", module = "gr2._gr2", frozen)]
pub struct PyRqCodebooks {
    inner: RqCodebooks,
}

#[pymethods]
impl PyRqCodebooks {
    #[new]
    fn new(py: Python<'_>, codebooks: &Bound<'_, PyAny>) -> PyResult<Self> {
        catch_panics(|| {
            let array = typed_array::<f32, numpy::Ix3>(codebooks, "codebooks", "float32", "(L, K, D)")?;
            let view = array
                .try_readonly()
                .map_err(|e| Gr2Error::invalid(format!("codebooks: {e}")))?;
            let (levels, k, dim) = view.as_array().dim();
            let values: Vec<f32> = match c_contiguous_slice(&view) {
                Some(slice) => slice.to_vec(),
                None => view.as_array().iter().copied().collect(), // logical (row-major) order
            };
            let inner = py.detach(|| RqCodebooks::new(values, levels, k, dim))?;
            Ok(PyRqCodebooks { inner })
        })
    }

    /// Number of levels L.
    #[getter]
    fn levels(&self) -> usize {
        self.inner.levels()
    }

    /// Codes per level K.
    #[getter]
    fn codebook_size(&self) -> usize {
        self.inner.codebook_size()
    }

    /// Embedding dimension D.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// A float32 (L, K, D) copy of the codebooks.
    #[getter]
    fn codebooks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray3<f32>>> {
        catch_panics(|| {
            let shape = (
                self.inner.levels(),
                self.inner.codebook_size(),
                self.inner.dim(),
            );
            let array = Array3::from_shape_vec(shape, self.inner.codebooks().to_vec())
                .map_err(|e| shape_error(format!("internal shape error: {e}")))?;
            Ok(array.into_pyarray(py))
        })
    }

    /// Encodes float32 (n, D) embeddings into uint16 (n, L) codes (greedy when beam == 1).
    /// `row_offset`: the row number of `x[0]` in error messages (when `x` is a chunk of a file).
    #[pyo3(signature = (x, beam = None, *, row_offset = None))]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        beam: Option<&Bound<'py, PyAny>>,
        row_offset: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray2<u16>>> {
        catch_panics(|| {
            let beam = match beam {
                Some(b) if !b.is_none() => int_arg(b, "beam", 1, MAX_BEAM as i64)?,
                _ => 1,
            };
            let first_row = match row_offset {
                Some(r) if !r.is_none() => int_arg(r, "row_offset", 0, i64::MAX)? as usize,
                _ => 0,
            };
            let array = typed_array::<f32, numpy::Ix2>(x, "x", "float32", "(n, D)")?;
            let view = array
                .try_readonly()
                .map_err(|e| Gr2Error::invalid(format!("x: {e}")))?;
            let (n, dim) = view.as_array().dim();
            if dim != self.inner.dim() {
                return Err(shape_error(format!(
                    "x has {dim} columns but the codebooks have dimension {}; x must have shape (n, {})",
                    self.inner.dim(),
                    self.inner.dim()
                )));
            }
            let beam = beam as usize;
            let inner = &self.inner;
            let levels = self.inner.levels();
            let encode = |x: &[f32]| {
                let mut codes = vec![0u16; n * levels];
                inner.encode_rows_into(x, beam, &mut codes, first_row).map(|()| codes)
            };
            let codes = match c_contiguous_slice(&view) {
                Some(slice) => py.detach(|| encode(slice))?,
                None => {
                    // Not C-contiguous (a slice with a step, a transpose, Fortran order): copy once.
                    let strided = view.as_array();
                    py.detach(|| {
                        let values: Vec<f32> = strided.iter().copied().collect();
                        encode(&values)
                    })?
                }
            };
            let array = Array2::from_shape_vec((n, levels), codes)
                .map_err(|e| shape_error(format!("internal shape error: {e}")))?;
            Ok(array.into_pyarray(py))
        })
    }

    /// Decodes uint16 (n, L) codes into float32 (n, D) vectors (the sum of the chosen codes).
    fn decode<'py>(
        &self,
        py: Python<'py>,
        codes: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        catch_panics(|| {
            let array = typed_array::<u16, numpy::Ix2>(codes, "codes", "uint16", "(n, L)")?;
            let view = array
                .try_readonly()
                .map_err(|e| Gr2Error::invalid(format!("codes: {e}")))?;
            let (n, levels) = view.as_array().dim();
            if levels != self.inner.levels() {
                return Err(shape_error(format!(
                    "codes have {levels} columns but the codebooks have {} levels; codes must have shape (n, {})",
                    self.inner.levels(),
                    self.inner.levels()
                )));
            }
            let inner = &self.inner;
            let vectors = match c_contiguous_slice(&view) {
                Some(slice) => py.detach(|| inner.decode(slice))?,
                None => {
                    let strided = view.as_array();
                    py.detach(|| {
                        let values: Vec<u16> = strided.iter().copied().collect();
                        inner.decode(&values)
                    })?
                }
            };
            let array = Array2::from_shape_vec((n, self.inner.dim()), vectors)
                .map_err(|e| shape_error(format!("internal shape error: {e}")))?;
            Ok(array.into_pyarray(py))
        })
    }

    /// Pickle support (for multiprocessing / Ray workers): rebuilt from the codebooks.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Reduced<'py>> {
        let py = slf.py();
        Ok((slf.get_type().into_any(), (slf.get().codebooks(py)?,)))
    }

    fn __repr__(&self) -> String {
        format!(
            "RQCodebooks(levels={}, codebook_size={}, dim={})",
            self.inner.levels(),
            self.inner.codebook_size(),
            self.inner.dim()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRqCodebooks>()?;
    Ok(())
}
