"""The `candidates` stage on a small synthetic run directory: schema, invariants, coverage
bookkeeping, the prefix protocol for training windows, caching, CLI, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from gr2.splits import leave_one_out_protocol, time_protocol
from gr2.candidates import CandidatesConfig, ItemKNNConfig
from gr2.pipeline.candidates import run_candidates
from gr2.cli import main as cli_main
from gr2.config import from_dict
from gr2.errors import ConfigError, DataError, UnknownItemError
from gr2.rundir import read_stage
from gr2.upstream import leave_one_out
from gr2.upstream.sasrec import SASRecConfig

from _fixtures_upstream import synthetic_tables, write_data_stage

COLUMNS = {"user_idx": "int64", "history": "int64", "candidates": "int64", "scores": "float32", "target": "int64"}


@pytest.fixture
def run_dir(tmp_path):
    write_data_stage(tmp_path, *synthetic_tables(n_users=60, n_items=40, seed=2))
    return tmp_path


def check_lists(run_dir: Path, k: int, max_history: int):
    _, seqs = synthetic_tables(n_users=60, n_items=40, seed=2)
    report = json.loads((run_dir / "candidates" / "report.json").read_text())
    for split in ("train", "valid", "test"):
        ds = load_from_disk(str(run_dir / "candidates" / split))
        for col, dtype in COLUMNS.items():
            feature = ds.features[col]
            assert getattr(feature, "dtype", None) == dtype or getattr(feature.feature, "dtype", None) == dtype
        info = report["splits"][split]
        assert len(ds) == info["kept"] == info["lists"] - info["dropped_target_not_in_top_k"]
        assert info["requests"] == info["lists"] + info["dropped_too_few_rankable_items"]
        assert info["coverage"] == pytest.approx(info["kept"] / info["requests"])
        assert sum(info["target_position_histogram"]) == info["kept"]
        for row in ds:
            c = row["candidates"]
            assert len(c) == k and len(set(c)) == k and row["target"] in c  # paper protocol
            assert len(row["scores"]) == k and row["scores"] == sorted(row["scores"], reverse=True)
            assert 1 <= len(row["history"]) <= max_history
            assert not set(row["history"]) & set(c)  # history items are masked from the ranking
            seq = seqs["items"][row["user_idx"]]
            if split == "test":
                assert row["target"] == seq[-1] and row["history"] == seq[:-1][-max_history:]
            if split == "valid":
                assert row["target"] == seq[-2] and row["history"] == seq[:-2][-max_history:]
            if split == "train":  # a window over the train part, target among its last items
                t = len(seq[:-2]) - 1 - seq[:-2][::-1].index(row["target"])
                assert row["history"] == seq[:t][-max_history:]
    return report


def test_candidates_itemknn_and_cache(run_dir, capsys):
    config = CandidatesConfig(upstream="itemknn", k=5, max_history=4, train_windows=3)
    summary = run_candidates(run_dir, config)
    report = check_lists(run_dir, 5, 4)
    assert report["upstream"] == "itemknn"
    assert set(report["full_ranking"]["test"]) == {"itemknn", "popularity"}
    assert report["splits"]["train"]["lists"] == 60 * 3  # every synthetic train sequence has >= 4 items
    assert summary["coverage"] == report["coverage"]
    # the chain structure is easy for co-occurrence: most targets are in the top 5
    assert report["coverage"]["test"] > 0.5
    stamp = (run_dir / "candidates" / "stage.json").stat().st_mtime_ns
    assert run_candidates(run_dir, config) == summary  # cached
    assert (run_dir / "candidates" / "stage.json").stat().st_mtime_ns == stamp
    # the CLI reruns with another config and prints the comparison
    assert cli_main(["candidates", "--run-dir", str(run_dir), "--upstream", "popularity", "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "coverage" in out and "popularity" in out
    assert read_stage(run_dir / "candidates")["summary"]["upstream"] == "popularity"
    check_lists(run_dir, 3, 50)


def test_candidates_sasrec_prefix_protocol(run_dir):
    sasrec = SASRecConfig(hidden=16, max_len=12, max_epochs=4, eval_every=2, patience=1, batch_size=16)
    report_summary = run_candidates(run_dir, CandidatesConfig(upstream="sasrec", k=6, train_windows=2, sasrec=sasrec))
    report = check_lists(run_dir, 6, 50)
    assert report["sasrec_training"]["best_epoch"] in (2, 4)
    assert set(report["full_ranking"]["valid"]) == {"sasrec", "popularity", "itemknn"}
    assert set(report["coverage"]) == {"train", "valid", "test"}
    assert report_summary["kept"]["train"] == report["splits"]["train"]["kept"]


def test_training_windows_hold_out_the_tail():
    split = leave_one_out_protocol([0, 1], [[1, 2, 3, 4, 5, 6, 7, 70, 71], [8, 9, 10, 11, 12, 13]], 2)
    prefixes = split.fit["train"]
    train = split.requests["train"]
    assert [p.tolist() for p in prefixes] == [[1, 2, 3, 4, 5], [8, 9]]
    assert train.user_idx.tolist() == [0, 0, 1, 1]
    assert [h.tolist() for h in train.histories] == [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], [8, 9], [8, 9, 10]]
    assert train.targets.tolist() == [6, 7, 10, 11]
    assert split.requests["test"].targets.tolist() == [71, 13]


def _assert_no_leak(split):
    """Each list's target is absent from its own split's fit data (what its ranker, teacher and
    evidence see) and from the train split's fit data (what mid-training sees) for that user."""
    position = {int(u): i for i, u in enumerate(split.users)}
    for name, req in split.requests.items():
        for u, h, t in zip(req.user_idx, req.histories, req.targets):
            for fit_name in {name, "train"}:
                seen = split.fit[fit_name][position[int(u)]]
                assert len(seen) <= len(h) and int(t) not in seen.tolist()


