"""A transformers ``LogitsProcessor`` that constrains ``model.generate`` to the rerank format.

    proc = RerankLogitsProcessor(tokenizer, candidates, index=index, num_beams=1)
    out = model.generate(**inputs, logits_processor=LogitsProcessorList([proc]), max_new_tokens=...)
    proc.items(out)   # the reranked candidates of each returned row (raises if one is cut short)

One processor serves one ``generate`` call (it remembers the prompt length from its first call).
Rows of the batch belong to prompts in the order transformers lays them out: prompt ``i`` owns rows
``i * n .. i * n + n - 1`` with ``n = rows / len(candidates)`` (beams or returned sequences).
``candidates`` may be ragged (a list of per-prompt id lists of different lengths).

``generate`` stops at ``max_new_tokens`` whatever the constraint says, so a too-small budget cuts a
ranking short. :attr:`RerankLogitsProcessor.required_max_new_tokens` is the budget that always
suffices (the whole reasoning budget, every tag, every SID, EOS); :meth:`items` raises
:class:`gr2.errors.IncompleteGenerationError` for a row whose ranking is not complete instead of
returning a partial list.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gr2 import _checks as checks
from gr2 import _gr2
from gr2.decoding._setup import (
    MAX_REASONING_TOKENS,
    add_rerank_rows,
    as_candidates,
    completion_length,
    build_token_map,
    candidate_codes,
    eos_id,
    resolve_sid_tokens,
)
from gr2.errors import ConstraintError, IncompleteGenerationError, InvalidInputError
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
        from gr2.decoding.decode import MAX_SEQUENCES, _reasoning_mode

        self.mode = _reasoning_mode(reasoning)
        self.max_reasoning_tokens = checks.whole("max_reasoning_tokens", max_reasoning_tokens, 0, MAX_REASONING_TOKENS)
        self.num_beams = checks.whole("num_beams", num_beams, 1, MAX_SEQUENCES)
        self.tokenizer = checks.tokenizer(tokenizer)
        self.candidates = as_candidates(candidates)
        self.sid_tokens = resolve_sid_tokens(tokenizer, index, sid_tokens)
        self.codes = candidate_codes(index, self.candidates, self.sid_tokens.levels)
        self.eos = eos_id(tokenizer, eos_token_id)
        self._batch: Any = None
        self._prompt_len = 0
        self._rows_per_prompt = 1
        self._keys: dict[tuple, int] = {}
        self._forbidden: torch.Tensor | None = None

    @property
    def required_max_new_tokens(self) -> int:
        """The smallest ``max_new_tokens`` that lets every request finish whatever the model does:
        the full reasoning budget, every tag, every SID of the largest request, and EOS. With less,
        ``generate`` may stop mid-ranking and :meth:`items` raises IncompleteGenerationError."""
        return completion_length(self.candidates.width, self.sid_tokens.levels, self.mode, self.max_reasoning_tokens)

    def required_new_tokens(self) -> np.ndarray:
        """Per request, the most new tokens its completion can take (int64, B)."""
        return np.array([completion_length(int(k), self.sid_tokens.levels, self.mode, self.max_reasoning_tokens)
                         for k in self.candidates.sizes], dtype=np.int64)

    def _start(self, input_ids: torch.Tensor, vocab_size: int) -> None:
        rows, b = input_ids.shape[0], len(self.candidates)
        if rows % b:
            raise InvalidInputError(f"generate runs {rows} rows for {b} candidate rows; they must divide")
        self._rows_per_prompt = rows // b
        token_map = build_token_map(self.sid_tokens, eos=self.eos, vocab_size=vocab_size, tokenizer=self.tokenizer)
        self._forbidden = torch.as_tensor(token_map.reasoning_forbidden(), dtype=torch.long)
        self._batch = _gr2.ConstraintBatch(token_map)
        add_rerank_rows(self._batch, self.candidates, self.codes, reasoning=self.mode,
                        max_reasoning_tokens=self.max_reasoning_tokens, repeat=self._rows_per_prompt)
        self._token_map = token_map
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

    def items(self, sequences: Any = None) -> list[np.ndarray]:
        """The reranked candidates of each row, each a complete permutation of its request.

        ``sequences``: the ``generate`` output (prompt + new tokens, one row per returned
        sequence). The new tokens of each row are replayed through a fresh automaton of its
        prompt; this is exact for every decoding mode and required with ``num_beams > 1`` (beam
        search returns finished hypotheses, not the rows the processor followed last). Without it
        the rows the processor followed are read (greedy and sampling only).

        One permutation per returned sequence: beams are distinct token sequences, not distinct
        rankings -- beams that differ only in their reasoning carry the same permutation, and a
        request with fewer permutations than ``num_return_sequences`` (K = 2 has two) repeats some.
        Keep the first of each when distinct rankings are wanted (the beams come best first).

        Raises IncompleteGenerationError when a row's ranking is not complete (``generate`` hit
        ``max_new_tokens`` first; see :attr:`required_max_new_tokens`) and ConstraintError when a
        row holds a token the constraint forbids (the processor was not applied to it)."""
        if self._batch is None:
            raise InvalidInputError("items() before generate: the processor has not seen any step")
        k = self.candidates.sizes
        if sequences is None:
            if self.num_beams > 1:
                raise InvalidInputError("with num_beams > 1 pass the generate output: proc.items(out)")
            out = []
            for r in range(len(self._batch)):
                emitted = self._batch.emitted(r)
                p = r // self._rows_per_prompt
                self._check_complete(r, p, emitted.size, int(k[p]))
                out.append(emitted)
            return out
        seqs = sequences.sequences if hasattr(sequences, "sequences") else sequences
        seqs = seqs.detach().cpu().numpy() if hasattr(seqs, "detach") else np.asarray(seqs)
        if seqs.ndim != 2 or seqs.shape[1] < self._prompt_len:
            raise InvalidInputError(f"sequences must be the (rows, prompt + new) generate output, got shape {seqs.shape}")
        n_rows = seqs.shape[0]
        b = len(self.candidates)
        if n_rows % b:
            raise InvalidInputError(f"{n_rows} sequences for {b} requests; they must divide")
        per = n_rows // b
        gen = seqs[:, self._prompt_len:].astype(np.int64)
        shortest = completion_length(int(self.candidates.sizes.min()), self.sid_tokens.levels, self.mode, 0, eos=False)
        if gen.shape[1] < shortest:  # no row can hold a ranking: generate's budget, not the constraint, is the cause
            raise IncompleteGenerationError(
                f"generate returned {gen.shape[1]} new tokens per row; the shortest complete ranking here takes "
                f"{shortest}. Pass max_new_tokens >= {self.required_max_new_tokens} "
                "(RerankLogitsProcessor.required_max_new_tokens)")
        batch = _gr2.ConstraintBatch(self._token_map)
        add_rerank_rows(batch, self.candidates, self.codes, reasoning=self.mode,
                        max_reasoning_tokens=self.max_reasoning_tokens, repeat=per)
        for t in range(gen.shape[1]):
            live = np.nonzero(batch.phases() != 3)[0].astype(np.int64)
            if live.size == 0:
                break
            try:
                batch.advance(live, gen[live, t])
            except ConstraintError as exc:
                raise ConstraintError(f"sequence {exc} (new token {t}); was this processor applied to the "
                                      "generate call?") from None
        out = []
        for r in range(n_rows):
            emitted = batch.emitted(r)
            # finished, or only EOS left (</answer> was generated)
            closed = batch.phases()[r] == 3 or batch.allowed_ids(r).tolist() == [self.eos]
            self._check_complete(r, r // per, emitted.size, int(k[r // per]), closed=closed, new=gen.shape[1])
            out.append(emitted)
        return out

    def _check_complete(self, row: int, prompt: int, n: int, k: int, closed: bool = True, new: int | None = None) -> None:
        """Raise unless row ``row`` emitted all ``k`` items (and, when replayed, its ``</answer>``)."""
        if n < k or not closed:
            what = f"stopped after {n} of its {k} items" if n < k else "stopped before </answer>"
            raise IncompleteGenerationError(
                f"row {row} (request {prompt}) {what}"
                + (f" in {new} new tokens" if new is not None else "")
                + "; generate ended before the constraint finished. Pass max_new_tokens >= "
                f"{self.required_max_new_tokens} (RerankLogitsProcessor.required_max_new_tokens)"
            )
