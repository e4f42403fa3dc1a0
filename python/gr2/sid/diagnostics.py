"""SID diagnostics: how well a semantic-ID assignment uses its codebooks and follows the embeddings.

:func:`sid_diagnostics` returns a JSON-able dict of figures (pure numpy, vectorised):

* ``per_level``: per RQ level, the share of the K codes used (utilisation), the perplexity of the
  code usage (exp of its entropy: K when every code is used equally, 1 when one code takes all)
  and the prefix fan-out (distinct codes at this level under each distinct prefix of the levels
  above: mean and max);
* ``aliasing``: before repair, the share of items that share their full code with another item,
  the number of such collision groups and the largest one;
* ``repair``: how many rows the index repair changed (first L levels), whether it appended a
  level, and the fan-out of the repaired codes (the trie constrained decoding walks);
* ``neighbour_agreement``: for a seeded sample of items, the share of each item's k nearest
  embedding neighbours (cosine, the item itself excluded) that share its prefix of length l, for
  l = 1..L, next to the same share for a random other item (its exact expectation,
  (bucket size - 1) / (N - 1)) and their ratio (lift);
* ``cooccurrence_alignment``: for the pairs of different items consumed one after the other in a
  user's sequence, the share that share their prefix of length l, for l = 1..L, next to the
  share expected for random pairs drawn with the same item frequencies (and for uniformly random
  pairs), and their ratio (lift): do items consumed together sit under the same prefixes?
* ``popularity``: the Gini of item popularity, the Gini of popularity mass over the level-1 codes
  in use, the share of the most popular level-1 code and the sorted shares.

:func:`plot_diagnostics` draws them into one PNG. See docs/sid-diagnostics.md.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gr2.errors import DataError, InvalidInputError

# neighbour search: at most this many similarity entries (sample x block) in memory at once
_SIM_BLOCK_ELEMENTS = 1 << 24
_CODE_SHARES_KEPT = 1024


def _codes(codes: Any, name: str) -> np.ndarray:
    if not isinstance(codes, np.ndarray):
        raise InvalidInputError(f"{name} must be a numpy array, got {type(codes).__name__}")
    if codes.ndim != 2:
        raise InvalidInputError(f"{name} must be 2-D (items, levels), got shape {codes.shape}")
    if codes.shape[0] == 0 or codes.shape[1] == 0:
        raise DataError(f"{name} is empty (shape {codes.shape}); diagnostics need at least one item and one level")
    if not np.issubdtype(codes.dtype, np.integer):
        raise InvalidInputError(f"{name} must hold integer codes, got dtype {codes.dtype}")
    if np.issubdtype(codes.dtype, np.signedinteger) and (codes < 0).any():
        raise InvalidInputError(f"{name} holds negative codes")
    return codes.astype(np.int64, copy=False)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidInputError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _group_ids(codes: np.ndarray) -> list[np.ndarray]:
    """Dense ids of the prefixes of every length: ``out[l][i]`` numbers row i's codes[:, :l]
    (``out[0]`` is all zeros), in 0..(distinct prefixes of length l) - 1."""
    n, levels = codes.shape
    groups = [np.zeros(n, dtype=np.int64)]
    for level in range(levels):
        column = codes[:, level]
        width = int(column.max()) + 1
        _, inverse = np.unique(groups[-1] * width + column, return_inverse=True)
        groups.append(inverse.reshape(-1).astype(np.int64))
    return groups


def _perplexity(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _fanout(parent: np.ndarray, child: np.ndarray) -> tuple[float, int, int]:
    """(mean, max, number of parents) of distinct children per parent group."""
    parents = int(parent.max()) + 1
    # child ids are dense over (parent, code) pairs, so each distinct child has one parent
    child_parent = np.zeros(int(child.max()) + 1, dtype=np.int64)
    child_parent[child] = parent
    per_parent = np.bincount(child_parent, minlength=parents)
    return float(per_parent.mean()), int(per_parent.max()), parents


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values: 0 = all equal, (n-1)/n = one value holds all.
    0.0 when every value is 0."""
    x = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    n, total = len(x), float(x.sum())
    if n == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(2.0 * (ranks * x).sum() / (n * total) - (n + 1.0) / n)


