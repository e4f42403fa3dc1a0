"""Seconds per DAPO step: today's per-rollout step against gr2's shared-prompt, jump-forward step,
in the same run, on a preset's model and RL settings.

    python benches/bench_rl_step.py [--preset ml100k_cpu] [--steps 4] [--threads 2] [--history 3] [--set rollout_batch=8]

* **Model and settings** come from the preset: its ``midtrain.base_model`` must be ``demo`` (the
  from-scratch Llama, sized by ``gr2.models.DemoModelConfig``), and its ``[rl]`` table gives G,
  prompts per step, lr, the reasoning budget and the arm (the first of ``arms``; ``answer`` turns
  reasoning off as the rl stage does). Dynamic sampling is off so every step does the same work.
* **Prompts** are the planted ``evidence`` task (:mod:`gr2.synthetic`) at the preset's K, with
  ``--history`` items, through the package's one prompt builder, 4 SID levels (64 x 256 x 256 x 256
  codes); the policy is the randomly initialised demo model. Under constrained decoding every
  completion is a valid list, so an answer-only completion has the same length as a trained
  model's (K x 6 + 3 tokens); a think-mode one runs to the budget.
* **Paths**, alternated step by step so both see the same machine load:
  ``before`` = the step as it was: ``rl.share_prompt = false`` (each rollout re-encodes its
  prompt in the loss), ``rl.jump_forward = false`` (a decode step per forced token),
  ``rl.rollout_batch = 1`` (the old CPU default: one prompt per decoding call), plus the separate
  no-grad old-log-prob pass the trainer ran before ``dapo_update`` reused the first mini-batch's
  log-probs (timed here); ``after`` = today's defaults (one decoding call for all the step's
  prompts). ``--set`` overrides either.
* **Phases**: rollout (decode + rewards + grouping), log-probs (old-policy pass), loss + backward,
  optimizer (gradient clip + AdamW step). Tokens per second count every token a forward pass
  processes; the FLOP line is 2 x parameters x forward tokens (x 3 with backward) for each path's
  own work.

Prints one JSON object per path and the before/after ratio of seconds per step.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from gr2 import synthetic
from gr2.config import apply_overrides, from_dict, load_toml
from gr2.models import DemoModelConfig, build_demo_model
from gr2.pipeline import preset_path
from gr2.train.dapo import DapoConfig, DapoTrainer, dapo_update, pack_rollouts, token_logprobs

LEVEL_SIZES = (64, 256, 256, 256)


#: path -> ([rl] settings, whether the trainer ran a separate old-log-prob pass)
PATHS = {"before": ({"share_prompt": False, "jump_forward": False, "rollout_batch": 1}, True), "after": ({}, False)}


def rl_config(preset: dict, path: dict, overrides: list[str]) -> DapoConfig:
    table = dict(preset.get("rl", {}))
    reasoning = (preset.get("arms") or ["think"])[0] != "answer"
    table.update(device="cpu", tensorboard=False, eval_every=0, dynamic_sampling=False, reasoning=reasoning, **path)
    table = apply_overrides(table, overrides)
    if not reasoning:
        table["max_reasoning_tokens"] = 0
    return from_dict(DapoConfig, table, where="rl")


def demo_model_config(preset: dict) -> DemoModelConfig:
    base = preset.get("midtrain", {}).get("base_model", "demo")
    if base != "demo":
        raise SystemExit(f"this bench builds the preset's model from its config; midtrain.base_model = {base!r} is not 'demo'")
    return DemoModelConfig()


def step_work(rollouts, share: bool, separate_old_pass: bool) -> dict[str, int]:
    """Tokens each phase's forward passes process for one step's kept rollouts."""
    prompts = {tuple(r.prompt_ids) for r in rollouts}
    prompt_once = sum(len(p) for p in prompts)
    prompt_each = sum(len(r.prompt_ids) for r in rollouts)
    completions = sum(len(r.completion_ids) for r in rollouts)
    loss = (prompt_once if share else prompt_each) + completions
    return {"rollout": prompt_once + completions, "logprobs": loss if separate_old_pass else 0, "loss_backward": loss}


def run_step(trainer: DapoTrainer, separate_old_pass: bool) -> tuple[dict[str, float], dict[str, int]]:
    cfg = trainer.config
    t0 = time.perf_counter()
    batch = trainer.collect()
    seconds = {"rollout": time.perf_counter() - t0, "logprobs": 0.0}
    if separate_old_pass:  # the pass the trainer ran before dapo_update reused the new log-probs
        t0 = time.perf_counter()
        with torch.no_grad():
            token_logprobs(trainer.model.eval(), pack_rollouts(batch.rollouts, trainer.ctx["pad_id"]), cfg.temperature)
        seconds["logprobs"] = time.perf_counter() - t0
    stats = dapo_update(trainer.model, trainer.optimizer, trainer.scheduler, batch.rollouts, cfg, trainer.ctx["pad_id"])
    trainer.step_count += 1
    seconds["logprobs"] += stats["seconds_logprobs"]
    seconds.update(loss_backward=stats["seconds_loss_backward"], optimizer=stats["seconds_optimizer"])
    return seconds, step_work(batch.rollouts, cfg.share_prompt, separate_old_pass)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="ml100k_cpu")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per path (after one warm-up step each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--history", type=int, default=3, help="history items per prompt (3: ~300-token prompts, as ml100k_cpu's)")
    ap.add_argument("--lists", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an [rl] key for both paths (e.g. rollout_batch=8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    preset = load_toml(preset_path(args.preset))
    k = int(preset.get("candidates", {}).get("k", 10))
    task = synthetic.make_planted_task(args.lists, k=k, history_len=args.history, n_items=1024,
                                       level_sizes=LEVEL_SIZES, rule="evidence", seed=0)
    tokenizer, sid_tokens = synthetic.make_tokenizer(task, vocab_size=2000)
    model = build_demo_model(tokenizer, demo_model_config(preset))
    data = synthetic.rl_data(task, tokenizer, range(args.lists))
    params = sum(p.numel() for p in model.parameters())
    trainers = {}
    for name, (path, _) in PATHS.items():
        config = rl_config(preset, path, args.set)
        trainers[name] = DapoTrainer(copy.deepcopy(model), tokenizer, data, config, index=task.index,
                                     sid_tokens=sid_tokens, device=torch.device("cpu"))
    runs: dict[str, list] = {name: [] for name in PATHS}
    for step in range(args.steps + 1):
        for name, (_, separate) in PATHS.items():
            seconds, work = run_step(trainers[name], separate)
            if step > 0:  # the first step of each path warms up
                runs[name].append((seconds, work))
    cfg = trainers["after"].config
    summary = {"preset": args.preset, "model": f"demo Llama {DemoModelConfig().num_layers} layers, hidden "
               f"{DemoModelConfig().hidden_size}, {params / 1e6:.2f}M parameters, vocab {len(tokenizer)}",
               "k": k, "group_size": cfg.group_size, "prompts_per_step": cfg.prompts_per_step,
               "reasoning": cfg.reasoning, "max_reasoning_tokens": cfg.max_reasoning_tokens,
               "mean_prompt_tokens": round(float(np.mean([len(p) for p in data.prompt_ids])), 1),
               "threads": args.threads, "steps": args.steps, "overrides": args.set, "cpu": platform.processor() or platform.machine()}
    print(json.dumps(summary))
    mean_step = {}
    for name, rows in runs.items():
        phases = {p: float(np.mean([s[p] for s, _ in rows])) for p in ("rollout", "logprobs", "loss_backward", "optimizer")}
        tokens = {p: float(np.mean([w[p] for _, w in rows])) for p in ("rollout", "logprobs", "loss_backward")}
        total = sum(phases.values())
        mean_step[name] = total
        forward_tokens = tokens["rollout"] + tokens["logprobs"]
        flops = 2 * params * forward_tokens + 6 * params * tokens["loss_backward"]
        print(json.dumps({"path": name, "seconds_per_step": round(total, 3),
                          **{f"seconds_{p}": round(v, 3) for p, v in phases.items()},
                          **{f"tokens_{p}": int(v) for p, v in tokens.items()},
                          "tokens_per_second": round((forward_tokens + tokens["loss_backward"]) / total, 1),
                          "gflop_per_step": round(flops / 1e9, 2), "gflop_per_second": round(flops / 1e9 / total, 2)}))
    print(json.dumps({"speedup_before_over_after": round(mean_step["before"] / mean_step["after"], 2)}))


if __name__ == "__main__":
    main()
