"""Run-directory inputs shared by the stage modules: the users' item sequences and the cache keys
of finished upstream stages."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def load_sequences(run_dir: str | os.PathLike) -> list[list[int]]:
    """Chronological item lists of ``data/sequences`` (one per user, ordered by user_idx)."""
    import datasets

    from gr2.errors import DataError

    path = Path(run_dir) / "data" / "sequences"
    if not path.exists():
        raise DataError(f"{path} is missing; run the `data` stage first")
    seqs = datasets.load_from_disk(str(path))
    order = np.argsort(np.asarray(seqs["user_idx"]))
    items = seqs["items"]
    return [list(map(int, items[i])) for i in order]


def input_key(run_dir: str | os.PathLike, stage: str) -> str:
    """The cache key of a finished upstream stage (its ``stage.json``); DataError when unfinished."""
    from gr2.errors import DataError
    from gr2.rundir import read_stage

    record = read_stage(Path(run_dir) / stage)
    if record is None:
        raise DataError(f"stage `{stage}` has not finished in {run_dir}; run it first")
    return str(record["key"])
