"""How much signal one DAPO step carries: the gradient noise scale of the DAPO objective at a policy.

    # MovieLens: the SFT student of a run folder, the preset's [rl] settings
    python benches/bench_rl_signal.py --run-dir runs/ml100k_cpu --config python/gr2/presets/ml100k_cpu.toml
    # the planted evidence task from a noisy teacher's student (where DAPO learns: benches/README.md)
    python benches/bench_rl_signal.py --planted evidence

Why: on MovieLens no RL setting moved the training reward (benches/README.md, "RL settings on
MovieLens-100k"), while on the planted evidence task the same trainer reaches recall@1 0.97 in 200
steps. Both can be explained by how much of a step's gradient is signal. This bench collects
rollout groups exactly as training does (``DapoTrainer.collect``: the run's sampling, constraint,
reward and dynamic sampling) and computes, for each kept group i, the gradient g_i of the DAPO loss
at ratio 1 (old = new policy, the first mini-batch of a step) normalised by the group's completion
tokens -- so a step over B groups of equal length has gradient mean(g_i). From N groups:

* ``|G|^2``: the squared norm of the expected gradient, unbiased: (|sum g|^2 - sum |g|^2) / (N (N - 1));
* ``tr(S)``: the total variance of one group's gradient: (sum |g|^2 - |sum g|^2 / N) / (N - 1);
* ``B_noise = tr(S) / |G|^2`` (McCandlish et al. 2018, "An Empirical Model of Large-Batch
  Training"): the number of groups a step needs before its gradient is more signal than noise.
  A step of B groups has signal-to-noise ratio |G|^2 / (tr(S) / B) = B / B_noise;
* a standard error on |G|^2 (jackknife over 8 chunks of groups), and the B_noise range it gives.

No weights change: the policy is measured, not trained. One torch thread by default.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from gr2.config import apply_overrides, from_dict, load_toml
from gr2.train.batches import to_device
from gr2.train.distributed import World
from gr2.train.dapo import DapoConfig, DapoTrainer
from gr2.train.dapo.loss import dapo_loss, pack, token_logprobs


def group_gradient(trainer: DapoTrainer, group: list, params: list[torch.Tensor]) -> torch.Tensor:
    """The flattened gradient of one group's DAPO loss at ratio 1, over its own completion tokens."""
    cfg = trainer.config
    batch = to_device(pack(group, trainer.ctx["pad_id"], cfg.share_prompt), trainer.device)
    logp = token_logprobs(trainer.model, batch, cfg.temperature)
    tokens = float(sum(len(r.completion_ids) for r in group))
    loss, _ = dapo_loss(logp, logp.detach(), batch["advantages"], batch["completion_mask"], tokens,
                        cfg.eps_low, cfg.eps_high)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def noise_scale(trainer: DapoTrainer, n_groups: int, chunks: int = 8, log_every: int = 64) -> dict[str, float]:
    """Collect ``n_groups`` kept groups and return the gradient statistics of the module docstring.

    The groups are dealt round-robin into ``chunks`` chunks whose gradient sums are kept: every
    pair of distinct chunks gives an unbiased estimate of |G|^2 (c_m . c_n / (n_m n_n)), and the
    leave-one-chunk-out (jackknife) spread of their mean gives its standard error."""
    g_size = trainer.config.group_size
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.model.eval()  # dropout off, as dapo_update does
    sums = torch.zeros(chunks, sum(p.numel() for p in params), dtype=torch.float64)
    counts = np.zeros(chunks)
    sum_sq, n, rewards, generated, t0 = 0.0, 0, [], 0, time.perf_counter()
    while n < n_groups:
        batch = trainer.collect()
        generated += batch.stats["generated_groups"]
        for at in range(0, len(batch.rollouts), g_size):
            if n == n_groups:
                break
            group = batch.rollouts[at:at + g_size]
            g = group_gradient(trainer, group, params)
            sums[n % chunks] += g
            counts[n % chunks] += 1
            sum_sq += float(g @ g)
            rewards.extend(r.reward for r in group)
            n += 1
            if n % log_every == 0:
                print(f"  {n} groups, {time.perf_counter() - t0:.0f} s", flush=True)
    gram = (sums @ sums.T).numpy() / np.outer(counts, counts)  # chunk-mean inner products
    pairs = ~np.eye(chunks, dtype=bool)

    def signal(keep: np.ndarray) -> float:  # mean over distinct pairs of the kept chunks
        mask = pairs & np.outer(keep, keep)
        return float(gram[mask].mean())

    expected_sq = signal(np.ones(chunks, dtype=bool))
    loo = np.array([signal(np.arange(chunks) != m) for m in range(chunks)])
    se = float(np.sqrt((chunks - 1) / chunks * ((loo - loo.mean()) ** 2).sum()))
    total = sums.sum(0)
    trace = (sum_sq - float(total @ total) / n) / (n - 1)
    b_noise = lambda sq: trace / sq if sq > 0 else float("inf")  # noqa: E731
    return {"groups": n, "group_size": g_size, "kept_share": n / max(generated, 1),
            "mean_reward": float(np.mean(rewards)), "reward_sd": float(np.std(rewards)),
            "expected_grad_sq": expected_sq, "expected_grad_sq_se": se, "grad_variance_trace": trace,
            "b_noise_groups": b_noise(expected_sq),
            "b_noise_groups_range_2se": [b_noise(expected_sq + 2 * se), b_noise(expected_sq - 2 * se)],
            "seconds": time.perf_counter() - t0}


