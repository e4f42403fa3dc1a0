"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018), in PyTorch.

The model reads a user's item sequence left to right; position ``t`` attends to positions
``<= t`` (causal self-attention) and its output is scored against every item embedding to predict
the item at ``t + 1``. Standard choices, small enough for a laptop CPU:

- item embeddings (shared with the output layer) + learned positional embeddings, dropout;
- ``blocks`` pre-LayerNorm transformer blocks (attention + 2-layer GELU feed-forward);
- full-softmax cross-entropy over the whole catalog at every position (cheap for catalogs of a
  few thousand items and stronger than BCE with one sampled negative);
- Adam; early stopping on validation NDCG@10 (full ranking, history items masked), keeping the
  best weights.

Sequences are left-padded to ``max_len`` (index 0 is padding, item ``i`` is token ``i + 1``);
padding keys are masked out of attention. Training is deterministic for a given ``seed`` and
thread count.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gr2.errors import ConfigError, InvalidInputError
from gr2.upstream import check_items, ranking_metrics, target_ranks


@dataclass
class SASRecConfig:
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    max_len: int = 50  # most recent items the model reads (ml-100k median train length is ~63)
    dropout: float = 0.3
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 60
    # "last": each user's most recent max_len + 1 items per epoch (standard SASRec; older items of
    # long sequences are never targets); "all": cut long sequences into consecutive windows so
    # every transition is trained on. ml-100k test, full ranking (measured): "last" Recall@10 0.185
    # NDCG@10 0.096 in ~52 s CPU; "all" 0.210 / 0.112 in ~126 s CPU -- better, but the stage
    # (main + prefix model) would then exceed its 3-minute 2-core budget, so "last" is the default.
    windows: str = "last"
    eval_every: int = 2  # epochs between validation passes
    patience: int = 3  # validation passes without improvement before stopping
    seed: int = 0
    # torch intra-op threads while training/scoring (restored afterwards); 0 keeps torch's setting.
    # 1 by default: the model is small, and on a busy 2-core machine spinning worker threads made
    # an epoch several times slower than one thread (measured).
    threads: int = 1

    def __post_init__(self) -> None:
        positive = ("hidden", "blocks", "heads", "max_len", "batch_size", "max_epochs", "eval_every", "patience")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"sasrec.{name} must be positive, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ConfigError(f"sasrec.hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.windows not in ("last", "all"):
            raise ConfigError(f"sasrec.windows must be 'last' or 'all', got {self.windows!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"sasrec.dropout must be in [0, 1), got {self.dropout}")


class SelfAttentionBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm_attn = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm_ff = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ff(self.norm_ff(x)))


class SASRec(nn.Module):
    def __init__(self, n_items: int, config: SASRecConfig):
        super().__init__()
        self.n_items = n_items
        self.config = config
        self.item_emb = nn.Embedding(n_items + 1, config.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(config.hidden, config.heads, config.dropout) for _ in range(config.blocks)
        )
        self.norm = nn.LayerNorm(config.hidden)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, hidden) for left-padded token ids (B, T) (0 = padding)."""
        t = tokens.shape[1]
        positions = torch.arange(t, device=tokens.device)
        x = self.item_emb(tokens) * math.sqrt(self.config.hidden) + self.pos_emb(positions)[None]
        x = self.drop(x)
        real = tokens != 0
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        # a query may attend to earlier real items and always to itself (so no row is empty)
        allowed = (causal[None] & real[:, None, :]) | torch.eye(t, dtype=torch.bool, device=tokens.device)[None]
        allowed = allowed[:, None]  # broadcast over heads
        for block in self.blocks:
            x = block(x, allowed) * real[..., None]
        return self.norm(x)

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every real item (..., n_items) for hidden states (..., hidden)."""
        return hidden @ self.item_emb.weight[1:].t()


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads (0: unchanged), then restore the setting."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def left_pad(sequences: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """Token ids (B, max_len): the last ``max_len`` items of each sequence, shifted by +1, left-padded."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = np.asarray(seq, dtype=np.int64)[-max_len:]
        if len(tail):
            out[row, max_len - len(tail) :] = tail + 1
    return torch.from_numpy(out)


