"""Ranking metrics, the one implementation every stage uses: reranked K-candidate lists (this
module's ``evaluate_rankings``), mid-training's next-item beams and the upstream rankers' full
rankings all score through :func:`rank_metrics`, with percentile-bootstrap confidence intervals.

A *method* is a ranking array: item ids (B, K), one row per list, plus a validity mask (B,) (False
where the model's output did not parse into a permutation of the candidates). Every list has
exactly one relevant item, its target, which must be among the candidates (the paper's protocol:
only lists containing the target are reranked).

Per list, with ``r`` the 1-based position of the target in the ranking:

- Recall@k = 1 if r <= k;  NDCG@k = 1 / log2(r + 1) if r <= k (the ideal DCG is 1);
- validity = the output was a valid permutation;
- order copy = valid and the ranking equals the input (upstream) order exactly;
- position bias = histogram of the *input* position (0-based) of the item ranked first, over
  valid lists (a model that always picks the first input has all its mass at 0).

Invalid lists count as misses on Recall/NDCG by default (``invalid="miss"``), the honest number
for a model served without a fallback; ``invalid="upstream"`` scores them with the upstream order
instead (what a production system with a fallback would show).
"""

from __future__ import annotations

import numpy as np

from gr2.errors import InvalidInputError, UnknownItemError

RECALL_KS = (1, 3, 5)
NDCG_KS = (3, 5)


def _as_items(name: str, x, ndim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise InvalidInputError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{name} must hold integer item ids, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise InvalidInputError(f"{name} holds a negative item id ({int(arr.min())})")
    return arr.astype(np.uint64)


def check_lists(candidates, targets) -> tuple[np.ndarray, np.ndarray]:
    """Validate candidate lists (B, K) and targets (B,): no duplicates, target in every list."""
    candidates = _as_items("candidates", candidates, 2)
    targets = _as_items("targets", targets, 1)
    if len(targets) != len(candidates):
        raise InvalidInputError(f"{len(candidates)} candidate lists but {len(targets)} targets")
    if candidates.shape[0] == 0 or candidates.shape[1] == 0:
        raise InvalidInputError(f"need at least one list of at least one candidate, got shape {candidates.shape}")
    ordered = np.sort(candidates, axis=1)
    dup_rows = np.nonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))[0]
    if len(dup_rows):
        row = int(dup_rows[0])
        raise InvalidInputError(
            f"candidate list {row} has duplicate items ({len(dup_rows)} list(s) affected): {candidates[row].tolist()}"
        )
    missing = np.nonzero(~(candidates == targets[:, None]).any(axis=1))[0]
    if len(missing):
        row = int(missing[0])
        raise InvalidInputError(
            f"target {int(targets[row])} is not in candidate list {row} ({len(missing)} list(s) without their "
            "target); keep only lists that contain the target and report coverage separately"
        )
    return candidates, targets


