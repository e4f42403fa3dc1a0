"""The native decoding automaton (gr2._gr2.ConstraintBatch) against a plain-Python reference on
random and adversarial inputs: identical allowed sets at every step, bitmask layout of xgrammar /
vLLM, errors instead of unconstrained rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gr2
from gr2 import _gr2
from gr2.errors import ConstraintError, InvalidInputError

# Vocabulary layout for these tests: 0..9 text, 10..16 tags, then codes level by level.
SID_BEGIN, SID_END, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, EOS = range(10, 17)
PAD = 0


def make_token_map(level_sizes, vocab_extra=5):
    code_ids = np.full((len(level_sizes), max(level_sizes)), -1, dtype=np.int64)
    nxt = 17
    for level, size in enumerate(level_sizes):
        code_ids[level, :size] = np.arange(nxt, nxt + size)
        nxt += size
    vocab = nxt + vocab_extra
    tm = _gr2.TokenMap(
        code_ids, sid_begin=SID_BEGIN, sid_end=SID_END, think_open=THINK_OPEN, think_close=THINK_CLOSE,
        answer_open=ANSWER_OPEN, answer_close=ANSWER_CLOSE, eos=EOS, vocab_size=vocab,
        reasoning_vocab=vocab - 2, forbidden_in_reasoning=[PAD],
    )
    return tm, code_ids, vocab


class Reference:
    """The automaton written the obvious way: sets of remaining items and a prefix."""

    def __init__(self, items, codes, code_ids, vocab, *, reasoning, budget, n_items=None, answer_tags=True,
                 exclude=()):
        self.sids = {int(i): tuple(int(c) for c in s) for i, s in zip(items, codes)}
        self.remaining = {i for i in self.sids if i not in set(int(e) for e in exclude)}
        self.code_ids, self.vocab = code_ids, vocab
        self.levels = codes.shape[1]
        self.n_items = len(items) if n_items is None else n_items
        self.answer_tags, self.budget = answer_tags, budget
        self.emitted, self.prefix, self.used = [], None, 0
        self.phase = {"think": "think_open", "in_think": "reasoning", "disabled": "answer_open" if answer_tags else "items"}[reasoning]
        text = set(range(vocab - 2)) - {PAD, THINK_OPEN, ANSWER_OPEN, ANSWER_CLOSE, EOS}
        self.free = text

    def allowed(self):
        p = self.phase
        if p == "think_open":
            return {THINK_OPEN}
        if p == "reasoning":
            return set(self.free) if self.used < self.budget else {THINK_CLOSE}
        if p == "answer_open":
            return {ANSWER_OPEN}
        if p == "items":
            if len(self.emitted) < self.n_items:
                return {SID_BEGIN}
            return {ANSWER_CLOSE} if self.answer_tags else {EOS}
        if p == "sid":
            depth = len(self.prefix)
            if depth == self.levels:
                return {SID_END}
            return {int(self.code_ids[depth, s[depth]]) for i, s in self.sids.items()
                    if i in self.remaining and s[:depth] == self.prefix}
        return {EOS}  # expecting EOS, or finished

    def advance(self, tok):
        assert tok in self.allowed()
        p = self.phase
        if p == "think_open":
            self.phase = "reasoning"
        elif p == "reasoning":
            if tok == THINK_CLOSE:
                self.phase = "answer_open" if self.answer_tags else "items"
            else:
                self.used += 1
        elif p == "answer_open":
            self.phase = "items"
        elif p == "items":
            self.phase = {SID_BEGIN: "sid", ANSWER_CLOSE: "eos", EOS: "done"}[tok]
            self.prefix = ()
        elif p == "sid":
            if tok == SID_END:
                item = next(i for i, s in self.sids.items() if s == self.prefix and i in self.remaining)
                self.remaining.discard(item)
                self.emitted.append(item)
                self.phase = "items"
            else:
                code = int(np.nonzero(self.code_ids[len(self.prefix)] == tok)[0][0])
                self.prefix = self.prefix + (code,)
        else:
            self.phase = "done"


def bitmask_to_sets(mask, vocab):
    bits = (mask.astype(np.int64)[:, :, None] >> np.arange(32)) & 1
    flat = bits.reshape(mask.shape[0], -1)
    assert not flat[:, vocab:].any(), "bits beyond the vocabulary must be zero"
    return [set(np.nonzero(row[:vocab])[0].tolist()) for row in flat]


@st.composite
def rerank_case(draw):
    levels = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 4)) for _ in range(levels)]
    space = int(np.prod(sizes))
    k = draw(st.integers(1, min(space, 9)))
    flat = draw(st.lists(st.integers(0, space - 1), min_size=k, max_size=k, unique=True))
    codes = np.ascontiguousarray(np.array(np.unravel_index(flat, sizes)).T, dtype=np.uint16).reshape(k, levels)
    items = np.array(draw(st.lists(st.integers(0, 2**40), min_size=k, max_size=k, unique=True)), dtype=np.uint64)
    reasoning = draw(st.sampled_from(["think", "in_think", "disabled"]))
    budget = draw(st.integers(0, 4))
    choices = draw(st.lists(st.integers(0, 10**6), min_size=60, max_size=60))
    return sizes, items, codes, reasoning, budget, choices


@settings(max_examples=80)
@given(case=rerank_case(), rows=st.integers(1, 3))
def test_rerank_masks_match_reference(case, rows):
    sizes, items, codes, reasoning, budget, choices = case
    tm, code_ids, vocab = make_token_map(sizes)
    batch = _gr2.ConstraintBatch(tm)
    batch.add_rerank(items[None], codes[None], reasoning=reasoning, max_reasoning_tokens=budget, repeat=rows)
    refs = [Reference(items, codes, code_ids, vocab, reasoning=reasoning, budget=budget) for _ in range(rows)]
    mask = np.zeros((rows, tm.words), dtype=np.int32)
    pick = iter(choices * 4)
    for _ in range(200):
        batch.fill_bitmask(mask)
        got = bitmask_to_sets(mask, vocab)
        offsets, ids, free = batch.allowed()
        for r, ref in enumerate(refs):
            want = ref.allowed()
            assert got[r] == want
            if free[r]:
                assert want == ref.free and offsets[r] == offsets[r + 1]
            else:
                assert set(ids[offsets[r]:offsets[r + 1]].tolist()) == want
            assert set(batch.allowed_ids(r).tolist()) == want
        if all(ref.phase == "done" for ref in refs):
            break
        toks = []
        for ref in refs:
            options = sorted(ref.allowed())
            tok = options[next(pick) % len(options)]
            ref.advance(tok)
            toks.append(tok)
        batch.advance(np.arange(rows, dtype=np.int64), np.asarray(toks, dtype=np.int64))
    assert all(ref.phase == "done" for ref in refs)
    for r, ref in enumerate(refs):
        out = batch.emitted(r)
        assert out.tolist() == ref.emitted
        assert sorted(out.tolist()) == sorted(items.tolist())  # a permutation


@settings(max_examples=40)
@given(case=rerank_case(), n_items=st.integers(1, 4), data=st.data())
def test_catalog_masks_match_reference(case, n_items, data):
    sizes, items, codes, _, budget, choices = case
    tm, code_ids, vocab = make_token_map(sizes)
    exclude = np.array(data.draw(st.lists(st.sampled_from(items.tolist()), max_size=len(items))), dtype=np.uint64)
    available = len(set(items.tolist()) - set(exclude.tolist()))
    trie = _gr2.SidTrie(items, codes)
    batch = _gr2.ConstraintBatch(tm)
    answer_tags = data.draw(st.booleans())
    if available < n_items:
        with pytest.raises(ConstraintError):
            batch.add_catalog(trie, n_items=n_items, exclude=[exclude], answer_tags=answer_tags)
        return
    batch.add_catalog(trie, n_items=n_items, exclude=[exclude], answer_tags=answer_tags,
                      reasoning="in_think", max_reasoning_tokens=budget)
    ref = Reference(items, codes, code_ids, vocab, reasoning="in_think", budget=budget, n_items=n_items,
                    answer_tags=answer_tags, exclude=exclude)
    mask = np.zeros((1, tm.words), dtype=np.int32)
    pick = iter(choices * 4)
    while ref.phase != "done":
        batch.fill_bitmask(mask)
        assert bitmask_to_sets(mask, vocab)[0] == ref.allowed()
        options = sorted(ref.allowed())
        tok = options[next(pick) % len(options)]
        ref.advance(tok)
        batch.advance(np.zeros(1, dtype=np.int64), np.asarray([tok], dtype=np.int64))
    out = batch.emitted(0).tolist()
    assert out == ref.emitted and len(set(out)) == n_items
    assert not set(out) & set(exclude.tolist()) and set(out) <= set(items.tolist())


def test_bitmask_layout_matches_xgrammar_convention():
    tm, code_ids, vocab = make_token_map([40, 3])
    batch = _gr2.ConstraintBatch(tm)
    items = np.arange(3, dtype=np.uint64)
    codes = np.array([[33, 0], [33, 1], [5, 2]], dtype=np.uint16)
    batch.add_rerank(items[None], codes[None], reasoning="disabled")
    batch.advance(np.array([0]), np.array([ANSWER_OPEN]))
    batch.advance(np.array([0]), np.array([SID_BEGIN]))
    mask = np.zeros((1, tm.words), dtype=np.int32)
    batch.fill_bitmask(mask)
    allowed = sorted([int(code_ids[0, 33]), int(code_ids[0, 5])])
    for tok in allowed:  # bit j of word i allows token 32 * i + j
        assert (int(mask[0, tok // 32]) >> (tok % 32)) & 1 == 1
    assert sum(bin(int(w) & 0xFFFFFFFF).count("1") for w in mask[0]) == 2


def test_shared_long_prefixes_stay_open_until_resolved():
    tm, code_ids, vocab = make_token_map([2, 2, 2, 2])
    codes = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 1]], dtype=np.uint16)
    items = np.array([7, 8, 9], dtype=np.uint64)
    batch = _gr2.ConstraintBatch(tm)
    batch.add_rerank(items[None], codes[None], reasoning="disabled")
    row = np.array([0])
    for tok in [ANSWER_OPEN, SID_BEGIN, code_ids[0, 1], code_ids[1, 1], code_ids[2, 1], code_ids[3, 1], SID_END]:
        batch.advance(row, np.array([tok]))
    # Item 8 is used; the shared prefix (1, 1, 1) now leads only to item 7.
    batch.advance(row, np.array([SID_BEGIN]))
    for level, code in enumerate([1, 1]):
        assert batch.allowed_ids(0).tolist() == [code_ids[level, code]]
        batch.advance(row, np.array([code_ids[level, code]]))
    assert sorted(batch.allowed_ids(0).tolist()) == sorted([code_ids[2, 0], code_ids[2, 1]])
    batch.advance(row, np.array([code_ids[2, 1]]))
    assert batch.allowed_ids(0).tolist() == [code_ids[3, 0]]
    with pytest.raises(ConstraintError, match="not allowed"):
        batch.advance(row, np.array([code_ids[3, 1]]))  # would repeat item 8


def test_k_equals_one_and_budget_exhausted():
    tm, code_ids, vocab = make_token_map([3])
    batch = _gr2.ConstraintBatch(tm)
    batch.add_rerank(np.array([[42]], dtype=np.uint64), np.array([[[2]]], dtype=np.uint16), reasoning="think",
                     max_reasoning_tokens=2)
    row = np.array([0])
    seq = [THINK_OPEN, 1, 2, THINK_CLOSE, ANSWER_OPEN, SID_BEGIN, code_ids[0, 2], SID_END, ANSWER_CLOSE, EOS]
    for i, tok in enumerate(seq):
        if i == 3:  # budget used: only </think>
            assert batch.allowed_ids(0).tolist() == [THINK_CLOSE]
            with pytest.raises(ConstraintError):
                batch.advance(row, np.array([3]))
        batch.advance(row, np.array([tok]))
    assert batch.phases()[0] == 3 and batch.emitted(0).tolist() == [42]


def test_bad_inputs_raise_typed_errors():
    tm, code_ids, vocab = make_token_map([3, 3])
    batch = _gr2.ConstraintBatch(tm)
    codes = np.array([[[0, 1], [1, 2]]], dtype=np.uint16)
    with pytest.raises(InvalidInputError, match="twice"):
        batch.add_rerank(np.array([[5, 5]], dtype=np.uint64), codes)
    with pytest.raises(InvalidInputError, match="share the SID"):
        batch.add_rerank(np.array([[5, 6]], dtype=np.uint64), np.array([[[0, 1], [0, 1]]], dtype=np.uint16))
    with pytest.raises(InvalidInputError, match="no token"):
        batch.add_rerank(np.array([[5, 6]], dtype=np.uint64), np.array([[[0, 1], [0, 3]]], dtype=np.uint16))
    with pytest.raises(InvalidInputError):
        batch.add_rerank(np.array([[5, 6]], dtype=np.uint64), codes, reasoning="sometimes")
    fortran = np.asfortranarray(np.array([[[0, 1], [1, 2], [2, 0]]], dtype=np.uint16))
    with pytest.raises(InvalidInputError, match="C-contiguous"):
        batch.add_rerank(np.array([[5, 6, 7]], dtype=np.uint64), fortran)
    batch.add_rerank(np.array([[5, 6]], dtype=np.uint64), codes, repeat=2)
    with pytest.raises(InvalidInputError, match="out of range"):
        batch.advance(np.array([2]), np.array([THINK_OPEN]))
    with pytest.raises(ConstraintError, match="row 1"):  # all or nothing: row 0 must not move
        batch.advance(np.array([0, 1]), np.array([THINK_OPEN, 3]))
    assert batch.allowed_ids(0).tolist() == [THINK_OPEN]
    with pytest.raises(InvalidInputError):
        batch.fill_bitmask(np.zeros((2, tm.words + 1), dtype=np.int32))
    with pytest.raises(InvalidInputError, match="share token id"):
        _gr2.TokenMap(code_ids, sid_begin=1, sid_end=1, think_open=2, think_close=3, answer_open=4,
                      answer_close=5, eos=6, vocab_size=vocab)
    with pytest.raises(InvalidInputError, match="outside"):
        _gr2.TokenMap(code_ids, sid_begin=SID_BEGIN, sid_end=SID_END, think_open=THINK_OPEN,
                      think_close=THINK_CLOSE, answer_open=ANSWER_OPEN, answer_close=ANSWER_CLOSE, eos=EOS,
                      vocab_size=20)


def test_select_forks_independent_copies():
    tm, code_ids, vocab = make_token_map([3])
    batch = _gr2.ConstraintBatch(tm)
    batch.add_rerank(np.array([[1, 2, 3]], dtype=np.uint64), np.array([[[0], [1], [2]]], dtype=np.uint16),
                     reasoning="disabled")
    for tok in [ANSWER_OPEN, SID_BEGIN]:
        batch.advance(np.array([0]), np.array([tok]))
    forked = batch.select([0, 0])
    forked.advance(np.array([0, 1]), np.array([code_ids[0, 0], code_ids[0, 2]]))
    forked.advance(np.array([0, 1]), np.array([SID_END, SID_END]))
    assert forked.emitted(0).tolist() == [1] and forked.emitted(1).tolist() == [3]
    assert batch.emitted(0).tolist() == [] and len(batch.allowed_ids(0)) == 3


# --- issue 14 / 16: ragged requests, bounded resources, typed conversion errors --------------------


def test_ragged_requests_match_per_request_batches():
    tm, _, _ = make_token_map([3, 3])
    rows = [np.array([5], np.uint64), np.array([5, 6, 7], np.uint64), np.array([8, 9], np.uint64)]
    codes = [np.array([[0, 0]]), np.array([[0, 1], [1, 0], [2, 2]]), np.array([[1, 1], [0, 2]])]
    flat = np.concatenate(rows)
    offsets = np.array([0, 1, 4, 6], dtype=np.int64)
    batch = _gr2.ConstraintBatch(tm)
    assert batch.add_rerank_ragged(flat, np.concatenate(codes).astype(np.uint16), offsets,
                                   reasoning="disabled", repeat=2) == 0
    assert len(batch) == 6
    for i, (r, c) in enumerate(zip(rows, codes)):
        alone = _gr2.ConstraintBatch(tm)
        alone.add_rerank(r[None], c[None].astype(np.uint16), reasoning="disabled")
        for copy in (2 * i, 2 * i + 1):
            assert batch.allowed_ids(copy).tolist() == alone.allowed_ids(0).tolist()
    with pytest.raises(InvalidInputError, match="request 1"):
        batch.add_rerank_ragged(flat, np.concatenate(codes).astype(np.uint16), np.array([0, 1, 1, 6]),
                                reasoning="disabled")
    with pytest.raises(InvalidInputError, match="offsets"):
        batch.add_rerank_ragged(flat, np.concatenate(codes).astype(np.uint16), np.array([0, 1, 4, 5]))


def test_repeat_and_rows_are_bounded():
    tm, _, _ = make_token_map([3])
    batch = _gr2.ConstraintBatch(tm)
    one = (np.array([[5]], np.uint64), np.array([[[0]]], np.uint16))
    with pytest.raises(InvalidInputError, match="repeat must be in 1..=4096"):
        batch.add_rerank(*one, repeat=4097)  # was accepted: repeat=10**9 grew to 17 GB
    with pytest.raises(InvalidInputError, match="repeat"):
        batch.add_rerank(*one, repeat=0)
    assert len(batch) == 0
    trie = _gr2.SidTrie(np.array([1, 2], np.uint64), np.array([[0], [1]], np.uint16))
    with pytest.raises(InvalidInputError, match="at most"):
        batch.add_catalog(trie, rows=2**20 + 1)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda b: b.emitted(-1), "row"),
        (lambda b: b.emitted(2**64), "row"),
        (lambda b: b.allowed_ids("0"), "row"),
        (lambda b: b.select([2**63 * 4]), "rows"),
        (lambda b: b.select([-1]), "rows"),
        (lambda b: b.advance(np.array([0], np.int32), np.array([THINK_OPEN], np.int64)), "rows"),
        (lambda b: b.advance(np.array([0], np.int64), np.array([THINK_OPEN], np.uint64)), "tokens"),
        (lambda b: b.allowed(np.array([0], np.int32)), "rows"),
        (lambda b: b.add_rerank(np.array([[5]], np.int64), np.array([[[0]]], np.uint16)), "candidates"),
        (lambda b: b.add_rerank(np.array([[5]], np.uint64), np.array([[[0]]], np.int32)), "codes"),
        (lambda b: b.add_rerank(np.array([[5]], np.uint64), np.array([[[0]]], np.uint16), repeat=-1), "repeat"),
        (lambda b: b.add_rerank(np.array([[5]], np.uint64), np.array([[[0]]], np.uint16), max_reasoning_tokens=2**40),
         "max_reasoning_tokens"),
        (lambda b: b.add_rerank(np.array([[5]], np.uint64), np.array([[[0]]], np.uint16), reasoning=1), "reasoning"),
        (lambda b: b.fill_bitmask(np.zeros((1, 2), np.int64)), "out"),
    ],
)
def test_conversion_errors_name_the_argument(call, name):
    tm, _, _ = make_token_map([3])
    batch = _gr2.ConstraintBatch(tm)
    batch.add_rerank(np.array([[5]], np.uint64), np.array([[[0]]], np.uint16))
    with pytest.raises(InvalidInputError, match=f"^{name} must be"):
        call(batch)


def test_token_map_conversion_errors_name_the_argument():
    codes = np.array([[17, 18]], dtype=np.int64)
    tags = dict(sid_begin=10, sid_end=11, think_open=12, think_close=13, answer_open=14, answer_close=15, eos=16)
    with pytest.raises(InvalidInputError, match="^code_ids must be"):
        _gr2.TokenMap(codes.astype(np.int32), vocab_size=30, **tags)
    with pytest.raises(InvalidInputError, match="^vocab_size must be"):
        _gr2.TokenMap(codes, vocab_size=-3, **tags)
    with pytest.raises(InvalidInputError, match="^eos must be"):
        _gr2.TokenMap(codes, vocab_size=30, **{**tags, "eos": 2**63})
    with pytest.raises(InvalidInputError, match="^item_ids must be"):
        _gr2.SidTrie(np.array([1], np.int64), np.array([[0]], np.uint16))


def test_sid_trie_from_index_equals_the_array_trie():
    """SidTrie.from_index reads the loaded index in Rust; it holds exactly the items the
    array-built trie holds, and a batch refuses it when its token map has other levels."""
    rng = np.random.default_rng(3)
    flat = rng.choice(8 * 8 * 4, size=60, replace=False)
    codes = np.array(np.unravel_index(flat, (8, 8, 4))).T.astype(np.uint16)
    items = rng.choice(10**6, size=60, replace=False).astype(np.uint64)
    index = gr2.SidIndex.build(items, codes, [8, 8, 4])
    tm, _, _ = make_token_map((8, 8, 4))
    from_index = _gr2.SidTrie.from_index(index)
    from_arrays = _gr2.SidTrie(index.item_ids(), index.codes())
    assert len(from_index) == len(from_arrays) == 60
    assert all(int(i) in from_index for i in items) and 7 not in from_index
    two_levels = gr2.SidIndex.build(items[:5], codes[:5, :2], [8, 8])
    with pytest.raises(InvalidInputError, match="trie: the SIDs have 2 levels, the token map 3"):
        _gr2.ConstraintBatch(tm).add_catalog(_gr2.SidTrie.from_index(two_levels))


def test_a_trie_is_checked_against_the_token_map_it_decodes_with():
    """A trie built with codes up to 7 meets a token map with 2 codes per level: add_catalog raises
    InvalidInputError naming the code (it used to panic later, in allowed_ids/fill_bitmask/advance)."""
    wide, _, _ = make_token_map([8])
    narrow, narrow_ids, _ = make_token_map([2])
    trie = _gr2.SidTrie(np.arange(8, dtype=np.uint64), np.arange(8, dtype=np.uint16)[:, None])
    batch = _gr2.ConstraintBatch(narrow)
    with pytest.raises(InvalidInputError, match="trie: code 7 at level 0 has no token"):
        batch.add_catalog(trie, n_items=1)
    assert len(batch) == 0
    _gr2.ConstraintBatch(wide).add_catalog(trie, n_items=1)  # the map it fits
    # a trie whose codes the narrow map covers decodes with it, whatever map anyone built it near
    small = _gr2.SidTrie(np.array([4, 9], np.uint64), np.array([[1], [0]], np.uint16))
    batch.add_catalog(small, n_items=2)
    batch.advance(np.array([0]), np.array([SID_BEGIN]))
    assert batch.allowed_ids(0).tolist() == sorted(narrow_ids[0, :2].tolist())


def test_one_sid_level_limit_for_token_maps_tries_and_rewards():
    """One limit, MAX_SID_LEVELS = 26 (the level letters a..z of <s_X_N>), refused the same way
    by the token map, the trie and the reward verifier (the token map and trie allowed 255)."""
    from gr2.tokens import LEVEL_LETTERS

    assert _gr2.MAX_SID_LEVELS == len(LEVEL_LETTERS) == 26
    most, too_many = _gr2.MAX_SID_LEVELS, _gr2.MAX_SID_LEVELS + 1
    assert len(_gr2.SidTrie(np.array([1], np.uint64), np.zeros((1, most), np.uint16))) == 1
    assert make_token_map([1] * most)[0].levels == most
    with pytest.raises(InvalidInputError, match="^codes: 27 SID levels, but gr2 supports 1..=26"):
        _gr2.SidTrie(np.array([1], np.uint64), np.zeros((1, too_many), np.uint16))
    with pytest.raises(InvalidInputError, match="^code_ids: 27 SID levels, but gr2 supports 1..=26"):
        make_token_map([1] * too_many)
    with pytest.raises(InvalidInputError, match="^candidate SIDs: 27 SID levels, but gr2 supports 1..=26"):
        gr2.verify_rewards(["x"], [[1]], [1], candidate_sids=np.zeros((1, 1, too_many), np.uint16))


def test_a_token_map_without_eos_verifies_but_does_not_decode():
    tm, code_ids, vocab = make_token_map([3])
    no_eos = _gr2.TokenMap(code_ids, sid_begin=SID_BEGIN, sid_end=SID_END, think_open=THINK_OPEN,
                           think_close=THINK_CLOSE, answer_open=ANSWER_OPEN, answer_close=ANSWER_CLOSE,
                           vocab_size=vocab)
    assert no_eos.eos is None and tm.eos == EOS
    assert EOS not in no_eos.reasoning_forbidden().tolist()
    with pytest.raises(InvalidInputError, match="^token_map has no eos"):
        _gr2.ConstraintBatch(no_eos)


def test_from_index_builds_the_trie_once_per_index():
    """SidTrie.from_index keeps the trie with the index: a second call returns the same object
    (nothing rebuilt). An index derived with extend/remove is a new index with its own trie."""
    rng = np.random.default_rng(5)
    flat = rng.choice(4 * 4 * 4, size=20, replace=False)
    codes = np.array(np.unravel_index(flat, (4, 4, 4))).T.astype(np.uint16)
    items = np.arange(100, 120, dtype=np.uint64)
    index = gr2.SidIndex.build(items, codes, [4, 4, 4])
    trie = _gr2.SidTrie.from_index(index)
    assert _gr2.SidTrie.from_index(index) is trie
    free = next(c for c in np.ndindex(4, 4, 4) if not (codes == c).all(axis=1).any())
    extended = index.extend(np.array([7], np.uint64), np.array([free], np.uint16))
    bigger = _gr2.SidTrie.from_index(extended)
    assert bigger is not trie and _gr2.SidTrie.from_index(extended) is bigger
    assert len(bigger) == 21 and 7 in bigger and len(trie) == 20 and 7 not in trie
    smaller = _gr2.SidTrie.from_index(index.remove(np.array([100], np.uint64)))
    assert len(smaller) == 19 and 100 not in smaller and 100 in trie
    tm, _, _ = make_token_map((4, 4, 4))
    for source, kept in ((index, trie), (extended, bigger)):  # a kept trie decodes like a fresh one
        first_codes = []
        for t in (kept, _gr2.SidTrie(source.item_ids(), source.codes())):
            batch = _gr2.ConstraintBatch(tm)
            batch.add_catalog(t, n_items=1)
            batch.advance(np.array([0]), np.array([SID_BEGIN]))
            first_codes.append(batch.allowed_ids(0).tolist())
        assert first_codes[0] == first_codes[1]
