"""Processes: the :class:`World` a trainer runs in (one process, or one rank under ``torchrun``).

Prompts of a round are split across ranks; keep decisions are gathered so every rank sees the same
global kept count; each rank backpropagates its own groups and the gradients are summed with
``all_reduce`` (gloo on CPU, nccl on GPU). We reduce gradients by hand instead of wrapping the
model in ``DistributedDataParallel`` because after dynamic sampling ranks hold different numbers
of groups (DDP requires the same number of backward calls); the loss is normalised by the global
token count, so the sum equals the single-process gradient.

Each rank trains on its own device (:func:`gr2.train.common.local_device`: ``cuda:LOCAL_RANK``),
and :attr:`World.device` is where the process group's tensors live: that GPU under nccl (which
takes CUDA tensors only), the CPU under gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from gr2.train import common


@dataclass(frozen=True)
class World:
    """This process's rank, the number of processes, and the device of the collectives' tensors."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # the process group's: cuda:LOCAL_RANK (nccl) or cpu (gloo)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum_gradients(self, model: torch.nn.Module) -> None:
        if not self.distributed:
            return
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)


def init_world(device: torch.device | None = None) -> World:
    """Join the torchrun process group when launched with torchrun: nccl when this process trains
    on CUDA (``device``; default :func:`gr2.train.common.local_device`), gloo otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if device is None:
        device = common.local_device("auto")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if torch.distributed.get_backend() == "nccl":
        comm = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    else:
        comm = torch.device("cpu")
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), comm)
