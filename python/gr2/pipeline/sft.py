"""Stage 2, reasoning SFT: fine-tune the mid-trained model on the teacher's kept traces.

Reads ``midtrain/model`` and ``traces/traces.jsonl`` (records with ``accepted: true``); writes
``sft/model``, ``sft/report.json``, ``sft/metrics.jsonl``. The examples, the loss and the step are
:mod:`gr2.train.sft`.

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
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from gr2.errors import DataError
from gr2.models import load_pretrained
from gr2.pipeline.rerank import finish_model_stage
from gr2.rundir import stage_key
from gr2.train import memory
from gr2.train.batches import batch_rows, pack_examples
from gr2.train.checkpointing import Checkpointer, training_key
from gr2.train.devices import autocast, choose_dtype, local_device, param_dtype, seed_everything
from gr2.train.distributed import begin_stage_on_rank0, init_world
from gr2.train.losses import DataParallel, check_finite_weights
from gr2.train.metric_log import metric_logger
from gr2.train.optim import make_optimizer, make_scheduler, unwrap_model, wrap_lora
from gr2.pipeline.inputs import input_key
from gr2.train.sft import STAGE, SftConfig, heldout_nll, keep_decisions, sft_step, split_heldout, trace_example


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
            epoch, chosen = batch_rows(step, len(examples), config.batch_size, config.seed)
            loss, tokens = sft_step(parallel, optimizer, scheduler, [examples[i] for i in chosen], step=step + 1,
                                    lr=config.lr)
            if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
                log.log(step + 1, loss=loss, lr=scheduler.get_last_lr()[0], tokens=tokens, epoch=epoch)
            checkpoints.after_step(step + 1, total_steps, config.checkpoint_every, model, optimizer, scheduler, world)
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
    return finish_model_stage(world, stage_dir, key, model, tokenizer, summary, checkpoints)


def main(args: Any, config: SftConfig) -> int:
    """``gr2 sft`` (flags: gr2.pipeline.registry)."""
    summary = run_sft(args.run_dir, config, arm=args.arm, force=args.force)
    print(json.dumps(summary, indent=2))
    return 0
