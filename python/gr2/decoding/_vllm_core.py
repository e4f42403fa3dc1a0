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
from gr2.errors import ConstraintError, InvalidInputError, UnknownItemError

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


ENGINE_CONFLICTS = (
    # (SamplingParams field, "unset" test, why gr2 refuses it) -- each one can cut the ranking short or
    # leave a step with no allowed token, so the request would come back partial or not at all
    ("stop", lambda v: not v, "a stop string can match inside the reasoning or the answer and cut the ranking short"),
    ("ignore_eos", lambda v: not v, "ignore_eos runs past the ranking's end"),
    ("structured_outputs", lambda v: v is None, "a second grammar on top of gr2's automaton can leave no allowed token"),
    ("allowed_token_ids", lambda v: v is None, "allowed_token_ids can remove the token the ranking needs next"),
    ("bad_words", lambda v: not v, "bad_words can remove the token the ranking needs next"),
    ("thinking_token_budget", lambda v: v is None,
     "vLLM's thinking-budget forcing runs after logits processors and overrides gr2's mask; use "
     "extra_args['gr2']['max_reasoning_tokens']"),
    ("repetition_detection", lambda v: v is None, "repetition detection can stop the request before the answer completes"),
)


def check_engine_params(params: Any, spec: dict, *, levels: int, eos: int, structural_ids: frozenset,
                        reasoning_blocked: frozenset | None) -> None:
    """vLLM's own ``SamplingParams`` fields that would truncate a constrained request or fight its
    mask, refused up front (``spec`` is :func:`request_spec`'s answer for the request).

    ``max_tokens`` must be set (vLLM fills a missing one with what is left of the context window, which
    ``validate_params`` cannot see), ``min_tokens`` may not hold EOS back past the shortest ranking,
    and a ``stop_token_ids`` entry other than EOS must be a token the automaton never emits before its
    end: not a SID/format token (``structural_ids``), and with reasoning on, one of the ids reasoning
    may not use (``reasoning_blocked``: the tokenizer's special tokens; None when unknown, which
    refuses every extra stop id)."""
    where = f"extra_args['{EXTRA_KEY}'] request"
    if getattr(params, "max_tokens", None) is None:
        need = completion_length(int(spec["candidates"].flat.size), levels, spec["reasoning"], spec["max_reasoning_tokens"])
        raise InvalidInputError(f"{where}: max_tokens is unset (vLLM would fill it with the rest of the context window, "
                                f"which can cut the ranking short); set max_tokens >= {need}")
    for name, unset, why in ENGINE_CONFLICTS:
        value = getattr(params, name, None)
        if not unset(value):
            raise InvalidInputError(f"{where}: SamplingParams.{name} = {value!r} is not supported with gr2's constraint: {why}")
    k = int(spec["candidates"].flat.size)
    shortest = completion_length(k, levels, spec["reasoning"], 0, eos=False)  # tokens before EOS, empty reasoning
    min_tokens = int(getattr(params, "min_tokens", 0) or 0)
    if min_tokens > shortest:
        raise InvalidInputError(f"{where}: min_tokens = {min_tokens} holds EOS back past the shortest ranking of {k} "
                                f"candidates ({shortest} tokens), which leaves a step with no allowed token; "
                                f"use min_tokens <= {shortest}")
    for t in getattr(params, "stop_token_ids", None) or ():
        t = int(t)
        if t == eos:
            continue
        if t in structural_ids:
            raise InvalidInputError(f"{where}: stop_token_ids has {t}, a SID/format token of the ranking: it would cut "
                                    "the ranking short")
        if spec["reasoning"] != "disabled" and (reasoning_blocked is None or t not in reasoning_blocked):
            raise InvalidInputError(f"{where}: stop_token_ids has {t}, a token free reasoning may emit (reasoning "
                                    f"{spec['reasoning']!r}): it could stop the request before the answer; drop it "
                                    "or use reasoning='disabled'")


class _Request:
    """One tracked request: its automaton and the live list of its output tokens."""

    def __init__(self, batch: Any, output_ids: list[int]):
        self.batch = batch
        self.output_ids = output_ids  # vLLM keeps appending to this very list
        self.consumed = 0

    def catch_up(self) -> None:
        """Feed the automaton the output tokens it has not seen. Called when the logits are about to
        be masked: under vLLM's async scheduling the last step's token is a -1 placeholder while
        ``update_state`` runs and becomes the real id only right before the sampler."""
        new = self.output_ids[self.consumed:]
        for tok in new:
            if self.batch.phases()[0] == 3:
                break
            if tok < 0:
                raise ConstraintError(f"output token {self.consumed} is the placeholder {tok} when the logits are "
                                      "masked: vLLM has not filled in the last sampled token")
            self.batch.advance(np.zeros(1, dtype=np.int64), np.asarray([tok], dtype=np.int64))
            self.consumed += 1
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
        # no catch_up here: under async scheduling the newest output token is still a placeholder

    def apply(self, logits: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
        """V1: the row of each tracked request is its persistent-batch index."""
        for req in self.requests.values():
            req.catch_up()
        return self.apply_rows(logits, forbidden, [(idx, idx) for idx in self.requests])

    # --- model runner V2: requests by persistent slot, admitted one by one (``add_request``), their
    # committed output read back from the runner's token buffer at each step -----------------------

    def add(self, slot: int, params: Any) -> bool:
        """V2 ``add_request``: (re)initialise ``slot``; False when the request is not constrained. The
        automaton starts empty: on a request resumed after preemption, its earlier output is read back
        at the next step like any other committed token."""
        req = self.new_request(params, [])
        if req is None:
            self.requests.pop(slot, None)
            return False
        self.requests[slot] = req
        return True

    def sync_outputs(self, slots: list[int], out_lens: Any,
                     fetch: Callable[[list[tuple[int, int, int]]], list[list[int]]]) -> None:
        """Bring each tracked slot's automaton to its committed output length; ``fetch`` reads the
        missing tokens, given ``(slot, start, stop)`` output positions, in one pass."""
        want = []
        for slot, n in zip(slots, out_lens):
            req, n = self.requests[slot], int(n)
            if n < len(req.output_ids):
                raise ConstraintError(f"batch slot {slot}: the model runner reports {n} output tokens but "
                                      f"{len(req.output_ids)} were already seen (a slot reused without add_request?)")
            if n > len(req.output_ids):
                want.append((slot, len(req.output_ids), n))
        if want:
            for (slot, _, _), toks in zip(want, fetch(want)):
                self.requests[slot].output_ids.extend(int(t) for t in toks)
        for slot in slots:
            self.requests[slot].catch_up()

    def apply_rows(self, logits: torch.Tensor, forbidden: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """Mask ``logits[row]`` with the automaton of ``slot`` for each ``(row, slot)``."""
        from gr2.decoding.processors import apply_allowed

        for row, slot in pairs:
            apply_allowed(logits[row:row + 1], self.requests[slot].batch.allowed(), forbidden)
        return logits
