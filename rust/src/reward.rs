//! Placeholder module, replaced by the reward work.
