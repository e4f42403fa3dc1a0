"""A transformers ``LogitsProcessor`` that constrains ``model.generate`` to the rerank format.

    proc = RerankLogitsProcessor(tokenizer, candidates, index=index, num_beams=1)
    out = model.generate(**inputs, logits_processor=LogitsProcessorList([proc]), max_new_tokens=...)
    proc.items()   # the reranked candidates of each returned row

One processor serves one ``generate`` call (it remembers the prompt length from its first call).
Rows of the batch belong to prompts in the order transformers lays them out: prompt ``i`` owns rows
``i * n .. i * n + n - 1`` with ``n = rows / len(candidates)`` (beams or returned sequences).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gr2 import _gr2
from gr2.decoding._setup import (
    as_candidates,
    build_token_map,
    candidate_codes,
    eos_id,
    resolve_sid_tokens,
)
from gr2.errors import ConstraintError, InvalidInputError
from gr2.tokens import SidTokens

try:  # transformers is a hard dependency, but keep the import error readable
    from transformers import LogitsProcessor
except ImportError as exc:  # pragma: no cover
    raise ImportError("gr2.decoding.processors needs transformers") from exc


def apply_allowed(
    scores: torch.Tensor,
    allowed: tuple[np.ndarray, np.ndarray, np.ndarray],
    forbidden: torch.Tensor,
) -> torch.Tensor:
    """Mask ``scores`` (R, V) in place with the CSR allowed lists of ``ConstraintBatch.allowed``:
    free rows lose only the forbidden ids, every other row keeps only its listed ids."""
    offsets, ids, free = allowed
    device = scores.device
    sparse = np.nonzero(~free)[0]
    if sparse.size:
        counts = offsets[1:] - offsets[:-1]
        row_of_id = torch.as_tensor(np.repeat(np.arange(free.size), counts), device=device)
        id_t = torch.as_tensor(ids.astype(np.int64), device=device)
        kept = scores[row_of_id, id_t].clone()
        scores.index_fill_(0, torch.as_tensor(sparse, device=device), float("-inf"))
        scores[row_of_id, id_t] = kept
    free_rows = np.nonzero(free)[0]
    if free_rows.size and forbidden.numel():
        rows_t = torch.as_tensor(free_rows, device=device)
        scores[rows_t.view(-1, 1), forbidden.to(device).view(1, -1)] = float("-inf")
    return scores


class RerankLogitsProcessor(LogitsProcessor):
    """Constrain generation to ``<think>..</think><answer>`` + a permutation of each row's candidates
    + ``</answer>`` EOS. Works with greedy, sampling and beam search (``num_beams`` must match the
    ``generate`` call so rows can be followed across beam reordering)."""

    def __init__(
        self,
        tokenizer: Any,
        candidates: Any,
        index: Any = None,
        sid_tokens: SidTokens | None = None,
        *,
        num_beams: int = 1,
        reasoning: bool | str = True,
        max_reasoning_tokens: int = 128,
        eos_token_id: int | None = None,
    ):
        from gr2.decoding.decode import _reasoning_mode

        self.tokenizer = tokenizer
        self.candidates = as_candidates(candidates)
        self.sid_tokens = resolve_sid_tokens(tokenizer, index, sid_tokens)
        self.codes = candidate_codes(index, self.candidates, self.sid_tokens.levels)
        self.eos = eos_id(tokenizer, eos_token_id)
        self.mode = _reasoning_mode(reasoning)
        if max_reasoning_tokens < 0:
            raise InvalidInputError("max_reasoning_tokens must be >= 0")
        self.max_reasoning_tokens = int(max_reasoning_tokens)
        if num_beams < 1:
            raise InvalidInputError("num_beams must be >= 1")
        self.num_beams = int(num_beams)
        self._batch: Any = None
        self._prompt_len = 0
        self._rows_per_prompt = 1
        self._keys: dict[tuple, int] = {}
        self._forbidden: torch.Tensor | None = None

    def _start(self, input_ids: torch.Tensor, vocab_size: int) -> None:
        rows, b = input_ids.shape[0], self.candidates.shape[0]
        if rows % b:
            raise InvalidInputError(f"generate runs {rows} rows for {b} candidate rows; they must divide")
        self._rows_per_prompt = rows // b
        token_map = build_token_map(self.sid_tokens, eos=self.eos, vocab_size=vocab_size, tokenizer=self.tokenizer)
        self._forbidden = torch.as_tensor(token_map.reasoning_forbidden(), dtype=torch.long)
        self._batch = _gr2.ConstraintBatch(token_map)
        self._batch.add_rerank(self.candidates, self.codes, reasoning=self.mode,
                               max_reasoning_tokens=self.max_reasoning_tokens, repeat=self._rows_per_prompt)
        self._prompt_len = input_ids.shape[1]
        self._keys = {(r, ()): r for r in range(rows)} if self.num_beams > 1 else {}

    def _follow(self, input_ids: torch.Tensor) -> None:
        """Advance each row's automaton by its newest token (re-deriving the parent row under beams)."""
        generated = input_ids[:, self._prompt_len:].cpu().numpy()
        if generated.shape[1] == 0:
            return
        if self.num_beams > 1:
            keys, parents = {}, []
            for r, seq in enumerate(generated):
                prompt = r // self._rows_per_prompt
                parent_key = (prompt * self._rows_per_prompt, tuple(seq[:-1].tolist()))
                if parent_key not in self._keys:
                    raise ConstraintError(f"row {r}: its prefix was never seen; was num_beams={self.num_beams} right?")
                parents.append(self._keys[parent_key])
                keys[(prompt * self._rows_per_prompt, tuple(seq.tolist()))] = r
            self._batch = self._batch.select(parents)
            self._keys = keys
        phases = self._batch.phases()
        live = np.nonzero(phases != 3)[0].astype(np.int64)  # finished rows receive padding
        self._batch.advance(live, generated[live, -1].astype(np.int64))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._batch is None:
            self._start(input_ids, scores.shape[-1])
        else:
            self._follow(input_ids)
        if len(self._batch) != scores.shape[0]:
            raise ConstraintError(f"scores have {scores.shape[0]} rows, the processor tracks {len(self._batch)}")
        assert self._forbidden is not None
        return apply_allowed(scores, self._batch.allowed(), self._forbidden)

    def items(self) -> list[np.ndarray]:
        """Items emitted so far by each row (complete after generate returns)."""
        if self._batch is None:
            return []
        return [self._batch.emitted(r) for r in range(len(self._batch))]
