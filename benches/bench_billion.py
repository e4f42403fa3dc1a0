"""A billion items on one machine (issue 31.1): stream N synthetic embeddings through the RQ encoder
in chunks, feed the codes to gr2.SidIndexWriter (the out-of-core build), then load the index
file and look ids up.

Nothing of size N is ever held in memory by this script: chunk c's embeddings come from
``numpy.random.default_rng([seed, c])`` and row r's item id is a bijective 64-bit mix of r (unique,
sparse, in no particular order), so any row can be regenerated. Codebooks: random float32 (L, K, D),
level l scaled by 1/sqrt(l + 1) (as benches/bench_encode_stream.py).

Phases and what is reported:
1. stream: generate + encode (``RQCodebooks.encode``) + ``writer.add`` per chunk, then
   ``writer.finish()`` (merge runs into the file). Encode throughput, build throughput (add +
   finish, encode excluded), peak RSS of this process (ru_maxrss), bytes per item on disk.
2. load + query, each load mode in a fresh child process: load time, ``nbytes`` (bytes per item
   in RAM), peak RSS, ids -> SIDs lookups/s over ``--queries`` random ids in batches, and a
   round-trip check (SIDs -> ids) on a sample.
3. baseline (only when N <= ``--baseline-max``, in its own child process): the same embeddings
   encoded as one in-memory array and ``SidIndex.build`` + ``save``; its times and peak RSS, and
   whether its file is byte-identical to the streamed one (it must be).

    python benches/bench_billion.py --items 1e7                        # ~1 min on the 2-core VM
    python benches/bench_billion.py --items 1e8 --chunk 2e7
    python benches/bench_billion.py                                   # 1e9: ~64 GB of free disk

Writes ``bench_billion.json`` (every figure, the command, the machine) into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

D, L, K = 32, 4, 256
MIX_1, MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def item_ids(rows):
    """Unique pseudo-random uint64 ids for uint64 row numbers (the splitmix64 finaliser, a bijection)."""
    import numpy as np

    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX_1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX_2)
    return z ^ (z >> np.uint64(31))


def embeddings(seed: int, chunk: int, m: int):
    import numpy as np

    return np.random.default_rng([seed, chunk]).standard_normal((m, D), dtype=np.float32)


def assign(books, x, seed: int, chunk: int, random_last: bool):
    """Codes of one chunk: the encoder's, with the last level replaced by seeded uniform codes when
    `random_last` (what `gr2 sid` does by default: RQConfig.random_last_level)."""
    import numpy as np

    codes = books.encode(x)
    if random_last:
        codes[:, -1] = np.random.default_rng([seed, chunk, 1]).integers(0, K, size=len(codes), dtype=np.uint16)
    return codes


def codebooks(seed: int):
    import numpy as np

    import gr2

    rng = np.random.default_rng([seed, 2**31])
    books = rng.standard_normal((L, K, D)).astype(np.float32) / np.sqrt(np.arange(1, L + 1))[:, None, None]
    return gr2.RQCodebooks(books.astype(np.float32))


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it starts afresh at exec, so a child's
    figure is its own, not its parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def stream(args, path: Path) -> dict:
    """Phase 1 in this process."""
    import numpy as np

    import gr2

    books = codebooks(args.seed)
    n, m = args.items, args.encode_chunk
    t_gen = t_enc = t_add = 0.0
    cpu_enc = 0.0
    start = time.perf_counter()
    cpu_start = time.process_time()
    last_report = start
    with gr2.SidIndexWriter(path, [K] * L, chunk_items=args.chunk) as writer:
        for c, first in enumerate(range(0, n, m)):
            rows = min(m, n - first)
            t0 = time.perf_counter()
            x = embeddings(args.seed, c, rows)
            ids = item_ids(np.arange(first, first + rows, dtype=np.uint64))
            t1, c1 = time.perf_counter(), time.process_time()
            codes = assign(books, x, args.seed, c, args.last_level == "random")
            t2, c2 = time.perf_counter(), time.process_time()
            writer.add(ids, codes)
            t3 = time.perf_counter()
            t_gen, t_enc, t_add, cpu_enc = t_gen + t1 - t0, t_enc + t2 - t1, t_add + t3 - t2, cpu_enc + c2 - c1
            if t3 - last_report > 60:
                last_report = t3
                print(f"  {first + rows:,} / {n:,} items streamed, {t3 - start:.0f} s, peak RSS {peak_rss_mb():.0f} MB",
                      flush=True)
        rss_before_finish = peak_rss_mb()
        t4 = time.perf_counter()
        writer.finish()
        t_finish = time.perf_counter() - t4
    total = time.perf_counter() - start
    size = path.stat().st_size
    return {
        "generate_s": t_gen, "encode_s": t_enc, "encode_cpu_s": cpu_enc, "add_s": t_add, "finish_s": t_finish,
        "total_s": total, "cpu_s": time.process_time() - cpu_start,
        "encode_items_per_s": n / t_enc if t_enc else None,
        "encode_items_per_cpu_s": n / cpu_enc if cpu_enc else None,
        "build_s": t_add + t_finish, "build_items_per_s": n / (t_add + t_finish) if n else None,
        "peak_rss_mb": peak_rss_mb(), "peak_rss_mb_before_finish": rss_before_finish,
        "file_bytes": size, "file_bytes_per_item": size / n if n else None,
    }


def child_load(args, path: Path, mmap: bool, verify: bool) -> dict:
    """Phase 2 for one load mode (run in a fresh process)."""
    import numpy as np

    import gr2

    t0 = time.perf_counter()
    index = gr2.SidIndex.load(path, mmap=mmap, verify=verify)
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_mb()
    n = len(index)
    rng = np.random.default_rng([args.seed, 7])
    batch = min(args.query_batch, args.queries)
    done, wall, cpu = 0, 0.0, 0.0
    first_wall = None
    while done < args.queries:
        q = min(batch, args.queries - done)
        ids = item_ids(rng.integers(0, n, size=q, dtype=np.uint64))
        t1, c1 = time.perf_counter(), time.process_time()
        sids = index.sids(ids)
        dt = time.perf_counter() - t1
        wall, cpu = wall + dt, cpu + time.process_time() - c1
        first_wall = dt / q if first_wall is None else first_wall
        done += q
    sample = item_ids(rng.integers(0, n, size=min(100_000, n), dtype=np.uint64))
    roundtrip = bool(np.array_equal(index.items(index.sids(sample)), sample)) if n else True
    report = index.repair_report()
    return {
        "mmap": mmap, "verify": verify, "load_s": load_s, "items": n, "nbytes": index.nbytes,
        "ram_bytes_per_item": index.nbytes / n if n else None,
        "peak_rss_mb_after_load": rss_after_load, "peak_rss_mb": peak_rss_mb(),
        "queries": done, "query_batch": batch, "lookup_s": wall, "lookup_cpu_s": cpu,
        "lookups_per_s": done / wall if wall else None, "lookups_per_cpu_s": done / cpu if cpu else None,
        "first_batch_us_per_lookup": first_wall * 1e6 if first_wall else None,
        "roundtrip_ok": roundtrip, "levels": index.levels,
        "repair": {k: report[k] for k in ("uniqueness_before_repair", "items_moved", "full_prefixes",
                                          "level_appended", "appended_level_size", "collision_groups",
                                          "max_move_distance")},
    }


def child_baseline(args, path: Path) -> dict:
    """Phase 3: everything in memory (run in a fresh process)."""
    import numpy as np

    import gr2

    books = codebooks(args.seed)
    n, m = args.items, args.encode_chunk
    t0 = time.perf_counter()
    x = np.empty((n, D), dtype=np.float32)
    for c, first in enumerate(range(0, n, m)):
        x[first:first + m] = embeddings(args.seed, c, min(m, n - first))
    ids = item_ids(np.arange(n, dtype=np.uint64))
    t1, c1 = time.perf_counter(), time.process_time()
    codes = books.encode(x)  # one call over the whole array; the random last level per chunk, as streamed
    if args.last_level == "random":
        for c, first in enumerate(range(0, n, m)):
            rows = min(m, n - first)
            codes[first:first + rows, -1] = np.random.default_rng([args.seed, c, 1]).integers(0, K, size=rows, dtype=np.uint16)
    t2, c2 = time.perf_counter(), time.process_time()
    del x
    index = gr2.SidIndex.build(ids, codes, codebook_size=K)
    t3 = time.perf_counter()
    index.save(path)
    t4 = time.perf_counter()
    return {"generate_s": t1 - t0, "encode_s": t2 - t1, "encode_cpu_s": c2 - c1, "encode_items_per_s": n / (t2 - t1),
            "encode_items_per_cpu_s": n / (c2 - c1), "build_s": t3 - t2, "save_s": t4 - t3,
            "build_items_per_s": n / (t3 - t2), "build_save_items_per_s": n / (t4 - t2), "peak_rss_mb": peak_rss_mb()}


def run_child(args, what: str, path: Path, **flags) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--path", str(path), "--items", str(args.items),
           "--encode-chunk", str(args.encode_chunk), "--seed", str(args.seed), "--queries", str(args.queries),
           "--query-batch", str(args.query_batch), "--last-level", args.last_level]
    for name, value in flags.items():
        cmd += [f"--{name}", str(int(value))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(l.split()[1]) // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = None
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mb": mem, "python": platform.python_version(),
            "commit": commit, "rayon_threads": os.environ.get("RAYON_NUM_THREADS")}


def number(text: str) -> int:
    return int(float(text))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=number, default=10**9, help="N items (1e9 by default; 1e7 takes about a minute)")
    p.add_argument("--chunk", type=number, default=20_000_000,
                   help="items the writer sorts per run (its memory: ~24 bytes each)")
    p.add_argument("--encode-chunk", type=number, default=1_000_000, help="rows generated and encoded at a time")
    p.add_argument("--out-dir", type=Path, default=Path("runs/bench_billion"))
    p.add_argument("--queries", type=number, default=10_000_000, help="ids looked up per load mode")
    p.add_argument("--query-batch", type=number, default=1_000_000)
    p.add_argument("--baseline-max", type=number, default=10_000_000,
                   help="run the in-memory baseline when N is at most this (its peak is ~190 bytes/item)")
    p.add_argument("--threads", type=int, default=None, help="rayon threads (RAYON_NUM_THREADS) for every phase")
    p.add_argument("--modes", default="mmap-noverify,mmap,copy-noverify,copy",
                   help="load modes to time; copy modes are skipped when the file exceeds half of MemAvailable")
    p.add_argument("--keep", action="store_true", help="keep the index file")
    p.add_argument("--last-level", choices=["random", "encoded"], default="random",
                   help="random: the last level is replaced by uniform codes, as `gr2 sid` does by default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["load", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--mmap", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--verify", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child == "load":
        print(json.dumps(child_load(args, args.path, bool(args.mmap), bool(args.verify))))
        return
    if args.child == "baseline":
        print(json.dumps(child_baseline(args, args.path)))
        return

    if args.threads is not None:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before gr2 starts its pool; children inherit it
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"bench_{args.items}.gr2sid"
    free = shutil.disk_usage(args.out_dir).free
    need = args.items * 44  # peak: ~40 B/item of runs and temporary arrays (the index is written as they shrink)
    if need > free:
        sys.exit(f"bench_billion: {args.out_dir} has {free / 1e9:.1f} GB free; the build needs about "
                 f"{need / 1e9:.1f} GB (a peak of ~40 B/item: sorted runs and temporary arrays, then the 20-24 B/item index as they shrink)")
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "items": args.items,
              "chunk": args.chunk, "last_level": args.last_level, "encode_chunk": args.encode_chunk, "date": f"{started:%Y-%m-%d %H:%M} UTC",
              "machine": machine(), "load_average_before": load_before}
    print(f"{result['date']}, {result['machine']['cpu']}, {os.cpu_count()} cores, load average "
          f"{load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}; N = {args.items:,}, D = {D}, L = {L}, "
          f"K = {K}, last level {args.last_level}, writer chunk {args.chunk:,}, encode chunk {args.encode_chunk:,}", flush=True)

    s = stream(args, path)
    result["stream"] = s
    print(f"stream: encode {s['encode_s']:.1f} s ({s['encode_items_per_s']:,.0f} items/s, "
          f"{s['encode_items_per_cpu_s']:,.0f}/CPU-s), generate {s['generate_s']:.1f} s, build {s['build_s']:.1f} s "
          f"(add {s['add_s']:.1f} + finish {s['finish_s']:.1f}; {s['build_items_per_s']:,.0f} items/s), "
          f"total {s['total_s']:.1f} s; peak RSS {s['peak_rss_mb']:.0f} MB; file {s['file_bytes'] / 1e9:.2f} GB "
          f"= {s['file_bytes_per_item']:.2f} B/item", flush=True)

    avail = next((int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemAvailable")), 0)
    result["loads"] = []
    for mode in args.modes.split(","):
        mmap, verify = mode.startswith("mmap"), not mode.endswith("noverify")
        if not mmap and s["file_bytes"] > avail / 2:
            print(f"load {mode}: skipped (file {s['file_bytes'] / 1e9:.1f} GB > half of MemAvailable)")
            continue
        r = run_child(args, "load", path, mmap=mmap, verify=verify)
        r["mode"] = mode
        result["loads"].append(r)
        print(f"load {mode}: {r['load_s'] * 1e3:.1f} ms, {r['ram_bytes_per_item']:.2f} B/item in RAM (nbytes), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB; ids -> SIDs {r['lookups_per_s']:,.0f}/s "
              f"({r['lookups_per_cpu_s']:,.0f}/CPU-s, {r['queries']:,} in batches of {r['query_batch']:,}); "
              f"round trip {'ok' if r['roundtrip_ok'] else 'FAILED'}", flush=True)
    if result["loads"]:
        result["repair"] = result["loads"][0]["repair"]
        print(f"repair: {result['repair']}")

    if args.items <= args.baseline_max:
        base_path = args.out_dir / f"baseline_{args.items}.gr2sid"
        b = run_child(args, "baseline", base_path)
        b["identical_file"] = sha256(base_path) == sha256(path)
        base_path.unlink()
        result["baseline"] = b
        print(f"baseline (in memory): encode {b['encode_s']:.1f} s ({b['encode_items_per_s']:,.0f} items/s), "
              f"build {b['build_s']:.1f} s + save {b['save_s']:.1f} s, peak RSS {b['peak_rss_mb']:.0f} MB; "
              f"file identical to the streamed one: {b['identical_file']}")
        print(f"streamed / in-memory: encode rate {s['encode_items_per_s'] / b['encode_items_per_s']:.2f}x, "
              f"build+save rate {s['build_items_per_s'] / b['build_save_items_per_s']:.2f}x, "
              f"peak RSS {s['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
    else:
        print(f"baseline: skipped (N > --baseline-max {args.baseline_max:,})")

    result["load_average_after"] = os.getloadavg()
    if not args.keep:
        path.unlink()
    out = args.out_dir / "bench_billion.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if "baseline" in result and not result["baseline"]["identical_file"]:
        sys.exit("bench_billion: the streamed index differs from SidIndex.build + save")
    if any(not r["roundtrip_ok"] for r in result["loads"]):
        sys.exit("bench_billion: a lookup round trip failed")


if __name__ == "__main__":
    main()
