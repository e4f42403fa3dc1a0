"""Stage 1, mid-training: teach a base LLM the semantic-ID vocabulary of the catalog -- the task
mixture, its sampler and the next-item evaluation. The ``midtrain`` stage that runs them over a run
directory (load, extend, train, evaluate, write) is :mod:`gr2.pipeline.midtrain`.

What the stage does, top to bottom:

1. load the base model (``demo`` / ``smollm2`` / HF folder) and extend it with the SID tokens,
   initialising each code's row from the text of the items carrying that code
   (:func:`gr2.models.extend_with_sids`);
2. train on a mixture of four tasks, drawn per batch slot with the configured weights:
   ``next``    the SIDs of a user's recent history -> the SID of the next item (train part only);
   ``caption`` SID -> "title (year) | genres";
   ``ground``  "title (year) | genres" -> SID;
   ``replay``  plain text about an item (keeps ordinary language modelling alive);
   loss on the assistant tokens only (replay: on every token). With ``history_weight`` > 0 the
   ``next`` task also puts that weight on the code tokens of every history SID in the prompt, so
   one example trains each history item predicted from the items before it (up to
   ``train_max_history`` transitions, in the evaluation prompt's own format) instead of a single
   target; ``pack`` fills the padding of a batch's long ``next`` rows with its short examples,
   and the output layer is evaluated only at supervised positions
   (:func:`gr2.train.losses.weighted_nll_selected`);
3. evaluate next-item Recall@k / NDCG@k on the leave-one-out test targets by catalog-constrained
   beam search: generation may only spell SIDs of catalog items (gr2.catalog_decode), the
   beams' top-k items are the ranking. With ``eval_mask_history`` (default) the user's earlier
   items can be neither generated nor ranked by popularity (train-part counts) -- the protocol of
   the upstream full-ranking figures. Popularity is scored on the same users, with
   percentile-bootstrap 95% CIs over users for both and for their paired difference; when
   ``candidates/report.json`` exists, the upstream ranker (SASRec, full ranking on all users) is
   reported alongside.

Measurements: benches/README.md, "Mid-training next-item retrieval"; the current preset's figures
are in the README.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from gr2 import splits
from gr2.data.catalog import ItemCatalog
from gr2.errors import ConfigError, DataError
from gr2.models import DemoModelConfig
from gr2.train.batches import WeightedExample, chat_example
from gr2.train.distributed import World
from gr2.train.optim import LoraSettings

STAGE = "midtrain"
TASKS = ("next", "caption", "ground", "replay")


@dataclass
class MixtureWeights:
    """Relative frequency of each task in a batch (normalised; a 0 disables the task)."""

    next: float = 0.6
    caption: float = 0.15
    ground: float = 0.15
    replay: float = 0.1


@dataclass
class MidtrainConfig:
    # settings that do not change the weights a step produces: a run resumes its checkpoints across them
    NOT_IN_CHECKPOINT_KEY: ClassVar[tuple[str, ...]] = (
        "checkpoint_every", "keep_checkpoints", "log_every", "eval_split", "eval_users", "eval_beams",
        "eval_mask_history", "eval_ks", "eval_batch_size", "cache_dir")

    base_model: str = "demo"  # "demo", "smollm2", or an HF folder / hub name
    demo: DemoModelConfig = field(default_factory=DemoModelConfig)
    mixture: MixtureWeights = field(default_factory=MixtureWeights)
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_history: int = 20  # most recent items shown in the evaluation prompt (and in training, see below)
    # history items shown in a training `next` prompt (0 = max_history); longer windows carry more
    # history-SID transitions per example when history_weight > 0
    train_max_history: int = 0
    # loss weight on the code tokens of every history SID inside the `next` prompt (each history
    # item predicted from the earlier ones, in the eval prompt's own format); 0 = target SID only
    history_weight: float = 0.0
    # pack each batch's examples into rows as wide as its longest one (short caption / ground /
    # replay examples fill the padding of the long `next` rows) instead of padding every slot
    pack: bool = False
    max_length: int = 512
    init_noise_std: float = 0.02
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    # evaluation
    eval_split: str = "test"  # "valid" or "test" (leave-one-out)
    # what the `next`/caption tasks train on: "fit" = the train split's fit data (candidates/fit_train:
    # no target of a training list is a mid-training target), "all" = every user's items[:-2] (the
    # older behaviour: covers the history -> target pairs of the SFT/RL lists; reported as overlap)
    train_on: str = "fit"
    eval_users: int = 0  # 0 = all users
    eval_beams: int = 20
    # Exclude each user's earlier items from the model's beams and from popularity's list, as the
    # upstream full-ranking figures (SASRec, popularity in candidates/report.json) do.
    eval_mask_history: bool = True
    eval_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    eval_batch_size: int = 16
    cache_dir: str = ""  # where converted base models are cached ("" = default)

    def __post_init__(self) -> None:
        weights = asdict(self.mixture) if not isinstance(self.mixture, dict) else self.mixture
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
        if self.train_max_history < 0:
            raise ConfigError(f"midtrain.train_max_history must be >= 0, got {self.train_max_history}")
        if self.history_weight < 0:
            raise ConfigError(f"midtrain.history_weight must be >= 0, got {self.history_weight}")
        for name in ("steps", "batch_size", "max_history", "eval_beams", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"midtrain.{name} must be > 0, got {getattr(self, name)}")
        if self.train_on not in ("fit", "all"):
            raise ConfigError(f"midtrain.train_on must be 'fit' or 'all', got {self.train_on!r}")
        if self.eval_split not in ("valid", "test"):
            raise ConfigError(f"midtrain.eval_split must be 'valid' or 'test', got {self.eval_split!r}")
        if not self.eval_ks or max(self.eval_ks) > self.eval_beams:
            raise ConfigError(f"eval_ks {self.eval_ks} must be non-empty and <= eval_beams {self.eval_beams}")


# --------------------------------------------------------------------------------------------
# the task texts


def next_prompt(catalog: ItemCatalog, history: list[int]) -> str:
    return "A user watched, oldest first: " + "".join(catalog.sid_text(i) for i in history) + "\nNext item?"


def caption_prompt(catalog: ItemCatalog, item: int) -> str:
    return f"What is item {catalog.sid_text(item)}?"


def ground_prompt(catalog: ItemCatalog, item: int) -> str:
    return f"Semantic ID of: {catalog.item_text(item)}"


def replay_text(catalog: ItemCatalog, item: int) -> str:
    year = f", released in {int(catalog.years[item])}" if catalog.years[item] >= 0 else ""
    genres = " and ".join(catalog.categories[item]) or "uncategorised"
    return f"{catalog.titles[item]} is a {genres} title{year}."


def demo_corpus(catalog: ItemCatalog) -> list[str]:
    """Texts the demo tokenizer is trained on: item texts, replay sentences and the templates."""
    texts = [catalog.item_text(i) for i in range(len(catalog))] + [replay_text(catalog, i) for i in range(len(catalog))]
    from gr2.prompts import DEFAULT_PRIMING, SYSTEM_PROMPT, instructions

    texts += ["A user watched, oldest first: \nNext item?", "What is item ?", "Semantic ID of: ",
              SYSTEM_PROMPT, DEFAULT_PRIMING, instructions(10), "user assistant system"]
    return texts


class TaskSampler:
    """Builds the training example for batch slot ``(step, slot)`` -- deterministic in (seed, step)."""

    def __init__(self, catalog: ItemCatalog, train_seqs: list[list[int]], tokenizer: Any, config: MidtrainConfig,
                 sid_tokens: Any = None):
        self.catalog, self.tokenizer, self.config = catalog, tokenizer, config
        self.code_token_ids: frozenset[int] = frozenset()
        if config.history_weight > 0:
            if sid_tokens is None:
                raise ConfigError("history_weight > 0 needs the SID token ids (pass sid_tokens)")
            self.code_token_ids = frozenset(int(sid_tokens.code_ids[level, code])
                                            for level, size in enumerate(sid_tokens.level_sizes)
                                            for code in range(size))
        weights = np.array([getattr(config.mixture, t) for t in TASKS], dtype=np.float64)
        self.task_p = weights / weights.sum()
        # every (user, position) whose item has at least one earlier item in the train part
        self.next_pairs = np.array([(u, p) for u, seq in enumerate(train_seqs) for p in range(1, len(seq))],
                                   dtype=np.int64).reshape(-1, 2)
        if self.task_p[0] > 0 and len(self.next_pairs) == 0:
            raise DataError("no user has two train items; the `next` task has no examples")
        self.train_seqs = train_seqs

    def batch(self, step: int) -> tuple[list[WeightedExample], list[str]]:
        rng = np.random.default_rng([self.config.seed, step])
        tasks = rng.choice(len(TASKS), size=self.config.batch_size, p=self.task_p)
        examples = [self.example(TASKS[t], rng) for t in tasks]
        return examples, [TASKS[t] for t in tasks]

    def example(self, task: str, rng: np.random.Generator) -> WeightedExample:
        cat, tok, max_len = self.catalog, self.tokenizer, self.config.max_length
        if task == "next":
            user, pos = self.next_pairs[rng.integers(len(self.next_pairs))]
            return self.next_example(int(user), int(pos))
        item = int(rng.integers(len(cat)))
        if task == "caption":
            return chat_example(tok, [{"role": "user", "content": caption_prompt(cat, item)}],
                                       [(cat.item_text(item), 1.0)], max_len)
        if task == "ground":
            return chat_example(tok, [{"role": "user", "content": ground_prompt(cat, item)}],
                                       [(cat.sid_text(item), 1.0)], max_len)
        ids = tok(replay_text(cat, item), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return WeightedExample(ids, [0.0] + [1.0] * (len(ids) - 1))

    def next_example(self, user: int, pos: int) -> WeightedExample:
        """The `next` example of train item ``pos`` of ``user``: the up to ``train_max_history``
        (default ``max_history``) items before it in the prompt, its SID as the answer."""
        cat, seq = self.catalog, self.train_seqs[user]
        history = seq[max(0, pos - (self.config.train_max_history or self.config.max_history)):pos]
        example = chat_example(self.tokenizer, [{"role": "user", "content": next_prompt(cat, history)}],
                                      [(cat.sid_text(seq[pos]), 1.0)], self.config.max_length)
        return self.weight_history(example)

    def weight_history(self, example: WeightedExample) -> WeightedExample:
        """Put ``history_weight`` on the SID code tokens of the prompt (weight 0 there so far): the
        only SIDs in a `next` prompt are the history's, so each history item's codes are predicted
        from the items before it. Delimiters and text stay at 0; the answer keeps its weights."""
        if self.config.history_weight <= 0:
            return example
        weights = [self.config.history_weight if w == 0 and t in self.code_token_ids else w
                   for t, w in zip(example.input_ids, example.weights)]
        return WeightedExample(example.input_ids, weights)


# --------------------------------------------------------------------------------------------
# evaluation: catalog-constrained beam search


@torch.no_grad()
def next_item_rankings(model: Any, tokenizer: Any, sid_tokens: Any, index: Any, prompts: list[str],
                       exclude: list[list[int]], beams: int, top: int, batch_size: int) -> list[list[int]]:
    """For each chat prompt, the ``top`` items of a beam search in which generation may only spell
    the SID of a catalog item outside the row's ``exclude`` list (:func:`gr2.catalog_decode`'s
    Rust automaton), best first."""
    from gr2 import catalog_decode

    rankings: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="beam search", leave=False):
        chunk = prompts[start:start + batch_size]
        results = catalog_decode(model, tokenizer, [[{"role": "user", "content": p}] for p in chunk], index,
                                 n_items=1, exclude=exclude[start:start + batch_size], sid_tokens=sid_tokens,
                                 num_beams=beams, num_return_sequences=top)
        for row in range(len(chunk)):
            rankings.append([int(r.items[0]) for r in results[row * top:(row + 1) * top]])
    return rankings


def per_user_metrics(rankings: list[list[int]], targets: list[int], ks: list[int]) -> dict[str, np.ndarray]:
    """Recall@k and NDCG@k of each user's beam ranking (:func:`gr2.eval.metrics.rank_metrics`;
    a target outside the ranking is a miss), float64 arrays."""
    from gr2.eval.metrics import rank_metrics

    ranks = np.array([r.index(t) + 1 if t in r else 0 for r, t in zip(rankings, targets)], dtype=np.int64)
    return rank_metrics(ranks, ks)


def bootstrap_cis(model: dict[str, np.ndarray], baseline: dict[str, np.ndarray], seed: int,
                  n_boot: int = 1000) -> dict[str, dict[str, list[float]]]:
    """Percentile-bootstrap 95% CIs over users of the model's metrics, the baseline's, and the
    paired difference model - baseline (the same resampled users for all three)."""
    from gr2.eval.metrics import bootstrap_ci

    names = list(model)
    values = np.stack([model[n] for n in names] + [baseline[n] for n in names]
                      + [model[n] - baseline[n] for n in names])
    low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    out: dict[str, dict[str, list[float]]] = {"model": {}, "popularity": {}, "model_minus_popularity": {}}
    for block, key in enumerate(out):
        for i, name in enumerate(names):
            row = block * len(names) + i
            out[key][name] = [float(low[row]), float(high[row])]
    return out


def popularity_rankings(train_seqs: list[list[int]], n_items: int, exclude: list[list[int]], top: int) -> list[list[int]]:
    """Per user, the ``top`` most frequent items of the train part outside the user's ``exclude``."""
    counts = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in train_seqs if s]), minlength=n_items)
    order = np.argsort(-counts, kind="stable")
    rankings = []
    for seen in exclude:
        head = order[: top + len(seen)]  # enough to fill `top` after removing the seen items
        rankings.append([int(i) for i in head[~np.isin(head, seen)][:top]])
    return rankings


