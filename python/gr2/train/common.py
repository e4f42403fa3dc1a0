"""Plumbing shared by the training recipes (midtrain, sft, dapo).

* seeding, device and dtype choice (bf16 on CUDA, fp32 on CPU) and mixed precision: parameters
  and AdamW state stay float32 (master weights); a bf16 setting runs the forward passes under
  ``torch.autocast`` (:func:`autocast`), so small learning-rate steps are not rounded away;
* AdamW + warmup/cosine schedule; optional LoRA via peft;
* checkpoints that resume EXACTLY: model weights (safetensors), optimizer, scheduler, every RNG
  state and the step counter, written atomically; :class:`Checkpointer` keys them by the stage's
  config + inputs, so a checkpoint of another config or other inputs is never resumed, and the
  current config's learning rate is applied on resume;
* a JSONL + tensorboard logger;
* :class:`WeightedExample` and :func:`collate`: token ids with a per-token loss weight, so a
  recipe says which tokens count (assistant-only masking, reasoning vs answer weights) and
  :func:`weighted_nll` computes the loss.

Data order for exact resume: recipes draw the order of epoch ``e`` from ``epoch_order(n, seed, e)``
(a pure function of seed and epoch), so the batch at step ``s`` is the same in a resumed run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import random
import shutil
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from gr2.errors import ConfigError, CorruptFileError, InvalidInputError, TrainingError
from gr2.rundir import atomic_dir, atomic_write_json, atomic_write_text, stage_key

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_META = "checkpoint.json"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# seeding and devices


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


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of ``epoch``: a pure function, so resumed runs see the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n)


# --------------------------------------------------------------------------------------------
# processes: one, or one rank of a torchrun job


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


# --------------------------------------------------------------------------------------------
# optimisation


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


# --------------------------------------------------------------------------------------------
# checkpoints


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


# --------------------------------------------------------------------------------------------
# logging


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


# --------------------------------------------------------------------------------------------
# examples, batches, loss


@dataclass
class WeightedExample:
    """Token ids and one loss weight per token: ``weights[t]`` scales the NLL of predicting
    ``input_ids[t]`` from the tokens before it (0 = context only, e.g. the prompt)."""

    input_ids: list[int]
    weights: list[float]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.weights):
            raise InvalidInputError(f"{len(self.input_ids)} token ids but {len(self.weights)} weights")
        if not self.input_ids:
            raise InvalidInputError("empty training example")


def build_example(segments: Iterable[tuple[Sequence[int], float]]) -> WeightedExample:
    """Concatenate ``(token_ids, weight)`` segments into one example."""
    ids: list[int] = []
    weights: list[float] = []
    for token_ids, weight in segments:
        ids.extend(int(t) for t in token_ids)
        weights.extend([float(weight)] * len(token_ids))
    return WeightedExample(ids, weights)


def chat_example(tokenizer: Any, messages: list[dict[str, str]],
                 completion_segments: Sequence[tuple[str, float]], max_length: int | None = None) -> WeightedExample:
    """An assistant-only example: the chat-templated prompt (weight 0) then the assistant's reply,
    given as ``(text, weight)`` segments, then the end-of-turn token(s) with the last weight.

    Raises InvalidInputError when the example exceeds ``max_length`` (never truncates silently).
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    segments: list[tuple[list[int], float]] = [(tokenizer(prompt, add_special_tokens=False)["input_ids"], 0.0)]
    for text, weight in completion_segments:
        segments.append((tokenizer(text, add_special_tokens=False)["input_ids"], weight))
    segments.append((end_of_turn_ids(tokenizer), completion_segments[-1][1] if completion_segments else 1.0))
    example = build_example(segments)
    if max_length is not None and len(example.input_ids) > max_length:
        raise InvalidInputError(f"example has {len(example.input_ids)} tokens, more than max_length={max_length}; "
                                f"raise max_length or shorten the prompt (history/candidates)")
    return example


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Tokens that close an assistant turn: ``<|im_end|>`` for ChatML tokenizers, else eos."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        return [vocab["<|im_end|>"]]
    if tokenizer.eos_token_id is None:
        raise InvalidInputError("tokenizer has neither <|im_end|> nor an eos token")
    return [int(tokenizer.eos_token_id)]


