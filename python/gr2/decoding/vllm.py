"""vLLM logits processors that constrain rerank requests. Optional: needs ``vllm``
(``pip install gr2[vllm]``); importing this module without it raises a clear ImportError.

Tested against vLLM 0.33.0 (``make test-vllm``: its own environment, ``.venv-vllm``, at the versions
of ``scripts/constraints-vllm.txt``; pyproject's ``vllm`` extra allows ``>=0.33,<0.34``). vLLM 0.33
has two logits-processor interfaces and picks one per engine (``VllmConfig.use_v2_model_runner``:
model runner V2 by default, V1 with ``VLLM_USE_V2_MODEL_RUNNER=0`` or a feature V2 lacks):

- V1, ``vllm.v1.sample.logits_processor.LogitsProcessor``: ``__init__(vllm_config, device,
  is_pin_memory)``, ``update_state(BatchUpdate)`` (``added`` holds ``(index, SamplingParams,
  prompt_token_ids, output_token_ids)`` tuples, the last one the live list vLLM appends to; then
  ``removed`` and ``moved``), ``apply(logits)`` with one row per persistent-batch index;
- V2, ``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``: ``__init__(vllm_config,
  req_states)``, ``add_request(slot, SamplingParams)``, ``apply(logits, ctx)`` with the rows mapped
  to slots by ``ctx.idx_mapping_np``; the committed output is read from ``req_states``
  (``all_token_ids[slot, prompt_len:total_len]``) once per step for the constrained rows.

The class :func:`make_rerank_logits_processor` returns derives from every interface the installed
vLLM has (found at import, :data:`INTERFACES`), so the engine can build it either way; its
constructor's arguments say which one it runs. It pickles (as a call to
:func:`make_rerank_logits_processor` with the same arguments), which vLLM needs to ship it to its
engine-core and worker processes. Speculative decoding is refused (several rows per request). The tests (``tests/with_vllm/``) drive both interfaces through vLLM's own classes on the CPU
(``InputBatch`` and ``BatchUpdateBuilder`` for V1, ``LogitsProcRequestState`` over the runner's
buffers for V2, real ``SamplingParams``/``VllmConfig``); the engine itself runs on a GPU only
(``scripts/gpu_check.py`` serves through it).

    Processor = make_rerank_logits_processor(sid_tokens, eos_token_id=tok.eos_token_id,
                                             tokenizer=tok, index=index)
    llm = LLM(model_dir, logits_processors=[Processor])
    params = SamplingParams(max_tokens=512, extra_args={"gr2": {"candidates": [3, 17, 5]}})

A request opts in with ``extra_args["gr2"]``: ``candidates`` (item ids), optional ``codes`` (their
SIDs, K x L; looked up in ``index`` when omitted), ``reasoning`` ("think", "in_think", "disabled")
and ``max_reasoning_tokens``. ``validate_params`` checks all of it before the request is scheduled
(unknown keys, unknown items, the codes' shape, the mode and budget) and refuses what would return a
partial list or fight the mask: a ``max_tokens`` unset or below the longest constrained completion,
``stop`` strings, ``stop_token_ids`` the ranking could emit, ``ignore_eos``, a ``min_tokens`` past the
shortest ranking, ``structured_outputs``, ``allowed_token_ids``, ``bad_words``,
``thinking_token_budget`` and ``repetition_detection``. A prompt so long that the context window
(``max_model_len``) ends before the ranking does still stops early: vLLM then reports
``finish_reason == "length"`` (check it, or verify the output with ``gr2.verify_rewards``). With
``reasoning="in_think"`` the prompt already opened ``<think>`` (a chat template that does), so the
completion starts inside it; prepend ``<think>`` to the completion before verifying it
(``gr2.verify_rewards`` / ``parse_ranking`` parse a whole ``<think>...</think><answer>...`` text). A request **without** ``extra_args["gr2"]`` is rejected (vLLM's
``validate_params`` raises gr2.InvalidInputError, a ValueError) rather than decoded unconstrained:
it opts out only explicitly, with ``extra_args["gr2_unconstrained"] = True``, or every request
does when the processor is made with ``allow_unconstrained=True`` (a server with mixed traffic).
The request handling lives in :mod:`gr2.decoding._vllm_core` (tested without vLLM).
"""

from __future__ import annotations

import copyreg
from typing import Any

import numpy as np
import torch

try:
    import vllm  # noqa: F401
