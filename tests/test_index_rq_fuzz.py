"""Hypothesis over the argument space of the SidIndex / RQCodebooks / encode_npy public functions.

Arguments are drawn from many dtypes, shapes (empties included), memory orders and plain Python
objects. Every call either succeeds, and then matches a plain numpy / Python reference, or raises a
gr2.Gr2Error subclass; a bare TypeError/OverflowError/ValueError, a panic or a crash fails the test.
"""

from __future__ import annotations

import operator
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gr2
from gr2 import RQCodebooks, SidIndex, encode_npy
from test_index import reference_build
from test_rq import ref_decode, ref_greedy

DTYPES = [np.uint64, np.int64, np.uint32, np.int32, np.uint16, np.int16, np.uint8, np.float32, np.float64, np.bool_]
SIDE = st.integers(0, 5)


def outcome(call):
    """``("ok", value)`` or ``("error", exc)``; anything that is not a Gr2Error fails the test."""
    try:
        return "ok", call()
    except gr2.Gr2Error as err:
        assert str(err), "errors must say something"
        return "error", err
    except Exception as err:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(err).__name__} is not a gr2.Gr2Error: {err}")


@st.composite
def layouts(draw, array):
    """``array`` as C order, Fortran order, a strided view, or read-only."""
    how = draw(st.sampled_from(["C", "F", "strided", "readonly"]))
    if how == "F":
        return np.asfortranarray(array)
    if how == "strided" and array.ndim >= 1:
        doubled = np.repeat(array, 2, axis=0)
        return doubled[::2]
    if how == "readonly":
        array = array.copy()
        array.setflags(write=False)
    return array


@st.composite
def array_args(draw, dtype, ndim, rows=None, columns=None, elements=None, unique=False):
    """Mostly a well-formed array of ``dtype``/``ndim`` (rows/columns when given), sometimes one with
    the wrong dtype, ndim or a plain Python object."""
    kind = draw(st.sampled_from(["good"] * 6 + ["dtype", "ndim", "python"]))
    if kind == "python":
        return draw(st.sampled_from([None, 3, 2.5, "abc", b"xy", [1, 2], [[1, 2]], (), {"a": 1}]))
    if kind == "ndim":
        ndim = draw(st.sampled_from([n for n in range(4) if n != ndim]))
    if kind == "dtype":
        dtype = draw(st.sampled_from([d for d in DTYPES if d != dtype]))
        elements = None
    shape = []
    for axis in range(ndim):
        fixed = rows if axis == 0 else columns if axis == 1 else None
        shape.append(fixed if fixed is not None and kind == "good" else draw(SIDE))
    if elements is None and np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        elements = st.integers(max(int(info.min), -(2**63)), min(int(info.max), 2**63 - 1))
    array = draw(hnp.arrays(dtype, tuple(shape), elements=elements, unique=unique and kind == "good"))
    return draw(layouts(array))


def is_array(x, dtype, ndim):
    return isinstance(x, np.ndarray) and x.dtype == dtype and x.ndim == ndim


# --------------------------------------------------------------------------------------------
# SidIndex


@st.composite
def build_args(draw):
    n = draw(st.integers(0, 12))
    levels = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 6), min_size=levels, max_size=levels))
    ids = draw(array_args(np.uint64, 1, rows=n, elements=st.integers(0, 40), unique=draw(st.integers(0, 5)) > 0))
    codes = draw(array_args(np.uint16, 2, rows=n, columns=levels, elements=st.integers(0, 6)))
    size_kind = draw(st.sampled_from(["sizes"] * 4 + ["none", "int", "odd", "list"]))
    size_arg = {
        "sizes": st.just(sizes),
        "none": st.just(None),
        "int": st.integers(-2, 8),
        "odd": st.sampled_from([2**70, -(2**70), 2.0, "4", [1.5], [2**64], np.array(sizes)]),
        "list": st.lists(st.integers(0, 7), max_size=4),
    }[size_kind]
    size_arg = draw(size_arg)
    return ids, codes, size_arg


