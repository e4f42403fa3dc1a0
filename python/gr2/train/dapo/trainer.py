"""The trainer: one step is rollouts -> rewards -> dynamic sampling -> advantages -> update.

1. **Rollouts.** Take the next prompts (a fixed shuffled order per epoch, so resume is exact) and
   sample G completions each (``rollout_fn``; default
   :func:`~gr2.train.dapo.rollouts.constrained_rollouts`, jump-forward decoding), ``rl.rollout_batch``
   prompts per call (0 = auto: all of a rank's prompts of the round in one left-padded call; each
   prompt is prefilled once and its cache expanded to its G rows. benches/README.md, "RL step").
2. **Rewards.** :func:`gr2.verify_rewards` on the completion token ids: R_rank + conditional (or
   unconditional) format reward, invalid outputs -1; plus the optional soft overlong penalty.
3. **Dynamic sampling.** Drop groups whose *outcome* (``outcome``: R_rank by default, not the
   shaped total) is the same for all G completions -- they carry no signal -- and draw further
   prompts until ``prompts_per_step`` groups are kept or ``max_generation_rounds`` rounds ran.
4. **Advantages** per group (:func:`~gr2.train.dapo.loss.group_advantages`).
5. **Update** (:func:`dapo_update`): ``updates_per_batch`` optimizer steps per rollout batch, each
   with ``grad_accum`` micro-batches, on :func:`~gr2.train.dapo.loss.dapo_loss`.

:func:`train` is the loop around it (resume, metrics, periodic greedy :func:`evaluate`,
checkpoints through :class:`gr2.train.Checkpointer`).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from gr2.errors import ConfigError, DataError, InvalidInputError
from gr2.rewards import RewardBatch, verify_rewards
from gr2.rundir import atomic_write_bytes, atomic_write_json, stage_key
from gr2.train import memory
from gr2.train.batches import end_of_turn_ids, epoch_order, to_device
from gr2.train.checkpointing import Checkpointer, training_key
from gr2.train.devices import autocast, choose_dtype, local_device, param_dtype
from gr2.train.losses import check_loss
from gr2.train.metric_log import MetricLogger
from gr2.train.optim import make_optimizer, make_scheduler, wrap_lora
from gr2.train.dapo.config import DapoConfig
from gr2.train.dapo.data import RlData
from gr2.train.dapo.loss import (dapo_loss, group_advantages, informative_groups, outcome_of, overlong_penalty, pack,
                                 token_logprobs)
from gr2.train.dapo.rollouts import Completion, Rollout, RolloutFn, constrained_rollouts, hash_seed, sampled_rollouts
from gr2.train.distributed import World

EVAL_BATCH = 16  # prompts per decoding call during evaluation


def minibatches(rollouts: Sequence[Rollout], group_size: int, updates: int) -> list[list[Rollout]]:
    """Split a rank's rollouts (whole groups of ``group_size``, in group order) into ``updates``
    mini-batches by each rollout's place in its group (place mod ``updates``): a rule that does not
    depend on how the groups are spread over the ranks, so N processes take the optimizer steps of
    one, whether or not ``updates`` divides G."""
    if len(rollouts) % group_size:
        raise InvalidInputError(f"{len(rollouts)} rollouts are not whole groups of G = {group_size}")
    return [[r for k, r in enumerate(rollouts) if (k % group_size) % updates == i] for i in range(updates)]


def dapo_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rollouts: Sequence[Rollout],
    config: DapoConfig,
    pad_id: int,
    world: World = World(),
    ref_model: torch.nn.Module | None = None,
    device: torch.device = torch.device("cpu"),
    precision: torch.dtype = torch.float32,
) -> dict[str, float]:
    """One rollout batch -> ``updates_per_batch`` optimizer steps. ``rollouts`` are THIS rank's
    rollouts (with advantages); every rank must call this the same number of times. With
    ``rl.share_prompt`` (default) each micro-batch encodes each of its prompts once for all its
    completions (:func:`~gr2.train.dapo.loss.pack_groups`), else once per rollout. Forward passes
    run under ``autocast(device, precision)`` (parameters stay float32).

    Dropout is switched off (``model.eval()``) for the old and the new log-probabilities alike:
    with dropout the ratio would differ from 1 by noise alone and the clip would act on it."""
    was_training = model.training
    model.eval()
    temp, share = config.temperature, config.share_prompt
    micro = minibatches(rollouts, config.group_size, config.updates_per_batch)
    chunks = [[mb[j::config.grad_accum] for j in range(config.grad_accum)] for mb in micro]
    clock = {"logprobs": 0.0, "loss_backward": 0.0, "optimizer": 0.0}
    t0 = time.perf_counter()
    # Old log-probs: the policy that generated the batch, before any update of this batch. The first
    # mini-batch runs before any update, so its old log-probs are the new ones detached (no pass of
    # their own: the ratio is exactly 1 there, as a separate pass would give); later mini-batches
    # need a pass now.
    old: list[list[torch.Tensor | None]] = [[None] * config.grad_accum]
    refs: list[list[torch.Tensor | None]] = []
    with torch.no_grad(), autocast(device, precision):
        for u, mb_chunks in enumerate(chunks):
            if u > 0:
                old.append([token_logprobs(model, to_device(pack(c, pad_id, share), device), temp) if c else None
                            for c in mb_chunks])
            refs.append([token_logprobs(ref_model, to_device(pack(c, pad_id, share), device), temp)
                         if c and ref_model is not None and config.kl_coef > 0 else None for c in mb_chunks])
    clock["logprobs"] += time.perf_counter() - t0
    stats = {"loss": 0.0, "clipped_tokens": 0.0, "tokens": 0.0, "grad_norm": 0.0}
    for u, mb_chunks in enumerate(chunks):
        local_tokens = sum(sum(len(r.completion_ids) for r in c) for c in mb_chunks)
        total_tokens = world.all_sum(float(local_tokens))
        if total_tokens == 0:
            continue
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for j, chunk in enumerate(mb_chunks):
            if not chunk:
                continue
            batch = to_device(pack(chunk, pad_id, share), device)
            with autocast(device, precision):
                logp = token_logprobs(model, batch, temp)
                old_logp = old[u][j] if old[u][j] is not None else logp.detach()
                loss, s = dapo_loss(logp, old_logp, batch["advantages"], batch["completion_mask"], total_tokens,
                                    config.eps_low, config.eps_high, refs[u][j], config.kl_coef)
            loss.backward()
            stats["loss"] += float(loss.detach())
            stats["clipped_tokens"] += s["clipped_tokens"]
            stats["tokens"] += s["tokens"]
        t1 = time.perf_counter()
        world.sum_gradients(model)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # ranks without a chunk in this mini-batch still join the step
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        stats["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        clock["loss_backward"] += t1 - t0
        clock["optimizer"] += time.perf_counter() - t1
    model.train(was_training)
    stats["loss"] = world.all_sum(stats["loss"]) / config.updates_per_batch
    clipped, tokens = world.all_sum(stats["clipped_tokens"]), world.all_sum(stats["tokens"])
    return {"loss": stats["loss"], "clip_fraction": clipped / max(tokens, 1.0), "completion_tokens": tokens,
            "grad_norm": stats["grad_norm"] / config.updates_per_batch,
            **{f"seconds_{k}": v for k, v in clock.items()}}


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]  # this rank's kept rollouts (G per kept group)
    stats: dict[str, float]


class DapoTrainer:
    """Holds model, optimizer and data; :meth:`step` runs one rollout batch and its updates."""

    def __init__(self, model, tokenizer, data: RlData, config: DapoConfig, *, index=None, sid_tokens=None,
                 rollout_fn: RolloutFn | None = None, world: World = World(), ref_model=None,
                 device: torch.device | None = None, candidate_sids: np.ndarray | None = None):
        self.config, self.data, self.world = config, data, world
        if config.k and data.candidates.shape[1] != config.k:
            raise ConfigError(f"rl.k = {config.k} but the data has K = {data.candidates.shape[1]}")
        self.device = device or local_device(config.device)
        if world.distributed and world.device.type == "cuda" and self.device != world.device:
            raise ConfigError(f"the process group reduces on {world.device} but this rank trains on {self.device}; "
                              "keep rl.device = auto (cuda:LOCAL_RANK) under torchrun with nccl")
        self.precision = choose_dtype(self.device, config.dtype)  # compute dtype (autocast)
        self.tokenizer = tokenizer
        # float32 master weights whatever the compute dtype (bf16 parameters round small steps away)
        memory.check_stage(model, "rl", config, self.device, self.precision, world.size)  # refuse what cannot fit
        self.model = wrap_lora(model, config.lora).to(self.device, dtype=param_dtype(self.precision))
        memory.freeze_in_compute_dtype(self.model, self.precision)
        if config.kl_coef > 0 and ref_model is None:  # the KL term would silently vanish
            raise ConfigError(f"rl.kl_coef = {config.kl_coef} penalises the distance to a reference policy, but no "
                              "reference model was given (ref_model=); pass the frozen start model or set rl.kl_coef = 0")
        self.ref_model = ref_model
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay)
        updates = config.steps * config.updates_per_batch
        self.scheduler = make_scheduler(self.optimizer, updates, config.warmup_steps, kind="constant")
        self.rollout_fn = rollout_fn or (constrained_rollouts if config.constrained else sampled_rollouts)
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if index is None and candidate_sids is None:
            raise ConfigError("the DAPO trainer needs a SidIndex (index=) or the candidates' SIDs (candidate_sids=)")
        # a sampled turn ends at eos or at the chat template's end-of-turn token (<|im_end|>, which SFT
        # taught): generation stops at either, and the verifier treats either as a trailer
        stop_ids = sorted({int(eos), *end_of_turn_ids(tokenizer)})
        self.ctx = {"index": index, "sid_tokens": sid_tokens, "eos_id": int(eos), "pad_id": int(pad), "device": self.device,
                    "candidate_sids": candidate_sids, "stop_ids": stop_ids}
        self.index, self.sid_tokens = index, sid_tokens
        self._check_context(model, candidate_sids)
        self.step_count = 0
        self.cursor = 0  # prompts drawn so far, over all epochs

    def _check_context(self, model, candidate_sids) -> None:
        """The longest prompt plus the longest completion a rollout may write must fit the model's
        context (positions beyond it are garbage or an error deep inside the model)."""
        from gr2.decoding._setup import completion_length

        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if not limit or not self.data.prompt_ids:
            return
        cfg = self.config
        if cfg.constrained:
            levels = self.sid_tokens.levels if self.sid_tokens is not None else (
                self.index.levels if self.index is not None else np.asarray(candidate_sids).shape[-1])
            budget = completion_length(self.data.candidates.shape[1], int(levels),
                                       "think" if cfg.reasoning else "disabled", cfg.max_reasoning_tokens)
            what = f"rl.max_reasoning_tokens = {cfg.max_reasoning_tokens} and K = {self.data.candidates.shape[1]}"
        else:
            budget, what = cfg.max_new_tokens, f"rl.max_new_tokens = {cfg.max_new_tokens}"
        row = int(np.argmax([len(p) for p in self.data.prompt_ids]))
        longest = len(self.data.prompt_ids[row])
        if longest + budget > int(limit):
            raise ConfigError(f"prompt {row} has {longest} tokens and a completion may take {budget} ({what}): more "
                              f"than the model's context of {limit} positions (max_position_embeddings); shorten the "
                              "prompts (prompts.max_history, prompts.max_tokens) or the completion budget")

    # -- data order: a pure function of (seed, position), so resume needs only the cursor
    def _prompt_at(self, position: int) -> int:
        n = len(self.data.targets)
        epoch, offset = divmod(position, n)
        return int(epoch_order(n, self.config.seed, epoch)[offset])

    def _rewards(self, completions: list[list[int]], rows: list[int]) -> RewardBatch:
        kwargs = dict(sid_tokens=self.sid_tokens, alpha=self.config.alpha, conditional=self.config.conditional,
                      invalid_reward=self.config.invalid_reward, trailer_ids=sorted({*self.ctx["stop_ids"], self.ctx["pad_id"]}))
        cands, targets = self.data.candidates[rows], self.data.targets[rows]
        if self.config.reward != "rank":  # one relevant item per list: the target
            kwargs.update(relevance=(cands == targets[:, None]).astype(np.float64), reward_kind=self.config.reward)
        if self.index is not None:
            return verify_rewards(completions, cands, targets, self.index, **kwargs)
        return verify_rewards(completions, cands, targets, candidate_sids=self.ctx["candidate_sids"][rows], **kwargs)

    def _group(self, pos: int, row: int, outputs: list[Any], parts: list[RewardBatch],
               lengths: list[int]) -> tuple[int, list[Rollout], bool]:
        """Rewards, keep decision and advantages of one prompt's G completions."""
        cfg, g = self.config, self.config.group_size
        if len(outputs) != g:
            raise InvalidInputError(f"rollout function returned {len(outputs)} completions, expected {g}")
        done = [o if isinstance(o, Completion) else Completion(list(o)) for o in outputs]
        for c in done:
            if not c.ids:
                if c.allowed is not None:
                    raise InvalidInputError("a constrained rollout returned an empty completion")
                c.ids = [self.ctx["eos_id"]]
        completions = [c.ids for c in done]
        rb = self._rewards(completions, [row] * g)
        rewards = rb.reward + overlong_penalty(np.array([len(c) for c in completions]), cfg.overlong_max,
                                               cfg.overlong_cache)
        keep = bool(informative_groups(outcome_of(rb, cfg.outcome)[None, :])[0]) or not cfg.dynamic_sampling
        adv = group_advantages(rewards[None, :], cfg.std_eps)[0]
        group = [Rollout(self.data.prompt_ids[row], c.ids, float(r), float(a), c.allowed)
                 for c, r, a in zip(done, rewards, adv)]
        parts.append(rb)
        lengths.extend(len(c) for c in completions)
        return pos, group, keep

    def collect(self) -> RolloutBatch:
        """Rollouts for one step with dynamic sampling (refill rounds up to the cap)."""
        cfg, world = self.config, self.world
        g = cfg.group_size
        kept: list[Rollout] = []
        kept_groups = 0
        seen_groups = 0
        parts: list[RewardBatch] = []
        lengths: list[int] = []
        for round_ in range(cfg.max_generation_rounds):
            need = cfg.prompts_per_step - kept_groups
            positions = list(range(self.cursor, self.cursor + need))
            self.cursor += need
            mine = positions[world.rank::world.size]
            local: list[tuple[int, list[Rollout], bool]] = []
            per_call = cfg.rollout_batch or max(len(mine), 1)
            for at in range(0, len(mine), per_call):
                chunk = mine[at:at + per_call]
                rows = [self._prompt_at(pos) for pos in chunk]
                seeds = [hash_seed(cfg.seed, self.step_count, pos) for pos in chunk]
                with autocast(self.device, self.precision):
                    outputs = self.rollout_fn(self.model, self.tokenizer, [self.data.prompt_texts[r] for r in rows],
                                              self.data.candidates[rows], g, seeds, cfg, self.ctx)
                if len(outputs) != len(rows):
                    raise InvalidInputError(f"rollout function returned {len(outputs)} groups for {len(rows)} prompts")
                for pos, row, group_out in zip(chunk, rows, outputs):
                    local.append(self._group(pos, row, group_out, parts, lengths))
            # every rank learns which groups were kept, in global prompt order
            decisions = sorted(d for rank_decisions in world.all_gather([(p, k) for p, _, k in local]) for d in rank_decisions)
            seen_groups += len(decisions)
            allowed = {p for p, k in decisions if k}
            allowed = set(sorted(allowed)[: cfg.prompts_per_step - kept_groups])
            kept_groups += len(allowed)
            kept.extend(r for p, group, _ in local if p in allowed for r in group)
            if kept_groups >= cfg.prompts_per_step:
                break
        stats = _rollout_stats(parts, lengths, world)
        stats.update(kept_groups=kept_groups, generated_groups=seen_groups, kept_share=kept_groups / max(seen_groups, 1),
                     generation_rounds=round_ + 1)
        return RolloutBatch(kept, stats)

    def step(self) -> dict[str, float]:
        t0 = time.time()
        batch = self.collect()
        stats = dict(batch.stats)
        stats["seconds_rollout"] = time.time() - t0
        if batch.stats["kept_groups"] > 0:
            # ranks may hold zero kept rollouts; dapo_update still joins the collective calls
            stats.update(dapo_update(self.model, self.optimizer, self.scheduler, batch.rollouts, self.config,
                                     self.ctx["pad_id"], self.world, self.ref_model, self.device, self.precision))
            check_loss(stats["loss"], self.step_count + 1, "rl", self.config.lr)
        else:
            stats["skipped_update"] = 1.0
        self.step_count += 1
        stats["lr"] = self.scheduler.get_last_lr()[0]
        stats["seconds"] = time.time() - t0
        return stats

    # -- checkpoints: weights + optimizer + scheduler + RNG + step + data cursor
    def save(self, checkpoints: Checkpointer) -> Path:
        """Checkpoint the current step (rank 0 writes and prunes; every rank waits for it)."""
        path = checkpoints.save(self.step_count, self.model, self.optimizer, self.scheduler,
                                extra={"cursor": self.cursor})
        if self.world.distributed:
            torch.distributed.barrier()
        return path

    def resume(self, checkpoints: Checkpointer) -> bool:
        """Load the newest checkpoint of ``checkpoints``' key, if any; whether one was loaded."""
        meta = checkpoints.resume(self.model, self.optimizer, self.scheduler, self.world)
        if meta is None:
            return False
        self.step_count = int(meta["step"])
        self.cursor = int(meta["extra"]["cursor"])
        return True


