use std::sync::Arc;

use super::*;
use proptest::prelude::*;

/// Vocabulary layout for tests: 0..20 text, 20..27 tags, then codes (also used by `fuzz_tests`).
pub(crate) fn token_map(levels: usize, size: usize, vocab: usize) -> Arc<TokenMap> {
    let mut next = 27i64;
    let code_ids = (0..levels)
        .map(|_| {
            (0..size)
                .map(|_| {
                    next += 1;
                    next - 1
                })
                .collect()
        })
        .collect();
    Arc::new(
        TokenMap::new(TokenMapSpec {
            code_ids,
            sid_begin: 20,
            sid_end: 21,
            think_open: 22,
            think_close: 23,
            answer_open: 24,
            answer_close: 25,
            eos: Some(26),
            vocab_size: vocab.max(27 + levels * size),
            reasoning_vocab: None,
            forbidden_in_reasoning: vec![0],
        })
        .unwrap(),
    )
}

/// Reference: the set of allowed tokens computed naively from the emitted prefix.
fn reference_allowed(tm: &TokenMap, cands: &[Vec<u16>], used: &[bool], prefix: &[u16]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    let l = prefix.len();
    if l == tm.levels {
        return vec![tm.sid_end];
    }
    for (c, u) in cands.iter().zip(used) {
        if !u && c[..l] == *prefix {
            out.push(tm.code_ids[l][c[l] as usize]);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn run_greedy_walk(tm: &Arc<TokenMap>, cands: &[Vec<u16>], choices: &[usize]) {
    let k = cands.len();
    let ids: Vec<u64> = (0..k as u64).map(|i| i * 7 + 3).collect();
    let flat: Vec<u16> = cands.iter().flatten().copied().collect();
    let framing = Framing { reasoning: ReasoningStart::Disabled, max_reasoning_tokens: 0, answer_tags: true };
    let mut st = DecodeState::rerank(tm.clone(), &ids, &flat, framing).unwrap();
    assert_eq!(st.allowed().unwrap(), vec![tm.answer_open]);
    st.advance(tm.answer_open).unwrap();
    let mut used = vec![false; k];
    let mut pick = choices.iter().cycle();
    for _ in 0..k {
        assert_eq!(st.allowed().unwrap(), vec![tm.sid_begin]);
        st.advance(tm.sid_begin).unwrap();
        let mut prefix = Vec::new();
        loop {
            let expect = reference_allowed(tm, cands, &used, &prefix);
            let got = st.allowed().unwrap();
            assert_eq!(got, expect);
            let mut row = vec![0u32; tm.words()];
            st.fill_row(&mut row).unwrap();
            let from_row: Vec<u32> =
                (0..tm.vocab_size as u32).filter(|&t| row[t as usize / 32] >> (t % 32) & 1 == 1).collect();
            assert_eq!(from_row, expect);
            let tok = got[*pick.next().unwrap() % got.len()];
            st.advance(tok).unwrap();
            if tok == tm.sid_end {
                break;
            }
            prefix.push(tm.code_of(tok).unwrap().1);
        }
        let idx = cands.iter().zip(&used).position(|(c, u)| !u && *c == prefix).unwrap();
        used[idx] = true;
        assert_eq!(*st.emitted().last().unwrap(), ids[idx]);
    }
    assert_eq!(st.allowed().unwrap(), vec![tm.answer_close]);
    st.advance(tm.answer_close).unwrap();
    assert_eq!(st.allowed().unwrap(), vec![tm.eos.unwrap()]);
    st.advance(tm.eos.unwrap()).unwrap();
    assert!(st.is_done());
    let mut e = st.emitted().to_vec();
    e.sort_unstable();
    assert_eq!(e, ids);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(256)))]

    #[test]
    fn rerank_matches_reference(
        levels in 1usize..4,
        raw in prop::collection::btree_set(prop::collection::vec(0u16..3, 3), 1..12),
        choices in prop::collection::vec(0usize..100, 1..20),
    ) {
        let tm = token_map(levels, 3, 100);
        let mut cands: Vec<Vec<u16>> = raw.into_iter().map(|c| c[..levels].to_vec()).collect();
        cands.sort();
        cands.dedup();
        run_greedy_walk(&tm, &cands, &choices);
    }
}

#[test]
fn reasoning_budget_forces_think_close() {
    let tm = token_map(2, 4, 70);
    let framing = Framing { reasoning: ReasoningStart::Think, max_reasoning_tokens: 3, answer_tags: true };
    let mut st = DecodeState::rerank(tm.clone(), &[5, 6], &[0, 1, 2, 3], framing).unwrap();
    assert!(st.advance(1).is_err());
    st.advance(tm.think_open).unwrap();
    assert!(st.is_free());
    assert!(!st.allows(0) && !st.allows(tm.eos.unwrap()) && !st.allows(tm.answer_open) && st.allows(tm.think_close));
    for t in [1, 2, 3] {
        st.advance(t).unwrap();
    }
    assert!(!st.is_free());
    assert_eq!(st.allowed().unwrap(), vec![tm.think_close]);
    assert!(matches!(st.advance(4), Err(Gr2Error::Constraint(_))));
    st.advance(tm.think_close).unwrap();
    assert_eq!(st.allowed().unwrap(), vec![tm.answer_open]);
}

