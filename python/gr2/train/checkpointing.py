"""Checkpoints that resume EXACTLY: model weights (safetensors), optimizer, scheduler, every RNG
state and the step counter, written atomically. :class:`Checkpointer` keys them by the stage's
config + inputs (:func:`training_key`), so a checkpoint of another config or other inputs is never
resumed, and the current config's learning rate is applied on resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gr2.errors import CorruptFileError
from gr2.rundir import atomic_dir, atomic_write_json, atomic_write_text, stage_key
from gr2.train.distributed import World


CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_META = "checkpoint.json"

log = logging.getLogger(__name__)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, step: int, extra: dict[str, Any] | None = None, key: str | None = None) -> Path:
    """Write a resumable checkpoint folder atomically: trainable weights, optimizer, scheduler, RNG,
    step, and the ``key`` (config + inputs) it belongs to (see :class:`Checkpointer`)."""
    from safetensors.torch import save_file

    path = Path(path)
    # Only trainable tensors: a LoRA checkpoint stays small and frozen weights come from the base.
    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    # tied weights (embeddings == lm_head) appear once under named_parameters, so no duplicates here
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
             "rng": _rng_state()}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / CHECKPOINT_WEIGHTS))
        torch.save(state, tmp / CHECKPOINT_STATE)
        atomic_write_json(tmp / CHECKPOINT_META, {"step": int(step), "key": key, "extra": extra or {}})
    return path


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model``/``optimizer``/``scheduler`` and the
    RNGs; returns ``{"step": ..., "key": ..., "extra": ...}``.

    The optimizer's moments and step counts and the scheduler's position come from the checkpoint,
    but the learning rate is the *current* one: the peak lr ``optimizer``/``scheduler`` were built
    with replaces the saved peak (the schedule factor of the saved step is kept)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path / CHECKPOINT_META
    if not meta_path.exists():
        raise CorruptFileError(f"{path} is not a checkpoint (no {CHECKPOINT_META})")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(path / CHECKPOINT_WEIGHTS))
        # onto the CPU: under torchrun every rank would otherwise first load rank 0's optimizer state
        # onto cuda:0; load_state_dict then moves each state tensor to its parameter's device
        state = torch.load(path / CHECKPOINT_STATE, weights_only=False, map_location="cpu")
    except (OSError, ValueError, SafetensorError, RuntimeError) as e:
        raise CorruptFileError(f"checkpoint {path} is unreadable: {e}") from e
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise CorruptFileError(f"checkpoint {path} holds tensors the model lacks: {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise CorruptFileError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                                       f"model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    current = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    _apply_peak_lrs(optimizer, scheduler, current)
    _set_rng_state(state["rng"])
    return meta


def _apply_peak_lrs(optimizer: torch.optim.Optimizer, scheduler: Any, peaks: list[float]) -> None:
    """Rescale each param group's lr from its saved peak to ``peaks`` (the current config's)."""
    for group, peak in zip(optimizer.param_groups, peaks):
        saved = group.get("initial_lr", group["lr"])
        if saved != peak:
            group["lr"] = group["lr"] * peak / saved if saved else peak
        if "initial_lr" in group:
            group["initial_lr"] = peak
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = list(peaks)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest ``step-NNNNNNNN`` checkpoint folder in ``directory``, or None."""
    directory = Path(directory)
    if not directory.exists():
        return None
    done = sorted(p for p in directory.glob("step-*") if (p / CHECKPOINT_META).exists())
    return done[-1] if done else None


def checkpoint_key(path: str | os.PathLike) -> str | None:
    """The key a checkpoint folder was saved under (None: unkeyed or unreadable)."""
    try:
        meta = json.loads((Path(path) / CHECKPOINT_META).read_text())
    except (OSError, ValueError):
        return None
    return meta.get("key") or meta.get("extra", {}).get("key")


def training_key(config: Any, *inputs: str) -> str:
    """The key a stage's checkpoints are saved and resumed under: its inputs' keys and the config
    fields that change the weights. Fields a config dataclass lists in ``NOT_IN_CHECKPOINT_KEY``
    (evaluation, logging, checkpoint cadence) are left out, so changing one of them resumes a long
    run instead of discarding its checkpoints (the stage itself still reruns: its record's key,
    :func:`gr2.rundir.stage_key`, covers the whole config)."""
    skip = set(getattr(config, "NOT_IN_CHECKPOINT_KEY", ()))
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}
    return stage_key({"training": fields}, *inputs)