def _rollout_stats(parts: list[RewardBatch], lengths: list[int], world: World) -> dict[str, float]:
    sums = {"reward": 0.0, "r_rank": 0.0, "r_fmt": 0.0, "valid": 0.0, "copied": 0.0, "top1_first": 0.0,
            "length": float(sum(lengths)), "n": 0.0}
    for rb in parts:
        sums["reward"] += float(rb.reward.sum())
        sums["r_rank"] += float(rb.r_rank.sum())
        sums["r_fmt"] += float(rb.r_fmt.sum())
        sums["valid"] += float(rb.valid.sum())
        sums["copied"] += float(rb.copied_order.sum())
        sums["top1_first"] += float((rb.top1_input_pos == 1).sum())  # position bias: top-1 = the input's first
        sums["n"] += len(rb)
    totals = {k: world.all_sum(v) for k, v in sums.items()}
    n = max(totals["n"], 1.0)
    return {"reward_mean": totals["reward"] / n, "r_rank_mean": totals["r_rank"] / n, "r_fmt_mean": totals["r_fmt"] / n,
            "valid_rate": totals["valid"] / n, "copy_rate": totals["copied"] / n, "top1_is_input_first": totals["top1_first"] / n,
            "completion_length": totals["length"] / n}


def evaluate(trainer: DapoTrainer, data: RlData) -> dict[str, float]:
    """Greedy reranking of ``data`` (one completion per prompt): R@1, NDCG@5, copy and validity rates."""
    cfg = trainer.config
    completions = []
    if cfg.constrained:
        from gr2 import constrained_decode

        for start in range(0, len(data.targets), EVAL_BATCH):
            rows = slice(start, start + EVAL_BATCH)
            results = constrained_decode(trainer.model, trainer.tokenizer, data.prompt_texts[rows], data.candidates[rows],
                                         index=trainer.index, sid_tokens=trainer.sid_tokens, reasoning=cfg.reasoning,
                                         max_reasoning_tokens=cfg.max_reasoning_tokens)
            completions.extend(list(r.completion_ids) + [trainer.ctx["eos_id"]] for r in results)
    else:
        for start in range(0, len(data.targets), EVAL_BATCH):
            rows = slice(start, start + EVAL_BATCH)
            groups = sampled_rollouts(trainer.model, trainer.tokenizer, data.prompt_texts[rows], data.candidates[rows],
                                      1, [0], cfg, trainer.ctx, greedy=True)
            completions.extend(group[0] for group in groups)
    rb = verify_rewards(completions, data.candidates, data.targets, trainer.index, sid_tokens=trainer.sid_tokens,
                        alpha=cfg.alpha, conditional=cfg.conditional,
                        trailer_ids=sorted({trainer.ctx["eos_id"], trainer.ctx["pad_id"]}), metric_ks=(1, 5))
    s = rb.summary()
    return {"eval_recall@1": s["recall@1"], "eval_ndcg@5": s["ndcg@5"], "eval_copy_rate": s["copy_rate"],
            "eval_valid_rate": s["valid_rate"], "eval_pre_recall@1": s["pre_recall@1"], "eval_pre_ndcg@5": s["pre_ndcg@5"]}


