"""Stage 1, mid-training: teach a base LLM the semantic-ID vocabulary of the catalog.

Reads ``data/items``, ``data/sequences`` and ``sid/index.gr2sid``; writes ``midtrain/model`` (HF
folder with the extended tokenizer), ``midtrain/report.json``, ``midtrain/metrics.jsonl``.

Steps, top to bottom: extend the base model with the SID tokens (:func:`prepare_model`, saved once
as ``checkpoints/init``), train on the task mixture (``next`` / ``caption`` / ``ground`` /
``replay``, :class:`gr2.train.midtrain.TaskSampler`), evaluate next-item Recall@k / NDCG@k by
catalog-constrained beam search (:func:`gr2.train.midtrain.evaluate`; the tasks and the protocol
are described there), write the model, the report and ``stage.json``.

The batch at step ``s`` is a pure function of (seed, s), so a killed run resumes exactly from its
last checkpoint (``midtrain/checkpoints``).

Under ``torchrun`` each rank trains on its own device with the model in DDP and takes rows
``rank::world_size`` of the same global batch (:class:`gr2.train.losses.DataParallel`), so N
processes give the one-process result. Rank 0 builds the extended start model (``checkpoints/init``)
and the others load it; the evaluation's beam search is sharded over the ranks (users
``rank::world_size``) and the rankings gathered, so every rank computes the same metrics (the
beam-search batches are composed differently, so a near-tie may rank differently by float
rounding). Only rank 0 writes (checkpoints, model, report, metrics, stage.json).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from gr2 import splits
from gr2.data.catalog import ItemCatalog
from gr2.models import extend_with_sids, load_base_model, load_pretrained, save_pretrained_atomic
from gr2.pipeline.rerank import finish_model_stage
from gr2.rundir import stage_key
from gr2.train import memory
from gr2.train.batches import pack_rows
from gr2.train.checkpointing import Checkpointer, training_key
from gr2.train.devices import autocast, choose_dtype, local_device, param_dtype, seed_everything
from gr2.train.distributed import World, begin_stage_on_rank0, init_world
from gr2.train.losses import DataParallel, check_finite_weights, check_loss
from gr2.train.metric_log import metric_logger
from gr2.train.midtrain import STAGE, MidtrainConfig, TaskSampler, demo_corpus, evaluate
from gr2.train.optim import make_optimizer, make_scheduler, unwrap_model, wrap_lora
from gr2.pipeline.inputs import input_key, load_fit_sequences, load_sequences


def upstream_figures(run_dir: Path) -> dict[str, Any] | None:
    """The upstream ranker's report (candidates/report.json: SASRec and popularity full-ranking
    figures), shown next to the mid-trained model's; None when that stage has not run."""
    path = run_dir / "candidates" / "report.json"
    return json.loads(path.read_text()) if path.exists() else None


def training_sequences(run_dir: Path, config: MidtrainConfig, seqs: list[list[int]]) -> list[list[int]]:
    """Per-user item lists the `next`/caption tasks train on (``config.train_on``)."""
    if config.train_on == "fit":

        return [s.tolist() for s in load_fit_sequences(run_dir, "train")]
    return splits.leave_one_out_prefixes(seqs)


def init_key(run_dir: Path, config: MidtrainConfig) -> str:
    """The key of the extended start model: the base model (and the demo model's config), the SID
    initialisation settings, and the data + SID index it was extended with."""
    what = {"base_model": config.base_model, "demo": config.demo if config.base_model == "demo" else None,
            "init_noise_std": config.init_noise_std, "seed": config.seed}
    return stage_key(what, input_key(run_dir, "data"), input_key(run_dir, "sid"))


def prepare_model(run_dir: Path, config: MidtrainConfig, catalog: ItemCatalog,
                  checkpoints: Checkpointer | None = None,
                  world: World = World()) -> tuple[Any, Any, Any]:
    """Base model extended with the SID vocabulary, saved once as ``checkpoints/init`` for resume
    and reused only while its key (:func:`init_key`) is current. Under torchrun rank 0 builds and
    saves it, the other ranks wait and load it."""
    from gr2.models import sid_tokens_of

    checkpoints = checkpoints or Checkpointer(run_dir / STAGE / "checkpoints", "", name=STAGE)
    key = init_key(run_dir, config)
    built = None
    if world.writer:
        init_dir, current = checkpoints.artifact("init", key)
        if not current:
            model, tokenizer = load_base_model(config.base_model, corpus=demo_corpus(catalog), demo=config.demo,
                                               cache_dir=config.cache_dir or None)
            texts = [catalog.item_text(i) for i in range(len(catalog))]
            sid_tokens = extend_with_sids(model, tokenizer, catalog.codes, catalog.level_sizes, texts,
                                          noise_std=config.init_noise_std, seed=config.seed)
            save_pretrained_atomic(model, tokenizer, init_dir)
            checkpoints.mark_artifact("init", key)
            built = model, tokenizer, sid_tokens
    else:
        init_dir = checkpoints.directory / "init"
    world.barrier()  # the other ranks read the init model once rank 0 has written it
    if built is not None:
        return built
    model, tokenizer = load_pretrained(init_dir)
    return model, tokenizer, sid_tokens_of(tokenizer, catalog.level_sizes)


