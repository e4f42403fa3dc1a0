"""Argument checks shared by the public functions: each returns the value in its plain Python type
or raises :class:`gr2.InvalidInputError` naming the argument, so a wrong type never surfaces as a
``TypeError`` from deep inside numpy, torch or the Rust core."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gr2.errors import InvalidInputError


def whole(name: str, value: Any, lo: int = 0, hi: int | None = None) -> int:
    """An int in ``lo..hi`` (bools and floats refused: 2.5 is not silently 2)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < lo or (hi is not None and value > hi):
        bound = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise InvalidInputError(f"{name} must be an int {bound}, got {value!r:.60}")
    return int(value)


def finite(name: str, value: Any) -> float:
    """A finite real number (an int beyond float's range is refused, not an OverflowError)."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    try:
        if number and math.isfinite(float(value)):
            return float(value)
    except OverflowError:
        pass
    raise InvalidInputError(f"{name} must be a finite number, got {value!r:.60}")


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidInputError(f"{name} must be True or False, got {value!r:.60}")
    return bool(value)


def tokenizer(value: Any) -> Any:
    """A transformers tokenizer (anything with ``get_vocab`` and ``eos_token_id``)."""
    if not (callable(getattr(value, "get_vocab", None)) and hasattr(value, "eos_token_id")):
        raise InvalidInputError(f"tokenizer must be a transformers tokenizer (AutoTokenizer.from_pretrained), "
                                f"got {type(value).__name__}")
    return value


def causal_lm(value: Any) -> Any:
    """A transformers causal LM (a torch module with an output embedding)."""
    import torch

    if not (isinstance(value, torch.nn.Module) and callable(getattr(value, "get_output_embeddings", None))):
        raise InvalidInputError(f"model must be a transformers causal LM (AutoModelForCausalLM.from_pretrained), "
                                f"got {type(value).__name__}")
    return value


def has_methods(name: str, value: Any, methods: tuple[str, ...], hint: str) -> Any:
    """An object offering ``methods`` (a gr2.SidIndex, or a stand-in with the same methods)."""
    if not all(callable(getattr(value, m, None)) for m in methods):
        raise InvalidInputError(f"{name} must be {hint}, got {type(value).__name__}")
    return value
