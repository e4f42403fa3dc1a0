"""Train as you serve: one request rendered by the teacher, SFT, RL and rerank gives the same prompt.

The test builds a run (data, SIDs, candidates, prompts with evidence, a tiny mid-trained model),
writes teacher traces for the valid lists, and checks token for token that the SFT example's
prompt, the RL prompt and the prompt ``gr2 rerank`` hands to the decoder are the same, in both
reasoning arms.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_midtrain_fixtures import make_run_dir, tiny_midtrain_config

import gr2
from gr2.data.catalog import ItemCatalog
from gr2.prompts import PromptConfig
from gr2.pipeline.rerank import RerankConfig, run_rerank
from gr2.rundir import mark_done
from gr2.pipeline.traces import TeacherConfig, run_traces
from gr2.pipeline.rl import load_rl_data
from gr2.train.dapo import DapoConfig
from gr2.train.sft import trace_example


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from gr2.pipeline.midtrain import run_midtrain

    run = make_run_dir(tmp_path_factory.mktemp("serve"), n_users=12,
                       prompt=PromptConfig(max_history=6, evidence="cooccur", max_tokens=4096))
    run_midtrain(run, tiny_midtrain_config(steps=2, eval_users=2, eval_beams=2, eval_ks=[1]))
    return run


@pytest.mark.parametrize("arm", ["think", "answer"])
def test_one_request_gets_one_prompt_in_every_stage(run_dir, arm, monkeypatch):
    from gr2.models import load_pretrained

    run_traces(run_dir, TeacherConfig(split="valid", mode="targeted"), arm=arm, force=True)
    traces_dir = "traces" if arm == "think" else "traces_answer"
    records = [json.loads(x) for x in (run_dir / traces_dir / "traces.jsonl").read_text().splitlines()]
    model, tokenizer = load_pretrained(run_dir / "midtrain" / "model")
    index = gr2.SidIndex.load(str(run_dir / "sid" / "index.gr2sid"))

    # SFT: the prompt part (weight 0) of each trace example
    sft_prompts = []
    for r in records:
        ex = trace_example(tokenizer, r, 0.5, 1.0, 8192)
        n_prompt = int(np.argmax(np.asarray(ex.weights) > 0))
        sft_prompts.append(list(ex.input_ids[:n_prompt]))
    # RL
    rl = load_rl_data(run_dir, "valid", tokenizer, index, DapoConfig(reasoning=arm == "think", max_reasoning_tokens=64 if arm == "think" else 0))
    assert len(rl.prompt_ids) == len(records)
    # rerank: capture what reaches the decoder
    seen = []

    def capture(model, tokenizer, prompts, candidates, **kw):
        seen.extend(prompts)
        assert kw["reasoning"] is (arm == "think")
        return [type("R", (), {"items": c, "valid": True, "reasoning": ""})() for c in candidates]

    monkeypatch.setattr(gr2, "constrained_decode", capture)
    stage = "sft" if arm == "think" else "sft_answer"
    from gr2.models import save_pretrained_atomic

    save_pretrained_atomic(model, tokenizer, run_dir / stage / "model")
    mark_done(run_dir / stage, f"fake-{arm}", {})
    run_rerank(run_dir, stage, RerankConfig(split="valid"), force=True)
    assert len(seen) == len(records)
    rerank_ids = [tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"] for m in seen]
    for sft_ids, rl_ids, rr_ids, r in zip(sft_prompts, rl.prompt_ids, rerank_ids, records):
        assert sft_ids == list(rl_ids) == list(rr_ids), f"list {r['list_id']}: prompts differ between stages"
    # the prompt shows the evidence line and asks for the arm's format
    text = seen[0][-1]["content"]
    assert "Co-watched with this history" in text
    assert ("<think>" in text) is (arm == "think")


def test_prompt_config_rejects_what_cannot_work():
    from gr2.errors import ConfigError

    with pytest.raises(ConfigError, match="prompts.evidence"):
        PromptConfig(evidence="clicks")
    with pytest.raises(ConfigError, match="prompts.max_history"):
        PromptConfig(max_history=0)


def test_evidence_comes_from_the_split_fit_data(run_dir):
    """Evidence scores change when the fit data changes and are zero for items nobody co-engaged."""
    from gr2.pipeline.inputs import load_fit_sequences, load_requests
    from gr2.prompts import candidate_evidence

    table = load_requests(run_dir, "test")
    n_items = len(ItemCatalog.from_run_dir(run_dir, sids=True))
    hist = [np.asarray(h) for h in table["history"]]
    cands = np.asarray(table["candidates"])
    stored = np.asarray(table["evidence"])
    recomputed = candidate_evidence(hist, cands, load_fit_sequences(run_dir, "test"), n_items,
                                    PromptConfig(evidence="cooccur"))
    np.testing.assert_allclose(stored, recomputed, rtol=1e-6)
    empty = candidate_evidence(hist, cands, [np.zeros(0, np.int64)], n_items, PromptConfig(evidence="cooccur"))
    assert not empty.any()


def test_configs_that_cannot_learn_are_rejected(tmp_path):
    from gr2.errors import ConfigError
    from gr2.pipeline.prompts import run_prompts

    with pytest.raises(ConfigError, match="rl.max_reasoning_tokens"):
        DapoConfig(reasoning=False, max_reasoning_tokens=16)
    # evidence that the data cannot supply: fit data without any co-engagement
    run = make_run_dir(tmp_path / "r", n_users=6)
    import datasets

    for split in ("train", "valid", "test"):
        datasets.Dataset.from_dict({"user_idx": list(range(6)), "items": [[] for _ in range(6)]},
                                   features=datasets.Features({"user_idx": datasets.Value("int64"),
                                                               "items": datasets.Sequence(datasets.Value("int64"))})
                                   ).save_to_disk(str(run / "candidates" / f"fit_{split}x"))
        import shutil

        shutil.rmtree(run / "candidates" / f"fit_{split}")
        (run / "candidates" / f"fit_{split}x").rename(run / "candidates" / f"fit_{split}")
    from gr2 import rundir

    record = rundir.read_stage(run / "candidates") or {}
    assert not record, "outputs replaced behind the record's back must not count as a finished stage"
    old = json.loads((run / "candidates" / "stage.json").read_text())
    rundir.mark_done(run / "candidates", old["key"], old["summary"])  # a finished stage with such data
    with pytest.raises(ConfigError, match="prompts.evidence"):
        run_prompts(run, PromptConfig(evidence="cooccur"), force=True)
