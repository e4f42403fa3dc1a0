"""gr2.verify_rewards against the pure-Python reference (tests/_reward_reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gr2
from gr2.rewards import NO_ITEM, InvalidReason, rank_metrics
from gr2.tokens import SidTokens, sid_to_text

import _reward_reference as ref

# ---------------------------------------------------------------------------------------------
# helpers


def ArrayIndex(item_ids, codes):
    """A real gr2.SidIndex over explicit, already unique SIDs (the verifier looks non-candidate
    SIDs up in it directly)."""
    index = gr2.SidIndex.build(np.asarray(item_ids, dtype=np.uint64), np.asarray(codes, dtype=np.uint16))
    assert index.uniqueness_before_repair == 1.0
    return index


def answer(sids, sep=""):
    return "<answer>" + sep.join(sid_to_text(s) for s in sids) + "</answer>"


def check_against_reference(batch, rows, *, relevance=False):
    for b, r in enumerate(rows):
        got = {
            "reward": batch.reward[b], "valid": bool(batch.valid[b]), "reason": ref.REASONS[batch.invalid_reason[b]],
            "rank_pre": int(batch.rank_pre[b]), "rank_re": int(batch.rank_re[b]), "r_rank": batch.r_rank[b],
            "r_fmt": batch.r_fmt[b], "copied_order": bool(batch.copied_order[b]),
            "top1_input_pos": int(batch.top1_input_pos[b]), "n_sids": int(batch.n_sids[b]),
            "ranking": [int(x) for x in batch.ranking[b]],
        }
        for key, value in got.items():
            assert value == r[key], (b, key, value, r[key])
        np.testing.assert_allclose(batch.recall[b], r["recall"], rtol=0, atol=0)
        np.testing.assert_allclose(batch.ndcg[b], r["ndcg"], rtol=1e-15)
        if relevance:
            assert math.isclose(batch.graded_ndcg[b], r["graded_ndcg"], rel_tol=1e-12, abs_tol=1e-12)
            assert batch.auc[b] == r["auc"]


K, L = 4, 3
ITEMS = np.array([[10, 11, 12, 13], [20, 21, 22, 23]], dtype=np.uint64)
SIDS = np.array([[[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]], [[2, 0, 0], [2, 0, 1], [2, 1, 0], [2, 1, 1]]], dtype=np.uint16)
INDEX = ArrayIndex(np.concatenate([ITEMS.ravel(), [99]]), np.concatenate([SIDS.reshape(-1, L), [[3, 3, 3]]]))


def verify(texts, targets=(12, 20), **kw):
    kw.setdefault("index", INDEX)
    return gr2.verify_rewards(texts, ITEMS, np.array(targets, dtype=np.uint64), **kw)


# ---------------------------------------------------------------------------------------------
# worked examples of docs/DESIGN.md §1


def test_rewards_follow_design_formulas():
    # row 0: target 12 at pre-rank 3 moved to 1 -> r_rank = 2/4, format reward earned
    # row 1: target 20 at pre-rank 1 kept at 1 (copy of the input order) -> 0 + alpha (both ranks 1)
    texts = [
        "<think>12 fits best</think>" + answer(SIDS[0][[2, 0, 1, 3]]),
        "<think>keep</think>\n" + answer(SIDS[1], sep=" ") + "<|im_end|>",
    ]
    rb = verify(texts)
    assert rb.valid.tolist() == [True, True]
    assert rb.rank_pre.tolist() == [3, 1] and rb.rank_re.tolist() == [1, 1]
    assert rb.r_rank.tolist() == [0.5, 0.0]
    assert rb.reward.tolist() == pytest.approx([0.5 + 0.2, 0.2])
    assert rb.copied_order.tolist() == [False, True]
    assert rb.top1_input_pos.tolist() == [3, 1]
    assert rb.ranking.tolist() == [[12, 10, 11, 13], [20, 21, 22, 23]]
    assert rb.recall[:, 0].tolist() == [1.0, 1.0]


def test_conditional_format_reward_withholds_alpha_from_copying():
    # target at pre-rank 2; copying the input keeps it at 2: r_rank = 0
    texts = [answer(SIDS[0]), answer(SIDS[1][[1, 0, 2, 3]])]
    cond = verify(texts, targets=(11, 21))
    uncond = verify(texts, targets=(11, 21), conditional=False)
    assert cond.reward.tolist() == [0.0, pytest.approx(0.25 + 0.2)]
    assert uncond.reward.tolist() == [pytest.approx(0.2), pytest.approx(0.45)]
    # a worse ranking: negative r_rank, no format reward under the conditional form
    worse = verify([answer(SIDS[0][[0, 2, 3, 1]]), answer(SIDS[1])], targets=(11, 20))
    assert worse.r_rank[0] == -0.5 and worse.reward[0] == -0.5


@pytest.mark.parametrize(
    "text, reason",
    [
        (answer(SIDS[0][:3]), InvalidReason.WRONG_COUNT),
        (answer(SIDS[0][[0, 1, 1, 3]]), InvalidReason.REPEAT),
        (answer([SIDS[0][0], SIDS[0][1], SIDS[1][0], SIDS[0][3]]), InvalidReason.NOT_CANDIDATE),
        (answer([SIDS[0][0], SIDS[0][1], [3, 3, 3], SIDS[0][3]]), InvalidReason.NOT_CANDIDATE),
        (answer([SIDS[0][0], SIDS[0][1], [7, 7, 7], SIDS[0][3]]), InvalidReason.UNKNOWN_SID),
        (answer(SIDS[0])[:-1], InvalidReason.MALFORMED),  # truncated
        ("<think>no answer</think>", InvalidReason.MALFORMED),
        ("<think>x</think>y" + answer(SIDS[0]), InvalidReason.MALFORMED),  # text between think and answer
        ("<think>" + answer(SIDS[0]), InvalidReason.MALFORMED),  # think never closed
        ("<think></think>" + answer(SIDS[0]) + answer(SIDS[0]), InvalidReason.MALFORMED),  # two answers
        (answer(SIDS[0]) + " thanks!", InvalidReason.MALFORMED),
        ("Sure! " + answer(SIDS[0]), InvalidReason.MALFORMED),
        (answer(SIDS[0]).replace("<s_b_0>", "<s_b_00>", 1), InvalidReason.MALFORMED),
        (answer(SIDS[0]).replace("<s_b_0>", "<s_b_99999999999999999999>", 1), InvalidReason.MALFORMED),
        (answer(SIDS[0]).replace("<s_b_0>", "<answer><s_b_0>", 1), InvalidReason.MALFORMED),
        (answer(SIDS[0]).replace("<s_b_0>", "<s_c_0>", 1), InvalidReason.MALFORMED),
        (answer(SIDS[0]).replace("<|sid_end|>", "<s_d_0><|sid_end|>", 1), InvalidReason.MALFORMED),
        (answer(SIDS[0]).replace("<s_a_0>", "<s_a_\u0661>", 1), InvalidReason.MALFORMED),  # arabic digit
        ("<answer>\u00a0" + answer(SIDS[0])[8:], InvalidReason.MALFORMED),  # no-break space is text
    ],
)
def test_invalid_reasons(text, reason):
    rb = verify([text, answer(SIDS[1])])
    assert rb.invalid_reason[0] == reason, rb.reason_names
    assert not rb.valid[0] and rb.reward[0] == -1.0 and rb.rank_re[0] == 0
    assert rb.ranking[0].tolist() == [NO_ITEM] * K
    assert rb.valid[1]


def test_without_index_every_foreign_sid_is_unknown():
    text = answer([SIDS[0][0], SIDS[0][1], SIDS[1][0], SIDS[0][3]])
    rb = verify([text, answer(SIDS[1])], index=None, candidate_sids=SIDS)
    assert rb.invalid_reason[0] == InvalidReason.UNKNOWN_SID


def test_whitespace_inside_sid_and_invalid_reward_configurable():
    text = "\n <think>\tx</think>\r\n<answer>\n" + "".join(
        "<|sid_begin|> " + " ".join(f"<s_{'abc'[i]}_{c}>" for i, c in enumerate(s)) + "\n<|sid_end|>" for s in SIDS[0]
    ) + " </answer>\n<|im_end|><|endoftext|>\n"
    rb = verify([text, "garbage"], invalid_reward=-3.5)
    assert rb.valid.tolist() == [True, False] and rb.reward[1] == -3.5
    rb = verify([answer(SIDS[0]) + "<|im_end|>", answer(SIDS[1])], trailers=())
    assert rb.invalid_reason.tolist() == [InvalidReason.MALFORMED, 0]


def test_graded_rewards_zero_copying_a_non_optimal_order():
    rel = np.array([[0, 2, 1, 0], [3, 2, 1, 0]], dtype=np.float32)
    texts = [answer(SIDS[0]), answer(SIDS[1])]  # both copy the input order
    rb = verify(texts, targets=(11, 20), relevance=rel, reward_kind="ndcg")
    assert rb.graded_ndcg[0] == 0.0 and rb.auc[0] == 0.0 and rb.reward[0] == 0.0  # non-optimal input copied
    assert rb.graded_ndcg[1] == pytest.approx(1.0) and rb.auc[1] == 1.0  # the input was already optimal
    best = verify([answer(SIDS[0][[1, 2, 0, 3]]), answer(SIDS[1])], targets=(11, 20), relevance=rel, reward_kind="auc")
    assert best.auc[0] == 1.0 and best.reward[0] == 1.0 and best.graded_ndcg[0] == pytest.approx(1.0)


def test_summary_and_rank_metrics():
    rb = verify([answer(SIDS[0][[2, 0, 1, 3]]), "x"])
    s = rb.summary()
    assert s["valid_rate"] == 0.5 and s["invalid_malformed"] == 0.5 and s["recall@1"] == 0.5
    assert s["pre_recall@3"] == 1.0
    hit, ndcg = rank_metrics(np.array([1, 3, 0]), (1, 5))
    assert hit.tolist() == [[1, 1], [0, 1], [0, 0]]
    assert ndcg[1, 1] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=(14, 20)), "not among"),
        (dict(metric_ks=(0,)), "metric_ks"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(reward_kind="ndcg"), "relevance"),
        (dict(reward_kind="bogus"), "kind"),
        (dict(relevance=np.full((2, K), -1.0)), "relevance"),
        (dict(index=None), "index"),
    ],
)
def test_bad_inputs_raise_typed_errors(kwargs, match):
    with pytest.raises(gr2.Gr2Error, match=match):
        verify([answer(SIDS[0]), answer(SIDS[1])], **kwargs)


def test_bad_shapes_and_duplicates():
    with pytest.raises(gr2.InvalidInputError, match="completions"):
        verify([answer(SIDS[0])])
    with pytest.raises(gr2.InvalidInputError, match="twice"):
        gr2.verify_rewards(["x"], [[1, 1]], [1], candidate_sids=np.array([[[0], [1]]]))
    with pytest.raises(gr2.InvalidInputError, match="share the SID"):
        gr2.verify_rewards(["x"], [[1, 2]], [1], candidate_sids=np.array([[[0], [0]]]))
    with pytest.raises(gr2.InvalidInputError, match="negative"):
        gr2.verify_rewards(["x"], [[-1, 2]], [2], candidate_sids=np.array([[[0], [1]]]))
    with pytest.raises(gr2.InvalidInputError, match="mix"):
        verify([answer(SIDS[0]), [1, 2]])
    with pytest.raises(gr2.InvalidInputError, match="sid_tokens"):
        verify([[1], [2]])
    empty = gr2.verify_rewards([], np.zeros((0, 3), np.uint64), np.zeros(0, np.uint64), candidate_sids=np.zeros((0, 3, 2)))
    assert len(empty) == 0 and empty.ranking.shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# property tests against the reference: random and adversarial completions

FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "<|sid_begin|>", "<|sid_end|>", "<s_a_0>", "<s_b_1>",
    "<s_a_65536>", "<s_c_00>", "<s_a_", "<s_", "<", ">", " ", "\n", "\t", "\u00a0", "é", "日本", "🙂", "\u0661",
    "x", "0", "<|im_end|>", "</s>", "<think", "</answer", "<|sid_begin", "<s_a_99999999999999999999>",
]


@st.composite
def batches(draw):
    k = draw(st.integers(1, 5))
    levels = draw(st.integers(1, 3))
    b = draw(st.integers(1, 6))
    # small code alphabet so foreign SIDs often collide with candidates of other rows / the catalog
    all_sids = draw(st.lists(st.tuples(*[st.integers(0, 2)] * levels), min_size=k, max_size=18, unique=True))
    rows_items, rows_sids, targets, texts = [], [], [], []
    catalog_sids = all_sids[: max(k, len(all_sids) - 2)]  # the last SIDs (if any) belong to no item
    for row in range(b):
        cols = draw(st.permutations(list(range(len(catalog_sids)))))[:k]
        rows_sids.append([catalog_sids[c] for c in cols])
        rows_items.append([100 + c for c in cols])
        targets.append(rows_items[-1][draw(st.integers(0, k - 1))])
        texts.append(draw(completion(rows_sids[-1], all_sids, levels)))
    relevance = draw(st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=k, max_size=k), min_size=b, max_size=b))
    return k, levels, rows_items, rows_sids, targets, texts, catalog_sids, relevance


@st.composite
def completion(draw, cand_sids, all_sids, levels):
    kind = draw(st.sampled_from(["perm", "perm", "perm", "sids", "fragments", "text"]))
    if kind == "text":
        return draw(st.text(max_size=60))
    if kind == "fragments":
        return "".join(draw(st.lists(st.sampled_from(FRAGMENTS), max_size=30)))
    if kind == "perm":
        sids = draw(st.permutations(cand_sids))
    else:
        sids = draw(st.lists(st.sampled_from(all_sids), max_size=len(cand_sids) + 2))
    ws = st.sampled_from(["", "", " ", "\n", " \t\r\n"])
    parts = [draw(ws)]
    if draw(st.booleans()):
        think_bits = st.sampled_from(["a", " ", "<", ">", "é", "<s_a_1>", "<|sid_end|>", "</thin"])
        parts.append("<think>" + "".join(draw(st.lists(think_bits, max_size=20))) + "</think>")
    parts.append(draw(ws) + "<answer>")
    for sid in sids:
        parts.append(draw(ws) + "<|sid_begin|>" + "".join(draw(ws) + f"<s_{'abc'[i]}_{c}>" for i, c in enumerate(sid)) + draw(ws) + "<|sid_end|>")
    parts.append(draw(ws) + "</answer>" + draw(st.sampled_from(["", "\n", "<|im_end|>", " </s>\n", "!"])))
    text = "".join(parts)
    mutation = draw(st.sampled_from(["none", "none", "truncate", "insert", "delete"]))
    if text and mutation != "none":
        at = draw(st.integers(0, len(text)))
        if mutation == "truncate":
            text = text[:at]
        elif mutation == "insert":
            text = text[:at] + draw(st.sampled_from(FRAGMENTS)) + text[at:]
        else:
            text = text[:at] + text[at + 1 :]
    return text


@given(batches(), st.booleans(), st.sampled_from(["rank", "ndcg", "auc"]), st.booleans())
def test_matches_reference_on_random_and_adversarial_text(batch, conditional, kind, with_catalog):
    k, levels, items, sids, targets, texts, catalog, relevance = batch
    trailers = ["<|im_end|>", "</s>"]
    kw = dict(alpha=0.3, conditional=conditional, invalid_reward=-0.7, metric_ks=(1, 2, 5), kind=kind)
    index = ArrayIndex([100 + c for c in range(len(catalog))], catalog) if with_catalog else None
    rb = gr2.verify_rewards(
        texts, np.array(items), np.array(targets), index, candidate_sids=np.array(sids), relevance=np.array(relevance),
        trailers=trailers, reward_kind=kind, alpha=0.3, conditional=conditional, invalid_reward=-0.7, metric_ks=(1, 2, 5),
    )
    rows = ref.verify_texts(texts, items, sids, targets, trailers=trailers, catalog=catalog if with_catalog else None,
                            relevance=relevance, **kw)
    check_against_reference(rb, rows, relevance=True)


def test_very_long_and_huge_outputs():
    long_think = "<think>" + ("é<s_a_1> <" * 100_000) + "</think>"
    texts = [long_think + answer(SIDS[0]), answer(SIDS[1]) * 1000]
    rb = verify(texts, targets=(10, 20))
    assert rb.valid.tolist() == [True, False] and rb.invalid_reason[1] == InvalidReason.MALFORMED
    many = answer(list(SIDS[0]) * 5000)  # a huge answer of repeats
    rb = verify([many, "<answer>" + "<|sid_begin|><s_a_" + "9" * 10_000 + ">"], targets=(10, 20))
    assert rb.invalid_reason.tolist() == [InvalidReason.REPEAT, InvalidReason.MALFORMED]
    assert rb.n_sids[0] == 20_000


# ---------------------------------------------------------------------------------------------
# token-id completions

TAGS = dict(think_open=1, think_close=2, answer_open=3, answer_close=4, sid_begin=5, sid_end=6)
WS_ID, EOS_ID, TEXT_IDS = 7, 8, [9, 10, 11]


def sid_tokens(levels, width):
    code_ids = 100 + np.arange(levels * width, dtype=np.int64).reshape(levels, width)
    return SidTokens(code_ids=code_ids, level_sizes=(width,) * levels, **TAGS)


@st.composite
def token_batches(draw):
    k, levels, items, sids, targets, texts, catalog, relevance = draw(batches())
    st_map = sid_tokens(levels, 3)
    seqs = []
    for row in range(len(items)):
        ids = []
        if draw(st.booleans()):
            ids += [TAGS["think_open"]] + draw(st.lists(st.sampled_from(TEXT_IDS + [WS_ID, 5, 6, 100]), max_size=6)) + [TAGS["think_close"]]
        ids.append(TAGS["answer_open"])
        for sid in draw(st.permutations(sids[row])) if draw(st.booleans()) else draw(st.lists(st.sampled_from(catalog), max_size=k + 1)):
            ids += st_map.sid_token_ids(sid)
            if draw(st.booleans()):
                ids.append(WS_ID)
        ids.append(TAGS["answer_close"])
        ids += draw(st.lists(st.sampled_from([EOS_ID, WS_ID]), max_size=3))
        mutation = draw(st.sampled_from(["none", "none", "truncate", "insert"]))
        at = draw(st.integers(0, len(ids)))
        if mutation == "truncate":
            ids = ids[:at]
        elif mutation == "insert":
            ids.insert(at, draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9, 100, 10**6, -5])))
        seqs.append(ids)
    return levels, items, sids, targets, seqs, catalog, st_map


@given(token_batches())
def test_token_ids_match_reference(batch):
    levels, items, sids, targets, seqs, catalog, st_map = batch
    index = ArrayIndex([100 + c for c in range(len(catalog))], catalog)
    rb = gr2.verify_rewards(seqs, np.array(items), np.array(targets), index, candidate_sids=np.array(sids),
                            sid_tokens=st_map, whitespace_ids=[WS_ID], trailer_ids=[EOS_ID])
    code_of = st_map.code_of_token()
    cat = {tuple(s) for s in catalog}
    rows = [
        ref.verify_row(ref.parse_tokens(seq, levels, TAGS, code_of, {WS_ID}, {EOS_ID}), items[b],
                       [tuple(s) for s in sids[b]], targets[b], catalog=cat)
        for b, seq in enumerate(seqs)
    ]
    check_against_reference(rb, rows)


def test_token_ids_agree_with_text():
    st_map = sid_tokens(L, 3)
    perm = SIDS[0][[3, 1, 0, 2]]
    ids = [TAGS["think_open"], 9, 10, TAGS["think_close"], TAGS["answer_open"]]
    for s in perm:
        ids += st_map.sid_token_ids(s)
    ids += [TAGS["answer_close"], EOS_ID]
    as_ids = verify([np.array(ids), ids[:-2]], sid_tokens=st_map, trailer_ids=[EOS_ID], targets=(13, 20))
    as_text = verify(["<think>ab</think>" + answer(perm) + "</s>", "x"], targets=(13, 20))
    assert as_ids.valid.tolist() == [True, False]
    assert as_ids.reward[0] == as_text.reward[0] and as_ids.ranking[0].tolist() == as_text.ranking[0].tolist()
    with pytest.raises(gr2.InvalidInputError, match="levels"):
        verify([ids, ids], sid_tokens=sid_tokens(2, 3))
    with pytest.raises(gr2.InvalidInputError, match="another role"):
        verify([ids, ids], sid_tokens=st_map, trailer_ids=[TAGS["answer_open"]])


def test_token_path_reads_the_one_token_map_built_once_per_sid_tokens():
    """The token-id path verifies with a gr2.TokenMap (the type constrained decoding uses), built
    once per distinct SidTokens and reused: no per-call id table. Equal ids share the map."""
    from gr2 import rewards

    st_map = sid_tokens(L, 3)
    tm = rewards._verification_token_map(st_map)
    assert isinstance(tm, gr2.TokenMap) and tm.eos is None and tm.levels == L
    assert rewards._verification_token_map(sid_tokens(L, 3)) is tm
    ids = [TAGS["answer_open"]] + [i for s in SIDS[0] for i in st_map.sid_token_ids(s)] + [TAGS["answer_close"]]
    before = rewards._token_map_of.cache_info()
    first = verify([ids, ids[:-1]], sid_tokens=st_map, targets=(10, 20))
    again = verify([ids, ids[:-1]], sid_tokens=st_map, targets=(10, 20))
    after = rewards._token_map_of.cache_info()
    assert after.hits == before.hits + 2 and after.misses == before.misses
    assert first.valid.tolist() == [True, False] and again.reward.tolist() == first.reward.tolist()
    with pytest.raises(gr2.InvalidInputError, match="^sid_tokens: tags sid_begin and sid_end share"):
        verify([ids, ids], sid_tokens=SidTokens(code_ids=st_map.code_ids, level_sizes=st_map.level_sizes,
                                                **{**TAGS, "sid_end": TAGS["sid_begin"]}), targets=(10, 20))


def test_with_a_real_sid_index():
    """gr2.SidIndex gives the candidates' SIDs and tells not_candidate from unknown_sid."""
    item_ids = np.concatenate([ITEMS.ravel(), [99]]).astype(np.uint64)
    codes = np.concatenate([SIDS.reshape(-1, L), [[3, 3, 3]]]).astype(np.uint16)
    index = gr2.SidIndex.build(item_ids, codes, codebook_size=[8, 8, 8])
    assert index.levels == L
    texts = [
        answer([SIDS[0][0], SIDS[0][1], [3, 3, 3], SIDS[0][3]]),  # item 99: in the catalog, not a candidate
        answer([SIDS[1][0], [7, 7, 7], SIDS[1][2], SIDS[1][3]]),  # no item has this SID
    ]
    rb = gr2.verify_rewards(texts, ITEMS, np.array([12, 20]), index)
    assert rb.invalid_reason.tolist() == [InvalidReason.NOT_CANDIDATE, InvalidReason.UNKNOWN_SID]
    ok = gr2.verify_rewards([answer(SIDS[0][[2, 0, 1, 3]]), answer(SIDS[1])], ITEMS, np.array([12, 20]), index)
    assert ok.valid.all() and ok.ranking[0].tolist() == [12, 10, 11, 13]
    with pytest.raises(gr2.UnknownItemError):
        gr2.verify_rewards(texts, ITEMS + 1000, np.array([1012, 1020]), index)