class BestPolicy:
    """The policy with the best validation metric so far (``rl.select``), kept on disk beside the
    checkpoints (``best_policy.pt`` + ``best.json``, written atomically by rank 0) so a resumed run
    still knows it. A file of another stage key is ignored."""

    def __init__(self, out_dir: Path, key: str, metric: str):
        self.weights, self.record = out_dir / "best_policy.pt", out_dir / "best.json"
        self.key, self.metric = key, f"eval_{metric}"
        self.step, self.value = -1, float("-inf")
        if self.record.exists() and self.weights.exists():
            saved = json.loads(self.record.read_text())
            if saved.get("key") == key and saved.get("metric") == self.metric:
                self.step, self.value = int(saved["step"]), float(saved["value"])

    def offer(self, step: int, metrics: dict[str, float], model: torch.nn.Module) -> None:
        value = float(metrics[self.metric])
        if value <= self.value:  # ties keep the earlier (fewer RL steps) policy
            return
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        atomic_write_bytes(self.weights, buffer.getvalue())
        atomic_write_json(self.record, {"key": self.key, "metric": self.metric, "step": step, "value": value})
        self.step, self.value = step, value

    def load_into(self, model: torch.nn.Module) -> None:
        if self.step < 0:
            raise DataError(f"{self.weights} holds no evaluated policy; was rl.eval_every > 0?")
        model.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True))

    def summary(self) -> dict[str, float]:
        return {"selected_step": self.step, f"selected_{self.metric}": self.value}


