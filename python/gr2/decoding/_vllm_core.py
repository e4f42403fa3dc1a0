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
from gr2.decoding._setup import add_rerank_rows, as_candidates, candidate_codes, completion_length
from gr2.errors import InvalidInputError, UnknownItemError

EXTRA_KEY = "gr2"
OPT_OUT_KEY = "gr2_unconstrained"


SPEC_KEYS = ("candidates", "codes", "reasoning", "max_reasoning_tokens")
REASONING_MODES = ("think", "in_think", "disabled")


def request_spec(params: Any, *, index: Any, allow_unconstrained: bool, levels: int | None = None) -> dict | None:
    """The request's gr2 arguments, checked whole (vLLM calls this from ``validate_params``, before
    the request enters a batch, so a bad request fails there and not inside the engine step):
    None for an explicit opt-out, else ``{"candidates", "codes", "reasoning",
    "max_reasoning_tokens"}`` ready for the automaton. ``levels`` (the SID length) lets the codes'
    shape and the request's ``max_tokens`` be checked too: a ``max_tokens`` below the longest
    constrained completion would return a partial list, so it is refused."""
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
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise InvalidInputError(f"extra_args['{EXTRA_KEY}'] has unknown key(s) {unknown}; known: {list(SPEC_KEYS)}")
    if "candidates" not in spec:
        raise InvalidInputError(f"extra_args['{EXTRA_KEY}'] needs 'candidates' (the request's item ids)")
    cands = as_candidates([spec["candidates"]])
    reasoning = spec.get("reasoning", "think")
    if reasoning not in REASONING_MODES:
        raise InvalidInputError(f"extra_args['{EXTRA_KEY}']['reasoning'] must be one of {REASONING_MODES}, got {reasoning!r}")
    budget = spec.get("max_reasoning_tokens", 128)
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise InvalidInputError(f"extra_args['{EXTRA_KEY}']['max_reasoning_tokens'] must be an integer >= 0, got {budget!r}")
    k = cands.flat.size
    if spec.get("codes") is not None:
        try:
            codes = np.asarray(spec["codes"])
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"extra_args['{EXTRA_KEY}']['codes'] is not an array of integer codes: {e}") from None
        want = (k, levels) if levels is not None else None
        if codes.ndim != 2 or codes.shape[0] != k or (want is not None and codes.shape != want) \
                or not np.issubdtype(codes.dtype, np.integer) or (codes.size and (codes.min() < 0 or codes.max() > 0xFFFF)):
            raise InvalidInputError(f"extra_args['{EXTRA_KEY}']['codes'] must be integer codes in [0, 65535] of shape "
                                    f"({k}, {levels if levels is not None else 'L'}), got {codes.dtype} {codes.shape}")
        codes = np.ascontiguousarray(codes, dtype=np.uint16)
    elif index is None:
        raise InvalidInputError(f"extra_args['{EXTRA_KEY}'] needs 'codes' when no index was given to the processor")
    else:
        try:
            codes = candidate_codes(index, cands, levels if levels is not None else int(index.levels))
        except UnknownItemError as e:  # vLLM turns a ValueError from validate_params into a 400 for the client
            raise InvalidInputError(f"extra_args['{EXTRA_KEY}']['candidates']: {e.args[0] if e.args else e}") from None
    if levels is not None:
        need = completion_length(k, levels, reasoning, int(budget))
        max_tokens = getattr(params, "max_tokens", None)
        if max_tokens is not None and int(max_tokens) < need:
            raise InvalidInputError(
                f"max_tokens = {max_tokens} can cut the ranking of {k} candidates short: a constrained completion "
                f"takes up to {need} tokens (reasoning {reasoning!r}, budget {int(budget)}); raise max_tokens or "
                "lower max_reasoning_tokens")
    return {"candidates": cands, "codes": codes, "reasoning": reasoning, "max_reasoning_tokens": int(budget)}


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
        spec = request_spec(params, index=self.index, allow_unconstrained=self.allow_unconstrained, levels=self.levels)
        if spec is None:
            return None
        batch = _gr2.ConstraintBatch(self.token_map)
        add_rerank_rows(batch, spec["candidates"], spec["codes"], reasoning=spec["reasoning"],
                        max_reasoning_tokens=spec["max_reasoning_tokens"])
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
