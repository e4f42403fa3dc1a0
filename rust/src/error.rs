//! The one error type of the crate. The binding layer maps each variant once onto the Python
//! hierarchy in `python/gr2/errors.py` (see `py/errors.rs`).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Gr2Error {
    /// Wrong dtype, shape, value range (NaN/inf, a code >= K), duplicate ids, bad parameters.
    #[error("{0}")]
    InvalidInput(String),
    /// An item id that the index (or the request's candidate list) does not hold.
    #[error("{0}")]
    UnknownItem(String),
    /// A semantic ID that maps to no item.
    #[error("{0}")]
    UnknownSid(String),
    /// A file that is truncated, has a bad magic/version, or fails its checksum.
    #[error("{0}")]
    CorruptFile(String),
    /// A decoding state with no allowed token, or a token fed that the constraint forbids.
    #[error("{0}")]
    Constraint(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Gr2Error>;

impl Gr2Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Gr2Error::InvalidInput(msg.into())
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Gr2Error::Io { context: context.into(), source }
    }
}
