"""gr2.SidIndex against a plain Python reference of the collision repair and of both lookups."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gr2
from gr2 import SidIndex

# --------------------------------------------------------------------------------------------
# Reference: the documented repair strategy, written as plainly as possible.


def reference_build(item_ids, codes, level_sizes):
    """Final SID (tuple) per input row, whether a level was appended, and the report counts."""
    ids = [int(x) for x in item_ids]
    sids = [tuple(int(c) for c in row) for row in codes]
    n = len(ids)
    levels = codes.shape[1]
    counts = Counter(sids)
    order = sorted(range(n), key=lambda r: (sids[r], ids[r]))
    final = [list(s) for s in sids]
    by_prefix = defaultdict(list)
    for r in order:
        by_prefix[sids[r][:-1]].append(r)
    moved, max_distance, full_prefixes, stuck = 0, 0, 0, False
    for rows in by_prefix.values():
        taken = {sids[r][-1] for r in rows}
        movers = [b for a, b in zip(rows, rows[1:]) if sids[a] == sids[b]]
        prefix_full = False
        for r in movers:
            code = sids[r][-1]
            free = [c for c in range(level_sizes[-1]) if c not in taken]
            if not free:
                prefix_full = stuck = True
                continue
            target = min(free, key=lambda c: (abs(c - code), c))
            taken.add(target)
            final[r][-1] = target
            moved += 1
            max_distance = max(max_distance, abs(target - code))
        full_prefixes += prefix_full
    disambiguated = 0
    if stuck:
        rank = Counter()
        for r in sorted(range(n), key=lambda r: (tuple(final[r]), ids[r])):
            key = tuple(final[r])
            final[r].append(rank[key])
            disambiguated += rank[key] > 0
            rank[key] += 1
    group_sizes = Counter(size for size in counts.values() if size > 1)
    report = {
        "items": n,
        "levels_in": levels,
        "levels_out": levels + stuck,
        "unique_items_before": sum(1 for s in sids if counts[s] == 1),
        "distinct_sids_before": len(counts),
        "collision_groups": sum(group_sizes.values()),
        "collision_group_sizes": dict(group_sizes),
        "items_moved": moved,
        "max_move_distance": max_distance,
        "full_prefixes": full_prefixes,
        "level_appended": stuck,
        "items_disambiguated": disambiguated,
    }
    return [tuple(f) for f in final], report


def check_against_reference(index, item_ids, codes, level_sizes):
    final, report = reference_build(item_ids, codes, level_sizes)
    n = len(item_ids)
    got_report = index.repair_report()
    for key, value in report.items():
        assert got_report[key] == value, key
    expected_uniqueness = report["unique_items_before"] / n if n else 1.0
    assert index.uniqueness_before_repair == pytest.approx(expected_uniqueness)
    assert len(index) == n
    assert index.levels == report["levels_out"]
    assert index.level_sizes[: codes.shape[1]] == list(level_sizes)

    sids = index.sids(np.asarray(item_ids, dtype=np.uint64))
    assert sids.dtype == np.uint16 and sids.shape == (n, index.levels)
    assert [tuple(map(int, row)) for row in sids] == final
    assert len(set(final)) == n, "repair must leave every SID unique"
    np.testing.assert_array_equal(index.items(sids), np.asarray(item_ids, dtype=np.uint64))

    # Sorted view: SIDs ascending, item ids aligned with them.
    by_sid = sorted(zip(final, (int(x) for x in item_ids)))
    np.testing.assert_array_equal(index.item_ids(), np.array([i for _, i in by_sid], dtype=np.uint64))
    np.testing.assert_array_equal(
        index.codes().reshape(n, index.levels), np.array([s for s, _ in by_sid], dtype=np.uint16).reshape(n, index.levels)
    )
    return final


def random_dataset(rng, n, levels, size, *, sparse_ids=True):
    if sparse_ids:
        ids = rng.permutation(np.unique(rng.integers(0, 2**64 - 1, size=n + 10, dtype=np.uint64, endpoint=True))[:n])
    else:
        ids = rng.permutation(n).astype(np.uint64)
    codes = rng.integers(0, size, size=(n, levels)).astype(np.uint16)
    return ids, codes


# --------------------------------------------------------------------------------------------
# Building and repair


@pytest.mark.parametrize("sparse_ids", [True, False])
def test_random_data_matches_reference(sparse_ids):
    rng = np.random.default_rng(0)
    ids, codes = random_dataset(rng, 3000, 3, 12, sparse_ids=sparse_ids)
    index = SidIndex.build(ids, codes, codebook_size=12)
    final = check_against_reference(index, ids, codes, [12, 12, 12])
    assert index.repair_report()["items_moved"] > 0
    # Items whose SID was unique keep it.
    counts = Counter(map(tuple, codes.tolist()))
    for row, sid in zip(codes.tolist(), final):
        if counts[tuple(row)] == 1:
            assert sid[: len(row)] == tuple(row)


def test_heavy_collisions_move_to_nearest_free_codes():
    rng = np.random.default_rng(1)
    ids = rng.choice(10**6, size=2000, replace=False).astype(np.uint64)
    codes = rng.integers(0, 3, size=(2000, 3)).astype(np.uint16)  # 27 SIDs, ~220 items per prefix
    index = SidIndex.build(ids, codes)
    assert index.level_sizes == [256, 256, 256]
    check_against_reference(index, ids, codes, [256, 256, 256])
    report = index.repair_report()
    assert not report["level_appended"] and report["items_moved"] == 2000 - 27
    assert report["max_move_distance"] > 100


def test_full_prefix_appends_one_level_to_all():
    rng = np.random.default_rng(2)
    ids = rng.permutation(500).astype(np.uint64)
    codes = rng.integers(0, 2, size=(500, 3)).astype(np.uint16)
    index = SidIndex.build(ids, codes, codebook_size=[2, 2, 4])
    final = check_against_reference(index, ids, codes, [2, 2, 4])
    report = index.repair_report()
    assert report["level_appended"] and index.levels == 4
    assert report["appended_level_size"] == index.level_sizes[3] == max(Counter(s[:3] for s in final).values())
    assert all(len(s) == 4 for s in final)


def test_all_equal_codes():
    ids = np.arange(10, 20, dtype=np.uint64)
    codes = np.full((10, 2), 5, dtype=np.uint16)
    index = SidIndex.build(ids, codes, codebook_size=8)
    check_against_reference(index, ids, codes, [8, 8])
    assert index.uniqueness_before_repair == 0.0
    assert index.repair_report()["collision_group_sizes"] == {10: 1}


def test_empty_and_single():
    empty = SidIndex.build(np.zeros(0, np.uint64), np.zeros((0, 4), np.uint16))
    assert len(empty) == 0 and empty.levels == 4 and empty.uniqueness_before_repair == 1.0
    assert empty.sids(np.zeros(0, np.uint64)).shape == (0, 4)
    assert empty.items(np.zeros((0, 4), np.uint16)).shape == (0,)
    assert empty.item_ids().shape == (0,) and empty.codes().shape == (0, 4)
    assert list(empty.children([])) == []
    with pytest.raises(gr2.UnknownItemError):
        empty.sids(np.array([0], np.uint64))

    one = SidIndex.build(np.array([2**64 - 1], np.uint64), np.array([[7, 0, 3]], np.uint16))
    assert one.sids(np.array([2**64 - 1], np.uint64)).tolist() == [[7, 0, 3]]
    assert one.items(np.array([[7, 0, 3]], np.uint16)).tolist() == [2**64 - 1]
    assert 2**64 - 1 in one and 0 not in one and -1 not in one
    with pytest.raises(gr2.InvalidInputError, match="item_id must be an int"):
        "x" in one  # noqa: B015


def test_children_and_prefix_range_match_sorted_view():
    rng = np.random.default_rng(3)
    ids, codes = random_dataset(rng, 400, 3, 5)
    index = SidIndex.build(ids, codes, codebook_size=5)
    all_codes = index.codes()
    rows = [tuple(map(int, r)) for r in all_codes]
    for prefix in [(), (0,), (4,), (1, 2), (3, 3), (1, 2, 3), tuple(rows[17]), tuple(rows[17][:2])]:
        depth = len(prefix)
        under = [i for i, r in enumerate(rows) if r[:depth] == prefix]
        start, end = index.prefix_range(list(prefix))
        assert (start, end) == ((under[0], under[-1] + 1) if under else (start, start))
        expected = sorted({rows[i][depth] for i in under}) if depth < index.levels else []
        children = index.children(list(prefix))
        assert children.dtype == np.uint16 and children.tolist() == expected
    np.testing.assert_array_equal(index.children(np.array([0], np.uint16)), index.children((0,)))
    with pytest.raises(gr2.InvalidInputError, match="level size"):
        index.children([5])
    with pytest.raises(gr2.InvalidInputError, match="levels"):
        index.children([0] * (index.levels + 1))
    with pytest.raises(gr2.InvalidInputError):
        index.children([-1])
    with pytest.raises(gr2.InvalidInputError):
        index.children("ab")


# --------------------------------------------------------------------------------------------
# Input errors


def test_duplicate_ids_are_named():
    ids = np.array([5, 9, 3, 9], np.uint64)
    with pytest.raises(gr2.InvalidInputError, match=r"item id 9 appears more than once \(rows 1 and 3\)"):
        SidIndex.build(ids, np.zeros((4, 2), np.uint16))


def test_codes_out_of_range():
    codes = np.array([[1, 2], [3, 8]], np.uint16)
    with pytest.raises(gr2.InvalidInputError, match=r"codes\[1, 1\] = 8 .* codebook size 8"):
        SidIndex.build(np.array([1, 2], np.uint64), codes, codebook_size=8)
    with pytest.raises(gr2.InvalidInputError, match="codebook_size"):
        SidIndex.build(np.array([1, 2], np.uint64), codes, codebook_size=0)
    with pytest.raises(gr2.InvalidInputError, match="codebook_size"):
        SidIndex.build(np.array([1, 2], np.uint64), codes, codebook_size=[16])
    with pytest.raises(gr2.InvalidInputError, match="codebook_size"):
        SidIndex.build(np.array([1, 2], np.uint64), codes, codebook_size="big")
    # The default codebook size grows past 256 when a code needs it.
    big = SidIndex.build(np.array([1, 2], np.uint64), np.array([[1, 2], [3, 300]], np.uint16))
    assert big.level_sizes == [301, 301]


@pytest.mark.parametrize(
    "item_ids, codes, match",
    [
        (np.arange(3), np.zeros((3, 2), np.uint16), r"item_ids must be a numpy uint64 array .* got a int64 array of shape \(3,\)"),
        ([0, 1, 2], np.zeros((3, 2), np.uint16), "got a list"),
        (np.arange(6, dtype=np.uint64).reshape(3, 2), np.zeros((3, 2), np.uint16), r"shape \(3, 2\)"),
        (np.arange(3, dtype=np.uint64), np.zeros((3, 2), np.int32), "codes must be a numpy uint16 array"),
        (np.arange(3, dtype=np.uint64), np.zeros(3, np.uint16), r"codes must be .* got a uint16 array of shape \(3,\)"),
        (np.arange(3, dtype=np.uint64), np.zeros((4, 2), np.uint16), "3 entries but codes has 4 rows"),
        (np.arange(3, dtype=np.uint64), np.zeros((3, 0), np.uint16), "at least one level"),
        (np.arange(3, dtype=np.uint64), np.zeros((3, 5), np.uint16).astype(">u2"), "uint16"),
    ],
)
def test_wrong_dtypes_and_shapes(item_ids, codes, match):
    with pytest.raises(gr2.InvalidInputError, match=match):
        SidIndex.build(item_ids, codes)


def test_too_many_levels_for_64_bits():
    with pytest.raises(gr2.InvalidInputError, match="64 bits"):
        SidIndex.build(np.arange(2, dtype=np.uint64), np.zeros((2, 5), np.uint16), codebook_size=65536)


def test_non_contiguous_inputs_are_accepted():
    rng = np.random.default_rng(4)
    ids, codes = random_dataset(rng, 200, 4, 6)
    wide = np.zeros((200, 8), np.uint16)
    wide[:, ::2] = codes
    spaced_ids = np.zeros(400, np.uint64)
    spaced_ids[::2] = ids
    index = SidIndex.build(spaced_ids[::2], wide[:, ::2], codebook_size=6)
    check_against_reference(index, ids, codes, [6] * 4)
    np.testing.assert_array_equal(index.sids(spaced_ids[::2]), index.sids(ids))


def test_lookup_errors_name_first_offender():
    rng = np.random.default_rng(5)
    ids, codes = random_dataset(rng, 20000, 3, 256)
    index = SidIndex.build(ids, codes)
    queries = ids.copy()
    queries[15000] = 12345  # not an id (ids are huge random values)
    queries[9000] = 777
    with pytest.raises(gr2.UnknownItemError, match=r"item id 777 \(row 9000\)") as info:
        index.sids(queries)
    assert isinstance(info.value, KeyError)

    sids = index.sids(ids)
    present = {tuple(r) for r in sids.tolist()}
    absent = next(s for s in ((a, b, 7) for a in range(256) for b in range(256)) if s not in present)
    sids[16000] = absent
    sids[12000] = absent
    with pytest.raises(gr2.UnknownSidError, match=rf"SID \[{absent[0]}, {absent[1]}, 7\] \(row 12000\) maps to no item") as info:
        index.items(sids)
    assert isinstance(info.value, KeyError)
    with pytest.raises(gr2.InvalidInputError, match=r"sids must be a numpy uint16 array of shape \(n, 3\)"):
        index.items(sids[:, :2].copy())
    with pytest.raises(gr2.InvalidInputError):
        index.items(sids.astype(np.int64))
    with pytest.raises(gr2.InvalidInputError):
        index.sids(ids.astype(np.int64))


def test_out_of_range_sid_code_is_unknown_sid():
    index = SidIndex.build(np.arange(4, dtype=np.uint64), np.array([[0, 1], [1, 2], [2, 0], [3, 3]], np.uint16), codebook_size=4)
    with pytest.raises(gr2.UnknownSidError, match=r"\[0, 9\] \(row 1\) is not a valid SID: its level-1 code 9 is >= the level size 4"):
        index.items(np.array([[0, 1], [0, 9]], np.uint16))


def test_repr_and_report_are_json_friendly():
    import json

    index = SidIndex.build(np.arange(3, dtype=np.uint64), np.array([[1, 1], [1, 1], [2, 2]], np.uint16))
    text = repr(index)
    assert "SidIndex(items=3, levels=2" in text and "level_appended=False" in text
    report = index.repair_report()
    json.dumps(report)
    assert report["uniqueness_before_repair"] == pytest.approx(1 / 3)
    assert report["distinct_ratio_before"] == pytest.approx(2 / 3)
    assert index.nbytes >= 20 * 3


# --------------------------------------------------------------------------------------------
# Files


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    ids, codes = random_dataset(rng, 5000, 2, 16)
    codes[:, 1] %= 4
    index = SidIndex.build(ids, codes, codebook_size=[16, 4])
    assert index.repair_report()["level_appended"]
    path = tmp_path / "sid" / "index.gr2sid"
    path.parent.mkdir()
    index.save(path)
    loaded = SidIndex.load(str(path))
    assert loaded.level_sizes == index.level_sizes and loaded.levels == index.levels
    assert loaded.repair_report() == index.repair_report()
    np.testing.assert_array_equal(loaded.codes(), index.codes())
    np.testing.assert_array_equal(loaded.item_ids(), index.item_ids())
    np.testing.assert_array_equal(loaded.sids(ids), index.sids(ids))
    np.testing.assert_array_equal(loaded.items(index.codes()), index.item_ids())
    check_against_reference(loaded, ids, codes, [16, 4])
    assert os.listdir(path.parent) == ["index.gr2sid"], "no temporary files left behind"
    # Saving again replaces the file atomically, and a loaded (mapped) index can be re-saved.
    loaded.save(path)
    np.testing.assert_array_equal(SidIndex.load(path).codes(), index.codes())


@pytest.fixture
def saved(tmp_path):
    index = SidIndex.build(np.arange(1000, dtype=np.uint64), np.random.default_rng(7).integers(0, 256, (1000, 4)).astype(np.uint16))
    path = tmp_path / "index.gr2sid"
    index.save(path)
    return path, path.read_bytes()


def test_truncated_file(saved):
    path, data = saved
    for cut in [0, 5, 100, len(data) // 2, len(data) - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(gr2.CorruptFileError, match="truncated|empty|not a gr2 SID index") as info:
            SidIndex.load(path)
        assert str(path) in str(info.value) and isinstance(info.value, OSError)


def test_flipped_bytes(saved):
    path, data = saved
    rng = np.random.default_rng(8)
    for offset in [0, 9, 13, 17, 30, 40, 60, 200, *rng.integers(144, len(data), 20).tolist()]:
        garbled = bytearray(data)
        garbled[offset] ^= 0x10
        path.write_bytes(bytes(garbled))
        with pytest.raises(gr2.CorruptFileError):
            SidIndex.load(path)


def test_wrong_magic_and_version(saved):
    path, data = saved
    path.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(gr2.CorruptFileError, match="not a gr2 SID index"):
        SidIndex.load(path)
    path.write_bytes(data[:8] + (7).to_bytes(4, "little") + data[12:])
    with pytest.raises(gr2.CorruptFileError, match="format version 7, but this gr2 reads versions 1 and 2"):
        SidIndex.load(path)


def test_missing_file_is_an_io_error(tmp_path):
    with pytest.raises(gr2.Gr2IOError, match="nothere.gr2sid") as info:
        SidIndex.load(tmp_path / "nothere.gr2sid")
    assert isinstance(info.value, OSError)
    index = SidIndex.build(np.arange(2, dtype=np.uint64), np.zeros((2, 1), np.uint16))
    with pytest.raises(gr2.Gr2IOError, match="missing"):
        index.save(tmp_path / "missing" / "index.gr2sid")


def test_failed_save_leaves_old_file_intact(tmp_path):
    """A save that dies mid-write (file-size limit hit) must keep the previous file loadable."""
    path = tmp_path / "index.gr2sid"
    old = SidIndex.build(np.arange(10, dtype=np.uint64), np.arange(10, dtype=np.uint16).reshape(10, 1))
    old.save(path)
    before = path.read_bytes()
    script = f"""
