//! Criterion benchmark of RQ greedy encoding (pure Rust, no Python): n = 100k and 1M items,
//! D = 32, L = 4, K = 256 (the target shape). Throughput is reported in items/s.
//! Run: `cargo bench --bench rq` (set GR2_BENCH_QUICK=1 to run only n = 100k).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gr2::rq::{Kernel, RqCodebooks};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const D: usize = 32;
const L: usize = 4;
const K: usize = 256;

fn gaussian_like(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    // Sum of uniforms: cheap, roughly normal, enough for a timing workload.
    (0..len)
        .map(|_| (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>() * scale)
        .collect()
}

fn bench_encode(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let codebooks: Vec<f32> = (0..L)
        .flat_map(|level| gaussian_like(&mut rng, K * D, 0.5f32.powi(level as i32)))
        .collect();
    let sizes: &[usize] = if std::env::var_os("GR2_BENCH_QUICK").is_some() {
        &[100_000]
    } else {
        &[100_000, 1_000_000]
    };
    let mut group = c.benchmark_group("rq_encode_d32_l4_k256");
    group.sample_size(10);
    for &n in sizes {
        let x = gaussian_like(&mut rng, n * D, 1.0);
        group.throughput(Throughput::Elements(n as u64));
        for kernel in [Kernel::Avx2Fma, Kernel::Portable] {
            if !kernel.is_supported() {
                continue;
            }
            let cb = RqCodebooks::with_kernel(codebooks.clone(), L, K, D, kernel)
                .expect("valid codebooks");
            group.bench_with_input(
                BenchmarkId::new(format!("greedy_{kernel:?}"), n),
                &x,
                |b, x| b.iter(|| cb.encode(x, 1).expect("encode")),
            );
        }
        if n == sizes[0] {
            let cb = RqCodebooks::new(codebooks.clone(), L, K, D).expect("valid codebooks");
            let x_small = &x[..10_000 * D];
            group.throughput(Throughput::Elements(10_000));
            group.bench_function(BenchmarkId::new("beam4", 10_000), |b| {
                b.iter(|| cb.encode(x_small, 4).expect("encode"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_encode);
criterion_main!(benches);
