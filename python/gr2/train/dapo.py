"""Stage 3, DAPO reinforcement learning with verifiable rerank rewards (docs/DESIGN.md §1).

Reads ``sft/model`` (or ``midtrain/model``), ``sid/index.gr2sid``, ``data/items`` and
``candidates/train`` (+ ``candidates/valid`` for the periodic evaluation); writes ``rl/model``,
``rl/checkpoints/step-*``, ``rl/metrics.jsonl`` (+ tensorboard) and ``rl/stage.json``.

One training step, top to bottom:

1. **Rollouts.** Take the next prompts (a fixed shuffled order per epoch, so resume is exact) and
   sample G completions each (``rollout_fn``; default :func:`constrained_rollouts`, i.e.
   ``gr2.constrained_decode`` with sampling), ``rl.rollout_batch`` prompts per call (0 = auto: all
   of a rank's prompts of the round in one call on CUDA, one per call on CPU, where batching
   measured no faster: see below). Each prompt gets the seed hash(seed, step, prompt position).
   Determinism contract: constrained rollouts give every prompt its own generator (the decoder's
   per-prompt seeds), so a prompt's rollouts do not depend on which process or batch draws it, up
   to float noise of the batched, left-padded forward pass (a token flips only if a probability
   moves across a random draw; tests check equality on the tiny model). Plain sampling
   (``rl.constrained = false``, ``generate``) draws from one global generator seeded from the seeds
   of the whole call, so its rollouts depend on the batch composition (``rollout_batch``, world
   size). Either way the composition is a pure function of (config, step, cursor, rank), so resume
   is exact.
2. **Rewards.** :func:`gr2.verify_rewards` on the completion token ids: R_rank + conditional (or
   unconditional) format reward, invalid outputs -1; plus the optional soft overlong penalty.
3. **Dynamic sampling.** Drop groups whose *outcome* (``outcome``: R_rank by default, not the
   shaped total) is the same for all G completions -- they carry no signal -- and draw further
   prompts until ``prompts_per_step`` groups are kept or ``max_generation_rounds`` rounds ran.
4. **Advantages.** A = (R - mean_G) / (std_G + std_eps) per group (population std).
5. **Update.** Clipped-ratio objective with clip-higher (eps_low 0.2, eps_high 0.28), summed over
   completion tokens and divided by the total number of completion tokens of the mini-batch
   (token-level normalisation, across micro-batches and processes); optional k3 KL to the start
   model (off by default); ``updates_per_batch`` optimizer steps per rollout batch, each with
   ``grad_accum`` micro-batches.

Multi-process (``torchrun``): prompts of a round are split across ranks; keep decisions are
gathered so every rank sees the same global kept count; each rank backpropagates its own groups
and the gradients are summed with ``all_reduce`` (gloo on CPU, nccl on GPU). We reduce gradients
by hand instead of wrapping the model in ``DistributedDataParallel`` because after dynamic
sampling ranks hold different numbers of groups (DDP requires the same number of backward calls);
the loss is normalised by the global token count, so the sum equals the single-process gradient.

**On-policy log-probabilities.** The ratio and the policy gradient use the distribution each token
was sampled from. Constrained rollouts carry, per token, the allowed ids the automaton offered
(:func:`gr2.decoding.constraint_trace` replays the completion through a fresh native automaton);
:func:`token_logprobs` then takes a log-softmax over the gathered logits of those ids (a forced tag
gets exactly 0), over the vocabulary minus the forbidden ids for free reasoning, and over the whole
vocabulary for rollouts without a trace (plain sampling). Old, new and reference (KL) log-probs all
use the same form, and logits are divided by ``rl.temperature`` as the sampler does; ``top_p < 1``
truncation is not modelled. ``tests/test_dapo_onpolicy.py`` checks the masked log-probabilities
against the ones ``constrained_decode`` sampled with, token by token (|diff| <= 2e-4).

Measured (demo run, shared 2-core CPU at load average ~3, 1 torch thread, 4 steps of
``benches/bench_rollouts.py``): one call over the 4 prompts of a step took 8.2 s/step, one prompt
per call 7.0 s/step, the code before batching 7.8 s/step -- differences within the noise of the
shared box (an interleaved rerun of the same 4 prompts at load ~4: 13.9-22.1 s batched vs
14.3-16.3 s one by one). Decoding here is bound by the per-row KV cache (prompts of 800-1900
tokens), so batching saves no work and left padding to the longest prompt adds some; hence the
CPU default of 1. The GPU case (auto: all prompts per call) is not measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gr2.config import from_dict, load_toml
from gr2.decoding.decode import AllowedTrace
from gr2.errors import ConfigError, DataError, InvalidInputError
from gr2.rewards import RewardBatch, verify_rewards
from gr2.rerank import OUTPUT_GLOBS as RERANK_OUTPUTS
from gr2.rundir import atomic_write_json, begin_stage, mark_done, read_stage, save_png, stage_key
from gr2.train import common

OUTCOMES = ("r_rank", "hit@1", "rank_re")
EVAL_BATCH = 16  # prompts per decoding call during evaluation


@dataclass
class DapoConfig:
    """Configuration of the ``rl`` stage (TOML table ``[rl]``)."""

    base: str = "auto"  # start model: "sft", "midtrain", "auto" (sft if present) or a model folder
    k: int = 0  # expected candidates per request; 0 = take it from the data (mismatch -> ConfigError)
    group_size: int = 4  # G rollouts per prompt
    prompts_per_step: int = 4  # groups per rollout batch (after dynamic sampling)
    steps: int = 20  # rollout batches
    max_generation_rounds: int = 3  # cap on dynamic-sampling refills per step
    dynamic_sampling: bool = True
    outcome: str = "r_rank"  # what must vary within a group to keep it: r_rank | hit@1 | rank_re
    # rewards (docs/DESIGN.md §1)
    alpha: float = 0.2
    conditional: bool = True
    invalid_reward: float = -1.0
    overlong_max: int = 0  # L_max in completion tokens; 0 disables the soft overlong penalty
    overlong_cache: int = 0  # L_cache: the penalty ramps from 0 at L_max - L_cache to -1 at L_max
    # objective
    eps_low: float = 0.2
    eps_high: float = 0.28
    std_eps: float = 1e-6
    kl_coef: float = 0.0  # > 0 adds a k3 KL penalty to the start model (needs a frozen copy)
    updates_per_batch: int = 1  # optimizer steps per rollout batch (mini-batches)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    lora: common.LoraSettings = field(default_factory=common.LoraSettings)
    # rollouts
    constrained: bool = True  # constrained_decode (always valid) or plain sampling with generate()
    reasoning: bool = True
    max_reasoning_tokens: int = 64
    max_new_tokens: int = 256  # unconstrained sampling only
    rollout_batch: int = 0  # prompts per rollout call (G completions each); 0 = auto: all on CUDA, 1 on CPU
    temperature: float = 1.0
    top_p: float = 1.0
    max_train_prompts: int = 0  # 0 = all of prompts/train
    # evaluation on candidates/valid (greedy) for R@1 / NDCG@5 against step
    eval_every: int = 0
    eval_prompts: int = 64
    # plumbing
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    save_every: int = 10
    keep_checkpoints: int = 2
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"rl.group_size must be >= 2 (advantages compare rollouts within a group), got {self.group_size}")
        if not 0 < self.eps_low < 1:
            raise ConfigError(f"rl.eps_low must be in (0, 1), got {self.eps_low}")
        if self.eps_high < self.eps_low:
            raise ConfigError(f"rl.eps_high ({self.eps_high}) must be >= rl.eps_low ({self.eps_low}) (clip-higher)")
        if self.outcome not in OUTCOMES:
            raise ConfigError(f"rl.outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        for name in ("prompts_per_step", "steps", "max_generation_rounds", "updates_per_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_batch < 0:
            raise ConfigError(f"rl.rollout_batch must be >= 0 (0 = auto), got {self.rollout_batch}")
        if self.updates_per_batch > self.prompts_per_step:
            raise ConfigError("rl.updates_per_batch cannot exceed rl.prompts_per_step (each mini-batch needs a group)")
        if self.k < 0 or self.std_eps <= 0 or self.kl_coef < 0 or self.max_reasoning_tokens < 0:
            raise ConfigError("rl.k, rl.kl_coef, rl.max_reasoning_tokens must be >= 0 and rl.std_eps > 0")
        if self.overlong_max < 0 or not 0 <= self.overlong_cache <= self.overlong_max:
            raise ConfigError(f"need 0 <= rl.overlong_cache <= rl.overlong_max, got {self.overlong_cache}, {self.overlong_max}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("rl.temperature must be > 0 and rl.top_p in (0, 1]")
        if not self.reasoning and self.max_reasoning_tokens > 0:
            raise ConfigError(f"rl.max_reasoning_tokens = {self.max_reasoning_tokens} with rl.reasoning = false: the "
                              "answer-only mode writes no reasoning; set it to 0 (the answer arm does this itself)")


# --------------------------------------------------------------------------------------------
# the pieces of one step, on plain tensors (unit-tested without a model)


def overlong_penalty(lengths: np.ndarray, l_max: int, l_cache: int) -> np.ndarray:
    """DAPO's soft overlong penalty: 0 up to L_max - L_cache, linear to -1 at L_max, -1 beyond."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if l_max <= 0:
        return np.zeros_like(lengths)
    start = l_max - l_cache
    if l_cache == 0:
        return np.where(lengths > l_max, -1.0, 0.0)
    return np.clip((start - lengths) / l_cache, -1.0, 0.0)


