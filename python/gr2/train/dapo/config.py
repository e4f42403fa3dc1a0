"""The ``[rl]`` table: :class:`DapoConfig` and its validation (every bad value is a ConfigError
naming the key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from gr2.errors import ConfigError
from gr2.train.optim import LoraSettings

OUTCOMES = ("r_rank", "hit@1", "rank_re")
REWARDS = ("rank", "ndcg", "auc")
SELECTIONS = ("last", "recall@1", "ndcg@5")


@dataclass
class DapoConfig:
    """Configuration of the ``rl`` stage (TOML table ``[rl]``)."""

    # settings that do not change the weights a step produces: a run resumes its checkpoints across them
    NOT_IN_CHECKPOINT_KEY: ClassVar[tuple[str, ...]] = ("eval_every", "eval_prompts", "select", "save_every",
                                                       "keep_checkpoints", "tensorboard")

    base: str = "auto"  # start model: "sft", "midtrain", "auto" (sft if present) or a model folder
    k: int = 0  # expected candidates per request; 0 = take it from the data (mismatch -> ConfigError)
    group_size: int = 4  # G rollouts per prompt
    prompts_per_step: int = 4  # groups per rollout batch (after dynamic sampling)
    steps: int = 20  # rollout batches
    max_generation_rounds: int = 3  # cap on dynamic-sampling refills per step
    dynamic_sampling: bool = True
    outcome: str = "r_rank"  # what must vary within a group to keep it: r_rank | hit@1 | rank_re
    # rewards (docs/DESIGN.md §1)
    # "rank": the paper's R_rank = (rank_pre - rank_re) / K, linear in the target's rank (+ the format
    # reward); "ndcg": the target's NDCG gain (gr2.eval.metrics), top-weighted; "auc": the share of
    # negatives ranked below the target. ndcg/auc are zeroed for copying a non-optimal input order.
    reward: str = "rank"
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
    # encode each prompt once per group in the loss (its G completions attend to its cached keys and
    # values) instead of once per rollout: same gradient, ~G x fewer prompt tokens (benches/bench_rl_step.py)
    share_prompt: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)
    # rollouts
    constrained: bool = True  # constrained_decode (always valid) or plain sampling with generate()
    reasoning: bool = True
    max_reasoning_tokens: int = 64
    max_new_tokens: int = 256  # unconstrained sampling only
    jump_forward: bool = True  # forced tokens cost no decode step (same samples as step-by-step decoding)
    rollout_batch: int = 0  # prompts per rollout call (G completions each); 0 = auto: all of the round's prompts
    temperature: float = 1.0
    top_p: float = 1.0
    max_train_prompts: int = 0  # 0 = all of prompts/train
    # evaluation on candidates/valid (greedy) for R@1 / NDCG@5 against step
    eval_every: int = 0
    eval_prompts: int = 64  # 0 = every validation list
    # which policy rl/model holds: the last step's, or the one with the best validation recall@1 /
    # ndcg@5 among the evaluations (the start model, step 0, included); needs eval_every > 0
    select: str = "last"
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
        if self.reward not in REWARDS:
            raise ConfigError(f"rl.reward must be one of {REWARDS}, got {self.reward!r}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"rl.select must be one of {SELECTIONS}, got {self.select!r}")
        if self.select != "last" and self.eval_every < 1:
            raise ConfigError(f"rl.select = {self.select!r} picks the best validation checkpoint; set rl.eval_every > 0")
        if self.eval_every < 0 or self.eval_prompts < 0:
            raise ConfigError("rl.eval_every and rl.eval_prompts must be >= 0 (eval_prompts 0 = every validation list)")
        if self.outcome not in OUTCOMES:
            raise ConfigError(f"rl.outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        for name in ("prompts_per_step", "steps", "max_generation_rounds", "updates_per_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_prompts < 0:
            raise ConfigError(f"rl.max_train_prompts must be >= 0 (0 = every training prompt), got {self.max_train_prompts}")
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
