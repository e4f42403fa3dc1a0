"""Stage 1 mid-training on a slice of ml-100k with a tiny demo model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from test_midtrain_fixtures import make_run_dir, tiny_midtrain_config

from gr2.data.catalog import ItemCatalog
from gr2.errors import ConfigError, DataError
from gr2.models import load_pretrained, sid_tokens_of
from gr2.train.batches import WeightedExample, collate, pack_rows
from gr2.train.checkpointing import latest_checkpoint
from gr2.train.losses import weighted_nll, weighted_nll_selected
from gr2.pipeline.inputs import load_sequences
from gr2.pipeline.midtrain import run_midtrain
from gr2.train.midtrain import (
    MixtureWeights,
    next_item_rankings,
    popularity_rankings,
    per_user_metrics,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("mt"), n_users=30)


def test_midtrain_trains_evaluates_and_saves(run_dir):
    summary = run_midtrain(run_dir, tiny_midtrain_config())
    report = json.loads((run_dir / "midtrain" / "report.json").read_text())
    assert report == json.loads(json.dumps(summary))
    ev = summary["eval"]
    assert ev["users"] == 4 and set(ev["model"]) == {"recall@1", "ndcg@1", "recall@4", "ndcg@4"}
    assert 0 <= ev["model"]["recall@1"] <= ev["model"]["recall@4"] <= 1
    assert ev["mean_items_returned"] == 4  # every beam spelled a distinct catalog item
    model, tok = load_pretrained(run_dir / "midtrain" / "model")
    catalog = ItemCatalog.from_run_dir(run_dir, sids=True)
    st = sid_tokens_of(tok, catalog.level_sizes)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok(catalog.sid_text(3), add_special_tokens=False)["input_ids"] == st.sid_token_ids(catalog.codes[3])
    lines = (run_dir / "midtrain" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert not (run_dir / "midtrain" / "checkpoints").exists()
    # current stage: skipped, same summary
    assert run_midtrain(run_dir, tiny_midtrain_config()) == summary


def test_midtrain_resume_after_kill_matches_uninterrupted(run_dir, tmp_path):
    import shutil

    def kill_at(step):
        if step == 5:
            raise KeyboardInterrupt("killed")

    config = tiny_midtrain_config(seed=1, history_weight=0.5, pack=True)  # the demo preset's options
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed, ignore=shutil.ignore_patterns("midtrain"))
    with pytest.raises(KeyboardInterrupt):
        run_midtrain(killed, config, on_step=kill_at)
    assert latest_checkpoint(killed / "midtrain" / "checkpoints").name == "step-00000004"
    resumed = run_midtrain(killed, config)
    assert resumed["resumed_from_step"] == 4
    straight = tmp_path / "straight"
    shutil.copytree(run_dir, straight, ignore=shutil.ignore_patterns("midtrain"))
    full = run_midtrain(straight, config)
    a, _ = load_pretrained(killed / "midtrain" / "model")
    b, _ = load_pretrained(straight / "midtrain" / "model")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "midtrain" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(killed) == pytest.approx(losses(straight), abs=1e-6)
    assert resumed["eval"] == full["eval"]


@pytest.mark.parametrize("excluded", [[], [6, 1]])
def test_beam_search_matches_exhaustive_scoring(excluded):
    """Constrained beam search with as many beams as items = the exact ranking of the remaining
    items by their SID's constrained log-likelihood: at each code, the log-softmax over the codes
    that still lead to a non-excluded catalog item (the delimiters are forced: log-prob 0)."""
    import gr2
    from gr2.models import build_demo_model, extend_with_sids, train_demo_tokenizer, DemoModelConfig

    tok = train_demo_tokenizer(["A user watched, oldest first: Next item?"] * 5, 300)
    model = build_demo_model(tok, DemoModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                  num_layers=1, num_heads=2, seed=3))
    codes = np.array([[a, b] for a in range(3) for b in range(3) if (a, b) != (1, 1)], dtype=np.uint16)
    st = extend_with_sids(model, tok, codes, [3, 3], noise_std=1.0, seed=5)
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    index = gr2.SidIndex.build(np.arange(len(codes), dtype=np.uint64), codes, codebook_size=3)
    prompt = "A user watched, oldest first: Next item?"
    kept = [i for i in range(len(codes)) if i not in excluded]
    ranked = next_item_rankings(model, tok, st, index, [prompt], [excluded], beams=len(kept), top=len(kept),
                                batch_size=1)[0]
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    prefix = tok(text, add_special_tokens=False)["input_ids"]
    scores = []
    with torch.no_grad():
        for item in kept:
            ids = st.sid_token_ids(codes[item])
            logits = model(torch.tensor([prefix + ids])).logits[0]
            score = 0.0
            for level in range(2):
                allowed = sorted({int(codes[j, level]) for j in kept if (codes[j, :level] == codes[item, :level]).all()})
                allowed_ids = [int(st.code_ids[level, c]) for c in allowed]
                row = logits[len(prefix) + level]  # predicts the code after <|sid_begin|> + `level` codes
                score += float(row[ids[1 + level]] - torch.logsumexp(row[allowed_ids], 0))
            scores.append(score)
    exhaustive = [kept[i] for i in np.argsort(-np.array(scores), kind="stable")]
    assert sorted(ranked) == kept
    assert ranked == exhaustive


def test_popularity_rankings_skip_each_users_history():
    train = [[0, 1, 2], [0, 1], [0, 3]]  # counts: 0 x3, 1 x2, 2 x1, 3 x1, 4 x0
    assert popularity_rankings(train, 5, [[], [0], [0, 1, 2]], top=3) == [[0, 1, 2], [1, 2, 3], [3, 4]]


def _old_eval_split(seqs, split):
    """midtrain's own leave-one-out before it used gr2.splits (the reference it must still match)."""
    cut = 1 if split == "test" else 2
    pairs = [(s[:-cut], s[-cut]) for s in seqs if len(s) > cut and len(s[:-cut]) > 0]
    return [h for h, _ in pairs], [t for _, t in pairs]