@dataclass
class SASRecRanker:
    """A trained SASRec model behind the :class:`gr2.upstream.Ranker` interface."""

    model: SASRec
    history: dict = field(default_factory=dict)  # training log: epochs, best epoch, valid curve
    name: str = "sasrec"

    @property
    def n_items(self) -> int:
        return self.model.n_items

    def score(self, histories: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
        for h in histories:
            check_items("history", np.asarray(h), self.n_items)
        self.model.eval()
        out = np.empty((len(histories), self.n_items), dtype=np.float32)
        with torch.no_grad(), torch_threads(self.model.config.threads):
            for start in range(0, len(histories), batch_size):
                tokens = left_pad(histories[start : start + batch_size], self.model.config.max_len)
                hidden = self.model(tokens)[:, -1]
                out[start : start + len(tokens)] = self.model.item_logits(hidden).numpy()
        return out


def _training_batch(sequences: Sequence[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs = seq[:-1], labels = seq[1:] (last max_len steps), both left-padded; labels 0 = none."""
    inputs = left_pad([s[:-1] for s in sequences], max_len)
    labels = left_pad([s[1:] for s in sequences], max_len)
    return inputs, labels


def train_sasrec(
    train: Sequence[np.ndarray],
    n_items: int,
    config: SASRecConfig,
    *,
    valid: tuple[Sequence[np.ndarray], np.ndarray] | None = None,
    epochs: int | None = None,
    desc: str = "sasrec",
    progress: bool = True,
) -> SASRecRanker:
    """Train SASRec on ``train`` sequences (item indices 0..n_items-1, oldest first).

    With ``valid=(histories, targets)`` training stops early on validation NDCG@10 and the best
    weights are kept. Without it, it trains exactly ``epochs`` epochs (e.g. the best epoch count
    of an earlier early-stopped run on comparable data).
    """
    if valid is None and epochs is None:
        raise InvalidInputError("train_sasrec needs valid data for early stopping or a fixed epoch count")
    train = [np.asarray(s, dtype=np.int64) for s in train]
    for s in train:
        check_items("train sequence", s, n_items)
    usable = [s for s in train if len(s) >= 2]  # a sequence of one item has no next-item label
    if not usable:
        raise InvalidInputError("no training sequence has 2 or more items")
    with torch_threads(config.threads):
        return _train(usable, n_items, config, valid, epochs, desc, progress)


def split_windows(sequences: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Cut each sequence into windows of max_len + 1 items from its end, overlapping by one item
    so every transition (item -> next item) appears in exactly one window."""
    out = []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            out.append(seq[max(0, end - max_len - 1) : end])
            end -= max_len
    return out


def _train(usable, n_items, config, valid, epochs, desc, progress) -> SASRecRanker:
    if config.windows == "all":
        usable = split_windows(usable, config.max_len)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = SASRec(n_items, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ranker = SASRecRanker(model)
    max_epochs = epochs if epochs is not None else config.max_epochs
    best_ndcg, best_epoch, best_state, stale = -1.0, 0, None, 0
    curve: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(range(1, max_epochs + 1), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        order = rng.permutation(len(usable))
        total, count = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            inputs, labels = _training_batch([usable[i] for i in order[start : start + config.batch_size]], config.max_len)
            hidden = model(inputs)
            target_mask = labels != 0
            logits = model.item_logits(hidden[target_mask])
            loss = F.cross_entropy(logits, labels[target_mask] - 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * int(target_mask.sum())
            count += int(target_mask.sum())
        bar.set_postfix(loss=f"{total / count:.3f}")
        if valid is None or epoch % config.eval_every:
            continue
        metrics = ranking_metrics(target_ranks(ranker, valid[0], valid[1]), k=10)
        curve.append({"epoch": epoch, "loss": total / count, **metrics})
        bar.set_postfix(loss=f"{total / count:.3f}", ndcg10=f"{metrics['ndcg@10']:.4f}")
        if metrics["ndcg@10"] > best_ndcg:
            best_ndcg, best_epoch, stale = metrics["ndcg@10"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = max_epochs
    model.eval()
    ranker.history = {
        "epochs_run": epoch,
        "best_epoch": best_epoch,
        "best_valid_ndcg@10": best_ndcg if valid is not None else None,
        "valid_curve": curve,
        "train_seconds": round(time.perf_counter() - started, 2),
        "sequences": len(usable),
    }
    return ranker
