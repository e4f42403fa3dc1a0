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

from gr2.errors import ConfigError, InvalidInputError
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
    """The per-rollout layout: right-padded prompt+completion ids (each rollout carries its own copy
    of its prompt), attention mask, the completion-token mask over the *predicted* positions (T-1
    wide, aligned with :func:`token_logprobs`), and advantages. :func:`pack_groups` is the layout
    that encodes each prompt once per group (``rl.share_prompt``, the default).

    When rollouts carry constraints (:attr:`Rollout.allowed`) it adds the tables of
    :func:`_constraint_tables` over the flattened (N * (T-1)) predicted positions."""
    _check_rollouts(rollouts)
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    n = len(rollouts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    completion = torch.zeros((n, width - 1), dtype=torch.float32)
    starts = []
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids, dtype=torch.long)
        attention[i, : p + c] = 1
        completion[i, p - 1 : p + c - 1] = 1.0  # position t predicts token t+1
        starts.append(i * (width - 1) + (p - 1))
    advantages = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)
    out = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion, "advantages": advantages}
    out.update(_constraint_tables(rollouts, starts))
    return out


def pack_groups(rollouts: Sequence[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """The shared-prompt layout: each distinct prompt once, the completions beside it.

    ``prompt_ids`` / ``prompt_mask`` (B, P) hold the distinct prompts left-padded (so every
    prompt's last token is in the last column); ``completion_ids`` / ``completion_mask`` (N, C) the
    N completions right-padded; ``prompt_of`` (N,) the prompt row of each completion. Log-probs
    come out (N, C), one per completion token (:func:`group_token_logprobs`). Rollouts sharing the
    same prompt ids share one prompt row whatever group they came from (their prompt's keys and
    values are the same). Constraint tables index the flattened (N * C) completion positions."""
    _check_rollouts(rollouts)
    prompt_row: dict[tuple[int, ...], int] = {}
    prompts: list[list[int]] = []
    prompt_of = []
    for r in rollouts:
        key = tuple(r.prompt_ids)
        if key not in prompt_row:
            prompt_row[key] = len(prompts)
            prompts.append(list(r.prompt_ids))
        prompt_of.append(prompt_row[key])
    p_width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), p_width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), p_width), dtype=torch.long)
    for b, p in enumerate(prompts):
        prompt_ids[b, p_width - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[b, p_width - len(p):] = 1
    n, c_width = len(rollouts), max(len(r.completion_ids) for r in rollouts)
    completion_ids = torch.full((n, c_width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((n, c_width), dtype=torch.float32)
    for i, r in enumerate(rollouts):
        completion_ids[i, : len(r.completion_ids)] = torch.tensor(r.completion_ids, dtype=torch.long)
        completion_mask[i, : len(r.completion_ids)] = 1.0
    out = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
           "completion_mask": completion_mask, "prompt_of": torch.tensor(prompt_of, dtype=torch.long),
           "advantages": torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)}
    out.update(_constraint_tables(rollouts, [i * c_width for i in range(n)]))
    return out


def pack(rollouts: Sequence[Rollout], pad_id: int, share_prompt: bool) -> dict[str, torch.Tensor]:
    """:func:`pack_groups` when ``share_prompt`` else :func:`pack_rollouts`."""
    return pack_groups(rollouts, pad_id) if share_prompt else pack_rollouts(rollouts, pad_id)


def _check_rollouts(rollouts: Sequence[Rollout]) -> None:
    if not rollouts:
        raise InvalidInputError("no rollouts to pack")
    for i, r in enumerate(rollouts):
        if not r.completion_ids:
            raise InvalidInputError(f"rollout {i} has an empty completion")
        if not r.prompt_ids:
            raise InvalidInputError(f"rollout {i} has an empty prompt")
        if r.allowed is not None and len(r.allowed) != len(r.completion_ids):
            raise InvalidInputError(f"rollout {i}: constraint trace covers {len(r.allowed)} tokens, "
                                    f"the completion has {len(r.completion_ids)}")


def _constraint_tables(rollouts: Sequence[Rollout], starts: Sequence[int]) -> dict[str, torch.Tensor]:
    """The constraints behind the completion tokens, over flattened positions (rollout i's token t
    at ``starts[i] + t``): ``sparse_index`` (S,) and ``sparse_ids`` / ``sparse_valid`` (S, A) for
    tokens drawn from a short allowed list (padded), ``free_index`` (F,) for free reasoning tokens
    and ``forbidden`` (the ids free reasoning excludes). Positions of rollouts without a constraint
    are in neither (their log-probabilities stay full-vocabulary ones); {} when none has one."""
    sparse_pos: list[np.ndarray] = []
    sparse_lists: list[tuple[np.ndarray, np.ndarray]] = []
    free_pos: list[np.ndarray] = []
    forbidden: np.ndarray | None = None
    traces = []
    for i, (r, start) in enumerate(zip(rollouts, starts)):
        a = r.allowed
        if a is None:
            continue
        if forbidden is None:
            forbidden = a.forbidden
        elif forbidden is not a.forbidden and not np.array_equal(forbidden, a.forbidden):
            raise InvalidInputError("rollouts of one batch were constrained with different token maps")
        flat = start + np.arange(len(a))
        free_pos.append(flat[a.free])
        sparse_pos.append(flat[~a.free])
        keep = np.nonzero(~a.free)[0]
        if np.any(a.offsets[keep + 1] <= a.offsets[keep]):
            t = int(keep[np.argmax(a.offsets[keep + 1] <= a.offsets[keep])])
            raise InvalidInputError(f"rollout {i}: empty allowed list at completion token {t}")
        sparse_lists.append((a.offsets[keep], a.offsets[keep + 1]))
        traces.append(a)
    if forbidden is None:
        return {}
    starts_ = np.concatenate([s for s, _ in sparse_lists])
    ends = np.concatenate([e for _, e in sparse_lists])
    counts = ends - starts_
    a_width = int(counts.max(initial=1))
    valid = np.arange(a_width)[None, :] < counts[:, None]
    # each list's ids, gathered from its trace's flat id array into the padded table
    sources = np.concatenate([np.full(len(s), j) for j, (s, _) in enumerate(sparse_lists)]).astype(np.int64)
    offsets = np.cumsum([0] + [len(t.ids) for t in traces])
    all_ids = np.concatenate([t.ids for t in traces]).astype(np.int64)
    gather = (offsets[sources] + starts_)[:, None] + np.arange(a_width)[None, :]
    table = np.where(valid, all_ids[np.where(valid, gather, 0)] if all_ids.size else 0, 0)
    return {"sparse_index": torch.as_tensor(np.concatenate(sparse_pos), dtype=torch.long),
            "sparse_ids": torch.as_tensor(table, dtype=torch.long), "sparse_valid": torch.as_tensor(valid),
            "free_index": torch.as_tensor(np.concatenate(free_pos), dtype=torch.long),
            "forbidden": torch.as_tensor(forbidden, dtype=torch.long)}


def _constrained(lp: torch.Tensor, flat: torch.Tensor, targets: torch.Tensor, batch: dict[str, torch.Tensor],
                 row_of) -> torch.Tensor:
    """Replace the full-vocabulary log-probs ``lp`` (rows of ``flat`` logits) by the constrained
    ones at the positions of the batch's constraint tables; ``row_of`` maps a flat position index
    to its row of ``flat``."""
    if "sparse_index" not in batch:
        return lp
    s_idx = row_of(batch["sparse_index"])
    if s_idx.numel():
        gathered = flat[s_idx[:, None], batch["sparse_ids"]].masked_fill(~batch["sparse_valid"], float("-inf"))
        chosen = flat[s_idx, targets[s_idx]]
        lp = lp.index_put((s_idx,), chosen - torch.logsumexp(gathered, dim=-1))
    f_idx = row_of(batch["free_index"])
    if f_idx.numel():
        rows = flat.index_select(0, f_idx)
        if batch["forbidden"].numel():
            rows = rows.index_fill(1, batch["forbidden"], float("-inf"))
        free_lp = rows.gather(1, targets[f_idx][:, None]).squeeze(1) - torch.logsumexp(rows, dim=-1)
        lp = lp.index_put((f_idx,), free_lp)
    return lp


def token_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log p(x_{t+1} | x_{<=t}) at every completion position (0 elsewhere), (N, T-1), float32, on a
    :func:`pack_rollouts` batch (:func:`group_token_logprobs` is the shared-prompt form).

    ``p`` is the sampling distribution: the model's softmax at ``temperature``, restricted to the
    constraint the token was drawn under when the batch carries one (see :func:`_constraint_tables`):
    a log-softmax over the gathered logits of the allowed ids (a forced token gets exactly 0), over
    the vocabulary minus ``forbidden`` for free reasoning, over the whole vocabulary otherwise.
    Logits are computed only from the first completion position on (``logits_to_keep``)."""
    if "prompt_of" in batch:
        return group_token_logprobs(model, batch, temperature)
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
    flat = logits.reshape(-1, logits.shape[-1])  # row (i, t - start) of the kept window
    targets = input_ids[:, start + 1:].reshape(-1)
    lp = -F.cross_entropy(flat, targets, reduction="none")

    def row_of(index: torch.Tensor) -> torch.Tensor:  # flat (N, T-1) position -> row of ``flat``
        return (index // t1) * width + (index % t1 - start)

    lp = _constrained(lp, flat, targets, batch, row_of)
    out = torch.cat([lp.new_zeros((n, start)), lp.view(n, width)], dim=1)
    return torch.where(mask > 0, out, torch.zeros_like(out))


def group_token_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """:func:`token_logprobs` on a :func:`pack_groups` batch: (N, C), the log-prob of each
    completion token (0 at padding), with every distinct prompt encoded once.

    The B prompts run in one forward pass that keeps their keys and values (with autograd); the
    cache is expanded to the N completions (``index_select``, so each prompt position receives the
    sum of its completions' gradients) and the completions run in a second pass attending to it.
    The prompt's last logits predict every completion's first token. The same numbers as the
    per-rollout layout up to float rounding (tests/test_dapo_shared.py checks the gradients)."""
    from gr2.decoding._model import cache_kwarg, cache_of, expand_cache

    prompt_mask, completion_ids, mask = batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
    prompt_of = batch["prompt_of"]
    n, width = mask.shape
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=batch["prompt_ids"], attention_mask=prompt_mask, position_ids=positions,
                use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float().index_select(0, prompt_of)  # (N, V): predicts completion token 0
    logits = [first[:, None]]
    if width > 1:
        try:
            cache = expand_cache(cache_of(out), prompt_of)
        except InvalidInputError:
            raise ConfigError(f"rl.share_prompt = true needs a model that returns its KV cache (use_cache=True); "
                              f"{type(model).__name__} returned none: set rl.share_prompt = false") from None
        inputs = completion_ids[:, :-1]  # the last token predicts nothing
        attention = torch.cat([prompt_mask.index_select(0, prompt_of), mask[:, :-1].long()], dim=1)
        after = prompt_mask.sum(-1).index_select(0, prompt_of)[:, None] + torch.arange(width - 1, device=mask.device)
        rest = model(input_ids=inputs, attention_mask=attention, position_ids=after, use_cache=True,
                     **{cache_kwarg(model): cache}).logits
        logits.append(rest.float())
    logits = torch.cat(logits, dim=1)
    if temperature != 1.0:
        logits = logits / temperature
    flat = logits.reshape(n * width, -1)
    targets = completion_ids.reshape(-1)
    lp = -F.cross_entropy(flat, targets, reduction="none")
    lp = _constrained(lp, flat, targets, batch, lambda index: index)
    return torch.where(mask > 0, lp.view(n, width), torch.zeros_like(mask))


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
