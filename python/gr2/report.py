"""The final report of ``gr2 run``: ``<run_dir>/report.{json,md}`` plus the eval plots.

It gathers what each stage wrote (data stats, SID uniqueness, upstream coverage, teacher
acceptance, rerank latency and reasoning length, the eval metrics with their bootstrap CIs) into
one document that states which model, teacher, data and settings produced the numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gr2 import rundir
from gr2.errors import DataError

METHOD_ORDER = ("upstream", "random", "popularity", "itemknn", "midtrain", "sft", "rl")
RANK_METRICS = ("recall@1", "recall@3", "recall@5", "ndcg@3", "ndcg@5")


def _read(path: Path) -> dict | None:
    return rundir.load_json(path) if path.exists() else None


def _method_entry(result: dict) -> dict[str, Any]:
    entry: dict[str, Any] = {m: result[m] for m in RANK_METRICS}
    entry["validity"] = result["validity"]["value"]
    entry["order_copy_rate"] = result["order_copy"]["value"]
    entry["n"] = result["n"]
    entry["position_bias"] = result["position_bias"]
    return entry


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
    for stage in ("midtrain", "sft", "rl"):
        info = _read(run_dir / stage / f"rerank_{split}.json")
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
        "timings_s": timings,
    }


def _fmt(entry: dict) -> str:
    return f"{entry['value']:.4f} [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]"


def _verdict(methods: dict[str, dict]) -> list[str]:
    if "rl" not in methods or "upstream" not in methods:
        return []
    lines = []
    for metric in ("recall@1", "ndcg@5"):
        rl, up = methods["rl"][metric], methods["upstream"][metric]
        half_width = (rl["ci_high"] - rl["ci_low"]) / 2
        gap = rl["value"] - up["value"]
        if gap > half_width:
            lines.append(f"- RL beats the upstream order on {metric} by {gap:+.4f} (more than the CI half-width {half_width:.4f}).")
        else:
            lines.append(f"- RL does **not** beat the upstream order on {metric} by more than the CI half-width "
                         f"({gap:+.4f} vs {half_width:.4f}).")
    return lines


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
    lines += ["", *_verdict(methods), ""]
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
    rundir.atomic_write_json(run_dir / "report.json", report)
    rundir.atomic_write_text(run_dir / "report.md", markdown(report, run))
    return report
