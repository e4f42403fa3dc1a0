"""``gr2 run``: every stage from logs to an evaluated reranker, cached and resumable.

data -> sid -> candidates -> prompts -> midtrain -> traces -> sft -> rl -> rerank (each model) -> eval -> report

``arms`` (default ``["think"]``) names the reasoning arms (:mod:`gr2.arms`): traces, sft, rl and
their reranks run once per arm (``sft`` / ``sft_answer`` ...), so the report shows reasoning and
answer-only side by side.

A run config is a TOML file with one table per stage (``[data]``, ``[sid]``, ... see the presets
in ``gr2/presets/``); ``--set stage.key=value`` overrides single values. Each stage skips itself
when its ``stage.json`` matches the hash of its config and inputs, and the training stages resume
from their last checkpoint, so rerunning a killed ``gr2 run`` continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gr2 import rundir
from gr2.arms import ARM_STAGES, stage_dir
from gr2.config import apply_overrides, from_dict, load_toml, parse_override  # noqa: F401 (re-exported)
from gr2.errors import ConfigError
from gr2.pipeline.rerank import MODEL_STAGES, RerankConfig  # noqa: F401
from gr2.pipeline.registry import STAGE_ORDER, STAGES

PRESET_DIR = Path(__file__).parents[1] / "presets"


def _configs() -> dict[str, type]:
    """Config dataclass of every stage (imported here: they pull in torch and friends)."""
    return {name: stage.config_class() for name, stage in STAGES.items()}


@dataclass
class RunConfig:
    """A whole run: where it goes, which stages run, and each stage's config."""

    name: str = "run"
    run_dir: str = ""  # "" = runs/<name>
    description: str = ""
    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER))
    rerank_models: list[str] = field(default_factory=lambda: list(MODEL_STAGES))
    arms: list[str] = field(default_factory=lambda: ["think"])  # reasoning arms: "think", "answer" (gr2.arms)
    stage_configs: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


def build_run_config(table: dict[str, Any]) -> RunConfig:
    """Map a TOML document onto RunConfig + the stage dataclasses, rejecting unknown keys."""
    classes = _configs()
    table = dict(table)
    stage_tables = {name: table.pop(name, {}) for name in classes}
    run_fields = {f.name for f in dataclasses.fields(RunConfig)} - {"stage_configs"}
    for key, value in table.items():
        if key not in run_fields and isinstance(value, dict):
            hint = difflib.get_close_matches(key, list(classes), n=1)
            raise ConfigError(f"unknown stage table [{key}]{f' (did you mean [{hint[0]}]?)' if hint else ''}; "
                              f"stage tables: {list(classes)}")
    if "stage_configs" in table:
        raise ConfigError("stage_configs is not a config key: give each stage its own table, e.g. [sft]")
    run = from_dict(RunConfig, table, where="run")
    _check_name(run.name)
    unknown = [s for s in run.stages if s not in STAGE_ORDER]
    if unknown:
        raise ConfigError(f"run.stages: unknown stage(s) {unknown}; known: {list(STAGE_ORDER)}")
    from gr2.arms import ARMS

    bad_arms = [a for a in run.arms if a not in ARMS] or ([] if run.arms else ["(none)"])
    if bad_arms:
        raise ConfigError(f"run.arms: {bad_arms} are not arms {list(ARMS)}")
    bad_models = [s for s in run.rerank_models if s not in MODEL_STAGES]
    if bad_models:
        raise ConfigError(f"run.rerank_models: {bad_models} are not model stages {list(MODEL_STAGES)}")
    for name, cls in classes.items():
        if not isinstance(stage_tables[name], dict):
            raise ConfigError(f"[{name}] must be a table")
        run.stage_configs[name] = from_dict(cls, stage_tables[name], where=name)
    return run


def _check_name(name: str) -> None:
    """A run name is one folder under runs/: no separators, no "..", nothing hidden (run_dir is the
    way to put a run somewhere else)."""
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0:"):
        raise ConfigError(f"run.name must be a plain folder name (letters, digits, -, _), got {name!r}; "
                          "use run_dir (or --run-dir) to choose where the run goes")


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
        raise ConfigError(f"unknown preset {name!r}; presets: {known}")
    return path