def pack_examples(examples: Sequence[WeightedExample], max_length: int, separator_id: int) -> list[WeightedExample]:
    """Greedy packing: concatenate consecutive examples (joined by ``separator_id`` with weight 0)
    into rows of at most ``max_length`` tokens. Attention crosses example boundaries inside a row
    (the common "naive packing"); it saves padding when examples are short. No example is split."""
    rows: list[WeightedExample] = []
    ids: list[int] = []
    weights: list[float] = []
    for ex in examples:
        if len(ex.input_ids) > max_length:
            raise InvalidInputError(f"example of {len(ex.input_ids)} tokens exceeds max_length={max_length}")
        extra = len(ex.input_ids) + (1 if ids else 0)
        if ids and len(ids) + extra > max_length:
            rows.append(WeightedExample(ids, weights))
            ids, weights = [], []
        if ids:
            ids.append(separator_id)
            weights.append(0.0)
        ids.extend(ex.input_ids)
        weights.extend(ex.weights)
    if ids:
        rows.append(WeightedExample(ids, weights))
    return rows


def collate(examples: Sequence[WeightedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` (long) and ``loss_weights`` (float32)."""
    if not examples:
        raise InvalidInputError("empty batch")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    weights = torch.zeros((len(examples), width), dtype=torch.float32)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention[row, :n] = 1
        weights[row, :n] = torch.tensor(ex.weights, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_weights": weights}


def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token NLL (B, T) of each token given its prefix; position 0 (no prefix) is 0."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none").view(targets.shape)
    return torch.nn.functional.pad(nll, (1, 0))


def summed_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(sum_t w_t * NLL_t, number of tokens with w_t > 0)`` of a batch; 0 counted tokens is allowed."""
    weights = batch["loss_weights"]
    nll = token_nll(model, batch)
    return (nll * weights).sum(), int((weights > 0).sum())


def summed_nll_selected(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """:func:`summed_nll` computing the output projection only where a token is supervised (see
    :func:`weighted_nll_selected`)."""
    weights = batch["loss_weights"][:, 1:]
    mask = weights > 0
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()
    nll = torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:][mask], reduction="none")
    return (nll * weights[mask]).sum(), int(mask.sum())


def _mean(total: torch.Tensor, counted: int) -> tuple[torch.Tensor, int]:
    if counted == 0:
        raise InvalidInputError("batch has no supervised tokens (all loss weights are 0)")
    return total / counted, counted


def weighted_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Loss = sum_t w_t * NLL_t / (number of tokens with w_t > 0). Returns (loss, counted tokens).

    Normalising by the count of supervised tokens (not by the weight sum) keeps the weights'
    meaning: with lambda_r = 0.5, a reasoning token counts half as much as an answer token.
    """
    if not bool((batch["loss_weights"] > 0).any()):
        raise InvalidInputError("batch has no supervised tokens (all loss weights are 0)")
    return _mean(*summed_nll(model, batch))


def weighted_nll_selected(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """:func:`weighted_nll` computing the output projection only where a token is supervised.

    The decoder runs on every token, but the vocabulary logits (and their softmax) are formed
    for the supervised positions alone, which saves a large share of a small model's compute
    when most tokens are context. Same value as :func:`weighted_nll` (up to float rounding),
    except that a weight on position 0 (no prefix to predict it from) is not counted. Needs an
    HF causal LM with ``get_decoder()`` and ``get_output_embeddings()`` and no logit scaling.
    """
    if not bool((batch["loss_weights"][:, 1:] > 0).any()):
        raise InvalidInputError("batch has no supervised tokens (all loss weights are 0)")
    return _mean(*summed_nll_selected(model, batch))


class SummedNll(torch.nn.Module):
    """A causal LM and its summed token-weighted NLL in one ``forward``: the module
    :class:`DataParallel` hands to DDP, so the gradient sync covers the whole loss (also the
    selected-logits path, which calls the decoder and the output layer directly)."""

    def __init__(self, model: torch.nn.Module, selected: bool = False) -> None:
        super().__init__()
        self.model, self.selected = model, selected

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_weights: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_weights": loss_weights}
        return (summed_nll_selected if self.selected else summed_nll)(self.model, batch)


class DataParallel:
    """The loss and backward pass of one global batch, in one process or split over torchrun ranks.

    Every rank builds the same global batch (a pure function of seed and step) and takes its rows
    ``rank::size``; the model runs under ``DistributedDataParallel`` (``device_ids=[LOCAL_RANK]`` on
    CUDA), which averages the gradients over the ranks. Each rank scales its *summed* weighted NLL
    by ``size / T``, where ``T`` is the batch's supervised-token count summed over the ranks (one
    all-reduce), so the averaged gradient is exactly the one-process gradient of
    ``sum_t w_t NLL_t / T`` over the whole batch, and gradient clipping sees the same gradient.
    Global batch size and data order do not depend on the number of processes. A rank left
    without a row (fewer rows than ranks) runs one zero-weight row so it still joins DDP's
    collectives. ``selected``: logits only at supervised positions (:func:`summed_nll_selected`).
    """

    def __init__(self, model: torch.nn.Module, world: World, device: torch.device, dtype: torch.dtype,
                 pad_id: int, *, selected: bool = False) -> None:
        self.world, self.device, self.dtype, self.pad_id = world, device, dtype, pad_id
        self.model = model
        module: torch.nn.Module = SummedNll(model, selected)
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        self.module = module

    def backward(self, rows: Sequence[WeightedExample]) -> tuple[float, int]:
        """Forward and backward of this rank's share of the global batch ``rows``; returns the
        batch's loss (the global weighted mean) and its supervised-token count, the same on every rank."""
        if not rows:
            raise InvalidInputError("empty batch")
        mine = list(rows[self.world.rank::self.world.size])
        if not mine:
            mine = [WeightedExample(rows[0].input_ids, [0.0] * len(rows[0].input_ids))]
        batch = to_device(collate(mine, self.pad_id), self.device)
        with autocast(self.device, self.dtype):
            total, counted = self.module(**batch)
        loss_sum, tokens = self.world.all_sums(float(total.detach()), counted)
        if tokens == 0:
            raise InvalidInputError("batch has no supervised tokens (all loss weights are 0)")
        (total / tokens * self.world.size).backward()
        return loss_sum / tokens, int(tokens)


def check_loss(loss: float, step: int, stage: str, lr: float) -> None:
    """Stop a stage whose loss went non-finite (the weights are lost from there on) with an error
    that names the setting to change, before anything is committed."""
    if not math.isfinite(loss):
        raise TrainingError(f"{stage} diverged: the loss is {loss} at step {step}; the weights are no longer "
                            f"usable and nothing was committed. Lower {stage}.lr (now {lr:g}) and rerun")


def check_finite_weights(model: torch.nn.Module, stage: str) -> None:
    """Refuse to commit a model holding a NaN or infinite weight."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise TrainingError(f"{stage}: weight {name} holds non-finite values after training; nothing was "
                                f"committed. Lower {stage}.lr and rerun")


def pack_rows(examples: Sequence[WeightedExample], width: int, separator_id: int) -> list[WeightedExample]:
    """First-fit-decreasing packing of ``examples`` into rows of at most ``width`` tokens (joined
    by ``separator_id`` with weight 0, attention crossing example boundaries as in
    :func:`pack_examples`): the longest examples open rows, shorter ones fill the rows' padding.
    Deterministic; no example is split."""
    rows: list[tuple[list[int], list[float]]] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):  # stable: ties keep batch order
        if len(ex.input_ids) > width:
            raise InvalidInputError(f"example of {len(ex.input_ids)} tokens exceeds the row width {width}")
        for ids, weights in rows:
            if len(ids) + 1 + len(ex.input_ids) <= width:
                ids.append(separator_id)
                weights.append(0.0)
                ids.extend(ex.input_ids)
                weights.extend(ex.weights)
                break
        else:
            rows.append((list(ex.input_ids), list(ex.weights)))
    return [WeightedExample(ids, weights) for ids, weights in rows]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# run-directory inputs shared by the recipes and the teacher


def load_sequences(run_dir: str | os.PathLike) -> list[list[int]]:
    """Chronological item lists of ``data/sequences`` (one per user, ordered by user_idx)."""
    import datasets

    from gr2.errors import DataError

    path = Path(run_dir) / "data" / "sequences"
    if not path.exists():
        raise DataError(f"{path} is missing; run the `data` stage first")
    seqs = datasets.load_from_disk(str(path))
    order = np.argsort(np.asarray(seqs["user_idx"]))
    items = seqs["items"]
    return [list(map(int, items[i])) for i in order]


def input_key(run_dir: str | os.PathLike, stage: str) -> str:
    """The cache key of a finished upstream stage (its ``stage.json``); DataError when unfinished."""
    from gr2.errors import DataError
    from gr2.rundir import read_stage

    record = read_stage(Path(run_dir) / stage)
    if record is None:
        raise DataError(f"stage `{stage}` has not finished in {run_dir}; run it first")
    return str(record["key"])


def begin_stage_on_rank0(world: World, stage_dir: str | os.PathLike, key: str, *,
                         force: bool = False) -> dict | None:
    """:func:`gr2.rundir.begin_stage` run by rank 0 (the only rank that removes an old record);
    every rank gets its answer, so all of them skip a finished stage or all of them run it."""
    from gr2.rundir import begin_stage

    return world.broadcast(begin_stage(stage_dir, key, force=force) if world.writer else None)
