"""gr2.decoding._vllm_core without vLLM: the async-scheduling placeholder (-1) vLLM leaves in a
request's output list while ``update_state`` runs, and the V2 slot bookkeeping (tests/with_vllm/
drives the same code through vLLM's real classes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gr2
from gr2.decoding._setup import build_token_map
from gr2.decoding._vllm_core import RequestTracker

LEVEL_SIZES = (4, 3, 3)


class _Params:
    def __init__(self, extra_args, max_tokens=None):
        self.extra_args, self.max_tokens = extra_args, max_tokens


class _BatchUpdate:
    def __init__(self, added=(), removed=(), moved=()):
        self.added, self.removed, self.moved = list(added), list(removed), list(moved)


@pytest.fixture(scope="module")
def world():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "<s>", "</s>", "a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                        eos_token="</s>")
    sid = gr2.add_sid_tokens(tokenizer, level_sizes=LEVEL_SIZES)
    codes = np.array([[0, 0, 0], [1, 2, 0], [3, 1, 2]], dtype=np.uint16)
    items = np.array([10, 20, 30], dtype=np.uint64)
    index = gr2.SidIndex.build(items, codes, codebook_size=list(LEVEL_SIZES))
    tm = build_token_map(sid, eos=tokenizer.eos_token_id, vocab_size=len(tokenizer), tokenizer=tokenizer)
    return tokenizer, sid, index, tm


def allowed(logits, row):
    return torch.isfinite(logits[row]).nonzero().view(-1).tolist()


def test_async_placeholder_is_read_at_apply_not_update(world):
    tokenizer, sid, index, tm = world
    tracker = RequestTracker(tm, sid.levels, index=index)
    forbidden = torch.as_tensor(tm.reasoning_forbidden())
    out = []
    spec = {"candidates": [10, 30], "reasoning": "disabled"}
    tracker.update(_BatchUpdate(added=[(0, _Params({"gr2": spec}), [1], out)]), lambda d: False)
    logits = torch.zeros(1, len(tokenizer))
    tracker.apply(logits, forbidden)
    assert allowed(logits, 0) == [sid.answer_open]
    out.append(-1)  # vLLM's async scheduling: the sampled token is not known yet when update_state runs
    tracker.update(None, lambda d: False)  # was: ConstraintError "token -1 is not a valid id"
    out[-1] = sid.answer_open  # InputBatch.update_async_output_token_ids, right before the sampler
    logits = torch.zeros(1, len(tokenizer))
    tracker.apply(logits, forbidden)
    assert allowed(logits, 0) == [sid.sid_begin]
    out.append(-1)  # never filled in: a loud error, not a mask from a stale state
    with pytest.raises(gr2.ConstraintError, match="placeholder -1"):
        tracker.apply(torch.zeros(1, len(tokenizer)), forbidden)


def test_v2_slots_reinitialise_and_read_committed_output(world):
    tokenizer, sid, index, tm = world
    tracker = RequestTracker(tm, sid.levels, index=index)
    forbidden = torch.as_tensor(tm.reasoning_forbidden())
    spec = {"candidates": [20], "reasoning": "disabled"}
    assert tracker.add(3, _Params({"gr2": spec}))
    assert not tracker.add(1, _Params({"gr2_unconstrained": True}))
    committed = {3: [sid.answer_open, sid.sid_begin]}
    reads = []

    def fetch(want):
        reads.append(want)
        return [committed[s][a:b] for s, a, b in want]

    tracker.sync_outputs([3], [2], fetch)
    assert reads == [[(3, 0, 2)]]
    logits = torch.zeros(2, len(tokenizer))
    tracker.apply_rows(logits, forbidden, [(1, 3)])  # row 1 of this step holds slot 3
    assert allowed(logits, 1) == [int(sid.code_ids[0, 1])]  # item 20 = (1, 2, 0)
    assert torch.isfinite(logits[0]).all()
    tracker.sync_outputs([3], [2], fetch)  # nothing new: no read
    assert len(reads) == 1
    with pytest.raises(gr2.ConstraintError, match="slot 3"):
        tracker.sync_outputs([3], [1], fetch)  # the runner lost tokens: never a silent resync
    assert tracker.add(3, _Params({"gr2": {"candidates": [10, 30], "reasoning": "disabled"}}))  # slot reused
    tracker.sync_outputs([3], [0], fetch)
    logits = torch.zeros(1, len(tokenizer))
    tracker.apply_rows(logits, forbidden, [(0, 3)])
    assert allowed(logits, 0) == [sid.answer_open]
