"""Codes for a trained RQ-VAE: assignment (Rust argmin encoder, then the random last level), the
reconstruction error of assigned codes, and the ``codebooks.safetensors`` file the sid stage
(:mod:`gr2.pipeline.sid`) writes and ``gr2 encode`` / ``gr2 sid --update`` read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_save

import gr2
from gr2.config import from_dict
from gr2.errors import DataError
from gr2.rundir import atomic_write_bytes
from gr2.sid.rqvae import RQVAEConfig, codebooks_array, encode_latent, random_last_level, reconstruction_error


def assign_codes(model, embeddings: np.ndarray, config: RQVAEConfig, assign_seed: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """(argmin codes, assigned codes, gr2.RQCodebooks): the Rust encoder on the latents, then the
    random last level when configured."""
    codebooks = gr2.RQCodebooks(codebooks_array(model))
    latent = encode_latent(model, embeddings)
    argmin_codes = codebooks.encode(latent)
    assigned = random_last_level(argmin_codes, config.codebook_size, assign_seed) if config.random_last_level else argmin_codes
    return argmin_codes, assigned, codebooks


def reconstruction_of(model, embeddings: np.ndarray, codebooks, codes: np.ndarray) -> dict[str, float]:
    """The RQ-VAE's reconstruction error of ``embeddings`` when decoded from ``codes`` (not the argmin ones)."""
    return reconstruction_error(model, embeddings, codebooks.decode(np.ascontiguousarray(codes)))


def save_rqvae_file(path: Path, model, config: RQVAEConfig, assign_seed: int) -> None:
    """Write the codebooks, the encoder/decoder weights and the config as ``codebooks.safetensors``
    (format ``gr2-rqvae-1``, read back by :func:`load_rqvae_file`), atomically."""
    tensors = {"codebooks": torch.from_numpy(codebooks_array(model))}
    for name, value in model.state_dict().items():
        if not name.startswith("quantizer."):
            tensors[name] = value.detach().contiguous()
    metadata = {
        "format": "gr2-rqvae-1",
        "rqvae_config": json.dumps(dataclasses.asdict(config), sort_keys=True),
        "assign_seed": str(assign_seed),
    }
    atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))


def load_rqvae_file(path: str | Path) -> tuple[Any, RQVAEConfig, int, np.ndarray]:
    """(model, RQVAEConfig, assign_seed, codebooks) from a ``codebooks.safetensors`` file that
    :func:`save_rqvae_file` wrote (the sid stage's, or one copied out of a run): enough to encode new
    items exactly as the stage did."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from gr2.sid.rqvae import RQVAE

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path} is not a readable safetensors file: {e}") from e
    if metadata.get("format") != "gr2-rqvae-1":
        raise DataError(f"{path} is not a gr2 RQ-VAE file (format {metadata.get('format')!r})")
    config = from_dict(RQVAEConfig, json.loads(metadata["rqvae_config"]), where="rqvae_config")
    tensors = load_file(str(path))
    model = RQVAE(int(tensors["input_mean"].shape[0]), config)
    model.load_state_dict({k: v for k, v in tensors.items() if k != "codebooks"}, strict=False)
    model.eval()
    return model, config, int(metadata.get("assign_seed", 0)), tensors["codebooks"].numpy()
