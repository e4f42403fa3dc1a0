//! Constrained decoding for the rerank output format.
//!
//! Three pieces, all plain data (no Python types):
//! - [`TokenMap`]: the (level, code) -> token-id mapping, the format tags and the set of tokens
//!   that free reasoning may not use; shared by every request of a model, and the map the reward
//!   verifier's token-id path reads (`crate::reward`).
//! - [`SidTrie`]: a compact prefix tree over a set of SIDs (the K candidates of one request, or a
//!   whole catalog). Children of a node are contiguous, so a step lists the allowed codes of one
//!   node without touching anything else. It holds codes, not token ids: a request checks that its
//!   token map has a token for each (O(levels)) before it decodes with a shared trie.
//! - [`DecodeState`]: the per-request automaton
//!   `[<think> free text </think>] [<answer>] (<|sid_begin|> c_0 .. c_{L-1} <|sid_end|>){N}
//!   [</answer>] EOS`, where each SID is restricted to the items not yet emitted. A prefix shared by
//!   several remaining items stays open until resolved; a subtree whose items are all used is closed.
//!
//! [`fill_bitmask`] and [`allowed_lists`] fill many rows per call (rayon across rows) in the int32
//! bitmask layout of xgrammar / vLLM: `ceil(V/32)` words per row, bit `j` of word `i` allows token
//! `32*i + j`. A state with no allowed token is an error, never an unconstrained row.

mod state;
mod token_map;
mod trie;
#[cfg(test)]
pub(crate) mod tests;

use rayon::prelude::*;

use crate::error::{Gr2Error, Result};

pub use state::{DecodeState, Framing, ReasoningStart};
pub(crate) use token_map::check_sid_levels;
pub use token_map::{words_per_row, TokenMap, TokenMapSpec, TokenRole, MAX_SID_LEVELS};
pub use trie::SidTrie;

/// Fill `out` (rows x words, row-major) with the masks of `states[rows[i]]`, in parallel.
pub fn fill_bitmask(states: &[DecodeState], rows: &[usize], out: &mut [u32], words: usize) -> Result<()> {
    if out.len() != rows.len() * words {
        return Err(Gr2Error::invalid(format!(
            "bitmask has {} words, expected {} rows x {words}",
            out.len(),
            rows.len()
        )));
    }
    check_rows(states.len(), rows)?;
    let fill = |(row, &r): (&mut [u32], &usize)| {
        states[r].fill_row(row).map_err(|e| match e {
            Gr2Error::Constraint(m) => Gr2Error::Constraint(format!("row {r}: {m}")),
            other => other,
        })
    };
    if rows.len() < PARALLEL_MIN_ROWS {
        out.chunks_mut(words.max(1)).zip(rows.iter()).try_for_each(fill)
    } else {
        out.par_chunks_mut(words.max(1)).zip(rows.par_iter()).with_min_len(16).try_for_each(fill)
    }
}

/// Below this many rows a call stays on the calling thread: handing work to the rayon pool costs
/// more than filling a few rows, and on a busy machine the wake-up latency dominates.
pub const PARALLEL_MIN_ROWS: usize = 64;

/// Allowed ids of each requested row as CSR (offsets of len rows+1, ids). Free-reasoning rows are
/// listed as empty with `free[i] = true` (their allowed set is the reasoning vocabulary).
pub fn allowed_lists(states: &[DecodeState], rows: &[usize]) -> Result<(Vec<i64>, Vec<i32>, Vec<bool>)> {
    check_rows(states.len(), rows)?;
    let list_of = |&r: &usize| if states[r].is_free() { Ok(Vec::new()) } else { states[r].allowed() };
    let lists: Vec<Result<Vec<u32>>> = if rows.len() < PARALLEL_MIN_ROWS {
        rows.iter().map(list_of).collect()
    } else {
        rows.par_iter().with_min_len(16).map(list_of).collect()
    };
    let mut offsets = Vec::with_capacity(rows.len() + 1);
    let mut ids = Vec::new();
    let mut free = Vec::with_capacity(rows.len());
    offsets.push(0);
    for (list, &r) in lists.into_iter().zip(rows) {
        let list = list.map_err(|e| match e {
            Gr2Error::Constraint(m) => Gr2Error::Constraint(format!("row {r}: {m}")),
            other => other,
        })?;
        ids.extend(list.iter().map(|&t| t as i32));
        offsets.push(ids.len() as i64);
        free.push(states[r].is_free());
    }
    Ok((offsets, ids, free))
}

/// Advance `states[rows[i]]` by `tokens[i]`: all or nothing (on error no state changes).
pub fn advance_rows(states: &mut [DecodeState], rows: &[usize], tokens: &[i64]) -> Result<()> {
    if rows.len() != tokens.len() {
        return Err(Gr2Error::invalid(format!("{} rows but {} tokens", rows.len(), tokens.len())));
    }
    check_rows(states.len(), rows)?;
    let mut seen = vec![false; states.len()];
    for &r in rows {
        if std::mem::replace(&mut seen[r], true) {
            return Err(Gr2Error::invalid(format!("row {r} advanced twice in one call")));
        }
    }
    for (&r, &tok) in rows.iter().zip(tokens) {
        if tok < 0 || tok > u32::MAX as i64 || !states[r].allows(tok as u32) {
            let mut probe = states[r].clone();
            let err = if tok < 0 || tok > u32::MAX as i64 {
                Gr2Error::Constraint(format!("token {tok} is not a valid id"))
            } else {
                probe.advance(tok as u32).expect_err("forbidden")
            };
            return Err(match err {
                Gr2Error::Constraint(m) => Gr2Error::Constraint(format!("row {r}: {m}")),
                other => other,
            });
        }
    }
    for (&r, &tok) in rows.iter().zip(tokens) {
        states[r].advance(tok as u32)?;
    }
    Ok(())
}

fn check_rows(n: usize, rows: &[usize]) -> Result<()> {
    if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
        return Err(Gr2Error::invalid(format!("row {bad} out of range: the batch holds {n} states")));
    }
    Ok(())
}