def group_advantages(rewards: np.ndarray, std_eps: float = 1e-6) -> np.ndarray:
    """(R - mean_G) / (std_G + eps) for rewards shaped (groups, G); population std."""
    rewards = np.asarray(rewards, dtype=np.float64)
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, keepdims=True)
    return (rewards - mean) / (std + std_eps)


def informative_groups(outcomes: np.ndarray) -> np.ndarray:
    """Dynamic sampling's keep mask: a group is kept unless all G outcomes are equal."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    return ~np.all(outcomes == outcomes[:, :1], axis=1)


def outcome_of(rb: RewardBatch, kind: str) -> np.ndarray:
    if kind == "r_rank":
        return rb.r_rank.astype(np.float64)
    if kind == "hit@1":
        return (rb.rank_re == 1).astype(np.float64)
    return rb.rank_re.astype(np.float64)


@dataclass
class Completion:
    """A rollout function's completion: token ids (EOS included when the model stopped) and, for a
    constrained sampler, the allowed ids behind each token (None: sampled from the full vocabulary)."""

    ids: list[int]
    allowed: AllowedTrace | None = None


@dataclass
class Rollout:
    """One sampled completion of one prompt, with its reward and (after grouping) advantage.
    ``allowed`` is the constraint it was sampled under (None: the full vocabulary); the policy
    log-probabilities of its tokens are taken under that same constraint."""

    prompt_ids: list[int]
    completion_ids: list[int]  # the generated tokens the loss is computed on (EOS included)
    reward: float = 0.0
    advantage: float = 0.0
    allowed: AllowedTrace | None = None


def pack_rollouts(rollouts: Sequence[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion ids, attention mask, the completion-token mask over the
    *predicted* positions (T-1 wide, aligned with :func:`token_logprobs`), and advantages.

    When rollouts carry constraints (:attr:`Rollout.allowed`) it adds, over the flattened
    (N * (T-1)) predicted positions: ``sparse_index`` (P,) and ``sparse_ids`` / ``sparse_valid``
    (P, A) for tokens drawn from a short allowed list (padded), ``free_index`` (F,) for free
    reasoning tokens and ``forbidden`` (the ids free reasoning excludes). Positions of rollouts
    without a constraint are in neither: their log-probabilities stay full-vocabulary ones."""
    if not rollouts:
        raise InvalidInputError("no rollouts to pack")
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    n = len(rollouts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    completion = torch.zeros((n, width - 1), dtype=torch.float32)
    sparse_pos: list[np.ndarray] = []
    sparse_lists: list[tuple[np.ndarray, np.ndarray]] = []
    free_pos: list[np.ndarray] = []
    forbidden: np.ndarray | None = None
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        if c == 0:
            raise InvalidInputError(f"rollout {i} has an empty completion")
        ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids, dtype=torch.long)
        attention[i, : p + c] = 1
        completion[i, p - 1 : p + c - 1] = 1.0  # position t predicts token t+1
        a = r.allowed
        if a is None:
            continue
        if len(a) != c:
            raise InvalidInputError(f"rollout {i}: constraint trace covers {len(a)} tokens, the completion has {c}")
        if forbidden is None:
            forbidden = a.forbidden
        elif forbidden is not a.forbidden and not np.array_equal(forbidden, a.forbidden):
            raise InvalidInputError("rollouts of one batch were constrained with different token maps")
        flat = i * (width - 1) + (p - 1) + np.arange(c)
        free_pos.append(flat[a.free])
        sparse_pos.append(flat[~a.free])
        keep = np.nonzero(~a.free)[0]
        sparse_lists.append((a.offsets[keep], a.offsets[keep + 1]))
        for t in keep:
            if a.offsets[t + 1] <= a.offsets[t]:
                raise InvalidInputError(f"rollout {i}: empty allowed list at completion token {t}")
    advantages = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)
    out = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion, "advantages": advantages}
    if forbidden is not None:
        traces = [r.allowed for r in rollouts if r.allowed is not None]
        starts = np.concatenate([s for s, _ in sparse_lists])
        ends = np.concatenate([e for _, e in sparse_lists])
        counts = ends - starts
        a_width = int(counts.max(initial=1))
        table = np.zeros((counts.size, a_width), dtype=np.int64)
        valid = np.arange(a_width)[None, :] < counts[:, None]
        row = 0
        for trace, (s_, e_) in zip(traces, sparse_lists):  # gather each trace's lists into the table
            for start, end in zip(s_, e_):
                table[row, : end - start] = trace.ids[start:end]
                row += 1
        out.update(sparse_index=torch.as_tensor(np.concatenate(sparse_pos), dtype=torch.long),
                   sparse_ids=torch.as_tensor(table), sparse_valid=torch.as_tensor(valid),
                   free_index=torch.as_tensor(np.concatenate(free_pos), dtype=torch.long),
                   forbidden=torch.as_tensor(forbidden, dtype=torch.long))
    return out