import resource, signal, sys
import numpy as np
import gr2
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
n = 200_000
codes = np.stack([np.arange(n) % 65536, np.arange(n) // 65536], axis=1).astype(np.uint16)
big = gr2.SidIndex.build(np.arange(n, dtype=np.uint64), codes, codebook_size=65536)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    big.save({str(path)!r})
except gr2.Gr2IOError as err:
    print("failed as expected:", err)
    sys.exit(0)
sys.exit("save unexpectedly succeeded")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed as expected" in result.stdout
    assert path.read_bytes() == before
    assert SidIndex.load(path).sids(np.array([3], np.uint64)).tolist() == [[3]]
    assert os.listdir(tmp_path) == ["index.gr2sid"], "the temporary file must be removed"


# --------------------------------------------------------------------------------------------
# Threads


def test_concurrent_lookups_from_threads(tmp_path):
    rng = np.random.default_rng(9)
    ids, codes = random_dataset(rng, 50_000, 4, 64)
    built = SidIndex.build(ids, codes)
    built.save(tmp_path / "i.gr2sid")
    loaded = SidIndex.load(tmp_path / "i.gr2sid")
    expected = built.sids(ids)
    barrier = threading.Barrier(6)

    def work(seed):
        local = np.random.default_rng(seed)
        barrier.wait()
        for _ in range(10):
            index = built if local.random() < 0.5 else loaded
            pick = local.integers(0, len(ids), 5000)
            got = index.sids(ids[pick])
            np.testing.assert_array_equal(got, expected[pick])
            np.testing.assert_array_equal(index.items(got), ids[pick])
            assert len(index.children(got[0, :2].tolist())) >= 1
        return True

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(work, range(6)))


# --------------------------------------------------------------------------------------------
# Property tests


@st.composite
def datasets(draw):
    n = draw(st.integers(0, 60))
    levels = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 5), min_size=levels, max_size=levels))
    ids = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    codes = [[draw(st.integers(0, s - 1)) for s in sizes] for _ in range(n)]
    return (
        np.array(ids, dtype=np.uint64),
        np.array(codes, dtype=np.uint16).reshape(n, levels),
        sizes,
    )


