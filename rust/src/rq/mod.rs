//! Residual quantization (RQ): L codebooks of K codes in D dimensions. Encoding picks, level by
//! level, the code nearest (squared L2) to the residual left by the previous levels; decoding sums
//! the chosen codes. This is how item embeddings become semantic IDs.
//!
//! * Greedy encoding: at each level the code with the smallest squared distance to the residual,
//!   ties to the lowest index. Runs the fused distance + argmin kernel of [`kernel`] on tiles of
//!   16 items, rayon over blocks of items; memory is O(tile), never O(n x K).
//! * Beam search (`beam = B > 1`): keeps the B partial paths with the smallest squared error
//!   after each level (ties: the earlier parent path, then the lower code). The final answer is
//!   the path with the smallest total error, compared against the greedy path, so beam search is
//!   never worse than greedy (plain beam search does not guarantee that on its own).
//!   `beam = 1` is exactly greedy.
//! * Decoding: `sum_l C[l][codes[l]]`, added in level order.
//!
//! "Squared error" of a path is `||x - C[0][c0] - C[1][c1] - ...||^2` computed in f32 by
//! subtracting the codes in level order (as encoding does) and summing squares in index order.

pub mod kernel;

use rayon::prelude::*;

use crate::error::{Gr2Error, Result};
pub use kernel::Kernel;
use kernel::{PackedLevel, CODE_BLOCK, TILE};

/// Largest codebook size: codes are stored as u16.
pub const MAX_CODEBOOK_SIZE: usize = 1 << 16;
/// Largest beam width accepted by [`RqCodebooks::encode`].
pub const MAX_BEAM: usize = 1024;
/// Items per rayon task in greedy encoding (a multiple of `TILE`).
const GREEDY_BLOCK: usize = 16 * TILE;
/// Rows (items x paths) per rayon task in beam search.
const BEAM_BLOCK_ROWS: usize = 256;
/// Rows per rayon task in decoding.
const DECODE_BLOCK: usize = 1024;

/// L codebooks of K codes of dimension D, with what encoding needs precomputed.
#[derive(Clone)]
pub struct RqCodebooks {
    levels: usize,
    codebook_size: usize,
    dim: usize,
    /// Row-major (L, K, D).
    codebooks: Vec<f32>,
    /// Row-major (L, K): squared norm of every code.
    code_norms: Vec<f32>,
    /// Per level, the packed `-2 c` layout of `kernel` (all levels concatenated).
    packed_weights: Vec<f32>,
    /// Per level, the padded norms of `kernel` (all levels concatenated).
    packed_norms: Vec<f32>,
    kernel: Kernel,
}

impl std::fmt::Debug for RqCodebooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RqCodebooks")
            .field("levels", &self.levels)
            .field("codebook_size", &self.codebook_size)
            .field("dim", &self.dim)
            .field("kernel", &self.kernel)
            .finish()
    }
}

/// The first problem met while encoding a block, reported with its row.
#[derive(Clone, Copy, Debug)]
enum EncodeProblem {
    NonFinite { row: usize, col: usize, value: f32 },
    Overflow { row: usize, level: usize },
}

impl EncodeProblem {
    fn row(&self) -> usize {
        match *self {
            EncodeProblem::NonFinite { row, .. } | EncodeProblem::Overflow { row, .. } => row,
        }
    }

    /// The error, with rows numbered from `first_row` (the caller's row of `x[0]`).
    fn into_error(self, first_row: usize) -> Gr2Error {
        match self {
            EncodeProblem::NonFinite { row, col, value } => Gr2Error::invalid(format!(
                "x contains a non-finite value ({value}) at row {}, column {col}; \
                 drop or repair such rows before encoding",
                first_row + row
            )),
            EncodeProblem::Overflow { row, level } => Gr2Error::invalid(format!(
                "squared distances overflow float32 for row {} at level {level}: the values of x \
                 or of the codebooks are too large; rescale the embeddings",
                first_row + row
            )),
        }
    }
}

fn first_problem(a: Option<EncodeProblem>, b: Option<EncodeProblem>) -> Option<EncodeProblem> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.row() < a.row() { b } else { a }),
        (a, None) => a,
        (None, b) => b,
    }
}

impl RqCodebooks {
    /// Codebooks from a row-major (levels, codebook_size, dim) buffer; picks the fastest kernel.
    pub fn new(
        codebooks: Vec<f32>,
        levels: usize,
        codebook_size: usize,
        dim: usize,
    ) -> Result<Self> {
        Self::with_kernel(codebooks, levels, codebook_size, dim, Kernel::detect())
    }

