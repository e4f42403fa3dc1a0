"""gr2.SidIndexWriter (the out-of-core build, issue 31.1) against the in-memory SidIndex.build:
the same file bytes, the same repair report and the same errors, on random and adversarial inputs
fed in random chunks; the temporary files never outlive the writer."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gr2
from gr2 import SidIndex, SidIndexWriter


def stream(path, ids, codes, sizes, chunk_items, cuts=(), temp_dir=None):
    """Feeds ids/codes to a writer, split at `cuts` (sorted row numbers); returns None or the
    error the build raised (its type and message)."""
    bounds = [0, *sorted(min(c, len(ids)) for c in cuts), len(ids)]
    with SidIndexWriter(path, sizes, chunk_items=chunk_items, temp_dir=temp_dir) as writer:
        try:
            for a, b in zip(bounds, bounds[1:]):
                writer.add(ids[a:b], codes[a:b])
            assert len(writer) == len(ids)
            writer.finish()
        except gr2.Gr2Error as err:
            return type(err), str(err)
        assert writer.closed
    return None


def assert_same(tmp_path, ids, codes, sizes, chunk_items, cuts=()):
    """The writer's file is the bytes of build + save, or both raise the same error; nothing but
    the index file is left in the folder."""
    ids = np.ascontiguousarray(ids, dtype=np.uint64)
    codes = np.ascontiguousarray(codes, dtype=np.uint16).reshape(len(ids), len(sizes))
    path = tmp_path / "streamed.gr2sid"
    if path.exists():
        path.unlink()
    try:
        built = SidIndex.build(ids, codes, codebook_size=list(sizes))
        want = None
    except gr2.Gr2Error as err:
        built, want = None, (type(err), str(err))
    got = stream(path, ids, codes, sizes, chunk_items, cuts)
    assert got == want
    if built is not None:
        data = path.read_bytes()
        assert data == built.to_bytes()
        loaded = SidIndex.load(path)
        assert loaded.repair_report() == built.repair_report()
        if len(ids):
            np.testing.assert_array_equal(loaded.sids(ids), built.sids(ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == (["streamed.gr2sid"] if built is not None else [])


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_empty_and_one_item(tmp_path, chunk):
    assert_same(tmp_path, [], np.zeros((0, 4)), [256] * 4, chunk)
    assert_same(tmp_path, [], np.zeros((0, 4)), [256] * 4, chunk, cuts=[0, 0, 0])
    assert_same(tmp_path, [42], [[1, 2, 3, 4]], [256] * 4, chunk, cuts=[0, 1, 1])
    assert_same(tmp_path, [2**64 - 1], [[255, 0, 255, 0]], [256] * 4, chunk)


@pytest.mark.parametrize("chunk", [1, 5, 64, 10_000])
def test_all_colliding_codes(tmp_path, chunk):
    """Every item on one SID: the last level fills, a disambiguation level is appended."""
    rng = np.random.default_rng(3)
    ids = rng.choice(2**40, size=700, replace=False)
    assert_same(tmp_path, ids, np.tile([1, 2, 3], (700, 1)), [4, 4, 4], chunk, cuts=[0, 1, 350, 350, 699])
    # 4 x 8 input bits + an appended level: the keys become 8 bytes wide
    assert_same(tmp_path, ids, np.full((700, 4), 7), [256] * 4, chunk)


def test_too_degenerate_codes_fail_like_build(tmp_path):
    ids = np.arange(65_540, dtype=np.uint64)[::-1]
    assert_same(tmp_path, ids, np.zeros((65_540, 1)), [1], 20_000)


@pytest.mark.parametrize("chunk", [1, 10, 100, 5000])
def test_duplicate_ids_across_chunks(tmp_path, chunk):
    rng = np.random.default_rng(5)
    ids = rng.choice(10**6, size=800, replace=False)
    ids[700] = ids[12]
    ids[650] = ids[12]
    ids[799] = ids[0]
    codes = rng.integers(0, 6, size=(800, 3))
    assert_same(tmp_path, ids, codes, [6, 6, 6], chunk, cuts=[13, 13, 400, 701])


def test_out_of_range_code_names_the_row_over_all_chunks(tmp_path):
    codes = np.zeros((300, 2), dtype=np.uint16)
    codes[250, 1] = 9
    assert_same(tmp_path, np.arange(300), codes, [4, 4], 7, cuts=[100, 200])
    with SidIndexWriter(tmp_path / "x.gr2sid", [4, 4], chunk_items=7) as writer:
        writer.add(np.arange(200, dtype=np.uint64), codes[:200])
        with pytest.raises(gr2.InvalidInputError, match=r"codes\[250, 1\] = 9 is out of range"):
            writer.add(np.arange(200, 300, dtype=np.uint64), codes[200:])
        assert len(writer) == 200  # the invalid chunk added nothing
        fixed = codes[200:].copy()
        fixed[50, 1] = 3
        writer.add(np.arange(200, 300, dtype=np.uint64), fixed)
        writer.finish()
    all_codes = np.concatenate([codes[:200], fixed])
    assert (tmp_path / "x.gr2sid").read_bytes() == SidIndex.build(np.arange(300, dtype=np.uint64), all_codes, 4).to_bytes()


@given(
    n=st.integers(0, 300),
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    dense=st.booleans(),
    chunk=st.integers(1, 120),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_inputs_equal_build(tmp_path_factory, n, sizes, dense, chunk, cuts, seed):
    """Small level sizes make collisions, moves, full prefixes and appended levels common."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n) + 5 if dense else rng.choice(2**62, size=n, replace=False) * 3
    codes = np.stack([rng.integers(0, k, size=n) for k in sizes], axis=1)
    assert_same(tmp_path_factory.mktemp("w"), ids, codes, sizes, chunk, cuts)