def token_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log p(x_{t+1} | x_{<=t}) at every completion position (0 elsewhere), (N, T-1), float32.

    ``p`` is the sampling distribution: the model's softmax at ``temperature``, restricted to the
    constraint the token was drawn under when the batch carries one (see :func:`pack_rollouts`):
    a log-softmax over the gathered logits of the allowed ids (a forced token gets exactly 0), over
    the vocabulary minus ``forbidden`` for free reasoning, over the whole vocabulary otherwise.
    Logits are computed only from the first completion position on (``logits_to_keep``)."""
    input_ids, mask = batch["input_ids"], batch["completion_mask"]
    n, t1 = mask.shape
    has = mask.sum(0) > 0
    start = int(torch.nonzero(has)[0]) if bool(has.any()) else t1 - 1
    keep = t1 + 1 - start  # logits of positions start .. T-1; the last one predicts nothing
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    logits = logits[:, -keep:-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    width = t1 - start
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # row (i, t - start) of the kept window
    targets = input_ids[:, start + 1:].reshape(-1)
    lp = -F.cross_entropy(flat, targets, reduction="none")
    if "sparse_index" in batch:
        def local(index: torch.Tensor) -> torch.Tensor:  # flat (N, T-1) position -> row of ``flat``
            row, col = index // t1, index % t1
            return row * width + (col - start)

        s_idx = local(batch["sparse_index"])
        if s_idx.numel():
            gathered = flat[s_idx[:, None], batch["sparse_ids"]].masked_fill(~batch["sparse_valid"], float("-inf"))
            chosen = flat[s_idx, targets[s_idx]]
            lp = lp.index_put((s_idx,), chosen - torch.logsumexp(gathered, dim=-1))
        f_idx = local(batch["free_index"])
        if f_idx.numel():
            rows = flat.index_select(0, f_idx)
            if batch["forbidden"].numel():
                rows = rows.index_fill(1, batch["forbidden"], float("-inf"))
            free_lp = rows.gather(1, targets[f_idx][:, None]).squeeze(1) - torch.logsumexp(rows, dim=-1)
            lp = lp.index_put((f_idx,), free_lp)
    out = lp.new_zeros((n, t1))
    out = torch.cat([out[:, :start], lp.view(n, width)], dim=1)
    return torch.where(mask > 0, out, torch.zeros_like(out))


def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    total_tokens: float,
    eps_low: float,
    eps_high: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio token loss summed over ``mask`` and divided by ``total_tokens`` (the completion
    tokens of the whole mini-batch, across micro-batches and processes). Returns (loss, stats sums)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if ref_logp is not None and kl_coef > 0:
        log_ratio_ref = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(log_ratio_ref) - log_ratio_ref - 1.0)
    loss = (per_token * mask).sum() / total_tokens
    with torch.no_grad():
        was_clipped = ((clipped < unclipped) & (mask > 0)).float().sum()
    return loss, {"clipped_tokens": float(was_clipped), "tokens": float(mask.sum())}


# --------------------------------------------------------------------------------------------
# processes


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
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


def init_world() -> World:
    """Join the torchrun process group when launched with torchrun (gloo on CPU, nccl on GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size())