# ---------------------------------------------------------------------------------------------
# issue 14 / 16: ragged K, one reasoning rule for text and token ids, validated inputs


@st.composite
def ragged_batch(draw):
    """Requests with K = 1..6 each, SIDs distinct within a request, completions that are valid,
    reordered, truncated, repeated or padded with tag-like reasoning."""
    b = draw(st.integers(1, 5))
    levels = 2
    items, sids, targets, texts, rels = [], [], [], [], []
    for row in range(b):
        k = draw(st.integers(1, 6))
        codes = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=k, max_size=k, unique=True))
        ids = [1000 * (row + 1) + c for c in range(k)]
        perm = draw(st.permutations(range(k)))
        out = [codes[c] for c in perm]
        kind = draw(st.sampled_from(["ok", "short", "repeat", "think"]))
        if kind == "short":
            out = out[:-1]
        elif kind == "repeat":
            out = out + out[:1]
        body = draw(st.sampled_from(["", "<answer>", "</think> x", "<think>", "</answer><answer>"]))
        text = ("<think>" + body + "</think>" if kind == "think" else "") + answer(out)
        items.append(ids)
        sids.append(np.array(codes, dtype=np.uint16).reshape(k, levels))
        targets.append(ids[draw(st.integers(0, k - 1))])
        texts.append(text)
        rels.append(np.array(draw(st.lists(st.integers(0, 3), min_size=k, max_size=k)), dtype=np.float32))
    return texts, items, sids, targets, rels


