"""Run-directory inputs shared by the stage modules: what a finished stage left for the next ones
(the data stage's items and sequences, the candidates stage's fit data, the prompts stage's
requests and settings) and the cache keys of finished stages. The library beneath the pipeline
takes these as objects; only the pipeline knows where in a run directory they live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gr2.errors import DataError
from gr2.prompts import PromptConfig
from gr2.rundir import read_stage

PROMPTS = "prompts"  # the run-directory folder the prompts stage writes


def load_sequences(run_dir: str | os.PathLike) -> list[list[int]]:
    """Chronological item lists of ``data/sequences`` (one per user, ordered by user_idx)."""
    import datasets

    path = Path(run_dir) / "data" / "sequences"
    if not path.exists():
        raise DataError(f"{path} is missing; run the `data` stage first")
    seqs = datasets.load_from_disk(str(path))
    order = np.argsort(np.asarray(seqs["user_idx"]))
    items = seqs["items"]
    return [list(map(int, items[i])) for i in order]


def input_key(run_dir: str | os.PathLike, stage: str) -> str:
    """The cache key of a finished upstream stage (its ``stage.json``); DataError when unfinished."""
    record = read_stage(Path(run_dir) / stage)
    if record is None:
        raise DataError(f"stage `{stage}` has not finished in {run_dir}; run it first")
    return str(record["key"])


def load_data(run_dir: str | os.PathLike) -> tuple[Any, Any, str]:
    """(items, sequences, data stage key) from ``run_dir/data``; DataError if the stage is missing."""
    from datasets import load_from_disk

    data_dir = Path(run_dir) / "data"
    record = read_stage(data_dir)
    if record is None:
        raise DataError(f"{data_dir} has no finished data stage (stage.json); run `gr2 data` first")
    try:
        items = load_from_disk(str(data_dir / "items"))
        sequences = load_from_disk(str(data_dir / "sequences"))
    except FileNotFoundError as e:
        raise DataError(f"data stage output incomplete in {data_dir}: {e}") from e
    for name, ds, cols in (("items", items, {"item_idx"}), ("sequences", sequences, {"user_idx", "items"})):
        missing = cols - set(ds.column_names)
        if missing:
            raise DataError(f"data/{name} lacks column(s) {sorted(missing)}")
    item_idx = np.asarray(items["item_idx"], dtype=np.int64)
    if not np.array_equal(item_idx, np.arange(len(item_idx))):
        raise DataError("data/items.item_idx must be the dense range 0..n-1 in row order")
    return items, sequences, record["key"]


def fit_dir_name(split: str, fit_slice: int = 0) -> str:
    """Folder of ``candidates/`` holding the fit data of ``split``'s lists of slice ``fit_slice``
    (slices >= 1 exist under rolling cutoffs and are shared by the train and valid lists)."""
    return f"fit_{split}" if fit_slice == 0 else f"fit_slice_{fit_slice}"


def load_fit_sequences(run_dir: str | os.PathLike, split: str, fit_slice: int = 0) -> list[np.ndarray]:
    """The fit data of ``split``'s lists of slice ``fit_slice`` (what their upstream ranker saw):
    per-user item sequences."""
    from datasets import load_from_disk

    path = Path(run_dir) / "candidates" / fit_dir_name(split, int(fit_slice))
    if not path.exists():
        raise DataError(f"{path} is missing; rerun the `candidates` stage (older runs lack it)")
    return [np.asarray(s, dtype=np.int64) for s in load_from_disk(str(path))["items"]]


def load_prompt_config(run_dir: str | os.PathLike) -> PromptConfig:
    """The run's prompt settings as written by the ``prompts`` stage."""
    path = Path(run_dir) / PROMPTS / "config.json"
    if not path.exists():
        raise DataError(f"{path} is missing; run the `prompts` stage first")
    from gr2.config import from_dict
    from gr2.rundir import load_json

    return from_dict(PromptConfig, load_json(path), where="prompts")


def load_requests(run_dir: str | os.PathLike, split: str) -> Any:
    """``prompts/<split>`` as an HF dataset: list_id, user_idx, history, candidates (upstream order), target,
    evidence, fit_slice (written by :mod:`gr2.pipeline.prompts`)."""
    from datasets import load_from_disk

    path = Path(run_dir) / PROMPTS / split
    if not path.exists():
        raise DataError(f"{path} is missing; run the `prompts` stage first")
    return load_from_disk(str(path))
