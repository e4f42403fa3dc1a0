"""The final report of ``gr2 run``: ``<run_dir>/report.{json,md}`` plus the eval plots.

It gathers what each stage wrote (data stats, SID uniqueness, upstream coverage, teacher
acceptance, rerank latency and reasoning length, the eval metrics with their bootstrap CIs) into
one document that states which model, teacher, data and settings produced the numbers, and the
environment (package versions, CPU, device, commit: :func:`environment`) they were produced in.
Per learned method it shows the paired difference to the upstream order with its CI
(``vs_upstream``), the minimum detectable effect at the run's number of lists, and the RL stage's
training curves of every RL arm (``rl_curves.png`` from ``rl/metrics.jsonl``, ``rl_answer_curves.png`` from
``rl_answer/metrics.jsonl``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from gr2 import rundir
from gr2.errors import CorruptFileError, DataError
from gr2.eval.report import delta_table, environment_line, mde_line

VERSIONED = ("gr2", "torch", "transformers", "numpy", "datasets", "safetensors", "peft", "tokenizers", "pyarrow")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git(source: Path) -> dict[str, Any] | None:
    """The commit of the checkout gr2 runs from (an editable install), or None (a wheel)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if (top / "python" / "gr2").resolve() != source.resolve():  # installed inside some other repository
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def environment() -> dict[str, Any]:
    """Where a report's numbers came from: Python and package versions (torch with its CUDA
    build), the CPU model (/proc/cpuinfo) and core counts, torch's thread count, the CUDA device if
    any, the platform, and the git commit of the gr2 sources when they are a checkout."""
    import gr2

    versions: dict[str, Any] = {"python": platform.python_version()}
    versions.update({name: _version(name) for name in VERSIONED})
    versions["gr2"] = getattr(gr2, "__version__", None) or versions["gr2"]  # the running extension's version
    env: dict[str, Any] = {"versions": versions, "cpu_model": _cpu_model(), "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        env["cpus_usable"] = len(os.sched_getaffinity(0))
    env["torch_threads"] = None
    env["cuda_device"] = None
    try:
        import torch

        versions["torch"] = torch.__version__  # with the local build tag (+cu132, +cpu)
        versions["torch_cuda"] = torch.version.cuda
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name(0)
            env["cuda_devices"] = torch.cuda.device_count()
    except ImportError:
        pass
    env["platform"] = platform.platform()
    env["python_implementation"] = f"{platform.python_implementation()} {sys.version.split()[0]}"
    env["git"] = _git(Path(gr2.__file__).resolve().parent)
    return env

METHOD_ORDER = ("upstream", "random", "popularity", "itemknn", "evidence_line", "teacher", "midtrain", "sft", "sft_answer", "rl", "rl_answer")
RANK_METRICS = ("recall@1", "recall@3", "recall@5", "ndcg@3", "ndcg@5")


def _read(path: Path) -> dict | None:
    return rundir.load_json(path) if path.exists() else None


def _method_entry(result: dict) -> dict[str, Any]:
    entry: dict[str, Any] = {m: result[m] for m in RANK_METRICS}
    entry["validity"] = result["validity"]["value"]
    entry["order_copy_rate"] = result["order_copy"]["value"]
    entry["n"] = result["n"]
    entry["position_bias"] = result["position_bias"]
    for paired in ("vs_upstream", "vs_think", "vs_sft"):
        if paired in result:
            entry[paired] = result[paired]
    return entry


CURVES = (  # (panel title, [(metrics.jsonl key, label, line style, colour)]): absent keys are skipped
    ("reward (training rollouts)", [("reward_mean", "reward", "-", "C0"), ("r_rank_mean", "R_rank", ":", "C1")]),
    ("validity", [("valid_rate", "training rollouts", "-", "C0"), ("eval_valid_rate", "valid split (greedy)", "--", "C1")]),
    ("valid split (greedy rerank)", [("eval_recall@1", "recall@1", "-", "C0"), ("eval_ndcg@5", "ndcg@5", "-", "C1"),
                                     ("eval_pre_recall@1", "upstream recall@1", ":", "C0"),
                                     ("eval_pre_ndcg@5", "upstream ndcg@5", ":", "C1")]),
)


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a trainer's ``metrics.jsonl`` (:class:`gr2.train.metric_log.MetricLogger`)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CorruptFileError(f"{path} line {number} is not JSON: {e}") from e
    return rows


def plot_rl_curves(rows: list[dict[str, Any]]) -> tuple[bytes, list[str]] | None:
    """A PNG of the RL curves against step (one panel per group of :data:`CURVES` that has data)
    and the keys plotted; None when no row holds any of them."""
    panels = []
    for title, series in CURVES:
        lines = []
        for key, label, style, colour in series:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
            if points:
                lines.append((key, label, style, colour, points))
        if lines:
            panels.append((title, lines))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from gr2.eval.report import _png

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for _, label, style, colour, points in lines:
            steps, values = zip(*points)
            ax.plot(steps, values, style, color=colour, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data, [key for _, lines in panels for key, *_ in lines]


def _teacher_label(run: Any) -> str:
    teacher = run.stage_configs.get("traces")
    if teacher is None:
        return "none"
    if teacher.backend == "heuristic":
        return "heuristic teacher (offline stand-in: metadata + co-occurrence scores, not an LLM)"
    if teacher.backend == "openai":
        return f"LLM teacher {teacher.model} at {teacher.endpoint}"
    return f"local LLM teacher {teacher.local_model}"


def build_report(run_dir: Path, run: Any, timings: dict[str, float]) -> dict[str, Any]:
    evaluation = _read(run_dir / "eval" / "report.json")
    if evaluation is None:
        raise DataError(f"{run_dir / 'eval' / 'report.json'} is missing; the eval stage must run before the report")
    stats = _read(run_dir / "data" / "stats.json") or {}
    sid = _read(run_dir / "sid" / "report.json") or {}
    cands = _read(run_dir / "candidates" / "report.json") or {}
    traces = _read(run_dir / "traces" / "report.json")
    methods = {name: _method_entry(evaluation["methods"][name]) for name in METHOD_ORDER if name in evaluation["methods"]}
    for name, result in evaluation["methods"].items():
        methods.setdefault(name, _method_entry(result))
    split = evaluation["meta"].get("split", "test")
    decoding = {}
    for stage in ("midtrain", "sft", "sft_answer", "rl", "rl_answer"):
        info = (rundir.read_stage(run_dir / stage, record=f"rerank_{split}.json") or {}).get("summary")
        if info:
            decoding[stage] = {k: info[k] for k in ("latency_ms_per_list", "reasoning_tokens_mean", "reasoning_tokens_max",
                                                    "max_reasoning_tokens", "lists", "batch_size", "device")}
    midtrain_cfg = run.stage_configs.get("midtrain")
    midtrain = _read(run_dir / "midtrain" / "report.json") or {}
    sft = _read(run_dir / "sft" / "report.json") or {}
    return {
        "name": run.name,
        "description": run.description,
        "dataset": {k: stats.get(k) for k in ("source", "users", "items", "interactions", "avg_seq_len") if k in stats} or stats,
        "coverage": evaluation["meta"].get("coverage", cands.get("coverage")),
        "upstream": cands.get("upstream"),
        "sid": {k: sid.get(k) for k in ("uniqueness_before_repair", "uniqueness_after_repair", "levels", "codebook_size")},
        "model": getattr(midtrain_cfg, "base_model", None),
        "teacher": _teacher_label(run),
        "traces": traces,
        "methods": methods,
        "decoding": decoding,
        "next_item": midtrain.get("eval"),
        "sft_heldout_nll": {k: sft[k] for k in ("heldout_before", "heldout_after", "heldout_traces") if k in sft} or None,
        "eval": evaluation["meta"],
        "mde": evaluation["meta"].get("mde"),
        "environment": environment(),
        "timings_s": timings,
    }


def _fmt(entry: dict) -> str:
    return f"{entry['value']:.4f} [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]"


def _verdict(methods: dict[str, dict]) -> list[str]:
    """One line per RL arm (``rl``, ``rl_answer``) and metric: against the upstream order and against
    the SFT model it started from, paired on the same lists."""
    lines = []
    for rl in ("rl", "rl_answer"):
        if rl not in methods or "upstream" not in methods:
            continue
        name = "RL" if rl == "rl" else "RL (answer-only)"
        if "vs_upstream" not in methods[rl]:
            lines += _unpaired_verdict(methods, rl, name)
            continue
        for baseline, key in (("the upstream order", "vs_upstream"), ("its SFT start", "vs_sft")):
            for metric in ("recall@1", "ndcg@5"):
                if key not in methods[rl]:
                    continue
                d = methods[rl][key][metric]
                ci = f"{d['value']:+.4f}, 95% CI [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
                if d["ci_low"] > 0:
                    lines.append(f"- {name} beats {baseline} on {metric}: paired difference {ci}, above 0.")
                elif d["ci_high"] < 0:
                    lines.append(f"- {name} is **worse** than {baseline} on {metric}: paired difference {ci}, below 0.")
                else:
                    lines.append(f"- {name} does **not** beat {baseline} on {metric}: paired difference {ci} includes 0.")
    return lines


def _unpaired_verdict(methods: dict[str, dict], rl: str, name: str) -> list[str]:
    lines = []
    for metric in ("recall@1", "ndcg@5"):
        value, up = methods[rl][metric], methods["upstream"][metric]
        half_width = (value["ci_high"] - value["ci_low"]) / 2
        gap = value["value"] - up["value"]
        if gap > half_width:
            lines.append(f"- {name} beats the upstream order on {metric} by {gap:+.4f} (more than the CI half-width {half_width:.4f}).")
        else:
            lines.append(f"- {name} does **not** beat the upstream order on {metric} by more than the CI half-width "
                         f"({gap:+.4f} vs {half_width:.4f}).")
    return lines


def _arm_lines(methods: dict[str, dict]) -> list[str]:
    """Think vs answer-only, paired on the same lists (gr2.arms)."""
    lines = []
    for name, m in methods.items():
        if "vs_think" not in m:
            continue
        think = name.removesuffix("_answer")
        for metric in ("recall@1", "ndcg@5"):
            d = m["vs_think"][metric]
            ci = f"{d['value']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
            if d["ci_low"] > 0:
                verdict = "answer-only is better"
            elif d["ci_high"] < 0:
                verdict = "reasoning is better"
            else:
                verdict = "no significant difference"
            lines.append(f"- {name} - {think} on {metric}: {ci}: {verdict}.")
    return (["## Think vs answer-only", "", "Paired difference (answer-only - reasoning) with 95% CI:", "", *lines, ""]
            if lines else [])


def _next_item_lines(ev: dict[str, Any]) -> list[str]:
    """The mid-trained model's next-item retrieval against popularity on the same users."""
    ci = ev.get("ci95", {})
    lines = [f"## Mid-training: next-item retrieval ({ev['split']}, {ev['users']} users)", "", ev["method"], "",
             "| metric | model | popularity | model - popularity (95% CI) |", "|---|---|---|---|"]
    for metric in ("recall@10", "ndcg@10", "recall@1"):
        if metric in ev["model"]:
            diff = ci.get("model_minus_popularity", {}).get(metric)
            diff_text = f"[{diff[0]:+.4f}, {diff[1]:+.4f}]" if diff else ""
            lines.append(f"| {metric} | {ev['model'][metric]:.4f} | {ev['popularity'][metric]:.4f} | {diff_text} |")
    return lines + [""]


def markdown(report: dict[str, Any], run: Any) -> str:
    methods = report["methods"]
    lines = [f"# gr2 run report: {report['name']}", ""]
    if report["description"]:
        lines += [report["description"], ""]
    lines += [
        "## What produced these numbers",
        "",
        f"- data: {report['dataset']}",
        f"- base model: {report['model']}",
        f"- teacher: {report['teacher']}",
        f"- semantic IDs: uniqueness before repair {report['sid'].get('uniqueness_before_repair')}, "
        f"after repair {report['sid'].get('uniqueness_after_repair')}, levels {report['sid'].get('levels')}, "
        f"codebook size {report['sid'].get('codebook_size')}",
        f"- upstream coverage (share of {report['eval'].get('split')} users whose target is in the top-K): {report['coverage']}",
        f"- lists scored: {report['eval'].get('lists')}; bootstrap: {report['eval'].get('bootstrap')}",
        "- full settings: `run_config.json` in this directory",
        "",
        "## Reranking metrics (value [95% CI]) over lists that contain the target",
        "",
        "| method | n | " + " | ".join(RANK_METRICS) + " | validity | order copy |",
        "|---|---|" + "---|" * (len(RANK_METRICS) + 2),
    ]
    for name, m in methods.items():
        lines.append(f"| {name} | {m['n']} | " + " | ".join(_fmt(m[k]) for k in RANK_METRICS)
                     + f" | {m['validity']:.3f} | {m['order_copy_rate']:.3f} |")
    lines.append("")
    lines += delta_table(methods)
    if report.get("mde"):
        lines += [mde_line(report["mde"]), ""]
    lines += [*_verdict(methods), ""]
    lines += _arm_lines(methods)
    for stage, curves in (report.get("rl_curves") or {}).items():
        lines += [f"## RL training curves ({stage})", "",
                  f"From `{stage}/metrics.jsonl` ({curves['rows']} rows; plotted: "
                  f"{', '.join(curves['keys'])}). The valid-split curves appear when `rl.eval_every` > 0.",
                  "", f"![{stage} curves]({curves['png']})", ""]
    if report["decoding"]:
        lines += ["## Constrained decoding", "", "| model | lists | ms per list | reasoning tokens (mean / max / budget) | device |",
                  "|---|---|---|---|---|"]
        for stage, d in report["decoding"].items():
            lines.append(f"| {stage} | {d['lists']} | {d['latency_ms_per_list']} | {d['reasoning_tokens_mean']:.1f} / "
                         f"{d['reasoning_tokens_max']} / {d['max_reasoning_tokens']} | {d['device']} |")
        lines.append("")
    if report.get("next_item"):
        lines += _next_item_lines(report["next_item"])
    if report.get("sft_heldout_nll"):
        nll = report["sft_heldout_nll"]
        lines += ["## SFT: held-out NLL per token (before = the mid-trained model)", "",
                  "| tokens | before SFT | after SFT |", "|---|---|---|"]
        for part in ("answer_nll", "reasoning_nll"):
            lines.append(f"| {part.removesuffix('_nll')} | {nll['heldout_before'][part]:.4f} | {nll['heldout_after'][part]:.4f} |")
        lines += ["", f"On {nll.get('heldout_traces')} held-out teacher traces.", ""]
    if report["traces"]:
        lines += ["## Teacher traces", "", f"```\n{rundir.to_json(report['traces']).strip()}\n```", ""]
    if report.get("environment"):
        lines += ["## Environment", "", f"- {environment_line(report['environment'])}",
                  "- locked versions: `scripts/constraints.txt` (what `make setup` installs)", ""]
    lines += ["## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["timings_s"].items()]
    lines += ["", "![metrics](metrics.png)", "", "![position bias](position_bias.png)", ""]
    return "\n".join(lines)


def write_run_report(run_dir: str | Path, run: Any, timings: dict[str, float]) -> dict[str, Any]:
    run_dir = Path(run_dir)
    report = build_report(run_dir, run, timings)
    for png in ("metrics.png", "position_bias.png"):
        if (run_dir / "eval" / png).exists():
            rundir.atomic_write_bytes(run_dir / png, (run_dir / "eval" / png).read_bytes())
    for stage in ("rl", "rl_answer"):  # every RL arm gets its curves
        curves_log = run_dir / stage / "metrics.jsonl"
        rows = read_metrics_log(curves_log) if curves_log.exists() else []
        plotted = plot_rl_curves(rows) if rows else None
        if plotted is not None:
            png, keys = plotted
            rundir.atomic_write_bytes(run_dir / f"{stage}_curves.png", png)
            report.setdefault("rl_curves", {})[stage] = {"png": f"{stage}_curves.png", "keys": keys, "rows": len(rows)}
    rundir.atomic_write_json(run_dir / "report.json", report)
    rundir.atomic_write_text(run_dir / "report.md", markdown(report, run))
    return report