    /// As [`RqCodebooks::new`] with a chosen kernel (tests compare kernels; errors if unsupported).
    pub fn with_kernel(
        codebooks: Vec<f32>,
        levels: usize,
        codebook_size: usize,
        dim: usize,
        kernel: Kernel,
    ) -> Result<Self> {
        if levels == 0 || codebook_size == 0 || dim == 0 {
            return Err(Gr2Error::invalid(format!(
                "codebooks must have shape (L, K, D) with L, K, D >= 1, got ({levels}, {codebook_size}, {dim})"
            )));
        }
        if codebook_size > MAX_CODEBOOK_SIZE {
            return Err(Gr2Error::invalid(format!(
                "codebook size K = {codebook_size} exceeds {MAX_CODEBOOK_SIZE} (codes are stored as uint16)"
            )));
        }
        let expected = levels
            .checked_mul(codebook_size)
            .and_then(|v| v.checked_mul(dim))
            .ok_or_else(|| Gr2Error::invalid("codebook shape overflows usize"))?;
        if codebooks.len() != expected {
            return Err(Gr2Error::invalid(format!(
                "codebooks hold {} values but shape ({levels}, {codebook_size}, {dim}) needs {expected}",
                codebooks.len()
            )));
        }
        if !kernel.is_supported() {
            return Err(Gr2Error::invalid(format!(
                "kernel {kernel:?} is not supported by this CPU"
            )));
        }
        if let Some(pos) = codebooks.iter().position(|v| !v.is_finite()) {
            let (level, rest) = (pos / (codebook_size * dim), pos % (codebook_size * dim));
            return Err(Gr2Error::invalid(format!(
                "codebooks contain a non-finite value ({}) at level {level}, code {}, dimension {}",
                codebooks[pos],
                rest / dim,
                rest % dim
            )));
        }
        let code_norms: Vec<f32> = codebooks
            .chunks_exact(dim)
            .map(kernel::squared_norm)
            .collect();
        if let Some(pos) = code_norms.iter().position(|v| !v.is_finite()) {
            return Err(Gr2Error::invalid(format!(
                "the squared norm of code {} at level {} overflows float32; rescale the codebooks",
                pos % codebook_size,
                pos / codebook_size
            )));
        }
        let mut packed_weights = Vec::new();
        let mut packed_norms = Vec::new();
        for level in codebooks.chunks_exact(codebook_size * dim) {
            let (weights, norms) = kernel::pack_level(level, codebook_size, dim);
            packed_weights.extend_from_slice(&weights);
            packed_norms.extend_from_slice(&norms);
        }
        Ok(RqCodebooks {
            levels,
            codebook_size,
            dim,
            codebooks,
            code_norms,
            packed_weights,
            packed_norms,
            kernel,
        })
    }

    pub fn levels(&self) -> usize {
        self.levels
    }

    pub fn codebook_size(&self) -> usize {
        self.codebook_size
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Row-major (L, K, D).
    pub fn codebooks(&self) -> &[f32] {
        &self.codebooks
    }

    /// Row-major (L, K) squared code norms.
    pub fn code_norms(&self) -> &[f32] {
        &self.code_norms
    }

    /// Code `code` of level `level` (D values).
    pub fn code(&self, level: usize, code: usize) -> &[f32] {
        let start = (level * self.codebook_size + code) * self.dim;
        &self.codebooks[start..start + self.dim]
    }

    fn packed_level(&self, level: usize) -> PackedLevel<'_> {
        let padded = self.codebook_size.div_ceil(CODE_BLOCK) * CODE_BLOCK;
        PackedLevel {
            weights: &self.packed_weights
                [level * padded * self.dim..(level + 1) * padded * self.dim],
            norms: &self.packed_norms[level * padded..(level + 1) * padded],
            dim: self.dim,
        }
    }

    /// Squared error of encoding `x` (D values) as `codes` (L values < K): subtract the codes in
    /// level order, then sum squares in index order.
    pub fn squared_error(&self, x: &[f32], codes: &[u16]) -> f32 {
        let mut residual = x.to_vec();
        for (level, &code) in codes.iter().enumerate() {
            for (r, c) in residual.iter_mut().zip(self.code(level, code as usize)) {
                *r -= c;
            }
        }
        kernel::squared_norm(&residual)
    }

