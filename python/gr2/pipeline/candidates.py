"""Stage `candidates`: the upstream ranker's top-K lists that the reranker learns to reorder.

Reads ``data/sequences`` and ``data/items``; writes ``candidates/{train,valid,test}`` (HF datasets:
``user_idx``, ``history`` (oldest -> newest, the last ``max_history`` items), ``candidates`` (K item
indices in upstream order), ``scores`` (their upstream scores), ``target``), ``candidates/fit_{split}``
(and ``fit_slice_<r>`` under rolling cutoffs) and ``candidates/report.json``. The protocol, the
rankers and the lists are :mod:`gr2.candidates`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from gr2.candidates import (UPSTREAMS, CandidatesConfig, fit_dataset, fit_ranker, fit_rankers, full_ranking_metrics,
                            make_split, rank_split, slice_groups, split_report, to_dataset)
from gr2.pipeline.inputs import fit_dir_name, load_data
from gr2.errors import ConfigError, DataError
from gr2.rundir import atomic_dir, atomic_write_json, begin_stage, mark_done, stage_key
from gr2.splits import SPLITS


def run_candidates(run_dir: str | Path, config: CandidatesConfig, *, force: bool = False) -> dict[str, Any]:
    """Fit the upstream rankers and write the candidate lists and their report (module docstring)."""
    run_dir = Path(run_dir)
    out = run_dir / "candidates"
    items, sequences, data_key = load_data(run_dir)
    key = stage_key(config, data_key)
    if (done := begin_stage(out, key, force=force)) is not None:
        return done
    started = time.perf_counter()
    n_items = len(items)
    if config.k > n_items:
        raise ConfigError(f"candidates.k={config.k} exceeds the catalog size {n_items}")
    split = make_split(sequences, config)
    if len(split.requests["test"]) == 0:
        raise DataError("no user has enough interactions for the protocol's test requests")
    rankers = fit_rankers(split, n_items, config)
    lists = {name: rank_split(rankers[name], split.requests[name], split.slices(name), config) for name in SPLITS}
    full_ranking: dict[str, dict] = {"valid": {}, "test": {}}
    for split_name in ("valid", "test"):
        req, slices = split.requests[split_name], split.slices(split_name)
        if not len(req):
            continue
        by_name = {config.upstream: rankers[split_name]}
        for name in ("popularity", "itemknn"):
            if name not in by_name:
                by_name[name] = {r: fit_ranker(name, split.fit_of_slice(split_name, r), n_items, config)
                                 for r, _ in slice_groups(slices)}
        for name, by_slice in by_name.items():
            full_ranking[split_name][name] = full_ranking_metrics(by_slice, req, slices, config)

    for split_name in SPLITS:
        with atomic_dir(out / split_name) as tmp:
            to_dataset(lists[split_name], config.max_history).save_to_disk(str(tmp))
        with atomic_dir(out / fit_dir_name(split_name)) as tmp:
            fit_dataset(split, split_name).save_to_disk(str(tmp))
    for r in range(1, len(split.slice_fit)):  # shared by the train and valid lists of slice r
        with atomic_dir(out / fit_dir_name("train", r)) as tmp:
            fit_dataset(split, "train", r).save_to_disk(str(tmp))
    protocol = (f"time: cutoffs at quantiles {config.time.train_cutoff} / {config.time.test_cutoff}"
                + (f", {config.time.rolling} rolling train slices" if config.time.rolling > 1 else "")
                if config.protocol == "time" else
                f"leave_one_out; train lists: last {config.train_windows} train items per user held out from a prefix ranker")
    report = {
        "upstream": config.upstream,
        "k": config.k,
        "mask_history": config.mask_history,
        "protocol": config.protocol,
        "train_protocol": protocol,
        "protocol_notes": split.notes,
        "coverage": {s: lists[s].coverage() for s in SPLITS},
        "splits": {s: split_report(lists[s]) for s in SPLITS},
        "full_ranking": full_ranking,
        "users": int(len(split.users)),
        "skipped_users_too_short": int(split.skipped_users),
        "items": n_items,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if config.upstream == "sasrec":
        report["sasrec_training"] = next(iter(rankers.values()))[0].history
    atomic_write_json(out / "report.json", report)
    summary = {
        "upstream": config.upstream,
        "protocol": config.protocol,
        "coverage": report["coverage"],
        "test_full_ranking": full_ranking["test"],
        "kept": {s: report["splits"][s]["kept"] for s in SPLITS},
        "seconds": report["seconds"],
    }
    mark_done(out, key, summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``gr2 candidates``' own shortcuts (the common flags come from gr2.pipeline.registry)."""
    parser.add_argument("--upstream", choices=UPSTREAMS, help="upstream ranker")
    parser.add_argument("--k", type=int, help="candidates per list")


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in {"upstream": args.upstream, "k": args.k}.items() if v is not None}


def main(args: argparse.Namespace, config: CandidatesConfig) -> int:
    summary = run_candidates(args.run_dir, config, force=args.force)
    cov = summary["coverage"]
    print(f"candidates ({summary['upstream']}): coverage train {cov['train']:.3f} valid {cov['valid']:.3f} test {cov['test']:.3f}")
    for name, m in summary["test_full_ranking"].items():
        print(f"  test full ranking {name:>10}: Recall@10 {m['recall@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}")
    return 0
