//! Thin PyO3 layer: converts numpy/Python values to the pure-Rust core and back, releases the GIL
//! around heavy work, and maps `Gr2Error` to Python exceptions (errors.rs). No logic lives here.
//! Every binding that calls into the core runs its body in [`catch_panics`]: a Rust panic (a bug)
//! reaches Python as `gr2.InternalError`, never as `pyo3_runtime.PanicException` (a BaseException
//! that `except Exception` misses). Plain field getters and `__len__` need no guard.

use pyo3::prelude::*;

use crate::error::catch_panics;

mod constraint;
mod errors;
mod index;
mod reward;
mod rq;

#[pymodule]
fn _gr2(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    rq::register(m)?;
    index::register(m)?;
    constraint::register(m)?;
    reward::register(m)?;
    m.add("MAX_SID_LEVELS", crate::constraint::MAX_SID_LEVELS)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    Ok(())
}

/// Test hook (tests/test_no_panics.py): a deliberate panic inside [`catch_panics`], the guard every
/// binding runs its body in, so a test sees a Rust panic arrive in Python as `gr2.InternalError`.
#[pyfunction]
fn _panic_for_tests() -> PyResult<()> {
    catch_panics(|| -> PyResult<()> { panic!("deliberate panic from gr2._gr2._panic_for_tests") })
}
