//! Unit and property tests of the reward verifier. The full reference comparison lives in
//! tests/test_rewards.py (Python reference); here we check the properties that need no reference:
//! valid permutations score per the formulas, text and token ids agree, truncation is always
//! malformed, and arbitrary bytes never panic.

use super::*;
use crate::constraint::TokenMapSpec;
use proptest::prelude::*;

type TokenRows<'a> = Completions<'a, &'a str>;

const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

fn sid_text(sid: &[u16]) -> String {
    let mut s = String::from("<|sid_begin|>");
    for (level, code) in sid.iter().enumerate() {
        s.push_str(&format!("<s_{}_{}>", LETTERS[level] as char, code));
    }
    s.push_str("<|sid_end|>");
    s
}

/// Tags 1..=6 (think_open, think_close, answer_open, answer_close, sid_begin, sid_end), code
/// (level, code) -> 100 + level * 16 + code; no EOS (a verification-only map).
fn token_map(levels: usize) -> TokenMap {
    TokenMap::new(TokenMapSpec {
        code_ids: (0..levels).map(|level| (0..16).map(|code| 100 + (level * 16 + code) as i64).collect()).collect(),
        think_open: 1,
        think_close: 2,
        answer_open: 3,
        answer_close: 4,
        sid_begin: 5,
        sid_end: 6,
        eos: None,
        vocab_size: 100 + levels * 16,
        reasoning_vocab: None,
        forbidden_in_reasoning: vec![],
    })
    .unwrap()
}

/// Token-id completions over `map` with whitespace id 7 and trailer id 8.
fn token_rows<'a>(ids: &'a [i64], offsets: &'a [usize], map: &'a TokenMap) -> TokenRows<'a> {
    TokenRows::Tokens { ids, offsets, map, whitespace: &[7], trailers: &[8] }
}

fn sid_ids(sid: &[u16]) -> Vec<i64> {
    let mut ids = vec![5];
    ids.extend(sid.iter().enumerate().map(|(level, &c)| 100 + (level * 16) as i64 + c as i64));
    ids.push(6);
    ids
}

struct Batch {
    k: usize,
    levels: usize,
    items: Vec<u64>,
    sids: Vec<u16>,
    targets: Vec<u64>,
}

impl Batch {
    fn cands(&self) -> Candidates<'_> {
        Candidates {
            rows: self.targets.len(),
            k: self.k,
            levels: self.levels,
            items: &self.items,
            sids: &self.sids,
            targets: &self.targets,
            relevance: None,
            offsets: None,
        }
    }
    fn sid(&self, row: usize, col: usize) -> &[u16] {
        let start = (row * self.k + col) * self.levels;
        &self.sids[start..start + self.levels]
    }
}

/// One row of K candidates whose SIDs are (col, col+1, ...) mod 16 across levels: all distinct.
fn batch(k: usize, levels: usize, target_col: usize) -> Batch {
    let sids = (0..k).flat_map(|c| (0..levels).map(move |l| ((c + l * 3) % 16) as u16)).collect::<Vec<_>>();
    Batch { k, levels, items: (0..k as u64).map(|c| 1000 + c).collect(), sids, targets: vec![1000 + target_col as u64] }
}

fn run_text(texts: &[String], b: &Batch, cfg: &RewardConfig) -> RewardOutput {
    let trailers = vec!["<|im_end|>".to_string()];
    verify(&Completions::Text { texts, trailers: &trailers }, &b.cands(), None, cfg).unwrap()
}

#[test]
fn copy_of_input_order_gets_no_format_reward_unless_target_first() {
    let b = batch(5, 2, 2);
    let text = format!("<answer>{}</answer>", (0..5).map(|c| sid_text(b.sid(0, c))).collect::<String>());
    let cond = run_text(&[text.clone()], &b, &RewardConfig::default());
    assert!(cond.valid[0] && cond.copied_order[0]);
    assert_eq!(cond.reward[0], 0.0);
    let uncond = run_text(&[text], &b, &RewardConfig { conditional: false, ..Default::default() });
    assert_eq!(uncond.reward[0], 0.2);
}

