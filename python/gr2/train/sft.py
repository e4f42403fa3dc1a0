"""Stage 2, reasoning SFT: fine-tune the mid-trained model on the teacher's kept traces.

Reads ``midtrain/model`` and ``traces/traces.jsonl`` (records with ``accepted: true``); writes
``sft/model``, ``sft/report.json``, ``sft/metrics.jsonl``.

Loss (per token, assistant turn only; the prompt has weight 0):

    loss = sum_t w_t * NLL_t / #supervised tokens,
    w_t = lambda_reasoning for tokens of <think>...</think>,
          lambda_answer    for tokens of <answer>...</answer> and the end-of-turn token,

with lambda_reasoning < lambda_answer by default: the ranking is what is rewarded later, the
reasoning is style to imitate. A share of the kept traces (split by user) is held out; the report
gives their answer-token NLL under the mid-trained model (before) and the SFT model (after).

Full fine-tuning or LoRA (``lora.enabled``); optional greedy packing of short examples; the batch
at step ``s`` is a pure function of (seed, s), so a killed run resumes exactly from its checkpoint.

Under ``torchrun`` each rank trains on its own device with the model in DDP and takes rows
``rank::world_size`` of the same global batch (:class:`gr2.train.losses.DataParallel`), so N
processes give the one-process result; the held-out NLL is computed by every rank (it is small),
and only rank 0 writes (checkpoints, model, report, metrics, stage.json).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from gr2.errors import ConfigError, DataError
from gr2.models import load_pretrained, save_pretrained_atomic
from gr2.rerank import OUTPUT_GLOBS as RERANK_OUTPUTS
from gr2.rewards import parse_completion
from gr2.rundir import atomic_write_json, mark_done, stage_key
from gr2.train import memory
from gr2.train.batches import (WeightedExample, chat_example, collate, end_of_turn_ids, epoch_order, pack_examples,
                               to_device)
from gr2.train.checkpointing import Checkpointer, training_key
from gr2.train.devices import autocast, choose_dtype, local_device, param_dtype, seed_everything
from gr2.train.distributed import begin_stage_on_rank0, init_world
from gr2.train.losses import DataParallel, check_finite_weights, check_loss, token_nll
from gr2.train.metric_log import metric_logger
from gr2.train.optim import LoraSettings, make_optimizer, make_scheduler, unwrap_model, wrap_lora
from gr2.train.run_inputs import input_key

STAGE = "sft"


LOSS_TOKENS = ("all", "decisions")


@dataclass
class SftConfig:
    # settings that do not change the weights a step produces: a run resumes its checkpoints across them
    NOT_IN_CHECKPOINT_KEY: ClassVar[tuple[str, ...]] = ("checkpoint_every", "keep_checkpoints", "log_every",
                                                       "eval_batch_size")

    lambda_reasoning: float = 0.5
    lambda_answer: float = 1.0
    epochs: int = 3
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10
    packing: bool = False
    max_length: int = 2048
    heldout_fraction: float = 0.1
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 5
    eval_batch_size: int = 8
    # which completion tokens carry loss: "all", or "decisions": only those where constrained
    # decoding has a choice (free reasoning, </think>, each SID level that tells the remaining
    # candidates apart), none of those the rerank automaton forces (tags, delimiters, a level fixed
    # by the code before it). Serving never samples a forced token, so their loss only competes with
    # the decisions for the model's capacity; see benches/README.md "SFT on decision tokens".
    loss_tokens: str = "all"

    def __post_init__(self) -> None:
        if self.lambda_reasoning < 0 or self.lambda_answer <= 0:
            raise ConfigError("sft.lambda_reasoning must be >= 0 and sft.lambda_answer > 0")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"sft.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.loss_tokens not in LOSS_TOKENS:
            raise ConfigError(f"sft.loss_tokens must be one of {LOSS_TOKENS}, got {self.loss_tokens!r}")
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sft.{name} must be > 0, got {getattr(self, name)}")


def split_completion(completion: str, reasoning: bool = True) -> tuple[str, str]:
    """(reasoning part, answer part) of a trace, with ``reasoning + answer == completion``, cut where
    :func:`gr2.verify_rewards`' parser (:func:`gr2.rewards.parse_completion`, the one grammar) ends
    the think block: the reasoning part runs to the ``</think>`` right before the answer (a
    ``</think>`` inside the reasoning is reasoning), the answer part is the rest. A trace without a
    think block has reasoning part ""; the answer-only arm (``reasoning=False``) rejects a think
    block. A completion the verifier calls malformed raises DataError."""
    parts = parse_completion(completion)
    if parts is None:
        raise DataError(f"trace completion is not <think>...</think><answer>...</answer> as gr2.verify_rewards "
                        f"parses it: {completion[:80]!r}")
    if parts.think is None:
        return "", completion
    if not reasoning:
        raise DataError(f"answer-only trace has a <think> block: {completion[:80]!r}")
    cut = parts.think[1]
    return completion[:cut], completion[cut:]


def trace_example(tokenizer: Any, record: dict[str, Any], lambda_r: float, lambda_o: float,
                  max_length: int) -> WeightedExample:
    reasoning, answer = split_completion(record["completion"], record.get("reasoning", True))
    parts = [(reasoning, lambda_r), (answer, lambda_o)] if reasoning else [(answer, lambda_o)]
    return chat_example(tokenizer, record["messages"], parts, max_length)


def keep_decisions(tokenizer: Any, records: list[dict[str, Any]], examples: list[WeightedExample],
                   index: Any, sid_tokens: Any) -> list[WeightedExample]:
    """``examples`` (of ``records``, from :func:`trace_example`) with a loss weight of 0 on every
    completion token the rerank automaton forces and on the end-of-turn token, which constrained
    decoding emits with probability 1. The completions are replayed through the Rust automaton
    (:func:`gr2.decoding.constraint_trace`, the one grammar), with a reasoning budget no trace
    reaches so only the tokens' own constraints decide."""
    from gr2.decoding import constraint_trace

    eot = len(end_of_turn_ids(tokenizer))
    completions = []
    for record, ex in zip(records, examples):
        prompt = tokenizer.apply_chat_template(record["messages"], tokenize=False, add_generation_prompt=True)
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        completions.append(ex.input_ids[start:len(ex.input_ids) - eot])
    out = [list(ex.weights) for ex in examples]
    for reasoning in (True, False):  # one automaton batch per arm of the traces
        rows = [i for i, r in enumerate(records) if bool(r.get("reasoning", True)) == reasoning]
        if not rows:
            continue
        budget = max(len(completions[i]) for i in rows) + 1
        traces = constraint_trace(tokenizer, [records[i]["candidates"] for i in rows], [completions[i] for i in rows],
                                  len(tokenizer), index=index, sid_tokens=sid_tokens, max_reasoning_tokens=budget,
                                  reasoning=reasoning)
        for i, trace in zip(rows, traces):
            forced = ~trace.free & (np.diff(trace.offsets) == 1)
            start = len(examples[i].input_ids) - eot - len(completions[i])
            for t in np.nonzero(forced)[0]:
                out[i][start + int(t)] = 0.0
            out[i][len(out[i]) - eot:] = [0.0] * eot
    return [WeightedExample(ex.input_ids, w) for ex, w in zip(examples, out)]


