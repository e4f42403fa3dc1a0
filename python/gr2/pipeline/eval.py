"""Stage `eval`: score every reranking method and the baselines on the same candidate lists.

Reads ``candidates/<split>`` (lists containing the target), ``candidates/report.json`` (coverage)
and ``data/sequences`` (train split, for the popularity and item-kNN baselines). Methods are
rankings files (:func:`gr2.eval.rankings.save_rankings`: ``list_id``, ``rankings`` (B, K), ``valid`` (B,)), named
in ``EvalConfig.methods`` or found as ``<run_dir>/<stage>/rankings_<split>.npz`` (``discover``).
When methods cover only some lists (an LLM decoded on a sample), every method and baseline is
scored on the lists all methods share, so the comparison stays paired; the report says how many.

Writes ``eval/report.json``, ``eval/report.md``, ``eval/metrics.png``, ``eval/position_bias.png``.
Every method but the upstream order carries ``vs_upstream``: the paired difference (method -
upstream) per ranking metric with its bootstrap CI over the same lists; ``meta.mde`` states the
smallest recall@1 gain the run's number of lists can detect, ``meta.environment`` the package
versions, CPU and commit that produced the numbers.
Full-population numbers follow from the coverage in the report: Recall@k over all users =
coverage x Recall@k over the lists.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gr2.candidates import ItemKNNConfig, list_fit_slices, slice_groups
from gr2.pipeline.inputs import load_data, load_fit_sequences, load_requests
from gr2.errors import ConfigError, DataError
from gr2.eval.baselines import popularity_order, random_order, score_order, upstream_order
from gr2.eval.metrics import check_lists, evaluate_rankings, min_detectable_effect, paired_mde
from gr2.eval.rankings import load_rankings
from gr2.eval.report import write_report
from gr2.pipeline.report import environment
from gr2.rundir import begin_stage, hash_file, mark_done, read_stage, stage_key
from gr2.upstream import check_items
from gr2.upstream.itemknn import ItemKNNRanker
from gr2.upstream.popularity import PopularityRanker


REPORT_FORMAT = 4  # bump when report.json gains fields, so cached eval stages rerun (2: vs_upstream, mde, environment; 3: vs_sft; 4: evidence_line)


@dataclass
class EvalConfig:
    split: str = "test"  # "test" | "valid"
    n_boot: int = 1000  # bootstrap resamples
    seed: int = 0  # bootstrap and random-baseline seed
    invalid: str = "miss"  # invalid outputs: "miss" (score 0) | "upstream" (fall back to upstream order)
    methods: dict[str, str] = field(default_factory=dict)  # name -> rankings .npz (relative to run dir)
    discover: bool = True  # also use <run_dir>/<stage>/rankings_<split>.npz, named after the stage
    itemknn: ItemKNNConfig = field(default_factory=ItemKNNConfig)  # the second-ranker baseline

    def __post_init__(self) -> None:
        if self.split not in ("test", "valid"):
            raise ConfigError(f"eval.split must be 'test' or 'valid', got {self.split!r}")
        if self.invalid not in ("miss", "upstream"):
            raise ConfigError(f"eval.invalid must be 'miss' or 'upstream', got {self.invalid!r}")
        if self.n_boot < 1:
            raise ConfigError(f"eval.n_boot must be >= 1, got {self.n_boot}")


def find_methods(run_dir: Path, config: EvalConfig) -> dict[str, Path]:
    methods = {name: run_dir / p for name, p in config.methods.items()}
    if config.discover:
        for path in sorted(run_dir.glob(f"*/rankings_{config.split}.npz")):
            methods.setdefault(path.parent.name, path)
    return methods


def align(method: dict[str, np.ndarray], row_of_list: dict[int, int], candidates: np.ndarray, name: str):
    """Rows of the split each method row refers to; checks the method saw the same lists."""
    rows = np.array([row_of_list.get(int(u), -1) for u in method["list_id"]], dtype=np.int64)
    if (rows < 0).any():
        bad = int(method["list_id"][rows < 0][0])
        raise DataError(f"method {name!r} ranks list {bad}, which is not in this split")
    if len(np.unique(rows)) != len(rows):
        raise DataError(f"method {name!r} ranks some list twice")
    if "candidates" in method:
        theirs = np.sort(method["candidates"], axis=1)
        ours = np.sort(candidates[rows], axis=1)
        if theirs.shape != ours.shape or not np.array_equal(theirs, ours):
            raise DataError(f"method {name!r} was run on different candidate lists; rerun it on the current candidates")
    return rows


def statistic_orders(run_dir: Path, config: Any, n_items: int, fit_slices: np.ndarray,
                     histories: list[np.ndarray], candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The popularity and item-kNN orders of the lists, each fitted on what the list's upstream
    ranker saw (its split's fit data; its slice's under rolling cutoffs)."""
    popularity = np.empty_like(candidates)
    itemknn = np.empty_like(candidates)
    for r, rows in slice_groups(fit_slices):
        fit = load_fit_sequences(run_dir, config.split, r)
        knn = ItemKNNRanker.fit(fit, n_items, neighbors=config.itemknn.neighbors, shrink=config.itemknn.shrink,
                                recency_decay=config.itemknn.recency_decay)
        popularity[rows] = popularity_order(candidates[rows], PopularityRanker.fit(fit, n_items).counts)
        itemknn[rows] = score_order(candidates[rows], knn.score_candidates([histories[i] for i in rows], candidates[rows]))
    return popularity, itemknn


