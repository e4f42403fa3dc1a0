"""Streaming Parquet encode (gr2.rq_parquet.encode_parquet, what `gr2 encode` runs) against the
baseline a user would otherwise write: read the whole table with pyarrow, turn the embedding
column into one numpy array, encode it in memory with gr2.RQCodebooks, write ids + codes.

Both produce the same file contents (checked: ids and codes equal). Each contender runs in its
own child process so its peak RSS (ru_maxrss) is its own; they alternate for ``--rounds`` rounds
and each one's best round is kept, so a burst of load from other processes hurts both alike.
Reported: seconds, rows/s (wall and per CPU second: the latter does not depend on how much of a
shared machine the process got), peak RSS, and streaming's share of the in-memory rate (issue 31's
target: >= 80%).

    python benches/bench_encode_stream.py                  # n = 4,000,000, D = 32, L = 4, K = 256
    python benches/bench_encode_stream.py --n 500000 --rounds 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import gr2


def make_inputs(folder: Path, n: int, d: int, levels: int, k: int, row_group: int, seed: int) -> tuple[Path, Path]:
    """A Parquet item table (int64 item_id, fixed_size_list<float32, d> embedding), written in
    row groups so it is never all in memory here either, and float32 (L, K, D) codebooks."""
    rng = np.random.default_rng(seed)
    codebooks = rng.standard_normal((levels, k, d)).astype(np.float32) / np.sqrt(np.arange(1, levels + 1))[:, None, None]
    np.save(folder / "codebooks.npy", codebooks.astype(np.float32))
    schema = pa.schema([("item_id", pa.int64()), ("embedding", pa.list_(pa.float32(), d))])
    with pq.ParquetWriter(folder / "items.parquet", schema) as writer:
        for start in range(0, n, row_group):
            m = min(row_group, n - start)
            x = rng.standard_normal((m, d), dtype=np.float32)
            ids = pa.array(np.arange(start, start + m, dtype=np.int64))
            writer.write_table(pa.table([ids, pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)],
                                        schema=schema))
    return folder / "items.parquet", folder / "codebooks.npy"


def baseline(codebooks: gr2.RQCodebooks, src: Path, out: Path) -> None:
    """What a user writes without gr2 encode: whole table -> numpy -> encode -> whole table."""
    table = pq.read_table(src, columns=["item_id", "embedding"])
    emb = table["embedding"].combine_chunks()
    x = emb.flatten().to_numpy().reshape(len(emb), -1)
    codes = codebooks.encode(np.ascontiguousarray(x, dtype=np.float32))
    columns = {"item_id": table["item_id"]} | {f"code_{i}": codes[:, i] for i in range(codes.shape[1])}
    pq.write_table(pa.table(columns), out)


def child(mode: str, src: Path, codebooks_path: Path, out: Path, chunk_rows: int) -> None:
    """One timed run in this process; prints {"seconds", "cpu_seconds", "peak_rss_mb"} as JSON."""
    from gr2.rq_parquet import encode_parquet

    codebooks = gr2.RQCodebooks(np.load(codebooks_path))
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "stream":
        encode_parquet(codebooks, src, out, chunk_rows=chunk_rows, progress=False)
    else:
        baseline(codebooks, src, out)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak}))


def run_child(mode: str, src: Path, codebooks: Path, out: Path, chunk_rows: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--src", str(src), "--codebooks", str(codebooks),
           "--out", str(out), "--chunk-rows", str(chunk_rows)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def same_output(a: Path, b: Path) -> bool:
    ta, tb = pq.read_table(a), pq.read_table(b)
    return ta.column_names == tb.column_names and all(ta[c].equals(tb[c]) for c in ta.column_names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4_000_000)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--row-group", type=int, default=131_072)
    parser.add_argument("--chunk-rows", type=int, default=65_536)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["stream", "memory"])
    parser.add_argument("--src")
    parser.add_argument("--codebooks")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        return child(args.child, Path(args.src), Path(args.codebooks), Path(args.out), args.chunk_rows)

    with tempfile.TemporaryDirectory(prefix="gr2-bench-stream-") as tmp:
        folder = Path(tmp)
        src, codebooks = make_inputs(folder, args.n, args.d, args.levels, args.k, args.row_group, args.seed)
        size_mb = src.stat().st_size / 2**20
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for mode in ("memory", "stream"):
                result = run_child(mode, src, codebooks, folder / f"{mode}.parquet", args.chunk_rows)
                if mode not in best or result["seconds"] < best[mode]["seconds"]:
                    best[mode] = result
        equal = same_output(folder / "memory.parquet", folder / "stream.parquet")

    load = os.getloadavg()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"n = {args.n:,}, D = {args.d}, L = {args.levels}, K = {args.k}; input {size_mb:.0f} MiB Parquet "
          f"(row groups of {args.row_group:,}), chunk_rows = {args.chunk_rows:,}, best of {args.rounds}; "
          f"same output: {equal}")
    print("| method | seconds | rows/s (wall) | rows / CPU-s | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|")
    names = {"memory": "in memory (read all, encode, write)", "stream": "gr2 encode_parquet (streaming)"}
    for mode in ("memory", "stream"):
        r = best[mode]
        print(f"| {names[mode]} | {r['seconds']:.2f} | {args.n / r['seconds']:,.0f} | {args.n / r['cpu_seconds']:,.0f} "
              f"| {r['peak_rss_mb']:,.0f} |")
    ratio = best["memory"]["seconds"] / best["stream"]["seconds"]
    print(f"streaming rate / in-memory rate = {ratio:.2f} (target >= 0.80)")


if __name__ == "__main__":
    main()
