"""RQ-VAE: item embedding -> L levels of discrete codes (a semantic ID), in plain PyTorch.

Model: ``x (D_in) --encoder MLP--> z (latent_dim) --residual quantiser (L x K)--> z_q --decoder MLP--> x_hat``.

Residual quantisation: level 0 quantises ``z``; level l quantises what the levels before it left
over, ``r_l = z - sum_{j<l} c_j``; each level picks the nearest of its K codewords (argmin of the
squared distance). The code of an item is the L chosen indices.

Codebook-balancing techniques (each a switch in :class:`RQVAEConfig`; docs/DESIGN.md §1 lists the
paper's measured effect of each on SID uniqueness):

* k-means initialisation: before training, level by level, the codebook is fitted with k-means
  (k-means++ seeding, Lloyd iterations) to the residuals of all items under the initial encoder.
* EMA codebook updates: codewords are not trained by gradient; after each step each codeword moves
  to an exponential moving average of the residuals assigned to it (``ema_decay``), with Laplace
  smoothing of the counts. Without EMA, codewords get the usual VQ codebook loss.
* dead-code reset: every ``dead_code_every`` epochs, codewords no item chose are moved onto the
  residuals of random items (stops ``dead_code_stop`` of the way through so codes can settle).
* diversity loss: per level, ``log K - H(mean_batch softmax(-dist / tau))``, pushing the batch's
  soft code usage toward uniform.
* co-engagement contrastive loss: InfoNCE on normalised latents of item pairs that follow each
  other in a user's *training* sequence (items[:-2]), in-batch negatives.
* random last level: **training** still uses argmin at every level (so the codebooks and the
  decoder learn a normal residual quantiser and the first L-1 levels keep their meaning); at
  **assignment** the last level's code is replaced by one drawn uniformly from 0..K-1 with a seeded
  generator. The last level then carries no semantics: it is a disambiguator that spreads the items
  sharing a (L-1)-prefix over K codes (a birthday problem instead of a near-duplicate collision),
  which trades reconstruction fidelity (reported as ``reconstruction_mse_assigned``) for
  uniqueness. Remaining collisions are closed by ``gr2.SidIndex.build``'s repair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gr2.errors import ConfigError, InvalidInputError


@dataclass
class RQVAEConfig:
    levels: int = 4
    codebook_size: int = 256
    latent_dim: int = 32
    hidden_dims: list[int] = field(default_factory=lambda: [256, 128])
    ema: bool = True
    ema_decay: float = 0.95
    kmeans_init: bool = True
    kmeans_iters: int = 25
    dead_code_reset: bool = False
    dead_code_every: int = 10  # epochs
    dead_code_stop: float = 0.8  # fraction of training after which codes are no longer reset
    diversity_weight: float = 0.0
    diversity_temperature: float = 0.1
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    commitment_beta: float = 0.25
    random_last_level: bool = True
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    standardize_inputs: bool = True  # see RQVAE's docstring; off only to show the collapse it prevents

    def __post_init__(self) -> None:
        from gr2._gr2 import MAX_SID_LEVELS

        if not 1 <= self.levels <= MAX_SID_LEVELS - 1:  # checked before training, not after it
            raise ConfigError(f"sid.rqvae.levels must be in 1..{MAX_SID_LEVELS - 1}, got {self.levels}: SID tokens "
                              f"name a level with one letter (a..z, {MAX_SID_LEVELS} levels) and the index may append "
                              "one level to tell colliding items apart")
        if not 2 <= self.codebook_size <= 65535:
            raise ConfigError(f"codebook_size must be in 2..65535 (codes are uint16), got {self.codebook_size}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.latent_dim < 1 or any(h < 1 for h in self.hidden_dims):
            raise ConfigError("latent_dim and hidden_dims must be positive")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch_size and lr must be positive")


def mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def squared_distances(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(n, D) x (K, D) -> (n, K) squared Euclidean distances."""
    return (x * x).sum(1, keepdim=True) - 2 * x @ codebook.T + (codebook * codebook).sum(1)[None, :]


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations; empty clusters are re-seeded on far points.

    With fewer points than clusters the spare centres are copies of points plus tiny noise.
    """
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator)
    centres = [x[first]]
    closest = squared_distances(x, centres[0]).squeeze(1)
    for _ in range(1, min(k, n)):
        weights = closest.clamp(min=0)
        idx = torch.multinomial(weights, 1, generator=generator) if weights.sum() > 0 else torch.randint(n, (1,), generator=generator)
        centres.append(x[idx])
        closest = torch.minimum(closest, squared_distances(x, centres[-1]).squeeze(1))
    centres_t = torch.cat(centres, 0)
    if k > n:
        extra = x[torch.randint(n, (k - n,), generator=generator)]
        centres_t = torch.cat([centres_t, extra + 1e-4 * torch.randn(extra.shape, generator=generator)], 0)
        return centres_t
    for _ in range(iters):
        assign = squared_distances(x, centres_t).argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centres_t).index_add_(0, assign, x)
        empty = counts == 0
        centres_t = torch.where(empty[:, None], centres_t, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # move empty centres onto the worst-served points
            worst = squared_distances(x, centres_t).min(1).values.argsort(descending=True)[: int(empty.sum())]
            centres_t[empty] = x[worst]
    return centres_t


class ResidualQuantizer(nn.Module):
    """L codebooks of K codewords in the latent space, with optional EMA updates."""

    def __init__(self, levels: int, codebook_size: int, dim: int, ema: bool, ema_decay: float):
        super().__init__()
        self.levels, self.codebook_size, self.dim = levels, codebook_size, dim
        self.ema, self.ema_decay = ema, ema_decay
        init = torch.randn(levels, codebook_size, dim) * 0.1
        if ema:
            self.register_buffer("codebooks", init)
            self.register_buffer("ema_count", torch.ones(levels, codebook_size))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebooks = nn.Parameter(init)

    def set_codebook(self, level: int, centres: torch.Tensor) -> None:
        with torch.no_grad():
            self.codebooks[level].copy_(centres)
            if self.ema:
                self.ema_count[level].fill_(1.0)
                self.ema_sum[level].copy_(centres)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """z (n, D) -> (quantised z (n, D), codes (n, L), per-level residuals, per-level distances)."""
        residual = z
        quantised = torch.zeros_like(z)
        codes, residuals, distances = [], [], []
        for level in range(self.levels):
            codebook = self.codebooks[level]
            dist = squared_distances(residual, codebook.detach() if self.ema else codebook)
            code = dist.argmin(1)
            residuals.append(residual)
            distances.append(dist)
            codes.append(code)
            chosen = codebook[code]
            quantised = quantised + chosen
            residual = residual - chosen.detach()
        return quantised, torch.stack(codes, 1), residuals, distances

    @torch.no_grad()
    def ema_update(self, residuals: list[torch.Tensor], codes: torch.Tensor) -> None:
        decay = self.ema_decay
        for level in range(self.levels):
            r = residuals[level].detach()
            code = codes[:, level]
            counts = torch.bincount(code, minlength=self.codebook_size).float()
            sums = torch.zeros(self.codebook_size, self.dim, dtype=r.dtype).index_add_(0, code, r)
            self.ema_count[level].mul_(decay).add_(counts, alpha=1 - decay)
            self.ema_sum[level].mul_(decay).add_(sums, alpha=1 - decay)
            n = self.ema_count[level].sum()
            smoothed = (self.ema_count[level] + 1e-5) / (n + self.codebook_size * 1e-5) * n
            self.codebooks[level].copy_(self.ema_sum[level] / smoothed[:, None])


class RQVAE(nn.Module):
    """Encoder, residual quantiser, decoder. Inputs are standardised first (``input_mean``,
    ``input_scale``, set from the training data) so that the reconstruction loss is the fraction of
    variance left unexplained (1.0 = predicting the mean) and is not dwarfed by the latent losses:
    raw sentence embeddings have a per-dimension variance near 1/D, which makes the commitment loss
    dominate and the encoder collapse onto a few codewords."""

    def __init__(self, input_dim: int, config: RQVAEConfig):
        super().__init__()
        self.config = config
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.register_buffer("input_scale", torch.ones(()))
        dims = [input_dim, *config.hidden_dims, config.latent_dim]
        self.encoder = mlp(dims)
        self.decoder = mlp(dims[::-1])
        self.quantizer = ResidualQuantizer(
            config.levels, config.codebook_size, config.latent_dim, config.ema, config.ema_decay
        )

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_scale

    def forward(self, x: torch.Tensor):
        """x: standardised inputs (see :meth:`standardise`); the reconstruction is standardised too."""
        z = self.encoder(x)
        quantised, codes, residuals, distances = self.quantizer(z)
        z_q = z + (quantised - z).detach()  # straight-through: decoder sees codewords, encoder gets gradients
        return self.decoder(z_q), z, quantised, codes, residuals, distances


def diversity_loss(distances: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over levels of log K - H(batch-average soft assignment): 0 when usage is uniform."""
    losses = []
    for dist in distances:
        scale = dist.detach().mean().clamp(min=1e-8)  # distances shrink level by level; normalise
        probs = F.softmax(-dist / (scale * temperature), dim=1).mean(0)
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
        losses.append(math.log(dist.shape[1]) - entropy)
    return torch.stack(losses).mean()


