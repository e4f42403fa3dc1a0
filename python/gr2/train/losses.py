"""The token-weighted NLL of the SFT-style recipes (:func:`weighted_nll` and its selected-logits
variant), its backward pass in one process or over torchrun ranks (:class:`DataParallel`), and the
checks that stop a diverged run before anything is committed."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from gr2.errors import InvalidInputError, TrainingError
from gr2.train.batches import WeightedExample, collate, to_device
from gr2.train.devices import autocast
from gr2.train.distributed import World


def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token NLL (B, T) of each token given its prefix; position 0 (no prefix) is 0."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none").view(targets.shape)
    return torch.nn.functional.pad(nll, (1, 0))


def summed_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(sum_t w_t * NLL_t, number of tokens with w_t > 0)`` of a batch; 0 counted tokens is allowed."""
    weights = batch["loss_weights"]
    nll = token_nll(model, batch)
    return (nll * weights).sum(), int((weights > 0).sum())


def summed_nll_selected(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """:func:`summed_nll` computing the output projection only where a token is supervised (see
    :func:`weighted_nll_selected`)."""
    weights = batch["loss_weights"][:, 1:]
    mask = weights > 0
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()
    nll = torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:][mask], reduction="none")
    return (nll * weights[mask]).sum(), int(mask.sum())


def _mean(total: torch.Tensor, counted: int) -> tuple[torch.Tensor, int]:
    if counted == 0:
        raise InvalidInputError("batch has no supervised tokens (all loss weights are 0)")
    return total / counted, counted


def weighted_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Loss = sum_t w_t * NLL_t / (number of tokens with w_t > 0). Returns (loss, counted tokens).

    Normalising by the count of supervised tokens (not by the weight sum) keeps the weights'
    meaning: with lambda_r = 0.5, a reasoning token counts half as much as an answer token.
    """
    if not bool((batch["loss_weights"] > 0).any()):
        raise InvalidInputError("batch has no supervised tokens (all loss weights are 0)")
    return _mean(*summed_nll(model, batch))


def weighted_nll_selected(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """:func:`weighted_nll` computing the output projection only where a token is supervised.

    The decoder runs on every token, but the vocabulary logits (and their softmax) are formed
    for the supervised positions alone, which saves a large share of a small model's compute
    when most tokens are context. Same value as :func:`weighted_nll` (up to float rounding),
    except that a weight on position 0 (no prefix to predict it from) is not counted. Needs an
    HF causal LM with ``get_decoder()`` and ``get_output_embeddings()`` and no logit scaling.
    """
    if not bool((batch["loss_weights"][:, 1:] > 0).any()):
        raise InvalidInputError("batch has no supervised tokens (all loss weights are 0)")
    return _mean(*summed_nll_selected(model, batch))


class SummedNll(torch.nn.Module):
    """A causal LM and its summed token-weighted NLL in one ``forward``: the module
    :class:`DataParallel` hands to DDP, so the gradient sync covers the whole loss (also the
    selected-logits path, which calls the decoder and the output layer directly)."""

    def __init__(self, model: torch.nn.Module, selected: bool = False) -> None:
        super().__init__()
        self.model, self.selected = model, selected

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_weights: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_weights": loss_weights}
        return (summed_nll_selected if self.selected else summed_nll)(self.model, batch)


class DataParallel:
    """The loss and backward pass of one global batch, in one process or split over torchrun ranks.

    Every rank builds the same global batch (a pure function of seed and step) and takes its rows
    ``rank::size``; the model runs under ``DistributedDataParallel`` (``device_ids=[LOCAL_RANK]`` on
    CUDA), which averages the gradients over the ranks. Each rank scales its *summed* weighted NLL
    by ``size / T``, where ``T`` is the batch's supervised-token count summed over the ranks (one
    all-reduce), so the averaged gradient is exactly the one-process gradient of
    ``sum_t w_t NLL_t / T`` over the whole batch, and gradient clipping sees the same gradient.
    Global batch size and data order do not depend on the number of processes. A rank left
    without a row (fewer rows than ranks) runs one zero-weight row so it still joins DDP's
    collectives. ``selected``: logits only at supervised positions (:func:`summed_nll_selected`).
    """

    def __init__(self, model: torch.nn.Module, world: World, device: torch.device, dtype: torch.dtype,
                 pad_id: int, *, selected: bool = False) -> None:
        self.world, self.device, self.dtype, self.pad_id = world, device, dtype, pad_id
        self.model = model
        module: torch.nn.Module = SummedNll(model, selected)
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        self.module = module

    def backward(self, rows: Sequence[WeightedExample]) -> tuple[float, int]:
        """Forward and backward of this rank's share of the global batch ``rows``; returns the
        batch's loss (the global weighted mean) and its supervised-token count, the same on every rank."""
        if not rows:
            raise InvalidInputError("empty batch")
        mine = list(rows[self.world.rank::self.world.size])
        if not mine:
            mine = [WeightedExample(rows[0].input_ids, [0.0] * len(rows[0].input_ids))]
        batch = to_device(collate(mine, self.pad_id), self.device)
        with autocast(self.device, self.dtype):
            total, counted = self.module(**batch)
        loss_sum, tokens = self.world.all_sums(float(total.detach()), counted)
        if tokens == 0:
            raise InvalidInputError("batch has no supervised tokens (all loss weights are 0)")
        (total / tokens * self.world.size).backward()
        return loss_sum / tokens, int(tokens)


def check_loss(loss: float, step: int, stage: str, lr: float) -> None:
    """Stop a stage whose loss went non-finite (the weights are lost from there on) with an error
    that names the setting to change, before anything is committed."""
    if not math.isfinite(loss):
        raise TrainingError(f"{stage} diverged: the loss is {loss} at step {step}; the weights are no longer "
                            f"usable and nothing was committed. Lower {stage}.lr (now {lr:g}) and rerun")


def check_finite_weights(model: torch.nn.Module, stage: str) -> None:
    """Refuse to commit a model holding a NaN or infinite weight."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise TrainingError(f"{stage}: weight {name} holds non-finite values after training; nothing was "
                                f"committed. Lower {stage}.lr and rerun")
