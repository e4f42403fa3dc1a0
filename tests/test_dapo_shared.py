"""The shared-prompt loss (rl.share_prompt, each prompt encoded once per group) computes the same
log-probabilities and the same gradient as the per-rollout layout (each rollout re-encodes its
prompt), in float32 on the tiny policy: several G, ragged prompts and completions, with and without
sampling constraints, with and without LoRA, and through a whole dapo_update."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import _dapo_fixtures as fx
from gr2.decoding.decode import AllowedTrace
from gr2.errors import InvalidInputError
from gr2.train.optim import LoraSettings, make_optimizer, wrap_lora
from gr2.train.dapo import Rollout, dapo_loss, dapo_update, pack_groups, pack_rollouts, token_logprobs

FORBIDDEN = np.array([3, 7, 11], dtype=np.int64)


@pytest.fixture(scope="module")
def setup():
    model, tokenizer, sid_tokens = fx.tiny_policy()
    data, sids = fx.tiny_data(tokenizer)
    return model, tokenizer, sid_tokens, data, sids


def _trace(completion: list[int], rng: np.random.Generator, vocab: int) -> AllowedTrace:
    """A made-up constraint: each token free (whole vocabulary minus FORBIDDEN) or drawn from a
    short list holding it (one id: forced)."""
    free = rng.random(len(completion)) < 0.3
    lists = []
    for tok, is_free in zip(completion, free):
        if is_free:
            continue
        others = rng.choice(vocab, size=int(rng.integers(0, 4)), replace=False)
        lists.append(np.unique(np.concatenate([[tok], others])))
    offsets = np.zeros(len(completion) + 1, dtype=np.int64)
    sizes = iter(len(x) for x in lists)
    for t, is_free in enumerate(free):
        offsets[t + 1] = offsets[t] + (0 if is_free else next(sizes))
    ids = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, dtype=np.int64)
    return AllowedTrace(free, offsets, ids, FORBIDDEN)


def ragged_rollouts(tokenizer, data, g: int, groups: int, constrained: bool, seed: int = 0) -> list[Rollout]:
    """``groups`` prompts of different lengths, G completions each of different lengths; tokens
    avoid FORBIDDEN so free positions are possible."""
    rng = np.random.default_rng(seed)
    vocab = 300
    allowed_tokens = np.setdiff1d(np.arange(12, vocab), FORBIDDEN)
    out = []
    for row in range(groups):
        prompt = list(data.prompt_ids[row]) + rng.choice(allowed_tokens, size=int(rng.integers(0, 9))).tolist()
        for _ in range(g):
            completion = rng.choice(allowed_tokens, size=int(rng.integers(1, 14))).tolist()
            trace = _trace(completion, rng, vocab) if constrained else None
            out.append(Rollout(prompt, completion, 0.0, float(rng.normal()), trace))
    rng.shuffle(out)  # a group's rollouts need not be adjacent
    return out


def per_token(logp: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [row[m > 0] for row, m in zip(logp, mask)]


def as_layout(values: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-rollout token values placed at the mask's positions."""
    out = torch.zeros_like(mask)
    for i, v in enumerate(values):
        out[i, mask[i] > 0] = v
    return out


def loss_and_grads(model, batch, old_tokens, total):
    model.zero_grad(set_to_none=True)
    logp = token_logprobs(model, batch)
    old = as_layout(old_tokens, batch["completion_mask"])
    loss, _ = dapo_loss(logp, old, batch["advantages"], batch["completion_mask"], total, 0.2, 0.28)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return per_token(logp.detach(), batch["completion_mask"]), float(loss.detach()), grads


