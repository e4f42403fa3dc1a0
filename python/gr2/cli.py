"""The ``gr2`` command line: one subcommand per pipeline stage, plus ``run`` for all of them.

Each stage module exposes ``add_arguments(parser)`` and ``main(args) -> int``; they are imported
only when their subcommand is used, so ``gr2 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gr2.errors import Gr2Error

# subcommand -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "rl": ("gr2.train.dapo", "DAPO reinforcement learning with verifiable rerank rewards (--ablation: conditional vs unconditional)"),
    "midtrain": ("gr2.train.midtrain", "stage 1: mid-train the LLM on the catalog's semantic IDs"),
    "traces": ("gr2.teacher", "teacher reasoning traces (targeted or rejection sampling)"),
    "sft": ("gr2.train.sft", "stage 2: reasoning SFT on the kept teacher traces"),
    "data": ("gr2.data.stage", "load a dataset, k-core it, order it chronologically (RUN_DIR/data)"),
    "sid": ("gr2.sid.stage", "embed item text, train the RQ-VAE, build the unique SID index (RUN_DIR/sid)"),
    "candidates": ("gr2.candidates", "fit the upstream ranker (SASRec/popularity/item-kNN) and write top-K candidate lists"),
    "eval": ("gr2.eval.stage", "score rerankings and baselines with bootstrap CIs; write eval/report.{md,json} and plots"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gr2", description="Generative reasoning reranker (GR2).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        stage_parser.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(stage_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except Gr2Error as e:
        print(f"gr2 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