@given(st.lists(st.lists(st.integers(0, 50), max_size=9), max_size=12), st.sampled_from(["valid", "test"]))
def test_midtrain_leave_one_out_is_the_splits_one_and_unchanged(seqs, split):
    from gr2 import splits

    assert splits.leave_one_out_pairs(seqs, split) == _old_eval_split(seqs, split)
    assert splits.leave_one_out_prefixes(seqs) == [s[:-2] for s in seqs]
    # on sequences leave_one_out can split (>= 3 items) the pairs are its histories and targets
    long = [s for s in seqs if len(s) >= 3]
    loo = splits.leave_one_out(range(len(long)), long)
    histories, targets = splits.leave_one_out_pairs(long, split)
    want_h = loo.test_histories() if split == "test" else loo.valid_histories()
    assert [list(h) for h in want_h] == histories
    assert list(loo.test_targets if split == "test" else loo.valid_targets) == targets
    assert [list(p) for p in loo.train] == splits.leave_one_out_prefixes(long)


def test_per_user_metrics_by_hand():
    m = per_user_metrics([[5, 1, 2], [7, 8, 9], [3, 4, 0]], [1, 0, 3], [1, 3])
    np.testing.assert_allclose(m["recall@1"], [0, 0, 1])
    np.testing.assert_allclose(m["recall@3"], [1, 0, 1])
    np.testing.assert_allclose(m["ndcg@3"], [1 / math.log2(3), 0, 1])


