"""Training examples and batches: :class:`WeightedExample` (token ids with a per-token loss weight,
so a recipe says which tokens count: assistant-only masking, reasoning vs answer weights), chat
examples, packing, :func:`collate`, and the data order.

Data order for exact resume: recipes draw the order of epoch ``e`` from ``epoch_order(n, seed, e)``
(a pure function of seed and epoch), so the batch at step ``s`` is the same in a resumed run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from gr2.errors import InvalidInputError


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of ``epoch``: a pure function, so resumed runs see the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_rows(step: int, n: int, batch_size: int, seed: int) -> tuple[int, np.ndarray]:
    """(epoch, example rows) of the batch at 0-based ``step``: an epoch is ``ceil(n / batch_size)``
    steps over ``epoch_order(n, seed, epoch)``, its last batch short when ``batch_size`` does not
    divide ``n``. The one batch order of SFT (the stage and :func:`gr2.synthetic.sft_train`)."""
    if n < 1 or batch_size < 1:
        raise InvalidInputError(f"need n >= 1 examples and batch_size >= 1, got n={n}, batch_size={batch_size}")
    epoch, offset = divmod(step, -(-n // batch_size))
    return epoch, epoch_order(n, seed, epoch)[offset * batch_size:(offset + 1) * batch_size]


@dataclass
class WeightedExample:
    """Token ids and one loss weight per token: ``weights[t]`` scales the NLL of predicting
    ``input_ids[t]`` from the tokens before it (0 = context only, e.g. the prompt)."""

    input_ids: list[int]
    weights: list[float]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.weights):
            raise InvalidInputError(f"{len(self.input_ids)} token ids but {len(self.weights)} weights")
        if not self.input_ids:
            raise InvalidInputError("empty training example")


def build_example(segments: Iterable[tuple[Sequence[int], float]]) -> WeightedExample:
    """Concatenate ``(token_ids, weight)`` segments into one example."""
    ids: list[int] = []
    weights: list[float] = []
    for token_ids, weight in segments:
        ids.extend(int(t) for t in token_ids)
        weights.extend([float(weight)] * len(token_ids))
    return WeightedExample(ids, weights)


def chat_example(tokenizer: Any, messages: list[dict[str, str]],
                 completion_segments: Sequence[tuple[str, float]], max_length: int | None = None) -> WeightedExample:
    """An assistant-only example: the chat-templated prompt (weight 0) then the assistant's reply,
    given as ``(text, weight)`` segments, then the end-of-turn token(s) with the last weight.

    Raises InvalidInputError when the example exceeds ``max_length`` (never truncates silently).
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    segments: list[tuple[list[int], float]] = [(tokenizer(prompt, add_special_tokens=False)["input_ids"], 0.0)]
    for text, weight in completion_segments:
        segments.append((tokenizer(text, add_special_tokens=False)["input_ids"], weight))
    segments.append((end_of_turn_ids(tokenizer), completion_segments[-1][1] if completion_segments else 1.0))
    example = build_example(segments)
    if max_length is not None and len(example.input_ids) > max_length:
        raise InvalidInputError(f"example has {len(example.input_ids)} tokens, more than max_length={max_length}; "
                                f"raise max_length or shorten the prompt (history/candidates)")
    return example


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Tokens that close an assistant turn: ``<|im_end|>`` for ChatML tokenizers, else eos."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        return [vocab["<|im_end|>"]]
    if tokenizer.eos_token_id is None:
        raise InvalidInputError("tokenizer has neither <|im_end|> nor an eos token")
    return [int(tokenizer.eos_token_id)]


def pack_examples(examples: Sequence[WeightedExample], max_length: int, separator_id: int) -> list[WeightedExample]:
    """Greedy packing: concatenate consecutive examples (joined by ``separator_id`` with weight 0)
    into rows of at most ``max_length`` tokens. Attention crosses example boundaries inside a row
    (the common "naive packing"); it saves padding when examples are short. No example is split."""
    rows: list[WeightedExample] = []
    ids: list[int] = []
    weights: list[float] = []
    for ex in examples:
        if len(ex.input_ids) > max_length:
            raise InvalidInputError(f"example of {len(ex.input_ids)} tokens exceeds max_length={max_length}")
        extra = len(ex.input_ids) + (1 if ids else 0)
        if ids and len(ids) + extra > max_length:
            rows.append(WeightedExample(ids, weights))
            ids, weights = [], []
        if ids:
            ids.append(separator_id)
            weights.append(0.0)
        ids.extend(ex.input_ids)
        weights.extend(ex.weights)
    if ids:
        rows.append(WeightedExample(ids, weights))
    return rows


def pack_rows(examples: Sequence[WeightedExample], width: int, separator_id: int) -> list[WeightedExample]:
    """First-fit-decreasing packing of ``examples`` into rows of at most ``width`` tokens (joined
    by ``separator_id`` with weight 0, attention crossing example boundaries as in
    :func:`pack_examples`): the longest examples open rows, shorter ones fill the rows' padding.
    Deterministic; no example is split."""
    rows: list[tuple[list[int], list[float]]] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):  # stable: ties keep batch order
        if len(ex.input_ids) > width:
            raise InvalidInputError(f"example of {len(ex.input_ids)} tokens exceeds the row width {width}")
        for ids, weights in rows:
            if len(ids) + 1 + len(ex.input_ids) <= width:
                ids.append(separator_id)
                weights.append(0.0)
                ids.extend(ex.input_ids)
                weights.extend(ex.weights)
                break
        else:
            rows.append((list(ex.input_ids), list(ex.weights)))
    return [WeightedExample(ids, weights) for ids, weights in rows]


def collate(examples: Sequence[WeightedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` (long) and ``loss_weights`` (float32)."""
    if not examples:
        raise InvalidInputError("empty batch")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    weights = torch.zeros((len(examples), width), dtype=torch.float32)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention[row, :n] = 1
        weights[row, :n] = torch.tensor(ex.weights, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_weights": weights}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
