"""Type stubs of the native module gr2._gr2 (rust/src/py)."""

__version__: str

# --- SidIndex (rust/src/index, rust/src/py/index.rs) -------------------------------------------
import os
from typing import Sequence

import numpy as np
import numpy.typing as npt

class SidIndex:
    """Bijection between item ids (uint64) and semantic IDs (one uint16 code per level).

    ``build`` repairs colliding SIDs deterministically: per collision group the smallest item id
    keeps the SID; every other item moves to the nearest free last-level code under the same
    prefix (ties to the lower code), in ascending (SID, item id) order. Only when a prefix's last
    level is full is one disambiguation level appended to every SID (0 for items that need none;
    the items still sharing a SID are numbered 0, 1, 2, ... by ascending id). Immutable and safe
    to share between threads; ``load`` memory-maps the file.
    """

    @staticmethod
    def build(
        item_ids: npt.NDArray[np.uint64],
        codes: npt.NDArray[np.uint16],
        codebook_size: int | Sequence[int] | None = None,
    ) -> SidIndex:
        """``codes[i]`` (shape (n, L)) is the SID of ``item_ids[i]`` (shape (n,), unique).

        ``codebook_size``: exclusive upper bound of the codes, one int for all levels or one per
        level; default ``max(256, codes.max() + 1)``. Raises InvalidInputError on wrong
        dtype/shape, duplicate ids, or a code >= codebook_size."""
    @staticmethod
    def load(path: str | os.PathLike[str]) -> SidIndex:
        """Memory-maps and validates a saved index (CorruptFileError, Gr2IOError)."""
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the index atomically (temporary file in the same folder, fsync, rename)."""
    def sids(self, item_ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint16]:
        """uint64 (m,) -> uint16 (m, levels); UnknownItemError names the first unknown id and row."""
    def items(self, sids: npt.NDArray[np.uint16]) -> npt.NDArray[np.uint64]:
        """uint16 (m, levels) -> uint64 (m,); UnknownSidError names the first unknown SID and row."""
    def item_ids(self) -> npt.NDArray[np.uint64]:
        """All item ids, in SID order (aligned with ``codes()``)."""
    def codes(self) -> npt.NDArray[np.uint16]:
        """All SIDs, ascending: uint16 (n, levels)."""
    def children(self, prefix: Sequence[int] | npt.NDArray[np.integer]) -> npt.NDArray[np.uint16]:
        """Distinct next-level codes under ``prefix`` (ascending); empty for an absent prefix or
        a complete SID. InvalidInputError for a code >= its level size or a too-long prefix."""
    def prefix_range(self, prefix: Sequence[int] | npt.NDArray[np.integer]) -> tuple[int, int]:
        """``(start, end)``: the rows of ``item_ids()``/``codes()`` whose SID starts with ``prefix``."""
    def repair_report(self) -> dict[str, object]:
        """items, levels_in, levels_out, uniqueness_before_repair, unique_items_before,
        distinct_sids_before, distinct_ratio_before, collision_groups, collision_group_sizes
        ({size: count}), items_moved, max_move_distance, full_prefixes, level_appended,
        appended_level_size, items_disambiguated."""
    @property
    def levels(self) -> int: ...
    @property
    def level_sizes(self) -> list[int]: ...
    @property
    def uniqueness_before_repair(self) -> float:
        """Share of items whose input SID no other item shared (1.0 when empty)."""
    @property
    def nbytes(self) -> int:
        """Bytes held for lookups (24 per item plus two small bucket tables)."""
    def __len__(self) -> int: ...
    def __contains__(self, item_id: object) -> bool: ...
