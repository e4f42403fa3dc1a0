"""No Rust panic reaches Python (issue 30): TokenMap, SidTrie and ConstraintBatch driven with
mismatched and hostile arguments (another batch's token map or trie, wrong types, negative and
oversized ids, empty inputs, rows and tokens out of range) raise gr2.Gr2Error subclasses only, and a
deliberate panic arrives as gr2.InternalError, not as ``pyo3_runtime.PanicException`` (a
BaseException that ``except Exception`` does not catch)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gr2
from gr2 import _gr2

# Vocabulary layout (as in test_constraint.py): 0..9 text, 10..16 tags, then codes level by level.
TAGS = dict(sid_begin=10, sid_end=11, think_open=12, think_close=13, answer_open=14, answer_close=15, eos=16)


def attempt(call, *args, **kwargs):
    """Run one call: it returns, or raises a gr2.Gr2Error subclass other than InternalError (a
    caught panic: a bug, not an answer). Anything else, a PanicException (BaseException) included,
    fails the test with the call that raised it."""
    try:
        return call(*args, **kwargs)
    except gr2.InternalError as err:
        raise AssertionError(f"{getattr(call, '__qualname__', call)} hit a Rust panic: {err}") from err
    except gr2.Gr2Error:
        return None
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - the point: nothing but Gr2Error may escape
        raise AssertionError(f"{getattr(call, '__qualname__', call)} raised {type(err).__module__}."
                             f"{type(err).__name__}: {err}") from err


def code_table(level_sizes):
    code_ids = np.full((len(level_sizes), max(level_sizes)), -1, dtype=np.int64)
    nxt = 17
    for level, size in enumerate(level_sizes):
        code_ids[level, :size] = np.arange(nxt, nxt + size)
        nxt += size
    return code_ids, nxt


def token_map(level_sizes, extra=3):
    code_ids, nxt = code_table(level_sizes)
    return _gr2.TokenMap(code_ids, vocab_size=nxt + extra, **TAGS)


class Hostile:
    """Breaks every protocol a conversion might use."""

    def __index__(self):
        raise ZeroDivisionError("__index__")

    def __len__(self):
        raise ZeroDivisionError("__len__")

    def __iter__(self):
        raise ZeroDivisionError("__iter__")

    def __repr__(self):
        raise ZeroDivisionError("__repr__")


def _arrays():
    out = []
    for dtype in (np.int64, np.uint64, np.uint16, np.int32, np.float64, np.bool_):
        for shape in ((0,), (3,), (0, 0), (2, 1), (2, 3), (1, 1, 1), (2, 0, 1), (1, 2, 2)):
            out.append(np.ones(shape, dtype=dtype))
    big = np.array([2**63 - 1, -(2**63), -1, 0, 2**31], dtype=np.int64)
    out += [big, big.astype(np.uint64), np.array([65535, 0], np.uint16)[:, None],
            np.arange(12, dtype=np.uint64)[::2], np.asfortranarray(np.zeros((2, 3), np.uint16)),
            np.zeros((2, 3, 1), np.uint16)[:, ::2], np.zeros((), np.int64)]
    return out


HOSTILE = [None, True, "x", b"x", 1.5, float("nan"), -1, 0, 1, 2**31, 2**32, 2**63, 2**64, -(2**63) - 1, [], [[]],
           [-1], [2**64], ["x"], {}, object(), Hostile(), "think", "disabled", *_arrays()]
hostile = st.sampled_from(HOSTILE) | st.integers(-(2**70), 2**70)


def either(valid):
    """Mostly a well-formed argument (so calls reach deep states), sometimes a hostile one."""
    return st.one_of(valid, valid, hostile)


level_sizes = st.lists(st.integers(1, 5), min_size=1, max_size=3)


@st.composite
def catalogs(draw, sizes):
    """(item_ids uint64, codes uint16) of unique SIDs with codes below `sizes`."""
    space = int(np.prod(sizes))
    n = draw(st.integers(1, min(space, 8)))
    flat = draw(st.lists(st.integers(0, space - 1), min_size=n, max_size=n, unique=True))
    codes = np.ascontiguousarray(np.array(np.unravel_index(flat, sizes)).T, dtype=np.uint16).reshape(n, len(sizes))
    items = np.array(draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True)), dtype=np.uint64)
    return items, codes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_token_map_and_trie_constructors_raise_only_gr2_errors(data):
    sizes = data.draw(level_sizes)
    code_ids, nxt = code_table(sizes)
    tag_id = st.sampled_from(list(TAGS.values()))
    kwargs = {name: data.draw(either(st.just(value) | tag_id), label=name) for name, value in TAGS.items()}
    kwargs["vocab_size"] = data.draw(either(st.integers(0, nxt + 40) | st.sampled_from([2**26, 2**26 + 1, 2**40])),
                                     label="vocab_size")
    kwargs["reasoning_vocab"] = data.draw(either(st.none() | st.integers(-1, nxt + 40)), label="reasoning_vocab")
    kwargs["forbidden_in_reasoning"] = data.draw(either(st.none() | st.lists(st.integers(-2, nxt + 40), max_size=4)),
                                                 label="forbidden_in_reasoning")
    table = data.draw(either(st.sampled_from([code_ids, code_ids[:, :0], code_ids[:0], code_ids.T.copy(),
                                              np.full((27, 1), 5, np.int64), code_ids - 17])), label="code_ids")
    tm = attempt(_gr2.TokenMap, table, **kwargs)
    if tm is not None:
        assert tm.words == -(-tm.vocab_size // 32) and tm.levels >= 1
        attempt(tm.reasoning_forbidden)
    items, codes = data.draw(catalogs(sizes))
    trie = attempt(_gr2.SidTrie, data.draw(either(st.just(items)), label="item_ids"),
                   data.draw(either(st.sampled_from([codes, codes[:, :0], codes[:0], np.zeros((1, 27), np.uint16)])),
                             label="codes"))
    if trie is not None:
        for item in (items[0], 2**64, -1, 2**70):
            attempt(trie.__contains__, item)
        for bad in ("x", 1.5, None):
            with pytest.raises(gr2.InvalidInputError, match="item_id must be an int"):
                bad in trie  # noqa: B015
    attempt(_gr2.SidTrie.from_index, data.draw(hostile, label="index"))
    attempt(_gr2.ConstraintBatch, data.draw(either(st.just(token_map(sizes))), label="token_map"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_constraint_batch_raises_only_gr2_errors(data):
    """A batch over one token map, fed tries and rows built for another map, and a random walk of
    well-formed and hostile calls; after every call the batch still answers for all its rows."""
    sizes = data.draw(level_sizes, label="sizes")
    wider = st.lists(st.integers(0, 3), min_size=len(sizes), max_size=len(sizes)).map(
        lambda more: [s + m for s, m in zip(sizes, more)])
    other_sizes = data.draw(wider | level_sizes, label="other_sizes")  # often the same levels, wider
    tm, other = token_map(sizes), token_map(other_sizes, extra=40)
    batch = _gr2.ConstraintBatch(tm)
    own_items, own_codes = data.draw(catalogs(sizes))
    other_items, other_codes = data.draw(catalogs(other_sizes))
    tries = [attempt(_gr2.SidTrie, own_items, own_codes), attempt(_gr2.SidTrie, other_items, other_codes)]
    tries = [t for t in tries if t is not None]
    some_codes = st.sampled_from([own_codes, other_codes])
    rows = st.integers(-2, 6)
    row_arrays = st.lists(rows, max_size=4).map(lambda r: np.array(r, dtype=np.int64))
    vocab = max(tm.vocab_size, other.vocab_size) + 3
    tokens = st.integers(-2, vocab) | st.sampled_from([2**32, 2**63 - 1])
    token_arrays = st.lists(tokens, max_size=4).map(lambda t: np.array(t, dtype=np.int64))
    framing = dict(reasoning=either(st.sampled_from(["think", "in_think", "disabled"])),
                   max_reasoning_tokens=either(st.integers(0, 3)))

    def draw_framing():
        return {k: data.draw(v, label=k) for k, v in framing.items() if data.draw(st.booleans())}

    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        op = data.draw(st.sampled_from(["rerank", "ragged", "catalog", "catalog", "select", "advance", "walk", "walk",
                                        "walk", "fill", "allowed", "row"]), label="op")
        if op == "rerank":
            codes = data.draw(either(some_codes), label="codes")
            own = isinstance(codes, np.ndarray) and codes.ndim == 2 and codes.shape[0] == len(own_items)
            cands = data.draw(either(st.just(own_items if own else other_items)), label="candidates")
            attempt(batch.add_rerank, cands[None] if isinstance(cands, np.ndarray) else cands,
                    codes[None] if isinstance(codes, np.ndarray) else codes,
                    repeat=data.draw(either(st.integers(1, 2)), label="repeat"), **draw_framing())
        elif op == "ragged":
            n = len(own_items)
            offsets = st.sampled_from([[0, n], [0, 0, n], [0, n, n], [0, n + 1], [n], []])
            attempt(batch.add_rerank_ragged, data.draw(either(st.just(own_items)), label="items"),
                    data.draw(either(some_codes), label="codes"),
                    data.draw(either(offsets.map(lambda o: np.array(o, dtype=np.int64))), label="offsets"),
                    **draw_framing())
        elif op == "catalog":
            trie = data.draw(either(st.sampled_from(tries)) if tries else hostile, label="trie")
            exclude = data.draw(either(st.none() | st.lists(st.just(own_items[:1]) | st.just(other_items),
                                                            max_size=2)), label="exclude")
            attempt(batch.add_catalog, trie, rows=data.draw(st.none() | either(st.integers(0, 2)), label="rows"),
                    n_items=data.draw(either(st.integers(1, 2)), label="n_items"), exclude=exclude,
                    answer_tags=data.draw(either(st.booleans()), label="answer_tags"), **draw_framing())
        elif op == "select":
            picked = attempt(batch.select, data.draw(either(st.lists(rows, max_size=3)), label="select_rows"))
            if picked is not None:
                batch = picked
        elif op == "advance":
            attempt(batch.advance, data.draw(either(row_arrays), label="rows"),
                    data.draw(either(token_arrays), label="tokens"))
        elif op == "walk" and len(batch):  # an allowed token, to reach deep states
            row = data.draw(st.integers(0, len(batch) - 1), label="walk_row")
            allowed = batch.allowed_ids(row)
            if len(allowed):
                tok = int(allowed[data.draw(st.integers(0, len(allowed) - 1), label="pick")])
                batch.advance(np.array([row], np.int64), np.array([tok], np.int64))
        elif op == "fill":
            r = data.draw(st.none() | either(row_arrays), label="rows")
            n = len(batch) if r is None else (len(r) if isinstance(r, np.ndarray) and r.ndim == 1 else 1)
            out = data.draw(either(st.sampled_from([np.zeros((n, tm.words), np.int32),
                                                    np.zeros((n, other.words), np.int32)])), label="out")
            attempt(batch.fill_bitmask, out, r)
        elif op == "allowed":
            attempt(batch.allowed, data.draw(st.none() | either(row_arrays), label="rows"))
        elif op == "row":
            method = data.draw(st.sampled_from([batch.allowed_ids, batch.emitted, batch.reasoning_tokens]), label="m")
            attempt(method, data.draw(either(rows), label="row"))
        # whatever happened, every row still answers (rows are all-or-nothing on errors)
        assert len(attempt(batch.phases)) == len(batch)
        attempt(batch.allowed)
        attempt(batch.fill_bitmask, np.zeros((len(batch), tm.words), np.int32))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_trie_meets_any_token_map_safely(data):
    """A trie (or rerank candidates) of one map's SIDs with a batch of another map: refused with
    InvalidInputError, or accepted and then walked to the end, every step's masks answering."""
    sizes = data.draw(level_sizes, label="sizes")
    other_sizes = data.draw(st.lists(st.integers(1, 6), min_size=len(sizes), max_size=len(sizes)) | level_sizes,
                            label="other_sizes")
    tm = token_map(sizes)
    items, codes = data.draw(catalogs(other_sizes))
    batch = _gr2.ConstraintBatch(tm)
    attempt(batch.add_catalog, _gr2.SidTrie(items, codes), n_items=1, answer_tags=data.draw(st.booleans()))
    attempt(batch.add_rerank, items[None], codes[None], reasoning="disabled")
    fits = len(other_sizes) == len(sizes) and all(codes.max(axis=0) < np.array(sizes))
    assert len(batch) == (2 if fits else 0)
    for _ in range(4 * (len(sizes) + 2) * len(items)):
        mask = np.zeros((len(batch), tm.words), np.int32)
        attempt(batch.fill_bitmask, mask)
        offsets, ids, _ = attempt(batch.allowed)
        picks = [int(ids[offsets[r] + data.draw(st.integers(0, offsets[r + 1] - offsets[r] - 1))])
                 for r in range(len(batch))]
        if not picks:
            break
        attempt(batch.advance, np.arange(len(batch), dtype=np.int64), np.array(picks, np.int64))
    assert all(batch.phases() == 3)


