"""Candidate lists: the upstream ranker's top-K lists that the reranker learns to reorder.

The ``candidates`` stage (:mod:`gr2.pipeline.candidates`) fits the rankers and writes the lists with
the functions here (:func:`gr2.pipeline.inputs.load_fit_sequences` reads the fit data back;
:func:`list_fit_slices` says which fit data ranked each list).

Splits (leave-one-out, see :func:`gr2.upstream.leave_one_out`): the upstream ranker is fitted on
``items[:-2]`` of every user (SASRec early-stops on the valid targets). Valid lists rank the catalog
for history ``items[:-2]``; test lists for ``items[:-1]``.

Training examples -- the "tail hold-out" (prefix) protocol. A reranker must be trained on
candidate lists that look like the ones it will see at test time: lists produced by a ranker
that *has not seen the target*. Ranking training windows with the main model would be wrong: it
was fitted on those very transitions, so its training lists contain the target far more often and
rank it higher than on test (a reranker would learn to trust the upstream order too much). So a
second, "prefix" ranker is fitted on every user's train sequence minus its last ``train_windows``
items (SASRec: same hyperparameters, trained for the main run's best epoch count, no peeking at
valid), and it ranks the sliding windows whose targets are exactly those held-out items (history
= everything before the target). Like test, each window's target lies one to a few steps past the
data its ranker was fitted on, and the ranker has seen the user's earlier history. We chose this
over out-of-fold user splits because it costs one extra model instead of k, keeps the ranker's
view of the user (SASRec on test has trained on the user's prefix, an out-of-fold model has not),
and keeps time order (no window is ranked by a model trained on its future). The report gives
coverage on train, valid and test so the match can be checked.

Protocol of the paper: only lists that contain the target are stored (a reranker cannot fix a
list without it); ``report.json`` records coverage (share of lists whose target is in the top-K)
per split so full-population metrics can be derived (full Recall@k = coverage x list Recall@k),
and full-ranking Recall@10/NDCG@10 of the upstream next to popularity and item-kNN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from gr2.errors import ConfigError
from gr2.splits import PROTOCOLS, SPLITS, ProtocolSplit, Requests, leave_one_out_protocol, time_protocol
from gr2.upstream import ranking_metrics, target_ranks, top_k
from gr2.upstream.itemknn import ItemKNNRanker
from gr2.upstream.popularity import PopularityRanker
from gr2.upstream.sasrec import SASRecConfig, train_sasrec

UPSTREAMS = ("sasrec", "popularity", "itemknn")


@dataclass
class ItemKNNConfig:
    neighbors: int = 100
    shrink: float = 10.0
    recency_decay: float = 0.5

    def __post_init__(self) -> None:
        if self.neighbors <= 0:
            raise ConfigError(f"itemknn.neighbors must be positive, got {self.neighbors}")
        if not 0.0 < self.recency_decay <= 1.0:
            raise ConfigError(f"itemknn.recency_decay must be in (0, 1], got {self.recency_decay}")


@dataclass
class TimeSplitConfig:
    """The ``time`` protocol (:func:`gr2.splits.time_protocol`): quantiles of all timestamps."""

    train_cutoff: float = 0.8  # training lists: interactions between the two cutoffs
    test_cutoff: float = 0.9  # test lists: every interaction after this cutoff
    valid_users: float = 0.1  # share of the window's users whose lists are valid lists instead
    max_test_requests: int = 0  # 0 = all; else a seeded sample (lists are then the covered ones)
    seed: int = 0
    # > 1: rolling cutoffs -- the window is cut into this many time slices, each ranked by a ranker
    # fitted up to its start (train lists ranked like test lists; gr2.splits); costs one ranker per slice
    rolling: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.train_cutoff < self.test_cutoff < 1.0:
            raise ConfigError("candidates.time: need 0 < train_cutoff < test_cutoff < 1, got "
                              f"{self.train_cutoff}, {self.test_cutoff}")
        if not 0.0 <= self.valid_users < 1.0:
            raise ConfigError(f"candidates.time.valid_users must be in [0, 1), got {self.valid_users}")
        if self.max_test_requests < 0:
            raise ConfigError(f"candidates.time.max_test_requests must be >= 0, got {self.max_test_requests}")
        if isinstance(self.rolling, bool) or not isinstance(self.rolling, int) or self.rolling < 1:
            raise ConfigError(f"candidates.time.rolling must be a whole number >= 1 (1 = one train cutoff), "
                              f"got {self.rolling!r}")


@dataclass
class CandidatesConfig:
    upstream: str = "sasrec"  # "sasrec" | "popularity" | "itemknn"
    k: int = 10  # candidates per list
    max_history: int = 50  # history items stored per example (the most recent)
    mask_history: bool = True  # exclude items already in the history from the ranking
    protocol: str = "leave_one_out"  # "leave_one_out" (one test list per user) | "time" (global cutoffs, many lists)
    train_windows: int = 5  # leave_one_out: training windows per user, held out from the prefix ranker
    time: TimeSplitConfig = field(default_factory=lambda: TimeSplitConfig())
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    itemknn: ItemKNNConfig = field(default_factory=ItemKNNConfig)

    def __post_init__(self) -> None:
        if self.upstream not in UPSTREAMS:
            raise ConfigError(f"candidates.upstream must be one of {UPSTREAMS}, got {self.upstream!r}")
        if self.k < 1:
            raise ConfigError(f"candidates.k must be >= 1, got {self.k}")
        if self.max_history < 1:
            raise ConfigError(f"candidates.max_history must be >= 1, got {self.max_history}")
        if self.train_windows < 0:
            raise ConfigError(f"candidates.train_windows must be >= 0, got {self.train_windows}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"candidates.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")


def fit_ranker(
    name: str,
    train: Sequence[np.ndarray],
    n_items: int,
    config: CandidatesConfig,
    *,
    valid: tuple[Sequence[np.ndarray], np.ndarray] | None = None,
    epochs: int | None = None,
    desc: str = "sasrec",
):
    if name == "popularity":
        return PopularityRanker.fit(train, n_items)
    if name == "itemknn":
        c = config.itemknn
        return ItemKNNRanker.fit(train, n_items, neighbors=c.neighbors, shrink=c.shrink, recency_decay=c.recency_decay)
    return train_sasrec(train, n_items, config.sasrec, valid=valid, epochs=epochs, desc=desc)


@dataclass
class Lists:
    """Candidate lists for one split, before filtering to the lists that contain the target."""

    user_idx: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray
    candidates: np.ndarray  # int64 (N, K)
    scores: np.ndarray  # float32 (N, K)
    too_few_items: int = 0  # requests left out: history masks all but < K catalog items
    fit_slice: np.ndarray | None = None  # int64 (N,): the rolling-cutoff slice that ranked each list (None: 0)

    def slices(self) -> np.ndarray:
        return np.zeros(len(self.targets), np.int64) if self.fit_slice is None else self.fit_slice

    @property
    def hits(self) -> np.ndarray:
        return (self.candidates == self.targets[:, None]).any(axis=1)

    @property
    def requests(self) -> int:
        return len(self.targets) + self.too_few_items

    def coverage(self) -> float:
        """Share of all requests whose target made the top-K (requests without a list count as misses)."""
        return float(self.hits.sum() / self.requests) if self.requests else 0.0


def slice_groups(fit_slices: np.ndarray):
    """(slice, row indices) of every fit slice present in ``fit_slices``, in ascending slice order."""
    for r in np.unique(fit_slices):
        yield int(r), np.nonzero(fit_slices == r)[0]


def rank_split(rankers: dict[int, Any], req: Requests, fit_slice: np.ndarray, config: CandidatesConfig) -> Lists:
    """The lists of one split: each request ranked by the ranker of its fit slice (``rankers[slice]``)."""
    parts = []
    for r, rows in slice_groups(fit_slice):
        part = rank_lists(rankers[r], req.user_idx[rows], [req.histories[i] for i in rows], req.targets[rows], config)
        part.fit_slice = np.full(len(part.targets), r, np.int64)
        parts.append(part)
    if not parts:
        empty = np.zeros((0, config.k), np.int64)
        return Lists(np.zeros(0, np.int64), [], np.zeros(0, np.int64), empty, empty.astype(np.float32),
                     fit_slice=np.zeros(0, np.int64))
    return Lists(np.concatenate([p.user_idx for p in parts]), [h for p in parts for h in p.histories],
                 np.concatenate([p.targets for p in parts]), np.concatenate([p.candidates for p in parts]),
                 np.concatenate([p.scores for p in parts]), sum(p.too_few_items for p in parts),
                 np.concatenate([p.slices() for p in parts]))


def rank_lists(ranker, user_idx, histories, targets, config: CandidatesConfig) -> Lists:
    """Top-K lists for each (history, target); requests whose masked history leaves fewer than K
    rankable items get no list and are counted."""
    n_items = ranker.n_items
    rankable = np.array(
        [n_items - (len(np.unique(h)) if config.mask_history else 0) >= config.k for h in histories], dtype=bool
    )
    keep = np.nonzero(rankable)[0]
    kept_histories = [histories[i] for i in keep]
    if len(keep):
        cands, scores = top_k(ranker, kept_histories, config.k, mask_history=config.mask_history)
    else:
        cands, scores = np.zeros((0, config.k), np.int64), np.zeros((0, config.k), np.float32)
    return Lists(
        np.asarray(user_idx, np.int64)[keep],
        kept_histories,
        np.asarray(targets, np.int64)[keep],
        cands,
        scores,
        too_few_items=int((~rankable).sum()),
    )


def to_dataset(lists: Lists, max_history: int):
    """HF dataset of the lists that contain their target."""
    from datasets import Dataset, Features, Sequence, Value

    keep = np.nonzero(lists.hits)[0]
    features = Features(
        {
            "list_id": Value("int64"),
            "user_idx": Value("int64"),
            "history": Sequence(Value("int64")),
            "candidates": Sequence(Value("int64")),
            "scores": Sequence(Value("float32")),
            "target": Value("int64"),
            "fit_slice": Value("int64"),
        }
    )
    return Dataset.from_dict(
        {
            "list_id": list(range(len(keep))),
            "user_idx": lists.user_idx[keep].tolist(),
            "history": [lists.histories[i][-max_history:].tolist() for i in keep],
            "candidates": lists.candidates[keep].tolist(),
            "scores": lists.scores[keep].tolist(),
            "target": lists.targets[keep].tolist(),
            "fit_slice": lists.slices()[keep].tolist(),
        },
        features=features,
    )


def split_report(lists: Lists) -> dict[str, Any]:
    hits = lists.hits
    ranks = np.argmax(lists.candidates == lists.targets[:, None], axis=1)[hits] + 1
    k = lists.candidates.shape[1]
    out: dict[str, Any] = {
        "requests": int(lists.requests),
        "lists": int(len(hits)),
        "kept": int(hits.sum()),
        "dropped_target_not_in_top_k": int((~hits).sum()),
        "dropped_too_few_rankable_items": int(lists.too_few_items),
        "coverage": lists.coverage(),
        "target_position_histogram": np.bincount(ranks, minlength=k + 1)[1:].tolist(),
    }
    if lists.fit_slice is not None and len(lists.fit_slice) and lists.fit_slice.max() > 0:
        slices = lists.fit_slice
        # None for a slice without a list in this split (not a coverage of 0)
        out["coverage_by_slice"] = [float(hits[slices == r].mean()) if (slices == r).any() else None
                                    for r in range(int(slices.max()) + 1)]
    return out


def make_split(sequences: Any, config: CandidatesConfig) -> ProtocolSplit:
    """The configured protocol's requests and fit data (:mod:`gr2.splits`)."""
    if config.protocol == "time":
        t = config.time
        return time_protocol(sequences["user_idx"], sequences["items"], sequences["timestamps"], t.train_cutoff,
                             t.test_cutoff, t.valid_users, t.seed, t.max_test_requests, t.rolling)
    return leave_one_out_protocol(sequences["user_idx"], sequences["items"], config.train_windows)


