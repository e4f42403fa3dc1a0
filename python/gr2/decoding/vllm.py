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
and ``max_reasoning_tokens``. ``validate_params`` checks all of it before the request is scheduled
(unknown keys, unknown items, the codes' shape, the mode and budget) and refuses a ``max_tokens``
below the longest constrained completion, which vLLM would cut into a partial list. With
``reasoning="in_think"`` the prompt already opened ``<think>`` (a chat template that does), so the
completion starts inside it; prepend ``<think>`` to the completion before verifying it
(``gr2.verify_rewards`` / ``parse_ranking`` parse a whole ``<think>...</think><answer>...`` text). A request **without** ``extra_args["gr2"]`` is rejected (vLLM's
``validate_params`` raises gr2.InvalidInputError, a ValueError) rather than decoded unconstrained:
it opts out only explicitly, with ``extra_args["gr2_unconstrained"] = True``, or every request
does when the processor is made with ``allow_unconstrained=True`` (a server with mixed traffic).
The request handling lives in :mod:`gr2.decoding._vllm_core` (tested without vLLM).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError as exc:  # vllm is an optional extra
    raise ImportError(
        "gr2.decoding.vllm needs vLLM (>= 0.10, V1 engine): pip install 'gr2[vllm]'. "
        "Without vLLM use gr2.constrained_decode or gr2.decoding.RerankLogitsProcessor."
    ) from exc

from gr2.decoding._setup import build_token_map
from gr2.decoding._vllm_core import EXTRA_KEY, OPT_OUT_KEY, RequestTracker, request_spec
from gr2.tokens import SidTokens


def make_rerank_logits_processor(
    sid_tokens: SidTokens,
    *,
    eos_token_id: int,
    tokenizer: Any = None,
    index: Any = None,
    allow_unconstrained: bool = False,
) -> type:
    """A ``LogitsProcessor`` class bound to one model's SID vocabulary (pass it to ``LLM``).
    ``allow_unconstrained`` lets requests without ``extra_args["gr2"]`` through unconstrained
    (default: they are rejected)."""

    class Gr2RerankLogitsProcessor(LogitsProcessor):
        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            request_spec(sampling_params, index=index, allow_unconstrained=allow_unconstrained, levels=sid_tokens.levels)

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
            vocab = vllm_config.model_config.get_vocab_size()
            self.token_map = build_token_map(sid_tokens, eos=int(eos_token_id), vocab_size=vocab, tokenizer=tokenizer)
            self.forbidden = torch.as_tensor(self.token_map.reasoning_forbidden(), dtype=torch.long, device=device)
            self.tracker = RequestTracker(self.token_map, sid_tokens.levels, index=index,
                                          allow_unconstrained=allow_unconstrained)

        def is_argmax_invariant(self) -> bool:
            return False  # it changes which token wins

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            self.tracker.update(batch_update, lambda d: d == MoveDirectionality.SWAP)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            return self.tracker.apply(logits, self.forbidden)

    return Gr2RerankLogitsProcessor


__all__ = ["EXTRA_KEY", "OPT_OUT_KEY", "make_rerank_logits_processor"]
