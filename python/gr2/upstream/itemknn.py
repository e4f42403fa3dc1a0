"""Item-kNN ranker: item-item cosine similarity of co-occurrence in users' train sequences.

``sim(i, j) = |U_i ∩ U_j| / (sqrt(|U_i| |U_j|) + shrink)`` where ``U_i`` is the set of users who
interacted with ``i``; each item keeps its ``neighbors`` most similar items. A history scores item
``j`` as ``sum_h w_h sim(h, j)`` with recency weights ``w_h = recency_decay ** age`` (age 0 is the
newest history item), so recent items count more, as in next-item prediction they should.

Co-occurrence is computed one block of items at a time with a sparse user x item matrix, so memory
stays O(n_items * neighbors) rather than O(n_items^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from gr2.errors import InvalidInputError
from gr2.upstream import check_items


@dataclass
class ItemKNNRanker:
    similarity: torch.Tensor  # sparse COO (n_items, n_items): row h -> neighbours j
    n_items: int
    recency_decay: float = 0.9
    name: str = "itemknn"

    @classmethod
    def fit(
        cls,
        train: Sequence[np.ndarray],
        n_items: int,
        *,
        neighbors: int = 100,
        shrink: float = 10.0,
        recency_decay: float = 0.9,
        block_size: int = 2048,
    ) -> "ItemKNNRanker":
        if n_items <= 0 or neighbors <= 0:
            raise InvalidInputError(f"n_items and neighbors must be positive, got {n_items}, {neighbors}")
        if not 0.0 < recency_decay <= 1.0:
            raise InvalidInputError(f"recency_decay must be in (0, 1], got {recency_decay}")
        rows, cols = [], []
        for u, seq in enumerate(train):
            items = np.unique(np.asarray(seq, dtype=np.int64))
            rows.append(np.full(len(items), u, dtype=np.int64))
            cols.append(items)
        cols_all = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        check_items("train sequences", cols_all, n_items)
        rows_all = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        user_item = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows_all, cols_all])),
            torch.ones(len(cols_all), dtype=torch.float32),
            (len(train), n_items),
            check_invariants=True,
        ).coalesce()
        item_user = user_item.t().coalesce()
        norms = torch.sqrt(torch.bincount(torch.from_numpy(cols_all), minlength=n_items).float())
        keep = min(neighbors, n_items - 1) if n_items > 1 else 0
        nbr_rows, nbr_cols, nbr_vals = [], [], []
        dense_users = user_item.to_dense() if len(train) * n_items <= 50_000_000 else None
        for start in range(0, n_items, block_size):
            stop = min(start + block_size, n_items)
            block = dense_users[:, start:stop] if dense_users is not None else user_item.to_dense()[:, start:stop]
            co = torch.sparse.mm(item_user, block).t()  # (block, n_items) co-occurrence counts
            sim = co / (norms[start:stop, None] * norms[None, :] + shrink)
            sim[torch.arange(stop - start), torch.arange(start, stop)] = 0.0  # no self-similarity
            if keep == 0:
                continue
            # stable sort, so ties at the cut go to the lower item index (deterministic)
            vals, idx = torch.sort(sim, dim=1, descending=True, stable=True)
            vals, idx = vals[:, :keep], idx[:, :keep]
            positive = vals > 0
            r = torch.arange(start, stop)[:, None].expand_as(idx)
            nbr_rows.append(r[positive])
            nbr_cols.append(idx[positive])
            nbr_vals.append(vals[positive])
        if nbr_rows:
            indices = torch.stack([torch.cat(nbr_rows), torch.cat(nbr_cols)])
            values = torch.cat(nbr_vals)
        else:
            indices, values = torch.zeros((2, 0), dtype=torch.int64), torch.zeros(0)
        similarity = torch.sparse_coo_tensor(indices, values, (n_items, n_items), check_invariants=True).coalesce()
        return cls(similarity=similarity.t().coalesce(), n_items=n_items, recency_decay=recency_decay)

    def history_weights(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """Dense (n_items, B) matrix of recency-weighted history indicators."""
        weights = torch.zeros((self.n_items, len(histories)), dtype=torch.float32)
        for b, hist in enumerate(histories):
            hist = np.asarray(hist, dtype=np.int64)
            check_items("history", hist, self.n_items)
            if len(hist) == 0:
                continue
            ages = np.arange(len(hist) - 1, -1, -1, dtype=np.float64)
            w = torch.from_numpy((self.recency_decay**ages).astype(np.float32))
            weights[:, b].index_add_(0, torch.from_numpy(hist), w)
        return weights

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        # similarity is stored transposed (row j lists the history items h with sim(h, j)),
        # so scores^T = sim^T @ weights is one sparse-dense product.
        with torch.no_grad():
            scores = torch.sparse.mm(self.similarity, self.history_weights(histories))
        return scores.t().contiguous().numpy()

    def score_candidates(self, histories: Sequence[np.ndarray], candidates: np.ndarray) -> np.ndarray:
        """Scores float32 (B, K) of each row's candidates."""
        candidates = np.asarray(candidates, dtype=np.int64)
        check_items("candidates", candidates, self.n_items)
        return np.take_along_axis(self.score(histories), candidates, axis=1)