def fit_dataset(split: ProtocolSplit, name: str, fit_slice: int = 0):
    """HF dataset of the interactions the ranker of split ``name``'s slice ``fit_slice`` (and its
    statistics) may use."""
    from datasets import Dataset, Features, Sequence, Value

    features = Features({"user_idx": Value("int64"), "items": Sequence(Value("int64"))})
    fit = split.fit_of_slice(name, fit_slice)
    return Dataset.from_dict({"user_idx": split.users.tolist(), "items": [s.tolist() for s in fit]}, features=features)


def list_fit_slices(table: Any) -> np.ndarray:
    """The fit slice of every list of a candidates/prompts dataset (0 for runs before rolling cutoffs)."""
    if "fit_slice" not in table.column_names:
        return np.zeros(len(table), np.int64)
    return np.asarray(table["fit_slice"], dtype=np.int64)


def fit_rankers(split: ProtocolSplit, n_items: int, config: CandidatesConfig) -> dict[str, dict[int, Any]]:
    """split -> fit slice -> ranker: one upstream ranker per distinct fit data. The ranker of the
    valid lists early-stops on them (SASRec); the others train for its best epoch count (no peeking
    at their own targets). Under rolling cutoffs, slices >= 1 get a ranker each, shared by the
    train and valid lists of that slice."""
    valid = split.requests["valid"]
    early = (valid.histories, valid.targets) if len(valid) else None
    first = "valid" if early is not None else "train"
    main = fit_ranker(config.upstream, split.fit[first], n_items, config, valid=early,
                      epochs=None if early is not None else config.sasrec.max_epochs, desc=f"{config.upstream} ({first})")
    epochs = main.history["best_epoch"] if config.upstream == "sasrec" else None
    rankers = {first: {0: main}}
    for name in SPLITS:
        if name in rankers:
            continue
        same = next((other for other in rankers if split.fit[other] is split.fit[name]), None)
        rankers[name] = {0: rankers[same][0] if same else fit_ranker(
            config.upstream, split.fit[name], n_items, config, epochs=epochs, desc=f"{config.upstream} ({name})")}
    for r in range(1, len(split.slice_fit)):
        ranker = fit_ranker(config.upstream, split.slice_fit[r], n_items, config, epochs=epochs,
                            desc=f"{config.upstream} (slice {r})")
        for name in split.slice_of:
            rankers[name][r] = ranker
    return rankers


def full_ranking_metrics(rankers: dict[int, Any], req: Requests, fit_slice: np.ndarray, config: CandidatesConfig
                         ) -> dict[str, float]:
    """Full-ranking Recall@10 / NDCG@10 of a split's requests, each ranked by its slice's ranker."""
    ranks = [target_ranks(rankers[r], [req.histories[i] for i in rows], req.targets[rows], mask_history=config.mask_history)
             for r, rows in slice_groups(fit_slice)]
    return ranking_metrics(np.concatenate(ranks), 10)