@given(datasets())
def test_property_matches_reference(data):
    ids, codes, sizes = data
    index = SidIndex.build(ids, codes, codebook_size=sizes)
    check_against_reference(index, ids, codes, sizes)


@given(datasets(), st.integers(0, 2**64 - 1))
def test_property_unknown_ids_raise(data, probe):
    ids, codes, sizes = data
    index = SidIndex.build(ids, codes, codebook_size=sizes)
    if probe in set(ids.tolist()):
        assert probe in index
        return
    assert probe not in index
    queries = np.append(ids, np.uint64(probe))
    with pytest.raises(gr2.UnknownItemError, match=rf"item id {probe} \(row {len(ids)}\)"):
        index.sids(queries)


@given(datasets(), st.data())
def test_property_file_round_trip_and_corruption(tmp_path_factory, data, draw):
    ids, codes, sizes = data
    index = SidIndex.build(ids, codes, codebook_size=sizes)
    path = Path(tmp_path_factory.mktemp("prop")) / "i.gr2sid"
    index.save(path)
    loaded = SidIndex.load(path)
    np.testing.assert_array_equal(loaded.codes(), index.codes())
    np.testing.assert_array_equal(loaded.item_ids(), index.item_ids())
    raw = bytearray(path.read_bytes())
    offset = draw.draw(st.integers(0, len(raw) - 1))
    raw[offset] ^= draw.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    with pytest.raises(gr2.CorruptFileError):
        SidIndex.load(path)