def _levels_figures(codes: np.ndarray, groups: list[np.ndarray], codebook_size: int) -> list[dict[str, Any]]:
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        used = int((counts > 0).sum())
        mean, largest, parents = _fanout(groups[level], groups[level + 1])
        perplexity = _perplexity(counts)
        out.append({
            "level": level + 1,
            "codes_used": used,
            "utilisation": used / codebook_size,
            "perplexity": perplexity,
            "perplexity_ratio": perplexity / codebook_size,
            "prefixes": parents,
            "fanout_mean": mean,
            "fanout_max": largest,
        })
    return out


def _aliasing(full_group: np.ndarray) -> dict[str, Any]:
    counts = np.bincount(full_group)
    shared = counts[counts >= 2]
    n = len(full_group)
    return {
        "items_aliased": int(shared.sum()),
        "items_aliased_fraction": float(shared.sum() / n),
        "uniqueness": float(1.0 - shared.sum() / n),
        "distinct_codes": int(len(counts)),
        "collision_groups": int(len(shared)),
        "largest_group": int(counts.max()),
    }


def _repair(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    levels = before.shape[1]
    changed = (before != after[:, :levels]).any(axis=1)
    appended = after.shape[1] > levels
    out: dict[str, Any] = {
        "items_moved": int(changed.sum()),
        "items_moved_fraction": float(changed.mean()),
        "level_appended": bool(appended),
        "levels_after": int(after.shape[1]),
    }
    if appended:
        nonzero = (after[:, levels:] != 0).any(axis=1)
        out["items_nonzero_appended"] = int(nonzero.sum())
        out["items_changed"] = int((changed | nonzero).sum())
    else:
        out["items_nonzero_appended"] = 0
        out["items_changed"] = int(changed.sum())
    groups = _group_ids(after)
    out["fanout_after_repair"] = [
        dict(zip(("fanout_mean", "fanout_max", "prefixes"), _fanout(groups[level], groups[level + 1])), level=level + 1)
        for level in range(after.shape[1])
    ]
    return out


def nearest_neighbours(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(len(queries), k) row indices of the k nearest rows of ``embeddings`` by cosine similarity
    to the rows ``queries`` (indices into ``embeddings``), the query row itself excluded; nearest
    first (ties broken arbitrarily). Chunked over the catalogue: memory is O(queries x block)."""
    x = np.asarray(embeddings, dtype=np.float32)  # no copy when already float32
    inv_norm = np.float32(1.0) / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), np.float32(1e-12))
    q = x[queries] * inv_norm[queries, None]  # zero rows get similarity 0 to everything
    s, n = len(queries), len(x)
    block = max(k + 1, _SIM_BLOCK_ELEMENTS // max(s, 1))
    best_sim = np.full((s, 0), -np.inf, dtype=np.float32)
    best_idx = np.zeros((s, 0), dtype=np.int64)
    rows = np.arange(s)
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = q @ x[start:stop].T
        sims *= inv_norm[None, start:stop]
        inside = (queries >= start) & (queries < stop)
        sims[rows[inside], queries[inside] - start] = -np.inf
        take = min(k, stop - start)
        part = np.argpartition(-sims, take - 1, axis=1)[:, :take] if take < stop - start else np.broadcast_to(
            np.arange(stop - start), (s, stop - start))
        cand_sim = np.concatenate([best_sim, np.take_along_axis(sims, part, axis=1)], axis=1)
        cand_idx = np.concatenate([best_idx, part + start], axis=1)
        # nearest first, then lower index (lexsort: the last key is the primary one)
        order = np.lexsort((cand_idx, -cand_sim), axis=1)[:, :k]
        best_sim = np.take_along_axis(cand_sim, order, axis=1)
        best_idx = np.take_along_axis(cand_idx, order, axis=1)
    return best_idx


def _neighbour_agreement(codes: np.ndarray, groups: list[np.ndarray], embeddings: np.ndarray, sample: int, k: int,
                         seed: int) -> dict[str, Any] | None:
    n, levels = codes.shape
    if sample == 0 or n < 2:
        return None
    k_eff = min(k, n - 1)
    size = min(sample, n)
    queries = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    neighbours = nearest_neighbours(embeddings, queries, k_eff)
    per_prefix = []
    for length in range(1, levels + 1):
        g = groups[length]
        agree = (g[neighbours] == g[queries][:, None]).mean(axis=1)
        bucket = np.bincount(g)[g[queries]]
        random_pair = (bucket - 1) / (n - 1)
        a, r = float(agree.mean()), float(random_pair.mean())
        per_prefix.append({
            "prefix_length": length,
            "agreement": a,
            "random_baseline": r,
            "lift": a / r if r > 0 else None,
        })
    return {
        "sample": int(size),
        "k": int(k_eff),
        "seed": int(seed),
        "level1_agreement": per_prefix[0]["agreement"],
        "level1_random_baseline": per_prefix[0]["random_baseline"],
        "per_prefix": per_prefix,
    }


def consecutive_pairs(sequences: Any, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(first, second, repeats)``: the rows of every two items consumed one after the other in
    one of ``sequences`` (each a 1-D array of row indices into the N items), without the pairs of
    an item with itself (``repeats`` counts those)."""
    if isinstance(sequences, np.ndarray) and sequences.dtype != object:
        raise InvalidInputError("sequences must be a list of 1-D integer arrays (one per user), not one array")
    rows = []
    for user, seq in enumerate(sequences):
        seq = np.asarray(seq)
        if seq.ndim != 1 or (len(seq) and not np.issubdtype(seq.dtype, np.integer)):
            raise InvalidInputError(f"sequences[{user}] must be a 1-D integer array, got shape {seq.shape} "
                                    f"dtype {seq.dtype}")
        if len(seq) and (int(seq.min()) < 0 or int(seq.max()) >= n):
            raise InvalidInputError(f"sequences[{user}] holds item rows outside 0..{n - 1}")
        rows.append(seq.astype(np.int64, copy=False))
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0
    flat = np.concatenate(rows)
    ends = np.cumsum([len(r) for r in rows])
    follows = np.ones(max(len(flat) - 1, 0), dtype=bool)  # flat[i + 1] follows flat[i] in one sequence
    follows[ends[ends < len(flat)] - 1] = False
    first, second = flat[:-1][follows], flat[1:][follows]
    different = first != second
    return first[different], second[different], int((~different).sum())


def _cooccurrence_alignment(groups: list[np.ndarray], sequences: Any) -> dict[str, Any] | None:
    n = len(groups[0])
    first, second, repeats = consecutive_pairs(sequences, n)
    pairs = len(first)
    if pairs == 0:
        return None
    # Random pairs: the first item drawn as often as it is a pair's first item, the second as often
    # as it is a second, independently, and kept only when they differ (a co-consumed pair never
    # pairs an item with itself). Counted in integers so an impossible match is exactly 0.
    dtype = np.int64 if pairs < 3_000_000_000 else np.float64  # sums of count products < 2**63
    same_item = int(np.bincount(first, minlength=n).astype(dtype) @ np.bincount(second, minlength=n).astype(dtype))
    per_prefix = []
    for length in range(1, len(groups)):
        g = groups[length]
        share = float((g[first] == g[second]).mean())
        width = int(g.max()) + 1
        both = int(np.bincount(g[first], minlength=width).astype(dtype)
                   @ np.bincount(g[second], minlength=width).astype(dtype))
        matched = (both - same_item) / (pairs * pairs - same_item) if pairs * pairs > same_item else None
        counts = np.bincount(g).astype(np.float64)
        uniform = float((counts * (counts - 1)).sum() / (n * (n - 1))) if n > 1 else None
        per_prefix.append({
            "prefix_length": length,
            "share": share,
            "random_baseline": matched,
            "uniform_baseline": uniform,
            "lift": share / matched if matched else None,
        })
    return {
        "pairs": int(pairs),
        "repeats_skipped": repeats,
        "level1_share": per_prefix[0]["share"],
        "level1_lift": per_prefix[0]["lift"],
        "per_prefix": per_prefix,
    }


def _popularity(popularity: np.ndarray, level1: np.ndarray) -> dict[str, Any]:
    mass = np.bincount(level1, weights=popularity)
    used = mass[np.bincount(level1) > 0]
    total = float(popularity.sum())
    shares = np.sort(used)[::-1] / total if total > 0 else np.zeros(len(used))
    return {
        "total": total,
        "gini_items": gini(popularity),
        "gini_level1_codes": gini(used),
        "top_code_share": float(shares[0]) if len(shares) else 0.0,
        "level1_codes": int(len(used)),
        "level1_code_shares_sorted": [float(v) for v in shares[:_CODE_SHARES_KEPT]],
    }


def sid_diagnostics(
    codes_before_repair: np.ndarray,
    codes_after_repair: np.ndarray,
    codebook_size: int,
    embeddings: np.ndarray | None = None,
    popularity: np.ndarray | None = None,
    sample: int = 1000,
    k: int = 10,
    seed: int = 0,
    sequences: Any = None,
) -> dict[str, Any]:
    """Diagnostics of a SID assignment (see the module docstring for every figure).

    ``codes_before_repair``: (N, L) the assigned RQ codes, each in 0..codebook_size-1;
    ``codes_after_repair``: (N, L) or (N, L+1) the index's SIDs for the same rows
    (``index.sids(item_ids)``); ``embeddings``: (N, D) the item embeddings (None skips neighbour
    agreement, as does ``sample=0``); ``popularity``: (N,) non-negative interaction counts (None
    skips the popularity figures). Neighbour agreement uses ``sample`` items drawn without
    replacement by ``numpy.random.default_rng(seed)`` and their ``min(k, N-1)`` nearest neighbours.
    ``sequences``: one 1-D integer array of row indices (0..N-1) per user, in consumption order
    (None skips the co-occurrence alignment).
    """
    before = _codes(codes_before_repair, "codes_before_repair")
    after = _codes(codes_after_repair, "codes_after_repair")
    codebook_size = _check_int(codebook_size, "codebook_size", 1)
    sample = _check_int(sample, "sample", 0)
    k = _check_int(k, "k", 1)
    seed = _check_int(seed, "seed", 0)
    n, levels = before.shape
    if after.shape[0] != n:
        raise InvalidInputError(f"codes_after_repair has {after.shape[0]} rows but codes_before_repair has {n}")
    if after.shape[1] not in (levels, levels + 1):
        raise InvalidInputError(
            f"codes_after_repair has {after.shape[1]} levels; expected {levels} or {levels + 1} (an appended level)")
    if int(before.max()) >= codebook_size:
        raise InvalidInputError(f"codes_before_repair holds code {int(before.max())} >= codebook_size {codebook_size}")
    if embeddings is not None:
        if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 2 or embeddings.shape[0] != n:
            shape = getattr(embeddings, "shape", type(embeddings).__name__)
            raise InvalidInputError(f"embeddings must be a numpy array of shape ({n}, D), got {shape}")
        if embeddings.shape[1] == 0:
            raise DataError("embeddings have 0 dimensions")
        if not np.issubdtype(embeddings.dtype, np.number) or np.issubdtype(embeddings.dtype, np.complexfloating):
            raise InvalidInputError(f"embeddings must be real numbers, got dtype {embeddings.dtype}")
        if not np.isfinite(embeddings).all():
            raise InvalidInputError("embeddings hold NaN or infinite values")
    if popularity is not None:
        if not isinstance(popularity, np.ndarray) or popularity.shape != (n,):
            shape = getattr(popularity, "shape", type(popularity).__name__)
            raise InvalidInputError(f"popularity must be a numpy array of shape ({n},), got {shape}")
        if not np.issubdtype(popularity.dtype, np.number) or np.issubdtype(popularity.dtype, np.complexfloating):
            raise InvalidInputError(f"popularity must be real numbers, got dtype {popularity.dtype}")
        popularity = popularity.astype(np.float64)
        if not np.isfinite(popularity).all() or (popularity < 0).any():
            raise InvalidInputError("popularity must be finite and non-negative")

    groups = _group_ids(before)
    return {
        "items": int(n),
        "levels": int(levels),
        "codebook_size": codebook_size,
        "per_level": _levels_figures(before, groups, codebook_size),
        "aliasing": _aliasing(groups[-1]),
        "repair": _repair(before, after),
        "neighbour_agreement": (
            _neighbour_agreement(before, groups, embeddings, sample, k, seed) if embeddings is not None else None),
        "cooccurrence_alignment": _cooccurrence_alignment(groups, sequences) if sequences is not None else None,
        "popularity": _popularity(popularity, before[:, 0]) if popularity is not None else None,
    }


def plot_diagnostics(diag: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the diagnostics as a PNG (atomically): utilisation and perplexity per level, fan-out
    per level, neighbour agreement vs prefix length, popularity share per level-1 code (sorted).
    Panels whose figures were not computed say so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gr2.rundir import save_png

    per_level = diag["per_level"]
    levels = [row["level"] for row in per_level]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))

    ax = axes[0]
    ax.bar([lv - 0.2 for lv in levels], [row["utilisation"] for row in per_level], width=0.4, label="utilisation")
    ax.bar([lv + 0.2 for lv in levels], [row["perplexity_ratio"] for row in per_level], width=0.4,
           label="perplexity / K")
    ax.set(title=f"code usage (K = {diag['codebook_size']})", xlabel="level", ylim=(0, 1.05), xticks=levels)
    ax.legend(fontsize=8)

    ax = axes[1]
    ax.plot(levels, [row["fanout_mean"] for row in per_level], "o-", label="mean")
    ax.plot(levels, [row["fanout_max"] for row in per_level], "s--", label="max")
    ax.set(title="prefix fan-out (children per prefix)", xlabel="level", xticks=levels, yscale="log")
    ax.legend(fontsize=8)

    ax = axes[2]
    agreement = diag.get("neighbour_agreement")
    if agreement:
        lengths = [row["prefix_length"] for row in agreement["per_prefix"]]
        ax.plot(lengths, [row["agreement"] for row in agreement["per_prefix"]], "o-", label=f"embedding {agreement['k']}-NN")
        ax.plot(lengths, [row["random_baseline"] for row in agreement["per_prefix"]], "s--", label="random pair")
        ax.set(xticks=lengths, ylim=(0, 1.05))
        ax.legend(fontsize=8)
    cooccurrence = diag.get("cooccurrence_alignment")
    if cooccurrence:
        lengths = [row["prefix_length"] for row in cooccurrence["per_prefix"]]
        ax.plot(lengths, [row["share"] for row in cooccurrence["per_prefix"]], "^-", label="co-consumed pair")
        ax.plot(lengths, [row["random_baseline"] or 0.0 for row in cooccurrence["per_prefix"]], "v:",
                label="random pair, same item frequencies")
        ax.set(xticks=lengths, ylim=(0, 1.05))
        ax.legend(fontsize=8)
    if not agreement and not cooccurrence:
        ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="neighbour / co-occurrence agreement (share sharing prefix)", xlabel="prefix length")

    ax = axes[3]
    popularity = diag.get("popularity")
    if popularity and popularity["level1_code_shares_sorted"]:
        shares = popularity["level1_code_shares_sorted"]
        ax.bar(range(1, len(shares) + 1), shares, width=1.0)
        ax.set(title=f"popularity per level-1 code (Gini {popularity['gini_level1_codes']:.2f})",
               xlabel="code rank", ylabel="share of interactions")
    else:
        ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="popularity per level-1 code")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


__all__ = ["sid_diagnostics", "plot_diagnostics", "gini", "nearest_neighbours", "consecutive_pairs"]
