"""Stage 2, reasoning SFT: the trace examples, their loss, the held-out NLL and the one SFT step.

The ``sft`` stage that trains with them over a run directory is :mod:`gr2.pipeline.sft`.

Loss (per token, assistant turn only; the prompt has weight 0):

    loss = sum_t w_t * NLL_t / #supervised tokens,
    w_t = lambda_reasoning for tokens of <think>...</think>,
          lambda_answer    for tokens of <answer>...</answer> and the end-of-turn token,

with lambda_reasoning < lambda_answer by default: the ranking is what is rewarded later, the
reasoning is style to imitate. A share of the kept traces (split by user) is held out; the report
gives their answer-token NLL under the mid-trained model (before) and the SFT model (after).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from gr2.errors import ConfigError, DataError
from gr2.rewards import parse_completion
from gr2.train.batches import WeightedExample, chat_example, collate, end_of_turn_ids, to_device
from gr2.train.losses import DataParallel, check_loss, token_nll
from gr2.train.optim import LoraSettings

STAGE = "sft"


LOSS_TOKENS = ("all", "decisions")


@dataclass
class SftConfig:
    # settings that do not change the weights a step produces: a run resumes its checkpoints across them
    NOT_IN_CHECKPOINT_KEY: ClassVar[tuple[str, ...]] = ("checkpoint_every", "keep_checkpoints", "log_every",
                                                       "eval_batch_size")

    lambda_reasoning: float = 0.5
    lambda_answer: float = 1.0
    epochs: int = 3
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10
    packing: bool = False
    max_length: int = 2048
    heldout_fraction: float = 0.1
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 5
    eval_batch_size: int = 8
    # which completion tokens carry loss: "all", or "decisions": only those where constrained
    # decoding has a choice (free reasoning, </think>, each SID level that tells the remaining
    # candidates apart), none of those the rerank automaton forces (tags, delimiters, a level fixed
    # by the code before it). Serving never samples a forced token, so their loss only competes with
    # the decisions for the model's capacity; see benches/README.md "SFT on decision tokens".
    loss_tokens: str = "all"

    def __post_init__(self) -> None:
        if self.lambda_reasoning < 0 or self.lambda_answer <= 0:
            raise ConfigError("sft.lambda_reasoning must be >= 0 and sft.lambda_answer > 0")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"sft.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.loss_tokens not in LOSS_TOKENS:
            raise ConfigError(f"sft.loss_tokens must be one of {LOSS_TOKENS}, got {self.loss_tokens!r}")
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sft.{name} must be > 0, got {getattr(self, name)}")


def split_completion(completion: str, reasoning: bool = True) -> tuple[str, str]:
    """(reasoning part, answer part) of a trace, with ``reasoning + answer == completion``, cut where
    :func:`gr2.verify_rewards`' parser (:func:`gr2.rewards.parse_completion`, the one grammar) ends
    the think block: the reasoning part runs to the ``</think>`` right before the answer (a
    ``</think>`` inside the reasoning is reasoning), the answer part is the rest. A trace without a
    think block has reasoning part ""; the answer-only arm (``reasoning=False``) rejects a think
    block. A completion the verifier calls malformed raises DataError."""
    parts = parse_completion(completion)
    if parts is None:
        raise DataError(f"trace completion is not <think>...</think><answer>...</answer> as gr2.verify_rewards "
                        f"parses it: {completion[:80]!r}")
    if parts.think is None:
        return "", completion
    if not reasoning:
        raise DataError(f"answer-only trace has a <think> block: {completion[:80]!r}")
    cut = parts.think[1]
    return completion[:cut], completion[cut:]


def trace_example(tokenizer: Any, record: dict[str, Any], lambda_r: float, lambda_o: float,
                  max_length: int) -> WeightedExample:
    reasoning, answer = split_completion(record["completion"], record.get("reasoning", True))
    parts = [(reasoning, lambda_r), (answer, lambda_o)] if reasoning else [(answer, lambda_o)]
    return chat_example(tokenizer, record["messages"], parts, max_length)


def keep_decisions(tokenizer: Any, records: list[dict[str, Any]], examples: list[WeightedExample],
                   index: Any, sid_tokens: Any) -> list[WeightedExample]:
    """``examples`` (of ``records``, from :func:`trace_example`) with a loss weight of 0 on every
    completion token the rerank automaton forces and on the end-of-turn token, which constrained
    decoding emits with probability 1. The completions are replayed through the Rust automaton
    (:func:`gr2.decoding.constraint_trace`, the one grammar), with a reasoning budget no trace
    reaches so only the tokens' own constraints decide."""
    from gr2.decoding import constraint_trace

    eot = len(end_of_turn_ids(tokenizer))
    completions = []
    for record, ex in zip(records, examples):
        prompt = tokenizer.apply_chat_template(record["messages"], tokenize=False, add_generation_prompt=True)
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        completions.append(ex.input_ids[start:len(ex.input_ids) - eot])
    out = [list(ex.weights) for ex in examples]
    for reasoning in (True, False):  # one automaton batch per arm of the traces
        rows = [i for i, r in enumerate(records) if bool(r.get("reasoning", True)) == reasoning]
        if not rows:
            continue
        budget = max(len(completions[i]) for i in rows) + 1
        traces = constraint_trace(tokenizer, [records[i]["candidates"] for i in rows], [completions[i] for i in rows],
                                  len(tokenizer), index=index, sid_tokens=sid_tokens, max_reasoning_tokens=budget,
                                  reasoning=reasoning)
        for i, trace in zip(rows, traces):
            forced = ~trace.free & (np.diff(trace.offsets) == 1)
            start = len(examples[i].input_ids) - eot - len(completions[i])
            for t in np.nonzero(forced)[0]:
                out[i][start + int(t)] = 0.0
            out[i][len(out[i]) - eot:] = [0.0] * eot
    return [WeightedExample(ex.input_ids, w) for ex, w in zip(examples, out)]