    fn rows_of(&self, x: &[f32], what: &str) -> Result<usize> {
        if x.len() % self.dim != 0 {
            return Err(Gr2Error::invalid(format!(
                "{what} holds {} values, not a multiple of the codebook dim {}",
                x.len(),
                self.dim
            )));
        }
        Ok(x.len() / self.dim)
    }

    fn check_beam(beam: usize) -> Result<()> {
        if beam == 0 || beam > MAX_BEAM {
            return Err(Gr2Error::invalid(format!(
                "beam must be between 1 and {MAX_BEAM}, got {beam}"
            )));
        }
        Ok(())
    }

    /// Encodes row-major `x` (n, D) into row-major codes (n, L).
    pub fn encode(&self, x: &[f32], beam: usize) -> Result<Vec<u16>> {
        let n = self.rows_of(x, "x")?;
        let mut codes = vec![0u16; n * self.levels];
        self.encode_into(x, beam, &mut codes)?;
        Ok(codes)
    }

    /// As [`RqCodebooks::encode`], writing into `out` (n * L values).
    pub fn encode_into(&self, x: &[f32], beam: usize, out: &mut [u16]) -> Result<()> {
        self.encode_rows_into(x, beam, out, 0)
    }

    /// As [`RqCodebooks::encode_into`] for rows `first_row..` of a larger array (a chunk of a
    /// file): error messages name the row in that array.
    pub fn encode_rows_into(&self, x: &[f32], beam: usize, out: &mut [u16], first_row: usize) -> Result<()> {
        Self::check_beam(beam)?;
        let n = self.rows_of(x, "x")?;
        if out.len() != n * self.levels {
            return Err(Gr2Error::invalid(format!(
                "output holds {} codes but {n} rows x {} levels are needed",
                out.len(),
                self.levels
            )));
        }
        self.encode_greedy(x, out).map_err(|problem| problem.into_error(first_row))?;
        if beam > 1 {
            self.refine_with_beam(x, beam, out);
        }
        Ok(())
    }

