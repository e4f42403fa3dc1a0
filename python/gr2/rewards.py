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
only inside ``<think>``, and there it is free: the answer block is the *last* ``<answer>`` of the
completion, so tag-like text in the reasoning (which a text cannot tell from tags, e.g. ``<answer>``
spelled by ordinary BPE pieces) is reasoning on both the text and the token-id path; after
``</answer>`` only whitespace and end-of-sequence texts (``trailers``, default
:data:`DEFAULT_TRAILERS`) may follow. A truncated output (no ``</answer>``) is malformed.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

from gr2 import _checks as checks
from gr2 import _gr2
from gr2._gr2 import SidIndex
from gr2._rows import CandidateRows, candidate_rows, lookup_sids
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
    """Recall@k and NDCG@k per row from 1-based target ranks (0 = target absent / invalid), as
    (B, len(metric_ks)) arrays: :func:`gr2.eval.metrics.rank_metrics`, column per k."""
    from gr2.eval.metrics import rank_metrics as per_k

    by_k = per_k(np.asarray(ranks).astype(np.int64), metric_ks)
    return (np.stack([by_k[f"recall@{k}"] for k in metric_ks], axis=1),
            np.stack([by_k[f"ndcg@{k}"] for k in metric_ks], axis=1))


def _id_array(name: str, values: Any, ndim: int) -> np.ndarray:
    if isinstance(values, (str, bytes)):
        raise InvalidInputError(f"{name} must be a {ndim}-D array of item ids, got a str")
    try:
        arr = np.asarray(values)
    except ValueError as exc:
        raise InvalidInputError(f"{name} must be a {ndim}-D array of item ids ({exc})") from None
    if arr.ndim != ndim:
        raise InvalidInputError(f"{name} must be a {ndim}-D array of item ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{name} must hold integer item ids, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise InvalidInputError(f"{name} holds negative item ids (min {arr.min()})")
    return np.ascontiguousarray(arr, dtype=np.uint64)


def _per_candidate(name: str, values: Any, rows: CandidateRows, extra_dims: int) -> np.ndarray:
    """``values`` aligned with the candidates: a (B, K, ...) array when every request has the same
    K, or one (K_b, ...) array per request; returned flat, (N, ...)."""
    tail = ", L" if extra_dims else ""
    if isinstance(values, (str, bytes)):
        raise InvalidInputError(f"{name} must be (B, K{tail}) or one (K_b{tail}) array per request, got a str")
    try:
        arr = np.asarray(values)
    except ValueError:
        arr = None
    if arr is not None and arr.dtype != object and arr.ndim == 2 + extra_dims:
        if not rows.rectangular or arr.shape[:2] != (len(rows), rows.width):
            raise InvalidInputError(f"{name} has shape {arr.shape}, expected ({len(rows)}, {rows.width}{tail}) to match "
                                    "candidates" + ("" if rows.rectangular else " (ragged: one array per request)"))
        return arr.reshape(-1, *arr.shape[2:])
    try:
        parts = [np.asarray(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be (B, K{tail}) or one (K_b{tail}) array per request ({exc})") from None
    if len(parts) != len(rows):
        raise InvalidInputError(f"{name} has {len(parts)} entries for {len(rows)} requests")
    for i, (part, k) in enumerate(zip(parts, rows.sizes)):
        if part.ndim != 1 + extra_dims or part.shape[0] != k:
            raise InvalidInputError(f"{name}: request {i} has shape {part.shape}, expected ({int(k)}{tail}) "
                                    "(one entry per candidate)")
    if extra_dims and len({p.shape[1:] for p in parts}) > 1:
        raise InvalidInputError(f"{name}: requests disagree on the number of SID levels")
    return np.concatenate(parts)


def _candidate_sids(rows: CandidateRows, index: Any, candidate_sids: Any) -> np.ndarray:
    """SIDs of every candidate, flat (N, L) uint16."""
    if candidate_sids is not None:
        sids = _per_candidate("candidate_sids", candidate_sids, rows, 1)
        if sids.size and (not np.issubdtype(sids.dtype, np.integer) or sids.min() < 0 or sids.max() > 65535):
            raise InvalidInputError("candidate_sids must hold integer codes in 0..65535")
        return np.ascontiguousarray(sids, dtype=np.uint16)
    if index is None:
        raise InvalidInputError("verify_rewards needs index= (a gr2.SidIndex) or candidate_sids=")
    return lookup_sids(index, rows)


def _check_index(index: Any) -> None:
    if index is not None and not isinstance(index, SidIndex):
        raise InvalidInputError(f"index must be a gr2.SidIndex (or None with candidate_sids=), got {type(index).__name__}")


def _str_list(name: str, values: Any) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise InvalidInputError(f"{name} must be a list of strings, got a single {type(values).__name__} "
                                f"{values!r:.40}; wrap it: {name}=[{values!r:.40}]")
    try:
        out = list(values)
    except TypeError:
        raise InvalidInputError(f"{name} must be a list of strings, got {type(values).__name__}") from None
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise InvalidInputError(f"{name}[{i}] must be a str, got {type(v).__name__}")
    return out


def _int_list(name: str, values: Any) -> list[int]:
    if isinstance(values, (str, bytes)) or np.isscalar(values):
        raise InvalidInputError(f"{name} must be a list of token ids, got {type(values).__name__}; wrap it in a list")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise InvalidInputError(f"{name}[{i}] must be an int token id, got {type(v).__name__}")
        out.append(int(v))
    return out


def _empty_batch(ks: list[int], width: int, graded: bool) -> RewardBatch:
    z = lambda dt: np.zeros(0, dtype=dt)  # noqa: E731
    return RewardBatch(
        reward=z(np.float64), valid=z(bool), invalid_reason=z(np.uint8), rank_pre=z(np.uint32),
        rank_re=z(np.uint32), r_rank=z(np.float64), r_fmt=z(np.float64), copied_order=z(bool),
        top1_input_pos=z(np.uint32), n_sids=z(np.uint32), ranking=np.zeros((0, width), dtype=np.uint64),
        recall=np.zeros((0, len(ks))), ndcg=np.zeros((0, len(ks))), metric_ks=tuple(ks),
        graded_ndcg=z(np.float64) if graded else None, auc=z(np.float64) if graded else None,
    )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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


_TAG_NAMES = ("sid_begin", "sid_end", "think_open", "think_close", "answer_open", "answer_close")


def _verification_token_map(sid_tokens: Any) -> _gr2.TokenMap:
    """The :class:`gr2.TokenMap` of ``sid_tokens`` for the token-id path (no EOS: verification only
    reads the tags and codes), built once per distinct set of ids and reused by later calls."""
    try:
        tags = tuple(int(getattr(sid_tokens, name)) for name in _TAG_NAMES)
        code_ids = np.ascontiguousarray(sid_tokens.code_ids, dtype=np.int64)
    except (AttributeError, TypeError, ValueError) as err:
        raise InvalidInputError(f"sid_tokens must be a gr2.SidTokens (from gr2.add_sid_tokens), got "
                                f"{type(sid_tokens).__name__}: {err}") from None
    if code_ids.ndim != 2:
        raise InvalidInputError(f"sid_tokens.code_ids must be a (levels, codes) table, got shape {code_ids.shape}")
    return _token_map_of(tags, code_ids.tobytes(), code_ids.shape)


@functools.lru_cache(maxsize=8)
def _token_map_of(tags: tuple[int, ...], code_ids: bytes, shape: tuple[int, int]) -> _gr2.TokenMap:
    table = np.frombuffer(code_ids, dtype=np.int64).reshape(shape)
    vocab_size = max(*tags, int(table.max(initial=-1))) + 1  # every id the map names
    try:
        return _gr2.TokenMap(table, vocab_size=vocab_size, **dict(zip(_TAG_NAMES, tags)))
    except InvalidInputError as err:
        raise InvalidInputError(f"sid_tokens: {err}") from None


def _is_whole(value: Any) -> bool:
    """An int (not a bool, not 2.5 that ``int`` would truncate to 2)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class CompletionParts:
    """Where the parts of one completion lie, as :func:`verify_rewards` parses it (the one grammar,
    ``rust/src/reward.rs``): ``str`` indices of a text or positions of a token-id sequence, every
    span end exclusive."""

    think: tuple[int, int] | None  # <think> through </think>; None without a think block
    answer: tuple[int, int]  # the last <answer> through its </answer>
    sids: list[tuple[int, int]]  # each SID of the answer, <|sid_begin|> through <|sid_end|>
    codes: np.ndarray  # uint16 (len(sids), levels)

    @classmethod
    def _of(cls, d: dict[str, Any] | None) -> CompletionParts | None:
        return None if d is None else cls(d["think"], d["answer"], d["sids"], d["codes"])


def parse_completion(text: str, *, levels: int | None = None,
                     trailers: Sequence[str] = DEFAULT_TRAILERS) -> CompletionParts | None:
    """The verifier's parse of one text completion with its spans; None where :func:`verify_rewards`
    would call it malformed (with SIDs of ``levels`` codes; None: the answer's first SID's count)."""
    if not isinstance(text, str):
        raise InvalidInputError(f"completion must be a str, got {type(text).__name__}")
    if levels is not None and not _is_whole(levels):
        raise InvalidInputError(f"levels must be an int or None, got {levels!r}")
    if not _encodable(text):  # a lone surrogate: no UTF-8 text the verifier could read
        return None
    return CompletionParts._of(_gr2._parse_completions_text([text], _str_list("trailers", trailers),
                                                            None if levels is None else int(levels))[0])


def parse_completion_ids(ids: Sequence[int], sid_tokens: Any, *, whitespace_ids: Sequence[int] = (),
                         trailer_ids: Sequence[int] = ()) -> CompletionParts | None:
    """:func:`parse_completion` for token ids (the tags and codes of ``sid_tokens``, a
    :class:`gr2.SidTokens`); positions are indices into ``ids``."""
    return CompletionParts._of(_gr2._parse_completion_tokens(
        [int(i) for i in ids], _verification_token_map(sid_tokens), _int_list("whitespace_ids", whitespace_ids),
        _int_list("trailer_ids", trailer_ids)))


# Cut-offs travel to Rust as usize; anything past this is a mistake, not a list length.
_MAX_CUTOFF = 2**31 - 1


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
        A str that is not valid Unicode (a lone surrogate) is scored ``malformed`` (no tokenizer
        decodes to one); the rest of the batch is verified as usual.
    candidates: uint64 (B, K) item ids in upstream order, or B lists of any lengths >= 1 (ragged
        K: each row is scored against its own K; ``ranking`` is then (B, max K) with NO_ITEM
        beyond a row's K); targets: uint64 (B,), each a candidate of its row (rows whose target
        was not retrieved must be filtered out first). An empty batch (B = 0) returns an empty
        RewardBatch; a request with K = 0 raises InvalidInputError.
    index: a :class:`gr2.SidIndex` giving the candidates' SIDs and, for invalid outputs, telling a
        catalog item that is not a candidate (``not_candidate``) from a SID of no item
        (``unknown_sid``). Without an index pass ``candidate_sids`` (B, K, L), or one (K_b, L)
        array per request, instead; every non-candidate SID is then ``unknown_sid``.
    relevance: optional float (B, K), or one (K_b,) array per request, graded relevance aligned
        with ``candidates`` for the graded
        NDCG@``graded_k`` (default K) and per-list AUC fields; ``reward_kind`` ("rank", "ndcg",
        "auc") picks which reward ``reward`` holds for valid rows.
    trailers: a list of strings (a single str is an error, not a list of characters).

    Bad input raises :class:`gr2.InvalidInputError` naming the argument (and the request row and
    candidate column where there is one); an unknown candidate raises UnknownItemError.
    """
    if isinstance(completions, (str, bytes)):
        raise InvalidInputError("completions must be a list (one completion per request), got a single str; wrap it")
    try:
        if isinstance(completions, Mapping):
            raise TypeError
        n_completions = len(completions)
    except TypeError:
        raise InvalidInputError(f"completions must be a list, got {type(completions).__name__}") from None
    _check_index(index)
    rows = candidate_rows(candidates, "candidates", check_duplicates=False)  # Rust checks duplicates
    targets = _id_array("targets", targets, 1)
    b = len(rows)
    if n_completions != b:
        raise InvalidInputError(f"{n_completions} completions for {b} candidate rows")
    if targets.shape[0] != b:
        raise InvalidInputError(f"targets has {targets.shape[0]} entries for {b} candidate rows")
    trailers = _str_list("trailers", trailers)
    whitespace_ids = _int_list("whitespace_ids", whitespace_ids)
    trailer_ids = _int_list("trailer_ids", trailer_ids)
    if isinstance(metric_ks, (str, bytes, Mapping)) or not isinstance(metric_ks, Iterable):
        raise InvalidInputError(f"metric_ks must be a list of cut-offs, got {metric_ks!r:.60}; wrap it in a list")
    if not all(_is_whole(k) for k in metric_ks):
        raise InvalidInputError(f"metric_ks must be a list of int cut-offs, got {metric_ks!r:.60}")
    ks = [int(k) for k in metric_ks]
    if not ks or not 1 <= min(ks) <= max(ks) <= _MAX_CUTOFF:
        raise InvalidInputError(f"metric_ks must be non-empty cut-offs in 1..{_MAX_CUTOFF}, got {ks!r:.60}")
    if graded_k is not None and not (_is_whole(graded_k) and 1 <= int(graded_k) <= _MAX_CUTOFF):
        raise InvalidInputError(f"graded_k must be an int in 1..{_MAX_CUTOFF} (or None for K), got {graded_k!r:.60}")
    alpha, invalid_reward = checks.finite("alpha", alpha), checks.finite("invalid_reward", invalid_reward)
    if not isinstance(conditional, (bool, np.bool_)):
        raise InvalidInputError(f"conditional must be True or False, got {conditional!r}")
    if not isinstance(reward_kind, str) or reward_kind not in ("rank", "ndcg", "auc"):
        raise InvalidInputError(f"reward_kind must be 'rank', 'ndcg' or 'auc', got {reward_kind!r}")
    if b == 0:  # nothing to verify: empty fields of the right dtypes
        return _empty_batch(ks, rows.width, relevance is not None)
    sids = _candidate_sids(rows, index, candidate_sids)
    catalog = index  # non-candidate SIDs are looked up in the index itself (Rust), no codes() copy
    rel = None
    if relevance is not None:
        rel_flat = _per_candidate("relevance", relevance, rows, 0)
        if rel_flat.size and not np.issubdtype(rel_flat.dtype, np.number):
            raise InvalidInputError(f"relevance must be numeric, got dtype {rel_flat.dtype}")
        rel = np.ascontiguousarray(rel_flat, dtype=np.float32)
    common = dict(
        items=rows.flat,
        sids=sids,
        cand_offsets=None if rows.rectangular else rows.offsets,
        width=rows.width,
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
    if isinstance(completions[0], str):
        # Rust checks the rest are strings too (a Python pass over 100k rows costs ~10% of the call);
        # the error paths below find the offending row.
        texts = completions if isinstance(completions, list) else list(completions)
        try:
            out = _gr2._verify_rewards_text(texts, trailers, **common)
        except TypeError:
            bad = next((i for i, c in enumerate(texts) if not isinstance(c, str)), None)
            if bad is None:
                raise
            raise InvalidInputError(f"completions mix strings and other values: completion {bad} is "
                                    f"{type(texts[bad]).__name__}, not str (pass all strings or all token-id "
                                    "sequences)") from None
        except UnicodeEncodeError:
            # A str that is not valid Unicode (a lone surrogate) cannot be the decoding of any model
            # output: that row is scored malformed and the rest of the batch is verified as usual.
            texts = [c if _encodable(c) else "" for c in texts]
            out = _gr2._verify_rewards_text(texts, trailers, **common)
    elif (first_str := next((i for i, c in enumerate(completions) if isinstance(c, str)), None)) is not None:
        kind = type(completions[0]).__name__
        raise InvalidInputError(f"completions mix strings and token-id sequences: completion 0 is {kind}, completion "
                                f"{first_str} is str (pass all strings or all token-id sequences)")
    else:
        if sid_tokens is None:
            raise InvalidInputError("token-id completions need sid_tokens= (from gr2.add_sid_tokens)")
        if sid_tokens.levels != sids.shape[1]:
            raise InvalidInputError(f"sid_tokens has {sid_tokens.levels} levels, the candidate SIDs {sids.shape[1]}")
        ids, offsets = _flatten_token_ids(completions)
        out = _gr2._verify_rewards_tokens(
            ids,
            offsets,
            _verification_token_map(sid_tokens),
            whitespace_ids,
            trailer_ids,
            **common,
        )
    names = {f.name for f in fields(RewardBatch)}
    return RewardBatch(metric_ks=tuple(ks), **{k: v for k, v in out.items() if k in names})


__all__ = ["DEFAULT_TRAILERS", "NO_ITEM", "InvalidReason", "REASON_NAMES", "RewardBatch", "rank_metrics", "verify_rewards"]
