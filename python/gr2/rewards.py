"""Verifiable rewards for rerank completions (docs/DESIGN.md §1), computed in Rust one batch at a time.

A completion is ``<think>reasoning</think><answer>SID SID ... SID</answer>`` (think block optional).
:func:`verify_rewards` parses every completion, checks that the answer is a permutation of the
row's K candidates, and returns a :class:`RewardBatch` of numpy arrays:

* ``rank_pre`` / ``rank_re``: 1-based positions of the target in the upstream order and in the
  output (0 for invalid outputs);
* ``r_rank = (rank_pre - rank_re) / K``; ``r_fmt = 1`` for a valid permutation, else 0;
* ``reward``: conditional form (default) ``r_rank + alpha * r_fmt`` only if ``r_rank > 0`` or
  both ranks are 1, else ``r_rank``; unconditional form ``r_rank + alpha * r_fmt``; invalid
  outputs get ``invalid_reward``. With ``relevance`` and ``reward_kind="ndcg"``/``"auc"`` the reward
  of valid rows is the graded NDCG / per-list AUC instead (zeroed for copying a non-optimal input
  order).
* ``copied_order``: the output order equals the input order (the reward hack to watch);
  ``top1_input_pos``: where in the input the output's first item sat (position bias).

How strict the parser is (see ``rust/src/reward.rs`` for the grammar): whitespace (space, tab,
newline, carriage return) may appear between tags and between the tokens of a SID; text is allowed
only inside ``<think>``; after ``</answer>`` only whitespace and end-of-sequence texts
(``trailers``, default :data:`DEFAULT_TRAILERS`) may follow. A truncated output (no ``</answer>``)
is malformed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

from gr2 import _gr2
from gr2.errors import InvalidInputError

#: End-of-sequence texts accepted after ``</answer>`` in text completions.
DEFAULT_TRAILERS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end_of_text|>")

#: Value in ``RewardBatch.ranking`` for rows whose output is not a valid permutation.
NO_ITEM = int(_gr2.NO_ITEM)


class InvalidReason(enum.IntEnum):
    """Why an output is not a valid permutation (``OK`` when it is); values of ``invalid_reason``."""

    OK = 0
    MALFORMED = 1
    WRONG_COUNT = 2
    REPEAT = 3
    NOT_CANDIDATE = 4
    UNKNOWN_SID = 5


REASON_NAMES: tuple[str, ...] = tuple(_gr2.INVALID_REASON_NAMES)
assert REASON_NAMES == tuple(r.name.lower() for r in InvalidReason)


@dataclass(frozen=True)
class RewardBatch:
    """Per-completion rewards, validity and metrics; every field is a numpy array over rows."""

    reward: np.ndarray  # float64 (B,)
    valid: np.ndarray  # bool (B,)
    invalid_reason: np.ndarray  # uint8 (B,), values of InvalidReason
    rank_pre: np.ndarray  # uint32 (B,), 1-based
    rank_re: np.ndarray  # uint32 (B,), 1-based, 0 when invalid
    r_rank: np.ndarray  # float64 (B,)
    r_fmt: np.ndarray  # float64 (B,)
    copied_order: np.ndarray  # bool (B,)
    top1_input_pos: np.ndarray  # uint32 (B,), 1-based, 0 when invalid
    n_sids: np.ndarray  # uint32 (B,), SIDs parsed from the answer (0 when malformed)
    ranking: np.ndarray  # uint64 (B, K), NO_ITEM in every slot of invalid rows
    recall: np.ndarray  # float64 (B, len(metric_ks)): Recall@k of the output, 0 when invalid
    ndcg: np.ndarray  # float64 (B, len(metric_ks)): NDCG@k of the output, 0 when invalid
    metric_ks: tuple[int, ...]
    graded_ndcg: np.ndarray | None = None  # float64 (B,) with relevance
    auc: np.ndarray | None = None  # float64 (B,) with relevance

    def __len__(self) -> int:
        return int(self.reward.shape[0])

    @property
    def reason_names(self) -> list[str]:
        return [REASON_NAMES[r] for r in self.invalid_reason]

    def summary(self) -> dict[str, float]:
        """Batch means for logs: reward parts, validity, order-copy rate, metrics, reason shares."""
        n = max(len(self), 1)
        out: dict[str, float] = {
            "reward": float(self.reward.mean()) if len(self) else 0.0,
            "r_rank": float(self.r_rank.mean()) if len(self) else 0.0,
            "r_fmt": float(self.r_fmt.mean()) if len(self) else 0.0,
            "valid_rate": float(self.valid.mean()) if len(self) else 0.0,
            "copy_rate": float(self.copied_order.mean()) if len(self) else 0.0,
        }
        pre_recall, pre_ndcg = rank_metrics(self.rank_pre, self.metric_ks)
        for j, k in enumerate(self.metric_ks):
            out[f"recall@{k}"] = float(self.recall[:, j].sum() / n)
            out[f"ndcg@{k}"] = float(self.ndcg[:, j].sum() / n)
            out[f"pre_recall@{k}"] = float(pre_recall[:, j].sum() / n)
            out[f"pre_ndcg@{k}"] = float(pre_ndcg[:, j].sum() / n)
        counts = np.bincount(self.invalid_reason, minlength=len(REASON_NAMES))
        for name, count in zip(REASON_NAMES[1:], counts[1:]):
            out[f"invalid_{name}"] = float(count / n)
        if self.graded_ndcg is not None and self.auc is not None and len(self):
            out["graded_ndcg"] = float(self.graded_ndcg.mean())
            out["auc"] = float(self.auc.mean())
        return out


def rank_metrics(ranks: np.ndarray, metric_ks: Sequence[int] = (1, 3, 5)) -> tuple[np.ndarray, np.ndarray]:
    """Recall@k and NDCG@k per row from 1-based target ranks (0 = target absent / invalid)."""
    ranks = np.asarray(ranks, dtype=np.float64)[:, None]
    ks = np.asarray(metric_ks, dtype=np.float64)[None, :]
    hit = (ranks >= 1) & (ranks <= ks)
    ndcg = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 1.0) + 1.0), 0.0)
    return hit.astype(np.float64), ndcg


def _id_array(name: str, values: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != ndim:
        raise InvalidInputError(f"{name} must be a {ndim}-D array of item ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{name} must hold integer item ids, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise InvalidInputError(f"{name} holds negative item ids (min {arr.min()})")
    return np.ascontiguousarray(arr, dtype=np.uint64)


def _candidate_sids(candidates: np.ndarray, index: Any, candidate_sids: Any) -> np.ndarray:
    b, k = candidates.shape
    if candidate_sids is not None:
        sids = np.asarray(candidate_sids)
        if sids.ndim != 3 or sids.shape[:2] != (b, k):
            raise InvalidInputError(f"candidate_sids must have shape ({b}, {k}, L), got {sids.shape}")
        if sids.size and (not np.issubdtype(sids.dtype, np.integer) or sids.min() < 0 or sids.max() > 65535):
            raise InvalidInputError("candidate_sids must hold integer codes in 0..65535")
        return np.ascontiguousarray(sids, dtype=np.uint16)
    if index is None:
        raise InvalidInputError("verify_rewards needs index= (a gr2.SidIndex) or candidate_sids=")
    flat = index.sids(candidates.reshape(-1))
    return np.ascontiguousarray(flat.reshape(b, k, -1), dtype=np.uint16)


def _flatten_token_ids(completions: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for i, c in enumerate(completions):
        if hasattr(c, "detach"):  # a torch tensor
            c = c.detach().cpu().numpy()
        arr = np.asarray(c)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise InvalidInputError(f"completion {i} must be a string or a 1-D sequence of token ids")
        rows.append(arr.astype(np.int64, copy=False))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([r.size for r in rows], out=offsets[1:])
    ids = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return np.ascontiguousarray(ids, dtype=np.int64), offsets


def verify_rewards(
    completions: Sequence[str] | Sequence[Sequence[int]],
    candidates: Any,
    targets: Any,
    index: Any = None,
    *,
    sid_tokens: Any = None,
    alpha: float = 0.2,
    conditional: bool = True,
    invalid_reward: float = -1.0,
    candidate_sids: Any = None,
    relevance: Any = None,
    reward_kind: str = "rank",
    graded_k: int | None = None,
    metric_ks: Sequence[int] = (1, 3, 5),
    trailers: Sequence[str] = DEFAULT_TRAILERS,
    whitespace_ids: Sequence[int] = (),
    trailer_ids: Sequence[int] = (),
) -> RewardBatch:
    """Verify a batch of rerank completions and compute their rewards (one Rust call, GIL released).

    completions: B texts, or B token-id sequences (lists, numpy arrays or tensors) together with
        ``sid_tokens`` (a :class:`gr2.SidTokens`); ``whitespace_ids`` are token ids treated like
        whitespace and ``trailer_ids`` (e.g. EOS, pad) are accepted after ``</answer>``.
    candidates: uint64 (B, K) item ids in upstream order; targets: uint64 (B,), each a candidate of
        its row (rows whose target was not retrieved must be filtered out first).
    index: a :class:`gr2.SidIndex` giving the candidates' SIDs and, for invalid outputs, telling a
        catalog item that is not a candidate (``not_candidate``) from a SID of no item
        (``unknown_sid``). Without an index pass ``candidate_sids`` (B, K, L) instead; every
        non-candidate SID is then ``unknown_sid``.
    relevance: optional float (B, K) graded relevance aligned with ``candidates`` for the graded
        NDCG@``graded_k`` (default K) and per-list AUC fields; ``reward_kind`` ("rank", "ndcg",
        "auc") picks which reward ``reward`` holds for valid rows.
    """
    candidates = _id_array("candidates", candidates, 2)
    targets = _id_array("targets", targets, 1)
    b = candidates.shape[0]
    if len(completions) != b:
        raise InvalidInputError(f"{len(completions)} completions for {b} candidate rows")
    if targets.shape[0] != b:
        raise InvalidInputError(f"targets has {targets.shape[0]} entries for {b} candidate rows")
    sids = _candidate_sids(candidates, index, candidate_sids)
    catalog = None
    if index is not None:
        catalog = np.ascontiguousarray(index.codes(), dtype=np.uint16)
    rel = None
    if relevance is not None:
        rel = np.ascontiguousarray(np.asarray(relevance, dtype=np.float32))
    ks = [int(k) for k in metric_ks]
    if not ks or min(ks) < 1:
        raise InvalidInputError(f"metric_ks must be non-empty cut-offs >= 1, got {list(metric_ks)}")
    if graded_k is not None and int(graded_k) < 1:
        raise InvalidInputError(f"graded_k must be >= 1, got {graded_k}")
    common = dict(
        items=candidates,
        sids=sids,
        targets=targets,
        catalog=catalog,
        relevance=rel,
        alpha=float(alpha),
        conditional=bool(conditional),
        invalid_reward=float(invalid_reward),
        metric_ks=ks,
        graded_k=int(graded_k or 0),
        kind=reward_kind,
    )
    if b == 0 or isinstance(completions[0], str):
        # Rust checks the rest are strings too (a Python pass over 100k rows costs ~10% of the call)
        try:
            out = _gr2._verify_rewards_text(completions if isinstance(completions, list) else list(completions),
                                            list(trailers), **common)
        except TypeError as exc:
            raise InvalidInputError(f"completions mix strings and other values (all strings or all token-id sequences): {exc}") from None
    elif any(isinstance(c, str) for c in completions):
        raise InvalidInputError("completions mix strings and token-id sequences")
    else:
        if sid_tokens is None:
            raise InvalidInputError("token-id completions need sid_tokens= (from gr2.add_sid_tokens)")
        if sid_tokens.levels != sids.shape[2]:
            raise InvalidInputError(f"sid_tokens has {sid_tokens.levels} levels, the candidate SIDs {sids.shape[2]}")
        ids, offsets = _flatten_token_ids(completions)
        tag_ids = [
            sid_tokens.think_open,
            sid_tokens.think_close,
            sid_tokens.answer_open,
            sid_tokens.answer_close,
            sid_tokens.sid_begin,
            sid_tokens.sid_end,
        ]
        out = _gr2._verify_rewards_tokens(
            ids,
            offsets,
            [int(t) for t in tag_ids],
            np.ascontiguousarray(sid_tokens.code_ids, dtype=np.int64),
            [int(t) for t in whitespace_ids],
            [int(t) for t in trailer_ids],
            **common,
        )
    names = {f.name for f in fields(RewardBatch)}
    return RewardBatch(metric_ks=tuple(ks), **{k: v for k, v in out.items() if k in names})


__all__ = ["DEFAULT_TRAILERS", "NO_ITEM", "InvalidReason", "REASON_NAMES", "RewardBatch", "rank_metrics", "verify_rewards"]