def run_midtrain(run_dir: str | Path, config: MidtrainConfig = MidtrainConfig(), *, force: bool = False,
                 on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run stage 1; returns the summary (also in ``midtrain/report.json``). ``on_step(step)`` is
    called after every optimiser step (progress hooks; tests use it to kill a run)."""
    run_dir = Path(run_dir)
    stage_dir = run_dir / STAGE
    inputs = [input_key(run_dir, "data"), input_key(run_dir, "sid")]
    if config.train_on == "fit":
        inputs.append(input_key(run_dir, "candidates"))
    key = stage_key(config, *inputs)
    device = local_device(config.device)
    world = init_world(device)
    if (done := begin_stage_on_rank0(world, stage_dir, key, force=force)) is not None:
        return done
    catalog = ItemCatalog.from_run_dir(run_dir, sids=True)
    seqs = load_sequences(run_dir)
    train_seqs = training_sequences(run_dir, config, seqs)
    dtype = choose_dtype(device, config.dtype)  # compute dtype; parameters stay float32
    seed_everything(config.seed)

    # checkpoints of another config or other inputs are never resumed (removed, one log line)
    checkpoints = Checkpointer(stage_dir / "checkpoints", training_key(config, *inputs), keep=config.keep_checkpoints,
                                      writer=world.writer, name=STAGE)
    model, tokenizer, sid_tokens = prepare_model(run_dir, config, catalog, checkpoints, world)
    memory.check_stage(model, STAGE, config, device, dtype, world.size)  # refuse a plan that cannot fit, up front
    model = wrap_lora(model, config.lora).to(device=device, dtype=param_dtype(dtype))
    memory.freeze_in_compute_dtype(model, dtype)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.steps, config.warmup_steps)
    resumed = checkpoints.resume(model, optimizer, scheduler, world)
    start = resumed["step"] if resumed else 0
    sampler = TaskSampler(catalog, train_seqs, tokenizer, config, sid_tokens)
    # logits only where the loss is (a demo-sized model spends much of its time in the output
    # layer); only for architectures whose logits are the plain output projection of the decoder
    plain_head = getattr(model.config, "model_type", "") in ("llama", "qwen2", "qwen3", "mistral")
    parallel = DataParallel(model, world, device, dtype, tokenizer.pad_token_id,
                                   selected=plain_head and not config.lora.enabled)

    t0 = time.time()
    model.train()
    with metric_logger(world, stage_dir, resume_step=start if resumed else None) as log:
        progress = tqdm(range(start, config.steps), desc="midtrain", initial=start, total=config.steps,
                        disable=not world.writer)
        for step in progress:
            examples, tasks = sampler.batch(step)  # the global batch: the same on every rank
            if config.pack:
                examples = pack_rows(examples, max(len(e.input_ids) for e in examples), tokenizer.eos_token_id)
            loss, tokens = parallel.backward(examples)
            check_loss(loss, step + 1, "midtrain", config.lr)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                log.log(step + 1, loss=loss, lr=scheduler.get_last_lr()[0], tokens=tokens,
                        next_share=tasks.count("next") / len(tasks))
                progress.set_postfix(loss=f"{loss:.3f}")
            checkpoints.after_step(step + 1, config.steps, config.checkpoint_every, model, optimizer, scheduler, world)
            if on_step is not None:
                on_step(step + 1)
    train_seconds = time.time() - t0

    model = unwrap_model(model)
    check_finite_weights(model, "midtrain")
    with autocast(device, dtype):
        metrics = evaluate(model, tokenizer, sid_tokens, catalog, seqs, config, world)
    summary = {
        "base_model": config.base_model,
        "train_on": ("candidates/fit_train: no target of a later stage's training list is trained on"
                     if config.train_on == "fit" else
                     "items[:-2] of every user: includes the history -> target pairs of the SFT/RL training lists"),
        "steps": config.steps,
        "resumed_from_step": start,
        "train_seconds": round(train_seconds, 1),
        "world_size": world.size,
        "vocab_size": len(tokenizer),
        "sid_init": "mean text-token embedding of the items carrying each code (+noise); tags: mean of old rows",
        "eval": metrics,
        "upstream": upstream_figures(run_dir),
    }
    return finish_model_stage(world, stage_dir, key, model, tokenizer, summary, checkpoints)


def main(args: Any, config: MidtrainConfig) -> int:
    """``gr2 midtrain`` (flags: gr2.pipeline.registry)."""
    summary = run_midtrain(args.run_dir, config, force=args.force)
    print(json.dumps(summary["eval"], indent=2))
    return 0