def valid_build(ids, codes, size_arg):
    """The level sizes build must use, or None when build must fail."""
    if not (is_array(ids, np.uint64, 1) and is_array(codes, np.uint16, 2)):
        return None
    if len(ids) != codes.shape[0] or codes.shape[1] == 0 or len(set(ids.tolist())) != len(ids):
        return None
    levels = codes.shape[1]
    if size_arg is None:
        sizes = [max(256, int(codes.max(initial=0)) + 1)] * levels
    elif isinstance(size_arg, int) and not isinstance(size_arg, bool):
        sizes = [size_arg] * levels
    elif isinstance(size_arg, list) and all(type(k) is int for k in size_arg):
        sizes = list(size_arg)
    elif isinstance(size_arg, np.ndarray) and size_arg.ndim == 1 and size_arg.dtype.kind in "iu":
        sizes = size_arg.tolist()
    else:
        return None
    if len(sizes) != levels or not all(1 <= k <= 65536 for k in sizes):
        return None
    if (codes >= np.array(sizes)).any():
        return None
    return sizes


@given(build_args())
def test_build_and_lookups(args):
    ids, codes, size_arg = args
    status, index = outcome(lambda: SidIndex.build(ids, codes, codebook_size=size_arg))
    sizes = valid_build(ids, codes, size_arg)
    event(f"build {status}")
    if sizes is None:
        assert status == "error"
        return
    assert status == "ok", index
    final, report = reference_build(ids, codes, sizes)
    got = index.repair_report()
    assert all(got[k] == v for k, v in report.items())
    expected = np.array(final, dtype=np.uint16).reshape(len(ids), index.levels)
    np.testing.assert_array_equal(index.sids(np.ascontiguousarray(ids)), expected)
    np.testing.assert_array_equal(index.items(expected), ids)
    again = pickle.loads(pickle.dumps(index))
    np.testing.assert_array_equal(again.codes(), index.codes())


@st.composite
def small_index(draw):
    n = draw(st.integers(0, 15))
    levels = draw(st.integers(1, 3))
    ids = np.array(draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True)), np.uint64)
    codes = np.array(draw(st.lists(st.lists(st.integers(0, 3), min_size=levels, max_size=levels), min_size=n, max_size=n)), np.uint16)
    codes = codes.reshape(n, levels)
    return SidIndex.build(ids, codes, codebook_size=4), ids


@given(small_index(), st.data())
def test_sids_any_argument(built, data):
    index, ids = built
    pool = st.one_of(st.sampled_from(ids.tolist()) if len(ids) else st.nothing(), st.integers(0, 2**64 - 1))
    query = data.draw(array_args(np.uint64, 1, elements=pool))
    status, got = outcome(lambda: index.sids(query))
    if not is_array(query, np.uint64, 1):
        assert status == "error"
        return
    known = dict(zip(index.item_ids().tolist(), map(tuple, index.codes().tolist())))
    missing = [i for i, q in enumerate(query.tolist()) if q not in known]
    if missing:
        assert isinstance(got, gr2.UnknownItemError) and f"(row {missing[0]})" in str(got)
        return
    assert status == "ok" and got.shape == (len(query), index.levels)
    assert [tuple(r) for r in got.tolist()] == [known[q] for q in query.tolist()]


@given(small_index(), st.data())
def test_items_any_argument(built, data):
    index, _ = built
    query = data.draw(array_args(np.uint16, 2, columns=index.levels, elements=st.integers(0, 5)))
    status, got = outcome(lambda: index.items(query))
    if not (is_array(query, np.uint16, 2) and query.shape[1] == index.levels):
        assert status == "error"
        return
    by_sid = dict(zip(map(tuple, index.codes().tolist()), index.item_ids().tolist()))
    missing = [i for i, row in enumerate(map(tuple, query.tolist())) if row not in by_sid]
    if missing:
        assert isinstance(got, gr2.UnknownSidError) and f"(row {missing[0]})" in str(got)
        return
    assert status == "ok"
    assert got.tolist() == [by_sid[tuple(r)] for r in query.tolist()]