def _one_line(summary: Any, limit: int = 160) -> str:
    if not isinstance(summary, dict):
        return str(summary)[:limit]
    parts = []
    for k, v in summary.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif isinstance(v, (int, str, bool)):
            parts.append(f"{k}={v}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _targets(run: RunConfig, stage: str) -> list[tuple[str, str]]:
    """(target, arm) pairs a stage runs for: one per arm for the arm stages and their reranks."""
    if stage == "rerank":
        models = [m for m in run.rerank_models if m in run.stages]
        return [(stage_dir(m, arm), arm) for m in models for arm in (run.arms if m in ARM_STAGES else ["think"])]
    if stage in ARM_STAGES:
        return [(stage, arm) for arm in run.arms]
    return [(stage, "think")]


def run_pipeline(run: RunConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the configured stages in order; returns the final report (also written to the run dir
    when the eval stage ran)."""
    from gr2.pipeline.report import write_run_report

    run_dir = rundir.check_run_dir(run.path)
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_json(run_dir / "run_config.json", {
        "name": run.name, "description": run.description, "stages": run.stages,
        "rerank_models": run.rerank_models, "arms": run.arms, **{k: v for k, v in run.stage_configs.items()},
    })
    world = pipeline_world(run)
    if world.rank != 0:
        log = _silent  # one progress log per run, not one per torchrun process
    timings: dict[str, float] = {}
    for stage in STAGE_ORDER:
        if stage not in run.stages:
            continue
        config = run.stage_configs[stage]
        for target, arm in _targets(run, stage):
            label = f"rerank:{target}" if stage == "rerank" else stage_dir(stage, arm)
            log(f"[gr2 run] {label} ...")
            start = time.perf_counter()
            run_stage = STAGES[stage].run_function()
            summary: dict[str, Any] = {}
            if STAGES[stage].distributed or world.rank == 0:  # single-process stages: rank 0 alone
                if stage == "rerank":
                    summary = run_stage(run_dir, target, config)
                elif stage in ARM_STAGES:
                    summary = run_stage(run_dir, config, arm=arm)
                else:
                    summary = run_stage(run_dir, config)
            world.barrier()  # the next stage reads what this one wrote
            timings[label] = round(time.perf_counter() - start, 1)
            log(f"[gr2 run] {label} done in {timings[label]:.1f}s: {_one_line(summary)}")
    if "eval" not in run.stages or world.rank != 0:  # the report is rank 0's
        return {"timings_s": timings}
    report = write_run_report(run_dir, run, timings)
    log(f"[gr2 run] report: {run_dir / 'report.md'}")
    return report


def _silent(_: str) -> None:
    return None


def pipeline_world(run: RunConfig):
    """The torchrun process group of a ``gr2 run`` (one process: a World of size 1). It joins with the
    backend the training stages will use (their ``device``), so they reuse it."""
    from gr2.train.devices import local_device
    from gr2.train.distributed import init_world

    device = next((getattr(run.stage_configs.get(s), "device", None) for s in ("midtrain", "sft", "rl")
                   if s in run.stage_configs), None) or "auto"
    return init_world(local_device(device))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"a shipped config: {sorted(p.stem for p in PRESET_DIR.glob('*.toml'))}")
    source.add_argument("--config", help="a run config TOML file (see gr2/presets/*.toml)")
    parser.add_argument("--run-dir", help="where the run goes (default runs/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="override one config value, e.g. --set sft.steps=50 (repeatable)")
    parser.add_argument("--stages", help="comma-separated subset of stages to run, e.g. data,sid")


def main(args: argparse.Namespace) -> int:
    table = load_toml(preset_path(args.preset) if args.preset else args.config)
    if args.run_dir:
        table["run_dir"] = args.run_dir
    if args.stages:
        table["stages"] = [s.strip() for s in args.stages.split(",") if s.strip()]
    run = build_run_config(apply_overrides(table, args.overrides))
    run_pipeline(run, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0
