"""gr2.constrained_decode and RerankLogitsProcessor on tiny random Llama models: every output is a
valid permutation (greedy, sampling, beam), the fast path (KV cache, sparse output layer, left
padding) matches a naive full-recompute reference, and bad input raises typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gr2
from gr2.decoding import RerankLogitsProcessor, catalog_decode, constrained_decode
from gr2.decoding import decode as decode_mod
from gr2.decoding._model import StepModel
from gr2.errors import InvalidInputError, UnknownItemError

LEVEL_SIZES = (4, 3, 3)
WORDS = "the user liked watched item movie next good bad why because so then a an of to".split()


def ArrayIndex(item_ids, codes, level_sizes):
    """A real gr2.SidIndex over explicit (already unique) codes."""
    index = gr2.SidIndex.build(np.asarray(item_ids, dtype=np.uint64), np.asarray(codes, dtype=np.uint16),
                               codebook_size=list(level_sizes))
    assert index.uniqueness_before_repair == 1.0  # the tests pick unique codes; repair would move them
    return index


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")


def make_model(vocab_size, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the default init, so decoding is not near-uniform
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine its wake-ups
    made every op slower; restored afterwards for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    sid_tokens = gr2.add_sid_tokens(tokenizer, level_sizes=LEVEL_SIZES)
    rng = np.random.default_rng(0)
    space = int(np.prod(LEVEL_SIZES))
    flat = rng.permutation(space)[:30]
    codes = np.array(np.unravel_index(flat, LEVEL_SIZES)).T.astype(np.uint16)
    items = (np.arange(30) * 11 + 100).astype(np.uint64)
    index = ArrayIndex(items, codes, LEVEL_SIZES)
    models = {seed: make_model(len(tokenizer), seed) for seed in range(3)}
    return tokenizer, sid_tokens, index, items, models


def parse_answer(ids, sid_tokens, index):
    """Plain-Python parser of a completion's answer block into item ids."""
    code_of = sid_tokens.code_of_token()
    start = ids.index(sid_tokens.answer_open)
    end = ids.index(sid_tokens.answer_close)
    assert end == len(ids) - 1
    out, sid = [], None
    for tok in ids[start + 1:end]:
        if tok == sid_tokens.sid_begin:
            sid = []
        elif tok == sid_tokens.sid_end:
            out.append(int(index.items(np.asarray([sid], dtype=np.uint16))[0]))
            sid = None
        else:
            level, code = code_of[tok]
            assert sid is not None and level == len(sid)
            sid.append(code)
    return out


def check_valid(results, cands, sid_tokens, index, budget, reasoning=True):
    for res in results:
        row = cands[res.prompt_index]
        assert res.valid
        assert sorted(res.items.tolist()) == sorted(row.tolist())
        assert parse_answer(res.completion_ids, sid_tokens, index) == res.items.tolist()
        assert len(res.item_logprobs) == len(row)
        assert np.all(np.isfinite(res.item_logprobs)) and np.all(res.item_logprobs <= 1e-9)
        assert len(res.reasoning_ids) <= budget
        if reasoning:
            assert res.completion_ids[0] == sid_tokens.think_open
            assert sid_tokens.think_close in res.completion_ids
        else:
            assert res.completion_ids[0] == sid_tokens.answer_open


PROMPTS = ["the user liked item a", "the user watched the movie then a good movie so"]


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 6),
    seed=st.integers(0, 2),
    mode=st.sampled_from(["greedy", "sample", "beam"]),
    reasoning=st.booleans(),
    budget=st.integers(0, 5),
    pick_seed=st.integers(0, 10**6),
)
def test_every_output_is_a_valid_permutation(setup, k, seed, mode, reasoning, budget, pick_seed):
    tokenizer, sid_tokens, index, items, models = setup
    rng = np.random.default_rng(pick_seed)
    cands = np.stack([rng.choice(items, size=k, replace=False) for _ in PROMPTS])
    kwargs = dict(greedy={}, sample=dict(do_sample=True, temperature=1.3, top_p=0.9, seed=pick_seed,
                                         num_return_sequences=2),
                  beam=dict(num_beams=3, num_return_sequences=2))[mode]
    results = constrained_decode(models[seed], tokenizer, PROMPTS, cands, index=index,
                                 max_reasoning_tokens=budget, reasoning=reasoning, **kwargs)
    nrs = kwargs.get("num_return_sequences", 1)
    if mode == "beam":  # distinct permutations only: K = 1 has one, so fewer results
        per = [[r.items.tolist() for r in results if r.prompt_index == p] for p in range(len(PROMPTS))]
        assert [r.prompt_index for r in results] == sorted(r.prompt_index for r in results)
        assert all(1 <= len(lists) <= nrs and len({tuple(x) for x in lists}) == len(lists) for lists in per)
        if not reasoning and k == 1:
            assert all(len(lists) == 1 for lists in per)
    else:
        assert [r.prompt_index for r in results] == [p for p in range(len(PROMPTS)) for _ in range(nrs)]
    check_valid(results, cands, sid_tokens, index, budget, reasoning)