def test_midtrain_bad_inputs(tmp_path, run_dir):
    with pytest.raises(ConfigError):
        tiny_midtrain_config(mixture=MixtureWeights(next=-1.0))
    with pytest.raises(ConfigError):
        tiny_midtrain_config(eval_ks=[10], eval_beams=4)
    with pytest.raises(ConfigError):
        tiny_midtrain_config(eval_split="train")
    with pytest.raises(DataError, match="`data`"):
        run_midtrain(tmp_path / "empty", tiny_midtrain_config())
    from gr2.config import from_dict
    from gr2.train.midtrain import MidtrainConfig

    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(MidtrainConfig, {"stepz": 3})
    assert from_dict(MidtrainConfig, {"mixture": {"next": 1.0, "replay": 0.0}}).mixture.replay == 0.0


def test_next_example_history_sid_weights(run_dir):
    """history_weight puts that weight on exactly the code tokens of the history SIDs in the prompt
    (in order), nothing on their delimiters or the prompt text; the answer keeps weight 1."""
    from gr2.models import build_demo_model, extend_with_sids, train_demo_tokenizer
    from gr2.train.midtrain import TaskSampler, demo_corpus

    catalog = ItemCatalog.from_run_dir(run_dir, sids=True)
    train_seqs = [s[:-2] for s in load_sequences(run_dir)]
    config = tiny_midtrain_config(max_history=3, history_weight=0.5)
    tok = train_demo_tokenizer(demo_corpus(catalog), 400)
    model = build_demo_model(tok, config.demo)
    st = extend_with_sids(model, tok, catalog.codes, catalog.level_sizes,
                          [catalog.item_text(i) for i in range(len(catalog))])
    sampler = TaskSampler(catalog, train_seqs, tok, config, st)
    plain = TaskSampler(catalog, train_seqs, tok, tiny_midtrain_config(max_history=3, history_weight=0.0))
    codes_of = lambda item: st.sid_token_ids(catalog.codes[item])[1:-1]  # noqa: E731
    for user, pos in [(0, 1), (0, 2), (3, 7), (5, 30)]:
        ex, base = sampler.next_example(user, pos), plain.next_example(user, pos)
        assert ex.input_ids == base.input_ids
        history = train_seqs[user][max(0, pos - 3):pos]
        target = st.sid_token_ids(catalog.codes[train_seqs[user][pos]])
        answer_start = max(i for i in range(len(ex.input_ids)) if ex.input_ids[i:i + len(target)] == target)
        # the plain example: prompt weight 0, answer (SID + end of turn) weight 1
        assert set(base.weights[:answer_start]) == {0.0} and set(base.weights[answer_start:]) == {1.0}
        assert ex.weights[answer_start:] == base.weights[answer_start:]
        weighted = [i for i in range(answer_start) if ex.weights[i] > 0]
        assert all(ex.weights[i] == 0.5 for i in weighted)
        assert [ex.input_ids[i] for i in weighted] == [t for item in history for t in codes_of(item)]
        # the weighted positions are the history SIDs' codes, each right after its own prefix
        begins = [i for i in range(answer_start) if ex.input_ids[i] == st.sid_begin]
        assert len(begins) == len(history)
        assert weighted == [b + 1 + level for b in begins for level in range(st.levels)]
    with pytest.raises(ConfigError):
        tiny_midtrain_config(history_weight=-1.0)


