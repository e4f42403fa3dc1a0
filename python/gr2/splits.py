"""The one place that decides which interactions each stage may see.

Every reranker stage works on *candidate lists*: (user, history, target) requests ranked by an
upstream ranker. A list is only honest if nothing that produced its prompt -- the upstream ranker,
the mid-trained model, the teacher's statistics, the per-candidate evidence -- saw its target.
This module builds the requests of a protocol together with the *fit data* of each split: the
interactions that the ranker of that split's lists (and every statistic shown next to them) is
allowed to use.

Two protocols (``CandidatesConfig.protocol``):

``leave_one_out`` (the papers' protocol; one test list per user)
    valid = (``s[:-2]`` -> ``s[-2]``), test = (``s[:-1]`` -> ``s[-1]``); the main ranker is fitted
    on ``s[:-2]``. Training lists are the last ``train_windows`` items of each train sequence
    ``s[:-2]``, ranked by a *prefix* ranker fitted on ``s[:cut]`` with ``cut = len(s[:-2]) -
    train_windows`` (history = everything before the window's target).
    fit data: train -> ``s[:cut]``; valid, test -> ``s[:-2]``.

``time`` (many lists per user: enough scored lists to see a 10% gain)
    Two global time cutoffs at quantiles ``train_cutoff < test_cutoff`` of all timestamps. Every
    interaction after the test cutoff is a test request (history = all of the user's earlier
    interactions), ranked by a ranker fitted on everything up to the test cutoff. Every
    interaction between the two cutoffs is a training request ranked by a ranker fitted on
    everything up to the train cutoff; the requests of a seeded ``valid_users`` share of users
    become valid lists instead (same ranker, users never trained on).
    fit data: train, valid -> interactions <= train cutoff; test -> interactions <= test cutoff.
    **Rolling cutoffs** (``rolling = R > 1``): the window between the cutoffs is cut at R - 1 more
    quantiles into R time slices, and the train and valid requests of slice r are ranked by a
    ranker fitted on every interaction up to slice r's start -- as test requests are ranked by a
    ranker fitted up to the test cutoff -- instead of all by one ranker that grows staler with
    every later request (on MovieLens-100k at ``train_cutoff = 0.4`` that ranker sees 417 users and
    covers 0.150 of the train targets vs 0.175 on test). Every statistic shown next to a list
    (evidence, teacher) uses its slice's fit data: ``slice_of[split]`` says which slice ranked each
    request, ``slice_fit[r]`` is that slice's fit data (``slice_fit[0]`` is ``fit["train"]``).

In both protocols each list's target lies past its ranker's data, train lists look like test
lists, and the teacher/evidence statistics of a list come from its split's fit data only, so they
never contain the target's own interaction or any later interaction of the user.
Mid-training trains on the fit data of the train split (it precedes every training target).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from gr2.errors import ConfigError, DataError, InvalidInputError

PROTOCOLS = ("leave_one_out", "time")
SPLITS = ("train", "valid", "test")


@dataclass
class Requests:
    """The (user, history, target) requests of one split, before any ranker sees them."""

    user_idx: np.ndarray  # int64 (N,)
    histories: list[np.ndarray]
    targets: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class ProtocolSplit:
    """Requests of every split and, per split, the sequences its ranker and statistics may use."""

    protocol: str
    requests: dict[str, Requests]
    fit: dict[str, list[np.ndarray]]  # split -> per-user fit sequences (same user order as ``users``)
    users: np.ndarray  # int64: user_idx of each fit sequence
    skipped_users: int = 0  # users too short for the protocol (counted, never silently dropped)
    notes: dict[str, object] = field(default_factory=dict)
    # rolling time cutoffs: split -> the fit slice of each request (absent: every request is slice 0)
    slice_of: dict[str, np.ndarray] = field(default_factory=dict)
    slice_fit: list[list[np.ndarray]] = field(default_factory=list)  # slice r -> per-user fit sequences

    def slices(self, name: str) -> np.ndarray:
        """The fit slice of every request of split ``name`` (zeros without rolling cutoffs)."""
        return self.slice_of.get(name, np.zeros(len(self.requests[name]), np.int64))

    def fit_of_slice(self, name: str, fit_slice: int) -> list[np.ndarray]:
        """The fit data of the requests of split ``name`` in slice ``fit_slice``."""
        return self.fit[name] if fit_slice == 0 else self.slice_fit[fit_slice]


@dataclass
class LeaveOneOut:
    """The leave-one-out split of chronological user sequences.

    ``train[u] = items[:-2]``; valid predicts ``items[-2]`` from ``items[:-2]``; test predicts
    ``items[-1]`` from ``items[:-1]``. Users with fewer than 3 items cannot be split and are
    listed in ``skipped_users`` (not silently dropped: the caller reports the count).
    """

    user_idx: np.ndarray  # int64 (U,)
    train: list[np.ndarray]
    valid_targets: np.ndarray  # int64 (U,)
    test_targets: np.ndarray  # int64 (U,)
    skipped_users: np.ndarray  # int64

    def valid_histories(self) -> list[np.ndarray]:
        return self.train

    def test_histories(self) -> list[np.ndarray]:
        return [np.append(t, v) for t, v in zip(self.train, self.valid_targets)]


def leave_one_out(user_idx: Sequence[int], sequences: Sequence[Sequence[int]]) -> LeaveOneOut:
    """Split chronological sequences leave-one-out (see :class:`LeaveOneOut`)."""
    if len(user_idx) != len(sequences):
        raise InvalidInputError(f"{len(user_idx)} user ids but {len(sequences)} sequences")
    keep, skipped, train, valid, test = [], [], [], [], []
    for u, seq in zip(user_idx, sequences):
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) < 3:
            skipped.append(int(u))
            continue
        keep.append(int(u))
        train.append(seq[:-2])
        valid.append(seq[-2])
        test.append(seq[-1])
    return LeaveOneOut(
        user_idx=np.asarray(keep, dtype=np.int64),
        train=train,
        valid_targets=np.asarray(valid, dtype=np.int64),
        test_targets=np.asarray(test, dtype=np.int64),
        skipped_users=np.asarray(skipped, dtype=np.int64),
    )


def _windows(user_idx: Sequence[int], sequences: Sequence[np.ndarray], starts: Sequence[int]) -> Requests:
    """Requests (history ``s[:t]``, target ``s[t]``) for every ``t >= start`` of each sequence."""
    users, histories, targets = [], [], []
    for u, seq, start in zip(user_idx, sequences, starts):
        for t in range(max(1, int(start)), len(seq)):
            users.append(int(u))
            histories.append(seq[:t])
            targets.append(int(seq[t]))
    return Requests(np.asarray(users, np.int64), histories, np.asarray(targets, np.int64))


def leave_one_out_protocol(user_idx: Sequence[int], sequences: Sequence[Sequence[int]], train_windows: int) -> ProtocolSplit:
    split = leave_one_out(user_idx, sequences)
    cuts = [max(1, len(s) - train_windows) for s in split.train]
    train = _windows(split.user_idx, split.train, cuts)
    valid = Requests(split.user_idx, split.valid_histories(), split.valid_targets)
    test = Requests(split.user_idx, split.test_histories(), split.test_targets)
    prefixes = [s[:c] for s, c in zip(split.train, cuts)]
    return ProtocolSplit(
        "leave_one_out", {"train": train, "valid": valid, "test": test},
        {"train": prefixes, "valid": split.train, "test": split.train},  # one object: one ranker
        split.user_idx, skipped_users=len(split.skipped_users),
        notes={"train_windows": train_windows},
    )


def time_protocol(user_idx: Sequence[int], sequences: Sequence[Sequence[int]], timestamps: Sequence[Sequence[int]],
                  train_cutoff: float, test_cutoff: float, valid_users: float, seed: int = 0,
                  max_test_requests: int = 0, rolling: int = 1) -> ProtocolSplit:
    """Global time cutoffs at the ``train_cutoff`` and ``test_cutoff`` quantiles (module docstring).

    ``max_test_requests`` > 0 keeps a seeded sample of that many test requests (the count before
    sampling is in ``notes``). ``rolling`` > 1 cuts the training window into that many time
    slices, each with its own fit data (module docstring)."""
    if not 0.0 < train_cutoff < test_cutoff < 1.0:
        raise ConfigError(f"candidates.time: need 0 < train_cutoff < test_cutoff < 1, got {train_cutoff}, {test_cutoff}")
    if not 0.0 <= valid_users < 1.0:
        raise ConfigError(f"candidates.time.valid_users must be in [0, 1), got {valid_users}")
    if isinstance(rolling, bool) or not isinstance(rolling, (int, np.integer)) or rolling < 1:
        raise ConfigError(f"candidates.time.rolling must be a whole number >= 1 (1 = one train cutoff), got {rolling!r}")
    seqs = [np.asarray(s, np.int64) for s in sequences]
    times = [np.asarray(t, np.int64) for t in timestamps]
    if any(len(s) != len(t) for s, t in zip(seqs, times)) or len(seqs) != len(times):
        raise DataError("every sequence needs one timestamp per item")
    every = np.concatenate(times) if times else np.zeros(0, np.int64)
    if len(every) == 0:
        raise DataError("no interactions to split")
    quantiles = np.linspace(train_cutoff, test_cutoff, int(rolling) + 1)
    cuts = np.quantile(every, quantiles, method="lower").astype(np.int64)  # slice starts, then the test cutoff
    c_train, c_test = cuts[0], cuts[-1]
    users = np.asarray(user_idx, np.int64)
    # position of the first interaction after each cutoff (sequences are chronological)
    ends = [[int(np.searchsorted(t, c, side="right")) for t in times] for c in cuts]
    n_train, n_test = ends[0], ends[-1]
    slices = [_windows(users, [s[:e] for s, e in zip(seqs, ends[r + 1])], ends[r]) for r in range(int(rolling))]
    window = _concat(slices)
    window_slice = np.concatenate([np.full(len(w), r, np.int64) for r, w in enumerate(slices)])
    test = _windows(users, seqs, n_test)
    if len(window) == 0:
        raise ConfigError(f"candidates.time.train_cutoff={train_cutoff}: no interaction falls between the cutoffs "
                          "(no training data); move the cutoffs apart")
    if empty := [r for r, w in enumerate(slices) if len(w) == 0]:
        raise ConfigError(f"candidates.time.rolling={rolling} leaves time slice(s) {empty} without an interaction "
                          "(timestamps tie across the slice boundaries); use fewer slices")
    if len(test) == 0:
        raise ConfigError(f"candidates.time.test_cutoff={test_cutoff} leaves no test interaction")
    rng = np.random.default_rng(seed)
    window_users = np.unique(window.user_idx)
    held = set(rng.choice(window_users, size=int(round(valid_users * len(window_users))), replace=False).tolist())
    is_valid = np.array([int(u) in held for u in window.user_idx], dtype=bool)

    def take(r: Requests, mask: np.ndarray) -> Requests:
        idx = np.nonzero(mask)[0]
        return Requests(r.user_idx[idx], [r.histories[i] for i in idx], r.targets[idx])

    test_total = len(test)
    if max_test_requests and len(test) > max_test_requests:
        pick = np.zeros(len(test), dtype=bool)
        pick[np.sort(np.random.default_rng([seed, 1]).choice(len(test), max_test_requests, replace=False))] = True
        test = take(test, pick)
    before_train = [s[:e] for s, e in zip(seqs, n_train)]
    notes: dict[str, object] = {"train_cutoff": {"quantile": train_cutoff, "timestamp": int(c_train)},
                                "test_cutoff": {"quantile": test_cutoff, "timestamp": int(c_test)},
                                "valid_users": len(held), "test_requests_before_sampling": test_total}
    rolled: dict[str, object] = {}
    if rolling > 1:
        notes["rolling_cutoffs"] = [{"quantile": float(q), "timestamp": int(c)} for q, c in zip(quantiles[:-1], cuts[:-1])]
        rolled = {"slice_of": {"train": window_slice[~is_valid], "valid": window_slice[is_valid]},
                  "slice_fit": [before_train] + [[s[:e] for s, e in zip(seqs, ends[r])] for r in range(1, int(rolling))]}
    return ProtocolSplit(
        "time", {"train": take(window, ~is_valid), "valid": take(window, is_valid), "test": test},
        {"train": before_train, "valid": before_train, "test": [s[:e] for s, e in zip(seqs, n_test)]},
        users, notes=notes, **rolled,
    )


def _concat(parts: Sequence[Requests]) -> Requests:
    """The requests of ``parts``, one after the other."""
    return Requests(np.concatenate([p.user_idx for p in parts]), [h for p in parts for h in p.histories],
                    np.concatenate([p.targets for p in parts]))


def train_sequences(sequences) -> list[np.ndarray]:
    """Every user's leave-one-out training prefix ``items[:-2]`` of a ``data/sequences`` dataset.

    What the sid stage's co-engagement loss may see. Under the time protocol this is looser than
    the per-split fit data (the prefix can reach past the time cutoff); the contrastive weight is 0
    by default, so no default run is affected.
    """
    return [np.asarray(items[:-2], dtype=np.int64) for items in sequences["items"]]


def fit_of_user(split: ProtocolSplit, name: str) -> dict[int, np.ndarray]:
    """user_idx -> fit sequence of split ``name``."""
    return {int(u): s for u, s in zip(split.users, split.fit[name])}


__all__ = ["PROTOCOLS", "SPLITS", "LeaveOneOut", "ProtocolSplit", "Requests", "fit_of_user", "leave_one_out",
           "leave_one_out_protocol", "time_protocol", "train_sequences"]


def leave_one_out_pairs(sequences: Sequence[Sequence[int]], split: str) -> tuple[list[list[int]], list[int]]:
    """Leave-one-out (histories, targets) of plain per-user item lists, for next-item evaluation:
    ``"valid"`` pairs ``s[:-2]`` with ``s[-2]``, ``"test"`` pairs ``s[:-1]`` with ``s[-1]`` (the
    histories and targets of :class:`LeaveOneOut`), for every sequence with at least one item
    before its target (a 2-item sequence has a test pair and no valid one)."""
    if split not in ("valid", "test"):
        raise InvalidInputError(f"leave-one-out split must be 'valid' or 'test', got {split!r}")
    cut = 1 if split == "test" else 2
    pairs = [(list(s[:-cut]), s[-cut]) for s in sequences if len(s) > cut]
    return [h for h, _ in pairs], [t for _, t in pairs]


def leave_one_out_prefixes(sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    """The leave-one-out training prefix ``s[:-2]`` of each plain per-user item list (the lists
    form of :func:`train_sequences`; empty for sequences of fewer than 3 items)."""
    return [list(s[:-2]) for s in sequences]
