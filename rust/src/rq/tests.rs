//! Unit and property tests of RQ encoding against a naive scalar reference.

use super::*;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Naive reference: distances as sum((r - c)^2) in f64, argmin with ties to the lowest index.
/// Follows `codes` (the path under test) to build the residual of the next level, and returns
/// for each level the reference minimum distance and the distance of the code actually chosen.
fn reference_check(cb: &RqCodebooks, x: &[f32], codes: &[u16]) -> Vec<(f64, f64)> {
    let mut residual = x.to_vec();
    let mut out = Vec::new();
    for (level, &chosen) in codes.iter().enumerate() {
        let dist = |code: usize| -> f64 {
            residual
                .iter()
                .zip(cb.code(level, code))
                .map(|(&r, &c)| ((r - c) as f64).powi(2))
                .sum()
        };
        let min = (0..cb.codebook_size())
            .map(dist)
            .fold(f64::INFINITY, f64::min);
        out.push((min, dist(chosen as usize)));
        for (r, c) in residual.iter_mut().zip(cb.code(level, chosen as usize)) {
            *r -= c;
        }
    }
    out
}

/// Naive greedy encode (exact argmin of f64 distances, first minimum wins).
fn reference_greedy(cb: &RqCodebooks, x: &[f32]) -> Vec<u16> {
    let mut residual = x.to_vec();
    let mut codes = Vec::new();
    for level in 0..cb.levels() {
        let mut best = (f64::INFINITY, 0usize);
        for code in 0..cb.codebook_size() {
            let d: f64 = residual
                .iter()
                .zip(cb.code(level, code))
                .map(|(&r, &c)| ((r - c) as f64).powi(2))
                .sum();
            if d < best.0 {
                best = (d, code);
            }
        }
        codes.push(best.1 as u16);
        for (r, c) in residual.iter_mut().zip(cb.code(level, best.1)) {
            *r -= c;
        }
    }
    codes
}

fn kernels() -> Vec<Kernel> {
    [Kernel::Portable, Kernel::Avx2Fma]
        .into_iter()
        .filter(|k| k.is_supported())
        .collect()
}

fn random_vec(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
        .collect()
}

/// The chosen code must be a (near-)minimum at every level: near-ties may differ from the
/// reference because the kernel computes ||c||^2 - 2 r.c in f32.
fn assert_near_optimal(cb: &RqCodebooks, x: &[f32], codes: &[u16]) {
    let scale: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>()
        + cb.code_norms().iter().fold(0.0f64, |a, &v| a.max(v as f64));
    for (row, (xr, cr)) in x
        .chunks_exact(cb.dim())
        .zip(codes.chunks_exact(cb.levels()))
        .enumerate()
    {
        for (level, (min, chosen)) in reference_check(cb, xr, cr).into_iter().enumerate() {
            assert!(
                chosen <= min + 1e-5 * (scale + 1.0),
                "row {row} level {level}: chosen {chosen} > min {min}"
            );
        }
    }
}

#[test]
fn greedy_matches_reference_on_random_data() {
    let mut rng = StdRng::seed_from_u64(7);
    for &(n, l, k, d) in &[
        (1, 1, 1, 1),
        (37, 3, 17, 3),
        (100, 4, 256, 32),
        (33, 2, 7, 33),
        (5, 2, 300, 17),
    ] {
        let cbv = random_vec(&mut rng, l * k * d, 1.0);
        let x = random_vec(&mut rng, n * d, 2.0);
        for kernel in kernels() {
            let cb = RqCodebooks::with_kernel(cbv.clone(), l, k, d, kernel).unwrap();
            let codes = cb.encode(&x, 1).unwrap();
            assert_eq!(codes.len(), n * l);
            assert_near_optimal(&cb, &x, &codes);
        }
    }
}

#[test]
fn integer_data_is_exact_and_ties_go_low() {
    // Small integers: every sum is exact in f32, so the result must equal the reference exactly,
    // including its tie-breaking (many exact ties occur with values in -2..=2).
    let mut rng = StdRng::seed_from_u64(11);
    let (n, l, k, d) = (300, 3, 20, 5);
    let cbv: Vec<f32> = (0..l * k * d)
        .map(|_| rng.gen_range(-2i32..=2) as f32)
        .collect();
    let x: Vec<f32> = (0..n * d)
        .map(|_| rng.gen_range(-4i32..=4) as f32)
        .collect();
    for kernel in kernels() {
        let cb = RqCodebooks::with_kernel(cbv.clone(), l, k, d, kernel).unwrap();
        let codes = cb.encode(&x, 1).unwrap();
        for (row, xr) in x.chunks_exact(d).enumerate() {
            assert_eq!(
                &codes[row * l..(row + 1) * l],
                reference_greedy(&cb, xr).as_slice(),
                "row {row}"
            );
        }
    }
}

