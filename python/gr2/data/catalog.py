"""Readers of the data stage's outputs for later stages: items (the one :class:`ItemCatalog`),
sequences and stats. Splits live in :mod:`gr2.splits`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from gr2.errors import DataError, UnknownItemError

def _load(run_dir: str | Path, name: str) -> datasets.Dataset:
    path = Path(run_dir) / "data" / name
    if not path.exists():
        raise DataError(f"{path} does not exist; run the data stage first (`gr2 data --run-dir {run_dir}`)")
    return datasets.load_from_disk(str(path))


def load_items(run_dir: str | Path) -> datasets.Dataset:
    """``<run_dir>/data/items``: item_idx, item_id, title, categories, year, text (row i has item_idx i)."""
    return _load(run_dir, "items")


def load_sequences(run_dir: str | Path) -> datasets.Dataset:
    """``<run_dir>/data/sequences``: user_idx, user_id, items, timestamps (chronological)."""
    return _load(run_dir, "sequences")


def load_stats(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "data" / "stats.json"
    if not path.exists():
        raise DataError(f"{path} does not exist; run the data stage first")
    return json.loads(path.read_text())


class ItemCatalog:
    """The items of a run by dense ``item_idx``: titles, categories, years, embedding texts, external
    ids and, when built with the run's SID index, every item's SID.

    The one catalog class: prompts, the teacher, mid-training, SFT, RL and rerank all read items
    through it. ``ItemCatalog.from_run_dir(run_dir, sids=True)`` also loads ``sid/index.gr2sid``
    and checks that it covers exactly the items of ``data/items``.
    """

    REQUIRED_COLUMNS = ("item_idx", "item_id", "title", "categories", "year", "text")

    def __init__(self, items: datasets.Dataset, index: Any = None):
        missing = sorted(set(self.REQUIRED_COLUMNS) - set(items.column_names))
        if missing:
            raise DataError(f"items dataset lacks column(s) {missing}")
        columns = items.to_dict()
        if list(columns["item_idx"]) != list(range(len(columns["item_id"]))):
            raise DataError("items dataset is not indexed densely 0..n-1 in order")
        self.item_ids: list[str] = [str(i) for i in columns["item_id"]]
        self.titles: list[str] = columns["title"]
        self.categories: list[list[str]] = [list(c) for c in columns["categories"]]
        self.years: list[int] = [int(y) for y in columns["year"]]  # -1 = unknown
        self.texts: list[str] = columns["text"]
        self._by_external = {item_id: i for i, item_id in enumerate(self.item_ids)}
        self.index = index
        self._codes: np.ndarray | None = None
        if index is not None:
            if len(index) != len(self.item_ids):
                raise DataError(f"SID index holds {len(index)} items, the catalog {len(self.item_ids)}; "
                                "rerun the sid stage")
            try:
                self._codes = np.asarray(index.sids(np.arange(len(self.item_ids), dtype=np.uint64)), dtype=np.uint16)
            except KeyError as e:
                raise UnknownItemError(f"SID index lacks an item of the catalog: {e}") from e

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, sids: bool = False) -> "ItemCatalog":
        """``data/items`` of a run; with ``sids`` also ``sid/index.gr2sid``."""
        items = load_items(run_dir)
        if not sids:
            return cls(items)
        import gr2

        index_path = Path(run_dir) / "sid" / "index.gr2sid"
        if not index_path.exists():
            raise DataError(f"{index_path} does not exist; run the sid stage first (`gr2 sid --run-dir {run_dir}`)")
        return cls(items, gr2.SidIndex.load(str(index_path)))

    def __len__(self) -> int:
        return len(self.item_ids)

    def _check(self, item_idx: int) -> int:
        if not 0 <= int(item_idx) < len(self.item_ids):
            raise UnknownItemError(f"item_idx {item_idx} is not in the catalog (0..{len(self.item_ids) - 1})")
        return int(item_idx)

    def title(self, item_idx: int) -> str:
        return self.titles[self._check(item_idx)]

    def category(self, item_idx: int) -> list[str]:
        return self.categories[self._check(item_idx)]

    def text(self, item_idx: int) -> str:
        return self.texts[self._check(item_idx)]

    def external_id(self, item_idx: int) -> str:
        return self.item_ids[self._check(item_idx)]

    def index_of(self, item_id: str) -> int:
        try:
            return self._by_external[str(item_id)]
        except KeyError:
            raise UnknownItemError(f"item id {item_id!r} is not in the catalog") from None

    def item_text(self, item: int) -> str:
        """``Title (year) | genre, genre`` -- the text SID rows are initialised from and captioned to."""
        item = self._check(item)
        year = f" ({self.years[item]})" if self.years[item] >= 0 else ""
        genres = ", ".join(self.categories[item]) or "unknown genre"
        return f"{self.titles[item]}{year} | {genres}"

    # -- SIDs (a catalog built with the run's index) --------------------------------------------

    @property
    def codes(self) -> np.ndarray:
        """uint16 (n, L): the SID of item i in row i."""
        if self._codes is None:
            raise DataError("this catalog was built without a SID index; use ItemCatalog.from_run_dir(run_dir, sids=True)")
        return self._codes

    @property
    def level_sizes(self) -> tuple[int, ...]:
        if self.index is None:
            raise DataError("this catalog was built without a SID index; use ItemCatalog.from_run_dir(run_dir, sids=True)")
        return tuple(int(s) for s in self.index.level_sizes)

    def sid_text(self, item: int) -> str:
        from gr2.tokens import sid_to_text

        return sid_to_text(self.codes[self._check(item)])

    def item_of_sid(self) -> dict[tuple[int, ...], int]:
        return {tuple(int(c) for c in row): i for i, row in enumerate(self.codes)}
