//! `cargo bench --bench index`: SidIndex build, lookups both ways, children and load.
//! Size with GR2_BENCH_N (default 1,000,000 items; L = 4, K = 256, random codes).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gr2::index::SidIndex;
use rand::prelude::*;

const LEVELS: usize = 4;

fn dataset(n: usize, dense: bool) -> (Vec<u64>, Vec<u16>) {
    let mut rng = StdRng::seed_from_u64(0);
    let mut ids: Vec<u64> = if dense {
        (0..n as u64).collect()
    } else {
        let mut set = std::collections::HashSet::with_capacity(n);
        while set.len() < n {
            set.insert(rng.gen::<u64>());
        }
        set.into_iter().collect()
    };
    ids.shuffle(&mut rng);
    let codes = (0..n * LEVELS).map(|_| rng.gen_range(0..256u16)).collect();
    (ids, codes)
}

fn bench_index(c: &mut Criterion) {
    let n: usize = std::env::var("GR2_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let mut group = c.benchmark_group(format!("index n={n}"));
    group.sample_size(10);
    group.throughput(Throughput::Elements(n as u64));
    for dense in [false, true] {
        let kind = if dense { "dense ids" } else { "sparse ids" };
        let (ids, codes) = dataset(n, dense);
        group.bench_function(format!("build ({kind})"), |b| {
            b.iter(|| SidIndex::build(black_box(&ids), black_box(&codes), LEVELS, Some(&[256; LEVELS])).unwrap())
        });
        let index = SidIndex::build(&ids, &codes, LEVELS, Some(&[256; LEVELS])).unwrap();
        let mut queries = ids.clone();
        queries.shuffle(&mut StdRng::seed_from_u64(1));
        let mut sids = vec![0u16; n * LEVELS];
        group.bench_function(format!("ids->SIDs ({kind})"), |b| {
            b.iter(|| index.sids_into(black_box(&queries), &mut sids).unwrap())
        });
        let mut items = vec![0u64; n];
        group.bench_function(format!("SIDs->ids ({kind})"), |b| {
            b.iter(|| index.items_into(black_box(&sids), &mut items).unwrap())
        });
        assert_eq!(items, queries);
        if !dense {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("index.gr2sid");
            index.save(&path).unwrap();
            group.bench_function("load (mmap, checksum, validation)", |b| {
                b.iter(|| SidIndex::load(black_box(&path)).unwrap())
            });
            group.bench_function("children of 1000 two-level prefixes", |b| {
                b.iter_batched(
                    || (0..1000u16).map(|i| [i % 256, i / 4]).collect::<Vec<_>>(),
                    |prefixes| prefixes.iter().map(|p| index.children(p).unwrap().len()).sum::<usize>(),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_index);
criterion_main!(benches);