def run_eval(run_dir: str | Path, config: EvalConfig, *, force: bool = False) -> dict[str, Any]:
    from datasets import load_from_disk

    run_dir = Path(run_dir)
    out = run_dir / "eval"
    cand_dir = run_dir / "candidates"
    cand_record = read_stage(cand_dir)
    if cand_record is None:
        raise DataError(f"{cand_dir} has no finished candidates stage; run `gr2 candidates` first")
    items, sequences, data_key = load_data(run_dir)
    method_paths = find_methods(run_dir, config)
    key = stage_key(config, data_key, cand_record["key"], f"report-format:{REPORT_FORMAT}",
                    *[f"{n}:{hash_file(p)}" for n, p in method_paths.items() if p.exists()])
    if (done := begin_stage(out, key, force=force)) is not None:
        return done

    lists = load_from_disk(str(cand_dir / config.split))
    if len(lists) == 0:
        raise DataError(f"candidates/{config.split} is empty: no list contains its target")
    candidates, targets = check_lists(np.asarray(lists["candidates"], dtype=np.int64), np.asarray(lists["target"]))
    candidates = candidates.astype(np.int64)
    targets = targets.astype(np.int64)
    check_items(f"candidates/{config.split}", candidates, len(items))
    if "list_id" not in lists.column_names:
        raise DataError(f"candidates/{config.split} has no list_id column (made by an older gr2); rerun `gr2 candidates`")
    list_id = np.asarray(lists["list_id"], dtype=np.int64)
    user_idx = np.asarray(lists["user_idx"], dtype=np.int64)
    row_of_list = {int(u): i for i, u in enumerate(list_id)}
    if len(row_of_list) != len(list_id):
        raise DataError(f"candidates/{config.split} repeats a list_id")

    loaded = {name: load_rankings(p) for name, p in method_paths.items()}
    method_rows = {name: align(m, row_of_list, candidates, name) for name, m in loaded.items()}
    shared = np.arange(len(candidates))
    for rows in method_rows.values():
        shared = np.intersect1d(shared, rows)
    if len(shared) == 0:
        raise DataError("the methods share no list; evaluate them on the same users")

    c, t = candidates[shared], targets[shared]
    # the stored (capped) histories: item-kNN weighs recent items most, so the cap barely matters
    history_column = lists["history"]
    histories = [np.asarray(history_column[int(i)], dtype=np.int64) for i in shared]
    all_valid = np.ones(len(shared), dtype=bool)
    popularity, itemknn = statistic_orders(run_dir, config, len(items), list_fit_slices(lists)[shared], histories, c)
    rankings = {
        "upstream": (upstream_order(c), all_valid),
        "random": (random_order(c, config.seed), all_valid),
        "popularity": (popularity, all_valid),
        "itemknn": (itemknn, all_valid),
    }
    line = evidence_line(run_dir, config.split, list_id[shared], c)
    if line is not None:  # the prompts' evidence line read as a ranking: what a pure copier scores
        rankings["evidence_line"] = (line, all_valid)
    for name, m in loaded.items():
        if name in rankings:
            raise ConfigError(f"method name {name!r} clashes with a baseline; rename it")
        position = {int(r): j for j, r in enumerate(method_rows[name])}
        take = np.array([position[int(r)] for r in shared])
        rankings[name] = (m["rankings"][take], m["valid"][take].astype(bool))
    results = {
        name: evaluate_rankings(
            r, v, c, t, n_boot=config.n_boot, seed=config.seed, invalid=config.invalid,
            baseline=None if name == "upstream" else rankings["upstream"], groups=user_idx[shared],
        )
        for name, (r, v) in rankings.items()
    }
    for result in results.values():
        vs = result.pop("vs", None)
        if vs is not None:
            result["vs_upstream"] = {m: d for m, d in vs.items() if m != "baseline"}
    # think vs answer-only (gr2.arms): the paired difference answer - think on the same lists
    for name in results:
        think = name.removesuffix("_answer")
        if name.endswith("_answer") and think in rankings:
            paired = evaluate_rankings(*rankings[name], c, t, n_boot=config.n_boot, seed=config.seed,
                                       invalid=config.invalid, baseline=rankings[think], baseline_name=think,
                                       groups=user_idx[shared])["vs"]
            results[name]["vs_think"] = {m: d for m, d in paired.items() if m != "baseline"}
    # what RL added: rl - sft (and rl_answer - sft_answer), paired on the same lists
    for name in results:
        start = name.replace("rl", "sft", 1)
        if name.startswith("rl") and start in rankings:
            paired = evaluate_rankings(*rankings[name], c, t, n_boot=config.n_boot, seed=config.seed,
                                       invalid=config.invalid, baseline=rankings[start], baseline_name=start,
                                       groups=user_idx[shared])["vs"]
            results[name]["vs_sft"] = {m: d for m, d in paired.items() if m != "baseline"}
    cand_report = json.loads((cand_dir / "report.json").read_text())
    meta = {
        "split": config.split,
        "lists": int(len(shared)),
        "lists_in_split": int(len(candidates)),
        "k": int(candidates.shape[1]),
        "upstream": cand_report.get("upstream"),
        "coverage": cand_report.get("coverage", {}).get(config.split),
        "invalid_policy": config.invalid,
        "bootstrap": {"n_boot": config.n_boot, "seed": config.seed, "level": 0.95,
                      "kind": "percentile, paired, resampling users (all lists of a user together)"},
        "users": int(len(np.unique(user_idx[shared]))),
        "protocol": cand_report.get("protocol", "leave_one_out"),
        "methods_from": {name: str(p) for name, p in method_paths.items()},
        "note": "Recall/NDCG over lists that contain the target; over all users multiply by coverage.",
        "mde": mde_meta(results, len(shared)),
        # share of lists whose valid ranking starts with the evidence line's first item: how much of
        # a student's top-1 is copying the line it was shown
        "top1_agrees_with_evidence_line": None if line is None else {
            name: round(float(np.mean(v & (r[:, 0] == line[:, 0]))), 4) for name, (r, v) in rankings.items()},
        "environment": environment(),
    }
    write_report(out, results, meta)
    summary = {name: {m: r[m]["value"] for m in ("recall@1", "ndcg@5", "validity")} for name, r in results.items()}
    mark_done(out, key, summary)
    return summary


