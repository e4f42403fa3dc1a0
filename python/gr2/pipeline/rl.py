"""Stage 3, the ``rl`` stage (docs/DESIGN.md §1) and its ``gr2 rl`` command-line entry.

Reads ``sft/model`` (or ``midtrain/model``), ``sid/index.gr2sid``, ``data/items`` and
``candidates/train`` (+ ``candidates/valid`` for the periodic evaluation); writes ``rl/model``,
``rl/checkpoints/step-*``, ``rl/metrics.jsonl`` (+ tensorboard) and ``rl/stage.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from gr2.errors import ConfigError
from gr2.pipeline.rerank import OUTPUT_GLOBS as RERANK_OUTPUTS
from gr2.rundir import atomic_write_json, mark_done, stage_key
from gr2.train.checkpointing import Checkpointer, training_key
from gr2.train.devices import local_device
from gr2.train.distributed import begin_stage_on_rank0, init_world
from gr2.train.losses import check_finite_weights
from gr2.train.dapo.ablation import run_ablation
from gr2.train.dapo.config import DapoConfig
from gr2.train.dapo.start import build_trainer, rl_inputs
from gr2.train.dapo.trainer import train


def run_rl(run_dir: str | os.PathLike, config: DapoConfig = DapoConfig(), *, arm: str = "think",
           force: bool = False) -> dict[str, Any]:
    """The ``rl`` stage of ``arm`` (:mod:`gr2.arms`): DAPO from sft/model (or midtrain/model) on
    prompts/train -> rl/model (``rl_answer/`` for the answer-only arm, which sets rl.reasoning off)."""
    from gr2 import arms
    from gr2.models import save_pretrained_atomic

    run_dir = Path(run_dir)
    if not arms.reasoning(arm):
        config = dataclasses.replace(config, reasoning=False, max_reasoning_tokens=0)
    elif not config.reasoning:
        raise ConfigError("rl.reasoning = false in the think arm; train answer-only with the `answer` arm "
                          "(run.arms = [\"answer\"] or `gr2 rl --arm answer`)")
    out_dir = run_dir / arms.stage_dir("rl", arm)
    inputs = rl_inputs(run_dir, config, arm)
    key = stage_key(config, *inputs)
    world = init_world(local_device(config.device))
    if (done := begin_stage_on_rank0(world, out_dir, key, force=force)) is not None:
        return done
    trainer, eval_data, info = build_trainer(run_dir, config, world, arm)
    last = train(trainer, out_dir, eval_data, inputs=inputs)
    summary = {**info, "arm": arm, "steps": trainer.step_count, "world_size": world.size,
               **{k: v for k, v in last.items() if isinstance(v, (int, float))}}
    check_finite_weights(trainer.model, "rl")
    if world.rank == 0:
        save_pretrained_atomic(trainer.model, trainer.tokenizer, out_dir / "model")
        atomic_write_json(out_dir / "summary.json", summary)
        for name in ("best_policy.pt", "best.json"):  # rl.select's copy: rl/model holds it now
            (out_dir / name).unlink(missing_ok=True)  # (before the record, which vouches for every file left)
        mark_done(out_dir, key, summary, exclude=RERANK_OUTPUTS)
        Checkpointer(out_dir / "checkpoints", training_key(config, *inputs)).cleanup()
    world.barrier()  # every rank returns once the stage is done (a next stage must not read a half-written rl/)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``gr2 rl``'s own flags (the common ones come from gr2.pipeline.registry)."""
    parser.add_argument("--steps", type=int, help="override rl.steps")
    parser.add_argument("--unconditional", action="store_true", help="unconditional format reward (the hack)")
    parser.add_argument("--ablation", action="store_true",
                        help="conditional vs unconditional reward from the same start model; writes rl_ablation/")


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {} if args.steps is None else {"steps": args.steps}
    return {**values, "conditional": False} if args.unconditional else values


def main(args: argparse.Namespace, config: DapoConfig) -> int:
    if args.ablation:
        result = run_ablation(args.run_dir, config)
        print(json.dumps(result["final"], indent=2))
    else:
        print(json.dumps(run_rl(args.run_dir, config, arm=args.arm, force=args.force), indent=2))
    return 0