def check_rankings(rankings, valid, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate rankings (B, K) and validity (B,) against the candidates; valid rows must be
    permutations of their candidate list."""
    rankings = _as_items("rankings", rankings, 2)
    if rankings.shape != candidates.shape:
        raise InvalidInputError(
            f"rankings shape {rankings.shape} does not match candidates {candidates.shape} (K mismatch or wrong B)"
        )
    valid = np.asarray(valid)
    if valid.shape != (len(candidates),) or valid.dtype != np.bool_:
        raise InvalidInputError(f"valid must be a bool array of shape ({len(candidates)},), got {valid.dtype} {valid.shape}")
    member = (rankings[:, :, None] == candidates[:, None, :]).any(axis=2)
    unknown = np.nonzero(valid & ~member.all(axis=1))[0]
    if len(unknown):
        row = int(unknown[0])
        item = int(rankings[row][~member[row]][0])
        raise UnknownItemError(
            f"ranking {row} is marked valid but ranks item {item}, which is not among its candidates; "
            "mark it invalid or fix the parser"
        )
    ordered = np.sort(rankings, axis=1)
    dup = np.nonzero(valid & (ordered[:, 1:] == ordered[:, :-1]).any(axis=1))[0]
    if len(dup):
        raise InvalidInputError(f"ranking {int(dup[0])} is marked valid but repeats an item: {rankings[dup[0]].tolist()}")
    return rankings, valid


def rank_metrics(ranks, ks) -> dict[str, np.ndarray]:
    """Recall@k and NDCG@k (one relevant item, ideal DCG 1: ``1 / log2(rank + 1)``) of each row,
    float64 (B,) per metric, from the 1-based rank of its relevant item; rank 0 means "not ranked"
    (a miss at every k)."""
    rank = np.asarray(ranks)
    if rank.ndim != 1 or (rank.size and not np.issubdtype(rank.dtype, np.integer)):
        raise InvalidInputError(f"ranks must be a 1-D integer array, got {rank.dtype} {rank.shape}")
    if rank.size and rank.min() < 0:
        raise InvalidInputError(f"ranks are 1-based (0 = not ranked), got {int(rank.min())}")
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = (rank >= 1) & (rank <= k)
        out[f"recall@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(np.maximum(rank, 1) + 1.0), 0.0)
    return out


def per_list_metrics(rankings, valid, candidates, targets, *, invalid: str = "miss") -> dict[str, np.ndarray]:
    """Per-list metric values (float64 (B,) each) and the top-1 input positions (-1 if invalid)."""
    if invalid not in ("miss", "upstream"):
        raise InvalidInputError(f"invalid must be 'miss' or 'upstream', got {invalid!r}")
    candidates, targets = check_lists(candidates, targets)
    rankings, valid = check_rankings(rankings, valid, candidates)
    scored = rankings if invalid == "miss" else np.where(valid[:, None], rankings, candidates)
    counts = valid if invalid == "miss" else np.ones_like(valid)
    rank = np.where(counts, np.argmax(scored == targets[:, None], axis=1) + 1, 0)  # 1-based, 0 = a miss
    by_k = rank_metrics(rank, sorted(set(RECALL_KS) | set(NDCG_KS)))
    out: dict[str, np.ndarray] = {f"recall@{k}": by_k[f"recall@{k}"] for k in RECALL_KS}
    out.update({f"ndcg@{k}": by_k[f"ndcg@{k}"] for k in NDCG_KS})
    out["validity"] = valid.astype(np.float64)
    out["order_copy"] = (valid & (rankings == candidates).all(axis=1)).astype(np.float64)
    top1_position = np.argmax(candidates == rankings[:, :1], axis=1)
    out["top1_position"] = np.where(valid, top1_position, -1)
    return out


def bootstrap_ci(
    values: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95, max_cells: int = 4_000_000,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap CIs of the means of each row of ``values`` (M, B).

    The same resampled lists are used for every metric (rows), so CIs of different metrics come
    from one set of resamples. Vectorised in chunks of resamples to bound memory. With ``groups``
    (B,) (e.g. the user of each list) whole groups are resampled (cluster bootstrap): lists of one
    user are correlated, and resampling them one by one would make the CI too narrow.
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    m, b = values.shape
    if b == 0 or n_boot < 1:
        raise InvalidInputError(f"bootstrap needs lists and n_boot >= 1, got B={b}, n_boot={n_boot}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (b,):
            raise InvalidInputError(f"groups must have one entry per list ({b}), got shape {groups.shape}")
        _, inverse = np.unique(groups, return_inverse=True)
        sums = np.stack([np.bincount(inverse, weights=row) for row in values])  # (M, G)
        counts = np.bincount(inverse).astype(np.float64)
    else:
        sums, counts = values, np.ones(b)
    n_groups = sums.shape[1]
    rng = np.random.default_rng(seed)
    means = np.empty((m, n_boot))
    chunk = max(1, max_cells // n_groups)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n_groups, size=(stop - start, n_groups))
        means[:, start:stop] = sums[:, idx].sum(axis=2) / counts[idx].sum(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail], axis=1)
    return low, high


def evaluate_rankings(
    rankings,
    valid,
    candidates,
    targets,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    invalid: str = "miss",
    baseline: tuple[np.ndarray, np.ndarray] | None = None,
    baseline_name: str = "upstream",
    groups: np.ndarray | None = None,
) -> dict:
    """Metrics of one method with bootstrap 95% CIs.

    Returns ``{"n": B, "k": K, "invalid": policy, "recall@1": {"value", "ci_low", "ci_high"}, ...,
    "ndcg@5": {...}, "validity": {...}, "order_copy": {...}, "position_bias": [count per input
    position of the top-1 item, valid lists only]}``. With ``baseline=(rankings, valid)`` on the
    same lists it adds ``"vs": {"baseline": name, metric: {"value", "ci_low", "ci_high"}}``: the
    paired difference method - baseline per ranking metric, CIs from the same resampled lists (far
    tighter than comparing two separate CIs). ``groups`` (B,): resample whole groups (the user of
    each list) instead of lists, see :func:`bootstrap_ci`.
    """
    per_list = per_list_metrics(rankings, valid, candidates, targets, invalid=invalid)
    positions = per_list.pop("top1_position")
    names = list(per_list)
    values = np.stack([per_list[n] for n in names])
    low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed, groups=groups)
    b, k = np.asarray(candidates).shape
    result: dict = {"n": int(b), "k": int(k), "invalid": invalid}
    for i, name in enumerate(names):
        result[name] = {"value": float(values[i].mean()), "ci_low": float(low[i]), "ci_high": float(high[i])}
    result["position_bias"] = np.bincount(positions[positions >= 0], minlength=k).tolist()
    if baseline is not None:
        base = per_list_metrics(baseline[0], baseline[1], candidates, targets, invalid=invalid)
        ranking_names = [n for n in names if n.startswith(("recall", "ndcg"))]
        diff = np.stack([per_list[n] - base[n] for n in ranking_names])
        d_low, d_high = bootstrap_ci(diff, n_boot=n_boot, seed=seed, groups=groups)
        result["vs"] = {"baseline": baseline_name}
        for i, name in enumerate(ranking_names):
            result["vs"][name] = {"value": float(diff[i].mean()), "ci_low": float(d_low[i]), "ci_high": float(d_high[i])}
    return result


def min_detectable_effect(p: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true gain in a 0/1 per-list metric (e.g. Recall@1) that a two-sided paired test at
    level ``alpha`` detects with probability ``power`` on ``n`` lists, against a baseline whose mean
    is ``p``: the solution of

        MDE = (z_{1 - alpha/2} + z_{power}) * SE,   SE = sqrt((p (1 - p) + q (1 - q)) / n),  q = p + MDE

    (z sum 2.80 at the defaults; for small gains SE ~ sqrt(2 p (1 - p) / n)). SE is that of the
    paired difference d = m - b when the method's per-list hits are uncorrelated with the baseline's:
    var(d) = var(m) + var(b) - 2 cov(m, b), so a reranker whose hits agree with the upstream's on
    many lists (cov > 0) has a smaller SE, which its paired bootstrap CI shows (:func:`paired_mde`).
    Returns ``inf`` when not even a gain to recall 1.0 would be detected (very few lists).
    """
    from statistics import NormalDist

    if n < 1 or not 0.0 <= p <= 1.0:
        raise InvalidInputError(f"min_detectable_effect needs n >= 1 and 0 <= p <= 1, got n={n}, p={p}")
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0) + NormalDist().inv_cdf(power)
    def gap(m: float) -> float:  # convex in m, <= 0 at m = 0: one crossing in (0, 1 - p]
        q = p + m
        return m - z * float(np.sqrt((p * (1.0 - p) + q * (1.0 - q)) / n))

    if p >= 1.0:
        return 0.0  # nothing left to gain
    if gap(1.0 - p) < 0:
        return float("inf")  # even a perfect reranker would not be detected with so few lists
    lo, hi = 0.0, 1.0 - p
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    return float(hi)


def paired_mde(diff: dict, *, level: float = 0.95, alpha: float = 0.05, power: float = 0.8) -> float:
    """The MDE implied by one method's paired bootstrap CI ``{"ci_low", "ci_high"}`` of (method -
    baseline): SE = (ci_high - ci_low) / (2 z_{(1 + level)/2}) (the normal approximation of the
    percentile CI), MDE = (z_{1 - alpha/2} + z_{power}) * SE."""
    from statistics import NormalDist

    se = (diff["ci_high"] - diff["ci_low"]) / (2.0 * NormalDist().inv_cdf((1.0 + level) / 2.0))
    return float((NormalDist().inv_cdf(1.0 - alpha / 2.0) + NormalDist().inv_cdf(power)) * se)


METRICS = tuple(f"recall@{k}" for k in RECALL_KS) + tuple(f"ndcg@{k}" for k in NDCG_KS) + ("validity", "order_copy")
