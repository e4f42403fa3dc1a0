"""The ``gr2`` command line: one subcommand per pipeline stage, plus ``run`` for all of them.

The stage subcommands come from the one stage registry (:mod:`gr2.pipeline.registry`), which gives each the
same ``--run-dir/--config/--set/--force`` flags; ``encode`` (Parquet embeddings -> codes or SIDs,
:mod:`gr2.encode_command`) is a tool, not a stage. Only the module of the chosen subcommand is imported,
so ``gr2 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gr2.errors import Gr2Error
from gr2.pipeline import registry
from gr2.pipeline.registry import STAGES

RUN_HELP = "run every stage (data ... eval) from a preset or config and write the report"
ENCODE_HELP = "encode a Parquet item table (id + embedding columns) into RQ codes, or look up its SIDs"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="gr2", description="Generative reasoning reranker (GR2).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_parser = sub.add_parser("run", help=RUN_HELP, description=RUN_HELP)
    if command == "run":
        from gr2 import pipeline

        pipeline.add_arguments(run_parser)
    encode_parser = sub.add_parser("encode", help=ENCODE_HELP, description=ENCODE_HELP)
    if command == "encode":  # not a stage: no stage.json, no config; its module imports pyarrow
        from gr2 import encode_command

        encode_command.add_arguments(encode_parser)
    for name, stage in STAGES.items():
        stage_parser = sub.add_parser(name, help=stage.help, description=stage.help)
        if name == command:
            registry.add_arguments(stage, stage_parser)
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
    try:
        if args.command == "run":
            from gr2 import pipeline

            return int(pipeline.main(args) or 0)
        if args.command == "encode":
            from gr2 import encode_command

            return encode_command.main(args)
        return registry.main(STAGES[args.command], args)
    except Gr2Error as e:
        print(f"gr2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gr2 {args.command}: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
