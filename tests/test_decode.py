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


def test_vllm_module_needs_vllm():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed; the processor is exercised by vLLM-marked tests")
    with pytest.raises(ImportError, match="gr2\\[vllm\\]"):
        import gr2.decoding.vllm  # noqa: F401
