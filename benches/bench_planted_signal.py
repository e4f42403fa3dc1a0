"""Planted-signal learning curves: gr2 SFT, gr2 DAPO and TRL's GRPOTrainer (loss_type="dapo") on
the same tiny model, task, group size and reward, side by side in one run.

Task: :func:`gr2.synthetic.make_planted_task` (K = 10, random upstream order: recall@1 = 0.1);
``--rule last_item`` (the target shares the level-a code of the last history item), ``evidence``
(the target leads the prompt's evidence line: the student must copy from its prompt, as the
MovieLens prompts ask) or ``prior`` (the target carries one of 2 favoured level-a codes). Weak
start: a tiny Llama (default 2 layers, hidden 64) trained from scratch for ``--start-steps`` SFT
steps on the traces of a *noisy* teacher that ranks the target first on ``--start-accuracy`` of the
lists and writes the upstream order on the others (default 0: format traces only). Greedy decoding
follows the majority, so such a start sits at chance, but sampling sometimes puts the target
first -- the position of the MovieLens SFT student, distilled from an imperfect teacher. SFT (the
weak start and the SFT arm) puts its loss on ``--loss-tokens`` (default ``decisions``: only where
constrained decoding has a choice, ``sft.loss_tokens``).
From that start, each arm for ``--steps`` steps (or until ``--max-seconds`` of training time):

* ``gr2 sft``  -- more SFT, on a teacher right on ``--sft-accuracy`` of the lists (1: the perfect
  teacher; ``--start-accuracy``: the SFT baseline RL has to pass), gr2.train.losses.weighted_nll;
* ``gr2 rl``   -- gr2.train.dapo.DapoTrainer, rollouts by constrained decoding (always valid);
* ``gr2-zero`` -- the same with every advantage zeroed: a control that must not learn;
* ``trl grpo`` -- trl.GRPOTrainer(loss_type="dapo", beta=0, eps 0.2 / 0.28, scale_rewards="group"),
  rollouts by ``generate`` with gr2's constraint plugged in (``--trl-generation constrained``, the
  default: :class:`gr2.decoding.RerankLogitsProcessor` per row, so every completion is a valid list,
  as gr2's are) or unconstrained (``free``: invalid outputs get -1, and a weak start that cannot yet
  copy ten SIDs never gets a valid one); reward = the same gr2.verify_rewards reward (conditional,
  alpha 0.2) on the decoded completion text.

Both RL arms: G = ``--group`` completions per prompt, ``--prompts`` prompts per step, the same lr,
temperature 1, one optimizer step per rollout batch, answer-only. Every ``--eval-every`` steps the
greedy recall@1 on held-out lists is measured the same way for every arm (greedy
``gr2.constrained_decode``, scored by gr2.eval.metrics); evaluation time is excluded from the
wall-clock. Prints the curves, the ratio "gr2 wall-clock to reach TRL's final reward / TRL's
wall-clock", and writes ``curves.png`` and ``curves.json`` under ``--out``.

    PYTHONPATH=python python benches/bench_planted_signal.py --rule prior --steps 40
    PYTHONPATH=python python benches/bench_planted_signal.py --rule evidence --lists 2100 --start-steps 400 \
        --start-batch 16 --start-accuracy 0.3 --sft-accuracy 0.3 --sft-batch 16 --sft-lr 3e-3 \
        --arms sft,gr2,gr2-zero --group 8 --prompts 8 --lr 1e-3 --steps 300 --sft-steps 300 --eval-every 25
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from gr2 import synthetic as S
from gr2.rewards import verify_rewards
from gr2.rundir import save_png


def smooth(values, n=5):
    v = np.asarray(values, dtype=np.float64)
    return np.array([v[max(0, i - n + 1):i + 1].mean() for i in range(len(v))])


class Clock:
    """Training wall-clock with evaluation time excluded."""

    def __init__(self):
        self.t0, self.paused = time.perf_counter(), 0.0

    def now(self):
        return time.perf_counter() - self.t0 - self.paused

    def evaluate(self, fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.paused += time.perf_counter() - t


def run_sft(args, task, tokenizer, start_model, heldout, train_rows):
    model = fresh(start_model)
    examples = S.sft_examples(task, tokenizer, train_rows, accuracy=args.sft_accuracy, loss_tokens=args.loss_tokens,
                              seed=args.seed)
    clock, curve = Clock(), []
    r1 = lambda: S.greedy_recall_at_1(model, tokenizer, task, heldout)  # noqa: E731
    curve.append({"step": 0, "seconds": 0.0, "recall@1": clock.evaluate(r1)})

    def on_step(step, loss):
        if step % args.eval_every == 0:
            curve.append({"step": step, "seconds": clock.now(), "loss": loss, "recall@1": clock.evaluate(r1)})

    chunk = args.eval_every
    for start in range(0, args.sft_steps, chunk):
        if clock.now() > args.max_seconds:
            break
        S.sft_train(model, examples, tokenizer.pad_token_id, steps=chunk, batch_size=args.sft_batch, lr=args.sft_lr,
                    seed=start, on_step=lambda s, loss: on_step(start + s, loss))
    return curve


def run_gr2_rl(args, task, tokenizer, sid_tokens, start_model, heldout, train_rows, zero_advantage=False):
    from gr2.train.dapo import DapoConfig, DapoTrainer
    from gr2.train.dapo import trainer as dapo_trainer

    honest = dapo_trainer.group_advantages
    if zero_advantage:  # the control: same rollouts, rewards and loss, no signal in the gradient
        dapo_trainer.group_advantages = lambda rewards, std_eps=1e-6: 0.0 * honest(rewards, std_eps)
    try:
        return _gr2_rl_curve(args, task, tokenizer, sid_tokens, start_model, heldout, train_rows,
                             "gr2 rl (advantage 0)" if zero_advantage else "gr2 rl")
    finally:
        dapo_trainer.group_advantages = honest


def _gr2_rl_curve(args, task, tokenizer, sid_tokens, start_model, heldout, train_rows, name):
    from gr2.train.dapo import DapoConfig, DapoTrainer

    model = fresh(start_model)
    config = DapoConfig(group_size=args.group, prompts_per_step=args.prompts, steps=args.steps, lr=args.lr,
                        reasoning=False, max_reasoning_tokens=0, device=args.device, tensorboard=False, rollout_batch=args.prompts,
                        max_generation_rounds=1, seed=args.seed, reward=args.reward, kl_coef=args.kl)
    trainer = DapoTrainer(model, tokenizer, S.rl_data(task, tokenizer, train_rows), config, index=task.index,
                          sid_tokens=sid_tokens, device=torch.device(args.device))
    clock, curve = Clock(), []
    r1 = lambda: S.greedy_recall_at_1(model, tokenizer, task, heldout)  # noqa: E731
    curve.append({"step": 0, "seconds": 0.0, "recall@1": clock.evaluate(r1)})
    for step in range(1, args.steps + 1):
        stats = trainer.step()
        row = {"step": step, "seconds": clock.now(), "reward": stats["reward_mean"], "valid": stats["valid_rate"]}
        if step % args.eval_every == 0 or step == args.steps:
            row["recall@1"] = clock.evaluate(r1)
            print(f"  {name} step {step:5d}  {row['seconds']:6.1f} s  reward {row['reward']:6.3f}  "
                  f"held-out R@1 {row['recall@1']:.3f}", flush=True)
        curve.append(row)
        if clock.now() > args.max_seconds:
            break
    return curve


def run_ablation(args, task, tokenizer, sid_tokens, start_model, heldout, train_rows):
    """`gr2 rl --ablation`'s loop (gr2.train.dapo.ablation) on the planted task, rollouts and
    evaluation unconstrained: the conditional vs the unconditional format reward from the same start."""
    from gr2.train.dapo import DapoConfig, DapoTrainer
    from gr2.train.dapo.ablation import ablation

    config = DapoConfig(group_size=args.group, prompts_per_step=args.prompts, steps=args.steps, lr=args.lr,
                        reasoning=False, max_reasoning_tokens=0, device=args.device, tensorboard=False,
                        rollout_batch=args.prompts, max_generation_rounds=1, seed=args.seed, reward=args.reward,
                        kl_coef=args.kl, constrained=False, max_new_tokens=args.max_completion,
                        eval_every=args.eval_every, save_every=args.steps)

    def make(cfg, out_dir):
        model = fresh(start_model)
        trainer = DapoTrainer(model, tokenizer, S.rl_data(task, tokenizer, train_rows), cfg, index=task.index,
                              sid_tokens=sid_tokens, device=torch.device(args.device))
        return trainer, S.rl_data(task, tokenizer, heldout)

    result = ablation(make, config, Path(args.out) / "ablation")
    print(json.dumps(result, indent=1, default=str), flush=True)


def run_trl(args, task, tokenizer, start_model, heldout, train_rows):
    import datasets
    from transformers import TrainerCallback

    try:
        import trl
    except ImportError as e:  # the peer is optional: say how to get it instead of skipping silently
        raise SystemExit("this benchmark runs TRL's GRPOTrainer side by side: pip install trl==1.16.0 "
                         "(the version measured in benches/README.md)") from e

    model = fresh(start_model)
    if args.trl_generation == "constrained":
        constrain_generate(model, tokenizer, task)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, im_end]  # the SFT'd turn ends with <|im_end|>
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    rows = list(train_rows)
    order = np.random.default_rng(args.seed).permutation(np.repeat(rows, max(1, args.steps * args.prompts // len(rows) + 1)))
    dataset = datasets.Dataset.from_dict({"prompt": [task.prompt_text(tokenizer, int(r)) for r in order],
                                          "row": [int(r) for r in order]})

    def reward(prompts, completions, row, **_):
        rb = verify_rewards(list(completions), task.candidates[row], task.targets[row], task.index, alpha=0.2,
                            conditional=True, invalid_reward=-1.0)
        return rb.reward.tolist()

    clock, curve = Clock(), []
    r1 = lambda: S.greedy_recall_at_1(model, tokenizer, task, heldout)  # noqa: E731

    class Log(TrainerCallback):
        def on_log(self, targs, tstate, control, logs=None, **kw):
            if logs and "reward" in logs:
                step = int(tstate.global_step)
                row = {"step": step, "seconds": clock.now(), "reward": float(logs["reward"])}
                if step % args.eval_every == 0 or step == args.steps:
                    row["recall@1"] = clock.evaluate(r1)
                curve.append(row)
                if clock.now() > args.max_seconds:
                    control.should_training_stop = True

    config = trl.GRPOConfig(
        output_dir=str(Path(args.out) / "trl"), loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28,
        scale_rewards="group", num_generations=args.group, per_device_train_batch_size=args.group * args.prompts,
        gradient_accumulation_steps=1, num_iterations=1, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        max_completion_length=args.max_completion, temperature=1.0, top_k=0, top_p=1.0, max_steps=args.steps,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=args.device == "cpu", seed=args.seed, shuffle_dataset=False,
        disable_tqdm=True,
    )
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Log()])
    curve.append({"step": 0, "seconds": 0.0, "recall@1": clock.evaluate(r1)})
    clock.t0, clock.paused = time.perf_counter(), 0.0
    trainer.train()
    return curve


def constrain_generate(model, tokenizer, task):
    """Plug gr2's constraint into TRL's sampling: TRL calls ``model.generate``; this wraps it so
    every row carries :class:`gr2.decoding.RerankLogitsProcessor` over its own prompt's candidates
    (answer-only, like gr2's rollouts), so TRL's completions are valid lists and its rewards carry
    the ranking signal. TRL's loss still scores them under the unconstrained policy."""
    from transformers import LogitsProcessorList

    from gr2.decoding import RerankLogitsProcessor

    texts = {task.prompt_text(tokenizer, r): r for r in range(len(task))}
    original = model.generate

    def generate(input_ids=None, attention_mask=None, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            text = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
            if text not in texts:
                raise RuntimeError(f"TRL generated for a prompt that is not one of the task's: {text[:80]!r}")
            rows.append(texts[text])
        processor = RerankLogitsProcessor(tokenizer, task.candidates[rows], index=task.index, reasoning=False,
                                          max_reasoning_tokens=0)
        return original(input_ids=input_ids, attention_mask=attention_mask,
                        logits_processor=LogitsProcessorList([processor]), **kwargs)

    model.generate = generate


def new_student(args, task):
    """(model, tokenizer, sid_tokens): the from-scratch tiny Llama (``--base demo``) or a pretrained
    base extended with the SID vocabulary (``--base smollm2`` or an HF folder), on ``--device``."""
    if args.base == "demo":
        tokenizer, sid_tokens = S.make_tokenizer(task)
        model = S.make_model(tokenizer, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                             seed=args.seed)
    else:
        model, tokenizer, sid_tokens = S.pretrained_student(task, args.base)
    return model.to(args.device), tokenizer, sid_tokens


def fresh(start_model):
    """A copy of the weak-start model, so every arm starts from the same weights."""
    import copy

    return copy.deepcopy(start_model)


def reach_time(curve, level, n=5):
    """Training seconds at which the smoothed reward first reaches ``level`` (None: never)."""
    rows = [r for r in curve if "reward" in r]
    sm = smooth([r["reward"] for r in rows], n)
    hit = np.nonzero(sm >= level)[0]
    return rows[int(hit[0])]["seconds"] if hit.size else None


def plot(curves, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for (name, curve), color in zip(curves.items(), ("tab:green", "tab:blue", "tab:grey", "tab:orange")):
        rew = [r for r in curve if "reward" in r]
        ev = [r for r in curve if "recall@1" in r]
        if rew:
            axes[0, 0].plot([r["step"] for r in rew], smooth([r["reward"] for r in rew]), label=name, color=color)
            axes[0, 1].plot([r["seconds"] for r in rew], smooth([r["reward"] for r in rew]), label=name, color=color)
        axes[1, 0].plot([r["step"] for r in ev], [r["recall@1"] for r in ev], marker="o", label=name, color=color)
        axes[1, 1].plot([r["seconds"] for r in ev], [r["recall@1"] for r in ev], marker="o", label=name, color=color)
    for ax, (y, x) in zip(axes.flat, [("reward (5-step mean)", "step"), ("reward (5-step mean)", "train seconds"),
                                      ("greedy recall@1, held out", "step"), ("greedy recall@1, held out", "train seconds")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend()
    for ax in axes[1]:
        ax.axhline(0.1, color="grey", linestyle=":")
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", default="last_item", choices=S.RULES)
    p.add_argument("--matching", type=int, default=1, help="last_item: recent history items sharing the code")
    p.add_argument("--lists", type=int, default=600)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--base", default="demo",
                   help="the student: demo (a tiny Llama from scratch, sized by --hidden/--layers/--heads), smollm2 "
                        "(SmolLM2-135M-Instruct from the offline GGUF, gr2.synthetic.pretrained_student) or an HF "
                        "model folder; a pretrained base wants a GPU (--device cuda) and a smaller --lr/--start-lr")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--start", help="a saved weak-start state_dict (torch.save) for this task/size; skips --start-steps")
    p.add_argument("--start-steps", type=int, default=20, help="SFT steps of the weak start")
    p.add_argument("--start-accuracy", type=float, default=0.0,
                   help="the weak start's teacher ranks the target first on this share of the lists and writes "
                        "the upstream order on the others (0: format traces only, a start at chance)")
    p.add_argument("--start-batch", type=int, default=8)
    p.add_argument("--start-lr", type=float, default=3e-3)
    p.add_argument("--save-start", help="save the weak-start state_dict here (reuse it with --start)")
    p.add_argument("--copy-steps", type=int, default=0,
                   help="copy-curriculum steps before the weak start (gr2.synthetic.copy_examples; 0: none)")
    p.add_argument("--copy-batch", type=int, default=32)
    p.add_argument("--copy-layout", default="adjacent", choices=("adjacent", "lines"),
                   help="the copy curriculum's layout (gr2.synthetic.copy_examples)")
    p.add_argument("--copy-sids", type=int, default=6, help="SIDs per copy-curriculum example")
    p.add_argument("--steps", type=int, default=60, help="RL steps per arm")
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--sft-batch", type=int, default=8)
    p.add_argument("--sft-lr", type=float, default=1e-2)
    p.add_argument("--sft-accuracy", type=float, default=1.0,
                   help="the SFT arm's teacher ranks the target first on this share of the lists (1: a perfect "
                        "teacher; set it to --start-accuracy for the SFT baseline RL has to pass)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--reward", default="rank", choices=("rank", "ndcg", "auc"), help="rl.reward of the gr2 arm")
    p.add_argument("--kl", type=float, default=0.0, help="rl.kl_coef of the gr2 arm (k3 KL to the weak start)")
    p.add_argument("--max-completion", type=int, default=72)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=600.0, help="training-time cap per arm")
    p.add_argument("--arms", default="sft,gr2,trl", help="comma-separated: sft, gr2, gr2-zero (the gr2 arm with "
                   "every advantage zeroed: a control that must not learn), trl, ablation (`gr2 rl --ablation`: conditional vs unconditional format reward, unconstrained)")
    p.add_argument("--loss-tokens", default="decisions", choices=("all", "decisions"),
                   help="SFT loss on every completion token or only where constrained decoding has a choice "
                        "(sft.loss_tokens; the weak start and the SFT arm)")
    p.add_argument("--trl-generation", default="constrained", choices=("constrained", "free"),
                   help="TRL samples through gr2's RerankLogitsProcessor (default) or unconstrained")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_planted")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    task = S.make_planted_task(args.lists, rule=args.rule, matching=args.matching, seed=args.seed)
    train_rows, heldout = range(args.lists - args.heldout), range(args.lists - args.heldout, args.lists)
    model, tokenizer, sid_tokens = new_student(args, task)
    if args.start:
        model.load_state_dict(torch.load(args.start, map_location=args.device))
    else:
        if args.copy_steps:  # the copy curriculum (gr2.synthetic.copy_examples) before the weak start
            copies = S.copy_examples(task, sid_tokens, args.copy_steps * args.copy_batch, n_sids=args.copy_sids,
                                     layout=args.copy_layout, tokenizer=tokenizer, seed=args.seed)
            losses = S.sft_train(model, copies, tokenizer.pad_token_id, steps=args.copy_steps,
                                 batch_size=args.copy_batch, lr=args.start_lr)
            print(f"copy curriculum ({args.copy_layout}): {args.copy_steps} steps x {args.copy_batch}, loss {losses[0]:.3f} -> "
                  f"{np.mean(losses[-10:]):.4f}", flush=True)
        start = S.sft_examples(task, tokenizer, train_rows, teacher="target", accuracy=args.start_accuracy,
                               loss_tokens=args.loss_tokens, seed=args.seed)
        S.sft_train(model, start, tokenizer.pad_token_id, steps=args.start_steps, batch_size=args.start_batch,
                    lr=args.start_lr)
    start_model = model  # every arm trains a copy (fresh); this one is never trained further
    if args.save_start:
        torch.save(start_model.state_dict(), args.save_start)
    print(f"task: rule={args.rule} K={task.k} lists={args.lists} (held out {args.heldout}); upstream recall@1 "
          f"{S.upstream_recall_at_1(task, heldout):.3f}; model {sum(p.numel() for p in model.parameters())} params; "
          f"prompt {len(tokenizer(task.prompt_text(tokenizer, 0))['input_ids'])} tokens", flush=True)

    curves = {}
    arms = args.arms.split(",")
    if "sft" in arms:
        curves["gr2 sft"] = run_sft(args, task, tokenizer, start_model, heldout, train_rows)
    if "gr2" in arms:
        curves["gr2 rl (dapo)"] = run_gr2_rl(args, task, tokenizer, sid_tokens, start_model, heldout, train_rows)
    if "gr2-zero" in arms:
        curves["gr2 rl, advantage zeroed"] = run_gr2_rl(args, task, tokenizer, sid_tokens, start_model, heldout, train_rows,
                                                        zero_advantage=True)
    if "trl" in arms:
        curves["trl grpo (dapo loss)"] = run_trl(args, task, tokenizer, start_model, heldout, train_rows)
    if "ablation" in arms:
        run_ablation(args, task, tokenizer, sid_tokens, start_model, heldout, train_rows)

    for name, curve in curves.items():
        print(f"\n== {name}")
        print(f"{'step':>5} {'sec':>7} {'reward':>8} {'R@1':>6}")
        for r in curve:
            if "recall@1" in r:
                rew = f"{r['reward']:8.3f}" if "reward" in r else f"{'':>8}"
                print(f"{r['step']:5d} {r['seconds']:7.1f} {rew} {r['recall@1']:6.3f}")
    summary = {}
    for name, curve in curves.items():
        ev = [r for r in curve if "recall@1" in r]
        rew = [r["reward"] for r in curve if "reward" in r]
        summary[name] = {"start_recall@1": ev[0]["recall@1"], "final_recall@1": ev[-1]["recall@1"],
                         "best_recall@1": max(r["recall@1"] for r in ev), "steps": curve[-1]["step"],
                         "train_seconds": curve[-1]["seconds"],
                         "final_reward": float(np.mean(rew[-5:])) if rew else None}
    g, t = curves.get("gr2 rl (dapo)"), curves.get("trl grpo (dapo loss)")
    if g and t:
        trl_final = summary["trl grpo (dapo loss)"]["final_reward"]
        trl_secs = summary["trl grpo (dapo loss)"]["train_seconds"]
        reach = reach_time(g, trl_final)
        ratio = reach / trl_secs if reach is not None else None
        summary["ratio_gr2_time_to_trl_final_reward_over_trl_time"] = ratio
        print(f"\nTRL final reward (last-5 mean) {trl_final:.3f} after {trl_secs:.1f} s; gr2 reaches it (5-step mean) "
              f"after {'never' if reach is None else f'{reach:.1f} s'}; ratio gr2/TRL = "
              f"{'n/a' if ratio is None else f'{ratio:.3f}'}")
    print("\n" + json.dumps(summary, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps({"args": vars(args), "summary": summary, "curves": curves}, indent=1))
    plot(curves, out / "curves.png", f"planted signal ({args.rule}), K=10, "
         f"{f'tiny Llama {args.layers}x{args.hidden}' if args.base == 'demo' else args.base}, "
         f"G={args.group}, {args.prompts} prompts/step")
    print(f"wrote {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
