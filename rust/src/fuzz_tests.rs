//! Fuzz targets that stay in the suite (issue 16.5): adversarial inputs to the index file parser
//! and the constraint automaton. Bounded in `cargo test` (CI); `make fuzz` multiplies every
//! proptest's case count through `GR2_FUZZ_SCALE` (see [`crate::fuzz_cases`] and docs/fuzzing.md).

use proptest::prelude::*;

use crate::constraint::tests::token_map;
use crate::constraint::{DecodeState, Framing, ReasoningStart};
use crate::index::SidIndex;
use crate::{fuzz_cases, Gr2Error};

/// A small valid index file: `n` items over `levels` levels of 4 codes (collisions repaired).
fn index_bytes(n: usize, levels: usize, seed: u64) -> Vec<u8> {
    let ids: Vec<u64> = (0..n as u64).map(|i| i * 7 + seed % 5).collect();
    let codes: Vec<u16> = (0..n * levels).map(|j| ((j as u64 * 2654435761 + seed) % 4) as u16).collect();
    SidIndex::build(&ids, &codes, levels, Some(&vec![4; levels])).unwrap().to_bytes().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases(256)))]

    /// Arbitrary bytes: the parser returns an index or a CorruptFile error, never panics.
    #[test]
    fn index_parser_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        match SidIndex::from_bytes(&bytes) {
            Ok(index) => prop_assert_eq!(index.to_bytes().unwrap(), bytes),
            Err(e) => prop_assert!(matches!(e, Gr2Error::CorruptFile(_)), "{e:?}"),
        }
    }

    /// A valid file with a random span overwritten, truncated or extended: CorruptFile, or (a
    /// no-op edit) the very same index; never a panic or a silently different index.
    #[test]
    fn index_parser_survives_spliced_files(
        n in 1usize..40, levels in 1usize..5, seed in any::<u64>(),
        at: prop::sample::Index, junk in prop::collection::vec(any::<u8>(), 0..24),
        cut: prop::sample::Index, mode in 0u8..3,
    ) {
        let good = index_bytes(n, levels, seed);
        let mut bad = good.clone();
        let start = at.index(bad.len());
        match mode {
            0 => for (i, b) in junk.iter().enumerate() {
                if start + i < bad.len() { bad[start + i] = *b; }
            },
            1 => bad.truncate(cut.index(bad.len())),
            _ => bad.extend_from_slice(&junk),
        }
        match SidIndex::from_bytes(&bad) {
            Ok(index) => prop_assert_eq!(index.to_bytes().unwrap(), good),
            Err(e) => prop_assert!(matches!(e, Gr2Error::CorruptFile(_)), "{e:?}"),
        }
    }

    /// Random tokens, allowed or not, fed to the automaton: a forbidden token is a Constraint
    /// error that leaves the state unchanged; an allowed one is accepted; the emitted items are
    /// always distinct candidates, and a finished walk emitted every candidate exactly once.
    #[test]
    fn automaton_survives_adversarial_tokens(
        levels in 1usize..4, k in 1usize..8, seed in any::<u64>(),
        tokens in prop::collection::vec(0u32..80, 0..200), think in any::<bool>(), budget in 0u32..6,
    ) {
        let tm = token_map(levels, 4, 64);
        let mut sids: Vec<Vec<u16>> = (0..4u16.pow(levels as u32))
            .map(|f| (0..levels).map(|l| (f / 4u16.pow(l as u32)) % 4).collect())
            .collect();
        let shift = (seed % sids.len() as u64) as usize;
        sids.rotate_left(shift);
        let k = k.min(sids.len());
        let cands: Vec<u64> = (0..k as u64).map(|i| 1000 + i * 3).collect();
        let codes: Vec<u16> = sids[..k].concat();
        let reasoning = if think { ReasoningStart::Think } else { ReasoningStart::Disabled };
        let framing = Framing { reasoning, max_reasoning_tokens: budget, answer_tags: true };
        let mut st = DecodeState::rerank(tm.clone(), &cands, &codes, framing).unwrap();
        for t in tokens {
            let before = (st.allowed().unwrap(), st.emitted().to_vec());
            if st.allows(t) {
                prop_assert!(st.advance(t).is_ok());
            } else {
                prop_assert!(matches!(st.advance(t), Err(Gr2Error::Constraint(_))));
                prop_assert_eq!((st.allowed().unwrap(), st.emitted().to_vec()), before);
            }
            let mut seen = st.emitted().to_vec();
            prop_assert!(seen.iter().all(|i| cands.contains(i)));
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), st.emitted().len());
            prop_assert!(!st.allowed().unwrap().is_empty(), "the automaton dead-ended");
            if st.is_done() {
                prop_assert_eq!(st.emitted().len(), k);
            }
        }
    }
}
