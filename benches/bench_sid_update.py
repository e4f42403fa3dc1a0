"""Adding items to a SID index without changing existing SIDs vs rebuilding it, in one run.

    python benches/bench_sid_update.py                # n = 10M items (L = 4, K = 256), +1%
    python benches/bench_sid_update.py --n 2000000 --add 0.01

Times ``SidIndex.build`` over all n + m items (what a full rebuild costs, and the only way to add
items before ``extend``), ``index.extend`` of the m new items onto the index of the n old ones,
and ``index.remove`` of m items; prints the best of --repeat runs (wall and CPU seconds), the
extend / build ratio, and checks that every old SID survived and all SIDs are unique. With
``--latent-dim D`` (default 32; 0 skips it) it also times what each path must encode with
``gr2.RQCodebooks`` first (a rebuild re-encodes all n + m latents, an update only the m new ones),
once each, and prints the end-to-end ratio.
"""

from __future__ import annotations

import argparse

import numpy as np

import gr2
from bench_index import best_of  # same folder: benches run as scripts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000, help="items already in the index")
    parser.add_argument("--add", type=float, default=0.01, help="new items as a share of n")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--new-ids", choices=("random", "appended"), default="random",
                        help="new ids scattered among the old ones, or all above them (new item_idx values)")
    parser.add_argument("--latent-dim", type=int, default=32, help="also time RQ encoding of the latents (0: skip)")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    n, m = args.n, max(1, int(args.n * args.add))
    ids = np.uint64(4) * np.arange(n + m, dtype=np.uint64)  # sparse
    if args.new_ids == "random":
        ids = rng.permutation(ids)
    codes = rng.integers(0, args.codebook_size, size=(n + m, args.levels), dtype=np.uint16)
    old_ids, new_ids = ids[:n], ids[n:]
    print(f"n = {n:,} old items + m = {m:,} new ({args.add:.1%}, ids {args.new_ids}), L = {args.levels}, "
          f"K = {args.codebook_size}")

    (build_all, build_all_cpu), _ = best_of(args.repeat, lambda: gr2.SidIndex.build(ids, codes, args.codebook_size))
    base = gr2.SidIndex.build(old_ids, codes[:n], args.codebook_size)
    (extend, extend_cpu), after = best_of(args.repeat, lambda: base.extend(new_ids, codes[n:]))
    (remove, remove_cpu), _ = best_of(args.repeat, lambda: after.remove(new_ids))

    encode_all = encode_new = 0.0
    if args.latent_dim:
        codebooks = gr2.RQCodebooks(rng.standard_normal((args.levels, args.codebook_size, args.latent_dim), dtype=np.float32))
        latent = rng.standard_normal((n + m, args.latent_dim), dtype=np.float32)
        (encode_all, _), _ = best_of(1, lambda: codebooks.encode(latent))
        (encode_new, _), _ = best_of(1, lambda: codebooks.encode(latent[n:]))
        del latent

    sample = old_ids[rng.choice(n, size=min(n, 1_000_000), replace=False)]
    kept = bool(np.array_equal(after.sids(sample), base.sids(sample)))
    all_sids = after.sids(ids)
    unique = bool(np.array_equal(after.items(all_sids), ids))  # a bijection: every SID is unique
    report = after.repair_report()
    print(f"{'operation':<34} {'wall s':>8} {'CPU s':>8} {'/ build':>8}")
    print(f"{'build, all n + m items':<34} {build_all:>8.3f} {build_all_cpu:>8.3f} {1:>8.1%}")
    print(f"{'extend by m (old index kept)':<34} {extend:>8.3f} {extend_cpu:>8.3f} {extend / build_all:>8.1%}")
    print(f"{'remove m':<34} {remove:>8.3f} {remove_cpu:>8.3f} {remove / build_all:>8.1%}")
    if args.latent_dim:
        full, update = encode_all + build_all, encode_new + extend
        print(f"{'encode n + m, build (rebuild)':<34} {full:>8.3f} {'':>8} {1:>8.1%}")
        print(f"{'encode m, extend (update)':<34} {update:>8.3f} {'':>8} {update / full:>8.1%}")
    print(f"old SIDs identical (1M-item sample): {kept}; all SIDs unique: {unique}; "
          f"new items moved by repair: {report['items_moved'] - base.repair_report()['items_moved']}")


if __name__ == "__main__":
    main()