def test_fortran_order_codes_are_read_by_row():
    # rust-numpy's as_slice accepts Fortran order too; the binding must not misread it as rows
    codes = np.array([[0, 1, 2], [2, 1, 0], [1, 0, 2]], dtype=np.uint16)
    ids = np.array([5, 6, 7], dtype=np.uint64)
    index = gr2.SidIndex.build(ids, np.asfortranarray(codes), codebook_size=[3, 3, 3])
    np.testing.assert_array_equal(index.sids(ids), codes)
    np.testing.assert_array_equal(index.items(np.asfortranarray(codes)), ids)


def test_reads_version_1_files():
    # written by gr2 before 4-byte keys (format version 1: 8-byte keys always); still readable
    path = Path(__file__).parent / "fixtures" / "index_v1.gr2sid"
    index = SidIndex.load(path)
    ids = np.array([5, 17, 99, 1 << 40], np.uint64)
    sids = np.array([[1, 2, 3], [1, 2, 4], [7, 0, 0], [1, 2, 2]], np.uint16)
    np.testing.assert_array_equal(index.sids(ids), sids)
    np.testing.assert_array_equal(index.items(sids), ids)
    assert index.repair_report()["items_moved"] == 1


# --------------------------------------------------------------------------------------------
# Issue 16/15 regressions: a loaded index stays what was loaded, build and load agree on the
# level limit, clear errors at the boundary, pickling.


