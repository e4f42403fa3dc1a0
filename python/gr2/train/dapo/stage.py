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

from gr2.errors import ConfigError, DataError
from gr2.rerank import OUTPUT_GLOBS as RERANK_OUTPUTS
from gr2.rundir import atomic_write_json, mark_done, read_stage, stage_key
from gr2.train import common
from gr2.train.dapo.config import DapoConfig
from gr2.train.dapo.data import RlData, load_rl_data
from gr2.train.dapo.trainer import DapoTrainer, train
from gr2.train.common import World, init_world


def _start_model_dir(run_dir: Path, base: str, arm: str = "think") -> tuple[Path, str]:
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


def _stage_input_key(run_dir: Path, stage: str) -> str:
    record = read_stage(run_dir / stage)
    return record["key"] if record else "missing"


def build_trainer(run_dir: Path, config: DapoConfig, world: World,
                  arm: str = "think") -> tuple[DapoTrainer, RlData | None, dict]:
    """Load start model, index and data for the stage (shared by run_rl and the ablation)."""
    from gr2 import SidIndex
    from gr2.models import load_pretrained, sid_tokens_of

    common.seed_everything(config.seed)
    model_dir, base_stage = _start_model_dir(run_dir, config.base, arm)
    device = common.local_device(config.device)
    dtype = common.choose_dtype(device, config.dtype)
    model, tokenizer = load_pretrained(model_dir, dtype=common.param_dtype(dtype))  # float32 master weights
    index = SidIndex.load(run_dir / "sid" / "index.gr2sid")
    sid_tokens = sid_tokens_of(tokenizer, index.level_sizes)
    data = load_rl_data(run_dir, "train", tokenizer, index, config, config.max_train_prompts)
    eval_data = None
    if config.eval_every:
        eval_data = load_rl_data(run_dir, "valid", tokenizer, index, config, config.eval_prompts)
    ref_model = None
    if config.kl_coef > 0:
        ref_model, _ = load_pretrained(model_dir, dtype=dtype)
        ref_model.to(device).eval().requires_grad_(False)
    trainer = DapoTrainer(model, tokenizer, data, config, index=index, sid_tokens=sid_tokens, world=world,
                          ref_model=ref_model, device=device)
    info = {"start_model": str(model_dir), "base_stage": base_stage, "train_prompts": len(data.targets),
            "dropped_no_target": data.dropped_no_target, "k": int(data.candidates.shape[1])}
    return trainer, eval_data, info


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
    inputs = _rl_inputs(run_dir, config, arm)
    key = stage_key(config, *inputs)
    world = init_world(common.local_device(config.device))
    if (done := common.begin_stage_on_rank0(world, out_dir, key, force=force)) is not None:
        return done
    trainer, eval_data, info = build_trainer(run_dir, config, world, arm)
    last = train(trainer, out_dir, eval_data, inputs=inputs)
    summary = {**info, "arm": arm, "steps": trainer.step_count, "world_size": world.size,
               **{k: v for k, v in last.items() if isinstance(v, (int, float))}}
    common.check_finite_weights(trainer.model, "rl")
    if world.rank == 0:
        save_pretrained_atomic(trainer.model, trainer.tokenizer, out_dir / "model")
        atomic_write_json(out_dir / "summary.json", summary)
        mark_done(out_dir, key, summary, exclude=RERANK_OUTPUTS)
        common.Checkpointer(out_dir / "checkpoints", common.training_key(config, *inputs)).cleanup()
        for name in ("best_policy.pt", "best.json"):  # rl.select's copy: rl/model holds it now
            (out_dir / name).unlink(missing_ok=True)
    world.barrier()  # every rank returns once the stage is done (a next stage must not read a half-written rl/)
    return summary


def _rl_inputs(run_dir: Path, config: DapoConfig, arm: str = "think") -> list[str]:
    """The keys of what the rl stage reads: SID index, candidates, prompts, start model."""
    model_dir, base_stage = _start_model_dir(run_dir, config.base, arm)
    inputs = [_stage_input_key(run_dir, s) for s in ("sid", "candidates", "prompts")]
    inputs.append(_stage_input_key(run_dir, base_stage) if base_stage else str(model_dir))
    return inputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``gr2 rl``'s own flags (the common ones come from gr2.stages)."""
    parser.add_argument("--steps", type=int, help="override rl.steps")
    parser.add_argument("--unconditional", action="store_true", help="unconditional format reward (the hack)")
    parser.add_argument("--ablation", action="store_true",
                        help="conditional vs unconditional reward from the same start model; writes rl_ablation/")


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {} if args.steps is None else {"steps": args.steps}
    return {**values, "conditional": False} if args.unconditional else values


def main(args: argparse.Namespace, config: DapoConfig) -> int:
    if args.ablation:
        from gr2.train.dapo.ablation import run_ablation  # the ablation builds on this module

        result = run_ablation(args.run_dir, config)
        print(json.dumps(result["final"], indent=2))
    else:
        print(json.dumps(run_rl(args.run_dir, config, arm=args.arm, force=args.force), indent=2))
    return 0