def movielens_trainer(args) -> DapoTrainer:
    from gr2.pipeline.rl import build_trainer

    table = load_toml(args.config).get("rl", {})
    table = apply_overrides({**table, "eval_every": 0, "select": "last", "tensorboard": False, "device": "cpu"}, args.set)
    if args.arm == "answer":
        table.update(reasoning=False, max_reasoning_tokens=0)
    trainer, _, info = build_trainer(Path(args.run_dir), from_dict(DapoConfig, table, where="rl"), World(),
                                     args.arm)
    print(f"start model {info['start_model']}, {info['train_prompts']} train prompts", flush=True)
    return trainer


def planted_trainer(args) -> DapoTrainer:
    """The noisy teacher's student of benches/README.md ("RL learns the evidence rule from a noisy
    teacher's student"): 300 decision-token SFT steps on traces right on 30% of the lists."""
    from gr2 import synthetic as S

    task = S.make_planted_task(600, rule=args.planted, seed=args.seed)
    tokenizer, sid_tokens = S.make_tokenizer(task)
    model = S.make_model(tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=args.seed)
    rows = range(500)
    start = S.sft_examples(task, tokenizer, rows, teacher="target", accuracy=0.3, loss_tokens="decisions",
                           seed=args.seed)
    S.sft_train(model, start, tokenizer.pad_token_id, steps=300, batch_size=16, lr=3e-3)
    table = apply_overrides({"group_size": 8, "prompts_per_step": 4, "lr": 1e-3, "reasoning": False,
                             "max_reasoning_tokens": 0, "device": "cpu", "tensorboard": False,
                             "max_generation_rounds": 1, "rollout_batch": 4, "seed": args.seed}, args.set)
    config = from_dict(DapoConfig, table, where="rl")
    return DapoTrainer(model, tokenizer, S.rl_data(task, tokenizer, rows), config, index=task.index,
                       sid_tokens=sid_tokens, device=torch.device("cpu"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", help="a run folder with the start model (sft_answer/model for --arm answer)")
    p.add_argument("--config", help="the run's preset/config TOML (its [rl] table)")
    p.add_argument("--arm", default="answer", choices=("answer", "think"))
    p.add_argument("--planted", choices=("evidence", "last_item"), help="measure the planted task's noisy start instead")
    p.add_argument("--groups", type=int, default=512, help="kept rollout groups to measure")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an [rl] setting")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result JSON here")
    args = p.parse_args()
    if not args.planted and not (args.run_dir and args.config):
        p.error("give --run-dir and --config, or --planted")
    torch.set_num_threads(args.threads)
    trainer = planted_trainer(args) if args.planted else movielens_trainer(args)
    result = noise_scale(trainer, args.groups)
    cfg = trainer.config
    result.update(task=f"planted {args.planted}" if args.planted else f"{args.run_dir} ({args.arm})",
                  prompts_per_step=cfg.prompts_per_step, reward=cfg.reward, temperature=cfg.temperature,
                  step_snr=cfg.prompts_per_step / result["b_noise_groups"], train_prompts=len(trainer.data.targets),
                  machine=platform.processor() or platform.machine(), threads=args.threads)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
