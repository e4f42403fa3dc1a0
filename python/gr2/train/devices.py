"""Seeding, device and dtype choice for the training recipes (midtrain, sft, dapo).

bf16 on CUDA, fp32 on CPU; parameters and AdamW state stay float32 (master weights) and a bf16
setting runs the forward passes under ``torch.autocast`` (:func:`autocast`), so small
learning-rate steps are not rounded away. :func:`local_device` is this process's device (under
torchrun: ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from gr2.errors import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def choose_device(preference: str = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; or an explicit torch device string."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {preference!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return device


def local_device(preference: str = "auto") -> torch.device:
    """:func:`choose_device`, per process: under ``torchrun`` (``LOCAL_RANK`` set) a CUDA choice
    without an index becomes ``cuda:LOCAL_RANK``, made the current device (``torch.cuda.set_device``,
    which NCCL collectives rely on), so every rank of a node gets its own GPU. An explicit index
    (``cuda:1``) is kept as given, except that under torchrun with several processes per node and
    several visible GPUs it must be the rank's own (``cuda:0`` on every rank would put the whole node
    on one GPU). A ``LOCAL_RANK`` beyond the visible GPUs is a ConfigError."""
    device = choose_device(preference)
    local = os.environ.get("LOCAL_RANK")
    if device.type != "cuda" or local is None:
        return device
    rank, count = int(local), torch.cuda.device_count()
    if device.index is not None:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if per_node > 1 and count > 1 and device.index != rank:
            raise ConfigError(f"device = {preference!r} on torchrun rank LOCAL_RANK={rank} of {per_node} on this node "
                              f"would share one GPU among the ranks; use device = \"auto\" or \"cuda\" (each rank gets "
                              "cuda:LOCAL_RANK), or give each rank one GPU with CUDA_VISIBLE_DEVICES")
        return device
    if rank >= count:
        raise ConfigError(f"LOCAL_RANK = {rank} but only {count} CUDA device(s) are visible; start at most {count} "
                          "processes per node (torchrun --nproc_per_node) or check CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def choose_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """The compute dtype: ``"auto"`` -> bfloat16 on CUDA (when supported), float32 on CPU (bf16
    matmuls are slow there). Training keeps parameters in :func:`param_dtype` (float32) and applies
    this one through :func:`autocast`."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if preference == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if preference not in table:
        raise ConfigError(f"unknown dtype {preference!r}; use one of auto, {', '.join(sorted(table))}")
    return table[preference]


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype trainable parameters are kept in: always float32 (master weights). A lower
    precision ``dtype`` is a *compute* dtype, applied by :func:`autocast`; pure-bf16 parameters and
    AdamW moments round away steps below ~2^-8 of a weight (an lr-1e-6 step never lands)."""
    if dtype == torch.float16:
        raise ConfigError("float16 training needs loss scaling, which gr2 does not implement; "
                          "use dtype = \"bfloat16\" (or \"float32\")")
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Context for forward passes: ``torch.autocast(device.type, dtype)`` when ``dtype`` is lower
    precision than float32, else a no-op. Wrap forwards and the loss, not ``backward()``."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
