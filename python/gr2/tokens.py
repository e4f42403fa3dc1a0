"""The semantic-ID surface form and the special tags of the rerank output format.

A semantic ID (SID) of L levels is written as ``<|sid_begin|><s_a_97><s_b_168>...<|sid_end|>``: one
token per (level, code), level letters ``a``, ``b``, ``c``, ... A rerank completion is::

    <think> free-text reasoning </think><answer> SID SID ... SID </answer>

This module is the single definition of that format; the Rust parser (reward verification) and
the decoding automaton follow it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from gr2.errors import InvalidInputError

SID_BEGIN = "<|sid_begin|>"
SID_END = "<|sid_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
TAGS = (SID_BEGIN, SID_END, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
LEVEL_LETTERS = string.ascii_lowercase


def code_token(level: int, code: int) -> str:
    """The token for ``code`` at ``level`` (0-based): ``code_token(1, 168) == "<s_b_168>"``."""
    if not 0 <= level < len(LEVEL_LETTERS):
        raise InvalidInputError(f"SID level {level} out of range 0..{len(LEVEL_LETTERS) - 1}")
    if code < 0:
        raise InvalidInputError(f"SID code must be >= 0, got {code}")
    return f"<s_{LEVEL_LETTERS[level]}_{int(code)}>"


def _int_list(values: Any, what: str) -> list[int]:
    """``values`` (a flat, non-empty sequence of integers) as Python ints, or InvalidInputError
    saying what is wrong; floats are refused rather than truncated."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise InvalidInputError(f"{what} must be a sequence of integers, got {type(values).__name__}")
    try:
        flat = np.asarray(values, dtype=object).ravel() if np.ndim(values) <= 1 else None
    except ValueError:  # ragged nesting
        flat = None
    if flat is None or flat.size == 0:
        raise InvalidInputError(f"{what} must be a flat, non-empty sequence of integers")
    bad = [v for v in flat if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_))]
    if bad:
        raise InvalidInputError(f"{what} must hold integers, got {type(bad[0]).__name__} {bad[0]!r:.40}")
    return [int(v) for v in flat]


def sid_to_text(codes: Sequence[int] | np.ndarray) -> str:
    """Render one SID (a sequence of per-level integer codes) in its surface form."""
    body = "".join(code_token(level, c) for level, c in enumerate(_int_list(codes, "a SID's codes")))
    return f"{SID_BEGIN}{body}{SID_END}"


def answer_text(sids: Sequence[Sequence[int]] | np.ndarray) -> str:
    """The ``<answer>...</answer>`` block listing ``sids`` in order."""
    return ANSWER_OPEN + "".join(sid_to_text(s) for s in sids) + ANSWER_CLOSE


@dataclass(frozen=True)
class SidTokens:
    """Token ids of the SID vocabulary inside one tokenizer.

    ``code_ids[level, code]`` is the token id of ``<s_{level}_{code}>``, -1 where the level has
    fewer codes than the widest level.
    """

    sid_begin: int
    sid_end: int
    think_open: int
    think_close: int
    answer_open: int
    answer_close: int
    code_ids: np.ndarray  # int64 (levels, max_codes)
    level_sizes: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.level_sizes)

    def code_of_token(self) -> dict[int, tuple[int, int]]:
        """Reverse map: token id -> (level, code)."""
        out: dict[int, tuple[int, int]] = {}
        for level, size in enumerate(self.level_sizes):
            for code in range(size):
                out[int(self.code_ids[level, code])] = (level, code)
        return out

    def sid_token_ids(self, codes: Sequence[int] | np.ndarray) -> list[int]:
        """Token ids of one SID including its begin/end delimiters."""
        if len(codes) != self.levels:
            raise InvalidInputError(f"SID has {len(codes)} levels, the vocabulary has {self.levels}")
        ids = [self.sid_begin]
        for level, code in enumerate(codes):
            if not 0 <= int(code) < self.level_sizes[level]:
                raise InvalidInputError(
                    f"code {int(code)} at level {level} outside 0..{self.level_sizes[level] - 1}"
                )
            ids.append(int(self.code_ids[level, int(code)]))
        ids.append(self.sid_end)
        return ids


def _level_sizes(index: Any, level_sizes: Sequence[int] | None) -> tuple[int, ...]:
    if level_sizes is None:
        if index is None:
            raise InvalidInputError("add_sid_tokens needs an index or level_sizes")
        level_sizes = index.level_sizes
    sizes = tuple(_int_list(level_sizes, "level_sizes"))
    if not sizes or any(s <= 0 for s in sizes):
        raise InvalidInputError(f"level sizes must be positive, got {sizes}")
    if len(sizes) > len(LEVEL_LETTERS):
        raise InvalidInputError(f"at most {len(LEVEL_LETTERS)} SID levels, got {len(sizes)}")
    return sizes


def add_sid_tokens(tokenizer: Any, index: Any = None, *, level_sizes: Sequence[int] | None = None) -> SidTokens:
    """Add the SID tokens and the output-format tags to a transformers tokenizer.

    ``index`` is a :class:`gr2.SidIndex` (its ``level_sizes`` say how many codes each level has);
    or pass ``level_sizes`` directly. Tokens are added as non-special added tokens, so
    ``tokenizer.decode`` keeps them and text round-trips; tokens already present are reused.
    Resize the model's embeddings afterwards (``model.resize_token_embeddings(len(tokenizer))``).
    Returns the token-id mapping.
    """
    from tokenizers import AddedToken

    sizes = _level_sizes(index, level_sizes)
    new_tokens = list(TAGS) + [code_token(level, code) for level, size in enumerate(sizes) for code in range(size)]
    vocab = tokenizer.get_vocab()
    missing = [t for t in new_tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])

    def token_id(token: str) -> int:
        ids = tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise InvalidInputError(f"tokenizer failed to register {token!r}")
        return int(ids[0])

    code_ids = np.full((len(sizes), max(sizes)), -1, dtype=np.int64)
    for level, size in enumerate(sizes):
        tokens = [code_token(level, code) for code in range(size)]
        code_ids[level, :size] = tokenizer.convert_tokens_to_ids(tokens)
    return SidTokens(
        sid_begin=token_id(SID_BEGIN),
        sid_end=token_id(SID_END),
        think_open=token_id(THINK_OPEN),
        think_close=token_id(THINK_CLOSE),
        answer_open=token_id(ANSWER_OPEN),
        answer_close=token_id(ANSWER_CLOSE),
        code_ids=code_ids,
        level_sizes=sizes,
    )