def test_catalog_rows_of_a_mismatched_trie_never_reach_the_automaton():
    """The issue-30 case: a trie whose codes only a wider map can spell, added to a batch of a
    narrower map. It used to be accepted and then panic in allowed_ids, fill_bitmask and advance."""
    narrow, wide = token_map([2]), token_map([8])
    trie = _gr2.SidTrie(np.arange(8, dtype=np.uint64), np.arange(8, dtype=np.uint16)[:, None])
    batch = _gr2.ConstraintBatch(narrow)
    with pytest.raises(gr2.InvalidInputError, match="trie: code 7 at level 0 has no token"):
        batch.add_catalog(trie, n_items=1)
    assert len(batch) == 0
    wide_batch = _gr2.ConstraintBatch(wide)
    wide_batch.add_catalog(trie, n_items=1)
    wide_batch.advance(np.array([0]), np.array([TAGS["sid_begin"]]))
    assert len(wide_batch.allowed_ids(0)) == 8


def test_a_rust_panic_becomes_an_internal_error():
    """`_panic_for_tests` panics inside the guard every binding runs in: Python sees
    gr2.InternalError (a Gr2Error and a RuntimeError), which `except Exception` catches."""
    assert issubclass(gr2.InternalError, gr2.Gr2Error) and issubclass(gr2.InternalError, RuntimeError)
    assert gr2.errors.InternalError is gr2.InternalError
    try:
        _gr2._panic_for_tests()
    except Exception as err:  # noqa: BLE001 - a PanicException would not be caught here
        assert type(err) is gr2.InternalError
        assert "internal error in gr2" in str(err) and "deliberate panic" in str(err)
    else:
        pytest.fail("_panic_for_tests returned")
    _gr2.ConstraintBatch(token_map([2]))  # the module is still usable afterwards


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_sid_index_writer_raises_only_gr2_errors(data):
    """SidIndexWriter (the out-of-core build) driven with hostile constructor arguments and a random
    walk of well-formed and hostile calls: only gr2 errors, the file equals SidIndex.build over the
    chunks that were accepted, and no temporary file survives the writer."""
    import contextlib
    import tempfile
    from pathlib import Path

    sizes = data.draw(level_sizes)
    # a hostile path such as "x" is a valid relative path: work in a scratch folder, not the checkout
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as cwd, contextlib.chdir(cwd):
        target = Path(tmp) / "x.gr2sid"
        path = data.draw(either(st.sampled_from([target, str(target)])), label="path")
        sizes_arg = data.draw(either(st.just(sizes)), label="level_sizes")
        chunk = data.draw(either(st.integers(1, 6) | st.none()), label="chunk_items")
        temp_dir = data.draw(either(st.sampled_from([None, tmp])), label="temp_dir")
        writer = attempt(_gr2.SidIndexWriter, path, sizes_arg, chunk_items=chunk, temp_dir=temp_dir)
        if writer is None:
            assert not target.exists() and [p.name for p in Path(tmp).iterdir()] == []
            return
        accepted_ids, accepted_codes = [], []
        next_id = 0
        for _ in range(data.draw(st.integers(0, 6), label="steps")):
            action = data.draw(st.sampled_from(["add", "add", "hostile", "len", "repr", "finish", "close"]))
            if action == "add":
                n = data.draw(st.integers(0, 5))
                ids = np.arange(next_id, next_id + n, dtype=np.uint64)
                codes = np.array([[data.draw(st.integers(0, k)) for k in sizes] for _ in range(n)],
                                 dtype=np.uint16).reshape(n, len(sizes))
                before = attempt(len, writer)
                if attempt(writer.add, ids, codes) is None and attempt(len, writer) == (before or 0) + n and n:
                    accepted_ids.append(ids)
                    accepted_codes.append(codes)
                    next_id += n
            elif action == "hostile":
                attempt(writer.add, data.draw(hostile, label="item_ids"), data.draw(hostile, label="codes"))
            elif action == "len":
                attempt(len, writer)
            elif action == "repr":
                repr(writer)
            elif action == "finish":
                attempt(writer.finish)
            else:
                attempt(writer.close)
        if not writer.closed:
            attempt(writer.finish)
        attempt(writer.close)
        # only a successful finish writes the file (after every accepted add); a hostile but
        # convertible level_sizes (b"x" is the sequence [120]) gives another layout: not compared
        if target.exists() and isinstance(sizes_arg, list) and sizes_arg == sizes:
            ids = np.concatenate(accepted_ids) if accepted_ids else np.zeros(0, np.uint64)
            codes = np.concatenate(accepted_codes) if accepted_codes else np.zeros((0, len(sizes)), np.uint16)
            assert target.read_bytes() == gr2.SidIndex.build(ids, codes, list(sizes)).to_bytes()
        leftovers = [p.name for p in Path(tmp).iterdir() if p.name != "x.gr2sid"]
        assert leftovers == []
