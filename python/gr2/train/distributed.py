"""Processes: one, or one rank of a torchrun job (:class:`World`, :func:`init_world`), and the
stage start every rank agrees on (:func:`begin_stage_on_rank0`).
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from gr2.errors import ConfigError
from gr2.train.devices import local_device


@dataclass(frozen=True)
class World:
    """This process's rank, the number of processes, and the device of the collectives' tensors.

    Each rank trains on its own device (:func:`local_device`: ``cuda:LOCAL_RANK``) and
    :attr:`device` is where the process group's tensors live: that GPU under nccl (which takes
    CUDA tensors only), the CPU under gloo. With one process every collective is the identity."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # the process group's: cuda:LOCAL_RANK (nccl) or cpu (gloo)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes artefacts (rank 0 only; the others never touch the run folder)."""
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        return self.all_sums(value)[0]

    def all_sums(self, *values: float) -> tuple[float, ...]:
        """Each value summed over the ranks (one float64 all-reduce for all of them)."""
        if not self.distributed:
            return tuple(float(v) for v in values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return tuple(float(v) for v in t.tolist())

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum_gradients(self, model: torch.nn.Module, bucket_bytes: int = 25 << 20) -> None:
        """Sum the gradients over the ranks by hand (DAPO; the SFT recipes use DDP instead), in
        buckets of about ``bucket_bytes`` (DDP's default size): each bucket is flattened into one
        tensor and reduced in one collective, instead of one collective per parameter."""
        if not self.distributed:
            return
        grads = []
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        for bucket in _buckets(grads, bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of same-dtype, same-device tensors of at most ``bucket_bytes`` (a larger
    tensor is a bucket of its own)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = out[-1] if out else None
        if last and last[0].dtype == t.dtype and last[0].device == t.device and size + nbytes <= bucket_bytes:
            last.append(t)
            size += nbytes
        else:
            out.append([t])
            size = nbytes
    return out


def dist_timeout() -> datetime.timedelta:
    """How long a collective may wait: rank 0 alone builds, hashes and saves models and checkpoints
    (minutes for an 8B model) while the other ranks wait in a barrier, longer than NCCL's default.
    ``GR2_DIST_TIMEOUT_MIN`` (default 120) sets it."""
    raw = os.environ.get("GR2_DIST_TIMEOUT_MIN", "120")
    try:
        minutes = float(raw)
    except ValueError:
        raise ConfigError(f"GR2_DIST_TIMEOUT_MIN must be a number of minutes, got {raw!r}") from None
    if not (minutes > 0 and math.isfinite(minutes)):
        raise ConfigError(f"GR2_DIST_TIMEOUT_MIN must be > 0, got {raw!r}")
    return datetime.timedelta(minutes=minutes)


def init_world(device: torch.device | None = None) -> World:
    """Join the torchrun process group when launched with torchrun (``WORLD_SIZE`` > 1): nccl
    when this process trains on CUDA (``device``; default :func:`local_device`), gloo otherwise.
    Without torchrun: ``World()``, one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if device is None:
        device = local_device("auto")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=dist_timeout())
    if torch.distributed.get_backend() == "nccl":
        comm = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    else:
        comm = torch.device("cpu")
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), comm)


def begin_stage_on_rank0(world: World, stage_dir: str | os.PathLike, key: str, *,
                         force: bool = False) -> dict | None:
    """:func:`gr2.rundir.begin_stage` run by rank 0 (the only rank that removes an old record);
    every rank gets its answer, so all of them skip a finished stage or all of them run it."""
    from gr2.rundir import begin_stage

    return world.broadcast(begin_stage(stage_dir, key, force=force) if world.writer else None)
