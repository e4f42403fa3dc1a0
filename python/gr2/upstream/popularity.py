"""Popularity ranker: every user gets the catalog ordered by interaction count in the train split.

The weakest sensible upstream and the floor every other ranker must clear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gr2.errors import InvalidInputError
from gr2.upstream import check_items


@dataclass
class PopularityRanker:
    counts: np.ndarray  # int64 (n_items,)
    name: str = "popularity"

    @property
    def n_items(self) -> int:
        return len(self.counts)

    @classmethod
    def fit(cls, train: Sequence[np.ndarray], n_items: int) -> "PopularityRanker":
        if n_items <= 0:
            raise InvalidInputError(f"n_items must be positive, got {n_items}")
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in train]) if len(train) else np.zeros(0, np.int64)
        check_items("train sequences", flat, n_items)
        return cls(counts=np.bincount(flat, minlength=n_items).astype(np.int64))

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        row = self.counts.astype(np.float32)
        return np.broadcast_to(row, (len(histories), self.n_items)).copy()

    def score_items(self, items: np.ndarray) -> np.ndarray:
        """Popularity of given items (any shape) as float32."""
        items = np.asarray(items, dtype=np.int64)
        check_items("items", items, self.n_items)
        return self.counts[items].astype(np.float32)