def _distinct_index(seed, n=2000):
    """An index without collisions, so two of them with the same n have the same file size."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(256 * 256, size=n, replace=False)
    codes = np.stack([flat // 256, flat % 256], axis=1).astype(np.uint16)
    return np.arange(n, dtype=np.uint64), codes, SidIndex.build(np.arange(n, dtype=np.uint64), codes)


def test_loaded_index_ignores_in_place_overwrite(tmp_path):
    ids, codes_a, a = _distinct_index(1)
    _, codes_b, b = _distinct_index(2)
    path_a, path_b = tmp_path / "a.gr2sid", tmp_path / "b.gr2sid"
    a.save(path_a)
    b.save(path_b)
    assert path_a.stat().st_size == path_b.stat().st_size
    loaded = SidIndex.load(path_a)
    assert not loaded.is_mapped
    with open(path_a, "r+b") as f:  # in place, same inode (what `cp b a` does)
        f.write(path_b.read_bytes())
    np.testing.assert_array_equal(loaded.sids(ids), codes_a)
    np.testing.assert_array_equal(SidIndex.load(path_a).sids(ids), codes_b)


def test_loaded_index_survives_truncation(tmp_path):
    """On main this killed the process with SIGBUS (rc 135): run it in a child."""
    path = tmp_path / "i.gr2sid"
    script = f"""
