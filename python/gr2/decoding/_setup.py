"""Plumbing shared by the decoders and logits processors: find the SID tokens in a tokenizer,
build the native token map, look up the candidates' SIDs, and tokenise prompts."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gr2 import _gr2
from gr2._rows import CandidateRows, candidate_rows, lookup_sids
from gr2 import _checks as checks
from gr2.errors import InvalidInputError
from gr2.tokens import LEVEL_LETTERS, TAGS, SidTokens, code_token

REASONING_MODES = ("think", "in_think", "disabled")
#: The automaton counts the reasoning budget in a u32.
MAX_REASONING_TOKENS = 2**32 - 1


def lookup_sid_tokens(tokenizer: Any, level_sizes: Sequence[int]) -> SidTokens:
    """The :class:`SidTokens` of a tokenizer that already holds the SID vocabulary.

    Unlike :func:`gr2.add_sid_tokens` this never adds tokens: a model's embedding matrix must
    already cover them, so a missing token is an error naming the fix.
    """
    sizes = tuple(int(s) for s in level_sizes)
    if not sizes or any(s <= 0 for s in sizes) or len(sizes) > len(LEVEL_LETTERS):
        raise InvalidInputError(f"bad SID level sizes {sizes}")
    vocab = tokenizer.get_vocab()
    needed = list(TAGS) + [code_token(level, code) for level, size in enumerate(sizes) for code in range(size)]
    missing = [t for t in needed if t not in vocab]
    if missing:
        raise InvalidInputError(
            f"the tokenizer lacks {len(missing)} SID/format tokens (first: {missing[0]!r}); call "
            "gr2.add_sid_tokens(tokenizer, index) and model.resize_token_embeddings(len(tokenizer)) first"
        )
    code_ids = np.full((len(sizes), max(sizes)), -1, dtype=np.int64)
    for level, size in enumerate(sizes):
        code_ids[level, :size] = [vocab[code_token(level, c)] for c in range(size)]
    tag = dict(zip(TAGS, (vocab[t] for t in TAGS)))
    return SidTokens(
        sid_begin=tag["<|sid_begin|>"],
        sid_end=tag["<|sid_end|>"],
        think_open=tag["<think>"],
        think_close=tag["</think>"],
        answer_open=tag["<answer>"],
        answer_close=tag["</answer>"],
        code_ids=code_ids,
        level_sizes=sizes,
    )


def resolve_sid_tokens(tokenizer: Any, index: Any, sid_tokens: SidTokens | None) -> SidTokens:
    if sid_tokens is not None:
        if not isinstance(sid_tokens, SidTokens):
            raise InvalidInputError(f"sid_tokens must be the gr2.SidTokens from gr2.add_sid_tokens, got "
                                    f"{type(sid_tokens).__name__}")
        return sid_tokens
    if index is None:
        raise InvalidInputError("pass index= (a gr2.SidIndex) or sid_tokens=")
    if not hasattr(index, "level_sizes") or not hasattr(index, "sids"):
        raise InvalidInputError(f"index must be a gr2.SidIndex (e.g. gr2.SidIndex.load(path)), got {type(index).__name__}")
    return lookup_sid_tokens(tokenizer, index.level_sizes)


def eos_id(tokenizer: Any, eos_token_id: int | None = None) -> int:
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise InvalidInputError("the tokenizer has no eos_token_id; pass eos_token_id=")
    return int(eos)


def build_token_map(
    sid_tokens: SidTokens,
    *,
    eos: int,
    vocab_size: int,
    tokenizer: Any = None,
) -> _gr2.TokenMap:
    """The native token map for a model whose logits have ``vocab_size`` columns.

    Free reasoning may use any id below ``len(tokenizer)`` except the format tags that would break
    the structure, EOS, and the tokenizer's other special tokens (padding, BOS, ...).
    """
    forbidden: list[int] = []
    reasoning_vocab = vocab_size
    if tokenizer is not None:
        forbidden = [int(t) for t in getattr(tokenizer, "all_special_ids", []) if t is not None]
        forbidden = [t for t in forbidden if t != sid_tokens.think_close and 0 <= t < vocab_size]
        reasoning_vocab = min(vocab_size, len(tokenizer))
    top = int(np.max(sid_tokens.code_ids))
    if top >= vocab_size:
        raise InvalidInputError(
            f"SID token id {top} is outside the model's {vocab_size} logits; resize the embeddings "
            "(model.resize_token_embeddings(len(tokenizer)))"
        )
    return _gr2.TokenMap(
        np.ascontiguousarray(sid_tokens.code_ids, dtype=np.int64),
        sid_begin=sid_tokens.sid_begin,
        sid_end=sid_tokens.sid_end,
        think_open=sid_tokens.think_open,
        think_close=sid_tokens.think_close,
        answer_open=sid_tokens.answer_open,
        answer_close=sid_tokens.answer_close,
        eos=eos,
        vocab_size=int(vocab_size),
        reasoning_vocab=int(reasoning_vocab),
        forbidden_in_reasoning=forbidden,
    )


def as_candidates(candidates: Any) -> CandidateRows:
    """Validate per-request candidate lists: a (B, K) array or B lists of item ids (ragged K
    allowed); integers >= 0, K >= 1 and no duplicates within a request (errors name the request)."""
    return candidate_rows(candidates, "candidates")


def candidate_codes(index: Any, candidates: CandidateRows, levels: int) -> np.ndarray:
    """SIDs of every candidate, flat (N, L) uint16. An item the index lacks raises
    UnknownItemError naming its request row and candidate column."""
    if index is None:
        raise InvalidInputError("index= (a gr2.SidIndex) is required to look up the candidates' SIDs")
    checks.has_methods("index", index, ("sids", "item_ids"), "a gr2.SidIndex (e.g. gr2.SidIndex.load(path))")
    return lookup_sids(index, candidates, levels)


def prompt_texts(tokenizer: Any, prompts: Sequence[Any]) -> list[str]:
    """Prompts as strings: strings pass through (already templated), message lists go through the
    tokenizer's chat template with the generation prompt appended."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise InvalidInputError("prompts must be a list of strings or a list of chat-message lists")
    if len(prompts) == 0:
        raise InvalidInputError("prompts is empty")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Sequence) and len(p) and all(isinstance(m, dict) for m in p):
            out.append(_chat_text(tokenizer, list(p), i))
        else:
            raise InvalidInputError(f"prompt {i} is neither a string nor a list of chat messages")
    return out


