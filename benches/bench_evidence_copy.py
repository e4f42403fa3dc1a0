"""Can a from-scratch student learn to *copy* from its prompt, and how much data does it take?

The MovieLens demo asks its tiny student to rank by the prompt's co-engagement line (the
candidates by evidence, most first). This bench isolates that skill on the planted task
``rule="evidence"`` (:func:`gr2.synthetic.make_planted_task`): the target is a uniformly random
candidate that leads the evidence line; codes, history and upstream order carry nothing, so greedy
recall@1 sits at chance (0.1) until the model copies the line's first SID, then jumps to ~1.

Same model (2-layer Llama, hidden 64, from scratch), same lr/batch/steps, SFT on the trivial
teacher's answer-only traces (target first), for each ``--lists`` value (distinct training lists;
100 more are held out). Prints greedy recall@1 on the held-out lists every ``--eval-every`` steps
and the baseline a user would otherwise get (the upstream order, and reading the evidence line
directly, which is 1.0 here by construction).

    PYTHONPATH=python python benches/bench_evidence_copy.py --lists 600 4000 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gr2 import synthetic as S


def curve(n_lists: int, steps: int, eval_every: int, seed: int) -> list[dict[str, float]]:
    task = S.make_planted_task(n_lists + 100, rule="evidence", seed=seed)
    train, heldout = range(0, n_lists), range(n_lists, n_lists + 100)
    tokenizer, _ = S.make_tokenizer(task)
    model = S.make_model(tokenizer, seed=seed)
    examples = S.sft_examples(task, tokenizer, train, teacher="target")
    points: list[dict[str, float]] = []
    clock = {"train": 0.0, "last": time.perf_counter()}

    def on_step(step: int, loss: float) -> None:
        if step % eval_every:
            return
        clock["train"] += time.perf_counter() - clock["last"]
        recall = S.greedy_recall_at_1(model, tokenizer, task, heldout)
        model.train()
        points.append({"step": step, "loss": round(loss, 4), "recall@1": recall, "train_s": round(clock["train"], 1)})
        print(f"  lists {n_lists:>5}  step {step:>5}  loss {loss:.3f}  held-out R@1 {recall:.3f}  "
              f"({clock['train']:.0f} s training)", flush=True)
        clock["last"] = time.perf_counter()

    print(f"lists {n_lists}: upstream R@1 {S.upstream_recall_at_1(task, heldout):.3f}", flush=True)
    S.sft_train(model, examples, tokenizer.pad_token_id, steps=steps, batch_size=16, lr=3e-3, seed=seed, on_step=on_step)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lists", type=int, nargs="+", default=[600, 4000])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {n: curve(n, args.steps, args.eval_every, args.seed) for n in args.lists}
    print(json.dumps({str(n): pts[-1] for n, pts in result.items()}, indent=2))


if __name__ == "__main__":
    main()