import os, numpy as np, gr2
n = 200_000
codes = np.stack([np.arange(n) % 65536, np.arange(n) // 65536], axis=1).astype(np.uint16)
gr2.SidIndex.build(np.arange(n, dtype=np.uint64), codes, codebook_size=65536).save({str(path)!r})
index = gr2.SidIndex.load({str(path)!r})
os.truncate({str(path)!r}, 0)
assert (index.sids(np.arange(n, dtype=np.uint64)) == codes).all()
assert (index.items(codes) == np.arange(n)).all()
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr)


def test_mmap_mode_is_opt_in_and_keeps_the_old_inode(tmp_path):
    ids, codes_a, a = _distinct_index(3)
    _, codes_b, b = _distinct_index(4)
    path = tmp_path / "i.gr2sid"
    a.save(path)
    mapped = SidIndex.load(path, mmap=True)
    assert mapped.is_mapped and not a.is_mapped
    np.testing.assert_array_equal(mapped.sids(ids), codes_a)
    np.testing.assert_array_equal(mapped.items(codes_a), ids)
    inode = path.stat().st_ino
    b.save(path)  # save renames a new file into place: the mapped index keeps the old inode
    assert path.stat().st_ino != inode
    np.testing.assert_array_equal(mapped.sids(ids), codes_a)
    np.testing.assert_array_equal(SidIndex.load(path, mmap=True).sids(ids), codes_b)
    np.testing.assert_array_equal(SidIndex.load(path, mmap=False).sids(ids), codes_b)
    with pytest.raises(gr2.InvalidInputError, match="mmap"):
        SidIndex.load(path, mmap="yes")


@pytest.mark.parametrize("mmap", [False, True])
def test_unverified_load_answers_like_a_verified_one_and_skips_only_the_o_n_checks(tmp_path, mmap):
    """verify=False (an index larger than RAM, a file the pipeline wrote) gives the same answers;
    a damaged array then goes unseen at load, while a damaged header is still a CorruptFileError,
    and whatever a query on the damaged index does, only gr2 errors come out."""
    rng = np.random.default_rng(5)
    ids = np.sort(rng.choice(10**9, size=5000, replace=False)).astype(np.uint64)
    codes = rng.integers(0, 256, size=(5000, 3), dtype=np.uint16)
    index = SidIndex.build(ids, codes, codebook_size=256)
    path = tmp_path / "i.gr2sid"
    index.save(path)
    trusted = SidIndex.load(path, mmap=mmap, verify=False)
    sids = index.sids(ids)
    np.testing.assert_array_equal(trusted.sids(ids), sids)
    np.testing.assert_array_equal(trusted.items(sids), ids)
    with pytest.raises(gr2.InvalidInputError, match="verify"):
        SidIndex.load(path, verify="no")

    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 4096, len(data), 97):  # the arrays at the end of the file
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(gr2.CorruptFileError, match="checksum"):
        SidIndex.load(path, mmap=mmap)
    damaged = SidIndex.load(path, mmap=mmap, verify=False)
    for query in (lambda: damaged.sids(ids), lambda: damaged.items(sids)):
        try:
            query()
        except gr2.Gr2Error:
            pass  # UnknownItemError, or InternalError for a panic caught at the boundary
    header = bytearray(path.read_bytes())
    header[40] ^= 0xFF  # the level count
    path.write_bytes(bytes(header))
    with pytest.raises(gr2.CorruptFileError):
        SidIndex.load(path, mmap=mmap, verify=False)


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_save_removes_stale_temporary_files(tmp_path):
    path = tmp_path / "index.gr2sid"
    dead = tmp_path / f".index.gr2sid.tmp-{_dead_pid()}-123"
    live = tmp_path / f".index.gr2sid.tmp-{os.getppid()}-456"  # a running process: maybe mid-save
    other = tmp_path / f".other.gr2sid.tmp-{_dead_pid()}-789"  # another target's: not ours to touch
    unrelated = tmp_path / ".index.gr2sid.tmp-notapid"
    for p in (dead, live, other, unrelated):
        p.write_bytes(b"half-written")
    SidIndex.build(np.arange(3, dtype=np.uint64), np.zeros((3, 1), np.uint16) + np.arange(3, dtype=np.uint16)[:, None]).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, other.name, unrelated.name])
    assert SidIndex.load(path).sids(np.array([2], np.uint64)).tolist() == [[2]]


