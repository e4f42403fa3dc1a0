"""Semantic IDs: RQ-VAE training (rqvae.py), code assignment and the saved RQ-VAE file (assign.py).

The ``sid`` stage that builds a run's index (and ``gr2 sid --update`` / ``--ablation``) is
:mod:`gr2.pipeline.sid`.
"""

from gr2.sid.assign import assign_codes, load_rqvae_file, save_rqvae_file
from gr2.sid.rqvae import RQVAE, RQVAEConfig, train_rqvae, uniqueness

__all__ = ["RQVAE", "RQVAEConfig", "train_rqvae", "uniqueness", "assign_codes", "load_rqvae_file", "save_rqvae_file"]
