//! gr2's Rust core: residual-quantization encoding, the semantic-ID index, constrained decoding
//! automata and batched reward verification. Pure Rust; the PyO3 layer lives in `py/` behind the
//! `python` feature so `cargo test` and `cargo bench` need no Python.

pub mod constraint;
pub mod error;
pub mod index;
pub mod reward;
pub mod rq;

pub use error::{Gr2Error, Result};

#[cfg(feature = "python")]
mod py;