def naive_greedy(model, tokenizer, prompt, cands, sid_tokens, index, budget):
    """Reference: recompute the whole sequence every step (no cache, no padding), full logits,
    allowed set from a plain-Python automaton."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    remaining = {int(c): tuple(index.sids(np.array([c]))[0]) for c in cands}
    forbidden = {sid_tokens.think_open, sid_tokens.answer_open, sid_tokens.answer_close, tokenizer.eos_token_id,
                 *tokenizer.all_special_ids} - {sid_tokens.think_close}
    out, used, phase, prefix = [], 0, "think_open", ()
    while phase != "done":
        with torch.no_grad():
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
        if phase == "think_open":
            allowed = [sid_tokens.think_open]
        elif phase == "reasoning":
            allowed = ([t for t in range(len(tokenizer)) if t not in forbidden] if used < budget
                       else [sid_tokens.think_close])
        elif phase == "answer_open":
            allowed = [sid_tokens.answer_open]
        elif phase == "items":
            allowed = [sid_tokens.sid_begin] if remaining else [sid_tokens.answer_close]
        elif phase == "sid":
            d = len(prefix)
            allowed = ([sid_tokens.sid_end] if d == len(LEVEL_SIZES) else
                       sorted({int(sid_tokens.code_ids[d, s[d]]) for s in remaining.values() if s[:d] == prefix}))
        else:
            allowed = [tokenizer.eos_token_id]
        lp = torch.log_softmax(logits[allowed], dim=-1)
        tok = allowed[int(lp.argmax())]
        out.append(tok)
        if phase == "think_open":
            phase = "reasoning"
        elif phase == "reasoning":
            phase, used = ("answer_open", used) if tok == sid_tokens.think_close else ("reasoning", used + 1)
        elif phase == "answer_open":
            phase = "items"
        elif phase == "items":
            phase, prefix = ("sid", ()) if tok == sid_tokens.sid_begin else ("eos", ())
        elif phase == "sid":
            if tok == sid_tokens.sid_end:
                item = next(i for i, s in remaining.items() if s == prefix)
                del remaining[item]
                phase = "items"
            else:
                prefix = prefix + (int(np.nonzero(sid_tokens.code_ids[len(prefix)] == tok)[0][0]),)
        else:
            phase = "done"
    return out[:-1]


@pytest.mark.parametrize("sparse", [None, False])
def test_greedy_matches_naive_full_recompute(setup, monkeypatch, sparse):
    tokenizer, sid_tokens, index, items, models = setup
    model = models[1]
    if sparse is False:  # force the full-logits fallback path
        monkeypatch.setattr(decode_mod, "StepModel", lambda m: StepModel(m, sparse=False))
    cands = np.array([items[[3, 7, 1, 12, 20]], items[[5, 9, 2, 0, 11]]])
    results = constrained_decode(model, tokenizer, PROMPTS, cands, index=index, max_reasoning_tokens=4)
    for p, res in enumerate(results):
        assert res.completion_ids == naive_greedy(model, tokenizer, PROMPTS[p], cands[p], sid_tokens, index, 4)


def test_sparse_output_layer_is_used_and_checked(setup):
    tokenizer, sid_tokens, index, items, models = setup
    sm = StepModel(models[0])
    ids = torch.tensor([[4, 5, 6]])
    sm.prefill(ids, torch.ones_like(ids))
    assert sm.sparse is True  # Llama logits are lm_head(hidden): the gathered path is valid

    class Capped(torch.nn.Module):  # a model whose logits are NOT lm_head(hidden) (soft-capping)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **kw):
            out = self.inner(*a, **kw)
            out.logits = 30 * torch.tanh(out.logits / 30)
            return out

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def get_decoder(self):
            return self.inner.get_decoder()

    capped = Capped(models[0])
    sm2 = StepModel(capped)
    sm2.prefill(ids, torch.ones_like(ids))
    assert sm2.sparse is False
    cands = np.array([items[[1, 2, 3]]])
    res = constrained_decode(capped, tokenizer, PROMPTS[:1], cands, index=index, max_reasoning_tokens=2)
    check_valid(res, cands, sid_tokens, index, 2)


def test_chat_messages_and_in_think(setup):
    tokenizer, sid_tokens, index, items, models = setup
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    cands = np.array([items[[4, 8]]])
    res = constrained_decode(models[2], tokenizer, [[{"role": "user", "content": "the user liked"}]], cands,
                             index=index, reasoning="in_think", max_reasoning_tokens=3)
    assert res[0].completion_ids[0] != sid_tokens.think_open
    assert sorted(res[0].items.tolist()) == sorted(cands[0].tolist())
    assert len(res[0].reasoning_ids) <= 3


def test_budget_exhausted_forces_think_close(setup):
    tokenizer, sid_tokens, index, items, models = setup
    cands = np.array([items[[1, 2, 3]]])
    model = make_model(len(tokenizer), 7)
    # An output layer with a bias that makes </think> hopeless: only the budget can end reasoning.
    head = torch.nn.Linear(64, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[sid_tokens.think_close] = -1e4
    model.lm_head = head
    res = constrained_decode(model, tokenizer, PROMPTS[:1], cands, index=index, max_reasoning_tokens=6)
    ids = res[0].completion_ids
    assert ids.index(sid_tokens.think_close) == 7 and len(res[0].reasoning_ids) == 6
    assert sorted(res[0].items.tolist()) == sorted(cands[0].tolist())


def test_errors(setup):
    tokenizer, sid_tokens, index, items, models = setup
    model = models[0]
    with pytest.raises(InvalidInputError, match="more than once"):
        constrained_decode(model, tokenizer, PROMPTS[:1], np.array([[items[0], items[0]]]), index=index)
    with pytest.raises(UnknownItemError):
        constrained_decode(model, tokenizer, PROMPTS[:1], np.array([[int(items[0]), 99999]], dtype=np.uint64), index=index)
    with pytest.raises(InvalidInputError, match="prompts but"):
        constrained_decode(model, tokenizer, PROMPTS, np.array([[items[0]]]), index=index)
    with pytest.raises(InvalidInputError, match="2-D"):
        constrained_decode(model, tokenizer, PROMPTS[:1], items[:3], index=index)
    with pytest.raises(InvalidInputError, match="greedy"):
        constrained_decode(model, tokenizer, PROMPTS[:1], np.array([items[:2]]), index=index,
                           num_return_sequences=2)
    bare = make_tokenizer()
    with pytest.raises(InvalidInputError, match="add_sid_tokens"):
        constrained_decode(model, bare, PROMPTS[:1], np.array([items[:2]]), index=index)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_logits_processor_with_generate(setup, mode):
    from transformers import LogitsProcessorList

    tokenizer, sid_tokens, index, items, models = setup
    model = models[1]
    cands = np.array([items[[3, 7, 1, 12]], items[[5, 9, 2, 0]]])
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(greedy=dict(do_sample=False), sample=dict(do_sample=True, top_p=0.9, temperature=1.2),
                  beam=dict(num_beams=3, do_sample=False))[mode]
    nb = kwargs.get("num_beams", 1)
    proc = RerankLogitsProcessor(tokenizer, cands, index=index, num_beams=nb, max_reasoning_tokens=4)
    torch.manual_seed(0)
    out = model.generate(**enc, logits_processor=LogitsProcessorList([proc]), max_new_tokens=60,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs)
    for p in range(len(PROMPTS)):
        gen = out[p, enc["input_ids"].shape[1]:].tolist()
        gen = gen[: gen.index(tokenizer.eos_token_id)]
        assert sorted(parse_answer(gen, sid_tokens, index)) == sorted(cands[p].tolist())
    if mode == "greedy":  # the same constraint and the same argmax as gr2's own loop
        ours = constrained_decode(model, tokenizer, PROMPTS, cands, index=index, max_reasoning_tokens=4)
        for p, res in enumerate(ours):
            gen = out[p, enc["input_ids"].shape[1]:].tolist()
            assert gen[: len(res.completion_ids)] == res.completion_ids


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_catalog_decode_yields_only_catalog_items(setup, mode):
    tokenizer, sid_tokens, index, items, models = setup
    exclude = [items[:25], items[5:10]]  # the first prompt may only pick from items[25:]
    kwargs = dict(greedy={}, sample=dict(do_sample=True, seed=3, num_return_sequences=2),
                  beam=dict(num_beams=3, num_return_sequences=2))[mode]
    results = catalog_decode(models[0], tokenizer, PROMPTS, index, n_items=3, exclude=exclude, **kwargs)
    catalog = set(items.tolist())
    for res in results:
        got = res.items.tolist()
        assert len(got) == 3 and len(set(got)) == 3 and set(got) <= catalog
        assert not set(got) & set(exclude[res.prompt_index].tolist())
        assert res.completion_ids[0] == sid_tokens.sid_begin and len(res.item_logprobs) == 3
    with pytest.raises(gr2.ConstraintError):
        catalog_decode(models[0], tokenizer, PROMPTS[:1], index, n_items=6, exclude=[items[:25]])


def _walk_parts(completion_ids, logprobs, sid_tokens, in_think):
    """Reference read of a decoded completion, token by token: the ids between the think tags
    (from the start when the prompt opened the block) and the log-prob sum of each SID span."""
    reasoning, spans, inside, span = [], [], in_think, None
    for tok, lp in zip(completion_ids, logprobs):
        if tok in (sid_tokens.think_open, sid_tokens.think_close):
            inside = tok == sid_tokens.think_open
        elif inside:
            reasoning.append(tok)
        else:
            span = 0.0 if tok == sid_tokens.sid_begin else span
            if span is not None:
                span += lp
            if tok == sid_tokens.sid_end:
                spans.append(span)
                span = None
    return reasoning, spans


@pytest.mark.parametrize("reasoning, answer_tags", [(True, False), (True, True), ("in_think", False), (False, True)])
def test_result_parts_come_from_the_verifier_parse(setup, reasoning, answer_tags):
    """RerankResult's reasoning ids and per-item log-probs are read off the verifier's parse
    (gr2.rewards.parse_completion_ids), also for catalog outputs without answer tags and for a
    prompt that opened the think block; they match a token-by-token reference walk."""
    tokenizer, sid_tokens, index, items, models = setup
    results = catalog_decode(models[1], tokenizer, PROMPTS, index, n_items=2, reasoning=reasoning,
                             max_reasoning_tokens=3, answer_tags=answer_tags)
    results += constrained_decode(models[1], tokenizer, PROMPTS, np.array([items[[1, 2, 3]]] * len(PROMPTS)),
                                  index=index, reasoning=reasoning, max_reasoning_tokens=3)
    eos = tokenizer.eos_token_id
    for res in results:
        ids, lps = res.completion_ids, res.token_logprobs
        if ids and ids[-1] == eos:
            ids, lps = ids[:-1], lps[:-1]
        want_reasoning, want_spans = _walk_parts(ids, lps, sid_tokens, reasoning == "in_think")
        assert res.reasoning_ids == want_reasoning
        np.testing.assert_array_equal(res.item_logprobs, want_spans)
        assert len(res.item_logprobs) == len(res.items)


def test_catalog_decode_builds_the_trie_of_an_index_once(setup, monkeypatch):
    """With a gr2.SidIndex, catalog_decode takes the trie SidTrie.from_index keeps with the index:
    the second call gets the very trie the first one built (nothing rebuilt) and decodes the same;
    an index derived with extend is a new index, with a new trie holding the new item."""
    from gr2 import _gr2

    tokenizer, sid_tokens, stand_in, items, models = setup
    index = gr2.SidIndex.build(items, stand_in.codes(), LEVEL_SIZES)
    tries = []

    class SpyTrie:  # records the tries catalog_decode reads
        @staticmethod
        def from_index(idx):
            tries.append(real_trie.from_index(idx))
            return tries[-1]

    real_trie = _gr2.SidTrie
    monkeypatch.setattr(_gr2, "SidTrie", SpyTrie)
    first = catalog_decode(models[0], tokenizer, PROMPTS, index, n_items=2, exclude=[items[:20], items[3:9]])
    second = catalog_decode(models[0], tokenizer, PROMPTS, index, n_items=2, exclude=[items[:20], items[3:9]])
    assert len(tries) == 2 and tries[1] is tries[0] and len(tries[0]) == len(items)
    assert [r.items.tolist() for r in second] == [r.items.tolist() for r in first]
    assert [r.completion_ids for r in second] == [r.completion_ids for r in first]
    taken = {tuple(c) for c in index.codes().tolist()}
    free = next(c for c in np.ndindex(*LEVEL_SIZES) if c not in taken)
    extended = index.extend(np.array([7], np.uint64), np.array([free], np.uint16))
    only_new = catalog_decode(models[0], tokenizer, PROMPTS[:1], extended, n_items=1, exclude=[items])
    assert tries[-1] is not tries[0] and len(tries[-1]) == len(items) + 1
    assert only_new[0].items.tolist() == [7]


def test_vllm_module_needs_vllm():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed; the processor is exercised by vLLM-marked tests")
    with pytest.raises(ImportError, match="gr2\\[vllm\\]"):
        import gr2.decoding.vllm  # noqa: F401


# --- issue 14: the guarantee on every entry point, or a loud failure -------------------------------


def _generate(model, tokenizer, proc, prompts, **kwargs):
    from transformers import LogitsProcessorList

    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    return model.generate(**enc, logits_processor=LogitsProcessorList([proc]), eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **kwargs)


@pytest.mark.parametrize("nb", [1, 3])
def test_processor_raises_when_generate_stops_before_the_ranking_is_complete(setup, nb):
    tokenizer, sid_tokens, index, items, models = setup
    cands = np.array([items[[3, 7, 1, 12, 20]], items[[5, 9, 2, 0, 11]]])
    proc = RerankLogitsProcessor(tokenizer, cands, index=index, max_reasoning_tokens=4, num_beams=nb)
    # think 1 + 4 + 1, answer tags 2, five SIDs of 3 codes + 2 delimiters, EOS
    assert proc.required_max_new_tokens == 6 + 2 + 5 * 5 + 1
    out = _generate(models[1], tokenizer, proc, PROMPTS, max_new_tokens=20, num_beams=nb, do_sample=False)
    with pytest.raises(gr2.errors.IncompleteGenerationError, match="max_new_tokens >= 34"):
        proc.items(out)  # was: a partial list such as [122, 111] and no error
    if nb == 1:
        with pytest.raises(gr2.errors.IncompleteGenerationError):
            proc.items()
    proc = RerankLogitsProcessor(tokenizer, cands, index=index, max_reasoning_tokens=4, num_beams=nb)
    out = _generate(models[1], tokenizer, proc, PROMPTS, max_new_tokens=proc.required_max_new_tokens, num_beams=nb,
                    do_sample=False)
    got = proc.items(out)
    assert [sorted(g.tolist()) for g in got] == [sorted(c.tolist()) for c in cands]


@settings(max_examples=15, deadline=None)
@given(ks=st.lists(st.integers(1, 6), min_size=2, max_size=2), mode=st.sampled_from(["greedy", "sample", "beam"]),
       budget=st.integers(0, 3), pick_seed=st.integers(0, 10**6))
def test_processor_with_ragged_candidates(setup, ks, mode, budget, pick_seed):
    tokenizer, sid_tokens, index, items, models = setup
    rng = np.random.default_rng(pick_seed)
    cands = [rng.choice(items, size=k, replace=False).tolist() for k in ks]
    kwargs = dict(greedy=dict(do_sample=False), sample=dict(do_sample=True, temperature=1.3),
                  beam=dict(num_beams=2, do_sample=False))[mode]
    proc = RerankLogitsProcessor(tokenizer, cands, index=index, max_reasoning_tokens=budget,
                                 num_beams=kwargs.get("num_beams", 1))
    out = _generate(models[0], tokenizer, proc, PROMPTS, max_new_tokens=proc.required_max_new_tokens, **kwargs)
    got = proc.items(out)
    assert [sorted(g.tolist()) for g in got] == [sorted(c) for c in cands]


class _Params:
    def __init__(self, extra_args, max_tokens=None):
        self.extra_args, self.max_tokens = extra_args, max_tokens


class _BatchUpdate:
    def __init__(self, added=(), removed=(), moved=()):
        self.added, self.removed, self.moved = list(added), list(removed), list(moved)


def test_vllm_requests_without_gr2_args_are_rejected(setup):
    from gr2.decoding._setup import build_token_map
    from gr2.decoding._vllm_core import RequestTracker, request_spec

    tokenizer, sid_tokens, index, items, models = setup
    with pytest.raises(InvalidInputError, match="gr2_unconstrained"):
        request_spec(_Params(None), index=index, allow_unconstrained=False)  # was: ran unconstrained
    with pytest.raises(InvalidInputError, match="gr2_unconstrained"):
        request_spec(_Params({"other": 1}), index=index, allow_unconstrained=False)
    assert request_spec(_Params({"gr2_unconstrained": True}), index=index, allow_unconstrained=False) is None
    assert request_spec(_Params(None), index=index, allow_unconstrained=True) is None
    with pytest.raises(InvalidInputError, match="candidates"):
        request_spec(_Params({"gr2": {}}), index=index, allow_unconstrained=False)
    with pytest.raises(InvalidInputError, match="more than once"):
        request_spec(_Params({"gr2": {"candidates": [items[0], items[0]]}}), index=index, allow_unconstrained=False)

    tm = build_token_map(sid_tokens, eos=tokenizer.eos_token_id, vocab_size=len(tokenizer), tokenizer=tokenizer)
    tracker = RequestTracker(tm, sid_tokens.levels, index=index)
    with pytest.raises(InvalidInputError, match="gr2_unconstrained"):
        tracker.update(_BatchUpdate(added=[(0, _Params({}), [1], [])]), lambda d: d == "swap")
    out0, out1 = [], []
    spec = {"candidates": [int(items[1]), int(items[4])], "reasoning": "disabled"}
    tracker.update(_BatchUpdate(added=[(0, _Params({"gr2": spec}), [1], out0),
                                       (1, _Params({"gr2_unconstrained": True}), [1], out1)]), lambda d: d == "swap")
    assert list(tracker.requests) == [0]
    logits = torch.zeros(2, len(tokenizer))
    tracker.apply(logits, torch.as_tensor(tm.reasoning_forbidden()))
    assert torch.isfinite(logits[0]).nonzero().view(-1).tolist() == [sid_tokens.answer_open]
    assert torch.isfinite(logits[1]).all()  # the opted-out request is untouched
    out0.append(sid_tokens.answer_open)
    tracker.update(_BatchUpdate(moved=[(0, 1, "swap")]), lambda d: d == "swap")
    assert list(tracker.requests) == [1]
    logits = torch.zeros(2, len(tokenizer))
    tracker.apply(logits, torch.as_tensor(tm.reasoning_forbidden()))
    assert torch.isfinite(logits[1]).nonzero().view(-1).tolist() == [sid_tokens.sid_begin]


def test_beam_search_returns_distinct_lists(setup):
    tokenizer, sid_tokens, index, items, models = setup
    # 6 beams over the 3 remaining items: was [408, 419, 397, 408, 408, 408] with equal log-probs
    res = catalog_decode(models[0], tokenizer, PROMPTS[:1], index, n_items=1, exclude=[items[:27]], num_beams=6,
                         num_return_sequences=6)
    got = [int(r.items[0]) for r in res]
    assert sorted(got) == sorted(int(i) for i in items[27:])
    assert len({r.logprob for r in res}) == 3
    # K = 2 has two permutations: 4 beams must not repeat one
    res = constrained_decode(models[0], tokenizer, PROMPTS[:1], np.array([items[:2]]), index=index, num_beams=4,
                             num_return_sequences=4, reasoning=False)
    assert sorted(tuple(r.items.tolist()) for r in res) == sorted([tuple(items[:2].tolist()), tuple(items[1::-1].tolist())])


def reference_permutations(k):
    import math

    return math.factorial(k)


@settings(max_examples=25, deadline=None)
@given(ks=st.lists(st.integers(1, 5), min_size=2, max_size=2), mode=st.sampled_from(["greedy", "sample", "beam"]),
       reasoning=st.booleans(), budget=st.integers(0, 3), pick_seed=st.integers(0, 10**6), seed=st.integers(0, 2))
def test_ragged_k_decode_is_valid_and_beams_distinct(setup, ks, mode, reasoning, budget, pick_seed, seed):
    tokenizer, sid_tokens, index, items, models = setup
    rng = np.random.default_rng(pick_seed)
    cands = [rng.choice(items, size=k, replace=False) for k in ks]
    kwargs = dict(greedy={}, sample=dict(do_sample=True, seed=pick_seed, num_return_sequences=2),
                  beam=dict(num_beams=4, num_return_sequences=3))[mode]
    results = constrained_decode(models[seed], tokenizer, PROMPTS, [c.tolist() for c in cands], index=index,
                                 max_reasoning_tokens=budget, reasoning=reasoning, **kwargs)
    check_valid(results, cands, sid_tokens, index, budget, reasoning)  # against the plain-Python parser
    for p, k in enumerate(ks):
        lists = [tuple(r.items.tolist()) for r in results if r.prompt_index == p]
        assert 1 <= len(lists) <= kwargs.get("num_return_sequences", 1)
        if mode == "beam":
            assert len(set(lists)) == len(lists)
            if not reasoning:
                assert len(lists) == min(3, reference_permutations(k))
    # the text and token-id verifiers agree: every decoded completion is valid on both paths
    targets = [int(cands[r.prompt_index][0]) for r in results]
    rows = [cands[r.prompt_index] for r in results]
    by_tokens = gr2.verify_rewards([r.completion_ids for r in results], rows, targets, index=index,
                                   sid_tokens=sid_tokens)
    by_text = gr2.verify_rewards([r.text for r in results], rows, targets, index=index)
    assert by_tokens.valid.all() and by_text.valid.all()
    np.testing.assert_array_equal(by_tokens.ranking, by_text.ranking)


def test_bad_requests_raise_typed_errors_naming_the_request(setup):
    tokenizer, sid_tokens, index, items, models = setup
    model = models[0]
    with pytest.raises(UnknownItemError, match="request 1, candidate column 1: item 99999"):
        constrained_decode(model, tokenizer, PROMPTS, [[int(items[0])], [int(items[1]), 99999]], index=index)
    with pytest.raises(InvalidInputError, match="request 1 lists item .* more than once \\(columns 0 and 2\\)"):
        constrained_decode(model, tokenizer, PROMPTS, [[int(items[0])], [int(items[1]), int(items[2]), int(items[1])]],
                           index=index)
    with pytest.raises(InvalidInputError, match="request 0 has no candidates"):
        constrained_decode(model, tokenizer, PROMPTS, [[], [int(items[1])]], index=index)
    with pytest.raises(InvalidInputError, match="request 0 has no candidates"):
        RerankLogitsProcessor(tokenizer, np.zeros((1, 0), np.uint64), index=index)
    small = make_model(len(tokenizer) - 5, 0)  # its vocabulary stops before the SID tokens
    with pytest.raises(InvalidInputError, match="resize"):
        constrained_decode(small, tokenizer, PROMPTS[:1], [[int(items[0])]], index=index)


def _decoder_calls(model):
    """A counter of the decoder's forward calls (prefill and every decode step, on both paths)."""
    calls = []
    handle = model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


