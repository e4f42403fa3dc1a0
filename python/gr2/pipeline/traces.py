"""Stage ``traces``: teacher reasoning traces for reasoning SFT (the teachers: :mod:`gr2.teacher`).

``run_traces(run_dir, config, arm=...)`` reads ``prompts/<split>`` (and, for the heuristic teacher,
the split's fit data in ``candidates/``), writes ``traces/traces.jsonl`` (``traces_answer/`` for the
answer-only arm; one record per example, ``accepted`` marks the kept ones) and
``traces/report.json``; the heuristic teacher's greedy rankings of the valid/test lists go to
``teacher/rankings_<split>.npz``. The stage fails with :class:`gr2.teacher.TeacherAcceptanceError`
(reasons counted) when fewer than ``min_acceptance`` of the examples get a kept trace.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gr2.data.catalog import ItemCatalog
from gr2.errors import DataError
from gr2.rundir import atomic_write_json, atomic_write_text, begin_stage, mark_done, stage_key
from gr2.teacher import (HEURISTIC_LABEL, Example, HeuristicTeacher, LocalModelTeacher, OpenAIChatClient,
                         TeacherConfig, check_acceptance, parse_completions, rerank_messages, trace_all, trace_one)
from gr2.pipeline.inputs import input_key, load_fit_sequences, load_prompt_config, load_requests

STAGE = "traces"  # the run-directory folder of the traces stage (traces_answer/ for the answer-only arm)


def load_examples(run_dir: Path, split: str, max_examples: int, seed: int) -> list[Example]:
    """The requests of ``prompts/<split>`` (lists that contain their target), optionally a seeded
    sample of ``max_examples``."""

    from gr2.candidates import list_fit_slices

    table = load_requests(run_dir, split)
    slices = list_fit_slices(table)
    examples = [Example(int(r["list_id"]), int(r["user_idx"]), [int(i) for i in r["history"]],
                        [int(c) for c in r["candidates"]], int(r["target"]), [float(e) for e in r["evidence"]],
                        int(fit_slice))
                for r, fit_slice in zip(table, slices)]
    for e in examples:
        if len(set(e.candidates)) != len(e.candidates):
            raise DataError(f"prompts/{split}: list {e.list_id} has duplicate candidates")
    if max_examples and max_examples < len(examples):
        pick = np.sort(np.random.default_rng(seed).choice(len(examples), max_examples, replace=False))
        examples = [examples[i] for i in pick]
    if not examples:
        raise DataError(f"prompts/{split} has no list (no target among the candidates)")
    return examples


def heuristic_teachers(run_dir: Path, catalog: ItemCatalog, config: TeacherConfig, split: str
                       ) -> Callable[[Example], HeuristicTeacher]:
    """example -> the heuristic teacher whose statistics come from that example's fit data (one
    per rolling-cutoff slice, built when first needed)."""

    teachers: dict[int, HeuristicTeacher] = {}
    lock = threading.Lock()  # the OpenAI-style sampler runs examples on a thread pool

    def teacher_of(example: Example) -> HeuristicTeacher:
        with lock:
            if example.fit_slice not in teachers:
                teachers[example.fit_slice] = HeuristicTeacher(
                    catalog, load_fit_sequences(run_dir, split, example.fit_slice), config)
            return teachers[example.fit_slice]
    return teacher_of


def make_sampler(config: TeacherConfig, run_dir: Path, catalog: ItemCatalog, prompt: Any, reasoning: bool,
                 cache_dir: Path, *, purge_cache: bool = False
                 ) -> tuple[str, Callable[[Example, int], str], OpenAIChatClient | None]:
    """(label, fn(example, attempt) -> completion text, the OpenAI client or None) for the
    configured backend. The OpenAI client caches a reply only when it parses with gr2's grammar
    for that example (:func:`parse_completions`); ``purge_cache`` (``--force``) also deletes cache
    entries it would not trust (unreadable, older format)."""
    targeted = config.mode == "targeted"
    if config.backend == "heuristic":
        teacher = heuristic_teachers(run_dir, catalog, config, config.split)
        return HEURISTIC_LABEL, lambda ex, attempt: teacher(ex).complete(ex, attempt, targeted, reasoning), None
    prompt_of = lambda ex: rerank_messages(catalog, ex, prompt, reasoning=reasoning, reveal_target=targeted)  # noqa: E731
    if config.backend == "openai":
        client = OpenAIChatClient(config.endpoint, config.model, api_key=os.environ.get(config.api_key_env),
                                  timeout_s=config.timeout_s, max_retries=config.max_retries,
                                  backoff_s=config.backoff_s, cache_dir=cache_dir)
        if purge_cache:
            client.purge_cache()

        def sample(ex: Example, attempt: int) -> str:
            parses = lambda text: bool(parse_completions([text], [ex], catalog, reasoning=reasoning).valid[0])  # noqa: E731
            return client.complete(prompt_of(ex), temperature=config.temperature, max_tokens=config.max_tokens,
                                   sample_index=attempt, keep_reasoning=reasoning, accept=parses)

        return f"openai-compatible endpoint {config.model}", sample, client
    local = LocalModelTeacher(config.local_model, config)
    return f"local model {config.local_model}", lambda ex, attempt: local.complete(prompt_of(ex), attempt), None


def teacher_rankings(run_dir: Path, config: TeacherConfig, catalog: ItemCatalog, split: str) -> None:
    """The heuristic teacher's greedy ranking of ``prompts/<split>``, written as
    ``teacher/rankings_<split>.npz`` so ``gr2 eval`` scores the teacher like any method."""
    from gr2.eval.rankings import save_rankings

    examples = load_examples(run_dir, split, 0, config.seed)
    teacher = heuristic_teachers(run_dir, catalog, config, split)
    rankings = np.array([teacher(ex).rank(ex, 0, False)[0] for ex in examples], dtype=np.int64)
    save_rankings(run_dir / "teacher" / f"rankings_{split}.npz", [e.list_id for e in examples], rankings,
                  np.ones(len(examples), dtype=bool), np.array([e.candidates for e in examples], dtype=np.int64))


def run_traces(run_dir: str | Path, config: TeacherConfig = TeacherConfig(), *, arm: str = "think",
               force: bool = False) -> dict[str, Any]:
    from gr2 import arms

    run_dir = Path(run_dir)
    stage_dir = run_dir / arms.stage_dir(STAGE, arm)
    reasoning = arms.reasoning(arm)
    inputs = [input_key(run_dir, s) for s in ("data", "sid", "candidates", "prompts")]
    key = stage_key({"config": config, "arm": arm}, *inputs)
    if (done := begin_stage(stage_dir, key, force=force)) is not None:
        return done
    catalog = ItemCatalog.from_run_dir(run_dir, sids=True)
    prompt = load_prompt_config(run_dir)
    examples = load_examples(run_dir, config.split, config.max_examples, config.seed)
    label, sample, client = make_sampler(config, run_dir, catalog, prompt, reasoning, stage_dir / "cache",
                                         purge_cache=force)

    workers = config.concurrency if config.backend == "openai" else 1
    results = trace_all(examples, lambda ex: trace_one(ex, sample, catalog, config, reasoning), workers, client,
                        f"traces ({label}, {arm})")

    kept = [(ex, r) for ex, r in zip(examples, results) if r["accepted"]]
    lines = []
    for ex, r in zip(examples, results):
        record = {"teacher": label, "mode": config.mode, "arm": arm, "reasoning": reasoning, "split": config.split,
                  "list_id": ex.list_id, "user_idx": ex.user_idx, "history": ex.history, "candidates": ex.candidates,
                  "target": ex.target, "messages": rerank_messages(catalog, ex, prompt, reasoning=reasoning),
                  **r}
        lines.append(json.dumps(record))
    atomic_write_text(stage_dir / "traces.jsonl", "\n".join(lines) + "\n")
    if config.backend == "heuristic":
        for split in ("valid", "test"):
            teacher_rankings(run_dir, config, catalog, split)
    invalid, failures = Counter(), Counter()
    for r in results:
        invalid.update(r["invalid"])
        if "failure" in r:
            failures[r["failure"]["reason"]] += 1
    summary = {
        "teacher": label,
        "backend": config.backend,
        "mode": config.mode,
        "arm": arm,
        "split": config.split,
        "examples": len(examples),
        "kept": len(kept),
        "acceptance_rate": len(kept) / len(examples),
        "attempts_per_kept_trace": float(np.mean([r["attempts"] for _, r in kept])) if kept else None,
        "attempts_total": int(sum(r["attempts"] for r in results)),
        "attempts_budget": config.attempts if config.mode == "rejection" else 1,
        "accept_rank": config.accept_rank,
        "invalid_completions": dict(invalid),
        "target_not_first": int(sum(r["target_not_first"] for r in results)),
        "failed_examples": int(sum(failures.values())),
        "failures": dict(failures),
        "min_acceptance": config.min_acceptance,
        "client": client.report() if client is not None else None,
        "parsed_with": "gr2.verify_rewards",
    }
    below = 0 < config.min_acceptance and summary["acceptance_rate"] < config.min_acceptance
    summary["status"] = "below min_acceptance" if below else "ok"
    atomic_write_json(stage_dir / "report.json", summary)
    check_acceptance(summary, config, stage_dir)
    mark_done(stage_dir, key, summary)
    return summary


def main(args: Any, config: TeacherConfig) -> int:
    """``gr2 traces`` (flags: gr2.pipeline.registry)."""
    summary = run_traces(args.run_dir, config, arm=args.arm, force=args.force)
    print(json.dumps(summary, indent=2))
    return 0
