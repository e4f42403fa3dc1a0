"""The evaluation report: report.json, report.md and PNG plots, one entry per method.

``methods`` maps a method name (``upstream``, ``random``, ``popularity``, ``itemknn``, later
``midtrain``, ``sft``, ``rl`` ...) to the dict :func:`gr2.eval.evaluate_rankings` returns, so a
later stage adds its reranker by adding one entry.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from gr2.errors import InvalidInputError
from gr2.eval.metrics import METRICS
from gr2.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text

RANK_METRICS = tuple(m for m in METRICS if m.startswith(("recall", "ndcg")))


def _fmt(entry: dict) -> str:
    return f"{entry['value']:.4f} [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]"


DELTA_METRICS = ("recall@1", "recall@5", "ndcg@5")  # the columns of the "Δ vs upstream" table


def paired_deltas(result: dict) -> tuple[str, dict] | None:
    """(baseline name, {metric: {"value", "ci_low", "ci_high"}}) of a method's paired difference:
    ``vs_upstream`` as the eval stage writes it, or ``vs`` as :func:`evaluate_rankings` returns it."""
    if "vs_upstream" in result:
        return "upstream", result["vs_upstream"]
    if "vs" in result:
        return result["vs"]["baseline"], {m: d for m, d in result["vs"].items() if m != "baseline"}
    return None


def fmt_delta(d: dict) -> str:
    """``+0.0123 [-0.0040, +0.0290]``, starred when the CI excludes 0."""
    star = "*" if d["ci_low"] > 0 or d["ci_high"] < 0 else ""
    return f"{d['value']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]{star}"


def delta_table(methods: dict[str, dict], metrics=DELTA_METRICS) -> list[str]:
    """Markdown tables "Δ vs <baseline> [95% CI]", one per baseline, one row per compared method."""
    by_baseline: dict[str, dict[str, dict]] = {}
    for name, result in methods.items():
        found = paired_deltas(result)
        if found is not None:
            by_baseline.setdefault(found[0], {})[name] = found[1]
    lines: list[str] = []
    for baseline, rows in by_baseline.items():
        lines += [f"Δ vs {baseline} [95% CI]: paired difference (method - {baseline}) on the same lists, "
                  "bootstrap over lists; * = CI excludes 0.", ""]
        lines.append("| method | " + " | ".join(f"Δ {m}" for m in metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        for name, deltas in rows.items():
            lines.append(f"| {name} | " + " | ".join(fmt_delta(deltas[m]) if m in deltas else "" for m in metrics) + " |")
        lines.append("")
    return lines


def mde_line(mde: dict) -> str:
    """The report's statement of the minimum detectable effect (``meta.mde`` of the eval stage)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - mde["alpha"] / 2) + NormalDist().inv_cdf(mde["power"])
    value = "none (too few lists)" if mde["value"] is None else f"{mde['value']:.4f}"
    line = (f"With {mde['lists']} lists the smallest {mde['metric']} gain detectable at {mde['power']:.0%} power "
            f"(two-sided alpha {mde['alpha']}) is {value}: MDE = {z:.2f} x sqrt((p (1 - p) + q (1 - q)) / {mde['lists']}), "
            f"q = p + MDE, p = upstream {mde['metric']} {mde['upstream_value']:.4f} (the SE of a paired difference "
            "between uncorrelated hits; a reranker that agrees with upstream on many lists has a smaller one).")
    paired = {n: v for n, v in mde.get("paired", {}).items() if v > 0}
    if paired:
        line += " From each method's paired bootstrap CI: " + ", ".join(f"{n} {v:.4f}" for n, v in paired.items()) + "."
    return line


def environment_line(env: dict) -> str:
    """One line naming the versions, CPU, device and commit that produced a report."""
    v = env.get("versions", {})
    parts = [f"{name} {v[name]}" for name in ("python", "gr2", "torch", "transformers", "numpy", "datasets") if v.get(name)]
    git = env.get("git") or {}
    commit = f"{git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}" if git.get("commit") else "unknown"
    return (f"{', '.join(parts)}; CPU {env.get('cpu_model')} ({env.get('cpu_count')} cores, "
            f"{env.get('torch_threads')} torch threads); CUDA device {env.get('cuda_device') or 'none'}; "
            f"{env.get('platform')}; commit {commit}")


