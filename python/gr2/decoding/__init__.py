"""Constrained decoding: rerank outputs that are always a permutation of the candidates.

- :func:`constrained_decode` — gr2's own decoding loop (greedy, sampling, beam search) over any
  transformers causal LM, with a sparse output layer inside SID spans.
- :func:`catalog_decode` — the same loop generating any catalog items (next-item generation).
- :class:`RerankLogitsProcessor` — the same constraint for users of ``model.generate``.
- :mod:`gr2.decoding.vllm` — a vLLM logits processor (optional; imported lazily, needs vllm).

The automaton itself is native (``gr2._gr2.ConstraintBatch``; Rust, rayon, GIL released).
"""

from __future__ import annotations

from gr2.decoding._setup import build_token_map, lookup_sid_tokens
from gr2.decoding.decode import AllowedTrace, RerankResult, catalog_decode, constrained_decode, constraint_trace
from gr2.decoding.processors import RerankLogitsProcessor, apply_allowed

__all__ = [
    "AllowedTrace",
    "RerankResult",
    "RerankLogitsProcessor",
    "apply_allowed",
    "build_token_map",
    "catalog_decode",
    "constrained_decode",
    "constraint_trace",
    "lookup_sid_tokens",
]