def test_realistic_catalog_many_runs(tmp_path):
    """4 levels of 256 codes (the bench's shape), 200k items, 23 runs per pass."""
    rng = np.random.default_rng(7)
    n = 200_000
    ids = rng.choice(2**50, size=n, replace=False)
    codes = rng.integers(0, 256, size=(n, 4))
    codes[:5000, :3] = 0  # one crowded prefix: many moves inside it
    assert_same(tmp_path, ids, codes, [256] * 4, 9000, cuts=[1, 77_777, 150_000])


def test_writer_lifecycle_and_cleanup(tmp_path):
    target = tmp_path / "x.gr2sid"
    writer = SidIndexWriter(str(target), [16, 16], chunk_items=2)
    writer.add(np.arange(5, dtype=np.uint64), np.ones((5, 2), dtype=np.uint16))
    temp = writer.temp_dir
    assert os.path.isdir(temp) and len(os.listdir(temp)) >= 3
    assert "items=5" in repr(writer)
    writer.close()
    assert writer.closed and writer.temp_dir is None and len(writer) == 0
    assert not os.path.exists(temp) and not target.exists()
    writer.close()  # idempotent
    for call in (lambda: writer.add(np.arange(1, dtype=np.uint64), np.ones((1, 2), np.uint16)), writer.finish):
        with pytest.raises(gr2.InvalidInputError, match="finished or closed"):
            call()
    # an exception inside `with` discards the build
    with pytest.raises(ZeroDivisionError):
        with SidIndexWriter(target, [16, 16]) as w:
            w.add(np.arange(5, dtype=np.uint64), np.ones((5, 2), dtype=np.uint16))
            1 / 0
    assert os.listdir(tmp_path) == []
    # a failed finish closes the writer and keeps the previous file
    SidIndex.build(np.array([1], np.uint64), np.array([[0, 0]], np.uint16), 16).save(target)
    before = target.read_bytes()
    w = SidIndexWriter(target, [16, 16], chunk_items=3)
    w.add(np.array([3, 4, 3], np.uint64), np.zeros((3, 2), np.uint16))
    with pytest.raises(gr2.InvalidInputError, match=r"item id 3 appears more than once \(rows 0 and 2\)"):
        w.finish()
    assert w.closed and target.read_bytes() == before and os.listdir(tmp_path) == ["x.gr2sid"]


