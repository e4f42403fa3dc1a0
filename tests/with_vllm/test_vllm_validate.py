"""validate_params with vLLM's real SamplingParams, called directly and through vLLM's own admission
validators of both interfaces (V1 ``validate_logits_processors_parameters``, V2
``build_custom_logits_processors_params_validator``), which turn gr2's ValueError into vLLM's
``VLLMValidationError`` (an HTTP 400 for a server's client): every request that would be cut short
or fail inside the engine step is refused here, naming the argument."""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm")

import gr2  # noqa: E402
from gr2.decoding._setup import completion_length  # noqa: E402

pytestmark = pytest.mark.vllm


def params(**kw):
    from vllm import SamplingParams

    return SamplingParams(**kw)


def cases(world):
    """(name, SamplingParams, regex the error must match) for every refused request."""
    items = [int(x) for x in world.items]
    c3 = items[1:4]
    L = world.sid_tokens.levels
    need_think = completion_length(3, L, "think", 4)
    need_off = completion_length(3, L, "disabled", 0)

    def gr2_args(**spec):
        return {"gr2": {"candidates": c3, **spec}}

    word = world.tokenizer.convert_tokens_to_ids("movie")
    return [
        ("no gr2 args", params(max_tokens=256), "gr2_unconstrained"),
        ("not a dict", params(max_tokens=256, extra_args={"gr2": [1, 2]}), "must be a dict"),
        ("no candidates", params(max_tokens=256, extra_args={"gr2": {}}), "candidates"),
        ("K = 0", params(max_tokens=256, extra_args={"gr2": {"candidates": []}}), "candidates"),
        ("duplicate", params(max_tokens=256, extra_args={"gr2": {"candidates": [items[0], items[0]]}}), "more than once"),
        ("unknown item", params(max_tokens=256, extra_args={"gr2": {"candidates": [items[0], 987654321]}}), "987654321"),
        ("negative item", params(max_tokens=256, extra_args={"gr2": {"candidates": [-5]}}), "candidates"),
        ("unknown key", params(max_tokens=256, extra_args=gr2_args(k=3)), "unknown key"),
        ("bad mode", params(max_tokens=256, extra_args=gr2_args(reasoning="nope")), "reasoning"),
        ("negative budget", params(max_tokens=256, extra_args=gr2_args(max_reasoning_tokens=-1)), "max_reasoning_tokens"),
        ("string budget", params(max_tokens=256, extra_args=gr2_args(max_reasoning_tokens="8")), "max_reasoning_tokens"),
        ("codes shape", params(max_tokens=256, extra_args=gr2_args(codes=[[1, 2]] * 3)), "codes"),
        ("truncating max_tokens", params(max_tokens=need_think - 1, extra_args=gr2_args(max_reasoning_tokens=4)),
         rf"max_tokens = {need_think - 1} can cut"),
        ("unset max_tokens", params(max_tokens=None, extra_args=gr2_args(reasoning="disabled")),
         rf"max_tokens is unset.*>= {need_off}"),
        ("stop string", params(max_tokens=256, stop=["</answer>"], extra_args=gr2_args()), r"SamplingParams\.stop"),
        ("stop on a SID token", params(max_tokens=256, stop_token_ids=[world.sid_tokens.sid_end],
                                       extra_args=gr2_args(reasoning="disabled")), "SID/format token"),
        ("stop on a reasoning word", params(max_tokens=256, stop_token_ids=[word], extra_args=gr2_args()),
         "free reasoning may emit"),
        ("ignore_eos", params(max_tokens=256, ignore_eos=True, extra_args=gr2_args()), "ignore_eos"),
        ("min_tokens", params(max_tokens=256, min_tokens=need_off, extra_args=gr2_args(reasoning="disabled")),
         "min_tokens"),
        ("allowed_token_ids", params(max_tokens=256, allowed_token_ids=[1, 2], extra_args=gr2_args()),
         "allowed_token_ids"),
        ("bad_words", params(max_tokens=256, bad_words=["movie"], extra_args=gr2_args()), "bad_words"),
        ("thinking_token_budget", params(max_tokens=256, thinking_token_budget=8, extra_args=gr2_args()),
         "thinking_token_budget"),
        ("structured_outputs", params(max_tokens=256, extra_args=gr2_args(),
                                      structured_outputs=_structured(["a", "b"])), "structured_outputs"),
    ]


def _structured(choice):
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(choice=choice)


def accepted(world):
    items = [int(x) for x in world.items]
    c3 = items[1:4]
    L = world.sid_tokens.levels
    need = completion_length(3, L, "think", 4)
    shortest = completion_length(3, L, "disabled", 0, eos=False)
    return [
        params(max_tokens=need, extra_args={"gr2": {"candidates": c3, "max_reasoning_tokens": 4}}),
        params(max_tokens=need, extra_args={"gr2": {"candidates": c3, "reasoning": "in_think", "max_reasoning_tokens": 4}}),
        params(max_tokens=256, extra_args={"gr2_unconstrained": True}),
        # EOS as a stop id, and one a reasoning-free request can never emit, are harmless
        params(max_tokens=256, stop_token_ids=[world.eos], extra_args={"gr2": {"candidates": c3}}),
        params(max_tokens=256, stop_token_ids=[world.tokenizer.convert_tokens_to_ids("movie")],
               extra_args={"gr2": {"candidates": c3, "reasoning": "disabled"}}),
        params(max_tokens=256, min_tokens=shortest, extra_args={"gr2": {"candidates": c3, "reasoning": "disabled"}}),
        params(max_tokens=256, extra_args={"gr2": {"candidates": c3, "codes": world.index.sids(world.items[1:4]).tolist()}}),
    ]


def test_validate_params_refuses_bad_requests_up_front(world):
    proc = world.processor()
    for name, p, match in cases(world):
        with pytest.raises(gr2.InvalidInputError, match=match):
            proc.validate_params(p)
            pytest.fail(f"accepted: {name}")
    for p in accepted(world):
        proc.validate_params(p)


def test_vllm_admission_validators_reject_with_vllm_errors(world):
    """Through vLLM's own per-interface validators, as the engine's input processor calls them."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    proc = world.processor()
    v2 = build_custom_logits_processors_params_validator([proc])
    for name, p, match in cases(world):
        with pytest.raises(VLLMValidationError, match=match):
            validate_logits_processors_parameters([proc], p)
        with pytest.raises(VLLMValidationError, match=match):
            v2(p)
    for p in accepted(world):
        validate_logits_processors_parameters([proc], p)
        v2(p)


def test_allow_unconstrained_lets_plain_requests_through(world):
    proc = world.processor(allow_unconstrained=True)
    proc.validate_params(params(max_tokens=16))
    # a gr2 request is still checked whole
    with pytest.raises(gr2.InvalidInputError, match="max_tokens"):
        proc.validate_params(params(max_tokens=2, extra_args={"gr2": {"candidates": [int(world.items[0])]}}))