@settings(max_examples=60, deadline=None)
@given(case=ragged_batch(), kind=st.sampled_from(["rank", "ndcg"]))
def test_ragged_candidates_match_reference(case, kind):
    texts, items, sids, targets, rels = case
    batch = gr2.verify_rewards(texts, items, targets, candidate_sids=sids, relevance=rels, reward_kind=kind)
    width = max(len(r) for r in items)
    assert batch.ranking.shape == (len(items), width)
    for b, row in enumerate(items):
        assert (batch.ranking[b, len(row):] == NO_ITEM).all()
    trimmed = _Trimmed(batch, [len(r) for r in items])
    rows = ref.verify_texts(texts, items, sids, targets, relevance=rels, kind=kind)
    check_against_reference(trimmed, rows, relevance=True)
    # each row scores as it would alone
    for b in range(len(items)):
        alone = gr2.verify_rewards([texts[b]], [items[b]], [targets[b]], candidate_sids=[sids[b]], relevance=[rels[b]],
                                   reward_kind=kind)
        assert alone.reward[0] == batch.reward[b] and alone.invalid_reason[0] == batch.invalid_reason[b]


class _Trimmed:
    """A RewardBatch view whose ranking rows are cut to each request's own K."""

    def __init__(self, batch, sizes):
        self._batch, self.ranking = batch, [batch.ranking[b, :k] for b, k in enumerate(sizes)]

    def __getattr__(self, name):
        return getattr(self._batch, name)


