"""Per-GPU memory of a training stage, estimated before any weight is loaded, and the check that
refuses a plan that cannot fit.

The estimate (bytes, per process) sums what the training loop keeps:

* weights: trainable parameters as float32 master weights (:func:`gr2.train.devices.param_dtype`);
  frozen ones (the base model under LoRA) in the compute dtype (:func:`freeze_in_compute_dtype`);
* gradients (float32) and AdamW's two moments (float32) of the trainable parameters;
* activations: about ``34 * hidden`` bytes per token and layer in a 16-bit compute dtype (Korthikanti
  et al., 2022, "Reducing activation recomputation", without the attention-score term, which fused
  SDPA kernels do not keep), twice that in float32;
* the logits of a micro-batch: ``tokens * vocab`` in the compute dtype plus a float32 log-softmax.

It is an estimate, not a measurement: allocator fragmentation, CUDA context (~0.5-1 GB) and
temporary buffers come on top, so :func:`check_fits` keeps ``headroom`` (10%) of the device free.
The model is built on PyTorch's meta device (shapes, no storage), from a local HF folder's
``config.json`` or from :data:`ARCHITECTURES` for the hub models the presets name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gr2.errors import ConfigError

GIB = 1 << 30

# config.json fields of hub models the presets name (public model cards), so a plan can be checked
# offline, before the weights are downloaded
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-8B": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                          max_position_embeddings=40960, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes per process of one training stage (see the module docstring)."""

    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def describe(self) -> str:
        parts = {"weights": self.weights, "gradients": self.gradients, "AdamW": self.optimizer,
                 "activations": self.activations, "logits": self.logits}
        return (f"{self.total / GIB:.1f} GiB per GPU ({self.parameters / 1e9:.2f}B parameters, "
                f"{self.trainable / 1e9:.3f}B trainable; "
                + ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items()) + " GiB)")


def meta_model(base_model: str | dict[str, Any]) -> torch.nn.Module:
    """The causal LM of ``base_model`` (a local HF folder, a name in :data:`ARCHITECTURES`, or a
    config dict) on the meta device: parameter shapes without storage."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(base_model, dict):
        fields = dict(base_model)
    elif base_model in ARCHITECTURES:
        fields = dict(ARCHITECTURES[base_model])
    else:
        try:
            config = AutoConfig.from_pretrained(base_model, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the config of {base_model!r} to plan its memory: not a local model "
                              f"folder and not one of {sorted(ARCHITECTURES)} ({e})") from None
        fields = None
    if fields is not None:
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _adapters(model: torch.nn.Module, lora: Any) -> int:
    """LoRA's A and B matrices: r x (in + out) per adapted linear layer."""
    targets = set(lora.target_modules)
    return sum(lora.r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def _embeddings(model: torch.nn.Module) -> int:
    """The input and output embedding matrices (tied ones count once)."""
    found = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
             for p in m.parameters()}
    return sum(p.numel() for p in found.values())


def estimate(model: torch.nn.Module, *, lora: Any, tokens_per_step: int, compute_dtype: torch.dtype) -> MemoryPlan:
    """The plan of training ``model`` (any device, meta included) with ``tokens_per_step`` tokens in
    one forward/backward (a micro-batch of this process). Under LoRA (``gr2.train.optim.LoraSettings``)
    the adapters train, and the embedding matrices too when ``lora.train_embeddings`` (peft keeps a
    frozen original beside each trained copy); the frozen weights sit in the compute dtype."""
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    compute_bytes = 2 if compute_dtype in (torch.bfloat16, torch.float16) else 4
    if lora.enabled:
        trainable = _adapters(model, lora) + (_embeddings(model) if lora.train_embeddings else 0)
        weights = 4 * trainable + compute_bytes * parameters
    else:
        trainable = parameters
        weights = 4 * parameters
    activations = tokens_per_step * config.num_hidden_layers * config.hidden_size * 17 * compute_bytes
    logits = tokens_per_step * config.vocab_size * (compute_bytes + 4)
    return MemoryPlan(parameters=parameters, trainable=trainable, weights=weights, gradients=4 * trainable,
                      optimizer=8 * trainable, activations=activations, logits=logits)


def check_fits(plan: MemoryPlan, device: torch.device, stage: str, *, capacity: int | None = None,
               headroom: float = 0.1) -> None:
    """ConfigError when ``plan`` needs more than ``(1 - headroom)`` of the device's memory (CUDA
    devices; ``capacity`` in bytes overrides the query). Other devices are not checked."""
    if capacity is None:
        if device.type != "cuda":
            return
        capacity = torch.cuda.get_device_properties(device).total_memory
    if plan.total > (1 - headroom) * capacity:
        raise ConfigError(
            f"{stage}: the training plan needs about {plan.describe()}, more than {1 - headroom:.0%} of the "
            f"{capacity / GIB:.0f} GiB of {device}. Enable {stage}.lora (frozen base in the compute dtype, "
            f"adapters trained), lower {stage}'s batch size or max length, or use more GPUs")


def freeze_in_compute_dtype(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Frozen parameters (the base model under LoRA) in the compute dtype: they take no optimizer
    step, so float32 master copies of them would only cost memory."""
    for p in model.parameters():
        if not p.requires_grad and p.dtype != compute_dtype and p.is_floating_point():
            p.data = p.data.to(compute_dtype)


def tokens_per_step(stage: str, config: Any, world_size: int = 1, prompt_tokens: int = 1024) -> int:
    """Tokens in one forward/backward of one process, from a stage config (an upper bound):
    midtrain / sft: ceil(batch_size / world) rows of max_length; rl: a micro-batch of
    ceil(prompts_per_step * G / world / updates_per_batch / grad_accum) rollouts of at most
    max_reasoning_tokens + 128 completion tokens (the answer of K = 10 four-level SIDs and its tags
    fit in 128), plus each prompt once (``prompt_tokens``, prompts.max_tokens) with rl.share_prompt."""
    if stage in ("midtrain", "sft"):
        return -(-config.batch_size // world_size) * config.max_length
    if stage == "rl":
        rollouts = -(-config.prompts_per_step * config.group_size // (world_size * config.updates_per_batch
                                                                      * config.grad_accum))
        prompts = -(-rollouts // config.group_size) if config.share_prompt else rollouts
        return rollouts * (config.max_reasoning_tokens + 128) + prompts * prompt_tokens
    raise ConfigError(f"no memory plan for stage {stage!r}")


def check_stage(model: torch.nn.Module, stage: str, config: Any, device: torch.device, compute_dtype: torch.dtype,
                world_size: int = 1, prompt_tokens: int = 1024) -> MemoryPlan | None:
    """Estimate ``stage``'s plan for the loaded ``model`` and refuse it up front (ConfigError) when
    it cannot fit ``device`` -- instead of an out-of-memory error hours into the run. CUDA devices
    only (None elsewhere: nothing to check against)."""
    if device.type != "cuda":
        return None
    plan = estimate(model, lora=config.lora, tokens_per_step=tokens_per_step(stage, config, world_size, prompt_tokens),
                    compute_dtype=compute_dtype)
    check_fits(plan, device, stage)
    return plan
