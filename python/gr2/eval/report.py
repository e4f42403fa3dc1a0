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


def markdown(methods: dict[str, dict], meta: dict[str, Any]) -> str:
    lines = ["# gr2 evaluation", ""]
    for key, value in meta.items():
        if not isinstance(value, (dict, list)):
            lines.append(f"- {key}: {value}")
    lines += ["", "Metrics over the K-candidate lists (value [95% bootstrap CI]).", ""]
    lines.append("| method | n | " + " | ".join(METRICS) + " |")
    lines.append("|---|---|" + "---|" * len(METRICS))
    for name, result in methods.items():
        lines.append(f"| {name} | {result['n']} | " + " | ".join(_fmt(result[m]) for m in METRICS) + " |")
    compared = {name: r["vs"] for name, r in methods.items() if "vs" in r}
    if compared:
        lines += ["", "Paired difference against the baseline on the same lists (value [95% CI]; * = CI excludes 0).", ""]
        lines.append("| method | vs | " + " | ".join(RANK_METRICS) + " |")
        lines.append("|---|---|" + "---|" * len(RANK_METRICS))
        for name, vs in compared.items():
            cells = []
            for m in RANK_METRICS:
                d = vs[m]
                star = "*" if d["ci_low"] > 0 or d["ci_high"] < 0 else ""
                cells.append(f"{d['value']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]{star}")
            lines.append(f"| {name} | {vs['baseline']} | " + " | ".join(cells) + " |")
    lines += ["", "Position bias: input position (0-based) of the item ranked first, share of valid lists.", ""]
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