#[test]
fn errors_for_bad_inputs() {
    let b = batch(3, 2, 0);
    let mut bad = b.cands();
    bad.targets = &[5];
    let texts: Vec<String> = vec!["".into()];
    let trailers = vec![];
    let c = Completions::Text { texts: &texts, trailers: &trailers };
    assert!(matches!(verify(&c, &bad, None, &RewardConfig::default()), Err(Gr2Error::UnknownItem(_))));
    let cfg = RewardConfig { metric_ks: vec![], ..Default::default() };
    assert!(matches!(verify(&c, &b.cands(), None, &cfg), Err(Gr2Error::InvalidInput(_))));
    assert!(Catalog::new(&[2, 1], 1).is_err());
    // whitespace/trailer ids that are tags or codes, or both at once; a map of other levels
    let map = token_map(2);
    let (ids, offsets) = ([3i64, 4], [0usize, 2]);
    let bad: [(&[i64], &[i64]); 4] = [(&[3], &[]), (&[], &[100]), (&[9], &[9]), (&[-2], &[])];
    for (whitespace, trailers) in bad {
        let rows = TokenRows::Tokens { ids: &ids, offsets: &offsets, map: &map, whitespace, trailers };
        assert!(matches!(verify(&rows, &b.cands(), None, &RewardConfig::default()), Err(Gr2Error::InvalidInput(_))));
    }
    let rows = token_rows(&ids, &offsets, &map);
    assert!(verify(&rows, &b.cands(), None, &RewardConfig::default()).is_ok());
    let three_levels = token_map(3);
    let rows = token_rows(&ids, &offsets, &three_levels);
    assert!(matches!(verify(&rows, &b.cands(), None, &RewardConfig::default()), Err(Gr2Error::InvalidInput(m)) if m.contains("levels")));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(200)))]

    #[test]
    fn permutations_score_per_formula(k in 1usize..8, levels in 1usize..4, seed in any::<u64>(), target in 0usize..8, conditional in any::<bool>()) {
        let target = target % k;
        let b = batch(k, levels, target);
        let mut perm: Vec<usize> = (0..k).collect();
        let mut s = seed;
        for i in (1..k).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            perm.swap(i, (s >> 33) as usize % (i + 1));
        }
        let text = format!("<think>why</think> <answer>{}</answer>\n<|im_end|>", perm.iter().map(|&c| sid_text(b.sid(0, c))).collect::<Vec<_>>().join("\n"));
        let cfg = RewardConfig { conditional, ..Default::default() };
        let out = run_text(&[text.clone()], &b, &cfg);
        prop_assert!(out.valid[0]);
        let rank_re = perm.iter().position(|&c| c == target).unwrap() + 1;
        let r_rank = ((target + 1) as f64 - rank_re as f64) / k as f64;
        prop_assert_eq!(out.rank_re[0] as usize, rank_re);
        prop_assert_eq!(out.r_rank[0], r_rank);
        let earns = !conditional || r_rank > 0.0 || (target == 0 && rank_re == 1);
        prop_assert_eq!(out.reward[0], if earns { r_rank + 0.2 } else { r_rank });
        prop_assert_eq!(out.copied_order[0], perm.iter().enumerate().all(|(i, &c)| i == c));
        // token ids of the same completion give the same result
        let mut ids = vec![1, 42, 2, 7, 3];
        for &c in &perm { ids.extend(sid_ids(b.sid(0, c))); ids.push(7); }
        ids.extend([4, 8]);
        let map = token_map(levels);
        let offsets = [0, ids.len()];
        let tok = verify(&token_rows(&ids, &offsets, &map), &b.cands(), None, &cfg).unwrap();
        prop_assert_eq!(&tok, &out);
        // every strict prefix of "...</answer>" is a truncated, malformed output
        let end = text.find("</answer>").unwrap() + "</answer>".len();
        let cut = (seed as usize) % end;
        let truncated = run_text(&[text[..cut].to_string()], &b, &cfg);
        prop_assert_eq!(truncated.invalid_reason[0], InvalidReason::Malformed as u8);
        prop_assert_eq!(truncated.reward[0], -1.0);
    }

    #[test]
    fn arbitrary_text_never_panics(s in ".{0,200}", fragments in proptest::collection::vec(prop_oneof![
        Just("<think>"), Just("</think>"), Just("<answer>"), Just("</answer>"), Just("<|sid_begin|>"),
        Just("<|sid_end|>"), Just("<s_a_0>"), Just("<s_b_3>"), Just("<s_a_65536>"), Just("<s_"), Just(" "), Just("é")], 0..40)) {
        let b = batch(3, 2, 1);
        let texts = vec![s, fragments.concat()];
        let two = Batch { targets: vec![1001, 1001], items: b.items.repeat(2), sids: b.sids.repeat(2), ..b };
        let out = run_text(&texts, &two, &RewardConfig::default());
        for row in 0..2 {
            prop_assert_eq!(out.valid[row], out.invalid_reason[row] == 0);
        }
    }

    #[test]
    fn arbitrary_token_ids_never_panic(ids in proptest::collection::vec(-3i64..140, 0..60)) {
        let b = batch(3, 2, 1);
        let map = token_map(2);
        let offsets = [0, ids.len()];
        let out = verify(&token_rows(&ids, &offsets, &map), &b.cands(), None, &RewardConfig::default()).unwrap();
        prop_assert_eq!(out.valid[0], out.invalid_reason[0] == 0);
    }
}