def test_64_levels_with_collisions_is_refused_at_build(tmp_path):
    ids = np.arange(2, dtype=np.uint64)
    with pytest.raises(gr2.InvalidInputError, match="64 levels"):
        SidIndex.build(ids, np.zeros((2, 64), np.uint16), codebook_size=1)
    with pytest.raises(gr2.InvalidInputError, match="64 levels"):
        SidIndex.build(ids, np.zeros((2, 65), np.uint16), codebook_size=1)
    # 64 levels without a collision: builds, saves and loads back.
    codes = np.zeros((2, 64), np.uint16)
    codes[1, 63] = 1
    index = SidIndex.build(ids, codes, codebook_size=[1] * 63 + [2])
    index.save(tmp_path / "i.gr2sid")
    np.testing.assert_array_equal(SidIndex.load(tmp_path / "i.gr2sid").sids(ids), codes)
    # 63 levels with collisions: the appended level makes 64, which load accepts.
    index = SidIndex.build(ids, np.zeros((2, 63), np.uint16), codebook_size=1)
    assert index.levels == 64
    index.save(tmp_path / "j.gr2sid")
    assert SidIndex.load(tmp_path / "j.gr2sid").levels == 64


def test_load_of_a_directory_says_so(tmp_path):
    with pytest.raises(gr2.Gr2IOError, match="directory") as info:
        SidIndex.load(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(gr2.Gr2IOError, match="directory"):
        SidIndex.load(tmp_path, mmap=True)
    index = SidIndex.build(np.arange(2, dtype=np.uint64), np.zeros((2, 1), np.uint16))
    with pytest.raises(gr2.Gr2Error, match="directory"):
        index.save(tmp_path)


def test_contains_refuses_non_integers():
    index = SidIndex.build(np.array([3, 10], np.uint64), np.array([[0], [1]], np.uint16))
    assert 10 in index and np.uint64(10) in index and np.int64(3) in index
    assert -1 not in index and 2**70 not in index and 4 not in index
    for bad in (10.0, np.float64(10), "10", None, [10]):
        with pytest.raises(gr2.InvalidInputError, match="item_id"):
            bad in index  # noqa: B015


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: SidIndex.load(123), "path"),
        (lambda: SidIndex.load(None), "path"),
        (lambda: SidIndex.build(np.arange(2, dtype=np.uint64), np.zeros((2, 1), np.uint16), codebook_size=2**70), "codebook_size"),
        (lambda: SidIndex.build(np.arange(2, dtype=np.uint64), np.zeros((2, 1), np.uint16), codebook_size=-3), "codebook_size"),
        (lambda: SidIndex.build(np.arange(2, dtype=np.int64), np.zeros((2, 1), np.uint16)), "item_ids"),
        (lambda: SidIndex.build(np.arange(2, dtype=np.uint64), np.zeros((2, 1), np.int32)), "codes"),
        (lambda: SidIndex.from_bytes("not bytes"), "data"),
    ],
)
def test_conversion_errors_are_invalid_input_naming_the_argument(call, name):
    with pytest.raises(gr2.InvalidInputError, match=name):
        call()


