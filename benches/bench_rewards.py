"""Benchmark gr2.verify_rewards against the pure-Python reference (tests/_reward_reference.py).

K = 10 candidates with 4-level SIDs, completions of about 1 KB (reasoning + ten SIDs), 90% valid
permutations and 10% truncated. Both run in this process on the same data; prints completions/s
and the ratio. Run: python benches/bench_rewards.py [--rows N] [--ref-rows N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import _reward_reference as ref  # noqa: E402

import gr2  # noqa: E402
from gr2.tokens import sid_to_text  # noqa: E402

K, L = 10, 4
WORDS = ["the", "user", "watched", "thrillers", "and", "<s_a_12>", "comedy", "recently", "so", "candidate"]


def make_data(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    items = np.arange(rows * K, dtype=np.uint64).reshape(rows, K)
    sids = rng.integers(0, 256, size=(rows, K, L), dtype=np.uint16)
    sids[:, :, 0] = np.arange(K)  # distinct within a row
    targets = items[np.arange(rows), rng.integers(0, K, rows)]
    think = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 80))[:440]
    texts = []
    for row in range(rows):
        order = rng.permutation(K)
        text = f"<think>{think}</think><answer>" + "".join(sid_to_text(s) for s in sids[row, order]) + "</answer>"
        texts.append(text[:-20] if rng.random() < 0.1 else text)
    return texts, items, sids, targets


def best_of(fn, repeats: int) -> tuple[float, float]:
    """Best wall time and best CPU time (all threads) over ``repeats`` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--ref-rows", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    texts, items, sids, targets = make_data(args.rows)
    mean_len = sum(map(len, texts)) / len(texts)
    print(f"{args.rows} completions, K={K}, L={L}, mean {mean_len:.0f} bytes; "
          f"{os.cpu_count()} cpus visible, RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}")

    t_gr2, cpu_gr2 = best_of(lambda: gr2.verify_rewards(texts, items, targets, candidate_sids=sids, trailers=()), args.repeats)
    n = args.ref_rows
    t_ref, cpu_ref = best_of(lambda: ref.verify_texts(texts[:n], items[:n], sids[:n], targets[:n]), 1)
    # the two agree on the compared rows
    rb = gr2.verify_rewards(texts[:n], items[:n], targets[:n], candidate_sids=sids[:n], trailers=())
    rows = ref.verify_texts(texts[:n], items[:n], sids[:n], targets[:n])
    assert np.array_equal(rb.reward, [r["reward"] for r in rows])

    gr2_rate, ref_rate = args.rows / t_gr2, n / t_ref
    print(f"gr2.verify_rewards : {gr2_rate:12,.0f} completions/s  ({t_gr2 * 1e3:.1f} ms for {args.rows})")
    print(f"python reference   : {ref_rate:12,.0f} completions/s  ({t_ref * 1e3:.1f} ms for {n})")
    print(f"ratio              : {gr2_rate / ref_rate:.1f}x (wall time, same process)")
    # On a shared machine wall time depends on the other load; CPU time does not.
    print(f"per CPU-second     : gr2 {args.rows / cpu_gr2:,.0f}, reference {n / cpu_ref:,.0f} completions "
          f"(ratio {(args.rows / cpu_gr2) / (n / cpu_ref):.1f}x); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
