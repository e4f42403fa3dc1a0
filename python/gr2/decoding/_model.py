"""Run a transformers causal LM step by step with a KV cache, and score either the whole vocabulary
or only a few allowed tokens per row.

Inside a SID span a row allows at most K tokens, so instead of the (rows x V) output layer we
gather those rows of the output embedding and take dot products with the final hidden state. That
is only valid when logits are exactly ``lm_head(hidden)``; models that post-process logits
(soft-capping, scaling) fail the check done on the prefill step and fall back to full logits.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from gr2.errors import InvalidInputError


def cache_kwarg(module: Any) -> str:
    """transformers 5 names the KV cache argument ``cache``; 4.x named it ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    import transformers  # a wrapper taking **kwargs: follow the installed transformers' convention

    return "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"


def cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None) if "cache" in output else None
    if cache is None:
        cache = output["past_key_values"] if "past_key_values" in output else None
    if cache is None:
        raise InvalidInputError("the model returned no KV cache; it must support use_cache=True")
    return cache


def expand_cache(cache: Any, rows: torch.Tensor) -> Any:
    """Keep (reorder, repeat) the given batch rows of a KV cache, out of place for the tensors, so
    autograd flows back through it (the shared-prompt loss expands one prompt to its G completions).
    ``rows`` must be on the cache's device."""
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(rows)
        return cache
    return tuple(tuple(t.index_select(0, rows) for t in layer) for layer in cache)  # legacy tuple caches


class StepModel:
    """A causal LM with a KV cache over a batch of left-padded rows."""

    def __init__(self, model: Any, *, sparse: bool | None = None):
        self.model = model
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None or not hasattr(self.lm_head, "weight"):
            raise InvalidInputError(f"{type(model).__name__} has no output embedding (lm_head); is it a causal LM?")
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.model_cache_kw = cache_kwarg(model)
        self.decoder_cache_kw = cache_kwarg(self.decoder) if self.decoder is not None else None
        # None: decided by the check on the prefill step. False forces full logits (tests use it).
        self.sparse = sparse if self.decoder is not None else False
        self.device = self.lm_head.weight.device
        self.cache: Any = None
        self.attention_mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    # -- forward passes ---------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts; returns the last hidden state (rows, H) or, without the sparse path, the
        last logits (rows, V). Decides whether logits are separable as ``lm_head(hidden)``."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        self.cache = cache_of(out)
        self.attention_mask = attention_mask
        self.positions = positions[:, -1]
        logits = out.logits[:, -1].float()
        hidden = out.hidden_states[-1][:, -1]
        if self.sparse is None:
            self.sparse = self._separable(hidden, logits)
        return hidden if self.sparse else logits

    def _separable(self, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
        recomputed = self.lm_head(hidden).float()
        scale = logits.abs().max().clamp(min=1.0)
        return bool(((recomputed - logits).abs().max() <= 1e-3 * scale).item())

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; returns hidden (rows, H) on the sparse path, else logits (rows, V)."""
        assert self.attention_mask is not None and self.positions is not None
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones((self.attention_mask.shape[0], 1))], dim=1
        )
        self.positions = self.positions + 1
        kwargs = dict(
            input_ids=tokens.view(-1, 1),
            attention_mask=self.attention_mask,
            position_ids=self.positions.view(-1, 1),
            use_cache=True,
        )
        if self.sparse:
            out = self.decoder(**kwargs, **{self.decoder_cache_kw: self.cache})
            self.cache = cache_of(out)
            return out.last_hidden_state[:, -1]
        out = self.model(**kwargs, **{self.model_cache_kw: self.cache}, logits_to_keep=1)
        self.cache = cache_of(out)
        return out.logits[:, -1].float()

    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Feed ``lengths[r]`` tokens to row r in one forward pass (``tokens`` (rows, W), right-padded;
        every length >= 1): jump-forward decoding appends a run of forced tokens plus the next chosen
        one at once. Padding positions enter the cache masked out, and each row's positions continue
        from its own last real token, so later steps see exactly the real tokens. Returns the output
        at each row's last real token, as :meth:`step` does."""
        assert self.attention_mask is not None and self.positions is not None
        rows, width = tokens.shape
        if width == 1:
            return self.step(tokens.view(-1))
        tokens, lengths = tokens.to(self.device), lengths.to(self.device)
        offsets = torch.arange(width, device=self.device)[None, :]
        real = offsets < lengths[:, None]
        self.attention_mask = torch.cat([self.attention_mask, real.to(self.attention_mask.dtype)], dim=1)
        positions = self.positions[:, None] + 1 + offsets  # padding gets positions too; it is masked out
        self.positions = self.positions + lengths
        kwargs = dict(input_ids=tokens, attention_mask=self.attention_mask, position_ids=positions, use_cache=True)
        last = (torch.arange(rows, device=self.device), lengths - 1)
        if self.sparse:
            out = self.decoder(**kwargs, **{self.decoder_cache_kw: self.cache})
            self.cache = cache_of(out)
            return out.last_hidden_state[last]
        out = self.model(**kwargs, **{self.model_cache_kw: self.cache}, logits_to_keep=width)
        self.cache = cache_of(out)
        return out.logits[last].float()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (and reorder, repeat) the given batch rows of the cache and bookkeeping."""
        rows = rows.to(self.device)
        self.cache = expand_cache(self.cache, rows)
        assert self.attention_mask is not None and self.positions is not None
        self.attention_mask = self.attention_mask.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)

    # -- scoring ----------------------------------------------------------------------------
    def full_logits(self, out: torch.Tensor) -> torch.Tensor:
        """(rows, V) float32 logits from a step/prefill output."""
        return self.lm_head(out).float() if self.sparse else out

    def sparse_logits(self, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits of ``ids`` (rows, A) only: gathered output-embedding rows dotted with the hidden
        state on the sparse path, a gather from full logits otherwise."""
        if not self.sparse:
            return out.gather(1, ids)
        weight = self.lm_head.weight[ids]  # (rows, A, H)
        logits = torch.einsum("rah,rh->ra", weight, out.to(weight.dtype)).float()
        bias = getattr(self.lm_head, "bias", None)
        if bias is not None:
            logits = logits + bias[ids].float()
        return logits