def test_ragged_rows_with_index_and_unknown_item_names_request_and_column():
    rows = [[12, 10], [20, 21, 22, 23], [13]]
    texts = [answer(SIDS[0][[2, 0]]), answer(SIDS[1]), answer(SIDS[0][[3]])]
    batch = gr2.verify_rewards(texts, rows, [12, 22, 13], index=_RealIndex.get())
    assert batch.valid.tolist() == [True, True, True]
    assert batch.rank_pre.tolist() == [1, 3, 1] and batch.r_rank.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(gr2.UnknownItemError, match="request 1, candidate column 2: item 77"):
        gr2.verify_rewards(texts, [[12, 10], [20, 21, 77, 23], [13]], [12, 22, 13], index=_RealIndex.get())


class _RealIndex:
    _index = None

    @classmethod
    def get(cls):
        if cls._index is None:
            flat = np.concatenate([ITEMS.ravel(), [99]]).astype(np.uint64)
            cls._index = gr2.SidIndex.build(flat, np.concatenate([SIDS.reshape(-1, L), [[3, 3, 3]]]).astype(np.uint16),
                                            codebook_size=[4, 4, 4])
        return cls._index


def test_reasoning_with_tag_text_agrees_on_both_paths():
    """The demo tokenizer spells <answer> out of ordinary BPE pieces: the automaton lets reasoning
    do that, so the text and token-id verifiers must accept the same completion."""
    from gr2.models import train_demo_tokenizer

    tok = train_demo_tokenizer(["<answer> the user liked </think> item <think> and </answer> so"] * 20, vocab_size=300)
    plain = tok("so <answer> and </think>", add_special_tokens=False)["input_ids"]
    st_ = gr2.add_sid_tokens(tok, level_sizes=(4, 4, 4))
    assert st_.answer_open not in plain and st_.think_close not in plain  # spelled by plain pieces
    perm = SIDS[0][[2, 0, 1, 3]]
    sid_ids = []
    for sid in perm:
        sid_ids += [st_.sid_begin] + [int(st_.code_ids[lv, c]) for lv, c in enumerate(sid)] + [st_.sid_end]
    ids = [st_.think_open, *plain, st_.think_close, st_.answer_open, *sid_ids, st_.answer_close, tok.eos_token_id]
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.count("<answer>") == 2 and text.count("</think>") == 2
    kw = dict(candidate_sids=SIDS[:1])
    by_tokens = gr2.verify_rewards([ids], ITEMS[:1], [12], sid_tokens=st_, trailer_ids=[tok.eos_token_id], **kw)
    by_text = gr2.verify_rewards([text], ITEMS[:1], [12], **kw)
    assert by_tokens.valid[0] and by_text.valid[0]
    for field in ("reward", "rank_re", "ranking", "invalid_reason"):
        np.testing.assert_array_equal(getattr(by_tokens, field), getattr(by_text, field))
    # the automaton accepts the same completion (replayed through a fresh rerank automaton)
    from gr2.decoding import constraint_trace

    traces = constraint_trace(tok, ITEMS[:1], [ids], len(tok), sid_tokens=st_, codes=SIDS[:1],
                              max_reasoning_tokens=len(plain))
    assert len(traces[0]) == len(ids)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(trailers="<|im_end|>"), "^trailers must be a list of strings"),
        (dict(trailers=["<|im_end|>", 3]), r"trailers\[1\]"),
        (dict(trailers=["<answer>"]), "trailers"),
        (dict(whitespace_ids=7), "whitespace_ids"),
        (dict(trailer_ids="x"), "trailer_ids"),
        (dict(relevance=np.ones((2, 3))), r"relevance has shape \(2, 3\), expected \(2, 4\)"),
        (dict(relevance=[[1, 2, 3, 4], [1, 2]]), "relevance: request 1 has shape"),
        (dict(relevance=[["a", "b", "c", "d"]] * 2), "relevance must be numeric"),
        (dict(metric_ks=5), "metric_ks"),
        (dict(reward_kind="best"), "reward_kind"),
    ],
)
def test_verifier_arguments_are_validated_by_name(kwargs, match):
    with pytest.raises(gr2.InvalidInputError, match=match):
        verify([answer(SIDS[0]), answer(SIDS[1])], **kwargs)


