"""The vLLM-independent part of :mod:`gr2.decoding.vllm`: per-request automata keyed by batch
slot, driven by vLLM's ``BatchUpdate`` (``removed``, ``added``, ``moved``). Kept free of vllm
imports so its request handling is tested without vllm (tests/test_decode.py, fake batch updates).

A request opts in with ``extra_args["gr2"]`` (see :mod:`gr2.decoding.vllm`). A request without it
is **rejected** (InvalidInputError, a ValueError as vLLM's ``validate_params`` expects) instead of
being decoded unconstrained; it opts out only explicitly, with ``extra_args["gr2_unconstrained"]
= True``, or for every request when the processor was made with ``allow_unconstrained=True``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from gr2 import _gr2
from gr2.decoding._setup import add_rerank_rows, as_candidates, candidate_codes
from gr2.errors import InvalidInputError

EXTRA_KEY = "gr2"
OPT_OUT_KEY = "gr2_unconstrained"


def request_spec(params: Any, *, index: Any, allow_unconstrained: bool) -> dict | None:
    """The request's gr2 arguments, None for an explicit opt-out; raises for anything else."""
    extra = getattr(params, "extra_args", None) or {}
    if not isinstance(extra, dict):
        raise InvalidInputError(f"SamplingParams.extra_args must be a dict, got {type(extra).__name__}")
    spec = extra.get(EXTRA_KEY)
    if spec is None:
        if extra.get(OPT_OUT_KEY) is True or allow_unconstrained:
            return None
        raise InvalidInputError(
            f"this server constrains every request to a gr2 ranking, and this one has no extra_args['{EXTRA_KEY}'] "
            f"(with 'candidates'); pass them, or opt out explicitly with extra_args['{OPT_OUT_KEY}'] = True"
        )
    if not isinstance(spec, dict):
        raise InvalidInputError(f"extra_args['{EXTRA_KEY}'] must be a dict, got {type(spec).__name__}")
    if "candidates" not in spec:
        raise InvalidInputError(f"extra_args['{EXTRA_KEY}'] needs 'candidates' (the request's item ids)")
    as_candidates([spec["candidates"]])
    if spec.get("codes") is None and index is None:
        raise InvalidInputError(f"extra_args['{EXTRA_KEY}'] needs 'codes' when no index was given to the processor")
    return spec


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


class RequestTracker:
    """The automata of the requests in vLLM's persistent batch, by slot index."""

    def __init__(self, token_map: Any, levels: int, *, index: Any = None, allow_unconstrained: bool = False):
        self.token_map = token_map
        self.levels = levels
        self.index = index
        self.allow_unconstrained = allow_unconstrained
        self.requests: dict[int, _Request] = {}

    def new_request(self, params: Any, output_ids: list[int]) -> _Request | None:
        spec = request_spec(params, index=self.index, allow_unconstrained=self.allow_unconstrained)
        if spec is None:
            return None
        cands = as_candidates([spec["candidates"]])
        if spec.get("codes") is not None:
            codes = np.asarray(spec["codes"])
            if codes.shape != (cands.flat.size, self.levels):
                raise InvalidInputError(f"extra_args['{EXTRA_KEY}']['codes'] must be ({cands.flat.size}, {self.levels}), "
                                        f"got shape {codes.shape}")
            codes = np.ascontiguousarray(codes, dtype=np.uint16)
        else:
            codes = candidate_codes(self.index, cands, self.levels)
        batch = _gr2.ConstraintBatch(self.token_map)
        add_rerank_rows(batch, cands, codes, reasoning=spec.get("reasoning", "think"),
                        max_reasoning_tokens=int(spec.get("max_reasoning_tokens", 128)))
        return _Request(batch, output_ids)

    def update(self, batch_update: Any, is_swap: Callable[[Any], bool]) -> None:
        if batch_update is not None:
            for idx in batch_update.removed:
                self.requests.pop(idx, None)
            for idx, params, _prompt_ids, output_ids in batch_update.added:
                req = self.new_request(params, output_ids)
                if req is None:
                    self.requests.pop(idx, None)
                else:
                    self.requests[idx] = req
            for a, b, direction in batch_update.moved:
                ra, rb = self.requests.pop(a, None), self.requests.pop(b, None)
                if ra is not None:
                    self.requests[b] = ra
                if is_swap(direction) and rb is not None:
                    self.requests[a] = rb
        for req in self.requests.values():
            req.catch_up()

    def apply(self, logits: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
        from gr2.decoding.processors import apply_allowed

        for idx, req in self.requests.items():
            apply_allowed(logits[idx:idx + 1], req.batch.allowed(), forbidden)
        return logits
