"""Times gr2.sid.diagnostics.sid_diagnostics on a synthetic catalogue.

    python benches/bench_sid_diagnostics.py                   # 1M items, L = 4, K = 256, D = 384
    python benches/bench_sid_diagnostics.py --n 100000 --samples 100

Three timings: the code figures alone (utilisation, perplexity, aliasing, fan-out, repair moves,
popularity; no embeddings), then neighbour agreement at each --samples (the full call minus the
code-figure time). Baseline in the same run: one plain float32 matmul of the sampled rows against
the whole catalogue (the floor of any exact cosine k-NN), so the ratio shows what the chunked
top-k, self-exclusion and prefix bookkeeping add on top.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np

from gr2.sid.diagnostics import sid_diagnostics


def best_of(repeat, fn):
    best, result = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n, levels, K = args.n, args.levels, args.codebook_size
    codes = rng.integers(0, K, size=(n, levels), dtype=np.uint16)
    codes[: n // 100, :] = codes[0]  # 1% of items in one collision group
    after = codes.copy()
    after[: n // 100, -1] = rng.integers(0, K, size=n // 100)
    popularity = rng.zipf(1.5, size=n).astype(np.float64)
    embeddings = rng.standard_normal(size=(n, args.dim), dtype=np.float32)
    print(f"n = {n:,}, L = {levels}, K = {K}, D = {args.dim}, k = {args.k}, "
          f"threads = {os.environ.get('OMP_NUM_THREADS', 'default')}, best of {args.repeat}")

    code_s, diag = best_of(args.repeat, lambda: sid_diagnostics(codes, after, K, popularity=popularity))
    print(f"code figures (no embeddings):        {code_s:7.2f} s  ({n / code_s / 1e6:.2f}M items/s); "
          f"aliased {diag['aliasing']['items_aliased_fraction']:.2%}, moved {diag['repair']['items_moved']:,}")
    for sample in args.samples:
        full_s, diag = best_of(args.repeat, lambda: sid_diagnostics(
            codes, after, K, embeddings=embeddings, popularity=popularity, sample=sample, k=args.k))
        queries = np.sort(rng.choice(n, size=sample, replace=False))

        def matmul_only():
            q = embeddings[queries]
            block = max(1, (1 << 24) // sample)
            for start in range(0, n, block):
                q @ embeddings[start:start + block].T

        floor_s, _ = best_of(args.repeat, matmul_only)
        nn_s = full_s - code_s
        agreement = diag["neighbour_agreement"]["level1_agreement"]
        print(f"neighbour agreement, sample {sample:5d}:  {nn_s:7.2f} s  (full call {full_s:.2f} s; "
              f"matmul floor {floor_s:.2f} s, {nn_s / floor_s:.2f}x it); level-1 agreement {agreement:.4f}")


if __name__ == "__main__":
    main()
