//! Thin PyO3 layer: converts numpy/Python values to the pure-Rust core and back, releases the GIL
//! around heavy work, and maps `Gr2Error` to Python exceptions (errors.rs). No logic lives here.

use pyo3::prelude::*;

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
    Ok(())
}