def test_str_trailers_no_longer_accept_trailing_characters():
    # was: trailers="<|im_end|>" became the characters "<", "|", "i", "m", "e", "n", "d", ... and
    # "...</answer>dime" scored valid
    with pytest.raises(gr2.InvalidInputError, match="trailers"):
        verify([answer(SIDS[0]) + "dime", answer(SIDS[1])], trailers="<|im_end|>")


def test_empty_batch_and_k_zero():
    empty = gr2.verify_rewards([], [], [], index=INDEX)
    assert len(empty) == 0 and empty.summary()["valid_rate"] == 0.0
    with pytest.raises(gr2.InvalidInputError, match="request 0 has no candidates"):
        gr2.verify_rewards(["x"], np.zeros((1, 0), np.uint64), [1], index=INDEX)
    with pytest.raises(gr2.InvalidInputError, match="request 1 has no candidates"):
        gr2.verify_rewards(["x", "y"], [[10], []], [10, 1], index=INDEX)


def test_type_errors_name_the_problem():
    with pytest.raises(gr2.InvalidInputError, match="completion 1 is int"):
        verify([answer(SIDS[0]), 5])
    with pytest.raises(gr2.InvalidInputError, match="single str"):
        verify(answer(SIDS[0]))


def test_lone_surrogate_scores_its_row_malformed():
    batch = verify([answer(SIDS[0]) + "\ud800", answer(SIDS[1])], targets=(12, 20))
    assert batch.reason_names == ["malformed", "ok"]


def test_index_must_be_a_sid_index():
    """The verifier looks non-candidate SIDs up in the gr2.SidIndex itself; a stand-in object
    would silently turn not_candidate into unknown_sid, so it is refused."""

    class Lookalike:
        def sids(self, item_ids):
            return INDEX.sids(np.asarray(item_ids, dtype=np.uint64))

    with pytest.raises(gr2.InvalidInputError, match="index must be a gr2.SidIndex"):
        verify([answer(SIDS[0]), answer(SIDS[1])], index=Lookalike())
