"""Stage inputs: the prompts of ``prompts/<split>`` as :class:`RlData`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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


def load_rl_data(run_dir: Path, split: str, tokenizer: Any, index: Any, config: DapoConfig, limit: int = 0) -> RlData:
    """Prompts of ``prompts/<split>`` (lists that contain their target), rendered with the run's
    :class:`gr2.prompts.PromptConfig` exactly as SFT traces and ``gr2 rerank`` render them."""
    from gr2.prompts import load_prompt_config, load_requests
    from gr2.prompts import ItemCatalog, request_messages

    table = load_requests(run_dir, split)
    prompt_config = load_prompt_config(run_dir)
    catalog = ItemCatalog.from_run_dir(run_dir)
    cands = [np.asarray(c, dtype=np.int64) for c in table["candidates"]]
    k = len(cands[0]) if cands else 0
    if any(len(c) != k for c in cands):
        raise DataError(f"prompts/{split}: rows have different candidate counts")
    if config.k and k != config.k:
        raise ConfigError(f"rl.k = {config.k} but prompts/{split} has K = {k} candidates per row")
    targets = np.asarray(table["target"], dtype=np.int64)
    keep = [i for i in range(len(cands)) if targets[i] in cands[i]]
    dropped = len(cands) - len(keep)
    if limit:
        keep = keep[:limit]
    if not keep:
        raise DataError(f"prompts/{split}: no row has its target among the candidates")
    texts, ids = [], []
    for i in tqdm(keep, desc=f"rl prompts ({split})", leave=False):
        prompt = request_messages(table[i], prompt_config, catalog, index, reasoning=config.reasoning, tokenizer=tokenizer)
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        texts.append(text)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return RlData(texts, ids, np.stack([cands[i] for i in keep]).astype(np.uint64), targets[keep].astype(np.uint64), dropped)
