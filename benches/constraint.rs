//! Criterion bench of the constrained-decoding core: batched bitmask fill for rows inside rerank
//! answers (K = 10, 4 levels of 256 codes) at V = 49,152 and 151,936, and one advance step.
//! The Python baselines (transformers PrefixConstrainedLogitsProcessor, a Python trie) are timed
//! against the same calls in benches/bench_masks.py.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use gr2::constraint::{advance_rows, fill_bitmask, DecodeState, Framing, ReasoningStart, TokenMap, TokenMapSpec};
use rand::{rngs::StdRng, Rng, SeedableRng};

const K: usize = 10;
const LEVELS: usize = 4;
const CODES: usize = 256;
const SID_BEGIN: i64 = 1000;
const SID_END: i64 = 1001;
const ANSWER_OPEN: i64 = 1004;

fn token_map(vocab: usize) -> Arc<TokenMap> {
    let code_ids = (0..LEVELS).map(|l| (0..CODES).map(|c| (2000 + l * CODES + c) as i64).collect()).collect();
    Arc::new(
        TokenMap::new(TokenMapSpec {
            code_ids,
            sid_begin: SID_BEGIN,
            sid_end: SID_END,
            think_open: 1002,
            think_close: 1003,
            answer_open: ANSWER_OPEN,
            answer_close: 1005,
            eos: Some(1006),
            vocab_size: vocab,
            reasoning_vocab: None,
            forbidden_in_reasoning: vec![],
        })
        .unwrap(),
    )
}

/// `rows` requests, each advanced to a random point of its answer.
fn states(tm: &Arc<TokenMap>, rows: usize, rng: &mut StdRng) -> Vec<DecodeState> {
    let framing = Framing { reasoning: ReasoningStart::Disabled, max_reasoning_tokens: 0, answer_tags: true };
    (0..rows)
        .map(|r| {
            let items: Vec<u64> = (0..K as u64).map(|i| r as u64 * 100 + i).collect();
            let first: u16 = rng.gen_range(0..CODES as u16);
            let codes: Vec<u16> = (0..K * LEVELS)
                .map(|j| if j % LEVELS == 0 { first } else { rng.gen_range(0..CODES as u16) })
                .collect();
            let mut st = DecodeState::rerank(tm.clone(), &items, &codes, framing).unwrap();
            let stop = rng.gen_range(1..K * (LEVELS + 2));
            let mut seq = vec![ANSWER_OPEN];
            for k in 0..K {
                seq.push(SID_BEGIN);
                for l in 0..LEVELS {
                    seq.push(tm.code_ids[l][codes[k * LEVELS + l] as usize] as i64);
                }
                seq.push(SID_END);
            }
            for &tok in &seq[..stop] {
                st.advance(tok as u32).unwrap();
            }
            st
        })
        .collect()
}

fn bench_fill(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    for vocab in [49_152usize, 151_936] {
        let tm = token_map(vocab);
        let mut group = c.benchmark_group(format!("fill_bitmask/V={vocab}"));
        for rows in [1usize, 8, 64, 512] {
            let st = states(&tm, rows, &mut rng);
            let idx: Vec<usize> = (0..rows).collect();
            let mut out = vec![0u32; rows * tm.words()];
            group.bench_with_input(BenchmarkId::from_parameter(rows), &rows, |b, _| {
                b.iter(|| fill_bitmask(black_box(&st), &idx, &mut out, tm.words()).unwrap())
            });
        }
        group.finish();
    }
}

fn bench_advance(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let tm = token_map(49_152);
    let st = states(&tm, 64, &mut rng);
    let idx: Vec<usize> = (0..64).collect();
    // The first allowed token of each row, so the step is legal.
    let toks: Vec<i64> = st.iter().map(|s| s.allowed().unwrap()[0] as i64).collect();
    c.bench_function("advance/64 rows", |b| {
        b.iter_batched(
            || st.clone(),
            |mut s| advance_rows(&mut s, &idx, black_box(&toks)).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench_fill, bench_advance);
criterion_main!(benches);
