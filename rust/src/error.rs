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
    /// A bug in gr2: a Rust panic caught at the binding layer ([`catch_panics`]) instead of
    /// crossing into Python.
    #[error("internal error in gr2 (a bug; please report it with this message): {0}")]
    Internal(String),
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

/// Runs `body`; a panic inside it (on this thread, or on a rayon worker it waited for) becomes
/// [`Gr2Error::Internal`] carrying the panic message, so no panic unwinds past the caller. The
/// binding layer wraps every call into the core in this (`E` is then `PyErr`).
pub fn catch_panics<T, E: From<Gr2Error>>(body: impl FnOnce() -> std::result::Result<T, E>) -> std::result::Result<T, E> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let message = match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
            (Some(text), _) => (*text).to_string(),
            (None, Some(text)) => text.clone(),
            (None, None) => "a panic without a message".to_string(),
        };
        Err(Gr2Error::Internal(message).into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catch_panics_turns_a_panic_into_an_internal_error() {
        let ok: Result<u8> = catch_panics(|| Ok(7));
        assert_eq!(ok.unwrap(), 7);
        let passed_through: Result<u8> = catch_panics(|| Err(Gr2Error::invalid("bad")));
        assert!(matches!(passed_through, Err(Gr2Error::InvalidInput(m)) if m == "bad"));
        let index = std::hint::black_box(3usize);
        let caught: Result<u8> = catch_panics(|| Ok([1u8, 2][index]));
        match caught {
            Err(Gr2Error::Internal(m)) => assert!(m.contains("index out of bounds"), "{m}"),
            other => panic!("expected an internal error, got {other:?}"),
        }
        let formatted: Result<()> = catch_panics(|| panic!("row {} is broken", 4));
        assert!(matches!(formatted, Err(Gr2Error::Internal(m)) if m == "row 4 is broken"));
    }

    #[test]
    fn catch_panics_catches_a_panic_on_a_rayon_worker() {
        use rayon::prelude::*;
        let caught: Result<Vec<u32>> =
            catch_panics(|| Ok((0..1000u32).into_par_iter().with_max_len(1).map(|i| if i == 999 { panic!("worker {i}") } else { i }).collect()));
        assert!(matches!(caught, Err(Gr2Error::Internal(m)) if m == "worker 999"));
    }
}
