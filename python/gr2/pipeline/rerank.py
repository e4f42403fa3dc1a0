"""The ``rerank`` step: a trained model reranks the held-out candidate lists under the constraint.

For a model stage (``midtrain``, ``sft`` or ``rl``, or an arm's folder such as ``rl_answer``) it
loads ``<run_dir>/<stage>/model``, renders every request of ``prompts/<split>`` with
:func:`gr2.prompts.request_messages` (what the training stages render), decodes with :func:`gr2.constrained_decode` (greedy by default) and
writes ``<run_dir>/<stage>/rankings_<split>.npz`` — which ``gr2 eval`` picks up as a method named
after the stage — plus ``rerank_<split>.json`` with decode latency and reasoning length.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gr2 import rundir
from gr2.errors import ConfigError, DataError
from gr2.pipeline.inputs import load_prompt_config, load_requests

MODEL_STAGES = ("midtrain", "sft", "rl")
#: folders a rerank can read a model from: the model stages and their answer-only arms
RERANKABLE = MODEL_STAGES + ("sft_answer", "rl_answer")


# What ``gr2 rerank`` writes into a model stage's folder: that stage's record leaves them out.
OUTPUT_GLOBS = ("rankings_*.npz", "rerank_*.json")


def finish_model_stage(world: Any, stage_dir: Path, key: str, model: Any, tokenizer: Any, summary: dict[str, Any],
                       checkpoints: Any) -> dict[str, Any]:
    """The end of a training stage (midtrain, sft): rank 0 writes ``model/`` (float32),
    ``report.json``, drops the checkpoints and records the stage (leaving out what ``gr2 rerank``
    later writes into the folder, :data:`OUTPUT_GLOBS`); every rank returns once that is done."""
    import torch

    from gr2.models import save_pretrained_atomic

    if world.writer:
        save_pretrained_atomic(model.to(torch.float32), tokenizer, stage_dir / "model")
        rundir.atomic_write_json(stage_dir / "report.json", summary)
        checkpoints.cleanup()
        rundir.mark_done(stage_dir, key, summary, exclude=OUTPUT_GLOBS)
    world.barrier()  # every rank returns once the stage is done (a next stage must not read a half-written folder)
    return summary


@dataclass
class RerankConfig:
    split: str = "test"  # "test" | "valid"
    max_lists: int = 0  # 0 = every list of the split
    batch_size: int = 8
    max_reasoning_tokens: int = 64  # think arm; the answer-only arm (``*_answer``) writes no reasoning
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def __post_init__(self) -> None:
        if self.split not in ("test", "valid"):
            raise ConfigError(f"rerank.split must be 'test' or 'valid', got {self.split!r}")
        if self.batch_size < 1 or self.max_lists < 0 or self.max_reasoning_tokens < 0:
            raise ConfigError("rerank.batch_size must be >= 1, max_lists and max_reasoning_tokens >= 0")


def _finished(run_dir: Path, stage: str) -> dict:
    record = rundir.read_stage(run_dir / stage)
    if record is None:
        raise DataError(f"{run_dir / stage} has no finished {stage} stage; run `gr2 {stage}` first")
    return record


def load_lists(run_dir: Path, split: str, max_lists: int):

    table = load_requests(run_dir, split)
    if len(table) == 0:
        raise DataError(f"prompts/{split} is empty")
    if max_lists:
        table = table.select(range(min(max_lists, len(table))))
    return table


def run_rerank(run_dir: str | Path, stage: str, config: RerankConfig = RerankConfig(), *, force: bool = False) -> dict[str, Any]:
    """Rerank ``candidates/<split>`` with ``<run_dir>/<stage>/model``; cached like every stage."""
    import torch

    from gr2 import SidIndex, add_sid_tokens, constrained_decode
    from gr2.eval.rankings import save_rankings
    from gr2.models import load_pretrained
    from gr2.prompts import ItemCatalog, request_messages
    from gr2.train.devices import choose_device

    if stage not in RERANKABLE:
        raise ConfigError(f"rerank stage must be one of {RERANKABLE}, got {stage!r}")
    reasoning = not stage.endswith("_answer")
    run_dir = Path(run_dir)
    out = run_dir / stage
    model_key = _finished(run_dir, stage)["key"]
    key = rundir.stage_key(config, model_key, _finished(run_dir, "prompts")["key"])
    record = f"rerank_{config.split}.json"
    if (done := rundir.begin_stage(out, key, force=force, record=record)) is not None:
        return done

    if config.threads:
        torch.set_num_threads(config.threads)
    device = choose_device(config.device)
    model, tokenizer = load_pretrained(out / "model")
    model.to(device).eval()
    index = SidIndex.load(str(run_dir / "sid" / "index.gr2sid"))
    sid_tokens = add_sid_tokens(tokenizer, index)  # already present: returns their ids
    catalog = ItemCatalog.from_run_dir(run_dir)
    prompt_config = load_prompt_config(run_dir)
    table = load_lists(run_dir, config.split, config.max_lists)
    candidates = np.asarray(table["candidates"], dtype=np.uint64)

    rankings = np.zeros_like(candidates)
    valid = np.zeros(len(table), dtype=bool)
    reasoning_tokens = np.zeros(len(table), dtype=np.int64)
    start = time.perf_counter()
    for lo in tqdm(range(0, len(table), config.batch_size), desc=f"rerank {stage}/{config.split}", unit="batch"):
        rows = range(lo, min(lo + config.batch_size, len(table)))
        prompts = [request_messages(table[i], prompt_config, catalog, index, reasoning=reasoning,
                                    tokenizer=tokenizer).messages for i in rows]
        with torch.no_grad():
            results = constrained_decode(
                model, tokenizer, prompts, candidates[lo : rows.stop], index=index, sid_tokens=sid_tokens,
                reasoning=reasoning, max_reasoning_tokens=config.max_reasoning_tokens,
            )
        for i, result in zip(rows, results):
            rankings[i] = result.items
            valid[i] = result.valid
            reasoning_tokens[i] = len(tokenizer(result.reasoning, add_special_tokens=False)["input_ids"]) if result.reasoning else 0
    seconds = time.perf_counter() - start

    save_rankings(out / f"rankings_{config.split}.npz", np.asarray(table["list_id"]), rankings.astype(np.int64),
                  valid, candidates.astype(np.int64))
    summary = {
        "stage": stage,
        "split": config.split,
        "lists": len(table),
        "seconds": round(seconds, 3),
        "latency_ms_per_list": round(1000 * seconds / len(table), 2),
        "batch_size": config.batch_size,
        "device": str(device),
        "reasoning_tokens_mean": float(reasoning_tokens.mean()),
        "reasoning_tokens_max": int(reasoning_tokens.max()),
        "max_reasoning_tokens": config.max_reasoning_tokens if reasoning else 0,
        "reasoning": reasoning,
        "valid_rate": float(valid.mean()),
    }
    rundir.mark_done(out, key, summary, outputs=[f"rankings_{config.split}.npz"], record=record)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``gr2 rerank``'s own flags (the common ones come from gr2.pipeline.registry)."""
    parser.add_argument("--stage", required=True, choices=RERANKABLE, help="whose model/ reranks")
    parser.add_argument("--split", choices=("test", "valid"))
    parser.add_argument("--max-lists", type=int)


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in {"split": args.split, "max_lists": args.max_lists}.items() if v is not None}


def main(args: argparse.Namespace, config: RerankConfig) -> int:
    summary = run_rerank(args.run_dir, args.stage, config, force=args.force)
    print(f"rerank {args.stage}: {summary['lists']} lists, {summary['latency_ms_per_list']} ms/list, "
          f"reasoning {summary['reasoning_tokens_mean']:.1f} tokens on average")
    return 0