def load_kept_traces(run_dir: Path, arm: str = "think") -> list[dict[str, Any]]:
    from gr2 import arms

    path = run_dir / arms.stage_dir("traces", arm) / "traces.jsonl"
    if not path.exists():
        raise DataError(f"{path} is missing; run the `traces` stage first")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e})") from e
        if record.get("accepted"):
            records.append(record)
    if len(records) < 2:
        raise DataError(f"{path} has {len(records)} kept traces; SFT needs at least 2 (one held out)")
    return records


def split_heldout(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out whole users (a user's traces never straddle the split)."""
    users = sorted({r["user_idx"] for r in records})
    rng = np.random.default_rng(seed)
    n_held = max(1, int(round(len(users) * fraction)))
    held = set(rng.choice(users, size=n_held, replace=False).tolist())
    train = [r for r in records if r["user_idx"] not in held]
    heldout = [r for r in records if r["user_idx"] in held]
    if not train:
        raise DataError("every kept trace was held out; lower sft.heldout_fraction or keep more traces")
    return train, heldout


@torch.no_grad()
def heldout_nll(model: Any, tokenizer: Any, records: list[dict[str, Any]], config: SftConfig,
                device: torch.device) -> dict[str, float]:
    """Mean NLL per token of the answer part and of the reasoning part of held-out traces."""
    model.eval()
    sums = {"answer": 0.0, "reasoning": 0.0}
    counts = {"answer": 0, "reasoning": 0}
    for part, (lr_, lo_) in (("answer", (0.0, 1.0)), ("reasoning", (1.0, 0.0))):
        examples = [trace_example(tokenizer, r, lr_, lo_, config.max_length) for r in records]
        for start in range(0, len(examples), config.eval_batch_size):
            batch = to_device(collate(examples[start:start + config.eval_batch_size],
                                                    tokenizer.pad_token_id), device)
            nll = token_nll(model, batch)
            sums[part] += float((nll * batch["loss_weights"]).sum())
            counts[part] += int((batch["loss_weights"] > 0).sum())
    model.train()
    return {f"{part}_nll": sums[part] / counts[part] for part in sums if counts[part]}


def sft_step(parallel: DataParallel, optimizer: torch.optim.Optimizer, scheduler: Any,
             rows: list[WeightedExample], *, step: int, lr: float) -> tuple[float, int]:
    """One SFT update on the global batch ``rows``: the weighted NLL's backward pass
    (:class:`gr2.train.losses.DataParallel`), a stop on a non-finite loss, gradient clipping at
    norm 1 (the error names ``lr``, the configured rate), the optimizer step and the ``scheduler``
    step (None: constant lr). Returns the batch's
    loss and supervised-token count. The one SFT step: the stage and
    :func:`gr2.synthetic.sft_train` both train with it."""
    loss, tokens = parallel.backward(rows)
    check_loss(loss, step, STAGE, lr)
    torch.nn.utils.clip_grad_norm_(parallel.model.parameters(), 1.0)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, tokens


def run_sft(run_dir: str | Path, config: SftConfig = SftConfig(), *, arm: str = "think", force: bool = False,
            on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run stage 2 SFT for ``arm`` (see :mod:`gr2.arms`); returns the summary (also
    ``<stage dir>/report.json``)."""
    from gr2 import arms

    run_dir = Path(run_dir)
    stage_dir = run_dir / arms.stage_dir(STAGE, arm)
    inputs = (input_key(run_dir, "midtrain"), input_key(run_dir, arms.stage_dir("traces", arm)))
    key = stage_key(config, *inputs)
    device = local_device(config.device)
    world = init_world(device)
    if (done := begin_stage_on_rank0(world, stage_dir, key, force=force)) is not None:
        return done
    dtype = choose_dtype(device, config.dtype)  # compute dtype; parameters stay float32
    seed_everything(config.seed)

    records = load_kept_traces(run_dir, arm)
    teacher = sorted({r.get("teacher", "?") for r in records})
    train_records, heldout = split_heldout(records, config.heldout_fraction, config.seed)
    model, tokenizer = load_pretrained(run_dir / "midtrain" / "model")
    model.to(device=device, dtype=param_dtype(dtype))
    examples = [trace_example(tokenizer, r, config.lambda_reasoning, config.lambda_answer, config.max_length)
                for r in train_records]
    if config.loss_tokens == "decisions":
        from gr2 import SidIndex
        from gr2.models import sid_tokens_of

        index = SidIndex.load(run_dir / "sid" / "index.gr2sid")
        examples = keep_decisions(tokenizer, train_records, examples, index, sid_tokens_of(tokenizer, index.level_sizes))
    if config.packing:
        examples = pack_examples(examples, config.max_length, tokenizer.eos_token_id)
    with autocast(device, dtype):
        before = heldout_nll(model, tokenizer, heldout, config, device)

    memory.check_stage(model, STAGE, config, device, dtype, world.size)  # refuse a plan that cannot fit, up front
    model = wrap_lora(model, config.lora)
    memory.freeze_in_compute_dtype(model, dtype)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, config.warmup_steps)
    checkpoints = Checkpointer(stage_dir / "checkpoints", training_key(config, *inputs), keep=config.keep_checkpoints,
                                      writer=world.writer, name=STAGE)
    resumed = checkpoints.resume(model, optimizer, scheduler, world)
    start = resumed["step"] if resumed else 0
    parallel = DataParallel(model, world, device, dtype, tokenizer.pad_token_id)

    t0 = time.time()
    model.train()
    with metric_logger(world, stage_dir, resume_step=start if resumed else None) as log:
        bar = tqdm(range(start, total_steps), desc=f"sft ({arm})", initial=start, total=total_steps,
                   disable=not world.writer)
        for step in bar:
            epoch, offset = divmod(step, steps_per_epoch)
            order = epoch_order(len(examples), config.seed, epoch)
            chosen = order[offset * config.batch_size:(offset + 1) * config.batch_size]
            loss, tokens = sft_step(parallel, optimizer, scheduler, [examples[i] for i in chosen], step=step + 1,
                                    lr=config.lr)
            if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
                log.log(step + 1, loss=loss, lr=scheduler.get_last_lr()[0], tokens=tokens, epoch=epoch)
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < total_steps:
                checkpoints.save(step + 1, model, optimizer, scheduler)
                world.barrier()
            if on_step is not None:
                on_step(step + 1)
    train_seconds = time.time() - t0

    model = unwrap_model(model)
    check_finite_weights(model, "sft")
    with autocast(device, dtype):
        after = heldout_nll(model, tokenizer, heldout, config, device)
    summary = {
        "teacher": teacher,
        "arm": arm,
        "train_traces": len(train_records),
        "heldout_traces": len(heldout),
        "rows": len(examples),
        "packing": config.packing,
        "lora": config.lora.enabled,
        "loss_tokens": config.loss_tokens,
        "steps": total_steps,
        "resumed_from_step": start,
        "train_seconds": round(train_seconds, 1),
        "world_size": world.size,
        "lambda_reasoning": config.lambda_reasoning,
        "lambda_answer": config.lambda_answer,
        "heldout_before": before,
        "heldout_after": after,
    }
    if world.writer:
        save_pretrained_atomic(model.to(torch.float32), tokenizer, stage_dir / "model")
        atomic_write_json(stage_dir / "report.json", summary)
        checkpoints.cleanup()
        mark_done(stage_dir, key, summary, exclude=RERANK_OUTPUTS)
    world.barrier()  # every rank returns once the stage is done
    return summary


def main(args: Any, config: SftConfig) -> int:
    """``gr2 sft`` (flags: gr2.stages)."""
    summary = run_sft(args.run_dir, config, arm=args.arm, force=args.force)
    print(json.dumps(summary, indent=2))
    return 0
