"""Serving benchmark (issue 14.5): gr2.constrained_decode against unconstrained model.generate.

For each model (the demo Llama and SmolLM2-135M-Instruct), each mode (think: up to
--reasoning-tokens of free text then the answer; answer-only) and each batch size (1/8/32), the
same prompts are decoded greedily by

  gr2        gr2.constrained_decode: every output a valid permutation of its K candidates
  generate   model.generate, unconstrained, the same number of new tokens (min = max = the
             longest constrained completion + EOS), so both do the same forward work

and the script prints lists/s, p50/p99 batch latency (every request of a batch finishes with the
batch), the ratio gr2/generate in throughput and the share of valid lists. Models are untrained on
SIDs (new embedding rows), so this measures cost, not quality.

``--count-forwards`` adds, per row, one extra untimed pass of each decoder with the model's
forward body wrapped: forward calls per batch, tokens pushed through the model per batch (query
positions, prompt included), the share of the wall time spent inside forward and the prefill
(first call) time -- where the
time goes when the ratio falls (e.g. a compute-bound batch: same tokens, fewer calls).

Run: python benches/bench_serving.py [--models demo,smollm2] [--batches 1,8,32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch

import gr2
from gr2.decoding._setup import prompt_texts

LEVEL_SIZES = (256, 256, 256, 256)
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench"  # git-ignored
N_ITEMS = 1000


def make_index(rng: np.random.Generator) -> tuple[gr2.SidIndex, np.ndarray]:
    flat = rng.choice(256**2, size=N_ITEMS, replace=False)  # unique first two levels => unique SIDs
    codes = np.stack([flat // 256, flat % 256, rng.integers(0, 256, N_ITEMS), rng.integers(0, 256, N_ITEMS)], 1)
    items = np.arange(N_ITEMS, dtype=np.uint64) + 10_000
    return gr2.SidIndex.build(items, codes.astype(np.uint16), list(LEVEL_SIZES)), items


def make_prompts(rng, items, index, n, k, n_history, think: bool):
    prompts, cands = [], []
    ask = "Think briefly, then rank" if think else "Rank"
    for _ in range(n):
        history = rng.choice(items, size=n_history, replace=False)
        cand = rng.choice(items, size=k, replace=False)
        hist = " ".join(gr2.sid_to_text(s) for s in index.sids(history))
        listed = "\n".join(f"{j + 1}. {gr2.sid_to_text(s)}" for j, s in enumerate(index.sids(cand)))
        prompts.append([{"role": "system", "content": f"You are an expert recommender. {ask} the candidates."},
                        {"role": "user", "content": f"The user watched: {hist}\nCandidates:\n{listed}\n"}])
        cands.append(cand)
    return prompts, np.asarray(cands, dtype=np.uint64)


def load_model(name: str):
    from gr2.models import DemoModelConfig, load_base_model, load_smollm2

    if name == "smollm2":
        model, tokenizer = load_smollm2(cache_dir=CACHE)
    elif name == "demo":  # the demo preset's size: 3 layers, hidden 192, BPE vocabulary 2,000
        corpus = [f"the user watched item {i} then a film about {w}" for i in range(400)
                  for w in ("love", "war", "space", "crime")]
        model, tokenizer = load_base_model("demo", corpus=corpus, demo=DemoModelConfig())
    else:
        raise SystemExit(f"unknown model {name!r}; expected demo or smollm2")
    gr2.add_sid_tokens(tokenizer, level_sizes=LEVEL_SIZES)
    model.resize_token_embeddings(len(tokenizer))
    return model.eval(), tokenizer


def time_batches(fn, batches, repeats):
    """Per-batch wall times (s) of fn(batch) over `repeats` passes."""
    times = []
    for _ in range(repeats):
        for batch in batches:
            t0 = time.perf_counter()
            fn(batch)
            times.append(time.perf_counter() - t0)
    return np.asarray(times)


@contextlib.contextmanager
def count_forwards(model):
    """Wrap the transformer body's forward (``model.get_decoder()``: both decoders call it, gr2's
    with its own sparse head) for the block: yields {calls, tokens, forward_s, prefill_s} (tokens =
    batch x query positions of every call; prefill_s = the first call, over the prompts)."""
    stats = {"calls": 0, "tokens": 0, "forward_s": 0.0, "prefill_s": 0.0}
    body = model.get_decoder()
    inner = body.forward

    def counted(*a, **kw):
        ids = kw.get("input_ids", a[0] if a else None)
        shape = (ids if ids is not None else kw["inputs_embeds"]).shape
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        seconds = time.perf_counter() - t0
        stats["forward_s"] += seconds
        stats["prefill_s"] = stats["prefill_s"] or seconds  # the first call: the prompts, the same work for both
        stats["calls"] += 1
        stats["tokens"] += int(shape[0]) * int(shape[1])
        return out

    body.forward = counted
    try:
        yield stats
    finally:
        del body.forward  # the instance attribute; the class's forward shows through again


def profile(fn, batch, model) -> dict:
    """One untimed-by-the-benchmark pass of fn(batch) under :func:`count_forwards`."""
    with count_forwards(model) as stats:
        t0 = time.perf_counter()
        fn(batch)
        stats["wall_s"] = time.perf_counter() - t0
    return stats


def bench(model, tokenizer, index, items, think: bool, batch_size: int, args) -> dict:
    rng = np.random.default_rng(batch_size)
    n = batch_size * max(1, args.batches_per_size)
    prompts, cands = make_prompts(rng, items, index, n, args.k, args.history, think)
    batches = [(prompts[i:i + batch_size], cands[i:i + batch_size]) for i in range(0, n, batch_size)]
    budget = args.reasoning_tokens if think else 0
    new_tokens, valid = [0], [0]

    def run_gr2(batch):
        results = gr2.constrained_decode(model, tokenizer, batch[0], batch[1], index=index,
                                         max_reasoning_tokens=budget, reasoning=think)
        new_tokens[0] = max(new_tokens[0], max(len(r.completion_ids) for r in results) + 1)
        valid[0] += sum(sorted(r.items.tolist()) == sorted(c.tolist()) for r, c in zip(results, batch[1]))

    tokenizer.padding_side = "left"
    encoded = [tokenizer(prompt_texts(tokenizer, b[0]), return_tensors="pt", padding=True, add_special_tokens=False)
               for b in batches]

    def run_generate(enc):
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=new_tokens[0], min_new_tokens=new_tokens[0], do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

    run_gr2(batches[0])  # warm-up (allocator, kernels), untimed; also fixes the token count
    valid[0] = 0
    t_gr2 = time_batches(run_gr2, batches, args.repeats)
    t_gen = time_batches(run_generate, encoded, args.repeats)
    lists = n * args.repeats
    out = {"gr2_lps": lists / t_gr2.sum(), "gen_lps": lists / t_gen.sum(),
           "gr2_p50": np.percentile(t_gr2, 50), "gr2_p99": np.percentile(t_gr2, 99),
           "gen_p50": np.percentile(t_gen, 50), "gen_p99": np.percentile(t_gen, 99),
           "valid": valid[0] / lists, "new_tokens": new_tokens[0]}
    if args.count_forwards:
        valid_before = valid[0]
        out["profile"] = {"gr2": profile(run_gr2, batches[0], model), "generate": profile(run_generate, encoded[0], model)}
        valid[0] = valid_before
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,smollm2")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes")
    parser.add_argument("--batches-per-size", type=int, default=2, help="distinct batches per batch size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--history", type=int, default=5)
    parser.add_argument("--reasoning-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--modes", default="think,answer", help="decoding modes to run")
    parser.add_argument("--count-forwards", action="store_true",
                        help="also count forward calls and tokens, and the time inside forward (module docstring)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    index, items = make_index(np.random.default_rng(0))
    print(f"torch threads {torch.get_num_threads()}; K={args.k}; think budget {args.reasoning_tokens} tokens; "
          f"{args.batches_per_size} batches x {args.repeats} repeats per size")
    print(f"{'model':8} {'mode':6} {'batch':>5} {'new tok':>7} {'gr2 lists/s':>11} {'gen lists/s':>11} "
          f"{'ratio':>6} {'gr2 p50/p99 s':>15} {'gen p50/p99 s':>15} {'valid':>6}")
    for name in args.models.split(","):
        model, tokenizer = load_model(name)
        for think in [mode == "think" for mode in args.modes.split(",")]:
            for b in (int(x) for x in args.batches.split(",")):
                r = bench(model, tokenizer, index, items, think, b, args)
                print(f"{name:8} {'think' if think else 'answer':6} {b:>5} {r['new_tokens']:>7} {r['gr2_lps']:>11.2f} "
                      f"{r['gen_lps']:>11.2f} {r['gr2_lps'] / r['gen_lps']:>6.2f} "
                      f"{r['gr2_p50']:>7.3f}/{r['gr2_p99']:<7.3f} {r['gen_p50']:>7.3f}/{r['gen_p99']:<7.3f} "
                      f"{r['valid']:>6.0%}", flush=True)
                for who, st in r.get("profile", {}).items():
                    print(f"    {who:8} forward calls {st['calls']:>4}  tokens {st['tokens']:>7}  "
                          f"inside forward {st['forward_s']:.3f} of {st['wall_s']:.3f} s "
                          f"({st['forward_s'] / st['wall_s']:.0%}); prefill {st['prefill_s']:.3f} s", flush=True)


if __name__ == "__main__":
    main()