def test_temp_dir_elsewhere(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()
    ids = np.arange(1000, dtype=np.uint64)[::-1]
    codes = np.stack([ids % 16, ids % 3], axis=1).astype(np.uint16)
    assert stream(out / "x.gr2sid", ids, codes, [16, 4], 64, temp_dir=scratch) is None
    assert os.listdir(scratch) == []
    assert (out / "x.gr2sid").read_bytes() == SidIndex.build(ids, codes, [16, 4]).to_bytes()


def test_bad_arguments_are_gr2_errors(tmp_path):
    target = tmp_path / "x.gr2sid"
    for args, kwargs, match in [
        ((target, []), {}, "at least one level"),
        ((target, [0, 4]), {}, r"level_sizes\[0\]"),
        ((target, [65537]), {}, r"level_sizes\[0\]"),
        ((target, [65536] * 5), {}, "64 bits"),
        ((target, 256), {}, "level_sizes must be a sequence"),
        ((target, [4]), {"chunk_items": 0}, "chunk_items"),
        ((target, [4]), {"chunk_items": 1.5}, "chunk_items"),
        ((123, [4]), {}, "path must be"),
        ((target, [4]), {"temp_dir": 5}, "temp_dir must be"),
    ]:
        with pytest.raises(gr2.InvalidInputError, match=match):
            SidIndexWriter(*args, **kwargs)
    with pytest.raises(gr2.Gr2IOError, match="directory"):
        SidIndexWriter(tmp_path, [4])
    with pytest.raises(gr2.Gr2IOError):
        SidIndexWriter(tmp_path / "missing" / "x.gr2sid", [4])
    with SidIndexWriter(target, [4, 4]) as w:
        for ids, codes, match in [
            (np.arange(3), np.zeros((3, 2), np.uint16), "item_ids must be a numpy uint64"),
            (np.arange(3, dtype=np.uint64), np.zeros((3, 3), np.uint16), r"shape \(n, 2\)"),
            (np.arange(3, dtype=np.uint64), np.zeros((2, 2), np.uint16), "must match"),
            (np.arange(3, dtype=np.uint64), np.zeros((3, 2), np.int64), "codes must be a numpy uint16"),
            ([1, 2], np.zeros((2, 2), np.uint16), "item_ids must be a numpy"),
        ]:
            with pytest.raises(gr2.InvalidInputError, match=match):
                w.add(ids, codes)
        # non-contiguous and Fortran-ordered inputs are read in logical order
        ids = np.arange(20, dtype=np.uint64)[::2]
        codes = np.asfortranarray(np.stack([np.arange(10) % 4, np.arange(10) // 4], axis=1).astype(np.uint16))
        w.add(ids, codes)
        w.finish()
    assert target.read_bytes() == SidIndex.build(ids.copy(), np.ascontiguousarray(codes), 4).to_bytes()
    assert os.listdir(tmp_path) == ["x.gr2sid"]


def test_concurrent_use_is_a_gr2_error(tmp_path):
    """The GIL is released while a writer works; a second thread gets a gr2 error, not a crash."""
    rng = np.random.default_rng(1)
    n = 2_000_000
    ids = rng.permutation(n).astype(np.uint64)
    codes = rng.integers(0, 256, size=(n, 4), dtype=np.uint16)
    errors = []
    with SidIndexWriter(tmp_path / "x.gr2sid", [256] * 4, chunk_items=n) as w:
        def other():
            for _ in range(200):
                try:
                    len(w)
                except gr2.InvalidInputError as err:
                    errors.append(str(err))
        t = threading.Thread(target=other)
        t.start()
        w.add(ids, codes)
        t.join()
        w.finish()
    assert all("in use by another thread" in e for e in errors)
    assert len(SidIndex.load(tmp_path / "x.gr2sid")) == n
