"""Stage 3, the ``rl`` stage (docs/DESIGN.md §1) and its ``gr2 rl`` command-line entry.

Reads ``sft/model`` (or ``midtrain/model``, or the folder ``rl.base`` names), ``sid/index.gr2sid``,
``data/items`` and ``prompts/train`` (+ ``prompts/valid`` for the periodic evaluation); writes
``rl/model``, ``rl/checkpoints/step-*``, ``rl/metrics.jsonl`` (+ tensorboard) and ``rl/stage.json``.
``gr2 rl --ablation`` (:func:`run_ablation`) trains the conditional and the unconditional format
reward from the same start instead and writes ``rl_ablation/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from gr2.errors import ConfigError, DataError
from gr2.pipeline.inputs import load_prompt_config, load_requests
from gr2.pipeline.rerank import OUTPUT_GLOBS as RERANK_OUTPUTS
from gr2.rundir import atomic_write_json, mark_done, read_stage, stage_key
from gr2.train.checkpointing import Checkpointer, training_key
from gr2.train.devices import local_device, seed_everything
from gr2.train.distributed import World, begin_stage_on_rank0, init_world
from gr2.train.losses import check_finite_weights
from gr2.train.dapo.ablation import ablation
from gr2.train.dapo.config import DapoConfig
from gr2.train.dapo.data import RlData, rl_data
from gr2.train.dapo.start import load_start_model
from gr2.train.dapo.trainer import DapoTrainer, train


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


def start_model_dir(run_dir: Path, base: str, arm: str = "think") -> tuple[Path, str]:
    """The start model's folder and the stage that wrote it ("" for a folder named by ``rl.base``)."""
    from gr2 import arms

    if base in ("sft", "midtrain"):
        stage = arms.stage_dir(base, arm)
        path = run_dir / stage / "model"
        if not path.exists():
            raise DataError(f"{path} is missing; run the `{base}` stage first")
        return path, stage
    if base == "auto":
        for stage in (arms.stage_dir("sft", arm), "midtrain"):
            if (run_dir / stage / "model").exists():
                return run_dir / stage / "model", stage
        raise DataError(f"neither {run_dir}/{arms.stage_dir('sft', arm)}/model nor {run_dir}/midtrain/model exists; "
                        "run sft (or midtrain) first")
    path = Path(base)
    if not path.exists():
        raise ConfigError(f"rl.base {base!r} is neither sft, midtrain, auto nor an existing model folder")
    return path, ""


def rl_inputs(run_dir: Path, config: DapoConfig, arm: str = "think") -> list[str]:
    """The keys of what the rl stage reads: SID index, candidates, prompts, start model."""
    def key_of(stage: str) -> str:
        record = read_stage(run_dir / stage)
        return record["key"] if record else "missing"

    model_dir, base_stage = start_model_dir(run_dir, config.base, arm)
    return [key_of(s) for s in ("sid", "candidates", "prompts")] + [key_of(base_stage) if base_stage else str(model_dir)]


def load_rl_data(run_dir: Path, split: str, tokenizer: Any, index: Any, config: DapoConfig, limit: int = 0) -> RlData:
    """``prompts/<split>`` as :class:`~gr2.train.dapo.data.RlData`, rendered with the run's prompt settings."""
    from gr2.data import ItemCatalog

    return rl_data(load_requests(run_dir, split), load_prompt_config(run_dir), ItemCatalog.from_run_dir(run_dir), index,
                   tokenizer, config, limit=limit, name=f"prompts/{split}")


def build_trainer(run_dir: Path, config: DapoConfig, world: World,
                  arm: str = "think") -> tuple[DapoTrainer, RlData | None, dict]:
    """The trainer over the run's start model, SID index and train prompts, the valid prompts (None
    without ``rl.eval_every``) and what it started from (shared by :func:`run_rl` and :func:`run_ablation`)."""
    from gr2 import SidIndex
    from gr2.models import sid_tokens_of

    seed_everything(config.seed)
    model_dir, base_stage = start_model_dir(run_dir, config.base, arm)
    start = load_start_model(model_dir, config)
    index = SidIndex.load(run_dir / "sid" / "index.gr2sid")
    data = load_rl_data(run_dir, "train", start.tokenizer, index, config, config.max_train_prompts)
    eval_data = load_rl_data(run_dir, "valid", start.tokenizer, index, config, config.eval_prompts) if config.eval_every else None
    trainer = DapoTrainer(start.model, start.tokenizer, data, config, index=index,
                          sid_tokens=sid_tokens_of(start.tokenizer, index.level_sizes), world=world,
                          ref_model=start.ref_model, device=start.device)
    info = {"start_model": str(model_dir), "base_stage": base_stage, "train_prompts": len(data.targets),
            "dropped_no_target": data.dropped_no_target, "k": int(data.candidates.shape[1])}
    return trainer, eval_data, info


def run_ablation(run_dir: str | os.PathLike, config: DapoConfig = DapoConfig()) -> dict[str, Any]:
    """Train twice from the same start model (conditional / unconditional format reward) with
    periodic greedy evaluation on prompts/valid; write rl_ablation/{ablation.json, ablation.png}.

    Note: with constrained rollouts every output is valid, so the unconditional format reward is a
    constant that the group normalisation cancels (that arm trains on R_rank alone), while the
    conditional one still pays alpha only for improving (or keeping a first-placed target). The
    paper's setting, where the format reward can be missed, is ``rl.constrained = false``; the demo
    run's result in that setting: benches/README.md, "RL reward ablation"."""
    run_dir = Path(run_dir)
    world = init_world(local_device(config.device))

    def make(cfg: DapoConfig, out_dir: Path) -> tuple[DapoTrainer, RlData | None]:
        trainer, eval_data, _ = build_trainer(run_dir, cfg, world)
        return trainer, eval_data

    return ablation(make, config, run_dir / "rl_ablation", world, inputs=rl_inputs(run_dir, config))


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
