"""Processes: the :class:`World` a trainer runs in (one process, or one rank under ``torchrun``).

:class:`World` and :func:`init_world` live in :mod:`gr2.train.distributed` (the SFT recipes use them
too) and are re-exported here. How DAPO uses them: prompts of a round are split across ranks; keep
decisions are gathered so every rank sees the same global kept count; each rank backpropagates its
own groups and the gradients are summed with ``all_reduce`` (gloo on CPU, nccl on GPU). We reduce
gradients by hand instead of wrapping the model in ``DistributedDataParallel`` (as midtrain and
sft do) because after dynamic sampling ranks hold different numbers of groups (DDP requires the
same number of backward calls); the loss is normalised by the global token count, so the sum
equals the single-process gradient.
"""

from gr2.train.distributed import World, init_world

__all__ = ["World", "init_world"]