@given(
    small_index(),
    st.one_of(
        st.lists(st.integers(-3, 6), max_size=4),
        st.lists(st.integers(-(2**70), 2**70), max_size=2),
        hnp.arrays(st.sampled_from([np.uint16, np.int64, np.float64]), st.integers(0, 4), elements=st.integers(0, 5)),
        st.sampled_from([None, "01", 3, 2.5, [0.5], [[0]]]),
    ),
)
def test_children_and_prefix_range_any_argument(built, prefix):
    index, _ = built
    status_c, children = outcome(lambda: index.children(prefix))
    status_r, span = outcome(lambda: index.prefix_range(prefix))
    assert status_c == status_r
    try:  # a sequence of objects with __index__ (floats have none)
        codes = [operator.index(c) for c in prefix] if not isinstance(prefix, (str, bytes)) else None
    except TypeError:
        codes = None
    valid = (
        codes is not None
        and len(codes) <= index.levels
        and all(0 <= c < size for c, size in zip(codes, index.level_sizes))
    )
    if not valid:
        assert status_c == "error"
        return
    assert status_c == "ok"
    rows = index.codes().tolist()
    inside = [i for i, r in enumerate(rows) if r[: len(codes)] == codes]
    assert span == ((inside[0], inside[-1] + 1) if inside else span)
    if not inside:
        assert span[0] == span[1]
    expected = sorted({rows[i][len(codes)] for i in inside}) if len(codes) < index.levels else []
    assert children.tolist() == expected


@given(
    small_index(),
    st.one_of(
        st.integers(-(2**70), 2**70),
        st.integers(0, 2**64 - 1),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.sampled_from([None, b"1", [1], np.uint64(5), np.int8(-1), np.float32(1.0), True]),
    ),
)
def test_contains_any_argument(built, item):
    index, ids = built
    status, got = outcome(lambda: item in index)
    if isinstance(item, (bool, int, np.integer)):
        assert status == "ok" and got == (0 <= int(item) < 2**64 and int(item) in set(ids.tolist()))
    else:
        assert status == "error" and isinstance(got, gr2.InvalidInputError)


@given(small_index(), st.data())
def test_from_bytes_and_load_of_damaged_files(tmp_path_factory, built, data):
    index, ids = built
    raw = bytearray(index.to_bytes())
    edit = data.draw(st.sampled_from(["flip", "cut", "extend", "none"]))
    if edit == "flip":
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif edit == "cut":
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    elif edit == "extend":
        raw += bytes(data.draw(st.integers(1, 70)))
    path = Path(tmp_path_factory.mktemp("fuzz")) / "i.gr2sid"
    path.write_bytes(bytes(raw))
    for load in (lambda: SidIndex.from_bytes(bytes(raw)), lambda: SidIndex.load(path), lambda: SidIndex.load(path, mmap=True)):
        status, got = outcome(load)
        if edit == "none":
            assert status == "ok"
            np.testing.assert_array_equal(got.codes(), index.codes())
            np.testing.assert_array_equal(got.item_ids(), index.item_ids())
        else:
            assert status == "error" and isinstance(got, gr2.CorruptFileError)


@given(st.one_of(st.integers(), st.floats(), st.none(), st.binary(max_size=3), st.lists(st.integers(), max_size=2)))
def test_load_save_from_bytes_with_wrong_argument_types(arg):
    index = SidIndex.build(np.arange(2, dtype=np.uint64), np.zeros((2, 1), np.uint16))
    assert outcome(lambda: SidIndex.load(arg))[0] == "error"
    if not isinstance(arg, bytes):
        assert outcome(lambda: SidIndex.from_bytes(arg))[0] == "error"
        assert outcome(lambda: index.save(arg))[0] == "error"


# --------------------------------------------------------------------------------------------
# RQCodebooks and encode_npy

SMALL_INTS = st.integers(-3, 3).map(float)