def test_conversion_errors_on_methods_name_the_argument(tmp_path):
    index = SidIndex.build(np.arange(4, dtype=np.uint64), np.arange(8, dtype=np.uint16).reshape(4, 2))
    with pytest.raises(gr2.InvalidInputError, match="path"):
        index.save(3.5)
    with pytest.raises(gr2.InvalidInputError, match="prefix"):
        index.children([2**70])
    with pytest.raises(gr2.InvalidInputError, match="prefix"):
        index.prefix_range([-1])
    with pytest.raises(gr2.InvalidInputError, match="item_ids"):
        index.sids(np.arange(2, dtype=np.int64))
    with pytest.raises(gr2.InvalidInputError, match="item_ids"):
        index.sids(np.array([-1, 2]))


def test_plain_constructor_says_what_to_use():
    with pytest.raises(gr2.InvalidInputError, match="SidIndex.build"):
        SidIndex()
    with pytest.raises(gr2.InvalidInputError, match="SidIndex.load"):
        SidIndex(np.arange(3, dtype=np.uint64))


def test_error_mapping_fallback_keeps_the_message():
    """Without gr2.errors (a broken install), the original message must still reach the caller."""
    script = """
import sys, types
import gr2
sys.modules["gr2.errors"] = types.ModuleType("gr2.errors")
try:
    gr2.SidIndex.load("/nonexistent/where.gr2sid")
except Exception as err:
    print(type(err).__name__, err)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert "/nonexistent/where.gr2sid" in result.stdout, result.stdout + result.stderr
    assert result.stdout.startswith("OSError"), result.stdout


def test_pickle_round_trip(tmp_path):
    import copy
    import pickle

    rng = np.random.default_rng(11)
    ids, codes = random_dataset(rng, 3000, 2, 16)
    codes[:, 1] %= 4
    index = SidIndex.build(ids, codes, codebook_size=[16, 4])
    index.save(tmp_path / "i.gr2sid")
    assert index.to_bytes() == (tmp_path / "i.gr2sid").read_bytes()
    for source in (index, SidIndex.load(tmp_path / "i.gr2sid"), SidIndex.load(tmp_path / "i.gr2sid", mmap=True)):
        for again in (pickle.loads(pickle.dumps(source)), copy.deepcopy(source), SidIndex.from_bytes(source.to_bytes())):
            assert again.level_sizes == index.level_sizes
            assert again.repair_report() == index.repair_report()
            np.testing.assert_array_equal(again.codes(), index.codes())
            np.testing.assert_array_equal(again.item_ids(), index.item_ids())
            np.testing.assert_array_equal(again.sids(ids), index.sids(ids))
    empty = SidIndex.build(np.zeros(0, np.uint64), np.zeros((0, 3), np.uint16))
    assert len(pickle.loads(pickle.dumps(empty))) == 0
    raw = bytearray(index.to_bytes())
    raw[300] ^= 1
    with pytest.raises(gr2.CorruptFileError, match="checksum"):
        SidIndex.from_bytes(bytes(raw))
    with pytest.raises(gr2.CorruptFileError):
        SidIndex.from_bytes(b"")