def markdown(methods: dict[str, dict], meta: dict[str, Any]) -> str:
    lines = ["# gr2 evaluation", ""]
    for key, value in meta.items():
        if not isinstance(value, (dict, list)):
            lines.append(f"- {key}: {value}")
    if meta.get("environment"):
        lines.append(f"- environment: {environment_line(meta['environment'])}")
    lines += ["", "Metrics over the K-candidate lists (value [95% bootstrap CI]).", ""]
    lines.append("| method | n | " + " | ".join(METRICS) + " |")
    lines.append("|---|---|" + "---|" * len(METRICS))
    for name, result in methods.items():
        lines.append(f"| {name} | {result['n']} | " + " | ".join(_fmt(result[m]) for m in METRICS) + " |")
    lines.append("")
    lines += delta_table(methods)
    if meta.get("mde"):
        lines += [mde_line(meta["mde"]), ""]
    if meta.get("top1_agrees_with_evidence_line"):
        lines += ["Top-1 agreement with the prompt's evidence line (share of lists whose valid ranking starts with "
                  "the line's first item):", ""]
        lines += [f"- {name}: {value:.3f}" for name, value in meta["top1_agrees_with_evidence_line"].items()] + [""]
    lines += ["Position bias: input position (0-based) of the item ranked first, share of valid lists.", ""]
    k = max(len(r["position_bias"]) for r in methods.values())
    lines.append("| method | " + " | ".join(str(i) for i in range(k)) + " |")
    lines.append("|---|" + "---|" * k)
    for name, result in methods.items():
        counts = result["position_bias"]
        total = max(sum(counts), 1)
        lines.append(f"| {name} | " + " | ".join(f"{c / total:.3f}" for c in counts) + " |")
    lines += ["", "![metrics](metrics.png)", "", "![position bias](position_bias.png)", ""]
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_metrics(methods: dict[str, dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(methods)
    x = np.arange(len(RANK_METRICS))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.6 * len(RANK_METRICS) + 2, 4))
    for i, name in enumerate(names):
        r = methods[name]
        values = np.array([r[m]["value"] for m in RANK_METRICS])
        err = np.array([[values[j] - r[m]["ci_low"], r[m]["ci_high"] - values[j]] for j, m in enumerate(RANK_METRICS)]).T
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(x, RANK_METRICS)
    ax.set_ylabel("value (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=min(len(names), 4))
    ax.set_title("Reranking metrics over the candidate lists")
    data = _png(fig)
    plt.close(fig)
    return data


def plot_position_bias(methods: dict[str, dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(methods)
    k = max(len(r["position_bias"]) for r in methods.values())
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(0.6 * k + 3, 4))
    for i, name in enumerate(names):
        counts = np.zeros(k)
        counts[: len(methods[name]["position_bias"])] = methods[name]["position_bias"]
        share = counts / max(counts.sum(), 1)
        ax.bar(np.arange(k) + (i - (len(names) - 1) / 2) * width, share, width, label=name)
    ax.set_xticks(np.arange(k))
    ax.set_xlabel("input position of the item ranked first (0 = upstream top-1)")
    ax.set_ylabel("share of valid lists")
    ax.legend(fontsize=8, ncol=min(len(names), 4))
    ax.set_title("Position bias")
    data = _png(fig)
    plt.close(fig)
    return data


def write_report(out_dir: str | Path, methods: dict[str, dict], meta: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md, metrics.png and position_bias.png into ``out_dir``."""
    if not methods:
        raise InvalidInputError("write_report needs at least one method")
    for name, result in methods.items():
        missing = [m for m in (*METRICS, "n", "position_bias") if m not in result]
        if missing:
            raise InvalidInputError(f"method {name!r} lacks {missing}; pass the dict evaluate_rankings returns")
    out_dir = Path(out_dir)
    paths = {
        "json": out_dir / "report.json",
        "md": out_dir / "report.md",
        "metrics_png": out_dir / "metrics.png",
        "position_png": out_dir / "position_bias.png",
    }
    atomic_write_bytes(paths["metrics_png"], plot_metrics(methods))
    atomic_write_bytes(paths["position_png"], plot_position_bias(methods))
    atomic_write_text(paths["md"], markdown(methods, meta))
    atomic_write_json(paths["json"], {"meta": meta, "metrics": list(METRICS), "methods": methods})
    return paths
