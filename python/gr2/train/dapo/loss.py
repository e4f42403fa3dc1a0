"""The DAPO objective on plain tensors (unit-tested without a trainer): the soft overlong penalty,
group advantages, dynamic sampling's keep mask, packing rollouts into a batch, policy
log-probabilities under the sampling constraint, and the clipped token-level loss.

* **Advantages.** A = (R - mean_G) / (std_G + std_eps) per group (population std).
* **Loss.** Clipped-ratio objective with clip-higher (eps_low 0.2, eps_high 0.28), summed over
  completion tokens and divided by the total number of completion tokens of the mini-batch
  (token-level normalisation, across micro-batches and processes); optional k3 KL to the start
  model (off by default).
* **On-policy log-probabilities.** The ratio and the policy gradient use the distribution each
  token was sampled from. Constrained rollouts carry, per token, the allowed ids the automaton
  offered (:func:`gr2.decoding.constraint_trace` replays the completion through a fresh native
  automaton); :func:`token_logprobs` then takes a log-softmax over the gathered logits of those ids
  (a forced tag gets exactly 0), over the vocabulary minus the forbidden ids for free reasoning,
  and over the whole vocabulary for rollouts without a trace (plain sampling). Old, new and
  reference (KL) log-probs all use the same form, and logits are divided by ``rl.temperature`` as
  the sampler does; ``top_p < 1`` truncation is not modelled. ``tests/test_dapo_onpolicy.py``
  checks the masked log-probabilities against the ones ``constrained_decode`` sampled with, token
  by token (|diff| <= 2e-4).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gr2.errors import InvalidInputError
from gr2.rewards import RewardBatch
from gr2.train.dapo.rollouts import Rollout


def overlong_penalty(lengths: np.ndarray, l_max: int, l_cache: int) -> np.ndarray:
    """DAPO's soft overlong penalty: 0 up to L_max - L_cache, linear to -1 at L_max, -1 beyond."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if l_max <= 0:
        return np.zeros_like(lengths)
    start = l_max - l_cache
    if l_cache == 0:
        return np.where(lengths > l_max, -1.0, 0.0)
    return np.clip((start - lengths) / l_cache, -1.0, 0.0)


def group_advantages(rewards: np.ndarray, std_eps: float = 1e-6) -> np.ndarray:
    """(R - mean_G) / (std_G + eps) for rewards shaped (groups, G); population std."""
    rewards = np.asarray(rewards, dtype=np.float64)
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, keepdims=True)
    return (rewards - mean) / (std + std_eps)


def informative_groups(outcomes: np.ndarray) -> np.ndarray:
    """Dynamic sampling's keep mask: a group is kept unless all G outcomes are equal."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    return ~np.all(outcomes == outcomes[:, :1], axis=1)


def outcome_of(rb: RewardBatch, kind: str) -> np.ndarray:
    if kind == "r_rank":
        return rb.r_rank.astype(np.float64)
    if kind == "hit@1":
        return (rb.rank_re == 1).astype(np.float64)
    return rb.rank_re.astype(np.float64)


def pack_rollouts(rollouts: Sequence[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion ids, attention mask, the completion-token mask over the
    *predicted* positions (T-1 wide, aligned with :func:`token_logprobs`), and advantages.

    When rollouts carry constraints (:attr:`Rollout.allowed`) it adds, over the flattened
    (N * (T-1)) predicted positions: ``sparse_index`` (P,) and ``sparse_ids`` / ``sparse_valid``
    (P, A) for tokens drawn from a short allowed list (padded), ``free_index`` (F,) for free
    reasoning tokens and ``forbidden`` (the ids free reasoning excludes). Positions of rollouts
    without a constraint are in neither: their log-probabilities stay full-vocabulary ones."""
    if not rollouts:
        raise InvalidInputError("no rollouts to pack")
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    n = len(rollouts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    completion = torch.zeros((n, width - 1), dtype=torch.float32)
    sparse_pos: list[np.ndarray] = []
    sparse_lists: list[tuple[np.ndarray, np.ndarray]] = []
    free_pos: list[np.ndarray] = []
    forbidden: np.ndarray | None = None
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        if c == 0:
            raise InvalidInputError(f"rollout {i} has an empty completion")
        ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids, dtype=torch.long)
        attention[i, : p + c] = 1
        completion[i, p - 1 : p + c - 1] = 1.0  # position t predicts token t+1
        a = r.allowed
        if a is None:
            continue
        if len(a) != c:
            raise InvalidInputError(f"rollout {i}: constraint trace covers {len(a)} tokens, the completion has {c}")
        if forbidden is None:
            forbidden = a.forbidden
        elif forbidden is not a.forbidden and not np.array_equal(forbidden, a.forbidden):
            raise InvalidInputError("rollouts of one batch were constrained with different token maps")
        flat = i * (width - 1) + (p - 1) + np.arange(c)
        free_pos.append(flat[a.free])
        sparse_pos.append(flat[~a.free])
        keep = np.nonzero(~a.free)[0]
        sparse_lists.append((a.offsets[keep], a.offsets[keep + 1]))
        for t in keep:
            if a.offsets[t + 1] <= a.offsets[t]:
                raise InvalidInputError(f"rollout {i}: empty allowed list at completion token {t}")
    advantages = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)
    out = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion, "advantages": advantages}
    if forbidden is not None:
        traces = [r.allowed for r in rollouts if r.allowed is not None]
        starts = np.concatenate([s for s, _ in sparse_lists])
        ends = np.concatenate([e for _, e in sparse_lists])
        counts = ends - starts
        a_width = int(counts.max(initial=1))
        table = np.zeros((counts.size, a_width), dtype=np.int64)
        valid = np.arange(a_width)[None, :] < counts[:, None]
        row = 0
        for trace, (s_, e_) in zip(traces, sparse_lists):  # gather each trace's lists into the table
            for start, end in zip(s_, e_):
                table[row, : end - start] = trace.ids[start:end]
                row += 1
        out.update(sparse_index=torch.as_tensor(np.concatenate(sparse_pos), dtype=torch.long),
                   sparse_ids=torch.as_tensor(table), sparse_valid=torch.as_tensor(valid),
                   free_index=torch.as_tensor(np.concatenate(free_pos), dtype=torch.long),
                   forbidden=torch.as_tensor(forbidden, dtype=torch.long))
    return out


