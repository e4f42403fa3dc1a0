"""Shared setup of the vLLM tests (``make test-vllm``, in ``.venv-vllm``): a tiny SID world (tokenizer
with the SID vocabulary, a real ``gr2.SidIndex``), a model folder vLLM's ``ModelConfig`` reads, and a
real ``VllmConfig``. Without vLLM every module here skips at import, so the default ``make test``
collects nothing from this folder."""

from __future__ import annotations

import os

# vLLM's own CPU platform (vllm.platforms.cpu.CpuPlatform): on a machine without a GPU the PyPI wheel
# otherwise resolves an "unspecified" platform that claims pinned memory and cannot name a device.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

LEVEL_SIZES = (4, 3, 3)
WORDS = "the user liked watched item movie next good bad why because so then a an of to".split()
EXTRA_VOCAB = 3  # the model's logits are wider than the tokenizer, like most real checkpoints


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")


class World:
    """Everything one vLLM test needs, built once per session."""

    def __init__(self, root):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        import gr2

        self.tokenizer = make_tokenizer()
        self.sid_tokens = gr2.add_sid_tokens(self.tokenizer, level_sizes=LEVEL_SIZES)
        rng = np.random.default_rng(0)
        flat = rng.permutation(int(np.prod(LEVEL_SIZES)))[:30]
        codes = np.array(np.unravel_index(flat, LEVEL_SIZES)).T.astype(np.uint16)
        self.items = (np.arange(30) * 11 + 100).astype(np.uint64)
        self.index = gr2.SidIndex.build(self.items, codes, codebook_size=list(LEVEL_SIZES))
        assert self.index.uniqueness_before_repair == 1.0
        self.eos = int(self.tokenizer.eos_token_id)
        self.vocab = len(self.tokenizer) + EXTRA_VOCAB
        self.model_dir = str(root / "tiny-llama")
        self.tokenizer.save_pretrained(self.model_dir)
        cfg = LlamaConfig(vocab_size=self.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=self.eos)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(self.model_dir)  # weights too: the engine test loads them

    def parse_ranking(self, ids: list[int]) -> list[int]:
        """Plain-Python reading of a completion's answer: the item of every SID between the answer tags."""
        st = self.sid_tokens
        code_of = {int(st.code_ids[lvl, c]): (lvl, c) for lvl in range(st.levels) for c in range(st.level_sizes[lvl])}
        start = ids.index(st.answer_open) + 1
        end = ids.index(st.answer_close)
        assert ids[end + 1] == self.eos
        body, items, i = ids[start:end], [], 0
        while i < len(body):
            assert body[i] == st.sid_begin and body[i + st.levels + 1] == st.sid_end, body
            codes = [code_of[t] for t in body[i + 1:i + 1 + st.levels]]
            assert [lvl for lvl, _ in codes] == list(range(st.levels))
            sid = np.array([[c for _, c in codes]], dtype=np.uint16)
            items.append(int(self.index.items(sid)[0]))
            i += st.levels + 2
        return items

    def check_completion(self, spec: dict, ids: list[int]) -> None:
        """``ids`` (a completion ending in EOS) ranks exactly ``spec``'s candidates, for the
        plain-Python parser and for gr2.verify_rewards on token ids (``in_think`` completions start
        inside the think span the prompt opened, so ``<think>`` is prepended first)."""
        import gr2

        cands = [int(c) for c in spec["candidates"]]
        text_ids = ([self.sid_tokens.think_open] if spec.get("reasoning") == "in_think" else []) + list(ids)
        got = self.parse_ranking(text_ids)
        assert sorted(got) == sorted(cands), (got, cands)
        res = gr2.verify_rewards([text_ids], [np.asarray(cands, dtype=np.uint64)], [cands[0]], index=self.index,
                                 sid_tokens=self.sid_tokens, trailer_ids=[self.eos])
        assert res.valid.all()
        assert [int(x) for x in res.ranking[0][:len(cands)]] == got

    def vllm_config(self):
        """A real VllmConfig over the model folder (ModelConfig reads its config.json and tokenizer)."""
        from vllm.config import ModelConfig, VllmConfig

        return VllmConfig(model_config=ModelConfig(model=self.model_dir, tokenizer=self.model_dir, max_model_len=512))

    def processor(self, **kwargs):
        from gr2.decoding.vllm import make_rerank_logits_processor

        return make_rerank_logits_processor(self.sid_tokens, eos_token_id=self.eos, tokenizer=self.tokenizer,
                                            index=self.index, **kwargs)

    def token_map(self):
        from gr2.decoding._setup import build_token_map

        return build_token_map(self.sid_tokens, eos=self.eos, vocab_size=self.vocab, tokenizer=self.tokenizer)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    pytest.importorskip("vllm")
    return World(tmp_path_factory.mktemp("vllm-world"))


@pytest.fixture(scope="session")
def vllm_config(world):
    return world.vllm_config()