except ImportError as exc:  # vllm is an optional extra
    raise ImportError(
        "gr2.decoding.vllm needs vLLM (>=0.33,<0.34): pip install 'gr2[vllm]'. "
        "Without vLLM use gr2.constrained_decode or gr2.decoding.RerankLogitsProcessor."
    ) from exc

_BASES: dict[str, type] = {}
try:  # V1 (the persistent-batch interface; gone from vLLM 0.34)
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1LogitsProcessor
    from vllm.v1.sample.logits_processor import MoveDirectionality as _MoveDirectionality

    _BASES["v1"] = _V1LogitsProcessor
except ImportError:
    _MoveDirectionality = None
try:  # model runner V2
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2LogitsProcessor

    _BASES["v2"] = _V2LogitsProcessor
except ImportError:
    pass
if not _BASES:
    raise ImportError(
        f"gr2.decoding.vllm found neither of vLLM's logits-processor interfaces (V1 "
        f"vllm.v1.sample.logits_processor, V2 vllm.v1.worker.gpu.sample.logits_processor) in vLLM "
        f"{getattr(vllm, '__version__', '?')}; gr2 is tested with vllm>=0.33,<0.34: pip install 'gr2[vllm]'"
    )

#: The logits-processor interfaces of the installed vLLM ("v1", "v2"), found at import.
INTERFACES: tuple[str, ...] = tuple(_BASES)

from gr2.decoding._setup import build_token_map  # noqa: E402
from gr2.decoding._vllm_core import (  # noqa: E402
    EXTRA_KEY,
    OPT_OUT_KEY,
    RequestTracker,
    check_engine_params,
    request_spec,
)
from gr2.errors import ConstraintError, InvalidInputError  # noqa: E402
from gr2.tokens import SidTokens  # noqa: E402


def _dense(x: Any) -> torch.Tensor:
    """A runner buffer's device tensor (``StagedWriteTensor``/``UvaBackedTensor`` keep it in ``.gpu``)."""
    return x.gpu if hasattr(x, "gpu") else x


def _host(x: Any) -> np.ndarray:
    """A runner buffer's host copy (``UvaBackedTensor.np`` is the source of truth)."""
    if hasattr(x, "np"):
        return x.np
    return _dense(x).cpu().numpy()


class _ProcessorMeta(type(next(iter(_BASES.values())))):
    """The metaclass of gr2's processor classes, so that pickle can carry one to vLLM's engine-core
    process (a class made inside a function is not importable by name): it pickles as a call to
    :func:`make_rerank_logits_processor` with the same arguments (SidIndex, SidTokens and a HF
    tokenizer pickle)."""


def _rebuild_processor(kwargs: dict) -> type:
    return make_rerank_logits_processor(**kwargs)


copyreg.pickle(_ProcessorMeta, lambda cls: (_rebuild_processor, (cls._gr2_factory_args,)))


