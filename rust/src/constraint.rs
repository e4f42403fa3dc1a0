//! Placeholder module, replaced by the constraint work.
