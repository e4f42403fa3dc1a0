//! gr2's Rust core: residual-quantization encoding, the semantic-ID index, constrained decoding
//! automata and batched reward verification. Pure Rust; the PyO3 layer lives in `py/` behind the
//! `python` feature so `cargo test` and `cargo bench` need no Python.

pub mod constraint;
pub mod error;
pub mod index;
pub mod reward;
pub mod rq;

pub use error::{Gr2Error, Result};

#[cfg(test)]
mod fuzz_tests;

/// Case count of a property test: `base` times `GR2_FUZZ_SCALE` (default 1). `cargo test` runs
/// the bounded CI budget; `make fuzz` sets a large scale (docs/fuzzing.md).
#[cfg(test)]
pub(crate) fn fuzz_cases(base: u32) -> u32 {
    let scale = std::env::var("GR2_FUZZ_SCALE").ok().and_then(|s| s.parse::<u32>().ok()).unwrap_or(1);
    base.saturating_mul(scale.max(1))
}

#[cfg(feature = "python")]
mod py;
