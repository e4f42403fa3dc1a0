//! Criterion bench of batched reward verification: K = 10 candidates, 4-level SIDs, completions
//! of about 1 KB (a reasoning block plus ten SIDs), mostly valid permutations with some broken
//! ones. Reports completions per second on all threads and on one thread.
//! Run: cargo bench --bench reward

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gr2::reward::{verify, Candidates, Completions, RewardConfig};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

const K: usize = 10;
const L: usize = 4;
const ROWS: usize = 8192;

fn sid_text(sid: &[u16]) -> String {
    let mut s = String::from("<|sid_begin|>");
    for (level, code) in sid.iter().enumerate() {
        s.push_str(&format!("<s_{}_{}>", (b'a' + level as u8) as char, code));
    }
    s + "<|sid_end|>"
}

struct Data {
    items: Vec<u64>,
    sids: Vec<u16>,
    targets: Vec<u64>,
    texts: Vec<String>,
}

fn make_data() -> Data {
    let mut rng = StdRng::seed_from_u64(7);
    let words = ["the", "user", "watched", "thrillers", "and", "<s_a_12>", "comedy", "recently", "so", "candidate"];
    let (mut items, mut sids, mut targets, mut texts) = (vec![], vec![], vec![], vec![]);
    for row in 0..ROWS {
        for c in 0..K {
            items.push((row * K + c) as u64);
            sids.extend((0..L).map(|l| if l == 0 { c as u16 } else { rng.gen_range(0..256) }));
        }
        targets.push((row * K + rng.gen_range(0..K)) as u64);
        let mut think = String::new();
        while think.len() < 440 {
            think.push_str(words[rng.gen_range(0..words.len())]);
            think.push(' ');
        }
        let mut order: Vec<usize> = (0..K).collect();
        order.shuffle(&mut rng);
        let answer: String = order.iter().map(|&c| sid_text(&sids[(row * K + c) * L..(row * K + c + 1) * L])).collect();
        let mut text = format!("<think>{think}</think><answer>{answer}</answer>");
        if rng.gen_bool(0.1) {
            text.truncate(text.len() - 20); // some truncated outputs
        }
        texts.push(text);
    }
    Data { items, sids, targets, texts }
}

fn bench(c: &mut Criterion) {
    let data = make_data();
    let bytes: usize = data.texts.iter().map(|t| t.len()).sum();
    eprintln!("{} completions, mean {} bytes", ROWS, bytes / ROWS);
    let cands = Candidates { rows: ROWS, k: K, levels: L, items: &data.items, sids: &data.sids, targets: &data.targets, relevance: None, offsets: None };
    let trailers: Vec<String> = vec![];
    let completions = Completions::Text { texts: &data.texts, trailers: &trailers };
    let cfg = RewardConfig::default();
    let mut group = c.benchmark_group("verify_rewards");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function(format!("text_k10_1kb_{}threads", rayon::current_num_threads()), |b| {
        b.iter(|| verify(&completions, &cands, None, &cfg).unwrap())
    });
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    group.bench_function("text_k10_1kb_1thread", |b| b.iter(|| one.install(|| verify(&completions, &cands, None, &cfg).unwrap())));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