@pytest.mark.parametrize("protocol", ["leave_one_out", "time"])
def test_protocols_keep_targets_unseen(protocol):
    rng = np.random.default_rng(0)
    users = list(range(30))
    seqs, stamps = [], []
    for u in users:
        n = int(rng.integers(3, 25))
        seqs.append(rng.permutation(200)[:n].tolist())  # no repeats, as after the k-core
        stamps.append(np.sort(rng.integers(0, 10_000, size=n)).tolist())
    if protocol == "time":
        split = time_protocol(users, seqs, stamps, 0.6, 0.8, 0.2, seed=1)
    else:
        split = leave_one_out_protocol(users, seqs, 3)
    _assert_no_leak(split)
    assert len(split.requests["train"]) and len(split.requests["test"])
    seq_of = dict(zip(users, seqs))
    for name, req in split.requests.items():
        for u, h, t in zip(req.user_idx, req.histories, req.targets):
            full = seq_of[int(u)]
            # history = exactly the user's interactions before the target, target = the next one
            assert full[: len(h)] == h.tolist() and full[len(h)] == t
            assert len(split.fit[name][list(users).index(int(u))]) <= len(h)
    if protocol == "time":
        assert not set(split.requests["train"].user_idx.tolist()) & set(split.requests["valid"].user_idx.tolist())
        t_train = split.notes["train_cutoff"]["timestamp"]
        stamp_of = dict(zip(users, stamps))
        for u, h in zip(split.requests["train"].user_idx, split.requests["train"].histories):
            assert stamp_of[int(u)][len(h)] > t_train  # training targets lie after the train cutoff


def test_time_protocol_bad_config():
    with pytest.raises(ConfigError, match="train_cutoff"):
        time_protocol([0], [[1, 2, 3]], [[1, 2, 3]], 0.9, 0.5, 0.1)
    with pytest.raises(ConfigError, match="no interaction falls between"):
        time_protocol([0, 1], [[1, 2], [3, 4]], [[1, 1], [1, 1]], 0.3, 0.6, 0.0)


def test_candidates_bad_input(tmp_path):
    with pytest.raises(DataError, match="gr2 data"):
        run_candidates(tmp_path, CandidatesConfig(upstream="popularity"))
    with pytest.raises(ConfigError, match="upstream"):
        from_dict(CandidatesConfig, {"upstream": "bm25"})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(CandidatesConfig, {"kk": 3})
    with pytest.raises(ConfigError, match="recency_decay"):
        ItemKNNConfig(recency_decay=0.0)
    items, seqs = synthetic_tables(n_users=10, n_items=12)
    write_data_stage(tmp_path, items, seqs)
    with pytest.raises(ConfigError, match="exceeds the catalog"):
        run_candidates(tmp_path, CandidatesConfig(upstream="popularity", k=50))
    # a history that masks all but < K of the 12 items gets no list: counted, not an error
    run_candidates(tmp_path, CandidatesConfig(upstream="popularity", k=10))
    report = json.loads((tmp_path / "candidates" / "report.json").read_text())
    long_users = sum(len(s) - 1 > 2 for s in seqs["items"])
    assert report["splits"]["test"]["dropped_too_few_rankable_items"] == long_users
    assert report["splits"]["test"]["requests"] == 10
    seqs["items"][3] = seqs["items"][3] + [99]  # an item the catalog does not have
    write_data_stage(tmp_path / "bad", items, seqs)
    with pytest.raises(UnknownItemError, match="99"):
        run_candidates(tmp_path / "bad", CandidatesConfig(upstream="popularity"))