# --------------------------------------------------------------------------------------------
# the update


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
    rollouts (with advantages); every rank must call this the same number of times. Forward passes
    run under ``common.autocast(device, precision)`` (parameters stay float32).

    Dropout is switched off (``model.eval()``) for the old and the new log-probabilities alike:
    with dropout the ratio would differ from 1 by noise alone and the clip would act on it."""
    was_training = model.training
    model.eval()
    temp = config.temperature
    micro = [list(rollouts[i::config.updates_per_batch]) for i in range(config.updates_per_batch)]
    # old log-probs: the policy that generated the batch, before any update of this batch
    old: list[list[torch.Tensor]] = []
    refs: list[list[torch.Tensor | None]] = []
    chunks = [[mb[j::config.grad_accum] for j in range(config.grad_accum)] for mb in micro]
    with torch.no_grad(), common.autocast(device, precision):
        for mb_chunks in chunks:
            old.append([token_logprobs(model, common.to_device(pack_rollouts(c, pad_id), device), temp) if c else None
                        for c in mb_chunks])
            refs.append([token_logprobs(ref_model, common.to_device(pack_rollouts(c, pad_id), device), temp)
                         if c and ref_model is not None and config.kl_coef > 0 else None for c in mb_chunks])
    stats = {"loss": 0.0, "clipped_tokens": 0.0, "tokens": 0.0, "grad_norm": 0.0}
    for u, mb_chunks in enumerate(chunks):
        local_tokens = sum(sum(len(r.completion_ids) for r in c) for c in mb_chunks)
        total_tokens = world.all_sum(float(local_tokens))
        if total_tokens == 0:
            continue
        optimizer.zero_grad(set_to_none=True)
        for j, chunk in enumerate(mb_chunks):
            if not chunk:
                continue
            batch = common.to_device(pack_rollouts(chunk, pad_id), device)
            with common.autocast(device, precision):
                logp = token_logprobs(model, batch, temp)
                loss, s = dapo_loss(logp, old[u][j], batch["advantages"], batch["completion_mask"], total_tokens,
                                    config.eps_low, config.eps_high, refs[u][j], config.kl_coef)
            loss.backward()
            stats["loss"] += float(loss.detach())
            stats["clipped_tokens"] += s["clipped_tokens"]
            stats["tokens"] += s["tokens"]
        world.sum_gradients(model)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # ranks without a chunk in this mini-batch still join the step
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        stats["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    model.train(was_training)
    stats["loss"] = world.all_sum(stats["loss"]) / config.updates_per_batch
    clipped, tokens = world.all_sum(stats["clipped_tokens"]), world.all_sum(stats["tokens"])
    return {"loss": stats["loss"], "clip_fraction": clipped / max(tokens, 1.0), "completion_tokens": tokens,
            "grad_norm": stats["grad_norm"] / config.updates_per_batch}


# --------------------------------------------------------------------------------------------
# rollouts (the seam: any function with this signature can replace constrained decoding)

#: rollout_fn(model, tokenizer, prompt_texts (B), candidates (B, K) uint64, n, seeds (B), config, ctx)
#:   -> B lists of n completions, prompt by prompt; a completion is a token-id list (EOS included when
#:      the model stopped; scored under the full vocabulary) or a :class:`Completion` carrying the
#:      constraint it was sampled under. ``seeds[i]`` is prompt i's seed (see DapoTrainer.collect).
RolloutFn = Callable[[Any, Any, Sequence[str], np.ndarray, int, Sequence[int], DapoConfig, dict], list[list[Any]]]


def _vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def constrained_rollouts(model, tokenizer, prompt_texts, candidates, n, seeds, config, ctx) -> list[list[Completion]]:
    """G sampled completions per prompt through one ``gr2.constrained_decode`` call over all B
    prompts (always valid permutations), each prompt sampling from its own seeded generator; each
    completion carries the allowed ids behind its tokens (:func:`gr2.decoding.constraint_trace`),
    so the loss scores the distribution the tokens were drawn from."""
    from gr2 import constrained_decode
    from gr2.decoding import constraint_trace

    cands = np.asarray(candidates, dtype=np.uint64).reshape(len(prompt_texts), -1)
    results = constrained_decode(
        model, tokenizer, list(prompt_texts), cands, index=ctx["index"],
        sid_tokens=ctx["sid_tokens"], max_reasoning_tokens=config.max_reasoning_tokens, reasoning=config.reasoning,
        do_sample=True, temperature=config.temperature, top_p=config.top_p, num_return_sequences=n,
        seed=[int(x) for x in seeds], eos_token_id=ctx["eos_id"],
    )
    ids = [list(r.completion_ids) + [ctx["eos_id"]] for r in results]
    rows = np.repeat(np.arange(len(prompt_texts)), n)
    traces = constraint_trace(tokenizer, cands[rows], ids, _vocab_size(model), index=ctx["index"],
                              sid_tokens=ctx["sid_tokens"], max_reasoning_tokens=config.max_reasoning_tokens,
                              reasoning=config.reasoning, eos_token_id=ctx["eos_id"])
    done = [Completion(c, t) for c, t in zip(ids, traces)]
    return [done[i * n:(i + 1) * n] for i in range(len(prompt_texts))]


def sampled_rollouts(model, tokenizer, prompt_texts, candidates, n, seeds, config, ctx, greedy: bool = False) -> list[list[list[int]]]:
    """G completions per prompt by plain sampling (one left-padded ``generate`` call over all B
    prompts): outputs may be invalid, so the format reward matters -- the setting in which the paper
    observed the order-copy hack. ``greedy`` for evaluation. ``generate`` draws from one global
    generator, so the samples are a function of the seeds of the whole batch (torch is seeded with
    the one seed of a single prompt, with a hash of all of them otherwise)."""
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), ctx["pad_id"], dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):  # left padding: generation continues every row at the right edge
        ids[i, width - len(e):] = torch.as_tensor(e)
        attention[i, width - len(e):] = 1
    ids, attention = ids.to(ctx["device"]), attention.to(ctx["device"])
    seeds = [int(x) for x in seeds]
    torch.manual_seed(seeds[0] if len(seeds) == 1 else hash_seed(*seeds))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sampling = {} if greedy else {"temperature": config.temperature, "top_p": config.top_p, "top_k": 0}
            out = model.generate(ids, attention_mask=attention, do_sample=not greedy, **sampling,
                                 max_new_tokens=config.max_new_tokens, num_return_sequences=n,
                                 pad_token_id=ctx["pad_id"], eos_token_id=ctx["eos_id"])
    finally:
        model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():
        if ctx["eos_id"] in row:
            row = row[: row.index(ctx["eos_id"]) + 1]
        completions.append(row)
    return [completions[i * n:(i + 1) * n] for i in range(len(encoded))]


# --------------------------------------------------------------------------------------------
# data


@dataclass
class RlData:
    """Prompts (templated text and token ids), candidates in upstream order, targets."""

    prompt_texts: list[str]
    prompt_ids: list[list[int]]
    candidates: np.ndarray  # uint64 (n, K)
    targets: np.ndarray  # uint64 (n,)
    dropped_no_target: int = 0


def load_rl_data(run_dir: Path, split: str, tokenizer: Any, index: Any, config: DapoConfig, limit: int = 0) -> RlData:
    """Prompts of ``prompts/<split>`` (lists that contain their target), rendered with the run's
    :class:`gr2.prompts.PromptConfig` exactly as SFT traces and ``gr2 rerank`` render them."""
    from gr2.prompt_stage import load_prompt_config, load_requests
    from gr2.prompts import ItemCatalog, request_messages

    table = load_requests(run_dir, split)
    prompt_config = load_prompt_config(run_dir)
    catalog = ItemCatalog.from_run_dir(run_dir)
    cands = [np.asarray(c, dtype=np.int64) for c in table["candidates"]]
    k = len(cands[0]) if cands else 0
    if any(len(c) != k for c in cands):
        raise DataError(f"prompts/{split}: rows have different candidate counts")
    if config.k and k != config.k:
        raise ConfigError(f"rl.k = {config.k} but prompts/{split} has K = {k} candidates per row")
    targets = np.asarray(table["target"], dtype=np.int64)
    keep = [i for i in range(len(cands)) if targets[i] in cands[i]]
    dropped = len(cands) - len(keep)
    if limit:
        keep = keep[:limit]
    if not keep:
        raise DataError(f"prompts/{split}: no row has its target among the candidates")
    texts, ids = [], []
    for i in tqdm(keep, desc=f"rl prompts ({split})", leave=False):
        prompt = request_messages(table[i], prompt_config, catalog, index, reasoning=config.reasoning, tokenizer=tokenizer)
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        texts.append(text)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return RlData(texts, ids, np.stack([cands[i] for i in keep]).astype(np.uint64), targets[keep].astype(np.uint64), dropped)


# --------------------------------------------------------------------------------------------
# the trainer


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]  # this rank's kept rollouts (G per kept group)
    stats: dict[str, float]
    cursor: int  # prompts consumed so far (global)


class DapoTrainer:
    """Holds model, optimizer and data; :meth:`step` runs one rollout batch and its updates."""

    def __init__(self, model, tokenizer, data: RlData, config: DapoConfig, *, index=None, sid_tokens=None,
                 rollout_fn: RolloutFn | None = None, world: World = World(), out_dir: Path | None = None,
                 ref_model=None, device: torch.device | None = None, candidate_sids: np.ndarray | None = None):
        self.config, self.data, self.world = config, data, world
        if config.k and data.candidates.shape[1] != config.k:
            raise ConfigError(f"rl.k = {config.k} but the data has K = {data.candidates.shape[1]}")
        self.device = device or common.choose_device(config.device)
        self.precision = common.choose_dtype(self.device, config.dtype)  # compute dtype (autocast)
        self.tokenizer = tokenizer
        # float32 master weights whatever the compute dtype (bf16 parameters round small steps away)
        self.model = common.wrap_lora(model, config.lora).to(self.device, dtype=common.param_dtype(self.precision))
        self.ref_model = ref_model
        self.optimizer = common.make_optimizer(self.model, config.lr, config.weight_decay)
        updates = config.steps * config.updates_per_batch
        self.scheduler = common.make_scheduler(self.optimizer, updates, config.warmup_steps, kind="constant")
        self.rollout_fn = rollout_fn or (constrained_rollouts if config.constrained else sampled_rollouts)
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if index is None and candidate_sids is None:
            raise ConfigError("the DAPO trainer needs a SidIndex (index=) or the candidates' SIDs (candidate_sids=)")
        self.ctx = {"index": index, "sid_tokens": sid_tokens, "eos_id": int(eos), "pad_id": int(pad), "device": self.device,
                    "candidate_sids": candidate_sids}
        self.index, self.sid_tokens = index, sid_tokens
        self.step_count = 0
        self.cursor = 0  # prompts drawn so far, over all epochs
        self.out_dir = out_dir

    # -- data order: a pure function of (seed, position), so resume needs only the cursor
    def _prompt_at(self, position: int) -> int:
        n = len(self.data.targets)
        epoch, offset = divmod(position, n)
        return int(common.epoch_order(n, self.config.seed, epoch)[offset])

    def _rewards(self, completions: list[list[int]], rows: list[int]) -> RewardBatch:
        kwargs = dict(sid_tokens=self.sid_tokens, alpha=self.config.alpha, conditional=self.config.conditional,
                      invalid_reward=self.config.invalid_reward, trailer_ids=sorted({self.ctx["eos_id"], self.ctx["pad_id"]}))
        cands, targets = self.data.candidates[rows], self.data.targets[rows]
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
            per_call = cfg.rollout_batch or (max(len(mine), 1) if self.device.type == "cuda" else 1)
            for at in range(0, len(mine), per_call):
                chunk = mine[at:at + per_call]
                rows = [self._prompt_at(pos) for pos in chunk]
                seeds = [hash_seed(cfg.seed, self.step_count, pos) for pos in chunk]
                with common.autocast(self.device, self.precision):
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
        return RolloutBatch(kept, stats, self.cursor)

    def step(self) -> dict[str, float]:
        t0 = time.time()
        batch = self.collect()
        stats = dict(batch.stats)
        if batch.stats["kept_groups"] > 0:
            # ranks may hold zero kept rollouts; dapo_update still joins the collective calls
            stats.update(dapo_update(self.model, self.optimizer, self.scheduler, batch.rollouts, self.config,
                                     self.ctx["pad_id"], self.world, self.ref_model, self.device, self.precision))
        else:
            stats["skipped_update"] = 1.0
        self.step_count += 1
        stats["lr"] = self.scheduler.get_last_lr()[0]
        stats["seconds"] = time.time() - t0
        return stats

    # -- checkpoints: weights + optimizer + scheduler + RNG + step + data cursor
    def save(self, path: Path, key: str | None = None) -> None:
        if self.world.rank == 0:
            common.save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.step_count,
                                   extra={"cursor": self.cursor}, key=key)
        if self.world.distributed:
            torch.distributed.barrier()

    def load(self, path: Path) -> None:
        meta = common.load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.step_count = int(meta["step"])
        self.cursor = int(meta["extra"]["cursor"])


def hash_seed(*parts: int) -> int:
    """A 31-bit seed from integers (stable across processes, unlike Python's hash)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


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


def train(trainer: DapoTrainer, out_dir: Path, eval_data: RlData | None = None, resume: bool = True,
          key: str | None = None) -> dict[str, Any]:
    """The loop: resume from the newest checkpoint of this ``key`` (default: the hash of the
    trainer's config; the stage passes config + inputs), step, log, evaluate, checkpoint. A
    checkpoint of another key is never resumed (removed, one log line); the current config's lr
    applies on resume."""
    cfg = trainer.config
    key = key if key is not None else stage_key(cfg)
    ckpt_dir = out_dir / "checkpoints"
    checkpoints = common.Checkpointer(ckpt_dir, key, keep=cfg.keep_checkpoints, writer=trainer.world.rank == 0,
                                      name=out_dir.name)
    latest = checkpoints.latest() if resume else None
    if latest is not None:
        trainer.load(latest)
    logger = common.MetricLogger(out_dir, resume_step=trainer.step_count if latest else None,
                                 tensorboard=cfg.tensorboard) if trainer.world.rank == 0 else None
    last: dict[str, float] = {}
    try:
        if eval_data is not None and cfg.eval_every and trainer.step_count == 0 and logger:
            with common.autocast(trainer.device, trainer.precision):
                logger.log(0, **evaluate(trainer, eval_data))
        bar = tqdm(range(trainer.step_count, cfg.steps), desc="rl (dapo)", disable=trainer.world.rank != 0)
        for _ in bar:
            last = trainer.step()
            step = trainer.step_count
            if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and trainer.world.rank == 0:
                with common.autocast(trainer.device, trainer.precision):
                    last.update(evaluate(trainer, eval_data))
            if logger:
                logger.log(step, **last)
            bar.set_postfix(reward=f"{last.get('reward_mean', 0):.3f}", kept=f"{last.get('kept_share', 0):.2f}")
            if step % cfg.save_every == 0 or step == cfg.steps:
                trainer.save(ckpt_dir / common.checkpoint_name(step), key)
                if trainer.world.rank == 0:
                    common.prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
    finally:
        if logger:
            logger.close()
    return last


# --------------------------------------------------------------------------------------------
# the stage


def _start_model_dir(run_dir: Path, base: str, arm: str = "think") -> tuple[Path, str]:
    from gr2 import arms

    if base in ("sft", "midtrain"):
        stage = arms.stage_dir(base, arm)
        path = run_dir / stage / "model"
        if not path.exists():
            raise DataError(f"{path} is missing; run the `{base}` stage first")
        return path, stage
    if base == "auto":
        for stage in (arms.stage_dir("sft", arm), "midtrain"):
            if (run_dir / stage / "model").exists():
                return run_dir / stage / "model", stage
        raise DataError(f"neither {run_dir}/{arms.stage_dir('sft', arm)}/model nor {run_dir}/midtrain/model exists; "
                        "run sft (or midtrain) first")
    path = Path(base)
    if not path.exists():
        raise ConfigError(f"rl.base {base!r} is neither sft, midtrain, auto nor an existing model folder")
    return path, ""


def _stage_input_key(run_dir: Path, stage: str) -> str:
    record = read_stage(run_dir / stage)
    return record["key"] if record else "missing"


def build_trainer(run_dir: Path, config: DapoConfig, out_dir: Path, world: World,
                  arm: str = "think") -> tuple[DapoTrainer, RlData | None, dict]:
    """Load start model, index and data for the stage (shared by run_rl and the ablation)."""
    from gr2 import SidIndex
    from gr2.models import load_pretrained, sid_tokens_of

    common.seed_everything(config.seed)
    model_dir, base_stage = _start_model_dir(run_dir, config.base, arm)
    device = common.choose_device(config.device)
    dtype = common.choose_dtype(device, config.dtype)
    model, tokenizer = load_pretrained(model_dir, dtype=common.param_dtype(dtype))  # float32 master weights
    index = SidIndex.load(run_dir / "sid" / "index.gr2sid")
    sid_tokens = sid_tokens_of(tokenizer, index.level_sizes)
    data = load_rl_data(run_dir, "train", tokenizer, index, config, config.max_train_prompts)
    eval_data = None
    if config.eval_every:
        eval_data = load_rl_data(run_dir, "valid", tokenizer, index, config, config.eval_prompts)
    ref_model = None
    if config.kl_coef > 0:
        ref_model, _ = load_pretrained(model_dir, dtype=dtype)
        ref_model.to(device).eval().requires_grad_(False)
    trainer = DapoTrainer(model, tokenizer, data, config, index=index, sid_tokens=sid_tokens, world=world,
                          out_dir=out_dir, ref_model=ref_model, device=device)
    info = {"start_model": str(model_dir), "base_stage": base_stage, "train_prompts": len(data.targets),
            "dropped_no_target": data.dropped_no_target, "k": int(data.candidates.shape[1])}
    return trainer, eval_data, info


def run_rl(run_dir: str | os.PathLike, config: DapoConfig = DapoConfig(), *, arm: str = "think",
           force: bool = False) -> dict[str, Any]:
    """The ``rl`` stage of ``arm`` (:mod:`gr2.arms`): DAPO from sft/model (or midtrain/model) on
    prompts/train -> rl/model (``rl_answer/`` for the answer-only arm, which sets rl.reasoning off)."""
    from gr2 import arms
    from gr2.models import save_pretrained_atomic

    run_dir = Path(run_dir)
    if not arms.reasoning(arm):
        config = dataclasses.replace(config, reasoning=False, max_reasoning_tokens=0)
    elif not config.reasoning:
        raise ConfigError("rl.reasoning = false in the think arm; train answer-only with the `answer` arm "
                          "(run.arms = [\"answer\"] or `gr2 rl --arm answer`)")
    out_dir = run_dir / arms.stage_dir("rl", arm)
    key = stage_key(config, *_rl_inputs(run_dir, config, arm))
    if (done := begin_stage(out_dir, key, force=force)) is not None:
        return done
    world = init_world()
    trainer, eval_data, info = build_trainer(run_dir, config, out_dir, world, arm)
    last = train(trainer, out_dir, eval_data, key=key)
    summary = {**info, "arm": arm, "steps": trainer.step_count, "world_size": world.size,
               **{k: v for k, v in last.items() if isinstance(v, (int, float))}}
    if world.rank == 0:
        save_pretrained_atomic(trainer.model, trainer.tokenizer, out_dir / "model")
        atomic_write_json(out_dir / "summary.json", summary)
        mark_done(out_dir, key, summary, exclude=RERANK_OUTPUTS)
        common.Checkpointer(out_dir / "checkpoints", key).cleanup()
    return summary


def _rl_inputs(run_dir: Path, config: DapoConfig, arm: str = "think") -> list[str]:
    """The keys of what the rl stage reads: SID index, candidates, prompts, start model."""
    model_dir, base_stage = _start_model_dir(run_dir, config.base, arm)
    inputs = [_stage_input_key(run_dir, s) for s in ("sid", "candidates", "prompts")]
    inputs.append(_stage_input_key(run_dir, base_stage) if base_stage else str(model_dir))
    return inputs


# --------------------------------------------------------------------------------------------
# the reward ablation: conditional vs unconditional format reward from the same start model


def run_ablation(run_dir: str | os.PathLike, config: DapoConfig = DapoConfig()) -> dict[str, Any]:
    """Train twice from the same start model (conditional / unconditional format reward) with
    periodic greedy evaluation on candidates/valid; write rl_ablation/{ablation.json, ablation.png}.

    Note: with constrained rollouts every output is valid, so the unconditional format reward is a
    constant that the group normalisation cancels (that arm trains on R_rank alone), while the
    conditional one still pays alpha only for improving (or keeping a first-placed target). The
    paper's setting, where the format reward can be missed, is ``rl.constrained = false``.

    Result in that setting on the demo run (2026-11-25; model: the ``demo`` preset's tiny Llama,
    3 layers / hidden 192, trained from scratch, then SFT on heuristic-teacher traces; 2-core CPU):
    ``gr2 rl --ablation --run-dir runs/demo --config configs/rl_ablation_unconstrained.toml``
    (plain sampling, T = 1, no top-k/top-p, G = 4, 4 prompts/step, 8 steps, 128 new tokens, greedy
    evaluation on 32 valid lists every 2 steps; 16 min for both arms on the shared, loaded box). **No signal: the hack is not
    shown, and could not be.** The SFT model never produced a valid output without the constraint
    (rollout valid rate 0.000 in every step of both arms; greedy eval valid rate 0.000 at every
    point; the completions do not even open with ``<think>``), so every reward was -1, every group
    uniform, dynamic sampling kept no group and neither arm made a single update: order-copy rate,
    R@1 and NDCG@5 stay at 0 throughout in both arms (the upstream order of those 32 lists: R@1
    0.156, NDCG@5 0.423). Showing the hack needs a student that emits the format unconstrained
    often enough for copying the input order to be a reachable, rewarded behaviour."""
    run_dir = Path(run_dir)
    world = init_world()

    def make(cfg: DapoConfig, out_dir: Path) -> tuple[DapoTrainer, RlData | None]:
        trainer, eval_data, _ = build_trainer(run_dir, cfg, out_dir, world)
        return trainer, eval_data

    return ablation(make, config, run_dir / "rl_ablation", world, inputs=_rl_inputs(run_dir, config))


def ablation(make: Callable[[DapoConfig, Path], tuple[DapoTrainer, RlData | None]], config: DapoConfig, root: Path,
             world: World = World(), inputs: Sequence[str] = ()) -> dict[str, Any]:
    """The ablation loop given a trainer factory (``make(config, out_dir)``); both arms start from
    what ``make`` loads, with the same seed, prompts and evaluation set. Each arm is keyed by its
    config + ``inputs`` (the start model's, data's): a finished arm with the same key is not
    retrained, a checkpoint of another key is never resumed."""
    eval_every = config.eval_every or max(1, config.steps // 5)
    curves: dict[str, list[dict[str, float]]] = {}
    updates: dict[str, int] = {}
    valid: dict[str, float] = {}
    for name, conditional in (("conditional", True), ("unconditional", False)):
        cfg = dataclasses.replace(config, conditional=conditional, eval_every=eval_every)
        out_dir = root / name
        key = stage_key(cfg, *inputs)
        if begin_stage(out_dir, key) is None:
            trainer, eval_data = make(cfg, out_dir)
            if eval_data is None:
                raise DataError("the ablation needs an evaluation set (candidates/valid)")
            train(trainer, out_dir, eval_data, resume=True, key=key)
            if world.rank == 0:
                mark_done(out_dir, key, {"steps": trainer.step_count})
                common.Checkpointer(out_dir / "checkpoints", key).cleanup()
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        curves[name] = [r for r in rows if "eval_recall@1" in r]
        steps = [r for r in rows if "kept_groups" in r]
        updates[name] = sum(1 for r in steps if r["kept_groups"] > 0)
        valid[name] = sum(r["valid_rate"] for r in steps) / max(len(steps), 1)
    final = {n: c[-1] if c else {} for n, c in curves.items()}
    copy = {n: f.get("eval_copy_rate", float("nan")) for n, f in final.items()}
    if not any(updates.values()):
        verdict = ("no signal: no step of either arm kept a group (every group's outcome was uniform; mean rollout "
                   f"valid rate {valid['conditional']:.3f} / {valid['unconditional']:.3f}), so neither model changed")
    elif copy["unconditional"] > copy["conditional"]:
        verdict = "hack visible: higher order-copy rate under the unconditional reward"
    else:
        verdict = "hack not visible at this scale: the unconditional reward did not raise the order-copy rate"
    result = {"eval_every": eval_every, "steps": config.steps, "curves": curves, "final": final, "updates": updates,
              "rollout_valid_rate": valid, "verdict": verdict}
    if world.rank == 0:
        _plot_ablation(curves, root / "ablation.png")
        atomic_write_json(root / "ablation.json", result)
    return result


def _plot_ablation(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("eval_copy_rate", "eval_recall@1", "eval_ndcg@5"), ("order-copy rate", "R@1", "NDCG@5")):
        for name, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        if key != "eval_copy_rate" and curves.get("conditional"):
            ax.axhline(curves["conditional"][0][key.replace("eval_", "eval_pre_")], color="grey", linestyle=":",
                       label="pre-rank")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``gr2 rl``'s own flags (the common ones come from gr2.stages)."""
    parser.add_argument("--steps", type=int, help="override rl.steps")
    parser.add_argument("--unconditional", action="store_true", help="unconditional format reward (the hack)")
    parser.add_argument("--ablation", action="store_true",
                        help="conditional vs unconditional reward from the same start model; writes rl_ablation/")


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {} if args.steps is None else {"steps": args.steps}
    return {**values, "conditional": False} if args.unconditional else values


def main(args: argparse.Namespace, config: DapoConfig) -> int:
    if args.ablation:
        result = run_ablation(args.run_dir, config)
        print(json.dumps(result["final"], indent=2))
    else:
        print(json.dumps(run_rl(args.run_dir, config, arm=args.arm, force=args.force), indent=2))
    return 0
