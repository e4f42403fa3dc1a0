"""Preprocessing (k-core, chronological order, drops), the data stage's outputs and the split helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gr2.data import (
    ItemCatalog,
    kcore,
    load_items,
    load_raw,
    load_sequences,
    load_stats,
    preprocess,
)
from gr2.data.formats import RawData
from gr2.errors import ConfigError, DataError, UnknownItemError
from gr2.pipeline.data import DataConfig, run_data
from gr2.splits import leave_one_out, train_sequences

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def make_raw(rows, items=None):
    """rows: (user, item, timestamp); items: {item_id: title} (default: every item titled)."""
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype({"user_id": str, "item_id": str})
    inter["timestamp"] = inter["timestamp"].astype(np.int64)
    ids = sorted(set(inter["item_id"])) if items is None else list(items)
    titles = [f"item {i}" for i in ids] if items is None else [items[i] for i in ids]
    meta = pd.DataFrame(
        {"item_id": [str(i) for i in ids], "title": titles, "categories": [[] for _ in ids],
         "year": np.full(len(ids), -1, dtype=np.int64), "description": ["" for _ in ids]}
    )
    return RawData(inter, meta, {"format": "test"})


def kcore_reference(pairs, k):
    """Naive fixed point: repeatedly remove any user or item with fewer than k rows."""
    pairs = list(pairs)
    while True:
        users = pd.Series([u for u, _ in pairs]).value_counts()
        items = pd.Series([i for _, i in pairs]).value_counts()
        kept = [(u, i) for u, i in pairs if users[u] >= k and items[i] >= k]
        if len(kept) == len(pairs):
            return kept
        pairs = kept
        if not pairs:
            return []


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=80), st.integers(1, 4))
def test_kcore_matches_naive_reference(pairs, k):
    frame = pd.DataFrame(pairs, columns=["user_id", "item_id"]) if pairs else pd.DataFrame(columns=["user_id", "item_id"])
    got = kcore(frame, k)
    assert list(map(tuple, got[["user_id", "item_id"]].to_numpy().tolist())) == kcore_reference(pairs, k)
    if len(got):
        assert got["user_id"].value_counts().min() >= k and got["item_id"].value_counts().min() >= k


def test_chronological_with_stable_tie_break():
    raw = load_raw("recbole", FIXTURES / "recbole")
    processed = preprocess(raw, kcore_k=4)
    first = processed.sequences.iloc[0]
    catalog_ids = processed.items["item_id"].tolist()
    # user 1 logged 11 then 10 at the same timestamp: file order wins over id order
    assert [catalog_ids[i] for i in first["items"]] == ["11", "10", "12", "13"]
    assert first["timestamps"] == sorted(first["timestamps"])
    assert processed.stats["dropped"]["items_without_kept_interactions"] == 1  # item 14 was never rated
    assert any("unkonwn" in note for note in processed.stats["notes"])


def test_timestamps_override_file_order():
    raw = make_raw([("u", "a", 30), ("u", "b", 10), ("u", "c", 20)])
    seq = preprocess(raw, kcore_k=1).sequences.iloc[0]
    assert seq["timestamps"] == [10, 20, 30]


def test_drops_are_counted_by_reason():
    rows = [(u, i, t) for u in "pqr" for t, i in enumerate("abcd")] + [("p", "ghost", 99), ("q", "a", 50)]
    raw = make_raw(rows, {"a": "A", "b": "B", "c": "C", "d": ""})
    processed = preprocess(raw, kcore_k=1)
    dropped = processed.stats["dropped"]
    assert dropped["interaction_unknown_item"] == 1
    assert dropped["item_no_text"] == 1 and dropped["interaction_item_no_text"] == 3
    assert dropped["duplicate_interaction"] == 1
    assert processed.stats["interactions"] == 9
    assert processed.stats["raw"]["interactions"] == len(rows)
    assert any("metadata lacks" in note for note in processed.stats["notes"])


def test_dataset_emptied_by_kcore():
    raw = make_raw([("u", "a", 1), ("u", "b", 2), ("v", "c", 3)])
    with pytest.raises(DataError, match="no interactions are left after the 5-core"):
        preprocess(raw, kcore_k=5)


def test_users_too_short_for_leave_one_out():
    raw = make_raw([("u", "a", 1), ("u", "b", 2), ("v", "a", 3), ("v", "b", 4), ("v", "c", 5)])
    processed = preprocess(raw, kcore_k=1)
    assert processed.stats["dropped"]["user_too_short"] == 2
    assert processed.sequences["user_id"].tolist() == ["v"]
    with pytest.raises(DataError, match="needs"):
        preprocess(make_raw([("u", "a", 1), ("u", "b", 2)]), kcore_k=1)


def test_history_cap_keeps_most_recent():
    raw = make_raw([("u", str(i), i) for i in range(10)])
    processed = preprocess(raw, kcore_k=1, max_seq_len=4)
    assert processed.sequences.iloc[0]["timestamps"] == [6, 7, 8, 9]
    assert processed.stats["dropped"]["history_cap"] == 6


def test_min_rating_without_ratings():
    with pytest.raises(DataError, match="no rating column"):
        preprocess(make_raw([("u", "a", 1), ("u", "b", 2), ("u", "c", 3)]), kcore_k=1, min_rating=4)


def test_leave_one_out_split_of_the_data_stage_output():
    """The one split (gr2.splits) over data/sequences-shaped input: train items[:-2], valid
    items[-2], test items[-1]; users under 3 items are listed, not dropped silently."""
    split = leave_one_out([0, 1], [[5, 6, 7, 8, 9], [1, 2]])
    assert split.user_idx.tolist() == [0] and split.skipped_users.tolist() == [1]
    assert split.train[0].tolist() == [5, 6, 7]
    assert split.valid_targets.tolist() == [8] and split.test_targets.tolist() == [9]
    assert split.test_histories()[0].tolist() == [5, 6, 7, 8]
    assert [t.tolist() for t in train_sequences({"items": [[5, 6, 7, 8, 9]]})] == [[5, 6, 7]]


def test_config_validation():
    with pytest.raises(ConfigError):
        DataConfig(kcore=-1)
    with pytest.raises(ConfigError):
        DataConfig(max_seq_len=2)


def test_run_data_schema_caching_and_catalog(tmp_path):
    config = DataConfig(format="movielens", path=str(FIXTURES / "ml-100k"), kcore=3)
    summary = run_data(tmp_path, config)
    assert summary == {"users": 3, "items": 3, "interactions": 9, "avg_seq_len": 3.0, "dropped": {}}
    items, sequences = load_items(tmp_path), load_sequences(tmp_path)
    assert items.column_names == ["item_idx", "item_id", "title", "categories", "year", "text"]
    assert sequences.column_names == ["user_idx", "user_id", "items", "timestamps"]
    assert items["item_idx"] == [0, 1, 2]
    assert items["text"][2] == "Café au Lait (1993) | Comedy"
    assert sequences["user_id"] == ["22", "186", "196"]  # natural numeric order
    stats = load_stats(tmp_path)
    assert stats["users"] == 3 and "seconds" in stats
    stamp = (tmp_path / "data" / "stage.json").stat().st_mtime_ns
    run_data(tmp_path, config)  # cached: nothing rewritten
    assert (tmp_path / "data" / "stage.json").stat().st_mtime_ns == stamp
    catalog = ItemCatalog.from_run_dir(tmp_path)
    assert catalog.title(catalog.index_of("1")) == "Toy Story"
    assert catalog.category(0) == ["Animation", "Children's", "Comedy"]
    with pytest.raises(UnknownItemError):
        catalog.title(3)
    with pytest.raises(UnknownItemError):
        catalog.index_of("nope")
    split = leave_one_out(sequences["user_idx"], sequences["items"])
    assert split.test_targets[0] == sequences["items"][0][-1]
    year = catalog.years[catalog.index_of("1")]
    assert year == 1995 and isinstance(year, int)
    with pytest.raises(DataError, match="without a SID index"):
        catalog.codes


def test_missing_run_dir_outputs(tmp_path):
    with pytest.raises(DataError, match="run the data stage first"):
        load_items(tmp_path)


def test_cli_data_on_fixture(tmp_path, capsys):
    from gr2.cli import main

    assert main(["data", "--run-dir", str(tmp_path), "--format", "movielens", "--path", str(FIXTURES / "ml-1m"), "--kcore", "3"]) == 0
    assert "3 users, 3 items, 9 interactions" in capsys.readouterr().out
    assert main(["data", "--run-dir", str(tmp_path), "--format", "movielens", "--path", str(FIXTURES / "ml-1m"), "--kcore", "9"]) == 2
    assert "no interactions are left" in capsys.readouterr().err


def test_ml100k_default_stats(tmp_path):
    summary = run_data(tmp_path)
    assert summary["users"] == 943
    assert summary["items"] == 1349  # the 5-core drops 333 rarely rated movies
    assert summary["interactions"] == 99287
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert 0.7 < stats["same_timestamp_share"] < 0.8
    assert stats["dropped"] == {"items_without_kept_interactions": 333, "kcore": 713}


def test_item_catalog_with_sids(tmp_path):
    """The one catalog class carries the run's SIDs when built with its index, and refuses an
    index that does not cover exactly its items."""
    import gr2

    run_data(tmp_path, DataConfig(format="movielens", path=str(FIXTURES / "ml-1m"), kcore=3))
    items = load_items(tmp_path)
    codes = np.array([[i, 0] for i in range(len(items))], dtype=np.uint16)
    index = gr2.SidIndex.build(np.arange(len(items), dtype=np.uint64), codes, 16)
    catalog = ItemCatalog(items, index)
    assert catalog.codes.tolist() == codes.tolist() and catalog.level_sizes == (16, 16)
    assert catalog.item_of_sid()[(1, 0)] == 1
    assert catalog.sid_text(1) == gr2.tokens.sid_to_text(codes[1])
    assert catalog.item_text(0).startswith(catalog.title(0))
    short = gr2.SidIndex.build(np.arange(1, dtype=np.uint64), codes[:1], 16)
    with pytest.raises(DataError, match="SID index holds 1 items"):
        ItemCatalog(items, short)
    with pytest.raises(DataError, match="run the sid stage"):
        ItemCatalog.from_run_dir(tmp_path, sids=True)
