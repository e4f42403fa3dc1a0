"""The rankings file a reranking method hands to the ``eval`` stage: ``list_id`` (B,), ``rankings``
(B, K), ``valid`` (B,) and, optionally, the ``candidates`` (B, K) in upstream order, in one ``.npz``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from gr2.errors import CorruptFileError, DataError, InvalidInputError
from gr2.rundir import atomic_write_bytes


def save_rankings(path: str | Path, list_id, rankings, valid, candidates=None) -> None:
    """Write a method's rerankings for `gr2 eval` (atomically). ``list_id`` names each row's list
    (the ``list_id`` column of ``candidates/<split>``); ``candidates`` (upstream order) lets eval
    check the method saw the same lists."""
    list_id = np.asarray(list_id, dtype=np.int64)
    rankings = np.asarray(rankings)
    valid = np.asarray(valid, dtype=bool)
    if rankings.ndim != 2 or len(rankings) != len(list_id) or valid.shape != (len(list_id),):
        raise InvalidInputError(
            f"need list_id (B,), rankings (B, K), valid (B,); got {list_id.shape}, {rankings.shape}, {valid.shape}"
        )
    arrays = {"list_id": list_id, "rankings": rankings.astype(np.int64), "valid": valid}
    if candidates is not None:
        arrays["candidates"] = np.asarray(candidates, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_rankings(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"rankings file {path} does not exist")
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # numpy raises several types for a damaged archive
        raise CorruptFileError(f"cannot read rankings file {path}: {e}") from e
    for key in ("list_id", "rankings", "valid"):
        if key not in data:
            raise CorruptFileError(f"rankings file {path} lacks array {key!r} (files from before list ids: rerun `gr2 rerank`)")
    return data
