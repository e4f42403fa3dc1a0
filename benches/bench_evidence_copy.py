"""Can a from-scratch student learn to *copy* from its prompt, and how much data does it take?

The MovieLens demo asks its tiny student to rank by the prompt's co-engagement line (the
candidates by evidence, most first). This bench isolates that skill on the planted task
``rule="evidence"`` (:func:`gr2.synthetic.make_planted_task`): the target is a uniformly random
candidate that leads the evidence line; codes, history and upstream order carry nothing, so greedy
recall@1 sits at chance (0.1) until the model copies the line's first SID, then jumps to ~1.

Same model (2-layer Llama, hidden 64, from scratch; ``--hidden/--layers/--heads`` for others),
same lr/batch/steps, SFT on the trivial teacher's answer-only traces (target first), for each
``--loss-tokens`` value (``all``: every completion token; ``decisions``: only where constrained
decoding has a choice, ``sft.loss_tokens``) and each ``--lists`` value (distinct training lists;
100 more are held out). ``--rule last_item`` measures the other contextual rule. Prints greedy recall@1 on the held-out lists every ``--eval-every`` steps
and the baseline a user would otherwise get (the upstream order, and reading the evidence line
directly, which is 1.0 here by construction).

    python benches/bench_evidence_copy.py --lists 2000 --steps 600 --eval-every 50 --loss-tokens all decisions
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gr2 import synthetic as S


def curve(n_lists: int, steps: int, eval_every: int, seed: int, loss_tokens: str = "all", rule: str = "evidence",
          hidden: int = 64, layers: int = 2, heads: int = 2, lr: float = 3e-3) -> list[dict[str, float]]:
    task = S.make_planted_task(n_lists + 100, rule=rule, seed=seed)
    train, heldout = range(0, n_lists), range(n_lists, n_lists + 100)
    tokenizer, _ = S.make_tokenizer(task)
    model = S.make_model(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads, seed=seed)
    examples = S.sft_examples(task, tokenizer, train, teacher="target", loss_tokens=loss_tokens)
    points: list[dict[str, float]] = []
    clock = {"train": 0.0, "last": time.perf_counter()}

    def on_step(step: int, loss: float) -> None:
        if step % eval_every:
            return
        clock["train"] += time.perf_counter() - clock["last"]
        recall = S.greedy_recall_at_1(model, tokenizer, task, heldout)
        model.train()
        points.append({"step": step, "loss": round(loss, 4), "recall@1": recall, "train_s": round(clock["train"], 1)})
        print(f"  {rule} {loss_tokens} lists {n_lists:>5}  step {step:>5}  loss {loss:.3f}  held-out R@1 {recall:.3f}  "
              f"({clock['train']:.0f} s training)", flush=True)
        clock["last"] = time.perf_counter()

    print(f"lists {n_lists}: upstream R@1 {S.upstream_recall_at_1(task, heldout):.3f}", flush=True)
    S.sft_train(model, examples, tokenizer.pad_token_id, steps=steps, batch_size=16, lr=lr, seed=seed, on_step=on_step)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lists", type=int, nargs="+", default=[600, 4000])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-tokens", nargs="+", default=["all", "decisions"], choices=("all", "decisions"),
                        help="sft.loss_tokens: every completion token, or only where constrained decoding has a choice")
    parser.add_argument("--rule", default="evidence", choices=("evidence", "last_item"))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {f"{tokens} {n}": curve(n, args.steps, args.eval_every, args.seed, tokens, args.rule, args.hidden,
                                     args.layers, args.heads, args.lr)
              for tokens in args.loss_tokens for n in args.lists}
    print(json.dumps({name: pts[-1] for name, pts in result.items()}, indent=2))


if __name__ == "__main__":
    main()
