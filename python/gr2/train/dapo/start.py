"""What DAPO starts from: the start model (an SFT or mid-trained checkpoint folder), in float32
master weights on the chosen device, and -- with ``rl.kl_coef`` > 0 -- a frozen copy of it as the
KL reference. Which folder that is, in a run directory, is the ``rl`` stage's business
(:mod:`gr2.pipeline.rl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gr2.train.devices import choose_dtype, local_device, param_dtype
from gr2.train.dapo.config import DapoConfig


@dataclass
class StartModel:
    """The policy to train, its tokenizer, the frozen KL reference (None without KL) and the device."""

    model: Any
    tokenizer: Any
    ref_model: Any
    device: Any


def load_start_model(model_dir: str | Path, config: DapoConfig) -> StartModel:
    """Load ``model_dir`` as the policy (float32 master weights) and, when ``config.kl_coef`` > 0,
    again as the frozen reference in the training dtype."""
    from gr2.models import load_pretrained

    device = local_device(config.device)
    dtype = choose_dtype(device, config.dtype)
    model, tokenizer = load_pretrained(model_dir, dtype=param_dtype(dtype))
    ref_model = None
    if config.kl_coef > 0:
        ref_model, _ = load_pretrained(model_dir, dtype=dtype)
        ref_model.to(device).eval().requires_grad_(False)
    return StartModel(model, tokenizer, ref_model, device)
