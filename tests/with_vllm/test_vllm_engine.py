"""The processor class crosses into vLLM's engine-core and worker processes (spawned: the class is
pickled), and, where vLLM's engine can run here, ``vllm.LLM`` serves constrained rerank requests
end to end with every output a valid permutation.

The PyPI wheel of vLLM is a CUDA build: on a machine without a GPU its CPU platform starts, but the
worker dies at start-up for lack of the CPU kernels (``vllm._C_AVX2`` is not in the wheel, so
``torch.ops._C.init_cpu_memory_env`` does not exist). The engine test checks for exactly that and
skips naming it; on a GPU machine, or with a CPU build of vLLM, it runs."""

from __future__ import annotations

import multiprocessing.reduction
import pickle

import numpy as np
import pytest

vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

import gr2  # noqa: E402
from gr2.decoding._setup import completion_length  # noqa: E402

pytestmark = pytest.mark.vllm


def test_processor_class_pickles_into_another_process(world, vllm_config):
    """vLLM ships ``logits_processors`` to its engine-core process with multiprocessing's pickler; a
    class made inside make_rerank_logits_processor must survive that (it failed with "Can't pickle
    local object 'make_rerank_logits_processor.<locals>.Gr2RerankLogitsProcessor'")."""
    from vllm import SamplingParams

    cls = world.processor(interface="v1")
    for data in (pickle.dumps(cls), bytes(multiprocessing.reduction.ForkingPickler.dumps(cls))):
        again = pickle.loads(data)
        assert again is not cls and again.gr2_interfaces == ("v1",)
        with pytest.raises(gr2.InvalidInputError, match="987654321"):
            again.validate_params(SamplingParams(max_tokens=256, extra_args={"gr2": {"candidates": [987654321]}}))
        proc = again(vllm_config, torch.device("cpu"), False)
        assert proc.token_map.vocab_size == world.vocab
    # and in a fresh interpreter, as vLLM's spawned engine core gets it
    import subprocess
    import sys

    code = ("import os, pickle, sys; os.environ.setdefault('VLLM_TARGET_DEVICE', 'cpu'); "
            "cls = pickle.loads(sys.stdin.buffer.read()); print(cls.gr2_interfaces, cls.__name__)")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(world.processor()), capture_output=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip().endswith("('v1', 'v2') Gr2RerankLogitsProcessor")


def engine_unavailable() -> str | None:
    """Why vLLM's engine cannot run on this machine, or None."""
    if torch.cuda.is_available():
        return None
    import vllm._custom_ops  # noqa: F401  (loads whichever compiled ops the wheel has)
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return f"no GPU and vLLM resolved the {type(current_platform).__name__} platform"
    if not hasattr(torch.ops._C, "init_cpu_memory_env"):
        return ("the vLLM wheel has no CPU kernels (no module vllm._C_AVX2; torch.ops._C.init_cpu_memory_env "
                "is missing, so the CPU worker fails at start-up): PyPI's vllm is a CUDA build; run on a GPU "
                "(scripts/gpu_check.py serves through vLLM) or with a CPU build of vLLM")
    return None


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_llm_serves_only_valid_permutations(world, runner, monkeypatch):
    why = engine_unavailable()
    if why:
        pytest.skip(why)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1" if runner == "v2" else "0")
    llm = LLM(model=world.model_dir, tokenizer=world.model_dir, logits_processors=[world.processor()],
              max_model_len=512, enforce_eager=True, dtype="float32", max_num_seqs=4, gpu_memory_utilization=0.2,
              seed=0)
    assert llm.llm_engine.vllm_config.use_v2_model_runner == (runner == "v2")
    rng = np.random.default_rng(0)
    specs, prompts, params = [], [], []
    for i in range(12):
        k = int(rng.integers(1, 6))
        mode = ("think", "in_think", "disabled")[i % 3]
        spec = {"candidates": [int(x) for x in rng.choice(world.items, size=k, replace=False)], "reasoning": mode,
                "max_reasoning_tokens": int(rng.integers(0, 8))}
        need = completion_length(k, world.sid_tokens.levels, mode, spec["max_reasoning_tokens"])
        specs.append(spec)
        prompts.append(TokensPrompt(prompt_token_ids=[2] + [4 + (i + j) % 10 for j in range(3 + i % 4)]))
        params.append(SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=need,
                                     extra_args={"gr2": spec}))
    outs = llm.generate(prompts, params)
    assert len(outs) == len(specs)
    for spec, out in zip(specs, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (o.finish_reason, list(o.token_ids))
        ids = list(o.token_ids)
        if ids[-1] != world.eos:  # vLLM may leave the stop token out of token_ids
            ids.append(world.eos)
        world.check_completion(spec, ids)
    # a request vLLM would cut short never reaches the engine
    with pytest.raises(Exception, match="max_tokens"):
        llm.generate([prompts[0]], SamplingParams(max_tokens=3, extra_args={"gr2": specs[0]}))