def contrastive_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of z_a should match row i of z_b against the batch's other rows."""
    a, b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def co_engagement_pairs(train_sequences: list[np.ndarray], num_items: int) -> np.ndarray:
    """Distinct (a, b) pairs, a != b, of items adjacent in some user's training sequence."""
    pairs = []
    for seq in train_sequences:
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) >= 2:
            pairs.append(np.stack([seq[:-1], seq[1:]], 1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    pairs_arr = np.concatenate(pairs)
    pairs_arr = pairs_arr[pairs_arr[:, 0] != pairs_arr[:, 1]]
    if pairs_arr.size and (pairs_arr.min() < 0 or pairs_arr.max() >= num_items):
        raise InvalidInputError("a training sequence names an item outside 0..num_items-1")
    return np.unique(np.sort(pairs_arr, axis=1), axis=0)


@torch.no_grad()
def initialise_codebooks(model: RQVAE, x: torch.Tensor, generator: torch.Generator) -> None:
    """k-means on each level's residuals of all items, level by level."""
    residual = model.encoder(x)
    for level in range(model.config.levels):
        centres = kmeans(residual, model.config.codebook_size, model.config.kmeans_iters, generator)
        model.quantizer.set_codebook(level, centres)
        residual = residual - centres[squared_distances(residual, centres).argmin(1)]


@torch.no_grad()
def reset_dead_codes(model: RQVAE, x: torch.Tensor, generator: torch.Generator) -> int:
    """Move codewords no item uses onto random items' residuals; returns how many were moved."""
    _, codes, residuals, _ = model.quantizer(model.encoder(x))
    moved = 0
    for level in range(model.config.levels):
        used = torch.bincount(codes[:, level], minlength=model.config.codebook_size) > 0
        dead = (~used).nonzero().squeeze(1)
        if len(dead) == 0:
            continue
        picks = torch.randint(x.shape[0], (len(dead),), generator=generator)
        noise = 1e-3 * torch.randn(len(dead), model.config.latent_dim, generator=generator)
        centres = model.quantizer.codebooks[level].clone()
        centres[dead] = residuals[level][picks] + noise
        if model.quantizer.ema:
            model.quantizer.codebooks[level].copy_(centres)
            model.quantizer.ema_sum[level, dead] = centres[dead]
            model.quantizer.ema_count[level, dead] = 1.0
        else:
            model.quantizer.codebooks.data[level].copy_(centres)
        moved += len(dead)
    return moved


def training_loss(model: RQVAE, batch: torch.Tensor, x: torch.Tensor, pairs: torch.Tensor | None,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(total loss, reconstruction loss, per-level residuals, codes) of one batch.

    reconstruction + beta * commitment (encoder toward its codewords), plus: the VQ codebook loss
    when codewords learn by gradient (without EMA), the diversity loss, the contrastive loss on
    co-engaged pairs drawn from ``pairs`` (rows of ``x``).
    """
    config = model.config
    x_hat, _, _, codes, residuals, distances = model(batch)
    chosen = [model.quantizer.codebooks[level][codes[:, level]] for level in range(config.levels)]
    recon = F.mse_loss(x_hat, batch)
    loss = recon + config.commitment_beta * sum(F.mse_loss(r, c.detach()) for r, c in zip(residuals, chosen))
    if not config.ema:  # codewords learn by gradient: pull them toward their residuals
        loss = loss + sum(F.mse_loss(c, r.detach()) for r, c in zip(residuals, chosen))
    if config.diversity_weight > 0:
        loss = loss + config.diversity_weight * diversity_loss(distances, config.diversity_temperature)
    if pairs is not None:
        pick = pairs[torch.randint(len(pairs), (len(batch),), generator=generator)]
        z_pairs = model.encoder(x[pick.reshape(-1)]).reshape(len(batch), 2, -1)
        loss = loss + config.contrastive_weight * contrastive_loss(z_pairs[:, 0], z_pairs[:, 1], config.contrastive_temperature)
    return loss, recon, residuals, codes


def train_rqvae(
    embeddings: np.ndarray,
    config: RQVAEConfig,
    train_sequences: list[np.ndarray] | None = None,
    progress: bool = True,
) -> tuple[RQVAE, dict]:
    """Train an RQ-VAE on item embeddings (float32 (n, D)); returns the model and a training log."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise InvalidInputError(f"embeddings must be (n >= 2, D), got shape {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise InvalidInputError("embeddings contain NaN or inf")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    raw = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    n = raw.shape[0]
    model = RQVAE(raw.shape[1], config)
    if config.standardize_inputs:
        model.input_mean.copy_(raw.mean(0))
        model.input_scale.copy_((raw - raw.mean(0)).pow(2).sum(1).mean().sqrt().clamp(min=1e-8) / math.sqrt(raw.shape[1]))
    x = model.standardise(raw)
    if config.kmeans_init:
        initialise_codebooks(model, x, generator)

    pairs = None
    if config.contrastive_weight > 0:
        pairs = co_engagement_pairs(train_sequences or [], n)
        if len(pairs) == 0:
            raise InvalidInputError("contrastive loss needs co-engagement pairs, but no training sequence has 2 items")
        pairs = torch.from_numpy(pairs)

    # weight decay on the network only: decaying codewords would drag them toward the origin
    codebook_params = [p for name, p in model.named_parameters() if name.startswith("quantizer.")]
    network_params = [p for name, p in model.named_parameters() if not name.startswith("quantizer.")]
    optimizer = torch.optim.AdamW(
        [{"params": network_params, "weight_decay": config.weight_decay}, {"params": codebook_params, "weight_decay": 0.0}],
        lr=config.lr,
    )
    batch_size = min(config.batch_size, n)
    log = {"loss": [], "reconstruction": [], "dead_codes_reset": 0}
    stop_resets = int(config.epochs * config.dead_code_stop)
    for epoch in tqdm(range(config.epochs), desc="rq-vae", unit="epoch", disable=not progress):
        order = torch.randperm(n, generator=generator)
        epoch_loss = epoch_recon = 0.0
        for start in range(0, n, batch_size):
            batch = x[order[start : start + batch_size]]
            loss, recon, residuals, codes = training_loss(model, batch, x, pairs, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if config.ema:
                model.quantizer.ema_update(residuals, codes)
            epoch_loss += float(loss.detach()) * len(batch)
            epoch_recon += float(recon.detach()) * len(batch)
        log["loss"].append(epoch_loss / n)
        log["reconstruction"].append(epoch_recon / n)
        if config.dead_code_reset and (epoch + 1) % config.dead_code_every == 0 and epoch < stop_resets:
            log["dead_codes_reset"] += reset_dead_codes(model, x, generator)
    model.eval()
    return model, log


def _standardised(model: RQVAE, embeddings: np.ndarray) -> torch.Tensor:
    return model.standardise(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)))


@torch.no_grad()
def encode_latent(model: RQVAE, embeddings: np.ndarray) -> np.ndarray:
    """Encoder outputs z (float32 (n, latent_dim)): what the Rust RQ encoder quantises."""
    return model.encoder(_standardised(model, embeddings)).numpy()


@torch.no_grad()
def decode_latent(model: RQVAE, latent: np.ndarray) -> np.ndarray:
    """Decoder output mapped back to the embedding space (float32 (n, D_in))."""
    out = model.decoder(torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32)))
    return (out * model.input_scale + model.input_mean).numpy()


def reconstruction_error(model: RQVAE, embeddings: np.ndarray, latent: np.ndarray) -> dict[str, float]:
    """MSE of decoding ``latent`` (e.g. summed codewords) against ``embeddings``: per dimension in
    the embedding space, and relative to the data's variance (1.0 = no better than the mean)."""
    x_hat = decode_latent(model, latent)
    mse = float(((x_hat - embeddings) ** 2).mean())
    variance = float(((embeddings - embeddings.mean(0)) ** 2).mean())
    return {"mse": mse, "relative": mse / max(variance, 1e-12)}


def codebooks_array(model: RQVAE) -> np.ndarray:
    """float32 (L, K, latent_dim), the layout gr2.RQCodebooks takes."""
    return model.quantizer.codebooks.detach().float().contiguous().numpy().copy()


def random_last_level(codes: np.ndarray, codebook_size: int, seed: int) -> np.ndarray:
    """Replace the last level by codes drawn uniformly from 0..K-1 (seeded, independent per item)."""
    out = np.array(codes, dtype=np.uint16, copy=True)
    rng = np.random.default_rng(seed)
    out[:, -1] = rng.integers(0, codebook_size, size=out.shape[0], dtype=np.uint16)
    return out


def uniqueness(codes: np.ndarray) -> float:
    """Share of rows whose code tuple no other row has."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.reshape(-1)] == 1).mean())


def collision_groups(codes: np.ndarray) -> dict[str, int]:
    """{group size: number of SIDs shared by exactly that many items} for sizes >= 2."""
    _, counts = np.unique(codes, axis=0, return_counts=True)
    sizes, how_many = np.unique(counts[counts >= 2], return_counts=True)
    return {str(int(s)): int(c) for s, c in zip(sizes, how_many)}


def utilisation(codes: np.ndarray, codebook_size: int) -> list[float]:
    """Per level, the share of the K codes at least one item uses."""
    return [float(len(np.unique(codes[:, level])) / codebook_size) for level in range(codes.shape[1])]
