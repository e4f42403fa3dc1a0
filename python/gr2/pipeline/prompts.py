"""Stage ``prompts``: every split's rerank requests, materialised once for all later stages.

Reads ``candidates/{train,valid,test}`` and ``candidates/fit_{split}`` (and ``fit_slice_<r>`` under
rolling cutoffs); writes ``prompts/<split>`` (HF datasets: ``list_id``, ``user_idx``, ``history`` (the
last ``max_history`` items), ``candidates`` (upstream order), ``target``, ``evidence`` (K co-engagement
scores, zeros without evidence), ``fit_slice`` (which fit data ranked the list: :mod:`gr2.splits`)),
``prompts/config.json`` (the :class:`gr2.prompts.PromptConfig` every stage renders with) and
``prompts/report.json``.

Traces, SFT, RL, rerank and the teacher's own ranking all read these rows and render them with
:func:`gr2.prompts.request_messages`, so the prompts a model is trained on are the prompts it is
evaluated and served with: same history, same priming, same evidence.

Evidence (``evidence = "cooccur"``) is the item-kNN co-engagement of each candidate with the
history, fitted on the list's fit data (what the list's upstream ranker saw; see
:mod:`gr2.splits`), so it never counts the target's interaction or the user's later items.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from gr2 import rundir
from gr2.candidates import list_fit_slices, slice_groups
from gr2.errors import ConfigError, DataError
from gr2.pipeline.inputs import PROMPTS as STAGE, load_fit_sequences
from gr2.prompts import PromptConfig, candidate_evidence, evidence_ranks
from gr2.splits import SPLITS

def _features():
    from datasets import Features, Sequence, Value

    return Features({
        "list_id": Value("int64"), "user_idx": Value("int64"), "history": Sequence(Value("int64")),
        "candidates": Sequence(Value("int64")), "target": Value("int64"), "evidence": Sequence(Value("float32")),
        "fit_slice": Value("int64"),
    })


def run_prompts(run_dir: str | Path, config: PromptConfig = PromptConfig(), *, force: bool = False) -> dict[str, Any]:
    from datasets import Dataset, load_from_disk

    run_dir = Path(run_dir)
    out = run_dir / STAGE
    cand = rundir.read_stage(run_dir / "candidates")
    if cand is None:
        raise DataError(f"{run_dir / 'candidates'} has no finished candidates stage; run `gr2 candidates` first")
    key = rundir.stage_key(config, cand["key"])
    if (done := rundir.begin_stage(out, key, force=force)) is not None:
        return done
    started = time.perf_counter()
    n_items = len(load_from_disk(str(run_dir / "data" / "items")))
    report: dict[str, Any] = {"config": dataclasses.asdict(config), "splits": {}}
    for split in SPLITS:
        table = load_from_disk(str(run_dir / "candidates" / split))
        histories = [np.asarray(h, dtype=np.int64)[-config.max_history:] for h in table["history"]]
        candidates = np.asarray(table["candidates"], dtype=np.int64).reshape(len(table), -1)
        fit_slices = list_fit_slices(table)
        if config.evidence == "cooccur" and len(table):
            # evidence weighs the history the prompt shows, nothing more, over the list's own fit data
            evidence = np.zeros(candidates.shape, dtype=np.float32)
            for r, rows in slice_groups(fit_slices):
                evidence[rows] = candidate_evidence([histories[i] for i in rows], candidates[rows],
                                                    load_fit_sequences(run_dir, split, r), n_items, config)
            if not evidence.any():
                raise ConfigError(f"prompts.evidence = {config.evidence!r}, but the {split} split's fit data gives no "
                                  "candidate any co-engagement with its history (too little interaction data); "
                                  "set prompts.evidence = \"none\"")
        else:
            evidence = np.zeros(candidates.shape, dtype=np.float32)
        targets = np.asarray(table["target"], dtype=np.int64)
        ds = Dataset.from_dict({
            "list_id": table["list_id"], "user_idx": table["user_idx"], "history": [h.tolist() for h in histories],
            "candidates": candidates.tolist(), "target": targets.tolist(), "evidence": evidence.tolist(),
            "fit_slice": fit_slices.tolist(),
        }, features=_features())
        with rundir.atomic_dir(out / split) as tmp:
            ds.save_to_disk(str(tmp))
        entry: dict[str, Any] = {"lists": len(table), "history_mean": float(np.mean([len(h) for h in histories])) if histories else 0.0}
        if config.evidence != "none" and len(table):
            target_rank = evidence_ranks(evidence)[candidates == targets[:, None]]
            entry["evidence_rank1_is_target"] = float(np.mean(target_rank == 1))
        report["splits"][split] = entry
    rundir.atomic_write_json(out / "config.json", dataclasses.asdict(config))
    report["seconds"] = round(time.perf_counter() - started, 2)
    rundir.atomic_write_json(out / "report.json", report)
    summary = {"evidence": config.evidence, "max_history": config.max_history,
               "lists": {s: report["splits"][s]["lists"] for s in SPLITS}}
    rundir.mark_done(out, key, summary)
    return summary


def main(args: argparse.Namespace, config: PromptConfig) -> int:
    summary = run_prompts(args.run_dir, config, force=args.force)
    print(f"prompts: {summary}")
    return 0
