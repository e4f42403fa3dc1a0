"""The ``gr2`` command line: one subcommand per pipeline stage, plus ``run`` for all of them.

Each stage module exposes ``add_arguments(parser)`` and ``main(args) -> int``. Only the module of
the chosen subcommand is imported, so ``gr2 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gr2.errors import Gr2Error

# subcommand -> (module, one-line help), in pipeline order
STAGES: dict[str, tuple[str, str]] = {
    "run": ("gr2.pipeline", "run every stage (data ... eval) from a preset or config and write the report"),
    "data": ("gr2.data.stage", "load a dataset, k-core it, order it chronologically (RUN_DIR/data)"),
    "sid": ("gr2.sid.stage", "embed item text, train the RQ-VAE, build the unique SID index (RUN_DIR/sid)"),
    "candidates": ("gr2.candidates", "fit the upstream ranker (SASRec/popularity/item-kNN) and write top-K candidate lists"),
    "prompts": ("gr2.prompt_stage", "materialise every split's rerank requests (history, candidates, evidence) for all later stages"),
    "midtrain": ("gr2.train.midtrain", "stage 1: mid-train the LLM on the catalog's semantic IDs"),
    "traces": ("gr2.teacher", "teacher reasoning traces (targeted or rejection sampling)"),
    "sft": ("gr2.train.sft", "stage 2: reasoning SFT on the kept teacher traces"),
    "rl": ("gr2.train.dapo", "DAPO reinforcement learning with verifiable rerank rewards (--ablation: conditional vs unconditional)"),
    "rerank": ("gr2.rerank", "rerank the held-out candidate lists with a trained model under the constraint"),
    "eval": ("gr2.eval.stage", "score rerankings and baselines with bootstrap CIs; write eval/report.{md,json} and plots"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="gr2", description="Generative reasoning reranker (GR2).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        stage_parser.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(stage_parser)
    return parser


def _show_library_logs() -> None:
    """Library modules log through ``logging.getLogger(__name__)``; the CLI shows gr2's INFO lines
    (progress notes, "stale checkpoint ... ignored") on stderr, other libraries' logs as they were."""
    logger = logging.getLogger("gr2")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _show_library_logs()
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except Gr2Error as e:
        print(f"gr2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gr2 {args.command}: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