/// Tag-like text inside the think body (spelled by ordinary pieces, or real tags) is free text on
/// both paths: the answer block is the last `<answer>`.
#[test]
fn think_body_is_free_text_on_both_paths() {
    let b = batch(2, 2, 0);
    let answer = format!("<answer>{}{}</answer>", sid_text(b.sid(0, 1)), sid_text(b.sid(0, 0)));
    let cfg = RewardConfig::default();
    for body in ["<answer>", "</think>", "<think>", "</answer> x <answer>", ""] {
        let text = format!(" <think>{body}</think>\n{answer}");
        assert_eq!(run_text(&[text.clone()], &b, &cfg).invalid_reason[0], 0, "{text}");
    }
    for bad in [format!("x{answer}"), format!("<think>{answer}"), format!("<think>a</think>b{answer}"),
                format!("{answer}<answer>"), format!("<think></think>{answer}{answer}")] {
        assert_eq!(run_text(&[bad.clone()], &b, &cfg).invalid_reason[0], 1, "{bad}");
    }
    // token ids: a real <answer> (3) and </think> (2) inside the body, whitespace (7) around
    let map = token_map(2);
    let mut ids = vec![7, 1, 3, 42, 2, 9, 2, 7, 3];
    ids.extend(sid_ids(b.sid(0, 1)));
    ids.extend(sid_ids(b.sid(0, 0)));
    ids.push(4);
    let offsets = [0, ids.len()];
    let tok = verify(&token_rows(&ids, &offsets, &map), &b.cands(), None, &cfg).unwrap();
    assert_eq!(tok.invalid_reason[0], 0);
    let no_close = vec![1, 42, 3, 5, 100, 116, 6, 4];
    let offsets = [0, no_close.len()];
    let tok = verify(&token_rows(&no_close, &offsets, &map), &b.cands(), None, &cfg).unwrap();
    assert_eq!(tok.invalid_reason[0], 1);
}

#[test]
fn ragged_rows_score_against_their_own_k() {
    // row 0: K = 1, row 1: K = 3 (flat arrays with offsets)
    let one = batch(1, 2, 0);
    let three = batch(3, 2, 2);
    let items: Vec<u64> = one.items.iter().chain(&three.items).copied().collect();
    let sids: Vec<u16> = one.sids.iter().chain(&three.sids).copied().collect();
    let targets = vec![1000, 1002];
    let offsets = [0usize, 1, 4];
    let cands = Candidates { rows: 2, k: 3, levels: 2, items: &items, sids: &sids, targets: &targets, relevance: None,
                             offsets: Some(&offsets) };
    let texts = vec![
        format!("<answer>{}</answer>", sid_text(one.sid(0, 0))),
        format!("<answer>{}{}{}</answer>", sid_text(three.sid(0, 2)), sid_text(three.sid(0, 0)), sid_text(three.sid(0, 1))),
    ];
    let trailers: Vec<String> = vec![];
    let out = verify(&Completions::Text { texts: &texts, trailers: &trailers }, &cands, None, &RewardConfig::default()).unwrap();
    assert_eq!(out.invalid_reason, vec![0, 0]);
    assert_eq!(out.ranking, vec![1000, NO_ITEM, NO_ITEM, 1002, 1000, 1001]);
    assert_eq!(out.rank_re, vec![1, 1]);
    assert!((out.r_rank[1] - 2.0 / 3.0).abs() < 1e-12);
    let empty_row = [0usize, 1, 1];
    let bad = Candidates { offsets: Some(&empty_row), ..cands };
    let err = verify(&Completions::Text { texts: &texts, trailers: &trailers }, &bad, None, &RewardConfig::default());
    assert!(matches!(err, Err(Gr2Error::InvalidInput(m)) if m.contains("request 1")));
}

