"""Times gr2.SidIndex against the baseline a user would write, in one run.

    python benches/bench_index.py            # n = 10M items, L = 4, K = 256
    python benches/bench_index.py --n 1000000 --ids dense

Baselines: numpy (pack SIDs into uint64 keys, argsort, np.searchsorted both ways, np.save/np.load
of the four arrays) and a Python dict (id -> key and key -> id; built on at most --dict-n items
because it needs ~200 bytes per item). Prints items/s, gr2's speed-up, and bytes per item.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import gr2


def best_of(repeat, fn):
    """(wall seconds, CPU seconds, result) of the fastest of `repeat` calls. On a shared machine
    wall time includes waiting for a core; CPU seconds (all threads) do not."""
    best, result = (float("inf"), float("nan")), None
    for _ in range(repeat):
        gc.collect()
        cpu = time.process_time()
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        if elapsed < best[0]:
            best = (elapsed, time.process_time() - cpu)
    return best, result


class NumpyIndex:
    """What a numpy user writes: packed uint64 keys, sorted both ways, np.searchsorted."""

    def __init__(self, ids, codes, bits):
        self.shifts = np.array([sum(bits[l + 1 :]) for l in range(len(bits))], dtype=np.uint64)
        self.masks = np.array([(1 << b) - 1 for b in bits], dtype=np.uint64)
        keys = self.pack(codes)
        by_id = np.argsort(ids, kind="stable")
        self.sorted_ids, self.keys_by_id = ids[by_id], keys[by_id]
        by_key = np.argsort(keys, kind="stable")
        self.sorted_keys, self.ids_by_key = keys[by_key], ids[by_key]
        if np.any(self.sorted_ids[1:] == self.sorted_ids[:-1]):
            raise ValueError("duplicate ids")

    def pack(self, codes):
        keys = np.zeros(len(codes), dtype=np.uint64)
        for level, shift in enumerate(self.shifts):
            keys |= codes[:, level].astype(np.uint64) << shift
        return keys

    def sids(self, queries):
        j = np.searchsorted(self.sorted_ids, queries)
        j[j == len(self.sorted_ids)] = 0
        if not np.array_equal(self.sorted_ids[j], queries):
            raise KeyError("unknown id")
        keys = self.keys_by_id[j]
        return ((keys[:, None] >> self.shifts) & self.masks).astype(np.uint16)

    def items(self, sids):
        keys = self.pack(sids)
        p = np.searchsorted(self.sorted_keys, keys)
        p[p == len(self.sorted_keys)] = 0
        if not np.array_equal(self.sorted_keys[p], keys):
            raise KeyError("unknown SID")
        return self.ids_by_key[p]

    def arrays(self):
        return [self.sorted_ids, self.keys_by_id, self.sorted_keys, self.ids_by_key]

    def nbytes(self):
        return sum(a.nbytes for a in self.arrays())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000, help="items in the index")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--ids", choices=["sparse", "dense"], default="sparse",
                        help="sparse: random uint64 ids; dense: a permutation of 0..n-1 (like item_idx)")
    parser.add_argument("--dict-n", type=int, default=1_000_000, help="items for the dict baseline (0: skip)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs for lookups and load")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    n, levels, k = args.n, args.levels, args.codebook_size
    rng = np.random.default_rng(args.seed)
    if args.ids == "dense":
        ids = rng.permutation(n).astype(np.uint64)
    else:
        ids = np.unique(rng.integers(0, 2**64 - 1, size=n + n // 100 + 10, dtype=np.uint64, endpoint=True))[:n]
        ids = rng.permutation(ids)
    codes = rng.integers(0, k, size=(n, levels), dtype=np.uint16)
    order = rng.permutation(n)
    print(f"# gr2 SidIndex benchmark: n={n:,} levels={levels} K={k} ids={args.ids} "
          f"cores={os.cpu_count()} load average={os.getloadavg()[0]:.1f} gr2={gr2.__version__} numpy={np.__version__}")

    rows = []

    def report(name, timing, items, baseline=None):
        (seconds, cpu) = timing
        rate = items / seconds
        ratio = f"{baseline[0] / seconds:6.1f}x" if baseline else "      -"
        rows.append((name, seconds, rate, ratio))
        print(f"{name:<34} {seconds * 1e3:9.1f} ms wall {cpu * 1e3:9.1f} ms cpu "
              f"{rate / 1e6:8.2f} M items/s {items / cpu / 1e6:8.2f} M items/cpu-s  vs baseline {ratio}", flush=True)

    # ---- build
    t_np_build, np_index = best_of(1, lambda: NumpyIndex(ids, codes, [int(np.ceil(np.log2(k)))] * levels))
    t_build, index = best_of(1, lambda: gr2.SidIndex.build(ids, codes, codebook_size=k))
    report("numpy build (argsort x2)", t_np_build, n)
    report("gr2 build (with repair)", t_build, n, t_np_build)
    rep = index.repair_report()
    print(f"  repair: uniqueness_before={rep['uniqueness_before_repair']:.6f} moved={rep['items_moved']} "
          f"collision_groups={rep['collision_groups']} level_appended={rep['level_appended']}")

    # ---- lookups (random order; SIDs after repair, so every query hits)
    queries = ids[order]
    t_np_sids, np_sids = best_of(args.repeat, lambda: np_index.sids(queries))
    t_sids, sids = best_of(args.repeat, lambda: index.sids(queries))
    report("numpy ids->SIDs (searchsorted)", t_np_sids, n)
    report("gr2 ids->SIDs", t_sids, n, t_np_sids)
    sid_queries = np.ascontiguousarray(sids)
    np_sid_queries = np.ascontiguousarray(np_sids)  # the baseline has no repair: its own SIDs
    t_np_items, _ = best_of(args.repeat, lambda: np_index.items(np_sid_queries))
    t_items, items = best_of(args.repeat, lambda: index.items(sid_queries))
    report("numpy SIDs->ids (searchsorted)", t_np_items, n)
    report("gr2 SIDs->ids", t_items, n, t_np_items)
    assert np.array_equal(items, queries), "gr2 lookups are not inverse to each other"
    unique_rows = rep["collision_groups"] == 0
    if unique_rows:
        assert np.array_equal(np_sids, sids), "gr2 and numpy disagree (no collisions to repair)"

    # ---- save / load
    with tempfile.TemporaryDirectory(dir=os.environ.get("GR2_BENCH_DIR")) as tmp:
        path = Path(tmp) / "index.gr2sid"
        t_save, _ = best_of(1, lambda: index.save(path))
        report("gr2 save (atomic, fsync)", t_save, n)
        np_paths = [Path(tmp) / f"a{i}.npy" for i in range(4)]
        for p, a in zip(np_paths, np_index.arrays()):
            np.save(p, a)
        t_np_load, _ = best_of(args.repeat, lambda: [np.load(p) for p in np_paths])
        t_load_mmap, _ = best_of(args.repeat, lambda: gr2.SidIndex.load(path, mmap=True))
        t_load, loaded = best_of(args.repeat, lambda: gr2.SidIndex.load(path))
        report("numpy np.load of 4 arrays", t_np_load, n)
        report("gr2 load (copy-in+checksum+checks, default)", t_load, n, t_np_load)
        report("gr2 load (mmap=True+checksum+checks)", t_load_mmap, n, t_np_load)
        t_trusted, _ = best_of(args.repeat, lambda: gr2.SidIndex.load(path, verify=False))
        t_trusted_mmap, _ = best_of(args.repeat, lambda: gr2.SidIndex.load(path, mmap=True, verify=False))
        report("gr2 load (copy-in, verify=False)", t_trusted, n, t_np_load)
        report("gr2 load (mmap=True, verify=False)", t_trusted_mmap, n, t_np_load)
        t_loaded_sids, loaded_sids = best_of(args.repeat, lambda: loaded.sids(queries))
        report("gr2 ids->SIDs on loaded index", t_loaded_sids, n, t_np_sids)
        assert np.array_equal(loaded_sids, sids)
        file_bytes = path.stat().st_size
        del loaded

    # ---- dict baseline (on a slice: it needs ~200 bytes per item)
    if args.dict_n:
        m = min(n, args.dict_n)
        keys = np_index.pack(codes[:m]).tolist()
        id_list = ids[:m].tolist()
        t_dict_build, (by_id, by_key) = best_of(1, lambda: (dict(zip(id_list, keys)), dict(zip(keys, id_list))))
        q = ids[:m][rng.permutation(m)].tolist()
        t_dict_ids, _ = best_of(args.repeat, lambda: [by_id[x] for x in q])
        kq = [by_id[x] for x in q]
        t_dict_keys, _ = best_of(args.repeat, lambda: [by_key[x] for x in kq])
        dict_bytes = sys.getsizeof(by_id) + sys.getsizeof(by_key) + sum(sys.getsizeof(x) for x in id_list[:1000]) / 1000 * m * 2
        print(f"dict baseline on {m:,} items (packed keys, no unpacking to codes):")
        report("  dict build", t_dict_build, m)
        report("  dict ids->keys", t_dict_ids, m)
        report("  dict keys->ids", t_dict_keys, m)
        print(f"  gr2 ids->SIDs vs dict: {(n / t_sids[0]) / (m / t_dict_ids[0]):.1f}x, "
              f"SIDs->ids vs dict: {(n / t_items[0]) / (m / t_dict_keys[0]):.1f}x; dict ~{dict_bytes / m:.0f} bytes/item")

    print(f"memory: gr2 {index.nbytes / n:.2f} bytes/item (file {file_bytes / n:.2f}), "
          f"numpy baseline {np_index.nbytes() / n:.2f} bytes/item")
    return 0


if __name__ == "__main__":
    sys.exit(main())
