"""One completion grammar: SFT's trace split (gr2.train.sft.split_completion) and the decoder's
result parse use the Rust verifier's parser (gr2.rewards.parse_completion*), so every trace
gr2.verify_rewards accepts is one SFT accepts, cut where the verifier ends the think block."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import gr2
from gr2.errors import DataError
from gr2.rewards import InvalidReason, parse_completion
from gr2.tokens import sid_to_text
from gr2.train.sft import split_completion

WS = st.sampled_from(["", " ", "\n", " \t\r\n"])


@st.composite
def traces(draw):
    """(completion, candidate SIDs (K, L)): optional whitespace and think block (whose body may
    hold tag-like text, a second ``</think>`` included), an answer of candidate SIDs (a
    permutation, or any draw: repeats and gaps are verifier-valid syntax), trailers."""
    levels = draw(st.integers(1, 4))
    k = draw(st.integers(1, 5))
    sids = np.array([[c] + [draw(st.integers(0, 300)) for _ in range(levels - 1)] for c in range(k)], dtype=np.uint16)
    order = draw(st.one_of(st.permutations(range(k)), st.lists(st.integers(0, k - 1), max_size=k + 1)))
    text = draw(WS)
    if draw(st.booleans()):
        body = draw(st.lists(st.sampled_from(["why", " ", "\n", "</think>", "<think>", "<answer>", "</answer>", "é",
                                              sid_to_text(sids[0]), "<s_a_7>"]), max_size=8))
        text += "<think>" + "".join(body) + "</think>" + draw(WS)
    seps = [draw(WS) for _ in range(len(order) + 1)]
    text += "<answer>" + "".join(seps[i] + sid_to_text(sids[c]) for i, c in enumerate(order)) + seps[-1] + "</answer>"
    text += "".join(draw(st.lists(st.sampled_from(["\n", " ", "<|im_end|>", "<|endoftext|>"]), max_size=3)))
    return text, sids


def verify(texts, sids):
    k = len(sids)
    return gr2.verify_rewards(texts, np.tile(np.arange(k, dtype=np.uint64), (len(texts), 1)),
                              np.zeros(len(texts), dtype=np.uint64), candidate_sids=np.stack([sids] * len(texts)))


@given(traces())
def test_split_completion_accepts_every_trace_the_verifier_accepts(trace):
    text, sids = trace
    full = verify([text], sids)
    assert full.invalid_reason[0] != InvalidReason.MALFORMED  # the generator writes verifier syntax only
    reasoning, answer = split_completion(text)
    assert reasoning + answer == text
    # the verifier's grammar: the answer is the last <answer>; what precedes it, less whitespace, is
    # empty or one <think> ... </think> block, which is the reasoning part
    before = text[:text.rfind("<answer>")].rstrip(" \t\r\n")
    assert reasoning == (before if before.strip() else "")
    assert reasoning == "" or (reasoning.lstrip().startswith("<think>") and reasoning.endswith("</think>"))
    # the answer part alone is the same answer to the verifier
    alone = verify([answer], sids)
    for field in ("valid", "invalid_reason", "ranking", "n_sids"):
        np.testing.assert_array_equal(getattr(alone, field), getattr(full, field))
    parts = parse_completion(text, levels=sids.shape[1])
    np.testing.assert_array_equal(parts.codes.reshape(-1, sids.shape[1]), sids[[int(r) for r in _order(text, sids)]])
    if not reasoning:
        assert split_completion(text, reasoning=False) == ("", text)
    else:
        with pytest.raises(DataError, match="answer-only trace has a <think> block"):
            split_completion(text, reasoning=False)


def _order(text, sids):
    """Candidate columns of the answer's SIDs, read off the text by plain search (a reference)."""
    answer = text[text.rfind("<answer>"):]
    where = []
    for c, sid in enumerate(sids):
        spelled = sid_to_text(sid)
        start = answer.find(spelled)
        while start >= 0:
            where.append((start, c))
            start = answer.find(spelled, start + 1)
    return [c for _, c in sorted(where)]


@given(traces(), st.integers(0, 10_000))
def test_parse_completion_is_the_verifier_on_cut_traces(trace, cut):
    """Any prefix of a trace: parse_completion (with the SIDs' level count) is None exactly when
    the verifier calls the text malformed, and split_completion raises DataError then."""
    text, sids = trace
    text = text[:cut % (len(text) + 1)]
    malformed = verify([text], sids).invalid_reason[0] == InvalidReason.MALFORMED
    assert (parse_completion(text, levels=sids.shape[1]) is None) == malformed
    if parse_completion(text) is None:
        with pytest.raises(DataError, match="as gr2.verify_rewards parses it"):
            split_completion(text)


def test_double_think_close_is_one_reasoning_part():
    """The trace the old split rejected: a ``</think>`` inside the reasoning."""
    sid = sid_to_text([3, 1])
    text = f"<think>first </think> then more</think>\n<answer>{sid}</answer>"
    assert verify([text], np.array([[3, 1]], dtype=np.uint16)).valid[0]
    assert split_completion(text) == ("<think>first </think> then more</think>", f"\n<answer>{sid}</answer>")
    parts = parse_completion(text)
    assert parts.think == (0, len("<think>first </think> then more</think>"))
    assert [text[s:e] for s, e in parts.sids] == [sid]


def test_spans_are_str_indices_past_multibyte_text():
    sid = sid_to_text([1, 2])
    text = f"<think>été 🙂</think><answer>{sid}</answer>"
    parts = parse_completion(text)
    assert text[parts.think[0]:parts.think[1]] == "<think>été 🙂</think>"
    assert text[parts.answer[0]:parts.answer[1]] == f"<answer>{sid}</answer>"
    assert parse_completion("<think>\ud800</think><answer></answer>") is None  # not UTF-8: malformed
    with pytest.raises(gr2.InvalidInputError):
        parse_completion(text, levels=0)
