"""Same config and seed, same numbers: two independent runs of a stage must give bit-identical
metrics (issue 17, "reports a user can trust"). Environment differences (other package versions,
another CPU) are what the report's ``environment`` block and scripts/constraints.txt are for; within
one environment nothing may drift. The SFT two-run check lives in tests/test_sft.py (its fixture)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import load_from_disk

import _dapo_fixtures as fx
from gr2.candidates import CandidatesConfig
from gr2.pipeline.candidates import run_candidates
from gr2.eval.rankings import save_rankings
from gr2.pipeline.eval import EvalConfig, run_eval
from gr2.train.dapo import DapoTrainer, RlData, train
from gr2.upstream.sasrec import SASRecConfig

from _fixtures_upstream import synthetic_tables, write_data_stage


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_and_evaluate(root):
    """data -> candidates (a tiny trained SASRec) -> a seeded random "model" -> eval, from scratch."""
    write_data_stage(root, *synthetic_tables(n_users=80, n_items=40, seed=5))
    sasrec = SASRecConfig(hidden=16, max_len=12, max_epochs=2, eval_every=1, patience=1, batch_size=16)
    run_candidates(root, CandidatesConfig(upstream="sasrec", k=5, train_windows=1, sasrec=sasrec))
    test = load_from_disk(str(root / "candidates" / "test"))
    cands = np.array(test["candidates"])
    rng = np.random.default_rng(3)
    order = np.argsort(rng.random(cands.shape), axis=1)
    (root / "rl").mkdir()
    save_rankings(root / "rl" / "rankings_test.npz", test["list_id"], np.take_along_axis(cands, order, 1),
                  rng.random(len(cands)) > 0.2, candidates=cands)
    run_eval(root, EvalConfig(n_boot=200, seed=7))
    return json.loads((root / "eval" / "report.json").read_text()), cands


def test_eval_stage_twice_gives_identical_metrics(tmp_path):
    first, cands_a = build_and_evaluate(tmp_path / "a")
    second, cands_b = build_and_evaluate(tmp_path / "b")
    assert np.array_equal(cands_a, cands_b)  # the trained upstream ranked the same lists the same way
    assert first["methods"] == second["methods"]  # every value and CI bound, exactly (JSON floats)
    strip = lambda meta: {k: v for k, v in meta.items() if k not in ("environment", "methods_from")}  # noqa: E731
    assert strip(first["meta"]) == strip(second["meta"])  # MDE included
    assert "vs_upstream" in first["methods"]["rl"] and first["meta"]["mde"]["lists"] == len(cands_a)


def test_rl_two_steps_twice_are_bit_identical(tmp_path):
    """Two RL steps with real sampled rollouts (gr2.constrained_decode) and a valid-split eval every
    step, twice from the same initial weights and seed: same metrics.jsonl, same weights."""
    torch.set_num_threads(1)
    base, tokenizer, sid_tokens = fx.tiny_policy()
    data, sids = fx.tiny_data(tokenizer)
    index = fx.tiny_index(data, sids)
    eval_data = RlData(data.prompt_texts[:3], data.prompt_ids[:3], data.candidates[:3], data.targets[:3])
    config = fx.small_config(steps=2, prompts_per_step=2, max_reasoning_tokens=3, constrained=True, eval_every=1,
                             max_generation_rounds=2, seed=4)
    runs = []
    for name in ("a", "b"):
        model, _, _ = fx.tiny_policy()
        model.load_state_dict(base.state_dict())
        trainer = DapoTrainer(model, tokenizer, data, config, index=index, sid_tokens=sid_tokens)
        train(trainer, tmp_path / name, eval_data, resume=False)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs.append(([{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows], model))
    (rows_a, model_a), (rows_b, model_b) = runs
    assert [r["step"] for r in rows_a] == [0, 1, 2]
    assert {"reward_mean", "valid_rate", "eval_recall@1", "eval_ndcg@5"} <= set(rows_a[-1])
    assert rows_a == rows_b
    moved = False
    for (name, pa), (_, pb), (_, p0) in zip(model_a.named_parameters(), model_b.named_parameters(), base.named_parameters()):
        assert torch.equal(pa, pb), name
        moved |= not torch.equal(pa, p0)
    assert moved  # the two steps did update the weights
