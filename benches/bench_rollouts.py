"""Time DAPO rollout collection (rollouts + rewards + dynamic sampling, no update) on a run directory.

    OMP_NUM_THREADS=1 python benches/bench_rollouts.py --run-dir runs/demo --steps 4 [--set rollout_batch=1]

Builds the trainer from ``RUN/run_config.json``'s ``[rl]`` table (CPU, 1 torch thread), then calls
``DapoTrainer.collect()`` ``--steps`` times on the start model and prints seconds per step and per
generated group. The model is not updated, so every setting sees the same policy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gr2.config import from_dict
from gr2.train.dapo import DapoConfig, World, build_trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], help="rl.KEY=VALUE override (JSON value)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    table = json.loads((Path(args.run_dir) / "run_config.json").read_text())["rl"]
    table.update(device="cpu", tensorboard=False, eval_every=0)
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            table[key] = json.loads(value)
        except json.JSONDecodeError:
            table[key] = value
    config = from_dict(DapoConfig, table, where="rl")
    trainer, _, _ = build_trainer(Path(args.run_dir), config, World())
    times, groups, lengths = [], [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = trainer.collect()
        times.append(time.perf_counter() - t0)
        groups.append(batch.stats["generated_groups"])
        lengths.append(batch.stats["completion_length"])
        trainer.step_count += 1
    total = sum(times)
    print(json.dumps({"overrides": args.set, "constrained": config.constrained, "steps": args.steps,
                      "seconds_per_step": [round(t, 2) for t in times], "mean_seconds_per_step": round(total / args.steps, 2),
                      "generated_groups": groups, "seconds_per_group": round(total / sum(groups), 3),
                      "mean_completion_length": round(sum(lengths) / len(lengths), 1)}))


if __name__ == "__main__":
    main()