@settings(max_examples=30, deadline=None)
@given(
    ks=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    mode=st.sampled_from(["greedy", "sample_per_prompt", "sample_one_seed"]),
    reasoning=st.sampled_from([True, False, "in_think"]),
    budget=st.integers(0, 4),
    nrs=st.integers(1, 3),
    sparse=st.sampled_from([None, False]),
    pick_seed=st.integers(0, 10**6),
)
def test_jump_forward_equals_step_by_step(setup, ks, mode, reasoning, budget, nrs, sparse, pick_seed):
    """Forced tokens taken without a decode step give the same tokens and log-probabilities as
    decoding them one step each (greedy and seeded sampling, ragged K, several return sequences),
    in fewer forward passes whenever a token was forced."""
    tokenizer, sid_tokens, index, items, models = setup
    rng = np.random.default_rng(pick_seed)
    cands = [items[rng.choice(len(items), size=k, replace=False)] for k in ks]
    prompts = [PROMPTS[i % 2] + " the" * i for i in range(len(ks))]
    sampling = {} if mode == "greedy" else dict(do_sample=True, num_return_sequences=nrs, temperature=1.3,
                                                seed=[7 + i for i in range(len(ks))] if mode == "sample_per_prompt" else 11)
    model = models[pick_seed % 3]
    outputs, calls = [], []
    original = decode_mod.StepModel
    for jump in (False, True):
        count, handle = _decoder_calls(model)
        try:
            decode_mod.StepModel = lambda m: original(m, sparse=sparse)
            outputs.append(constrained_decode(model, tokenizer, prompts, cands, index=index, max_reasoning_tokens=budget,
                                              reasoning=reasoning, jump_forward=jump, **sampling))
        finally:
            decode_mod.StepModel = original
            handle.remove()
        calls.append(len(count))
    step, jump = outputs
    assert len(step) == len(jump)
    for a, b in zip(step, jump):
        assert a.prompt_index == b.prompt_index
        assert b.completion_ids == a.completion_ids
        assert b.items.tolist() == a.items.tolist()
        np.testing.assert_allclose(b.token_logprobs, a.token_logprobs, atol=1e-4)
        forced = [lp == 0.0 for lp in a.token_logprobs]
        assert [lp == 0.0 for lp in b.token_logprobs] == forced  # forced tokens: exactly 0 on both paths
    longest = max(len(r.completion_ids) for r in step) + 1  # + EOS
    assert calls[0] == longest  # prefill + one step per token but the last
    assert calls[1] < calls[0]  # every completion has forced tokens (tags at least)


