//! Placeholder module, replaced by the rq work.