@st.composite
def rq_args(draw):
    levels, k, dim = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["good"] * 5 + ["dtype", "shape", "nan", "python"]))
    if kind == "python":
        codebooks = draw(st.sampled_from([None, 1.0, "cb", [[[1.0]]]]))
    elif kind == "dtype":
        codebooks = np.zeros((levels, k, dim), draw(st.sampled_from([np.float64, np.float16, np.int32, np.uint16])))
    elif kind == "shape":
        codebooks = np.zeros(draw(st.sampled_from([(0, 2, 2), (2, 0, 2), (2, 2, 0), (3,), (2, 2), (1, 1, 1, 1)])), np.float32)
    else:
        codebooks = draw(hnp.arrays(np.float32, (levels, k, dim), elements=SMALL_INTS))
        if kind == "nan":
            codebooks.flat[draw(st.integers(0, codebooks.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        codebooks = draw(layouts(codebooks))
    x = draw(array_args(np.float32, 2, columns=dim, elements=SMALL_INTS))
    beam = draw(st.one_of(st.integers(1, 4), st.sampled_from([0, -1, 1025, 2**63, 2**64, 2.0, "2", [1]])))
    codes = draw(array_args(np.uint16, 2, columns=levels, elements=st.integers(0, 6)))
    return codebooks, x, beam, codes


def good_codebooks(codebooks):
    return (
        is_array(codebooks, np.float32, 3)
        and all(s >= 1 for s in codebooks.shape)
        and bool(np.isfinite(codebooks).all())
    )


@given(rq_args())
def test_rq_any_argument(args):
    codebooks, x, beam, codes = args
    status, cb = outcome(lambda: RQCodebooks(codebooks))
    if not good_codebooks(codebooks):
        assert status == "error"
        return
    assert status == "ok"
    cb_ref = np.ascontiguousarray(codebooks)
    good_beam = type(beam) is int and 1 <= beam <= 1024
    good_x = is_array(x, np.float32, 2) and x.shape[1] == cb.dim and bool(np.isfinite(x).all())
    status, got = outcome(lambda: cb.encode(x, beam=beam))
    event(f"encode {status}")
    if not (good_beam and good_x):
        assert status == "error"
    else:
        assert status == "ok" and got.shape == (x.shape[0], cb.levels)
        if beam == 1:
            np.testing.assert_array_equal(got, ref_greedy(cb_ref, np.ascontiguousarray(x)))
    status, got = outcome(lambda: cb.decode(codes))
    good_codes = is_array(codes, np.uint16, 2) and codes.shape[1] == cb.levels and bool((codes < cb.codebook_size).all())
    if not good_codes:
        assert status == "error"
    else:
        assert status == "ok"
        np.testing.assert_array_equal(got, ref_decode(cb_ref, np.ascontiguousarray(codes)))
    again = pickle.loads(pickle.dumps(cb))
    np.testing.assert_array_equal(again.codebooks, cb_ref)


@given(
    hnp.arrays(np.float32, st.tuples(st.integers(0, 30), st.just(3)), elements=SMALL_INTS),
    st.one_of(st.integers(1, 40), st.sampled_from([0, -5, 2.5, "3", None, True, 2**70])),
    st.one_of(st.integers(1, 3), st.sampled_from([0, 2**63, 1.5])),
    st.data(),
)
def test_encode_npy_any_argument(tmp_path_factory, x, chunk_size, beam, data):
    cb = RQCodebooks(np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3) % 5 - 2)
    bad_row = data.draw(st.integers(-1, len(x) - 1)) if data.draw(st.booleans()) else -1
    if bad_row >= 0:
        x[bad_row, 1] = np.nan
    folder = Path(tmp_path_factory.mktemp("npy"))
    np.save(folder / "x.npy", x)
    status, got = outcome(lambda: encode_npy(cb, folder / "x.npy", folder / "codes.npy", chunk_size=chunk_size, beam=beam, progress=False))
    event(f"encode_npy {status}")
    good_chunk = type(chunk_size) is int and chunk_size >= 1
    good_beam = type(beam) is int and 1 <= beam <= 1024
    if not (good_chunk and good_beam) or bad_row >= 0:
        assert status == "error"
        if good_chunk and good_beam:
            assert f"at row {bad_row}, column 1" in str(got)
        assert not (folder / "codes.npy").exists()
    else:
        assert status == "ok"
        np.testing.assert_array_equal(np.load(folder / "codes.npy"), cb.encode(x, beam=beam))
    assert sorted(p.name for p in folder.iterdir()) in (["x.npy"], ["codes.npy", "x.npy"])


# --------------------------------------------------------------------------------------------
# Audit: every public SidIndex / RQCodebooks entry point, called with wrongly typed arguments.

BAD_VALUES = [object(), None, 2.5, "x", b"x", 2**70, -1, [object()], np.zeros((2, 2, 2), np.complex64)]
INDEX_CALLS = {  # name -> how to call it with one bad argument
    "build": lambda bad: SidIndex.build(bad, bad),
    "load": lambda bad: SidIndex.load(bad),
    "from_bytes": lambda bad: SidIndex.from_bytes(bad),
    "save": lambda bad: _audit_index().save(bad),
    "sids": lambda bad: _audit_index().sids(bad),
    "items": lambda bad: _audit_index().items(bad),
    "children": lambda bad: _audit_index().children(bad),
    "prefix_range": lambda bad: _audit_index().prefix_range(bad),
    "__contains__": lambda bad: bad in _audit_index(),
    "extend": lambda bad: _audit_index().extend(bad, bad),
    "remove": lambda bad: _audit_index().remove(bad),
}
INDEX_NO_ARGS = {"item_ids", "codes", "repair_report", "to_bytes", "levels", "level_sizes", "uniqueness_before_repair", "nbytes", "is_mapped", "generation"}
RQ_CALLS = {
    "__init__": lambda bad: RQCodebooks(bad),
    "encode": lambda bad: _audit_rq().encode(bad),
    "encode beam": lambda bad: _audit_rq().encode(np.zeros((1, 2), np.float32), beam=bad),
    "encode row_offset": lambda bad: _audit_rq().encode(np.zeros((1, 2), np.float32), row_offset=bad),
    "decode": lambda bad: _audit_rq().decode(bad),
}
RQ_NO_ARGS = {"levels", "codebook_size", "dim", "codebooks"}


def _audit_index():
    return SidIndex.build(np.arange(3, dtype=np.uint64), np.arange(3, dtype=np.uint16).reshape(3, 1))


def _audit_rq():
    return RQCodebooks(np.ones((1, 2, 2), np.float32))


def test_audit_lists_every_public_entry_point():
    public = {n for n in dir(SidIndex) if not n.startswith("_")} | {"__contains__"}
    assert public == set(INDEX_CALLS) | INDEX_NO_ARGS, "a new SidIndex method needs an audit entry"
    public = {n for n in dir(RQCodebooks) if not n.startswith("_")}
    assert public == {n.split()[0] for n in RQ_CALLS if n != "__init__"} | RQ_NO_ARGS


@pytest.mark.parametrize("name", [*INDEX_CALLS, *RQ_CALLS])
def test_audit_bad_arguments_raise_gr2_errors(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # save("x") and friends write here
    call = {**INDEX_CALLS, **RQ_CALLS}[name]
    for bad in BAD_VALUES:
        status, _ = outcome(lambda: call(bad))
        is_int = type(bad) is int
        if name == "__contains__" and is_int:
            assert status == "ok"  # integers outside uint64 are simply not contained
        elif name == "save" and isinstance(bad, str):
            assert status == "ok"  # a valid path
        elif name in ("children", "prefix_range") and isinstance(bad, bytes):
            assert status == "ok"  # bytes are a sequence of small ints: a valid prefix
        elif name in ("encode beam", "encode row_offset") and bad is None:
            assert status == "ok"  # None means the default (beam 1, row_offset 0)
        else:
            assert status == "error", (name, bad)
    for no_arg in INDEX_NO_ARGS:
        value = getattr(_audit_index(), no_arg)
        if callable(value):
            value()