def test_jump_forward_must_be_a_bool(setup):
    tokenizer, _, index, items, models = setup
    with pytest.raises(InvalidInputError, match="jump_forward"):
        constrained_decode(models[0], tokenizer, PROMPTS[:1], items[None, :3], index=index, jump_forward="yes")


def test_wrong_index_objects_and_ids_are_typed_errors_and_mixed_int_types_work(setup):
    """issue 30: index="foo" was an AttributeError, exclude=[[-1]] an OverflowError, 1.5 a silent 1,
    and [np.uint64(x), int] was rejected as float64."""
    tokenizer, _, index, items, models = setup
    model = models[0]
    with pytest.raises(InvalidInputError, match="index must be a gr2.SidIndex"):
        constrained_decode(model, tokenizer, PROMPTS[:1], items[None, :3], index="foo")
    with pytest.raises(InvalidInputError, match="index must be a gr2.SidIndex"):
        catalog_decode(model, tokenizer, PROMPTS[:1], "foo")
    with pytest.raises(InvalidInputError, match=r"exclude\[0\] holds a negative item id"):
        catalog_decode(model, tokenizer, PROMPTS[:1], index, exclude=[[-1]])
    with pytest.raises(InvalidInputError, match=r"exclude\[0\] must hold integer item ids"):
        catalog_decode(model, tokenizer, PROMPTS[:1], index, exclude=[[1.5]])
    with pytest.raises(InvalidInputError, match="outside 0 .. 2\\*\\*64 - 1"):
        constrained_decode(model, tokenizer, PROMPTS[:1], [[np.uint64(items[0]), 2**64]], index=index)
    mixed = [[np.uint64(items[0]), int(items[1]), np.int64(items[2])]]
    plain = items[None, :3]
    a = constrained_decode(model, tokenizer, PROMPTS[:1], mixed, index=index, reasoning=False)
    b = constrained_decode(model, tokenizer, PROMPTS[:1], plain, index=index, reasoning=False)
    assert a[0].items.tolist() == b[0].items.tolist() and a[0].completion_ids == b[0].completion_ids


