"""RQ greedy encoding: gr2 against what a user would otherwise run, all in one process.

Contenders (same data, same codebooks, same algorithm: per level, nearest code to the residual):
  numpy        tuned numpy: per level and cache-sized chunk, ||c||^2 - 2 r @ C.T via BLAS sgemm
               (the ||r||^2 term dropped: it does not change the argmin), argmin
  numpy-plain  the textbook formula ||r||^2 - 2 r.c + ||c||^2 on the whole batch at once, as most
               users first write it (n x K float32 temporaries, no chunking)
  torch  the same algorithm in torch (CPU, matmul + argmin)
  faiss  faiss.ResidualQuantizer with our codebooks copied in, max_beam_size = 1 (greedy), both
         with and without its LUT beam path (use_beam_LUT)
  gr2    gr2.RQCodebooks.encode (fused distance + argmin kernel, rayon)
It also measures the machine's sgemm rate (numpy matmul of square float32 matrices) and reports
gr2's share of the sgemm-bound encode rate (2 L K D flops per item).

Contenders run interleaved, round-robin, and each one's best round is kept, so a burst of load
from other processes hurts all of them alike rather than one. CPU seconds are printed too
(process CPU time; note that BLAS/OpenMP threads may spin, inflating theirs).

    python benches/bench_encode.py            # n = 1,000,000, D = 32, L = 4, K = 256
    python benches/bench_encode.py --n 200000 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def _threads_from_argv() -> int | None:
    """--threads must act before numpy/torch/faiss/rayon start their thread pools."""
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return None


THREADS = _threads_from_argv() or os.cpu_count() or 1
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import numpy as np  # noqa: E402

import gr2  # noqa: E402


def numpy_encode(codebooks: np.ndarray, x: np.ndarray, chunk: int = 16384) -> np.ndarray:
    levels, k, _ = codebooks.shape
    norms = (codebooks.astype(np.float32) ** 2).sum(-1)
    codes = np.empty((x.shape[0], levels), dtype=np.uint16)
    for start in range(0, x.shape[0], chunk):
        residual = x[start : start + chunk].copy()
        for level in range(levels):
            scores = norms[level][None, :] - 2.0 * (residual @ codebooks[level].T)
            chosen = scores.argmin(axis=1)
            codes[start : start + chunk, level] = chosen
            residual -= codebooks[level][chosen]
    return codes


def numpy_plain_encode(codebooks: np.ndarray, x: np.ndarray) -> np.ndarray:
    residual = x.copy()
    codes = np.empty((x.shape[0], codebooks.shape[0]), dtype=np.uint16)
    for level, level_codes in enumerate(codebooks):
        distances = (residual**2).sum(1, keepdims=True) - 2.0 * (residual @ level_codes.T) + (level_codes**2).sum(1)
        chosen = distances.argmin(axis=1)
        codes[:, level] = chosen
        residual -= level_codes[chosen]
    return codes


def make_torch_encode(codebooks: np.ndarray):
    import torch

    torch.set_num_threads(THREADS)
    cbt = torch.from_numpy(codebooks)
    norms = (cbt**2).sum(-1)

    @torch.inference_mode()
    def encode(x: np.ndarray, chunk: int = 65536) -> np.ndarray:
        xt = torch.from_numpy(x)
        codes = torch.empty((xt.shape[0], cbt.shape[0]), dtype=torch.int64)
        for start in range(0, xt.shape[0], chunk):
            residual = xt[start : start + chunk].clone()
            for level in range(cbt.shape[0]):
                scores = torch.addmm(norms[level][None, :], residual, cbt[level].T, alpha=-2.0)
                chosen = scores.argmin(dim=1)
                codes[start : start + chunk, level] = chosen
                residual -= cbt[level][chosen]
        return codes.numpy().astype(np.uint16)

    return encode


def make_faiss_encode(codebooks: np.ndarray, use_lut: bool):
    import faiss

    faiss.omp_set_num_threads(THREADS)
    levels, k, dim = codebooks.shape
    nbits = int(np.log2(k))
    assert 2**nbits == k, "faiss needs K to be a power of two"
    rq = faiss.ResidualQuantizer(dim, levels, nbits)
    rq.search_type = faiss.AdditiveQuantizer.ST_decompress  # codes only, no norm
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks).ravel(), rq.codebooks)
    rq.is_trained = True
    rq.max_beam_size = 1
    rq.use_beam_LUT = int(use_lut)
    if use_lut:
        rq.compute_codebook_tables()

    def encode(x: np.ndarray) -> np.ndarray:
        packed = rq.compute_codes(x)  # (n, code_size) bytes, 8 bits per level
        assert packed.shape[1] == levels and nbits == 8
        return packed.astype(np.uint16)

    return encode


def sgemm_gflops(size: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Best sgemm rate of numpy matmul: (GFLOP per wall second, GFLOP per CPU second)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        a @ b
        best_wall = min(best_wall, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    return 2 * size**3 / best_wall / 1e9, 2 * size**3 / best_cpu / 1e9


def make_data(n: int, levels: int, k: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correlated gaussian embeddings and k-means-style codebooks (residuals of sample points)."""
    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    x = rng.standard_normal((n, dim), dtype=np.float32) @ mix
    sample = x[rng.choice(n, size=min(n, 20 * k), replace=False)].copy()
    codebooks = np.empty((levels, k, dim), dtype=np.float32)
    for level in range(levels):
        codebooks[level] = sample[rng.choice(len(sample), size=k, replace=len(sample) < k)]
        chosen = numpy_encode(codebooks[level : level + 1], sample)[:, 0]
        sample = sample - codebooks[level][chosen]
    return np.ascontiguousarray(x), codebooks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds; the best per contender is kept")
    parser.add_argument("--threads", type=int, default=None, help="threads for every contender (default: all CPUs)")
    parser.add_argument("--skip", nargs="*", default=[], help="contenders to skip: numpy numpy-plain torch faiss faiss-lut")
    args = parser.parse_args()

    n, levels, k, dim = args.n, args.levels, args.k, args.dim
    print(f"# RQ encode benchmark: n={n:,} D={dim} L={levels} K={k}; {THREADS} threads on {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f} at start")
    x, codebooks = make_data(n, levels, k, dim)
    cb = gr2.RQCodebooks(codebooks)

    contenders = {"gr2": lambda v: cb.encode(v)}
    if "numpy" not in args.skip:
        contenders["numpy"] = lambda v: numpy_encode(codebooks, v)
    if "numpy-plain" not in args.skip:
        contenders["numpy-plain"] = lambda v: numpy_plain_encode(codebooks, v)
    if "torch" not in args.skip:
        contenders["torch"] = make_torch_encode(codebooks)
    for use_lut in (False, True):
        name = "faiss-lut" if use_lut else "faiss"
        if name not in args.skip:
            try:
                contenders[name] = make_faiss_encode(codebooks, use_lut)
            except ImportError:
                print(f"{name}: faiss not installed, skipped")

    gflops, gflops_cpu = sgemm_gflops()
    flops_per_item = 2 * levels * k * dim
    for fn in contenders.values():  # warm up (thread pools, page faults) on a slice
        fn(x[: min(n, 20_000)])

    wall = {name: float("inf") for name in contenders}
    cpu = {name: float("inf") for name in contenders}
    codes = {}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t, c = time.perf_counter(), time.process_time()
            codes[name] = fn(x)
            wall[name] = min(wall[name], time.perf_counter() - t)
            cpu[name] = min(cpu[name], time.process_time() - c)
    gflops_again, gflops_cpu_again = sgemm_gflops()  # again after the runs, keep the better figures
    gflops, gflops_cpu = max(gflops, gflops_again), max(gflops_cpu, gflops_cpu_again)

    ceiling = gflops * 1e9 / flops_per_item
    print(f"sgemm (numpy {np.__version__} matmul 2048^3): {gflops:.1f} GFLOP/s -> compute ceiling "
          f"{ceiling / 1e6:.2f}M items/s at {flops_per_item:,} flops/item; per CPU second {gflops_cpu:.1f} GFLOP")
    print(f"{'method':<12} {'items/s':>12} {'gr2 speedup':>12} {'items/cpu-s':>12} {'cpu speedup':>12} {'same codes as gr2':>18}")
    for name in contenders:
        same = float((codes[name] == codes["gr2"]).all(axis=1).mean())
        print(f"{name:<12} {n / wall[name]:>12,.0f} {wall[name] / wall['gr2']:>11.2f}x {n / cpu[name]:>12,.0f} "
              f"{cpu[name] / cpu['gr2']:>11.2f}x {same:>17.2%}")
    print(f"gr2 share of the sgemm ceiling: {n / wall['gr2'] / ceiling:.1%} (wall), "
          f"{n / cpu['gr2'] * flops_per_item / (gflops_cpu * 1e9):.1%} (per CPU second); "
          f"load average {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
