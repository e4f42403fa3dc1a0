//! The single place where `Gr2Error` becomes a Python exception. The classes live in
//! `gr2.errors` (pure Python, so they can inherit from both `Gr2Error` and a builtin such as
//! `ValueError`); we look them up by name.
//!
//! Arguments are taken as `&Bound<PyAny>` and converted with [`extract_arg`] / [`int_arg`], so a
//! conversion failure is an `InvalidInputError` naming the argument (with PyO3's own message kept)
//! instead of the bare `TypeError`/`OverflowError` PyO3's signature extraction would raise.

use pyo3::exceptions::{PyKeyError, PyOSError, PyOverflowError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyType;

use crate::error::Gr2Error;

fn class_name(err: &Gr2Error) -> &'static str {
    match err {
        Gr2Error::InvalidInput(_) => "InvalidInputError",
        Gr2Error::UnknownItem(_) => "UnknownItemError",
        Gr2Error::UnknownSid(_) => "UnknownSidError",
        Gr2Error::CorruptFile(_) => "CorruptFileError",
        Gr2Error::Constraint(_) => "ConstraintError",
        Gr2Error::Internal(_) => "InternalError",
        Gr2Error::Io { .. } => "Gr2IOError",
    }
}

/// The builtin each class derives from, used only when `gr2.errors` cannot be imported (a broken
/// install): the caller still gets the original message and a catchable builtin type.
fn fallback(err: &Gr2Error, message: String) -> PyErr {
    match err {
        Gr2Error::InvalidInput(_) => PyValueError::new_err(message),
        Gr2Error::UnknownItem(_) | Gr2Error::UnknownSid(_) => PyKeyError::new_err(message),
        Gr2Error::CorruptFile(_) | Gr2Error::Io { .. } => PyOSError::new_err(message),
        Gr2Error::Constraint(_) | Gr2Error::Internal(_) => PyRuntimeError::new_err(message),
    }
}

impl From<Gr2Error> for PyErr {
    fn from(err: Gr2Error) -> PyErr {
        Python::attach(|py| {
            let class = py
                .import("gr2.errors")
                .and_then(|module| module.getattr(class_name(&err)))
                .and_then(|obj| obj.cast_into::<PyType>().map_err(PyErr::from));
            match class {
                Ok(class) => PyErr::from_type(class, err.to_string()),
                Err(lookup_failure) => fallback(
                    &err,
                    format!("{err} (gr2.errors.{} is unavailable: {lookup_failure})", class_name(&err)),
                ),
            }
        })
    }
}

/// `repr(obj)`, shortened to about 80 characters (an argument may be a huge list).
pub(crate) fn short_repr(obj: &Bound<'_, PyAny>) -> String {
    let text = obj.repr().map(|r| r.to_string()).unwrap_or_else(|_| "<unprintable>".into());
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// Converts argument `name` with PyO3's extraction; on failure an `InvalidInputError` that names
/// the argument, says what was `expected` and keeps PyO3's message.
pub(crate) fn extract_arg<'a, 'py, T>(obj: &'a Bound<'py, PyAny>, name: &str, expected: &str) -> PyResult<T>
where
    T: FromPyObject<'a, 'py>,
{
    obj.extract::<T>().map_err(|err| {
        let err: PyErr = err.into();
        Gr2Error::invalid(format!("{name} must be {expected}, got {} {}: {err}", type_name(obj), short_repr(obj))).into()
    })
}

/// An integer argument in `lo..=hi` (anything with `__index__`: int, numpy integers, bool);
/// floats, strings, None and out-of-range integers are `InvalidInputError`s naming `name`.
pub(crate) fn int_arg(obj: &Bound<'_, PyAny>, name: &str, lo: i64, hi: i64) -> PyResult<i64> {
    let out_of_range = || Gr2Error::invalid(format!("{name} = {} is out of range: it must be in {lo}..={hi}", short_repr(obj)));
    match obj.extract::<i64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        Ok(_) => Err(out_of_range().into()),
        Err(err) if err.is_instance_of::<PyOverflowError>(obj.py()) => Err(out_of_range().into()),
        Err(err) => Err(Gr2Error::invalid(format!(
            "{name} must be an int in {lo}..={hi}, got {} {}: {err}",
            type_name(obj),
            short_repr(obj)
        ))
        .into()),
    }
}
