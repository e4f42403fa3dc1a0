"""End-to-end constrained rerank decoding with SmolLM2-135M on the CPU, in one run:

  gr2            gr2.constrained_decode (greedy): KV cache, sparse output layer inside SID spans
  generate       model.generate, unconstrained, the same number of new tokens (min = max)
  generate+PCLP  model.generate with PrefixConstrainedLogitsProcessor (a Python rerank grammar
                 over a Python trie, parsing the prefix each step), the same token budget

Same prompts, same model, greedy. Prints the three times, the ratios, and the share of valid
permutations for the two constrained methods. The model is untrained on SIDs (new embedding rows),
so this measures cost, not quality. Run: python benches/bench_decode_e2e.py [--prompts 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import gr2
from gr2.decoding._setup import prompt_texts

LEVEL_SIZES = (256, 256, 256, 256)
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench"  # git-ignored


class ArrayIndex:
    """Item <-> SID lookups from arrays (the subset of gr2.SidIndex's API decoding needs)."""

    def __init__(self, items, codes):
        self.level_sizes, self.levels = list(LEVEL_SIZES), len(LEVEL_SIZES)
        self._codes = {int(i): c for i, c in zip(items, codes)}
        self._items = {tuple(int(x) for x in c): int(i) for i, c in zip(items, codes)}

    def sids(self, item_ids):
        return np.stack([self._codes[int(i)] for i in item_ids]).astype(np.uint16)

    def item_of(self, sid):
        return self._items.get(tuple(sid))


def build_prompts(rng, items, index, n_prompts, k, n_history):
    prompts, cands = [], []
    for _ in range(n_prompts):
        history = rng.choice(items, size=n_history, replace=False)
        cand = rng.choice(items, size=k, replace=False)
        hist_text = " ".join(gr2.sid_to_text(index.sids([h])[0]) for h in history)
        cand_text = "\n".join(f"{j + 1}. {gr2.sid_to_text(index.sids([c])[0])}" for j, c in enumerate(cand))
        prompts.append([
            {"role": "system", "content": "You are an expert recommender. Think briefly, then rank the candidates."},
            {"role": "user", "content": f"The user watched: {hist_text}\nCandidates:\n{cand_text}\n"
                                         "Answer as <think>...</think><answer>SIDs best first</answer>."},
        ])
        cands.append(cand)
    return prompts, np.asarray(cands, dtype=np.uint64)


class RerankGrammar:
    """The rerank grammar for prefix_allowed_tokens_fn: stateless, re-parses the generated prefix."""

    def __init__(self, sid_tokens, eos, reasoning_ids, budget, cands, index, prompt_len):
        self.t, self.eos, self.budget = sid_tokens, eos, budget
        self.reasoning_ids = reasoning_ids
        self.cands, self.index, self.prompt_len = cands, index, prompt_len
        self.code_of = sid_tokens.code_of_token()
        self.sids = [[tuple(int(x) for x in index.sids([c])[0]) for c in row] for row in cands]

    def __call__(self, batch_id, sent):
        t = self.t
        gen = sent[self.prompt_len:].tolist()
        if not gen:
            return [t.think_open]
        phase, used, prefix, n_reason = "reasoning", set(), (), 0
        for tok in gen[1:]:
            if phase == "reasoning":
                if tok == t.think_close:
                    phase = "answer_open"
                else:
                    n_reason += 1
            elif phase == "answer_open":
                phase = "items"
            elif phase == "items":
                phase, prefix = ("sid", ()) if tok == t.sid_begin else ("eos", ())
            elif phase == "sid":
                if tok == t.sid_end:
                    used.add(prefix)
                    phase = "items"
                else:
                    prefix = prefix + (self.code_of[tok][1],)
            else:
                return [self.eos]
        if phase == "reasoning":
            return self.reasoning_ids if n_reason < self.budget else [t.think_close]
        if phase == "answer_open":
            return [t.answer_open]
        if phase == "items":
            return [t.sid_begin] if len(used) < len(self.sids[batch_id]) else [t.answer_close]
        if phase == "sid":
            d = len(prefix)
            if d == len(LEVEL_SIZES):
                return [t.sid_end]
            return sorted({int(t.code_ids[d, s[d]]) for s in self.sids[batch_id]
                           if s not in used and s[:d] == prefix})
        return [self.eos]


def parse_items(ids, sid_tokens, index):
    """Items of a completion's answer block, or None when it is not a valid SID list."""
    code_of = sid_tokens.code_of_token()
    try:
        body = ids[ids.index(sid_tokens.answer_open) + 1: ids.index(sid_tokens.answer_close)]
    except ValueError:
        return None
    out, sid = [], None
    for tok in body:
        if tok == sid_tokens.sid_begin:
            sid = []
        elif tok == sid_tokens.sid_end and sid is not None:
            out.append(index.item_of(sid))
            sid = None
        elif sid is not None and tok in code_of:
            sid.append(code_of[tok][1])
        else:
            return None
    return out


def is_permutation(items, row):
    return items is not None and None not in items and sorted(items) == sorted(int(x) for x in row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--reasoning-tokens", type=int, default=16)
    parser.add_argument("--history", type=int, default=4, help="history items in each prompt")
    # One thread by default: on a loaded 2-core machine torch's second OpenMP thread made a forward
    # pass 4x slower (wake-up contention), for every method alike.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import PrefixConstrainedLogitsProcessor

    from gr2.models import load_smollm2

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(cache_dir=CACHE)
    sid_tokens = gr2.add_sid_tokens(tokenizer, level_sizes=LEVEL_SIZES)
    model.resize_token_embeddings(len(tokenizer))
    model.eval()
    print(f"SmolLM2-135M loaded in {time.perf_counter() - t0:.1f}s; vocab {len(tokenizer):,}; "
          f"torch threads {torch.get_num_threads()}")

    rng = np.random.default_rng(0)
    n_items = 1000
    flat = rng.choice(256**2, size=n_items, replace=False)  # unique first two levels => unique SIDs
    codes = np.stack([flat // 256, flat % 256, rng.integers(0, 256, n_items), rng.integers(0, 256, n_items)], 1)
    items = np.arange(n_items, dtype=np.uint64) + 10_000
    index = ArrayIndex(items, codes.astype(np.uint16))
    prompts, cands = build_prompts(rng, items, index, args.prompts, args.k, args.history)
    texts = prompt_texts(tokenizer, prompts)
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_len = enc["input_ids"].shape[1]
    eos = tokenizer.eos_token_id
    budget = args.reasoning_tokens
    print(f"{args.prompts} prompts, up to {prompt_len} prompt tokens, K={args.k}, reasoning budget {budget}")

    # Warm-up (allocator, kernels) on one prompt, untimed.
    gr2.constrained_decode(model, tokenizer, prompts[:1], cands[:1], index=index, max_reasoning_tokens=4)

    t0 = time.perf_counter()
    results = gr2.constrained_decode(model, tokenizer, prompts, cands, index=index, max_reasoning_tokens=budget)
    t_gr2 = time.perf_counter() - t0
    n_new = max(len(r.completion_ids) for r in results) + 1  # + EOS
    gr2_valid = sum(is_permutation(r.items.tolist(), cands[r.prompt_index]) and
                    parse_items(r.completion_ids, sid_tokens, index) == r.items.tolist() for r in results)

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    t_gen = time.perf_counter() - t0
    assert out.shape[1] - prompt_len == n_new

    # The prompt pass alone (identical for every method): generate one token.
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    t_prefill = time.perf_counter() - t0

    forbidden = {sid_tokens.think_open, sid_tokens.answer_open, sid_tokens.answer_close, eos,
                 *tokenizer.all_special_ids} - {sid_tokens.think_close}
    reasoning_ids = [i for i in range(len(tokenizer)) if i not in forbidden]
    grammar = RerankGrammar(sid_tokens, eos, reasoning_ids, budget, cands, index, prompt_len)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out_pclp = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  logits_processor=[PrefixConstrainedLogitsProcessor(grammar, num_beams=1)])
    t_pclp = time.perf_counter() - t0
    pclp_valid = sum(is_permutation(parse_items(out_pclp[i, prompt_len:].tolist(), sid_tokens, index), cands[i])
                     for i in range(len(prompts)))

    print(f"\nnew tokens per prompt: {n_new} (gr2 completions: "
          f"{min(len(r.completion_ids) for r in results) + 1}..{n_new})")
    print(f"prompt pass alone (generate 1 token): {t_prefill:.2f}s; 'decode' = total minus that")
    print(f"{'method':<28}{'total s':>9}{'decode s':>10}{'valid':>10}")
    rows = [("gr2.constrained_decode", t_gr2, f"{gr2_valid}/{len(prompts)}"),
            ("generate (unconstrained)", t_gen, "-"),
            ("generate + PCLP", t_pclp, f"{pclp_valid}/{len(prompts)}")]
    for name, t, valid in rows:
        print(f"{name:<28}{t:>9.2f}{t - t_prefill:>10.2f}{valid:>10}")
    print(f"\ntotal:  generate/gr2 = {t_gen / t_gr2:.2f}x, (generate+PCLP)/gr2 = {t_pclp / t_gr2:.2f}x")
    d = max(t_gr2 - t_prefill, 1e-9)
    print(f"decode: generate/gr2 = {(t_gen - t_prefill) / d:.2f}x, (generate+PCLP)/gr2 = {(t_pclp - t_prefill) / d:.2f}x")
    if gr2_valid != len(prompts):
        raise SystemExit("gr2 produced an invalid permutation: this is a bug")


if __name__ == "__main__":
    main()