def train(trainer: DapoTrainer, out_dir: Path, eval_data: RlData | None = None, resume: bool = True,
          inputs: Sequence[str] = ()) -> dict[str, Any]:
    """The loop: resume from the newest checkpoint of this run (key: :func:`gr2.train.training_key`
    of the trainer's config and the stage's ``inputs`` keys), step, log, evaluate, checkpoint. A
    checkpoint of another key is never resumed (removed, one log line); the current config's lr
    applies on resume, and so do changed evaluation / logging settings. With ``rl.select`` other
    than "last", the policy with the best validation metric (the start model included) is loaded
    into ``trainer.model`` at the end and the returned stats name its step; that record is keyed
    by the whole config (another validation setting starts a new one)."""
    cfg = trainer.config
    key = stage_key(cfg, *inputs)
    checkpoints = Checkpointer(out_dir / "checkpoints", training_key(cfg, *inputs), keep=cfg.keep_checkpoints,
                                      writer=trainer.world.rank == 0, name=out_dir.name)
    resumed = trainer.resume(checkpoints) if resume else False
    rank0 = trainer.world.rank == 0
    logger = MetricLogger(out_dir, resume_step=trainer.step_count if resumed else None,
                                 tensorboard=cfg.tensorboard) if rank0 else None
    best = BestPolicy(out_dir, key, cfg.select) if cfg.select != "last" and eval_data is not None else None
    if cfg.select != "last" and eval_data is None:
        raise ConfigError(f"rl.select = {cfg.select!r} needs validation lists (rl.eval_every > 0 and a valid split)")
    last: dict[str, float] = {}

    def validate(step: int) -> dict[str, float]:
        with autocast(trainer.device, trainer.precision):
            metrics = evaluate(trainer, eval_data)
        if best is not None:
            best.offer(step, metrics, trainer.model)
        return metrics

    try:
        if eval_data is not None and cfg.eval_every and trainer.step_count == 0 and rank0:
            logger.log(0, **validate(0))
        bar = tqdm(range(trainer.step_count, cfg.steps), desc="rl (dapo)", disable=not rank0)
        for _ in bar:
            last = trainer.step()
            step = trainer.step_count
            if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and rank0:
                last.update(validate(step))
            if logger:
                logger.log(step, **last)
            bar.set_postfix(reward=f"{last.get('reward_mean', 0):.3f}", kept=f"{last.get('kept_share', 0):.2f}")
            if step % cfg.save_every == 0 or step == cfg.steps:
                trainer.save(checkpoints)
    finally:
        if logger:
            logger.close()
    if best is not None and rank0:
        best.load_into(trainer.model)
        last.update(best.summary())
    return last


