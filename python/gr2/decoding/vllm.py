"""A vLLM (V1 engine) logits processor that constrains rerank requests. Optional: needs ``vllm``
(``pip install gr2[vllm]``); importing this module without it raises a clear ImportError.

Written against ``vllm.v1.sample.logits_processor.LogitsProcessor`` (vLLM >= 0.10: batch-level
processors with ``validate_params`` / ``update_state(BatchUpdate)`` / ``apply(logits)``). Untested in
gr2's CI, which runs without vLLM; the native automaton underneath is the tested one.

    Processor = make_rerank_logits_processor(sid_tokens, eos_token_id=tok.eos_token_id,
                                             tokenizer=tok, index=index)
    llm = LLM(model_dir, logits_processors=[Processor])
    params = SamplingParams(max_tokens=512, extra_args={"gr2": {"candidates": [3, 17, 5]}})

A request opts in with ``extra_args["gr2"]``: ``candidates`` (item ids), optional ``codes`` (their
SIDs, K x L; looked up in ``index`` when omitted), ``reasoning`` ("think", "in_think", "disabled")
and ``max_reasoning_tokens``. Other requests are left untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError as exc:  # vllm is an optional extra
    raise ImportError(
        "gr2.decoding.vllm needs vLLM (>= 0.10, V1 engine): pip install 'gr2[vllm]'. "
        "Without vLLM use gr2.constrained_decode or gr2.decoding.RerankLogitsProcessor."
    ) from exc

from gr2 import _gr2
from gr2.decoding._setup import as_candidates, build_token_map, candidate_codes
from gr2.decoding.processors import apply_allowed
from gr2.tokens import SidTokens

EXTRA_KEY = "gr2"


class _Request:
    """One tracked request: its automaton and the live list of its output tokens."""

    def __init__(self, batch: Any, output_ids: list[int]):
        self.batch = batch
        self.output_ids = output_ids  # vLLM keeps appending to this very list
        self.consumed = 0

    def catch_up(self) -> None:
        new = self.output_ids[self.consumed:]
        for tok in new:
            if self.batch.phases()[0] == 3:
                break
            self.batch.advance(np.zeros(1, dtype=np.int64), np.asarray([tok], dtype=np.int64))
        self.consumed = len(self.output_ids)


def make_rerank_logits_processor(
    sid_tokens: SidTokens,
    *,
    eos_token_id: int,
    tokenizer: Any = None,
    index: Any = None,
) -> type:
    """A ``LogitsProcessor`` class bound to one model's SID vocabulary (pass it to ``LLM``)."""

    class Gr2RerankLogitsProcessor(LogitsProcessor):
        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            spec = (sampling_params.extra_args or {}).get(EXTRA_KEY)
            if spec is None:
                return
            if "candidates" not in spec:
                raise ValueError("extra_args['gr2'] needs 'candidates'")
            as_candidates([spec["candidates"]])
            if spec.get("codes") is None and index is None:
                raise ValueError("extra_args['gr2'] needs 'codes' when no index was given to the processor")

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
            vocab = vllm_config.model_config.get_vocab_size()
            self.token_map = build_token_map(sid_tokens, eos=int(eos_token_id), vocab_size=vocab, tokenizer=tokenizer)
            self.forbidden = torch.as_tensor(self.token_map.reasoning_forbidden(), dtype=torch.long, device=device)
            self.requests: dict[int, _Request] = {}

        def is_argmax_invariant(self) -> bool:
            return False  # it changes which token wins

        def _new_request(self, params: Any, output_ids: list[int]) -> _Request | None:
            spec = (params.extra_args or {}).get(EXTRA_KEY)
            if spec is None:
                return None
            cands = as_candidates([spec["candidates"]])
            if spec.get("codes") is not None:
                codes = np.ascontiguousarray(np.asarray(spec["codes"], dtype=np.uint16)[None])
            else:
                codes = candidate_codes(index, cands, sid_tokens.levels)
            batch = _gr2.ConstraintBatch(self.token_map)
            batch.add_rerank(cands, codes, reasoning=spec.get("reasoning", "think"),
                             max_reasoning_tokens=int(spec.get("max_reasoning_tokens", 128)))
            return _Request(batch, output_ids)

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is not None:
                for idx in batch_update.removed:
                    self.requests.pop(idx, None)
                for idx, params, _prompt_ids, output_ids in batch_update.added:
                    req = self._new_request(params, output_ids)
                    if req is None:
                        self.requests.pop(idx, None)
                    else:
                        self.requests[idx] = req
                for a, b, direction in batch_update.moved:
                    ra, rb = self.requests.pop(a, None), self.requests.pop(b, None)
                    if ra is not None:
                        self.requests[b] = ra
                    if direction == MoveDirectionality.SWAP and rb is not None:
                        self.requests[a] = rb
            for req in self.requests.values():
                req.catch_up()

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            for idx, req in self.requests.items():
                apply_allowed(logits[idx:idx + 1], req.batch.allowed(), self.forbidden)
            return logits

    return Gr2RerankLogitsProcessor
