//! The hot kernel of RQ encoding: for a tile of `TILE` residuals, the distance of each residual to
//! every code of one level, fused with the argmin (or, for beam search, with a store).
//!
//! Distances use ||r - c||^2 = ||r||^2 - 2 r.c + ||c||^2. The argmin does not need ||r||^2, so a
//! residual's *score* against code c is `||c||^2 - 2 r.c`. The codebook of a level is packed once
//! (at construction) as groups of `CODE_BLOCK` codes laid out `[group][dim][CODE_BLOCK]` holding
//! `-2 c`, so the inner loop is a rank-1 update `acc[code][item] += r[d][item] * (-2 c[code][d])`
//! started from `||c||^2`. The residual tile is transposed (`[dim][TILE]`), so items live in the
//! SIMD lanes: the argmin over codes is a lane-wise compare/min/blend, with no horizontal
//! reductions, and codes are visited in increasing order with a strict `<`, which sends exact ties
//! to the lowest index. `D` is the reduction axis and is looped over one element at a time, so any
//! `D` works without remainder handling; padding codes (K rounded up to `CODE_BLOCK`) carry a
//! norm of +inf and are never chosen.
//!
//! Two implementations with the same structure: an AVX2+FMA micro-kernel (16 items x 6 codes =
//! 12 ymm accumulators, selected at run time) and a portable one that the compiler vectorises
//! for the baseline target. They differ only in rounding (fused vs separate multiply-add).

/// Items per tile: two 8-lane f32 vectors.
pub const TILE: usize = 16;
/// Codes per register block of the micro-kernel.
pub const CODE_BLOCK: usize = 6;

/// Which implementation of the distance kernel to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust, vectorised by the compiler for the baseline target (SSE2 on x86-64).
    Portable,
    /// AVX2 + FMA intrinsics (x86-64 only; chosen at run time when the CPU has them).
    Avx2Fma,
}

impl Kernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Kernel {
        if Kernel::Avx2Fma.is_supported() {
            Kernel::Avx2Fma
        } else {
            Kernel::Portable
        }
    }

    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Avx2Fma => avx2_fma_available(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma_available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_fma_available() -> bool {
    false
}

/// One level's codebook in the packed layout described in the module docs.
#[derive(Clone, Copy)]
pub struct PackedLevel<'a> {
    /// `groups * dim * CODE_BLOCK` values of `-2 c`, zero for padding codes.
    pub weights: &'a [f32],
    /// `groups * CODE_BLOCK` squared code norms, +inf for padding codes.
    pub norms: &'a [f32],
    pub dim: usize,
}

impl PackedLevel<'_> {
    pub fn groups(&self) -> usize {
        self.norms.len() / CODE_BLOCK
    }

    /// Number of codes including padding (a multiple of `CODE_BLOCK`).
    pub fn padded_codes(&self) -> usize {
        self.norms.len()
    }

    fn check(&self, residuals_t: &[f32]) {
        // Internal invariants (guaranteed by RqCodebooks); checked once per tile, not per element.
        assert_eq!(self.weights.len(), self.groups() * self.dim * CODE_BLOCK);
        assert_eq!(self.norms.len() % CODE_BLOCK, 0);
        assert_eq!(residuals_t.len(), self.dim * TILE);
    }
}

/// Packs a level's row-major `(k, dim)` codebook; returns `(weights, norms)`.
pub fn pack_level(codes: &[f32], k: usize, dim: usize) -> (Vec<f32>, Vec<f32>) {
    let groups = k.div_ceil(CODE_BLOCK);
    let mut weights = vec![0.0f32; groups * dim * CODE_BLOCK];
    let mut norms = vec![f32::INFINITY; groups * CODE_BLOCK];
    for (code, row) in codes.chunks_exact(dim).enumerate() {
        let (group, slot) = (code / CODE_BLOCK, code % CODE_BLOCK);
        for (d, &value) in row.iter().enumerate() {
            weights[(group * dim + d) * CODE_BLOCK + slot] = -2.0 * value;
        }
        norms[code] = squared_norm(row);
    }
    (weights, norms)
}

/// Sum of squares in index order (the same order everywhere, so equal inputs give equal norms).
pub fn squared_norm(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |acc, &x| acc + x * x)
}

/// For each of the `TILE` residuals (transposed, `[dim][TILE]`), the code with the smallest score
/// and that score. Ties go to the lowest code index; a lane whose scores are all NaN keeps code 0
/// with score +inf (the caller treats a non-finite best score as overflow).
pub fn argmin_tile(
    kernel: Kernel,
    level: PackedLevel<'_>,
    residuals_t: &[f32],
    best_code: &mut [u32; TILE],
    best_score: &mut [f32; TILE],
) {
    level.check(residuals_t);
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma if avx2_fma_available() => {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); slice lengths were checked.
            unsafe { avx2::argmin_tile(level, residuals_t, best_code, best_score) }
        }
        _ => argmin_tile_portable(level, residuals_t, best_code, best_score),
    }
}

/// Scores of the `TILE` residuals against every (padded) code: `out[code * TILE + lane]`.
pub fn score_tile(kernel: Kernel, level: PackedLevel<'_>, residuals_t: &[f32], out: &mut [f32]) {
    level.check(residuals_t);
    assert_eq!(out.len(), level.padded_codes() * TILE);
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma if avx2_fma_available() => {
            // SAFETY: as in `argmin_tile`; `out` holds padded_codes * TILE values.
            unsafe { avx2::score_tile(level, residuals_t, out) }
        }
        _ => score_tile_portable(level, residuals_t, out),
    }
}