def token_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log p(x_{t+1} | x_{<=t}) at every completion position (0 elsewhere), (N, T-1), float32.

    ``p`` is the sampling distribution: the model's softmax at ``temperature``, restricted to the
    constraint the token was drawn under when the batch carries one (see :func:`pack_rollouts`):
    a log-softmax over the gathered logits of the allowed ids (a forced token gets exactly 0), over
    the vocabulary minus ``forbidden`` for free reasoning, over the whole vocabulary otherwise.
    Logits are computed only from the first completion position on (``logits_to_keep``)."""
    input_ids, mask = batch["input_ids"], batch["completion_mask"]
    n, t1 = mask.shape
    has = mask.sum(0) > 0
    start = int(torch.nonzero(has)[0]) if bool(has.any()) else t1 - 1
    keep = t1 + 1 - start  # logits of positions start .. T-1; the last one predicts nothing
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    logits = logits[:, -keep:-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    width = t1 - start
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # row (i, t - start) of the kept window
    targets = input_ids[:, start + 1:].reshape(-1)
    lp = -F.cross_entropy(flat, targets, reduction="none")
    if "sparse_index" in batch:
        def local(index: torch.Tensor) -> torch.Tensor:  # flat (N, T-1) position -> row of ``flat``
            row, col = index // t1, index % t1
            return row * width + (col - start)

        s_idx = local(batch["sparse_index"])
        if s_idx.numel():
            gathered = flat[s_idx[:, None], batch["sparse_ids"]].masked_fill(~batch["sparse_valid"], float("-inf"))
            chosen = flat[s_idx, targets[s_idx]]
            lp = lp.index_put((s_idx,), chosen - torch.logsumexp(gathered, dim=-1))
        f_idx = local(batch["free_index"])
        if f_idx.numel():
            rows = flat.index_select(0, f_idx)
            if batch["forbidden"].numel():
                rows = rows.index_fill(1, batch["forbidden"], float("-inf"))
            free_lp = rows.gather(1, targets[f_idx][:, None]).squeeze(1) - torch.logsumexp(rows, dim=-1)
            lp = lp.index_put((f_idx,), free_lp)
    out = lp.new_zeros((n, t1))
    out = torch.cat([out[:, :start], lp.view(n, width)], dim=1)
    return torch.where(mask > 0, out, torch.zeros_like(out))


def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    total_tokens: float,
    eps_low: float,
    eps_high: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio token loss summed over ``mask`` and divided by ``total_tokens`` (the completion
    tokens of the whole mini-batch, across micro-batches and processes). Returns (loss, stats sums)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if ref_logp is not None and kl_coef > 0:
        log_ratio_ref = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(log_ratio_ref) - log_ratio_ref - 1.0)
    loss = (per_token * mask).sum() / total_tokens
    with torch.no_grad():
        was_clipped = ((clipped < unclipped) & (mask > 0)).float().sum()
    return loss, {"clipped_tokens": float(was_clipped), "tokens": float(mask.sum())}
