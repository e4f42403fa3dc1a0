"""The RL prompts as :class:`RlData` (the ``rl`` stage reads them from ``prompts/<split>``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gr2.errors import ConfigError, DataError
from gr2.train.dapo.config import DapoConfig


@dataclass
class RlData:
    """Prompts (templated text and token ids), candidates in upstream order, targets."""

    prompt_texts: list[str]
    prompt_ids: list[list[int]]
    candidates: np.ndarray  # uint64 (n, K)
    targets: np.ndarray  # uint64 (n,)
    dropped_no_target: int = 0


def rl_data(table: Any, prompt_config: Any, catalog: Any, index: Any, tokenizer: Any, config: DapoConfig, *,
            limit: int = 0, name: str = "prompts") -> RlData:
    """The RL prompts of a requests table (``history``, ``candidates`` in upstream order, ``target``,
    ``evidence``; the ``prompts`` stage's datasets), keeping the lists that contain their target and
    rendering each with :func:`gr2.prompts.request_messages` under ``prompt_config`` -- exactly as
    SFT traces and ``gr2 rerank`` render them. ``name`` labels the table in errors."""
    from gr2.prompts import request_messages

    cands = [np.asarray(c, dtype=np.int64) for c in table["candidates"]]
    k = len(cands[0]) if cands else 0
    if any(len(c) != k for c in cands):
        raise DataError(f"{name}: rows have different candidate counts")
    if config.k and k != config.k:
        raise ConfigError(f"rl.k = {config.k} but {name} has K = {k} candidates per row")
    targets = np.asarray(table["target"], dtype=np.int64)
    keep = [i for i in range(len(cands)) if targets[i] in cands[i]]
    dropped = len(cands) - len(keep)
    if limit:
        keep = keep[:limit]
    if not keep:
        raise DataError(f"{name}: no row has its target among the candidates")
    texts, ids = [], []
    for i in tqdm(keep, desc=f"rl prompts ({name})", leave=False):
        prompt = request_messages(table[i], prompt_config, catalog, index, reasoning=config.reasoning, tokenizer=tokenizer)
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        texts.append(text)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return RlData(texts, ids, np.stack([cands[i] for i in keep]).astype(np.uint64), targets[keep].astype(np.uint64), dropped)