/// The scores of one group of codes for the whole tile, `[CODE_BLOCK][TILE]`.
#[inline(always)]
fn group_scores_portable(
    level: &PackedLevel<'_>,
    residuals_t: &[f32],
    group: usize,
) -> [[f32; TILE]; CODE_BLOCK] {
    let dim = level.dim;
    let mut acc = [[0.0f32; TILE]; CODE_BLOCK];
    for (slot, lanes) in acc.iter_mut().enumerate() {
        *lanes = [level.norms[group * CODE_BLOCK + slot]; TILE];
    }
    let weights = &level.weights[group * dim * CODE_BLOCK..(group + 1) * dim * CODE_BLOCK];
    for (r, w) in residuals_t
        .chunks_exact(TILE)
        .zip(weights.chunks_exact(CODE_BLOCK))
    {
        for (lanes, &c) in acc.iter_mut().zip(w) {
            for (a, &x) in lanes.iter_mut().zip(r) {
                *a += x * c;
            }
        }
    }
    acc
}

fn argmin_tile_portable(
    level: PackedLevel<'_>,
    residuals_t: &[f32],
    best_code: &mut [u32; TILE],
    best_score: &mut [f32; TILE],
) {
    let mut best = [f32::INFINITY; TILE];
    let mut code = [0u32; TILE];
    for group in 0..level.groups() {
        let acc = group_scores_portable(&level, residuals_t, group);
        for (slot, lanes) in acc.iter().enumerate() {
            let candidate = (group * CODE_BLOCK + slot) as u32;
            for lane in 0..TILE {
                if lanes[lane] < best[lane] {
                    best[lane] = lanes[lane];
                    code[lane] = candidate;
                }
            }
        }
    }
    *best_code = code;
    *best_score = best;
}

fn score_tile_portable(level: PackedLevel<'_>, residuals_t: &[f32], out: &mut [f32]) {
    for group in 0..level.groups() {
        let acc = group_scores_portable(&level, residuals_t, group);
        for (slot, lanes) in acc.iter().enumerate() {
            let code = group * CODE_BLOCK + slot;
            out[code * TILE..(code + 1) * TILE].copy_from_slice(lanes);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{PackedLevel, CODE_BLOCK, TILE};
    use std::arch::x86_64::*;

    /// Accumulators of one register block: `acc[2*slot + half]`, 8 items per half.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group_scores(
        level: &PackedLevel<'_>,
        residuals_t: *const f32,
        group: usize,
    ) -> [__m256; 2 * CODE_BLOCK] {
        let dim = level.dim;
        let weights = level.weights.as_ptr().add(group * dim * CODE_BLOCK);
        let norms = level.norms.as_ptr().add(group * CODE_BLOCK);
        let mut acc = [_mm256_setzero_ps(); 2 * CODE_BLOCK];
        for slot in 0..CODE_BLOCK {
            let norm = _mm256_broadcast_ss(&*norms.add(slot));
            acc[2 * slot] = norm;
            acc[2 * slot + 1] = norm;
        }
        for d in 0..dim {
            let r0 = _mm256_loadu_ps(residuals_t.add(d * TILE));
            let r1 = _mm256_loadu_ps(residuals_t.add(d * TILE + 8));
            let w = weights.add(d * CODE_BLOCK);
            for slot in 0..CODE_BLOCK {
                let c = _mm256_broadcast_ss(&*w.add(slot));
                acc[2 * slot] = _mm256_fmadd_ps(r0, c, acc[2 * slot]);
                acc[2 * slot + 1] = _mm256_fmadd_ps(r1, c, acc[2 * slot + 1]);
            }
        }
        acc
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn argmin_tile(
        level: PackedLevel<'_>,
        residuals_t: &[f32],
        best_code: &mut [u32; TILE],
        best_score: &mut [f32; TILE],
    ) {
        let r = residuals_t.as_ptr();
        let mut best0 = _mm256_set1_ps(f32::INFINITY);
        let mut best1 = best0;
        let mut code0 = _mm256_setzero_si256();
        let mut code1 = code0;
        for group in 0..level.groups() {
            let acc = group_scores(&level, r, group);
            for slot in 0..CODE_BLOCK {
                let candidate = _mm256_set1_epi32((group * CODE_BLOCK + slot) as i32);
                let (s0, s1) = (acc[2 * slot], acc[2 * slot + 1]);
                // Strict less-than, ordered: NaN never wins, equal scores keep the earlier code.
                let lt0 = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(s0, best0));
                let lt1 = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(s1, best1));
                best0 = _mm256_min_ps(s0, best0); // min(a, b) = a < b ? a : b, the same rule
                best1 = _mm256_min_ps(s1, best1);
                code0 = _mm256_blendv_epi8(code0, candidate, lt0);
                code1 = _mm256_blendv_epi8(code1, candidate, lt1);
            }
        }
        _mm256_storeu_ps(best_score.as_mut_ptr(), best0);
        _mm256_storeu_ps(best_score.as_mut_ptr().add(8), best1);
        _mm256_storeu_si256(best_code.as_mut_ptr() as *mut __m256i, code0);
        _mm256_storeu_si256(best_code.as_mut_ptr().add(8) as *mut __m256i, code1);
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn score_tile(level: PackedLevel<'_>, residuals_t: &[f32], out: &mut [f32]) {
        let r = residuals_t.as_ptr();
        let o = out.as_mut_ptr();
        for group in 0..level.groups() {
            let acc = group_scores(&level, r, group);
            for slot in 0..CODE_BLOCK {
                let code = group * CODE_BLOCK + slot;
                _mm256_storeu_ps(o.add(code * TILE), acc[2 * slot]);
                _mm256_storeu_ps(o.add(code * TILE + 8), acc[2 * slot + 1]);
            }
        }
    }
}
