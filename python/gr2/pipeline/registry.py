"""The one stage registry: every pipeline stage's name, config class and runner, used by ``gr2 run``
(:mod:`gr2.pipeline.run`) and by each stage's own subcommand (:mod:`gr2.cli`).

Every stage subcommand takes the same flags, built here: ``--run-dir``, ``--config FILE`` (a run
config TOML; the stage reads its own ``[stage]`` table), ``--set KEY=VALUE`` (repeatable; ``KEY``
may carry the stage prefix, ``sft.lr=1e-4`` or ``lr=1e-4``; values are TOML), ``--force`` and, for
the stages that run once per reasoning arm, ``--arm``. A stage module may add a few flags of its
own (``add_arguments(parser)``, mapped onto config values by ``cli_overrides(args)``) and prints its
summary in ``main(args, config)``.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from gr2.config import apply_overrides, from_dict, load_toml
from gr2.errors import ConfigError
from gr2.rundir import check_run_dir


@dataclass(frozen=True)
class Stage:
    name: str  # subcommand, [table] of the run config, folder in the run directory
    module: str
    config: str  # config dataclass in ``module``
    runner: str  # ``runner(run_dir, config, *, force=..., [arm=...])`` in ``module``
    help: str
    arms: bool = False  # runs once per reasoning arm (gr2.arms)
    # trains with every torchrun process (midtrain, sft, rl); the other stages run on rank 0 alone
    # (one teacher request per list, one summary), the other ranks wait for it (`gr2 run`) or leave
    distributed: bool = False

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    def run_function(self) -> Callable[..., dict[str, Any]]:
        return getattr(importlib.import_module(self.module), self.runner)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", "gr2.pipeline.data", "DataConfig", "run_data",
          "load a dataset, k-core it, order it chronologically (RUN_DIR/data)"),
    Stage("sid", "gr2.pipeline.sid", "SidConfig", "run_sid",
          "embed item text, train the RQ-VAE, build the unique SID index (RUN_DIR/sid)"),
    Stage("candidates", "gr2.pipeline.candidates", "CandidatesConfig", "run_candidates",
          "fit the upstream ranker (SASRec/popularity/item-kNN) and write top-K candidate lists"),
    Stage("prompts", "gr2.pipeline.prompts", "PromptConfig", "run_prompts",
          "materialise every split's rerank requests (history, candidates, evidence) for all later stages"),
    Stage("midtrain", "gr2.pipeline.midtrain", "MidtrainConfig", "run_midtrain",
          "stage 1: mid-train the LLM on the catalog's semantic IDs", distributed=True),
    Stage("traces", "gr2.pipeline.traces", "TeacherConfig", "run_traces",
          "teacher reasoning traces (targeted or rejection sampling)", arms=True),
    Stage("sft", "gr2.pipeline.sft", "SftConfig", "run_sft", "stage 2: reasoning SFT on the kept teacher traces", arms=True,
          distributed=True),
    Stage("rl", "gr2.pipeline.rl", "DapoConfig", "run_rl",
          "DAPO reinforcement learning with verifiable rerank rewards (--ablation: conditional vs unconditional)",
          arms=True, distributed=True),
    Stage("rerank", "gr2.pipeline.rerank", "RerankConfig", "run_rerank",
          "rerank the held-out candidate lists with a trained model under the constraint"),
    Stage("eval", "gr2.pipeline.eval", "EvalConfig", "run_eval",
          "score rerankings and baselines with bootstrap CIs; write eval/report.{md,json} and plots"),
)}
STAGE_ORDER = tuple(STAGES)


def add_arguments(stage: Stage, parser: argparse.ArgumentParser) -> None:
    """The flags of ``gr2 <stage>``: the common ones, then the stage module's own."""
    parser.add_argument("--run-dir", required=True, help="run directory (runs/NAME)")
    parser.add_argument("--config", help=f"run config TOML; its [{stage.name}] table is read")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config value, e.g. --set {stage.name}.KEY=VALUE (repeatable; TOML values)")
    parser.add_argument("--force", action="store_true", help="rerun even when the stage's outputs are current")
    if stage.arms:
        parser.add_argument("--arm", default="think", choices=("think", "answer"),
                            help="reasoning arm: think (<think> + answer) or answer-only (see gr2.arms)")
    extra = getattr(importlib.import_module(stage.module), "add_arguments", None)
    if extra is not None:
        extra(parser)


def config_from_args(stage: Stage, args: argparse.Namespace) -> Any:
    """The stage's config: its ``--config`` table, then the module's own flags, then ``--set``."""
    table: dict[str, Any] = dict(load_toml(args.config).get(stage.name, {})) if args.config else {}
    if not isinstance(table, dict):
        raise ConfigError(f"[{stage.name}] in {args.config} must be a table")
    flags = getattr(importlib.import_module(stage.module), "cli_overrides", None)
    if flags is not None:
        for key, value in flags(args).items():
            node = table
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    prefix = f"{stage.name}."
    overrides = [o[len(prefix):] if o.strip().startswith(prefix) else o for o in args.overrides]
    return from_dict(stage.config_class(), apply_overrides(table, [o.strip() for o in overrides]), where=stage.name)


def torchrun_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of this process under torchrun; (0, 1) without it."""
    import os

    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ConfigError(f"RANK / WORLD_SIZE must be integers (set by torchrun): {e}") from None


def main(stage: Stage, args: argparse.Namespace) -> int:
    import json

    check_run_dir(args.run_dir)
    config = config_from_args(stage, args)
    rank, size = torchrun_rank()
    if size > 1 and not stage.distributed and rank != 0:
        return 0  # a single-process stage under torchrun: rank 0 runs it once, the others have nothing to do
    module = importlib.import_module(stage.module)
    if hasattr(module, "main"):
        return int(module.main(args, config) or 0)
    kwargs = {"arm": args.arm} if stage.arms else {}
    summary = stage.run_function()(args.run_dir, config, force=args.force, **kwargs)
    print(json.dumps(summary, indent=2, default=str))
    return 0