def test_selected_logits_loss_matches_full_and_packing():
    from gr2.models import DemoModelConfig, build_demo_model, train_demo_tokenizer

    tok = train_demo_tokenizer(["A user watched, oldest first: Next item? What is item"] * 5, 300)
    model = build_demo_model(tok, DemoModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                  num_layers=1, num_heads=2, seed=1))
    g = torch.Generator().manual_seed(0)
    examples = [WeightedExample(torch.randint(0, 300, (n,), generator=g).tolist(),
                                       [0.0] * (n // 2) + [0.5] * (n - n // 2 - 2) + [1.0, 1.0])
                for n in (12, 5, 9, 4, 3)]
    rows = pack_rows(examples, 12, tok.eos_token_id)
    # first fit decreasing: 12 alone, 9 alone, 5 opens a row that 4 joins (5 + 1 + 4 = 10), and 3
    # fits nowhere (9 + 1 + 3 = 13, 10 + 1 + 3 = 14)
    assert [len(r.input_ids) for r in rows] == [12, 9, 10, 3]
    assert max(len(r.input_ids) for r in rows) <= 12
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in examples) + len(examples) - len(rows)
    assert sum(sum(r.weights) for r in rows) == pytest.approx(sum(sum(e.weights) for e in examples))
    assert len(rows) < len(examples)
    for batch_examples in (examples, rows):
        batch = collate(batch_examples, tok.pad_token_id)
        full, n_full = weighted_nll(model, batch)
        sel, n_sel = weighted_nll_selected(model, batch)
        assert n_full == n_sel and sel.item() == pytest.approx(full.item(), rel=1e-5)
        g_full = torch.autograd.grad(full, model.get_input_embeddings().weight)[0]
        g_sel = torch.autograd.grad(weighted_nll_selected(model, batch)[0],
                                    model.get_input_embeddings().weight)[0]
        assert torch.allclose(g_full, g_sel, atol=1e-6)
    with pytest.raises(Exception):
        pack_rows(examples, 11, tok.eos_token_id)


def test_init_model_of_another_base_model_or_sid_index_is_not_reused(run_dir, tmp_path, caplog):
    """A run killed before its first checkpoint leaves checkpoints/init (the SID-extended base
    model). Restarted with another base model, or after the SID index changed, the stage must not
    start from that old extended model: it says so in one line and extends the new base again."""
    import dataclasses
    import logging
    import shutil

    from gr2.pipeline.midtrain import init_key

    def kill_at(step):
        if step == 1:
            raise KeyboardInterrupt("killed")

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("midtrain"))
    ckpts = run / "midtrain" / "checkpoints"
    config = tiny_midtrain_config(checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        run_midtrain(run, config, on_step=kill_at)
    assert (ckpts / "init" / "config.json").exists() and latest_checkpoint(ckpts) is None
    wider = dataclasses.replace(config, demo=dataclasses.replace(config.demo, hidden_size=48))  # another base model
    for change in ("base model", "sid index"):
        if change == "sid index":  # the sid stage reran with other codes: its key changed
            record = json.loads((run / "sid" / "stage.json").read_text())
            (run / "sid" / "stage.json").write_text(json.dumps({**record, "key": "another-index"}))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gr2"), pytest.raises(KeyboardInterrupt):
            run_midtrain(run, wider, on_step=kill_at)
        assert load_pretrained(ckpts / "init")[0].config.hidden_size == 48, change
        stale = [r.getMessage() for r in caplog.records if "stale checkpoint" in r.getMessage()]
        assert len(stale) == 1 and stale[0].startswith("midtrain: stale checkpoint (key "), change
        assert (ckpts / "init.key").read_text().strip() == init_key(run, wider), change
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gr2"):  # same config and inputs: the init is reused, silently
        run_midtrain(run, dataclasses.replace(wider, steps=2, eval_users=2))
    assert not [r for r in caplog.records if "stale" in r.getMessage()]
    assert not ckpts.exists()  # cleaned up on success


def test_midtrain_never_trains_on_a_later_stage_training_target(run_dir):
    """train_on="fit" (default): no (user, target) of prompts/train is a mid-training item of that
    user; "all" (the older behaviour) does overlap, which is why it is reported, not the default."""
    from gr2.pipeline.inputs import load_requests
    from gr2.pipeline.inputs import load_sequences
    from gr2.pipeline.midtrain import training_sequences

    seqs = load_sequences(run_dir)
    requests = load_requests(run_dir, "train")
    for train_on, overlap in (("fit", False), ("all", True)):
        train = training_sequences(run_dir, tiny_midtrain_config(train_on=train_on), seqs)
        hits = [int(t) in train[int(u)] for u, t in zip(requests["user_idx"], requests["target"])]
        assert any(hits) is overlap, train_on
