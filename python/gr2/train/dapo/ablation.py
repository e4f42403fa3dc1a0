"""The reward ablation: conditional vs unconditional format reward, trained from the same start
model, with their learning curves plotted. ``gr2 rl --ablation`` runs it over a run directory
(:func:`gr2.pipeline.rl.run_ablation`, writing ``rl_ablation/``). The demo run's result
is in benches/README.md, "RL reward ablation"."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from gr2.errors import DataError
from gr2.rundir import atomic_write_json, mark_done, save_png, stage_key
from gr2.train.checkpointing import Checkpointer, training_key
from gr2.train.distributed import World, begin_stage_on_rank0
from gr2.train.dapo.config import DapoConfig
from gr2.train.dapo.data import RlData
from gr2.train.dapo.trainer import DapoTrainer, train


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
        if begin_stage_on_rank0(world, out_dir, key) is None:  # rank 0 alone may remove an old record
            trainer, eval_data = make(cfg, out_dir)
            if eval_data is None:
                raise DataError("the ablation needs an evaluation set (candidates/valid)")
            train(trainer, out_dir, eval_data, resume=True, inputs=inputs)
            if world.rank == 0:
                mark_done(out_dir, key, {"steps": trainer.step_count})
                Checkpointer(out_dir / "checkpoints", training_key(cfg, *inputs)).cleanup()
        world.barrier()  # rank 0 wrote the arm's metrics and record; every rank reads them next
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