#[test]
fn degenerate_codebooks_pick_code_zero() {
    for kernel in kernels() {
        let cb = RqCodebooks::with_kernel(vec![0.5; 2 * 9 * 4], 2, 9, 4, kernel).unwrap();
        let codes = cb
            .encode(&[1.0, -3.0, 2.0, 0.0, 7.0, 7.0, 7.0, 7.0], 1)
            .unwrap();
        assert_eq!(codes, vec![0; 4]);
        // Duplicate codes: the first copy wins.
        let mut v = vec![0.0f32; 5 * 2];
        v[2..4].copy_from_slice(&[1.0, 1.0]);
        v[6..8].copy_from_slice(&[1.0, 1.0]);
        let cb = RqCodebooks::with_kernel(v, 1, 5, 2, kernel).unwrap();
        assert_eq!(cb.encode(&[0.9, 1.2], 1).unwrap(), vec![1]);
    }
}

#[test]
fn empty_input_and_validation_errors() {
    let cb = RqCodebooks::new(vec![0.0; 2 * 3 * 4], 2, 3, 4).unwrap();
    assert!(cb.encode(&[], 1).unwrap().is_empty());
    assert!(cb.decode(&[]).unwrap().is_empty());
    let msg = |r: Result<Vec<u16>>| r.unwrap_err().to_string();
    assert!(msg(cb.encode(&[1.0; 5], 1)).contains("not a multiple"));
    assert!(msg(cb.encode(&[0.0, f32::NAN, 0.0, 0.0], 1)).contains("row 0, column 1"));
    let mut x = vec![0.0f32; 4 * 600];
    x[4 * 517 + 3] = f32::INFINITY;
    assert!(msg(cb.encode(&x, 1)).contains("row 517, column 3"));
    let mut out = vec![0u16; 600 * 2];
    let err = cb.encode_rows_into(&x, 1, &mut out, 1_000_000).unwrap_err().to_string();
    assert!(err.contains("row 1000517, column 3"), "{err}");
    assert!(msg(cb.encode(&[0.0; 4], 0)).contains("beam"));
    assert!(cb
        .decode(&[0, 3])
        .unwrap_err()
        .to_string()
        .contains("code 3 at row 0, level 1"));
    assert!(RqCodebooks::new(vec![0.0; 6], 1, 3, 3)
        .unwrap_err()
        .to_string()
        .contains("needs 9"));
    assert!(RqCodebooks::new(vec![], 0, 3, 3).is_err());
    assert!(RqCodebooks::new(vec![0.0; 65537], 1, 65537, 1)
        .unwrap_err()
        .to_string()
        .contains("uint16"));
    let mut bad = vec![0.0f32; 2 * 3 * 4];
    bad[13] = f32::NEG_INFINITY;
    assert!(RqCodebooks::new(bad, 2, 3, 4)
        .unwrap_err()
        .to_string()
        .contains("level 1, code 0, dimension 1"));
    assert!(RqCodebooks::new(vec![3e38; 4], 1, 1, 4)
        .unwrap_err()
        .to_string()
        .contains("overflows"));
}

#[test]
fn overflow_is_reported_not_silently_wrong() {
    let cb = RqCodebooks::new(vec![1e18, -1e18], 1, 2, 1).unwrap();
    let err = cb.encode(&[3e38], 1).unwrap_err().to_string();
    assert!(err.contains("overflow"), "{err}");
}

#[test]
fn full_k_range_codes_fit_u16() {
    let k = MAX_CODEBOOK_SIZE;
    let mut cbv = vec![0.0f32; k];
    cbv[k - 1] = 1.0;
    cbv[3] = -1.0;
    let cb = RqCodebooks::new(cbv, 1, k, 1).unwrap();
    assert_eq!(cb.encode(&[0.9, -0.8, 0.1], 1).unwrap(), vec![65535, 3, 0]);
    assert_eq!(cb.decode(&[65535, 3, 0]).unwrap(), vec![1.0, -1.0, 0.0]);
}

