"""Readers of the data stage's outputs for later stages: items, sequences, leave-one-out splits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np

from gr2.errors import DataError, UnknownItemError

SPLITS = ("train", "valid", "test")


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
    """Item metadata by dense ``item_idx``: titles, categories, years, embedding texts, external ids."""

    def __init__(self, items: datasets.Dataset):
        columns = items.to_dict()
        self.item_ids: list[str] = columns["item_id"]
        self.titles: list[str] = columns["title"]
        self.categories: list[list[str]] = columns["categories"]
        self.years: list[int] = columns["year"]
        self.texts: list[str] = columns["text"]
        if list(columns["item_idx"]) != list(range(len(self.item_ids))):
            raise DataError("items dataset is not indexed densely 0..n-1 in order")
        self._by_external = {item_id: i for i, item_id in enumerate(self.item_ids)}

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> "ItemCatalog":
        return cls(load_items(run_dir))

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


def leave_one_out(items: list[int], split: str, max_history: int = 0) -> tuple[list[int], int | None]:
    """(history, target) of one user sequence for ``split``.

    train: history = items[:-2] (no target: the whole prefix is training data, target None);
    valid: history = items[:-2], target = items[-2]; test: history = items[:-1], target = items[-1].
    ``max_history`` > 0 keeps only the most recent items of the history.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if len(items) < 3:
        raise DataError(f"a sequence of {len(items)} items is too short for leave-one-out (needs 3)")
    if split == "train":
        history, target = list(items[:-2]), None
    elif split == "valid":
        history, target = list(items[:-2]), int(items[-2])
    else:
        history, target = list(items[:-1]), int(items[-1])
    if max_history > 0:
        history = history[-max_history:]
    return history, target


def iter_split(sequences: datasets.Dataset, split: str, max_history: int = 0) -> Iterator[tuple[int, list[int], int | None]]:
    """(user_idx, history, target) for every user in ``split``."""
    for user_idx, items in zip(sequences["user_idx"], sequences["items"]):
        history, target = leave_one_out(items, split, max_history)
        yield int(user_idx), history, target


def train_sequences(sequences: datasets.Dataset) -> list[np.ndarray]:
    """Every user's training prefix items[:-2] (what co-engagement and upstream models may see)."""
    return [np.asarray(items[:-2], dtype=np.int64) for items in sequences["items"]]