def test_vllm_validate_params_checks_the_whole_request_up_front(setup):
    """issue 30: everything a request carries is checked when vLLM validates it (not later, inside
    the engine step): unknown keys, the mode, the budget's type and sign, the codes' shape and
    range, unknown items, and a max_tokens that would cut the ranking short."""
    from gr2.decoding._setup import completion_length
    from gr2.decoding._vllm_core import request_spec

    tokenizer, sid_tokens, index, items, models = setup
    levels = sid_tokens.levels
    cands = [int(items[1]), int(items[4]), int(items[7])]

    def check(spec, max_tokens=None):
        return request_spec(_Params({"gr2": spec}, max_tokens), index=index, allow_unconstrained=False, levels=levels)

    bad = [
        ({"candidates": cands, "k": 3}, "unknown key"),
        ({"candidates": cands, "reasoning": "nope"}, "reasoning"),
        ({"candidates": cands, "max_reasoning_tokens": -1}, "max_reasoning_tokens"),
        ({"candidates": cands, "max_reasoning_tokens": "64"}, "max_reasoning_tokens"),
        ({"candidates": cands, "max_reasoning_tokens": True}, "max_reasoning_tokens"),
        ({"candidates": cands, "codes": [[1, 2]] * 3}, "codes"),
        ({"candidates": cands, "codes": [[1] * levels] * 2}, "codes"),
        ({"candidates": cands, "codes": [[-1] * levels] * 3}, "codes"),
        ({"candidates": cands, "codes": [["a"] * levels] * 3}, "codes"),
        ({"candidates": [123456789]}, "123456789"),  # not in the index
    ]
    for spec, match in bad:
        with pytest.raises(InvalidInputError, match=match):
            check(spec)
    need = completion_length(3, levels, "disabled", 0)
    with pytest.raises(InvalidInputError, match=rf"max_tokens = {need - 1} can cut the ranking"):
        check({"candidates": cands, "reasoning": "disabled", "max_reasoning_tokens": 0}, max_tokens=need - 1)
    ok = check({"candidates": cands, "reasoning": "disabled", "max_reasoning_tokens": 0}, max_tokens=need)
    assert ok["codes"].shape == (3, levels) and ok["reasoning"] == "disabled" and ok["max_reasoning_tokens"] == 0
    np.testing.assert_array_equal(ok["codes"], index.sids(np.array(cands, dtype=np.uint64)))


def test_processor_with_a_tiny_budget_says_so_instead_of_blaming_the_constraint(setup):
    """issue 30: beams with max_new_tokens=1 raised "was this processor applied?"; the replay now
    names the budget (IncompleteGenerationError with the max_new_tokens that suffices)."""
    from transformers import LogitsProcessorList

    from gr2.decoding import RerankLogitsProcessor

    tokenizer, sid_tokens, index, items, models = setup
    cands = np.array([items[[3, 7, 1, 12]], items[[5, 9, 2, 0]]])
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    proc = RerankLogitsProcessor(tokenizer, cands, index=index, num_beams=3, max_reasoning_tokens=4)
    out = models[1].generate(**enc, logits_processor=LogitsProcessorList([proc]), max_new_tokens=1, num_beams=3,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(gr2.IncompleteGenerationError, match=rf"max_new_tokens >= {proc.required_max_new_tokens}"):
        proc.items(out)