def split_heldout(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out whole users (a user's traces never straddle the split)."""
    users = sorted({r["user_idx"] for r in records})
    rng = np.random.default_rng(seed)
    n_held = max(1, int(round(len(users) * fraction)))
    held = set(rng.choice(users, size=n_held, replace=False).tolist())
    train = [r for r in records if r["user_idx"] not in held]
    heldout = [r for r in records if r["user_idx"] in held]
    if not train:
        raise DataError("every kept trace was held out; lower sft.heldout_fraction or keep more traces")
    return train, heldout


@torch.no_grad()
def heldout_nll(model: Any, tokenizer: Any, records: list[dict[str, Any]], config: SftConfig,
                device: torch.device) -> dict[str, float]:
    """Mean NLL per token of the answer part and of the reasoning part of held-out traces."""
    model.eval()
    sums = {"answer": 0.0, "reasoning": 0.0}
    counts = {"answer": 0, "reasoning": 0}
    for part, (lr_, lo_) in (("answer", (0.0, 1.0)), ("reasoning", (1.0, 0.0))):
        examples = [trace_example(tokenizer, r, lr_, lo_, config.max_length) for r in records]
        for start in range(0, len(examples), config.eval_batch_size):
            batch = to_device(collate(examples[start:start + config.eval_batch_size],
                                                    tokenizer.pad_token_id), device)
            nll = token_nll(model, batch)
            sums[part] += float((nll * batch["loss_weights"]).sum())
            counts[part] += int((batch["loss_weights"] > 0).sum())
    model.train()
    return {f"{part}_nll": sums[part] / counts[part] for part in sums if counts[part]}


def sft_step(parallel: DataParallel, optimizer: torch.optim.Optimizer, scheduler: Any,
             rows: list[WeightedExample], *, step: int, lr: float) -> tuple[float, int]:
    """One SFT update on the global batch ``rows``: the weighted NLL's backward pass
    (:class:`gr2.train.losses.DataParallel`), a stop on a non-finite loss, gradient clipping at
    norm 1 (the error names ``lr``, the configured rate), the optimizer step and the ``scheduler``
    step (None: constant lr). Returns the batch's
    loss and supervised-token count. The one SFT step: the stage and
    :func:`gr2.synthetic.sft_train` both train with it."""
    loss, tokens = parallel.backward(rows)
    check_loss(loss, step, STAGE, lr)
    torch.nn.utils.clip_grad_norm_(parallel.model.parameters(), 1.0)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, tokens