    fn encode_greedy(&self, x: &[f32], out: &mut [u16]) -> std::result::Result<(), EncodeProblem> {
        let problem = out
            .par_chunks_mut(GREEDY_BLOCK * self.levels)
            .enumerate()
            .map(|(block, codes)| {
                let first_row = block * GREEDY_BLOCK;
                let rows = codes.len() / self.levels;
                self.encode_greedy_block(
                    &x[first_row * self.dim..(first_row + rows) * self.dim],
                    first_row,
                    codes,
                )
            })
            .reduce(|| None, first_problem);
        match problem {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// Greedy encoding of a block of rows, tile by tile; returns the block's first problem.
    fn encode_greedy_block(
        &self,
        x: &[f32],
        first_row: usize,
        out: &mut [u16],
    ) -> Option<EncodeProblem> {
        let (dim, levels) = (self.dim, self.levels);
        let mut residuals_t = vec![0.0f32; dim * TILE];
        let mut best_code = [0u32; TILE];
        let mut best_score = [0.0f32; TILE];
        for (tile, (rows, codes)) in x
            .chunks(dim * TILE)
            .zip(out.chunks_mut(levels * TILE))
            .enumerate()
        {
            let tile_row = first_row + tile * TILE;
            let used = rows.len() / dim;
            if let Some(problem) = load_tile(rows, dim, tile_row, &mut residuals_t) {
                return Some(problem);
            }
            for level in 0..levels {
                kernel::argmin_tile(
                    self.kernel,
                    self.packed_level(level),
                    &residuals_t,
                    &mut best_code,
                    &mut best_score,
                );
                for lane in 0..used {
                    if !best_score[lane].is_finite() {
                        return Some(EncodeProblem::Overflow {
                            row: tile_row + lane,
                            level,
                        });
                    }
                    codes[lane * levels + level] = best_code[lane] as u16;
                }
                if level + 1 < levels {
                    for lane in 0..used {
                        let code = self.code(level, best_code[lane] as usize);
                        for (d, c) in code.iter().enumerate() {
                            residuals_t[d * TILE + lane] -= c;
                        }
                    }
                }
            }
        }
        None
    }

    /// Replaces each row's greedy codes in `out` by the beam-search result when that has a
    /// strictly smaller squared error. Input was validated by the greedy pass.
    fn refine_with_beam(&self, x: &[f32], beam: usize, out: &mut [u16]) {
        let items_per_block = (BEAM_BLOCK_ROWS / beam).max(1);
        out.par_chunks_mut(items_per_block * self.levels)
            .zip(x.par_chunks(items_per_block * self.dim))
            .for_each(|(codes, rows)| self.beam_block(rows, beam, codes));
    }

    fn beam_block(&self, x: &[f32], beam: usize, out: &mut [u16]) {
        let (dim, levels, k) = (self.dim, self.levels, self.codebook_size);
        let items = x.len() / dim;
        // Current paths of every item of the block, item-major and best first within an item.
        let mut paths: Vec<Vec<Path>> = x
            .chunks_exact(dim)
            .map(|row| {
                vec![Path {
                    residual: row.to_vec(),
                    error: 0.0,
                    codes: Vec::new(),
                }]
            })
            .collect();
        for item_paths in paths.iter_mut() {
            item_paths[0].error = kernel::squared_norm(&item_paths[0].residual);
        }
        let mut residuals_t = vec![0.0f32; dim * TILE];
        let mut scores = vec![0.0f32; k.div_ceil(CODE_BLOCK) * CODE_BLOCK * TILE];
        for level in 0..levels {
            let packed = self.packed_level(level);
            // (item, parent rank) of every row, tiled by TILE.
            let rows: Vec<(usize, usize)> = paths
                .iter()
                .enumerate()
                .flat_map(|(item, ps)| (0..ps.len()).map(move |rank| (item, rank)))
                .collect();
            let mut heaps: Vec<BestCandidates> =
                (0..items).map(|_| BestCandidates::new(beam)).collect();
            for tile in rows.chunks(TILE) {
                residuals_t.iter_mut().for_each(|v| *v = 0.0);
                for (lane, &(item, rank)) in tile.iter().enumerate() {
                    for (d, &v) in paths[item][rank].residual.iter().enumerate() {
                        residuals_t[d * TILE + lane] = v;
                    }
                }
                kernel::score_tile(self.kernel, packed, &residuals_t, &mut scores);
                offer_tile_candidates(tile, &paths, &scores, k, &mut heaps);
            }
            for (item, heap) in heaps.into_iter().enumerate() {
                let parents = std::mem::take(&mut paths[item]);
                paths[item] = heap
                    .into_sorted()
                    .into_iter()
                    .map(|cand| {
                        let parent = &parents[cand.parent as usize];
                        let residual: Vec<f32> = parent
                            .residual
                            .iter()
                            .zip(self.code(level, cand.code as usize))
                            .map(|(r, c)| r - c)
                            .collect();
                        let mut codes = parent.codes.clone();
                        codes.push(cand.code as u16);
                        Path {
                            error: kernel::squared_norm(&residual),
                            residual,
                            codes,
                        }
                    })
                    .collect();
            }
        }
        for (item, item_paths) in paths.iter().enumerate() {
            // Smallest exact error; ties keep the better-ranked path.
            let Some(best) = item_paths.iter().min_by(|a, b| a.error.total_cmp(&b.error)) else {
                continue;
            };
            let greedy = &mut out[item * levels..(item + 1) * levels];
            let greedy_error = self.squared_error(&x[item * dim..(item + 1) * dim], greedy);
            if best.error < greedy_error {
                greedy.copy_from_slice(&best.codes);
            }
        }
    }

    /// Decodes row-major codes (n, L) into row-major vectors (n, D).
    pub fn decode(&self, codes: &[u16]) -> Result<Vec<f32>> {
        if codes.len() % self.levels != 0 {
            return Err(Gr2Error::invalid(format!(
                "codes hold {} values, not a multiple of the number of levels {}",
                codes.len(),
                self.levels
            )));
        }
        let n = codes.len() / self.levels;
        let mut out = vec![0.0f32; n * self.dim];
        self.decode_into(codes, &mut out)?;
        Ok(out)
    }

    /// As [`RqCodebooks::decode`], writing into `out` (n * D values).
    pub fn decode_into(&self, codes: &[u16], out: &mut [f32]) -> Result<()> {
        let (levels, dim, k) = (self.levels, self.dim, self.codebook_size);
        if codes.len() % levels != 0 || out.len() != codes.len() / levels * dim {
            return Err(Gr2Error::invalid(format!(
                "decode needs (n, {levels}) codes and an (n, {dim}) output, got {} codes and {} outputs",
                codes.len(),
                out.len()
            )));
        }
        if let Some(pos) = codes.iter().position(|&c| c as usize >= k) {
            return Err(Gr2Error::invalid(format!(
                "code {} at row {}, level {} is out of range: the codebook size is {k}",
                codes[pos],
                pos / levels,
                pos % levels
            )));
        }
        out.par_chunks_mut(DECODE_BLOCK * dim)
            .zip(codes.par_chunks(DECODE_BLOCK * levels))
            .for_each(|(vectors, codes)| {
                for (vector, row_codes) in vectors
                    .chunks_exact_mut(dim)
                    .zip(codes.chunks_exact(levels))
                {
                    vector.copy_from_slice(self.code(0, row_codes[0] as usize));
                    for (level, &code) in row_codes.iter().enumerate().skip(1) {
                        for (v, c) in vector.iter_mut().zip(self.code(level, code as usize)) {
                            *v += c;
                        }
                    }
                }
            });
        Ok(())
    }
}

/// Transposes up to TILE rows into `[dim][TILE]`, zero-filling unused lanes and checking values.
fn load_tile(
    rows: &[f32],
    dim: usize,
    first_row: usize,
    residuals_t: &mut [f32],
) -> Option<EncodeProblem> {
    let used = rows.len() / dim;
    for (lane, row) in rows.chunks_exact(dim).enumerate() {
        for (d, &value) in row.iter().enumerate() {
            if !value.is_finite() {
                return Some(EncodeProblem::NonFinite {
                    row: first_row + lane,
                    col: d,
                    value,
                });
            }
            residuals_t[d * TILE + lane] = value;
        }
    }
    for d in 0..dim {
        residuals_t[d * TILE + used..(d + 1) * TILE]
            .iter_mut()
            .for_each(|v| *v = 0.0);
    }
    None
}

/// Offers every (row, code) candidate of a scored tile to its item's heap.
fn offer_tile_candidates(
    tile: &[(usize, usize)],
    paths: &[Vec<Path>],
    scores: &[f32],
    k: usize,
    heaps: &mut [BestCandidates],
) {
    for (lane, &(item, rank)) in tile.iter().enumerate() {
        let parent_error = paths[item][rank].error;
        let heap = &mut heaps[item];
        // Cheap pre-filter: most candidates lose to the worst one kept so far.
        let mut threshold = heap.threshold();
        for code in 0..k {
            let error = parent_error + scores[code * TILE + lane];
            if error <= threshold {
                heap.offer(Candidate {
                    error,
                    parent: rank as u32,
                    code: code as u32,
                });
                threshold = heap.threshold();
            }
        }
    }
}

/// A partial encoding in beam search.
struct Path {
    residual: Vec<f32>,
    /// Squared norm of `residual`.
    error: f32,
    codes: Vec<u16>,
}

/// A possible extension of a path: ordered by error, then parent rank, then code.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    error: f32,
    parent: u32,
    code: u32,
}

impl Candidate {
    fn key_cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.error
            .total_cmp(&other.error)
            .then(self.parent.cmp(&other.parent))
            .then(self.code.cmp(&other.code))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.key_cmp(other).is_eq()
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key_cmp(other)
    }
}

/// The `capacity` smallest candidates offered (a max-heap of the kept ones). The set kept does
/// not depend on the order of offers, because the candidate order is total.
struct BestCandidates {
    capacity: usize,
    heap: std::collections::BinaryHeap<Candidate>,
}

impl BestCandidates {
    fn new(capacity: usize) -> Self {
        BestCandidates {
            capacity,
            heap: std::collections::BinaryHeap::with_capacity(capacity + 1),
        }
    }

    /// Candidates with a larger error cannot be kept (NaN errors never pass `<=` it).
    #[inline]
    fn threshold(&self) -> f32 {
        match self.heap.peek() {
            Some(worst) if self.heap.len() == self.capacity => worst.error,
            _ => f32::INFINITY,
        }
    }

    #[inline]
    fn offer(&mut self, cand: Candidate) {
        if self.heap.len() < self.capacity {
            self.heap.push(cand);
        } else if let Some(worst) = self.heap.peek() {
            if cand < *worst {
                self.heap.pop();
                self.heap.push(cand);
            }
        }
    }

    fn into_sorted(self) -> Vec<Candidate> {
        self.heap.into_sorted_vec()
    }
}

#[cfg(test)]
mod tests;
