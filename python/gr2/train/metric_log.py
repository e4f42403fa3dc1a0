"""Metric logging: ``metrics.jsonl`` + tensorboard on rank 0 (:class:`MetricLogger`), nothing on
the other ranks (:class:`NullLogger`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gr2.rundir import atomic_write_text
from gr2.train.distributed import World


class MetricLogger:
    """Append metrics to ``metrics.jsonl`` (one JSON object per line) and to tensorboard.

    On resume, pass ``resume_step``: lines logged after that step by the killed run are dropped so
    the file reads as one uninterrupted run.
    """

    def __init__(self, directory: str | os.PathLike, resume_step: int | None = None, tensorboard: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.directory / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._writer = None

    def log(self, step: int, **metrics: float | int | str) -> None:
        record = {"step": int(step), **{k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v)
                                         for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class NullLogger:
    """:class:`MetricLogger`'s interface, writing nothing: the logger of the ranks other than 0."""

    def log(self, step: int, **metrics: float | int | str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def metric_logger(world: World, directory: str | os.PathLike, resume_step: int | None = None,
                  tensorboard: bool = True) -> MetricLogger | NullLogger:
    """A :class:`MetricLogger` on rank 0 (the writer), a :class:`NullLogger` on the other ranks."""
    return MetricLogger(directory, resume_step, tensorboard) if world.writer else NullLogger()
