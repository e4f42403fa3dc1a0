"""A tiny policy (2-layer Llama, hidden 32) with SID tokens, fixed rerank data and scripted
rollouts, shared by tests/test_dapo.py and the torchrun worker tests/_dapo_ddp_worker.py."""

from __future__ import annotations

import numpy as np
import torch

from gr2.models import DemoModelConfig, build_demo_model, train_demo_tokenizer
from gr2.tokens import add_sid_tokens
from gr2.train.dapo import DapoConfig, DapoTrainer, RlData, Rollout

K, LEVELS = 4, 2
LEVEL_SIZES = (K, 16)  # SID of candidate c in row r: (c, r) -- unique over the catalog


def tiny_policy(seed: int = 0):
    torch.manual_seed(seed)
    texts = ["rank the movies for the user", "history candidates answer think", "<|im_start|>user hello<|im_end|>"]
    tokenizer = train_demo_tokenizer(texts * 5, vocab_size=300)
    sid_tokens = add_sid_tokens(tokenizer, level_sizes=LEVEL_SIZES)
    model = build_demo_model(tokenizer, DemoModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                        num_layers=2, num_heads=2, max_position_embeddings=2048, seed=seed))
    return model, tokenizer, sid_tokens


def tiny_data(tokenizer, n: int = 12, stride: int = 10) -> tuple[RlData, np.ndarray]:
    """n (<= 16) requests of K candidates; candidate c of row r is item r * stride + c with SID
    (c, r); target varies."""
    rng = np.random.default_rng(0)
    texts = [f"<|im_start|>user rank the movies {i}<|im_end|>" for i in range(n)]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    candidates = (np.arange(n)[:, None] * stride + np.arange(K)[None, :]).astype(np.uint64)
    targets = candidates[np.arange(n), rng.integers(0, K, n)]
    sids = np.stack([np.stack([[c, r] for c in range(K)]) for r in range(n)]).astype(np.uint16)
    return RlData(texts, ids, candidates, targets), sids


def answer_ids(sid_tokens, sids_row: np.ndarray, order, eos: int, think=(5, 6)) -> list[int]:
    out = [sid_tokens.think_open, *think, sid_tokens.think_close, sid_tokens.answer_open]
    for c in order:
        out += sid_tokens.sid_token_ids(sids_row[c])
    return out + [sid_tokens.answer_close, eos]


def scripted_rollouts(sids: np.ndarray, sid_tokens, uniform_rows=()):
    """Rollout function: random permutations drawn from each prompt's seed; rows in ``uniform_rows``
    always answer with the input order (every rollout of the group has the same outcome)."""

    def one(candidates, n, seed, ctx):
        row = int(candidates[0]) // 10
        rng = np.random.default_rng(seed)
        orders = [list(range(K)) if row in uniform_rows else list(rng.permutation(K)) for _ in range(n)]
        return [answer_ids(sid_tokens, sids[row], o, ctx["eos_id"], think=tuple(rng.integers(3, 40, 2))) for o in orders]

    def rollout(model, tokenizer, prompt_texts, candidates, n, seeds, config, ctx):
        return [one(c, n, s, ctx) for c, s in zip(candidates, seeds)]

    return rollout


def fixed_rollouts(tokenizer, sid_tokens, data: RlData, sids: np.ndarray, groups: int, g: int = 4, seed: int = 0) -> list[Rollout]:
    rng = np.random.default_rng(seed)
    out = []
    for row in range(groups):
        for j in range(g):
            order = list(rng.permutation(K))
            adv = float(rng.normal())
            out.append(Rollout(data.prompt_ids[row], answer_ids(sid_tokens, sids[row], order, tokenizer.eos_token_id), 0.0, adv))
    return out


def small_config(**kw) -> DapoConfig:
    base = dict(group_size=4, prompts_per_step=3, steps=3, lr=1e-2, device="cpu", tensorboard=False, seed=1)
    base.update(kw)
    return DapoConfig(**base)


def trainer(model, tokenizer, sid_tokens, data, sids, config, rollout_fn) -> DapoTrainer:
    return DapoTrainer(model, tokenizer, data, config, sid_tokens=sid_tokens, candidate_sids=sids, rollout_fn=rollout_fn)


def tiny_index(data: RlData, sids: np.ndarray):
    """A real gr2.SidIndex over the candidates' (unique) SIDs."""
    import gr2

    return gr2.SidIndex.build(data.candidates.reshape(-1).astype(np.uint64), sids.reshape(-1, LEVELS).astype(np.uint16),
                              codebook_size=list(LEVEL_SIZES))