/// `parse_completions` gives the verifier's parse with its spans: the double-`</think>` trace (a
/// `</think>` inside the reasoning) splits at the last `</think>` before the answer, and the SIDs'
/// spans and codes are those of the answer.
#[test]
fn completion_parts_of_a_double_think_close() {
    let b = batch(2, 2, 0);
    let (s1, s0) = (sid_text(b.sid(0, 1)), sid_text(b.sid(0, 0)));
    let text = format!("<think>a </think> b</think>\n<answer>{s1} {s0}</answer> <|im_end|>");
    let texts = vec![text.clone(), "<think>x</think><answer><|sid_begin|><s_a_1></answer>".to_string()];
    let trailers = vec!["<|im_end|>".to_string()];
    let parts = parse_completions(&Completions::Text { texts: &texts, trailers: &trailers }, None).unwrap();
    let p = parts[0].as_ref().unwrap();
    let think_end = text.rfind("</think>").unwrap() + "</think>".len();
    assert_eq!(p.think, Some((0, think_end)));
    let answer = text.find("<answer>").unwrap();
    assert_eq!(p.answer, (answer, text.find("</answer>").unwrap() + "</answer>".len()));
    assert_eq!(p.levels, 2);
    assert_eq!(&text[p.sids[0].0..p.sids[0].1], s1);
    assert_eq!(&text[p.sids[1].0..p.sids[1].1], s0);
    assert_eq!(p.codes, [b.sid(0, 1), b.sid(0, 0)].concat());
    assert!(parts[1].is_none());
    assert_eq!(run_text(&[text], &b, &RewardConfig::default()).invalid_reason[0], 0);
    // token ids: spans are token positions
    let map = token_map(2);
    let mut ids = vec![1, 42, 2, 9, 2, 7, 3];
    ids.extend(sid_ids(b.sid(0, 1)));
    ids.push(4);
    let offsets = [0, ids.len()];
    let tok = parse_completions(&token_rows(&ids, &offsets, &map), None).unwrap();
    let p = tok[0].as_ref().unwrap();
    assert_eq!((p.think, p.answer, p.sids.clone()), (Some((0, 5)), (6, 12), vec![(7, 11)]));
    let bad_levels = parse_completions(&Completions::Text { texts: &texts, trailers: &trailers }, Some(0));
    assert!(matches!(bad_levels, Err(Gr2Error::InvalidInput(_))));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(200)))]

    /// On any mix of tags, SIDs and text, `parse_completions` accepts exactly what `verify` does
    /// not call malformed, and parses the same SIDs.
    #[test]
    fn completion_parts_agree_with_verify(fragments in proptest::collection::vec(prop_oneof![
        Just("<think>"), Just("</think>"), Just("<answer>"), Just("</answer>"), Just(" "), Just("x"),
        Just("<|sid_begin|><s_a_0><s_b_3><|sid_end|>"), Just("<|sid_begin|><s_a_1><s_b_4><|sid_end|>"),
        Just("<|sid_begin|><s_a_1><|sid_end|>"), Just("<|im_end|>")], 0..16)) {
        let b = batch(2, 2, 0);
        let texts = vec![fragments.concat()];
        let trailers = vec!["<|im_end|>".to_string()];
        let out = run_text(&texts, &b, &RewardConfig::default());
        let parts = parse_completions(&Completions::Text { texts: &texts, trailers: &trailers }, Some(2)).unwrap();
        prop_assert_eq!(parts[0].is_some(), out.invalid_reason[0] != InvalidReason::Malformed as u8);
        if let Some(p) = &parts[0] {
            prop_assert_eq!(p.codes.len() / 2, out.n_sids[0] as usize);
            prop_assert!(p.sids.iter().all(|&(s, e)| texts[0][s..e].starts_with("<|sid_begin|>") && texts[0][..e].ends_with("<|sid_end|>")));
        }
    }
}
