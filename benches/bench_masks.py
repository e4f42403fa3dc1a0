"""Mask time per decoding step against batch size, gr2 vs the baselines, in one run.

Rows are rerank requests (K = 10 candidates, 4-level SIDs of 256 codes) caught at random points of
their answer (inside SID spans, between items): the constrained part of decoding. For each batch
size and vocabulary size it times
  gr2 bitmask      ConstraintBatch.fill_bitmask: int32 rows in the xgrammar/vLLM layout
  gr2 processor    ConstraintBatch.allowed + apply_allowed on a copy of (B, V) scores (what
                   gr2.decoding.RerankLogitsProcessor does per step on CPU)
  transformers     PrefixConstrainedLogitsProcessor called on a copy of (B, V) scores, its
                   prefix_allowed_tokens_fn backed by a Python trie (stateless: parses the prefix)
  python trie      a stateful pure-Python trie writing the same int32 bitmask
("scores copy" is the copy both processors include) and prints the ratios. Run: python benches/bench_masks.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gr2 import _gr2
from gr2.decoding import apply_allowed

K, LEVELS, CODES = 10, 4, 256
TAG_BASE = 1000  # tags at 1000..1006, codes from 2000: inside any of the tested vocabularies
SID_BEGIN, SID_END, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, EOS = range(TAG_BASE, TAG_BASE + 7)
CODE_BASE = 2000


def code_token(level: int, code: int) -> int:
    return CODE_BASE + level * CODES + code


def token_map(vocab: int) -> _gr2.TokenMap:
    code_ids = np.array([[code_token(level, c) for c in range(CODES)] for level in range(LEVELS)], dtype=np.int64)
    return _gr2.TokenMap(code_ids, sid_begin=SID_BEGIN, sid_end=SID_END, think_open=THINK_OPEN,
                         think_close=THINK_CLOSE, answer_open=ANSWER_OPEN, answer_close=ANSWER_CLOSE, eos=EOS,
                         vocab_size=vocab)


class PyTrie:
    """Nested dicts code -> child, with the item ids under each node."""

    def __init__(self, items, codes):
        self.root: dict = {}
        self.leaf_item = {}
        for item, sid in zip(items, codes):
            node = self.root
            for c in sid:
                node = node.setdefault(int(c), {})
            self.leaf_item[tuple(int(c) for c in sid)] = int(item)
        self.sids = {int(i): tuple(int(c) for c in s) for i, s in zip(items, codes)}

    def allowed(self, prefix: tuple, used: set) -> list[int]:
        depth = len(prefix)
        if depth == LEVELS:
            return [SID_END]
        node = self.root
        for c in prefix:
            node = node[c]
        out = []
        for c in node:  # keep a code only if some unused item lies below it
            p = prefix + (c,)
            if any(s[: depth + 1] == p for i, s in self.sids.items() if i not in used):
                out.append(code_token(depth, c))
        return out


def stateless_allowed(trie: PyTrie, generated: list[int]) -> list[int]:
    """What a prefix_allowed_tokens_fn must do: re-parse the answer so far, then walk the trie."""
    used, prefix, inside = set(), (), False
    for tok in generated:
        if tok == SID_BEGIN:
            inside, prefix = True, ()
        elif tok == SID_END:
            used.add(trie.leaf_item[prefix])
            inside = False
        elif inside:
            prefix = prefix + ((tok - CODE_BASE) % CODES,)
    if inside:
        return trie.allowed(prefix, used)
    return [SID_BEGIN] if len(used) < K else [ANSWER_CLOSE]


def make_rows(batch_size: int, rng: np.random.Generator):
    """Random requests, each advanced to a random point of its answer. Returns candidates, codes and
    the token sequences generated so far."""
    cands = np.stack([rng.choice(10**6, size=K, replace=False) for _ in range(batch_size)]).astype(np.uint64)
    codes = rng.integers(0, CODES, size=(batch_size, K, LEVELS)).astype(np.uint16)
    codes[:, :, 0] = codes[:, :1, 0]  # every candidate shares its first code: longer open prefixes
    seqs = []
    for b in range(batch_size):
        order = rng.permutation(K)
        stop = int(rng.integers(1, K * (LEVELS + 2)))
        seq = [ANSWER_OPEN]
        for j in order:
            seq.append(SID_BEGIN)
            seq.extend(code_token(level, int(codes[b, j, level])) for level in range(LEVELS))
            seq.append(SID_END)
        seqs.append(seq[:stop])
    return cands, codes, seqs


def timed(fn, min_reps=5, budget_s=0.6) -> float:
    """Best-of-N seconds per call (the machine is shared, so the minimum is the stable figure)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(vocab: int, batch_size: int, rng: np.random.Generator) -> dict[str, float]:
    from transformers import PrefixConstrainedLogitsProcessor

    tm = token_map(vocab)
    cands, codes, seqs = make_rows(batch_size, rng)
    batch = _gr2.ConstraintBatch(tm)
    batch.add_rerank(cands, codes, reasoning="disabled")
    for b, seq in enumerate(seqs):
        for tok in seq:
            batch.advance(np.array([b]), np.array([tok]))
    tries = [PyTrie(cands[b], codes[b]) for b in range(batch_size)]

    bitmask = np.zeros((batch_size, tm.words), dtype=np.int32)
    scores = torch.randn(batch_size, vocab)
    forbidden = torch.as_tensor(tm.reasoning_forbidden())
    prompt_len = 8
    width = max(len(s) for s in seqs)
    input_ids = torch.full((batch_size, prompt_len + width), 5, dtype=torch.long)
    for b, seq in enumerate(seqs):  # left-pad the generated part so each row ends with its own tokens
        input_ids[b, prompt_len + width - len(seq):] = torch.tensor(seq)
    lengths = [len(s) for s in seqs]

    def prefix_fn(batch_id: int, sent: torch.Tensor) -> list[int]:
        generated = sent[len(sent) - lengths[batch_id]:].tolist()
        return stateless_allowed(tries[batch_id], generated)

    pclp = PrefixConstrainedLogitsProcessor(prefix_fn, num_beams=1)

    # Stateful pure-Python trie: the state (prefix, used) is already known; only fill the mask.
    states = []
    for b, seq in enumerate(seqs):
        used, prefix, inside = set(), (), False
        for tok in seq:
            if tok == SID_BEGIN:
                inside, prefix = True, ()
            elif tok == SID_END:
                used.add(tries[b].leaf_item[prefix])
                inside = False
            elif inside:
                prefix = prefix + ((tok - CODE_BASE) % CODES,)
        states.append((inside, prefix, used))

    def python_trie():
        bitmask.fill(0)
        for b, (inside, prefix, used) in enumerate(states):
            if inside:
                ids = tries[b].allowed(prefix, used)
            else:
                ids = [SID_BEGIN] if len(used) < K else [ANSWER_CLOSE]
            for t in ids:
                bitmask[b, t >> 5] |= np.int32(np.uint32(1 << (t & 31)).view(np.int32))

    def gr2_processor():
        apply_allowed(scores.clone(), batch.allowed(), forbidden)

    def hf():
        pclp(input_ids, scores.clone())

    def clone_only():
        scores.clone()

    out = {
        "gr2 bitmask": timed(lambda: batch.fill_bitmask(bitmask)),
        "gr2 processor": timed(gr2_processor),
        "transformers PCLP": timed(hf),
        "scores copy": timed(clone_only),
        "python trie": timed(python_trie),
    }
    # Same answer from every method (checked once per configuration, outside the timings).
    batch.fill_bitmask(bitmask)
    ours = bitmask.copy()
    python_trie()
    assert (ours == bitmask).all(), "gr2 and the Python trie disagree"
    masked = pclp(input_ids, scores.clone())
    assert torch.equal(torch.isfinite(masked), torch.isfinite(apply_allowed(scores.clone(), batch.allowed(), forbidden)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes")
    args = parser.parse_args()
    # One torch thread: on a loaded 2-core machine torch's second OpenMP thread adds 10-30 ms of
    # wake-up jitter to every small op, which would swamp the baselines' real cost.
    torch.set_num_threads(1)
    sizes = [1, 8, 64] if args.quick else [1, 8, 32, 64, 128, 512]
    rng = np.random.default_rng(0)
    print(f"torch threads: {torch.get_num_threads()}; rows inside rerank answers, K={K}, L={LEVELS}, {CODES} codes")
    for vocab in (49_152, 151_936):
        print(f"\nV = {vocab:,}: microseconds per step (best of N)")
        print(f"{'rows':>5} {'gr2 bitmask':>12} {'gr2 proc':>10} {'HF PCLP':>11} {'py trie':>10} {'copy':>9} "
              f"{'PCLP/bitmask':>13} {'PCLP/proc':>10} {'pytrie/bitmask':>15}")
        for b in sizes:
            r = bench(vocab, b, rng)
            us = {k: v * 1e6 for k, v in r.items()}
            print(f"{b:>5} {us['gr2 bitmask']:>12.1f} {us['gr2 processor']:>10.1f} {us['transformers PCLP']:>11.1f} "
                  f"{us['python trie']:>10.1f} {us['scores copy']:>9.1f} {r['transformers PCLP'] / r['gr2 bitmask']:>12.0f}x "
                  f"{r['transformers PCLP'] / max(r['gr2 processor'], 1e-9):>9.1f}x "
                  f"{r['python trie'] / r['gr2 bitmask']:>14.0f}x")


if __name__ == "__main__":
    main()