#[test]
fn beam_finds_the_exhaustive_optimum_when_wide_enough() {
    let mut rng = StdRng::seed_from_u64(3);
    let (l, k, d) = (3, 4, 3);
    let cb = RqCodebooks::new(random_vec(&mut rng, l * k * d, 1.0), l, k, d).unwrap();
    for _ in 0..50 {
        let x = random_vec(&mut rng, d, 1.5);
        let codes = cb.encode(&x, k * k * k).unwrap();
        let mut best = f32::INFINITY;
        for a in 0..k {
            for b in 0..k {
                for c in 0..k {
                    best = best.min(cb.squared_error(&x, &[a as u16, b as u16, c as u16]));
                }
            }
        }
        let got = cb.squared_error(&x, &codes);
        assert!(
            got <= best + 1e-5 * (1.0 + best),
            "beam {got} vs exhaustive {best}"
        );
    }
}

fn codebook_strategy() -> impl Strategy<Value = (usize, usize, usize, Vec<f32>)> {
    (1usize..4, 1usize..20, 1usize..19).prop_flat_map(|(l, k, d)| {
        (
            Just(l),
            Just(k),
            Just(d),
            prop::collection::vec(-3.0f32..3.0, l * k * d),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(64)))]

    #[test]
    fn prop_greedy_near_reference((l, k, d, cbv) in codebook_strategy(), n in 0usize..40, seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = random_vec(&mut rng, n * d, 4.0);
        for kernel in kernels() {
            let cb = RqCodebooks::with_kernel(cbv.clone(), l, k, d, kernel).unwrap();
            let codes = cb.encode(&x, 1).unwrap();
            prop_assert_eq!(codes.len(), n * l);
            prop_assert!(codes.iter().all(|&c| (c as usize) < k));
            assert_near_optimal(&cb, &x, &codes);
        }
    }

    #[test]
    fn prop_rounded_data_matches_reference_exactly((l, k, d, cbv) in codebook_strategy(), n in 0usize..40, seed in any::<u64>()) {
        // Values on a coarse grid keep every f32 sum exact, so there is no rounding to excuse.
        let cbv: Vec<f32> = cbv.iter().map(|v| v.round()).collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let x: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-6i32..=6) as f32).collect();
        for kernel in kernels() {
            let cb = RqCodebooks::with_kernel(cbv.clone(), l, k, d, kernel).unwrap();
            let codes = cb.encode(&x, 1).unwrap();
            for (row, xr) in x.chunks_exact(d).enumerate() {
                let expect = reference_greedy(&cb, xr);
                prop_assert_eq!(&codes[row * l..(row + 1) * l], expect.as_slice());
            }
        }
    }

    #[test]
    fn prop_beam_one_is_greedy_and_wider_beams_never_worse(
        (l, k, d, cbv) in codebook_strategy(), n in 0usize..30, beam in 2usize..9, seed in any::<u64>()
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = random_vec(&mut rng, n * d, 4.0);
        let cb = RqCodebooks::new(cbv, l, k, d).unwrap();
        let greedy = cb.encode(&x, 1).unwrap();
        let beamed = cb.encode(&x, beam).unwrap();
        prop_assert!(beamed.iter().all(|&c| (c as usize) < k));
        for (row, xr) in x.chunks_exact(d).enumerate() {
            let g = cb.squared_error(xr, &greedy[row * l..(row + 1) * l]);
            let b = cb.squared_error(xr, &beamed[row * l..(row + 1) * l]);
            prop_assert!(b <= g, "row {}: beam {} > greedy {}", row, b, g);
        }
    }

    #[test]
    fn prop_decode_of_encode((l, k, d, cbv) in codebook_strategy(), n in 0usize..30, seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let cb = RqCodebooks::new(cbv, l, k, d).unwrap();
        // decode is the level-ordered sum of the codes.
        let codes: Vec<u16> = (0..n * l).map(|_| rng.gen_range(0..k) as u16).collect();
        let decoded = cb.decode(&codes).unwrap();
        for (row, v) in decoded.chunks_exact(d).enumerate() {
            let mut expect = cb.code(0, codes[row * l] as usize).to_vec();
            for level in 1..l {
                for (e, c) in expect.iter_mut().zip(cb.code(level, codes[row * l + level] as usize)) {
                    *e += c;
                }
            }
            prop_assert_eq!(v, expect.as_slice());
        }
        // Encoding a decoded vector cannot do worse than the codes it came from, and a
        // decoded vector of a one-level encoding is re-encoded to a code at the same distance.
        let x = decoded;
        let re = cb.encode(&x, 1).unwrap();
        if l == 1 {
            for (row, xr) in x.chunks_exact(d).enumerate() {
                prop_assert!(cb.squared_error(xr, &re[row..row + 1]) <= 1e-4 * (1.0 + kernel::squared_norm(xr)));
            }
        }
    }
}
