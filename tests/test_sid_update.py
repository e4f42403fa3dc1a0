"""Stable SIDs for new items: ``SidIndex.extend``/``remove`` against a plain numpy reference, and
``gr2 sid --update`` / ``gr2.pipeline.sid.update_index`` on a tiny run (see tests/test_sid_stage.py)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import gr2
from gr2.errors import InvalidInputError, UnknownItemError
from gr2.pipeline.sid import update_index

# ----------------------------------------------------------------------------------------------
# the index operations, against numpy


def random_codes(rng, n, levels, size):
    return rng.integers(0, size, size=(n, levels), dtype=np.uint16)


def sid_table(index) -> dict[int, tuple[int, ...]]:
    return {int(i): tuple(int(c) for c in row) for i, row in zip(index.item_ids(), index.codes())}


def reference_kept(old_codes, new_codes):
    """Rows of ``new_codes`` that must keep their SID: no old item holds it and no other new item
    shares it (the one with the smallest id keeps it; ids here ascend with the row)."""
    taken = {tuple(r) for r in old_codes.tolist()}
    seen = set()
    kept = np.zeros(len(new_codes), dtype=bool)
    for row, sid in enumerate(map(tuple, new_codes.tolist())):
        kept[row] = sid not in taken and sid not in seen
        seen.add(sid)
    return kept


@pytest.mark.parametrize("levels,size,n,m", [(3, 16, 3000, 300), (3, 32, 3000, 300), (4, 256, 20000, 200), (2, 16, 40, 20), (1, 50, 0, 30)])
def test_extend_keeps_old_sids(levels, size, n, m):
    rng = np.random.default_rng(levels * 1000 + n)
    old_ids = np.sort(rng.choice(10 * (n + m) + 10, size=n + m, replace=False)).astype(np.uint64)
    new_ids, old_ids = old_ids[n:], old_ids[:n]
    old_codes, new_codes = random_codes(rng, n, levels, size), random_codes(rng, m, levels, size)
    base = gr2.SidIndex.build(old_ids, old_codes, codebook_size=size)
    try:
        after = base.extend(new_ids, new_codes)
    except InvalidInputError as err:  # only when a prefix is full: not with these seeds
        pytest.fail(str(err))
    np.testing.assert_array_equal(after.sids(old_ids), base.sids(old_ids))
    all_ids = np.concatenate([old_ids, new_ids])
    sids = after.sids(all_ids)
    assert len(np.unique(sids, axis=0)) == n + m
    np.testing.assert_array_equal(after.items(sids), all_ids)
    # an index with a disambiguation level takes input-width codes; their extra code is 0
    padded = np.hstack([new_codes, np.zeros((m, base.levels - levels), np.uint16)])
    kept = reference_kept(base.sids(old_ids), padded)
    np.testing.assert_array_equal(sids[n:][kept], padded[kept])
    moved = ~kept
    # movers stay under their prefix: only the last input level (or the disambiguation level) changes
    np.testing.assert_array_equal(sids[n:][moved][:, :levels - 1], new_codes[moved][:, :levels - 1])
    if not base.repair_report()["level_appended"]:
        assert after.repair_report()["items_moved"] == base.repair_report()["items_moved"] + int(moved.sum())
    assert (after.generation, base.generation, len(after)) == (1, 0, n + m)


def test_remove_keeps_the_others():
    rng = np.random.default_rng(3)
    ids = np.arange(5000, dtype=np.uint64) * 7
    base = gr2.SidIndex.build(ids, random_codes(rng, 5000, 3, 16), codebook_size=16)
    gone = rng.choice(ids, size=700, replace=False)
    after = base.remove(gone)
    kept = np.setdiff1d(ids, gone)
    np.testing.assert_array_equal(after.sids(kept), base.sids(kept))
    assert len(after) == len(kept) and not any(int(g) in after for g in gone[:50])
    assert after.generation == 1 and after.levels == base.levels
    with pytest.raises(UnknownItemError, match=r"item id 5 \(row 1\)"):
        base.remove(np.array([0, 5], dtype=np.uint64))


def test_bad_input_is_a_typed_error_naming_the_row():
    base = gr2.SidIndex.build(np.arange(4, dtype=np.uint64), np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.uint16),
                              codebook_size=4)
    with pytest.raises(InvalidInputError, match=r"item id 2 \(row 1\) is already in the SID index"):
        base.extend(np.array([9, 2], np.uint64), np.array([[2, 2], [2, 3]], np.uint16))
    with pytest.raises(InvalidInputError, match=r"item id 9 appears more than once.*rows 0 and 2"):
        base.extend(np.array([9, 8, 9], np.uint64), np.array([[2, 2], [2, 3], [3, 3]], np.uint16))
    with pytest.raises(InvalidInputError, match="codes have 3 levels but the SID index takes 2"):
        base.extend(np.array([9], np.uint64), np.array([[2, 2, 2]], np.uint16))
    with pytest.raises(InvalidInputError, match=r"codes\[0, 1\] = 4"):
        base.extend(np.array([9], np.uint64), np.array([[2, 4]], np.uint16))
    with pytest.raises(InvalidInputError, match="uint16"):
        base.extend(np.array([9], np.uint64), np.array([[2, 2]], np.int64))
    with pytest.raises(InvalidInputError, match="must match"):
        base.extend(np.array([9, 10], np.uint64), np.array([[2, 2]], np.uint16))
    # prefix (0,) has codes 2 and 3 free: items 9 and 10 take them, 11 finds it full and the index
    # has no level to fall back on
    with pytest.raises(InvalidInputError, match=r"item id 11 \(row 2\) cannot get a unique SID"):
        base.extend(np.array([9, 10, 11], np.uint64), np.array([[0, 0], [0, 0], [0, 0]], np.uint16))
    assert len(base) == 4 and base.generation == 0


def test_generation_is_saved_and_old_files_read_as_zero(tmp_path):
    base = gr2.SidIndex.build(np.arange(10, dtype=np.uint64), random_codes(np.random.default_rng(0), 10, 2, 64),
                              codebook_size=64)
    data = base.to_bytes()
    assert int.from_bytes(data[44:48], "little") == 0  # the formerly reserved field: files of older gr2
    after = base.extend(np.array([100], np.uint64), np.array([[1, 1]], np.uint16)).remove(np.array([0], np.uint64))
    path = tmp_path / "index.gr2sid"
    after.save(path)
    raw = path.read_bytes()
    assert int.from_bytes(raw[8:12], "little") == 2  # format version unchanged
    assert int.from_bytes(raw[44:48], "little") == 2
    for loaded in (gr2.SidIndex.load(path), gr2.SidIndex.load(path, mmap=True), pickle.loads(pickle.dumps(after))):
        assert loaded.generation == 2 and sid_table(loaded) == sid_table(after)
    assert "generation=2" in repr(after)


# ----------------------------------------------------------------------------------------------
# the stage: gr2.pipeline.sid.update_index and `gr2 sid --update`


@pytest.fixture(scope="module")
def sid_run(tmp_path_factory):
    """A finished data + sid stage on a slice of ml-100k, and the TOML that configured it."""
    from _tiny_models import save_tiny_encoder

    from gr2.pipeline.data import DataConfig, run_data
    from gr2.data.formats import default_ml100k_dir
    from gr2.pipeline.sid import run_sid
    from gr2.pipeline.sid import config_from_file

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("sid_update")
    source = default_ml100k_dir()
    lines = (source / "ml-100k.inter").read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if int(line.split("\t")[0]) <= 40]
    (folder / "slice.inter").write_text("\n".join(kept) + "\n")
    (folder / "slice.item").write_text((source / "ml-100k.item").read_text())
    run_dir = folder / "run"
    run_data(run_dir, DataConfig(path=str(folder)))
    encoder = save_tiny_encoder(folder / "tiny_bert")
    toml = folder / "sid.toml"
    toml.write_text(f'[sid]\nembed_model = "{encoder}"\n[sid.rqvae]\nlevels = 3\ncodebook_size = 32\n'
                    'latent_dim = 8\nhidden_dims = [32]\nepochs = 3\n')
    config = config_from_file(str(toml))
    run_sid(run_dir, config, progress=False)
    yield run_dir, toml, config
    torch.set_num_threads(before)


def test_update_adds_missing_items_keeping_old_sids(sid_run, capsys):
    from gr2.cli import main
    from gr2.data import load_items
    from gr2.pipeline.sid import load_index, run_sid

    run_dir, toml, config = sid_run
    n_items = len(load_items(run_dir))
    original = load_index(run_dir)
    assert len(original) == n_items
    # Drop 5% of the items (as if the index had been built before they existed) ...
    rng = np.random.default_rng(0)
    gone = np.sort(rng.choice(n_items, size=n_items // 20, replace=False)).astype(np.uint64)
    summary = update_index(run_dir, config, remove=gone, progress=False)
    assert summary["removed"] == len(gone) and summary["items"] == n_items - len(gone)
    smaller = load_index(run_dir)
    survivors = np.setdiff1d(np.arange(n_items, dtype=np.uint64), gone)
    np.testing.assert_array_equal(smaller.sids(survivors), original.sids(survivors))

    # ... then `gr2 sid --update` encodes the items of data/items the index lacks.
    assert main(["sid", "--run-dir", str(run_dir), "--config", str(toml), "--update", "--quiet"]) == 0
    assert f"{len(gone)} items added" in capsys.readouterr().out
    updated = load_index(run_dir)
    ids = np.arange(n_items, dtype=np.uint64)
    assert len(updated) == n_items and updated.generation == original.generation + 2
    np.testing.assert_array_equal(updated.sids(survivors), original.sids(survivors))
    sids = updated.sids(ids)
    assert len(np.unique(sids, axis=0)) == n_items
    report = json.loads((run_dir / "sid" / "report.json").read_text())
    assert [u["generation"] for u in report["updates"]] == [1, 2]
    assert report["updates"][1]["added"] == len(gone) and report["items"] == n_items
    # the stage record vouches for the updated index: rerunning the stage keeps it
    assert run_sid(run_dir, config, progress=False)["generation"] == 2
    np.testing.assert_array_equal(load_index(run_dir).sids(ids), sids)
    # nothing left to add: no new generation
    assert update_index(run_dir, config, progress=False)["added"] == 0
    assert load_index(run_dir).generation == 2


def test_failed_update_leaves_the_index_untouched(sid_run):
    from gr2.pipeline.sid import item_embeddings

    run_dir, _, config = sid_run
    path = run_dir / "sid" / "index.gr2sid"
    stage_record = (run_dir / "sid" / "stage.json").read_bytes()
    before = path.read_bytes()
    embeddings, _ = item_embeddings(run_dir, config, progress=False)
    rows = embeddings[:3].copy()
    present = np.array([10**6, 3, 10**6 + 1], dtype=np.uint64)
    with pytest.raises(InvalidInputError, match=r"item id 3 \(row 1\) is already in the SID index"):
        update_index(run_dir, config, item_ids=present, embeddings=rows, progress=False)
    fresh = np.array([10**6, 10**6 + 1, 10**6 + 2], dtype=np.uint64)
    with pytest.raises(InvalidInputError, match=f"width {rows.shape[1] + 1}"):
        update_index(run_dir, config, item_ids=fresh, embeddings=np.hstack([rows, rows[:, :1]]), progress=False)
    nan_rows = rows.copy()
    nan_rows[1, 4] = np.nan
    with pytest.raises(InvalidInputError, match=r"row 1 \(item id 1000001\) holds NaN"):
        update_index(run_dir, config, item_ids=fresh, embeddings=nan_rows, progress=False)
    with pytest.raises(UnknownItemError, match=r"row 0"):
        update_index(run_dir, config, item_ids=fresh, embeddings=rows, remove=np.array([10**7]), progress=False)
    # issue 32: -1 was added as item 18446744073709551615 and 7000.7 as 7000
    for bad, match in (([10**6, -1, 10**6 + 1], "negative item id"), (np.array([10**6, -1, 5], dtype=np.int64), "negative"),
                       ([10**6, 7000.7, 10**6 + 1], "integer item ids")):
        with pytest.raises(InvalidInputError, match=f"item_ids.*{match}"):
            update_index(run_dir, config, item_ids=bad, embeddings=rows, progress=False)
    with pytest.raises(InvalidInputError, match="remove.*negative item id"):
        update_index(run_dir, config, item_ids=fresh, embeddings=rows, remove=[-1], progress=False)
    assert path.read_bytes() == before
    assert (run_dir / "sid" / "stage.json").read_bytes() == stage_record

    # given items outside data/items are added the same way, with the saved encoder
    index = gr2.SidIndex.load(path)
    update_index(run_dir, config, item_ids=fresh, embeddings=rows, progress=False)
    after = gr2.SidIndex.load(path)
    old_ids = index.item_ids()
    np.testing.assert_array_equal(after.sids(old_ids), index.sids(old_ids))
    assert all(int(i) in after for i in fresh) and after.generation == index.generation + 1


@pytest.mark.parametrize("killed_after", ["marker", "index save"])
def test_a_killed_update_is_finished_not_rebuilt(sid_run, monkeypatch, killed_after, caplog):
    """Issue 31: a kill between the new index and its record made the next run retrain the RQ-VAE
    and move 605 of 606 SIDs. Now the next run keeps whichever index is on disk (the old one, or
    the update's, each saved atomically) and only rewrites the records."""
    from gr2.pipeline.sid import load_index, run_sid
    from gr2.pipeline import sid as sid_stage
    from gr2.pipeline.sid import item_embeddings

    run_dir, _, config = sid_run
    before = load_index(run_dir)
    old_ids = before.item_ids()
    embeddings, _ = item_embeddings(run_dir, config, progress=False)
    fresh = np.array([2 * 10**6 + len(old_ids), 2 * 10**6 + len(old_ids) + 1], dtype=np.uint64)

    class Killed(BaseException):
        pass

    def kill(*args, **kwargs):
        raise Killed

    if killed_after == "marker":  # dies before the new index is saved
        monkeypatch.setattr(gr2.SidIndex, "save", kill)
    else:  # dies after the save, before the records
        monkeypatch.setattr(sid_stage, "_record_update", kill)
    with pytest.raises(Killed):
        update_index(run_dir, config, item_ids=fresh, embeddings=embeddings[:2], progress=False)
    monkeypatch.undo()
    assert not (run_dir / "sid" / "stage.json").exists() and (run_dir / "sid" / "update.pending").exists()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the sid stage was rebuilt")

    monkeypatch.setattr(sid_stage, "_run_sid", no_rebuild)
    with caplog.at_level("WARNING", logger="gr2.pipeline.sid"):
        summary = run_sid(run_dir, config, progress=False)
    assert "completed an interrupted update" in caplog.text
    after = load_index(run_dir)
    np.testing.assert_array_equal(after.sids(old_ids), before.sids(old_ids))
    assert all((int(i) in after) == (killed_after == "index save") for i in fresh)
    assert summary["generation"] == after.generation and not (run_dir / "sid" / "update.pending").exists()
    # the record now vouches for that index: the next run is a plain skip
    assert run_sid(run_dir, config, progress=False)["generation"] == after.generation


def test_update_refuses_data_that_moved_indexed_items(sid_run, tmp_path):
    """Issue 31: growing the catalog and rerunning `gr2 data` reassigned item_idx in id order, and
    `gr2 sid --update` then silently gave 502 of 504 existing items another item's SID. The update
    now compares the catalog ids recorded with the index against data/items and refuses."""
    import shutil

    import datasets

    import gr2.rundir
    from gr2.errors import DataError
    from gr2.pipeline.sid import load_index

    run_dir, _, config = sid_run
    assert (run_dir / "sid" / "catalog_ids.parquet").exists()
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    table = datasets.load_from_disk(str(moved / "data" / "items")).to_dict()  # in memory, off the files
    table["item_id"][0], table["item_id"][1] = table["item_id"][1], table["item_id"][0]  # a reassigned item_idx
    swapped = datasets.Dataset.from_dict(table)
    shutil.rmtree(moved / "data" / "items")
    swapped.save_to_disk(str(moved / "data" / "items"))
    record = gr2.rundir.load_json(moved / "data" / "stage.json")  # as a rerun of the data stage would
    gr2.rundir.mark_done(moved / "data", record["key"], record["summary"])
    before = (moved / "sid" / "index.gr2sid").read_bytes()
    with pytest.raises(DataError, match=r"2 indexed items another item_idx .*item_idx 0 was catalog item"):
        update_index(moved, config, progress=False)
    assert (moved / "sid" / "index.gr2sid").read_bytes() == before
    assert len(load_index(moved)) == len(load_index(run_dir))
