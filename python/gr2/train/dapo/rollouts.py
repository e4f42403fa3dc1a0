"""Rollouts: the :class:`Rollout` records the loss is computed on and the two rollout functions
(the seam: any function with the :data:`RolloutFn` signature can replace constrained decoding).

Each prompt gets the seed ``hash_seed(seed, step, prompt position)``. Constrained rollouts
(:func:`constrained_rollouts`) give every prompt its own generator (the decoder's per-prompt
seeds), so a prompt's rollouts do not depend on which process or batch draws it, up to float noise
of the batched, left-padded forward pass (a token flips only if a probability moves across a
random draw; tests check equality on the tiny model). Plain sampling (:func:`sampled_rollouts`,
``rl.constrained = false``) draws from one global generator seeded from the seeds of the whole
call, so its rollouts depend on the batch composition (``rollout_batch``, world size). Either way
the composition is a pure function of (config, step, cursor, rank), so resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from gr2.decoding.decode import AllowedTrace
from gr2.train.dapo.config import DapoConfig


@dataclass
class Completion:
    """A rollout function's completion: token ids (EOS included when the model stopped) and, for a
    constrained sampler, the allowed ids behind each token (None: sampled from the full vocabulary)."""

    ids: list[int]
    allowed: AllowedTrace | None = None


@dataclass
class Rollout:
    """One sampled completion of one prompt, with its reward and (after grouping) advantage.
    ``allowed`` is the constraint it was sampled under (None: the full vocabulary); the policy
    log-probabilities of its tokens are taken under that same constraint."""

    prompt_ids: list[int]
    completion_ids: list[int]  # the generated tokens the loss is computed on (EOS included)
    reward: float = 0.0
    advantage: float = 0.0
    allowed: AllowedTrace | None = None


#: rollout_fn(model, tokenizer, prompt_texts (B), candidates (B, K) uint64, n, seeds (B), config, ctx)
#:   -> B lists of n completions, prompt by prompt; a completion is a token-id list (EOS included when
#:      the model stopped; scored under the full vocabulary) or a :class:`Completion` carrying the
#:      constraint it was sampled under. ``seeds[i]`` is prompt i's seed (see DapoTrainer.collect).
RolloutFn = Callable[[Any, Any, Sequence[str], np.ndarray, int, Sequence[int], DapoConfig, dict], list[list[Any]]]


def _vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def constrained_rollouts(model, tokenizer, prompt_texts, candidates, n, seeds, config, ctx) -> list[list[Completion]]:
    """G sampled completions per prompt through one ``gr2.constrained_decode`` call over all B
    prompts (always valid permutations), each prompt sampling from its own seeded generator; each
    completion carries the allowed ids behind its tokens (:func:`gr2.decoding.constraint_trace`),
    so the loss scores the distribution the tokens were drawn from."""
    from gr2 import constrained_decode
    from gr2.decoding import constraint_trace

    cands = np.asarray(candidates, dtype=np.uint64).reshape(len(prompt_texts), -1)
    results = constrained_decode(
        model, tokenizer, list(prompt_texts), cands, index=ctx["index"],
        sid_tokens=ctx["sid_tokens"], max_reasoning_tokens=config.max_reasoning_tokens, reasoning=config.reasoning,
        do_sample=True, temperature=config.temperature, top_p=config.top_p, num_return_sequences=n,
        seed=[int(x) for x in seeds], eos_token_id=ctx["eos_id"], jump_forward=config.jump_forward,
    )
    ids = [list(r.completion_ids) + [ctx["eos_id"]] for r in results]
    rows = np.repeat(np.arange(len(prompt_texts)), n)
    traces = constraint_trace(tokenizer, cands[rows], ids, _vocab_size(model), index=ctx["index"],
                              sid_tokens=ctx["sid_tokens"], max_reasoning_tokens=config.max_reasoning_tokens,
                              reasoning=config.reasoning, eos_token_id=ctx["eos_id"])
    done = [Completion(c, t) for c, t in zip(ids, traces)]
    return [done[i * n:(i + 1) * n] for i in range(len(prompt_texts))]


def sampled_rollouts(model, tokenizer, prompt_texts, candidates, n, seeds, config, ctx, greedy: bool = False) -> list[list[list[int]]]:
    """G completions per prompt by plain sampling (one left-padded ``generate`` call over all B
    prompts): outputs may be invalid, so the format reward matters -- the setting in which the paper
    observed the order-copy hack. ``greedy`` for evaluation. ``generate`` draws from one global
    generator, so the samples are a function of the seeds of the whole batch (torch is seeded with
    the one seed of a single prompt, with a hash of all of them otherwise)."""
    stop = list(ctx.get("stop_ids", [ctx["eos_id"]]))  # eos and the end-of-turn token
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), ctx["pad_id"], dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):  # left padding: generation continues every row at the right edge
        ids[i, width - len(e):] = torch.as_tensor(e)
        attention[i, width - len(e):] = 1
    ids, attention = ids.to(ctx["device"]), attention.to(ctx["device"])
    seeds = [int(x) for x in seeds]
    torch.manual_seed(seeds[0] if len(seeds) == 1 else hash_seed(*seeds))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sampling = {} if greedy else {"temperature": config.temperature, "top_p": config.top_p, "top_k": 0}
            out = model.generate(ids, attention_mask=attention, do_sample=not greedy, **sampling,
                                 max_new_tokens=config.max_new_tokens, num_return_sequences=n,
                                 pad_token_id=ctx["pad_id"], eos_token_id=stop)
    finally:
        model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop), None)
        completions.append(row if end is None else row[:end + 1])
    return [completions[i * n:(i + 1) * n] for i in range(len(encoded))]


def hash_seed(*parts: int) -> int:
    """A 31-bit seed from integers (stable across processes, unlike Python's hash)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)