def _chat_text(tokenizer: Any, messages: list[dict], i: int) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 -- transformers raises ValueError or jinja errors here
        raise InvalidInputError(f"prompt {i}: the tokenizer's chat template could not render it "
                                f"({type(exc).__name__}: {str(exc)[:120]}); pass the prompt as a string") from None


def add_rerank_rows(batch: Any, rows: CandidateRows, codes: np.ndarray, *, reasoning: str,
                    max_reasoning_tokens: int, repeat: int = 1) -> int:
    """Add one rerank automaton per request of ``rows`` (ragged K allowed) to ``batch``."""
    return batch.add_rerank_ragged(rows.flat, np.ascontiguousarray(codes, dtype=np.uint16), rows.offsets,
                                   reasoning=reasoning, max_reasoning_tokens=int(max_reasoning_tokens),
                                   repeat=int(repeat))


def completion_length(k: int, levels: int, reasoning: str, max_reasoning_tokens: int, *, answer_tags: bool = True,
                      eos: bool = True) -> int:
    """The most tokens a constrained completion of ``k`` items can take: the think span with its
    whole budget, the tags, ``k`` SIDs of ``levels`` codes plus their delimiters, and EOS."""
    think = {"think": 2, "in_think": 1, "disabled": 0}[reasoning]
    if reasoning != "disabled":
        think += int(max_reasoning_tokens)
    return think + (2 if answer_tags else 0) + int(k) * (int(levels) + 2) + (1 if eos else 0)