@pytest.mark.parametrize("g", [2, 3, 5])
@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_gradient_equals_per_rollout_gradient(setup, g, constrained, lora):
    model, tokenizer, _, data, _ = setup
    model = copy.deepcopy(model).float()
    if lora:
        model = wrap_lora(model, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0,
                                                            train_embeddings=False))
    model.eval()
    rollouts = ragged_rollouts(tokenizer, data, g, groups=4, constrained=constrained, seed=g)
    pad = tokenizer.pad_token_id
    per_rollout, shared = pack_rollouts(rollouts, pad), pack_groups(rollouts, pad)
    assert shared["prompt_ids"].shape[0] == 4 and shared["completion_ids"].shape[0] == 4 * g
    total = float(sum(len(r.completion_ids) for r in rollouts))
    with torch.no_grad():  # an old policy away from the current one, so some ratios clip
        old = [t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
               for i, t in enumerate(per_token(token_logprobs(model, per_rollout), per_rollout["completion_mask"]))]
    lp_a, loss_a, grads_a = loss_and_grads(model, per_rollout, old, total)
    lp_b, loss_b, grads_b = loss_and_grads(model, shared, old, total)
    for a, b, r in zip(lp_a, lp_b, rollouts):
        assert a.shape == b.shape == (len(r.completion_ids),)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-5)
    if constrained:  # forced tokens are exactly 0 in both layouts
        forced = [torch.as_tensor((~r.allowed.free) & (np.diff(r.allowed.offsets) == 1)) for r in rollouts]
        assert any(f.any() for f in forced)
        assert all(bool((b[f] == 0).all()) for b, f in zip(lp_b, forced))
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    if lora:
        assert all("lora_" in n for n in grads_a)
    scale = max(float(v.abs().max()) for v in grads_a.values())
    assert scale > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_one_dapo_update_gives_the_same_weights_in_both_layouts(setup):
    model, tokenizer, _, data, _ = setup
    rollouts = ragged_rollouts(tokenizer, data, 4, groups=4, constrained=True, seed=7)
    after = []
    for share in (False, True):
        m = copy.deepcopy(model).float()
        config = fx.small_config(share_prompt=share, grad_accum=2, updates_per_batch=2, prompts_per_step=4, lr=1e-2)
        stats = dapo_update(m, make_optimizer(m, config.lr), None, rollouts, config, tokenizer.pad_token_id)
        assert stats["completion_tokens"] == sum(len(r.completion_ids) for r in rollouts)
        after.append(dict(m.named_parameters()))
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.float(), after[0][n])]
    assert moved
    for name, p in after[0].items():
        torch.testing.assert_close(after[1][name], p, rtol=1e-4, atol=1e-5, msg=name)


def test_pack_groups_encodes_each_prompt_once(setup):
    _, tokenizer, _, data, _ = setup
    rollouts = ragged_rollouts(tokenizer, data, 3, groups=5, constrained=False)
    batch = pack_groups(rollouts, tokenizer.pad_token_id)
    assert batch["prompt_ids"].shape[0] == 5
    for i, r in enumerate(rollouts):
        b = int(batch["prompt_of"][i])
        prompt = batch["prompt_ids"][b][batch["prompt_mask"][b] > 0].tolist()
        assert prompt == r.prompt_ids
        assert batch["prompt_mask"][b, -1] == 1  # left-padded: the last token is in the last column
        assert batch["completion_ids"][i][batch["completion_mask"][i] > 0].tolist() == r.completion_ids


def test_pack_groups_rejects_bad_rollouts(setup):
    _, tokenizer, _, data, _ = setup
    with pytest.raises(InvalidInputError, match="no rollouts"):
        pack_groups([], 0)
    with pytest.raises(InvalidInputError, match="empty completion"):
        pack_groups([Rollout([1, 2], [])], 0)
    with pytest.raises(InvalidInputError, match="empty prompt"):
        pack_groups([Rollout([], [1])], 0)
    short = AllowedTrace(np.array([True]), np.zeros(2, dtype=np.int64), np.zeros(0, dtype=np.int64), FORBIDDEN)
    with pytest.raises(InvalidInputError, match="constraint trace covers 1 tokens"):
        pack_groups([Rollout([1, 2], [4, 5], allowed=short)], 0)


def test_shared_prompt_on_a_model_without_a_cache_names_the_setting(setup):
    from transformers.modeling_outputs import CausalLMOutput

    from gr2.errors import ConfigError

    model, tokenizer, _, data, _ = setup

    class NoCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            kwargs["use_cache"] = False
            return CausalLMOutput(logits=self.inner(**kwargs).logits)

    batch = pack_groups(ragged_rollouts(tokenizer, data, 2, groups=2, constrained=False), tokenizer.pad_token_id)
    with pytest.raises(ConfigError, match="rl.share_prompt"):
        token_logprobs(NoCache(model), batch)


def test_prompts_longer_than_the_context_are_rejected_naming_the_settings(setup):
    from gr2.errors import ConfigError

    model, tokenizer, sid_tokens, data, sids = setup
    long_data = copy.copy(data)
    long_data.prompt_ids = [list(p) for p in data.prompt_ids]
    long_data.prompt_ids[3] = long_data.prompt_ids[3] * 200  # beyond the tiny model's 2,048 positions
    with pytest.raises(ConfigError, match=r"prompt 3 has \d+ tokens.*rl.max_reasoning_tokens.*max_position_embeddings"):
        fx.trainer(model, tokenizer, sid_tokens, long_data, sids, fx.small_config(), fx.scripted_rollouts(sids, sid_tokens))
    with pytest.raises(ConfigError, match="rl.max_new_tokens"):
        fx.trainer(model, tokenizer, sid_tokens, data, sids, fx.small_config(constrained=False, max_new_tokens=3000),
                   fx.scripted_rollouts(sids, sid_tokens))