def make_rerank_logits_processor(
    sid_tokens: SidTokens,
    *,
    eos_token_id: int,
    tokenizer: Any = None,
    index: Any = None,
    allow_unconstrained: bool = False,
    interface: str | None = None,
) -> type:
    """A logits-processor class bound to one model's SID vocabulary (pass it to ``LLM``).
    ``allow_unconstrained`` lets requests without ``extra_args["gr2"]`` through unconstrained
    (default: they are rejected). ``interface`` ("v1" or "v2") limits the class to one of vLLM's
    interfaces; by default it implements every one the installed vLLM has (:data:`INTERFACES`)."""
    if interface is None:
        chosen = INTERFACES
    elif interface in _BASES:
        chosen = (interface,)
    else:
        raise InvalidInputError(f"interface must be one of {INTERFACES} (this vLLM's) or None, got {interface!r}")
    eos = int(eos_token_id)
    levels = sid_tokens.levels
    structural = frozenset(int(t) for t in np.asarray(sid_tokens.code_ids).ravel() if t >= 0) | frozenset(
        int(t) for t in (sid_tokens.sid_begin, sid_tokens.sid_end, sid_tokens.think_open, sid_tokens.think_close,
                         sid_tokens.answer_open, sid_tokens.answer_close))
    # the ids free reasoning may not emit (build_token_map forbids the tokenizer's special tokens)
    blocked = None if tokenizer is None else frozenset(
        int(t) for t in getattr(tokenizer, "all_special_ids", []) if t is not None and t != sid_tokens.think_close)

    factory_args = dict(sid_tokens=sid_tokens, eos_token_id=eos, tokenizer=tokenizer, index=index,
                        allow_unconstrained=allow_unconstrained, interface=interface)

    class Gr2RerankLogitsProcessor(*(_BASES[name] for name in chosen), metaclass=_ProcessorMeta):
        gr2_interfaces = chosen
        _gr2_factory_args = factory_args

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            spec = request_spec(sampling_params, index=index, allow_unconstrained=allow_unconstrained, levels=levels)
            if spec is not None:
                check_engine_params(sampling_params, spec, levels=levels, eos=eos, structural_ids=structural,
                                    reasoning_blocked=blocked)

        def __init__(self, vllm_config: Any, *args: Any):
            # V1: (vllm_config, device, is_pin_memory); V2: (vllm_config, req_states)
            if len(args) == 2 and "v1" in chosen:
                self.interface, device, self.req_states = "v1", torch.device(args[0]), None
            elif len(args) == 1 and "v2" in chosen:
                self.interface, self.req_states = "v2", args[0]
                device = torch.device(self.req_states.device)
            else:
                raise TypeError(f"{type(self).__name__} implements vLLM's {list(chosen)} interface(s); got "
                                f"{1 + len(args)} constructor arguments")
            if getattr(vllm_config, "speculative_config", None) is not None:
                raise ValueError("gr2's rerank logits processor does not support speculative decoding (several "
                                 "logits rows per request); serve without a speculative_config")
            vocab = vllm_config.model_config.get_vocab_size()
            self.token_map = build_token_map(sid_tokens, eos=eos, vocab_size=vocab, tokenizer=tokenizer)
            self.forbidden = torch.as_tensor(self.token_map.reasoning_forbidden(), dtype=torch.long, device=device)
            self.tracker = RequestTracker(self.token_map, levels, index=index, allow_unconstrained=allow_unconstrained)

        # --- V1 ---------------------------------------------------------------------------------
        def is_argmax_invariant(self) -> bool:
            return False  # it changes which token wins

        def update_state(self, batch_update: Any) -> None:
            self.tracker.update(batch_update, lambda d: d == _MoveDirectionality.SWAP)

        # --- V2 ---------------------------------------------------------------------------------
        def add_request(self, req_idx: int, sampling_params: Any) -> bool:
            return self.tracker.add(int(req_idx), sampling_params)

        def apply_staged_writes(self) -> None:
            pass  # nothing staged: the automata live on the host

        # --- both ---------------------------------------------------------------------------------
        def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
            if self.interface == "v1":
                return self.tracker.apply(logits, self.forbidden)
            return self._apply_v2(logits, ctx)

        def _apply_v2(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
            slots_np = np.asarray(ctx.idx_mapping_np)
            if logits.shape[0] != slots_np.shape[0]:
                raise ConstraintError(f"{logits.shape[0]} logits rows for {slots_np.shape[0]} requests: gr2's "
                                      "processor needs one row per request (no speculative decoding)")
            pairs = [(row, int(s)) for row, s in enumerate(slots_np.tolist()) if int(s) in self.tracker.requests]
            if not pairs:
                return logits
            rs = self.req_states
            slots = [s for _, s in pairs]
            tokens = _dense(rs.all_token_ids)
            slot_t = torch.as_tensor(slots, dtype=torch.long, device=tokens.device)
            total = _dense(rs.total_len)[slot_t].cpu().numpy().astype(np.int64)
            prompt = np.asarray(_host(rs.prompt_len))[slots].astype(np.int64)

            def fetch(want: list[tuple[int, int, int]]) -> list[list[int]]:
                rows = np.concatenate([np.full(b - a, s, dtype=np.int64) for s, a, b in want])
                p0 = {s: int(p) for s, p in zip(slots, prompt)}
                cols = np.concatenate([np.arange(p0[s] + a, p0[s] + b, dtype=np.int64) for s, a, b in want])
                flat = tokens[torch.as_tensor(rows, device=tokens.device),
                              torch.as_tensor(cols, device=tokens.device)].cpu().tolist()
                out, at = [], 0
                for _, a, b in want:
                    out.append(flat[at:at + b - a])
                    at += b - a
                return out

            self.tracker.sync_outputs(slots, total - prompt, fetch)
            return self.tracker.apply_rows(logits, self.forbidden, pairs)

    return Gr2RerankLogitsProcessor


__all__ = ["EXTRA_KEY", "INTERFACES", "OPT_OUT_KEY", "make_rerank_logits_processor"]