#[test]
fn duplicates_and_bad_codes_rejected() {
    let tm = token_map(2, 4, 70);
    let f = Framing::default();
    assert!(matches!(DecodeState::rerank(tm.clone(), &[5, 5], &[0, 1, 2, 3], f), Err(Gr2Error::InvalidInput(_))));
    assert!(matches!(DecodeState::rerank(tm.clone(), &[5, 6], &[0, 1, 0, 1], f), Err(Gr2Error::InvalidInput(_))));
    assert!(matches!(DecodeState::rerank(tm.clone(), &[5, 6], &[0, 1, 0, 9], f), Err(Gr2Error::InvalidInput(_))));
    assert!(matches!(DecodeState::rerank(tm, &[], &[], f), Err(Gr2Error::InvalidInput(_))));
}

#[test]
fn catalog_excludes_and_never_dead_ends() {
    let tm = token_map(2, 3, 60);
    // Items 0..9 with SIDs (a, b) for a, b in 0..3.
    let items: Vec<u64> = (0..9).collect();
    let codes: Vec<u16> = (0..9).flat_map(|i| [i as u16 / 3, i as u16 % 3]).collect();
    let trie = Arc::new(SidTrie::build(&items, &codes, 2).unwrap());
    let framing = Framing { reasoning: ReasoningStart::Disabled, max_reasoning_tokens: 0, answer_tags: false };
    // Exclude the whole first subtree (0, *): its level-0 code must disappear.
    let mut st = DecodeState::catalog(tm.clone(), trie.clone(), 6, &[0, 1, 2, 42], framing).unwrap();
    for _ in 0..6 {
        st.advance(tm.sid_begin).unwrap();
        let first = st.allowed().unwrap();
        assert!(!first.contains(&tm.code_ids[0][0]));
        st.advance(first[0]).unwrap();
        let second = st.allowed().unwrap();
        st.advance(second[0]).unwrap();
        st.advance(tm.sid_end).unwrap();
    }
    assert_eq!(st.allowed().unwrap(), vec![tm.eos.unwrap()]);
    let mut e = st.emitted().to_vec();
    e.sort_unstable();
    assert_eq!(e, vec![3, 4, 5, 6, 7, 8]);
    assert!(matches!(
        DecodeState::catalog(tm, trie, 7, &[0, 1, 2], framing),
        Err(Gr2Error::Constraint(_))
    ));
}

#[test]
fn batch_calls_are_all_or_nothing() {
    let tm = token_map(1, 4, 64);
    let f = Framing { reasoning: ReasoningStart::Disabled, max_reasoning_tokens: 0, answer_tags: true };
    let s = DecodeState::rerank(tm.clone(), &[1, 2], &[0, 1], f).unwrap();
    let mut states = vec![s.clone(), s];
    let err = advance_rows(&mut states, &[0, 1], &[tm.answer_open as i64, 3]);
    assert!(matches!(err, Err(Gr2Error::Constraint(_))));
    assert_eq!(states[0].allowed().unwrap(), vec![tm.answer_open]);
    let mut out = vec![0u32; 2 * tm.words()];
    fill_bitmask(&states, &[1, 0], &mut out, tm.words()).unwrap();
    assert_eq!(out[tm.answer_open as usize / 32], 1 << (tm.answer_open % 32));
    let (off, ids, free) = allowed_lists(&states, &[0, 1]).unwrap();
    assert_eq!(off, vec![0, 1, 2]);
    assert_eq!(ids, vec![tm.answer_open as i32; 2]);
    assert_eq!(free, vec![false, false]);
}

#[test]
fn catalog_refuses_a_token_map_without_a_token_for_each_trie_code() {
    // codes 0..8 at one level: a map with 3 codes per level cannot spell codes 3..7
    let items: Vec<u64> = (0..8).collect();
    let codes: Vec<u16> = (0..8).collect();
    let trie = Arc::new(SidTrie::build(&items, &codes, 1).unwrap());
    assert_eq!(trie.level_code_bounds, vec![8]);
    let framing = Framing { reasoning: ReasoningStart::Disabled, max_reasoning_tokens: 0, answer_tags: false };
    let narrow = token_map(1, 3, 40);
    match DecodeState::catalog(narrow, trie.clone(), 1, &[], framing) {
        Err(Gr2Error::InvalidInput(m)) => assert!(m.contains("code 7 at level 0 has no token"), "{m}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let two_levels = token_map(2, 8, 40);
    assert!(matches!(DecodeState::catalog(two_levels, trie.clone(), 1, &[], framing), Err(Gr2Error::InvalidInput(_))));
    let wide = token_map(1, 8, 40);
    let mut st = DecodeState::catalog(wide.clone(), trie, 1, &[], framing).unwrap();
    st.advance(wide.sid_begin).unwrap();
    assert_eq!(st.allowed().unwrap(), wide.code_ids[0]);
}
