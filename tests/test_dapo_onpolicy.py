"""DAPO on-policy log-probabilities and batched rollouts on the tiny random policy.

- the masked log-probabilities the loss uses (gr2.train.dapo.token_logprobs on a packed rollout batch
  that carries its constraint traces) equal, token by token, the log-probabilities
  gr2.constrained_decode sampled the rollout with;
- the traces (gr2.decoding.constraint_trace, replayed by the Rust automaton) match a plain Python
  reference of the rerank format;
- per-prompt seeds make a prompt's rollouts independent of which prompts share the decode batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _dapo_fixtures as fx
from gr2.train.dapo import Rollout, constrained_rollouts, pack_rollouts, token_logprobs

torch.set_num_threads(1)

ROWS = [0, 3, 5]
SEEDS = [101, 202, 303]
G = 3
BUDGET = 5  # max reasoning tokens


@pytest.fixture(scope="module")
def setup():
    model, tokenizer, sid_tokens = fx.tiny_policy(seed=3)
    model.eval()
    data, sids = fx.tiny_data(tokenizer)
    index = fx.tiny_index(data, sids)
    ctx = {"index": index, "sid_tokens": sid_tokens, "eos_id": int(tokenizer.eos_token_id),
           "pad_id": int(tokenizer.pad_token_id), "device": torch.device("cpu")}
    return model, tokenizer, sid_tokens, data, sids, index, ctx


def _decode(model, tokenizer, data, index, sid_tokens, rows, seeds):
    from gr2 import constrained_decode

    return constrained_decode(model, tokenizer, [data.prompt_texts[r] for r in rows], data.candidates[rows],
                              index=index, sid_tokens=sid_tokens, max_reasoning_tokens=BUDGET, reasoning=True,
                              do_sample=True, num_return_sequences=G, seed=seeds)


def test_masked_logprobs_equal_the_decoders_sampling_logprobs(setup):
    model, tokenizer, sid_tokens, data, sids, index, ctx = setup
    config = fx.small_config(group_size=G, max_reasoning_tokens=BUDGET)
    groups = constrained_rollouts(model, tokenizer, [data.prompt_texts[r] for r in ROWS], data.candidates[ROWS], G,
                                  SEEDS, config, ctx)
    decoded = _decode(model, tokenizer, data, index, sid_tokens, ROWS, SEEDS)  # same call: same samples
    rollouts = [Rollout(data.prompt_ids[row], c.ids, 0.0, 0.0, c.allowed)
                for row, group in zip(ROWS, groups) for c in group]
    assert [r.completion_ids for r in rollouts] == [list(d.completion_ids) + [ctx["eos_id"]] for d in decoded]
    batch = pack_rollouts(rollouts, ctx["pad_id"])
    full_batch = pack_rollouts([Rollout(r.prompt_ids, r.completion_ids) for r in rollouts], ctx["pad_id"])
    assert "sparse_index" in batch and "sparse_index" not in full_batch
    with torch.no_grad():
        masked = token_logprobs(model, batch)
        full = token_logprobs(model, full_batch)
    n_free = 0
    for i, (r, d) in enumerate(zip(rollouts, decoded)):
        mask = batch["completion_mask"][i] > 0
        got = masked[i][mask].double().numpy()
        want = np.array(d.token_logprobs + [0.0])  # + EOS after </answer>: forced, log-probability 0
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
        assert got.sum() == pytest.approx(d.logprob, abs=2e-3)
        forced = np.diff(r.allowed.offsets) == 1
        assert np.all(got[forced & ~r.allowed.free] == 0.0)  # exactly: a one-id softmax
        n_free += int(r.allowed.free.sum())
        # the full-vocabulary log-probabilities are a different distribution: the fix matters
        assert np.abs(full[i][mask].double().numpy() - got).max() > 0.5
    assert n_free > 0  # free reasoning tokens were scored too (vocabulary minus the forbidden ids)


def _reference_allowed(tokens, candidate_sids, completion, budget, forbidden, vocab, eos):
    """Plain-Python rerank automaton (reasoning='think'): the allowed set before each token, or
    None for a free reasoning token (the vocabulary minus ``forbidden``)."""
    out = []
    remaining = [tuple(int(x) for x in s) for s in candidate_sids]
    levels = len(remaining[0])
    state, prefix, think_used = "start", (), 0
    for tok in completion:
        if state == "start":
            allowed = {tokens.think_open}
        elif state == "think":
            allowed = None if think_used < budget else {tokens.think_close}
        elif state == "after_think":
            allowed = {tokens.answer_open}
        elif state == "between":
            allowed = {tokens.sid_begin} if remaining else {tokens.answer_close}
        elif state == "sid":
            if len(prefix) == levels:
                allowed = {tokens.sid_end}
            else:
                allowed = {int(tokens.code_ids[len(prefix), s[len(prefix)]]) for s in remaining if s[:len(prefix)] == prefix}
        elif state == "end":
            allowed = {eos}
        out.append(allowed)
        assert allowed is None and tok not in forbidden and tok < vocab or allowed is not None and tok in allowed
        # transition
        if state == "start":
            state = "think"
        elif state == "think":
            if tok == tokens.think_close:
                state = "after_think"
            else:
                think_used += 1
        elif state == "after_think":
            state = "between"
        elif state == "between":
            state = "sid" if tok == tokens.sid_begin else "end"
        elif state == "sid":
            if tok == tokens.sid_end:
                remaining.remove(prefix)
                prefix, state = (), "between"
            else:
                level = len(prefix)
                code = int(np.nonzero(tokens.code_ids[level] == tok)[0][0])
                prefix = prefix + (code,)
    return out


def test_constraint_traces_match_a_python_reference_automaton(setup):
    from gr2.decoding import constraint_trace

    model, tokenizer, sid_tokens, data, sids, index, ctx = setup
    decoded = _decode(model, tokenizer, data, index, sid_tokens, ROWS, SEEDS)
    completions = [list(d.completion_ids) + [ctx["eos_id"]] for d in decoded]
    rows = np.repeat(ROWS, G)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    traces = constraint_trace(tokenizer, data.candidates[rows], completions, vocab, index=index, sid_tokens=sid_tokens,
                              max_reasoning_tokens=BUDGET, reasoning=True)
    for row, completion, trace in zip(rows, completions, traces):
        forbidden = set(trace.forbidden.tolist())
        assert ctx["eos_id"] in forbidden and sid_tokens.answer_open in forbidden and sid_tokens.think_close not in forbidden
        reference = _reference_allowed(sid_tokens, sids[row], completion, BUDGET, forbidden, vocab, ctx["eos_id"])
        assert len(trace) == len(completion) == len(reference)
        for t, want in enumerate(reference):
            if want is None:
                assert trace.free[t]
            else:
                assert not trace.free[t]
                assert set(trace.ids[trace.offsets[t]:trace.offsets[t + 1]].tolist()) == want, t
    with pytest.raises(Exception, match="not allowed|forbidden|allowed"):
        bad = list(completions[0])
        bad[0] = sid_tokens.answer_open  # must open with <think>
        constraint_trace(tokenizer, data.candidates[[ROWS[0]]], [bad], vocab, index=index, sid_tokens=sid_tokens,
                         max_reasoning_tokens=BUDGET, reasoning=True)


def test_per_prompt_seeds_make_rollouts_independent_of_the_batch(setup):
    model, tokenizer, sid_tokens, data, sids, index, ctx = setup
    together = _decode(model, tokenizer, data, index, sid_tokens, ROWS, SEEDS)
    alone = [r for row, seed in zip(ROWS, SEEDS) for r in _decode(model, tokenizer, data, index, sid_tokens, [row], [seed])]
    assert [list(r.completion_ids) for r in together] == [list(r.completion_ids) for r in alone]
    # a one-prompt call with a seed list draws exactly like the int seed it always took
    as_int = _decode(model, tokenizer, data, index, sid_tokens, [ROWS[1]], SEEDS[1])
    assert [list(r.completion_ids) for r in as_int] == [list(r.completion_ids) for r in alone[G:2 * G]]
    from gr2.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="one seed per prompt"):
        _decode(model, tokenizer, data, index, sid_tokens, ROWS, SEEDS[:2])


def test_trainer_rollouts_do_not_depend_on_rollout_batch(setup):
    from gr2.train.dapo import DapoTrainer

    model, tokenizer, sid_tokens, data, sids, index, ctx = setup
    batches = {}
    for rb in (1, 4):
        config = fx.small_config(group_size=G, prompts_per_step=3, max_reasoning_tokens=BUDGET, rollout_batch=rb,
                                 dynamic_sampling=False)
        trainer = DapoTrainer(model, tokenizer, data, config, index=index, sid_tokens=sid_tokens)
        batches[rb] = trainer.collect()
    assert [r.completion_ids for r in batches[1].rollouts] == [r.completion_ids for r in batches[4].rollouts]
    assert all(r.allowed is not None for r in batches[4].rollouts)
