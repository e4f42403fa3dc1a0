//! The single place where `Gr2Error` becomes a Python exception. The classes live in
//! `gr2.errors` (pure Python, so they can inherit from both `Gr2Error` and a builtin such as
//! `ValueError`); we look them up by name.

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
        Gr2Error::Io { .. } => "Gr2IOError",
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
                Err(lookup_failure) => lookup_failure,
            }
        })
    }
}
