"""Semantic IDs: RQ-VAE training (rqvae.py) and the ``sid`` stage (stage.py)."""

from gr2.sid.rqvae import RQVAE, RQVAEConfig, train_rqvae, uniqueness
from gr2.sid.stage import SidConfig, encode_items, load_index, run_ablation, run_sid, update_index

__all__ = ["RQVAE", "RQVAEConfig", "train_rqvae", "uniqueness", "SidConfig", "load_index", "run_ablation", "run_sid", "update_index", "encode_items"]
