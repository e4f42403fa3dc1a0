"""How long SFT takes before a student writes valid lists *unconstrained* -- what the order-copy
ablation (`gr2 rl --ablation`, issue 28.4) needs from its start.

SFT on a noisy teacher's traces (``gr2.synthetic.sft_examples``: the target first on ``--accuracy``
of the lists, the upstream order on the others) with the loss on every completion token, on a
planted task (``gr2.synthetic.make_planted_task``). Every ``--chunk`` steps: greedy unconstrained
validity, copy rate and recall@1 on 100 held-out lists (``gr2.train.dapo.trainer.evaluate`` with
``rl.constrained = false``) and the validity of 16 x 4 samples at temperature 1 (the rollouts the
ablation would train on). Writes ``log.json`` and the last ``model.pt`` under ``--out``.

    PYTHONPATH=python python benches/bench_unconstrained_format.py --rule evidence --steps 3000 --chunk 500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from gr2 import synthetic as S
from gr2.rewards import verify_rewards
from gr2.train.dapo import DapoConfig, DapoTrainer
from gr2.train.dapo.rollouts import sampled_rollouts
from gr2.train.dapo.trainer import evaluate


def sampled_validity(model, tokenizer, data, index, sid_tokens, config, ctx, seed: int, prompts: int = 16,
                     samples: int = 4) -> dict[str, float]:
    groups = sampled_rollouts(model, tokenizer, data.prompt_texts[:prompts], data.candidates[:prompts], samples,
                              [seed], config, ctx)
    rb = verify_rewards([c for g in groups for c in g], np.repeat(data.candidates[:prompts], samples, axis=0),
                        np.repeat(data.targets[:prompts], samples), index, sid_tokens=sid_tokens,
                        trailer_ids=sorted({ctx["eos_id"], ctx["pad_id"]}))
    s = rb.summary()
    return {"sampled_valid": s["valid_rate"], "sampled_copy": s["copy_rate"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", default="evidence", choices=S.RULES)
    p.add_argument("--lists", type=int, default=2100, help="the last 100 are held out")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--chunk", type=int, default=500, help="evaluate every this many steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--accuracy", type=float, default=0.5, help="the teacher ranks the target first on this share")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench_unconstrained_format")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    task = S.make_planted_task(args.lists, rule=args.rule, seed=0)
    tokenizer, sid_tokens = S.make_tokenizer(task)
    train_rows, heldout = range(args.lists - 100), range(args.lists - 100, args.lists)
    model = S.make_model(tokenizer, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads)
    examples = S.sft_examples(task, tokenizer, train_rows, accuracy=args.accuracy, loss_tokens="all", seed=0)
    config = DapoConfig(group_size=4, prompts_per_step=16, steps=1, reasoning=False, max_reasoning_tokens=0,
                        device="cpu", tensorboard=False, constrained=False, max_new_tokens=72)
    held = S.rl_data(task, tokenizer, heldout)
    trainer = DapoTrainer(model, tokenizer, S.rl_data(task, tokenizer, train_rows), config, index=task.index,
                          sid_tokens=sid_tokens, device=torch.device("cpu"))
    log, t0 = [], time.perf_counter()
    for done in range(0, args.steps, args.chunk):
        losses = S.sft_train(model, examples, tokenizer.pad_token_id, steps=args.chunk, batch_size=args.batch,
                             lr=args.lr, seed=done)
        seconds = time.perf_counter() - t0
        row = {"step": done + args.chunk, "train_seconds": round(seconds), "loss": float(np.mean(losses[-20:])),
               **evaluate(trainer, held),
               **sampled_validity(model, tokenizer, held, task.index, sid_tokens, config, trainer.ctx, seed=done)}
        t0 += time.perf_counter() - t0 - seconds  # evaluation time excluded
        log.append(row)
        print(json.dumps(row), flush=True)
        torch.save(model.state_dict(), out / "model.pt")
        (out / "log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
