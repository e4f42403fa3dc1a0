"""Optimisation: AdamW with no decay on biases, norms and embeddings, a warmup + cosine (or
constant) schedule, and optional LoRA adapters via peft."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gr2.errors import ConfigError


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases, norms and embeddings."""
    if lr <= 0:
        raise ConfigError(f"learning rate must be > 0, got {lr}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "embed" in name or "norm" in name else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                   kind: str = "cosine", min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then ``cosine`` decay to ``min_ratio`` of the peak, or ``constant``."""
    if total_steps <= 0:
        raise ConfigError(f"total_steps must be > 0, got {total_steps}")
    if kind not in ("cosine", "constant"):
        raise ConfigError(f"unknown schedule {kind!r}; use cosine or constant")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class LoraSettings:
    """LoRA adapters (peft). The SID token rows are new, so they must train too: by default the
    embedding and output matrices are trained in full (``modules_to_save``)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    train_embeddings: bool = True


def wrap_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters when ``settings.enabled``; otherwise return it unchanged."""
    if not settings.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    modules_to_save = ["embed_tokens", "lm_head"] if settings.train_embeddings else None
    # tied input/output embeddings stay tied (one trainable copy) instead of silently diverging
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), modules_to_save=modules_to_save,
                        ensure_weight_tying=tied and settings.train_embeddings, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model (LoRA merged in) for saving as an HF folder."""
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
