"""Baseline reorderings of the candidate lists, each a (B, K) ranking with every row valid.

- upstream order: the candidates as given (what the reranker must beat);
- random permutation (seeded): the floor any reranker must clear;
- popularity order: candidates sorted by train-split interaction count;
- a second ranker's order: candidates sorted by another ranker's scores (item-kNN by default).
Sorting is stable, so ties keep the upstream order.
"""

from __future__ import annotations

import numpy as np

from gr2.errors import InvalidInputError


def upstream_order(candidates: np.ndarray) -> np.ndarray:
    return np.array(candidates, copy=True)


def random_order(candidates: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permuted(np.asarray(candidates), axis=1)


def score_order(candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Candidates sorted by descending ``scores`` (B, K); ties keep the input order."""
    candidates, scores = np.asarray(candidates), np.asarray(scores, dtype=np.float64)
    if scores.shape != candidates.shape:
        raise InvalidInputError(f"scores shape {scores.shape} does not match candidates {candidates.shape}")
    if np.isnan(scores).any():
        raise InvalidInputError("scores contain NaN")
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)


def popularity_order(candidates: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Candidates sorted by descending popularity ``counts[item]``."""
    candidates = np.asarray(candidates, dtype=np.int64)
    return score_order(candidates, np.asarray(counts)[candidates])