def evidence_line(run_dir: Path, split: str, list_ids: np.ndarray, candidates: np.ndarray) -> np.ndarray | None:
    """The candidates of each list in the order the prompt's evidence line showed them (None when
    the run's prompts carry no evidence); rows follow ``list_ids``."""
    from gr2.prompts import evidence_order

    if read_stage(run_dir / "prompts") is None:
        return None
    table = load_requests(run_dir, split)
    if "evidence" not in table.column_names or table[0]["evidence"] is None:
        return None
    row_of = {int(i): j for j, i in enumerate(table["list_id"])}
    missing = [int(i) for i in list_ids if int(i) not in row_of]
    if missing:
        raise DataError(f"prompts/{split} lacks list {missing[0]} of candidates/{split}; rerun `gr2 prompts`")
    chosen = table.select([row_of[int(i)] for i in list_ids])
    if not np.array_equal(np.asarray(chosen["candidates"], dtype=np.int64), candidates):
        raise DataError(f"prompts/{split} shows other candidates than candidates/{split}; rerun `gr2 prompts`")
    scores = np.asarray(chosen["evidence"], dtype=np.float64)
    return np.take_along_axis(candidates, evidence_order(scores), axis=1)


def mde_meta(results: dict[str, dict], lists: int, alpha: float = 0.05, power: float = 0.8) -> dict[str, Any]:
    """The minimum detectable recall@1 effect at this number of lists (``meta.mde`` of the report)."""
    p = results["upstream"]["recall@1"]["value"]
    return {
        "metric": "recall@1",
        "lists": int(lists),
        "alpha": alpha,
        "power": power,
        "upstream_value": p,
        "value": mde if np.isfinite(mde := min_detectable_effect(p, lists, alpha=alpha, power=power)) else None,
        "formula": "MDE = (z_{1-alpha/2} + z_power) * sqrt((p (1 - p) + q (1 - q)) / lists), q = p + MDE, "
                   "p = upstream recall@1 (z sum 2.80): the SE of a paired difference between uncorrelated "
                   "per-list hits; smaller for rerankers that agree with upstream on many lists",
        "paired": {name: paired_mde(r["vs_upstream"]["recall@1"], alpha=alpha, power=power)
                   for name, r in results.items() if "vs_upstream" in r},
        "paired_formula": "(z_{1-alpha/2} + z_power) * (ci_high - ci_low) / (2 * 1.96) of the method's paired "
                          "bootstrap CI of (method - upstream) recall@1",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``gr2 eval``'s own flags (the common ones come from gr2.pipeline.registry)."""
    parser.add_argument("--split", choices=("test", "valid"), help="which candidate lists to score")
    parser.add_argument("--method", action="append", default=[], metavar="NAME=PATH",
                        help="a rankings .npz to score (repeatable; path relative to the run dir)")


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {"split": args.split} if args.split else {}
    for spec in args.method:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--method expects NAME=PATH, got {spec!r}")
        values[f"methods.{name}"] = path
    return values


def main(args: argparse.Namespace, config: EvalConfig) -> int:
    summary = run_eval(args.run_dir, config, force=args.force)
    for name, m in summary.items():
        print(f"{name:>12}: R@1 {m['recall@1']:.4f}  NDCG@5 {m['ndcg@5']:.4f}  valid {m['validity']:.3f}")
    print(f"report: {Path(args.run_dir) / 'eval' / 'report.md'}")
    return 0