def evaluate(model: Any, tokenizer: Any, sid_tokens: Any, catalog: ItemCatalog, seqs: list[list[int]],
             config: MidtrainConfig, world: World = World()) -> dict[str, Any]:
    """Next-item metrics of ``model`` (see the module docstring); under torchrun each rank beam-searches
    the users ``rank::size`` and the rankings are gathered, so every rank returns the same metrics."""
    histories, targets = splits.leave_one_out_pairs(seqs, config.eval_split)
    if config.eval_users and config.eval_users < len(targets):
        pick = np.random.default_rng(config.seed).choice(len(targets), config.eval_users, replace=False)
        histories, targets = [histories[i] for i in pick], [targets[i] for i in pick]
    top = max(config.eval_ks)
    exclude = histories if config.eval_mask_history else [[] for _ in histories]
    prompts = [next_prompt(catalog, h[-config.max_history:]) for h in histories]
    model.eval()
    mine = slice(world.rank, None, world.size)
    ranked = next_item_rankings(model, tokenizer, sid_tokens, catalog.index, prompts[mine], exclude[mine],
                                config.eval_beams, top, config.eval_batch_size)
    parts = world.all_gather(ranked)  # parts[r][j] is the ranking of user r + j * size
    rankings = [parts[i % world.size][i // world.size] for i in range(len(prompts))]
    pop = popularity_rankings(splits.leave_one_out_prefixes(seqs), len(catalog), exclude, top)
    model_users = per_user_metrics(rankings, targets, config.eval_ks)
    pop_users = per_user_metrics(pop, targets, config.eval_ks)
    masked = "the user's history masked for both" if config.eval_mask_history else "history not masked"
    return {
        "split": config.eval_split,
        "users": len(targets),
        "history_masked": config.eval_mask_history,
        "method": f"catalog-constrained beam search, {config.eval_beams} beams, {len(catalog)} items; {masked}",
        "model": {name: float(v.mean()) for name, v in model_users.items()},
        "popularity": {name: float(v.mean()) for name, v in pop_users.items()},
        "ci95": bootstrap_cis(model_users, pop_users, config.seed),
        "mean_items_returned": float(np.mean([len(r) for r in rankings])),
    }
