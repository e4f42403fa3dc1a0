"""Upstream rankers: the production ranker a reranker sits behind.

A ranker scores every catalog item for a user history; the top-K of those scores are the
candidates a reranker receives. Three rankers share one interface (:class:`Ranker`):

- :class:`~gr2.upstream.sasrec.SASRecRanker` -- causal self-attention over the item sequence;
- :class:`~gr2.upstream.popularity.PopularityRanker` -- interaction counts in the training split;
- :class:`~gr2.upstream.itemknn.ItemKNNRanker` -- item-item co-occurrence (cosine) neighbours.

Items are dense indices ``0..n_items-1`` (``item_idx`` of ``data/items``). Histories are
``int64`` arrays, oldest first. This module also holds the leave-one-out split and full-ranking
metrics used to compare the rankers.

Ranking protocol. By default items already in the history are excluded from the ranking
(``mask_history=True``), the common protocol for leave-one-out evaluation on data without repeat
consumption (MovieLens has none). Ties are broken towards the lower item index, so rankings are
deterministic.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from gr2.errors import InvalidInputError, UnknownItemError
from gr2.splits import LeaveOneOut, leave_one_out  # re-exported: the split lives in gr2.splits


class Ranker(Protocol):
    """Anything that scores the whole catalog for a batch of histories."""

    name: str
    n_items: int

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """Scores float32 (B, n_items); higher is better."""
        ...


def check_items(name: str, items: np.ndarray, n_items: int) -> None:
    """Raise UnknownItemError if ``items`` holds an index outside ``0..n_items-1``."""
    items = np.asarray(items)
    if items.size and (items.min() < 0 or items.max() >= n_items):
        bad = items[(items < 0) | (items >= n_items)][0]
        raise UnknownItemError(f"{name}: item index {int(bad)} outside the catalog 0..{n_items - 1}")


def mask_histories(scores: np.ndarray, histories: Sequence[np.ndarray]) -> None:
    """Set the scores of history items to -inf, in place."""
    for row, hist in enumerate(histories):
        if len(hist):
            scores[row, hist] = -np.inf


def top_k(
    ranker: Ranker,
    histories: Sequence[np.ndarray],
    k: int,
    *,
    mask_history: bool = True,
    batch_size: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """The top-``k`` items and their scores for each history: int64 (B, k), float32 (B, k).

    Ties go to the lower item index (stable sort). Raises InvalidInputError when fewer than
    ``k`` items remain rankable for some history (catalog minus masked history).
    """
    if k <= 0 or k > ranker.n_items:
        raise InvalidInputError(f"k={k} must be in 1..{ranker.n_items} (catalog size)")
    items = np.empty((len(histories), k), dtype=np.int64)
    scores = np.empty((len(histories), k), dtype=np.float32)
    for start in range(0, len(histories), batch_size):
        batch = histories[start : start + batch_size]
        s = np.asarray(ranker.score(batch), dtype=np.float32)
        if mask_history:
            mask_histories(s, batch)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(s, order, axis=1)
        if not np.isfinite(top).all():
            row = int(np.nonzero(~np.isfinite(top).all(axis=1))[0][0]) + start
            raise InvalidInputError(
                f"history {row} leaves fewer than k={k} rankable items (history masked); lower k"
            )
        items[start : start + len(batch)] = order
        scores[start : start + len(batch)] = top
    return items, scores


def target_ranks(
    ranker: Ranker,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    *,
    mask_history: bool = True,
    batch_size: int = 512,
) -> np.ndarray:
    """1-based full-ranking rank of each target (ties to the lower index); a masked target gets
    rank ``n_items + 1`` (never recalled)."""
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) != len(histories):
        raise InvalidInputError(f"{len(histories)} histories but {len(targets)} targets")
    check_items("targets", targets, ranker.n_items)
    ranks = np.empty(len(targets), dtype=np.int64)
    index = np.arange(ranker.n_items)
    for start in range(0, len(histories), batch_size):
        batch = histories[start : start + batch_size]
        t = targets[start : start + len(batch)]
        s = np.asarray(ranker.score(batch), dtype=np.float32)
        if mask_history:
            mask_histories(s, batch)
        ts = s[np.arange(len(batch)), t][:, None]
        ahead = (s > ts) | ((s == ts) & (index[None, :] < t[:, None]))
        r = ahead.sum(axis=1) + 1
        r[~np.isfinite(ts[:, 0])] = ranker.n_items + 1
        ranks[start : start + len(batch)] = r
    return ranks


def ranking_metrics(ranks: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean Recall@k and NDCG@k from 1-based full-ranking ranks (:func:`gr2.eval.metrics.rank_metrics`)."""
    from gr2.eval.metrics import rank_metrics

    return {name: float(values.mean()) for name, values in rank_metrics(np.asarray(ranks), [k]).items()}


def evaluate_full_ranking(
    ranker: Ranker, histories: Sequence[np.ndarray], targets: np.ndarray, k: int = 10, mask_history: bool = True
) -> dict[str, float]:
    """Full-ranking Recall@k / NDCG@k of ``ranker`` on (history, target) pairs."""
    return ranking_metrics(target_ranks(ranker, histories, targets, mask_history=mask_history), k)


__all__ = [
    "LeaveOneOut",
    "Ranker",
    "evaluate_full_ranking",
    "leave_one_out",
    "ranking_metrics",
    "target_ranks",
    "top_k",
]