class Checkpointer:
    """The checkpoints of one training run, keyed by its config + inputs (one per stage / arm).

    ``key`` is the hash of everything the run's result depends on (the stage config and the keys
    of its inputs, e.g. :func:`gr2.rundir.stage_key`). Only a checkpoint saved under the same key
    is resumed; any other (another config, other inputs, or no key at all) is removed with one
    log line, ``"<name>: stale checkpoint (key ...) ignored; training from the start"``. Besides
    ``step-NNNNNNNN`` folders, a run may keep keyed artefacts (:meth:`artifact`, e.g. the
    mid-training ``init`` model), held to the same rule with their own key. On success the stage
    calls :meth:`cleanup`. ``writer`` is False on the non-zero ranks of a multi-process run: they
    read the same folder but never write or remove anything.
    """

    def __init__(self, directory: str | os.PathLike, key: str, *, keep: int = 2, writer: bool = True,
                 name: str = "training") -> None:
        self.directory, self.key, self.keep, self.writer, self.name = Path(directory), str(key), keep, writer, name
        self._warned = False

    def _stale(self, key: str | None, *paths: Path) -> None:
        if not self.writer:  # rank 0 says it (and removes); the others just agree
            return
        if not self._warned:  # one line per run, however many stale pieces it had
            log.warning("%s: stale checkpoint (key %s) ignored; training from the start", self.name, key or "none")
            self._warned = True
        if self.writer:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest step checkpoint saved under this key; stale ones are removed (one log line)."""
        if not self.directory.exists():
            return None
        matching = []
        stale: list[tuple[str | None, Path]] = []
        for path in sorted(self.directory.glob("step-*")):
            if not (path / CHECKPOINT_META).exists():
                continue  # a half-written folder (atomic writes leave none; be safe)
            key = checkpoint_key(path)
            (matching.append(path) if key == self.key else stale.append((key, path)))
        if stale:
            self._stale(stale[-1][0], *(path for _, path in stale))
        return matching[-1] if matching else None

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               world: World = World()) -> dict[str, Any] | None:
        """Load the newest matching checkpoint (current lr applied); its meta, or None to start at 0.
        Under torchrun every rank loads the one rank 0 chose (pass the ``world``)."""
        latest = world.broadcast(self.latest() if world.rank == 0 else None)
        if latest is None:
            return None
        meta = load_checkpoint(latest, model, optimizer, scheduler)
        log.info("%s: resuming from %s", self.name, latest)
        return meta

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             extra: dict[str, Any] | None = None) -> Path:
        """Write ``step-NNNNNNNN`` under this key and prune to the newest ``keep`` (writer only)."""
        path = self.directory / checkpoint_name(step)
        if self.writer:
            save_checkpoint(path, model, optimizer, scheduler, step, extra, key=self.key)
            prune_checkpoints(self.directory, self.keep)
        return path

    def after_step(self, done: int, total: int, every: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: Any, world: World = World()) -> None:
        """End of training step ``done`` (1-based) of ``total``: a checkpoint every ``every`` steps
        but not after the last (the stage saves its finished model itself); every rank waits for it."""
        if done % every == 0 and done < total:
            self.save(done, model, optimizer, scheduler)
            world.barrier()

    def artifact(self, name: str, key: str) -> tuple[Path, bool]:
        """(folder of artefact ``name``, whether it exists under ``key``). One saved under another
        key (or none) is removed with the stale line; write it, then call :meth:`mark_artifact`."""
        path = self.directory / name
        marker = self.directory / f"{name}.key"
        saved = marker.read_text().strip() if marker.exists() else None
        if path.exists() and saved == key:
            return path, True
        if path.exists() or marker.exists():
            self._stale(saved, path)
            if self.writer:
                marker.unlink(missing_ok=True)
        return path, False

    def mark_artifact(self, name: str, key: str) -> None:
        """Record that artefact ``name`` (already written) belongs to ``key``."""
        if self.writer:
            atomic_write_text(self.directory / f"{name}.key", key + "\n")

    def cleanup(self) -> None:
        """Remove every checkpoint and artefact of the run (after the stage saved its result)."""
        if self.writer:
            shutil.rmtree(self.directory, ignore_errors=True)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    folders = sorted(Path(directory).glob("step-*"))
    for old in folders[:-keep] if keep > 0 else folders:
        shutil.rmtree(old, ignore_errors=True)
