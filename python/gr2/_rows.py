"""Per-request candidate lists, rectangular or ragged (requests with different K in one batch).

``candidate_rows`` accepts a (B, K) integer array or a sequence of B one-dimensional sequences of
item ids (any lengths >= 1) and returns :class:`CandidateRows`: the ids flat (N,) with B + 1 row
offsets. Shared by gr2.constrained_decode, the logits processors and gr2.verify_rewards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gr2.errors import InvalidInputError, UnknownItemError


@dataclass(frozen=True)
class CandidateRows:
    """B candidate lists: request ``i`` holds ``flat[offsets[i]:offsets[i + 1]]`` (uint64)."""

    flat: np.ndarray  # uint64 (N,)
    offsets: np.ndarray  # int64 (B + 1,)
    rectangular: bool  # every row has the same K
    declared_width: int = 0  # K of a (B, K) array, kept when B = 0

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def width(self) -> int:
        """The largest K (0 for an empty batch)."""
        return max(int(self.sizes.max(initial=0)), self.declared_width)

    def row(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def rows(self) -> list[np.ndarray]:
        return [self.row(i) for i in range(len(self))]

    def position(self, flat_index: int) -> tuple[int, int]:
        """(request row, candidate column) of a flat index."""
        row = int(np.searchsorted(self.offsets, flat_index, side="right") - 1)
        return row, int(flat_index - self.offsets[row])

    def repeat_rows(self, n: int) -> "CandidateRows":
        """Each request repeated ``n`` times (consecutive rows)."""
        rows = [r for r in self.rows() for _ in range(n)]
        sizes = np.array([r.size for r in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.uint64)
        return CandidateRows(np.ascontiguousarray(flat, dtype=np.uint64), offsets, self.rectangular)


def _check_ids(name: str, arr: np.ndarray, where: str) -> None:
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidInputError(f"{name}{where} must hold integer item ids, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise InvalidInputError(f"{name}{where} holds a negative item id ({int(arr.min())})")


def _is_id(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def id_array(row: Any, name: str, where: str = "") -> np.ndarray:
    """One 1-D list of item ids as uint64: integers >= 0 (np.uint64 and Python ints may be mixed,
    which numpy alone would turn into float64); floats, negatives and ids past 2**64 - 1 raise
    InvalidInputError naming ``name`` and ``where``."""
    if hasattr(row, "detach"):
        row = row.detach().cpu().numpy()
    try:
        arr = np.asarray(row)
    except (ValueError, OverflowError) as exc:
        raise InvalidInputError(f"{name}{where} is not a flat list of item ids ({exc})") from None
    if arr.ndim != 1:
        raise InvalidInputError(f"{name}{where} must be a 1-D list of item ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu" and all(_is_id(x) for x in row):
        ints = [int(x) for x in row]  # mixed np.uint64 / int: exact, without a float round trip
        if min(ints) < 0 or max(ints) >= 2**64:
            bad = next(x for x in ints if x < 0 or x >= 2**64)
            raise InvalidInputError(f"{name}{where} holds item id {bad}, outside 0 .. 2**64 - 1")
        return np.array(ints, dtype=np.uint64)
    _check_ids(name, arr, where)
    return np.ascontiguousarray(arr, dtype=np.uint64)


def candidate_rows(values: Any, name: str = "candidates", *, check_duplicates: bool = True) -> CandidateRows:
    """Validate candidate lists: a (B, K) array or B sequences of item ids (ragged K allowed).

    Every request needs K >= 1 integer ids >= 0; with ``check_duplicates`` an id listed twice in a
    request raises InvalidInputError naming the request and both columns."""
    if isinstance(values, (str, bytes)):
        raise InvalidInputError(f"{name} must be a (B, K) array or a list of per-request id lists, got a str")
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.ndim == 1 and values.dtype != object:
            raise InvalidInputError(f"{name} must be 2-D (one row of K item ids per request); wrap a single row")
        if values.ndim == 2:
            _check_ids(name, values, "")
            b, k = values.shape
            if b and k == 0:
                raise InvalidInputError(f"{name}: request 0 has no candidates; every request needs K >= 1")
            flat = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
            offsets = np.arange(b + 1, dtype=np.int64) * k
            rows = CandidateRows(flat, offsets, True, int(k))
            if check_duplicates:
                _check_duplicates(name, rows)
            return rows
        if values.ndim != 1:
            raise InvalidInputError(f"{name} must be (B, K) or a list of per-request id lists, got shape {values.shape}")
    try:
        seq = list(values)
    except TypeError:
        raise InvalidInputError(f"{name} must be a (B, K) array or a list of per-request id lists, "
                                f"got {type(values).__name__}") from None
    parts = []
    for i, row in enumerate(seq):
        if isinstance(row, (str, bytes)) or np.isscalar(row):
            raise InvalidInputError(f"{name} must be 2-D (one list of item ids per request); request {i} is "
                                    f"{type(row).__name__}; wrap a single row")
        arr = id_array(row, name, f" (request {i})")
        if arr.size == 0:
            raise InvalidInputError(f"{name}: request {i} has no candidates; every request needs K >= 1")
        parts.append(arr)
    sizes = np.array([p.size for p in parts], dtype=np.int64)
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64), dtype=np.uint64)
    rows = CandidateRows(flat, offsets, bool(sizes.size == 0 or (sizes == sizes[0]).all()))
    if check_duplicates:
        _check_duplicates(name, rows)
    return rows


def _check_duplicates(name: str, rows: CandidateRows) -> None:
    if rows.flat.size < 2:
        return
    row_of = np.repeat(np.arange(len(rows)), rows.sizes)
    order = np.lexsort((rows.flat, row_of))
    same = (rows.flat[order][1:] == rows.flat[order][:-1]) & (row_of[order][1:] == row_of[order][:-1])
    if same.any():
        j = int(np.nonzero(same)[0][0])
        a, b = sorted((int(order[j]), int(order[j + 1])))
        r, ca = rows.position(a)
        _, cb = rows.position(b)
        raise InvalidInputError(
            f"{name}: request {r} lists item {int(rows.flat[a])} more than once (columns {ca} and {cb}); "
            "a rerank request needs distinct items"
        )


def lookup_sids(index: Any, rows: CandidateRows, levels: int | None = None) -> np.ndarray:
    """SIDs of every candidate, (N, L) uint16; an item the index lacks raises UnknownItemError
    naming its request row and candidate column."""
    try:
        codes = np.asarray(index.sids(rows.flat))
    except UnknownItemError:
        known = np.isin(rows.flat, np.asarray(index.item_ids(), dtype=np.uint64))
        if known.all():
            raise
        first = int(np.nonzero(~known)[0][0])
        r, c = rows.position(first)
        missing = int((~known).sum())
        raise UnknownItemError(
            f"request {r}, candidate column {c}: item {int(rows.flat[first])} is not in the index"
            + (f" ({missing} unknown candidates in all)" if missing > 1 else "")
        ) from None
    n = rows.flat.shape[0]
    if codes.ndim != 2 or codes.shape[0] != n or (levels is not None and codes.shape[1] != levels):
        raise InvalidInputError(f"index.sids returned shape {codes.shape}, expected ({n}, {levels or 'L'})")
    return np.ascontiguousarray(codes, dtype=np.uint16)
