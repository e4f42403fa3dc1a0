//! Placeholder module, replaced by the index work.
