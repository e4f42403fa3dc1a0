"""Metrics of reranked lists: hand-computed cases, a plain-Python reference, bootstrap CIs, bad input."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gr2.errors import InvalidInputError, UnknownItemError
from gr2.eval import (
    METRICS,
    bootstrap_ci,
    evaluate_rankings,
    min_detectable_effect,
    paired_mde,
    per_list_metrics,
    popularity_order,
    random_order,
    score_order,
    upstream_order,
)

CANDS = np.array([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]], dtype=np.uint64)
TARGETS = np.array([12, 20], dtype=np.uint64)
RANKS = np.array([[12, 10, 11, 13, 14], [21, 22, 20, 23, 24]], dtype=np.uint64)


def test_hand_computed_case():
    r = evaluate_rankings(RANKS, np.array([True, True]), CANDS, TARGETS, n_boot=200)
    # list 0: target first; list 1: target third -> NDCG 1/log2(4) = 0.5
    assert r["recall@1"]["value"] == 0.5
    assert r["recall@3"]["value"] == 1.0
    assert r["recall@5"]["value"] == 1.0
    assert r["ndcg@3"]["value"] == pytest.approx(0.75)
    assert r["ndcg@5"]["value"] == pytest.approx(0.75)
    assert r["validity"]["value"] == 1.0
    assert r["order_copy"]["value"] == 0.0
    assert r["position_bias"] == [0, 1, 1, 0, 0]  # 12 sat at input position 2, 21 at 1
    assert (r["n"], r["k"]) == (2, 5)
    for m in METRICS:
        assert r[m]["ci_low"] <= r[m]["value"] <= r[m]["ci_high"]


def test_upstream_order_and_copy_rate():
    r = evaluate_rankings(CANDS, np.array([True, True]), CANDS, TARGETS, n_boot=50)
    # upstream: target 12 at rank 3, target 20 at rank 1
    assert r["recall@1"]["value"] == 0.5
    assert r["ndcg@3"]["value"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["order_copy"]["value"] == 1.0
    assert r["position_bias"] == [2, 0, 0, 0, 0]


def test_invalid_rows_miss_or_fall_back():
    garbage = RANKS.copy()
    garbage[1] = [99, 99, 99, 99, 99]  # unparseable output: ignored because marked invalid
    valid = np.array([True, False])
    miss = evaluate_rankings(garbage, valid, CANDS, TARGETS, n_boot=50)
    assert miss["recall@5"]["value"] == 0.5
    assert miss["validity"]["value"] == 0.5
    assert miss["position_bias"] == [0, 0, 1, 0, 0]
    fallback = evaluate_rankings(garbage, valid, CANDS, TARGETS, n_boot=50, invalid="upstream")
    assert fallback["recall@1"]["value"] == 1.0  # row 0 ranked first by the model, row 1 by upstream
    assert fallback["validity"]["value"] == 0.5


def reference_per_list(rankings, valid, candidates, targets):
    out = {m: [] for m in METRICS}
    for r, v, c, t in zip(rankings.tolist(), valid.tolist(), candidates.tolist(), targets.tolist()):
        rank = r.index(t) + 1 if v else None
        for k in (1, 3, 5):
            out[f"recall@{k}"].append(1.0 if rank is not None and rank <= k else 0.0)
        for k in (3, 5):
            out[f"ndcg@{k}"].append(1.0 / math.log2(rank + 1) if rank is not None and rank <= k else 0.0)
        out["validity"].append(1.0 if v else 0.0)
        out["order_copy"].append(1.0 if v and r == c else 0.0)
    return out


@given(st.integers(1, 30), st.integers(1, 12), st.integers(0, 2**31))
def test_matches_reference_on_random_lists(b, k, seed):
    rng = np.random.default_rng(seed)
    candidates = np.stack([rng.choice(1000, k, replace=False) for _ in range(b)]).astype(np.int64)
    targets = candidates[np.arange(b), rng.integers(0, k, b)]
    rankings = rng.permuted(candidates, axis=1)
    copy_rows = rng.random(b) < 0.3
    rankings[copy_rows] = candidates[copy_rows]
    valid = rng.random(b) < 0.8
    got = per_list_metrics(rankings, valid, candidates, targets)
    want = reference_per_list(rankings, valid, candidates, targets)
    for m in METRICS:
        np.testing.assert_allclose(got[m], want[m])


def test_bootstrap_matches_loop_reference_and_is_seeded():
    rng = np.random.default_rng(1)
    values = (rng.random((2, 40)) < 0.3).astype(float)
    low, high = bootstrap_ci(values, n_boot=300, seed=7)
    # reference: the same resamples drawn one at a time
    ref_rng = np.random.default_rng(7)
    idx = ref_rng.integers(0, 40, size=(300, 40))
    means = np.array([[values[m, row].mean() for row in idx] for m in range(2)])
    np.testing.assert_allclose(low, np.percentile(means, 2.5, axis=1))
    np.testing.assert_allclose(high, np.percentile(means, 97.5, axis=1))
    low2, high2 = bootstrap_ci(values, n_boot=300, seed=7, max_cells=100)  # chunked the same way
    np.testing.assert_allclose(low, low2)
    np.testing.assert_allclose(high, high2)
    const_low, const_high = bootstrap_ci(np.ones((1, 10)), n_boot=20)
    assert const_low[0] == const_high[0] == 1.0


def test_bad_input_errors():
    ok = np.array([True, True])
    no_target = TARGETS.copy()
    no_target[1] = 99
    with pytest.raises(InvalidInputError, match="not in candidate list 1"):
        evaluate_rankings(RANKS, ok, CANDS, no_target)
    dup = CANDS.copy()
    dup[0, 1] = 10
    with pytest.raises(InvalidInputError, match="duplicate"):
        evaluate_rankings(RANKS, ok, dup, TARGETS)
    with pytest.raises(InvalidInputError, match="K mismatch"):
        evaluate_rankings(RANKS[:, :4], ok, CANDS, TARGETS)
    bad = RANKS.copy()
    bad[0, 4] = 77
    with pytest.raises(UnknownItemError, match="77"):
        evaluate_rankings(bad, ok, CANDS, TARGETS)
    repeated = RANKS.copy()
    repeated[0, 4] = 12
    with pytest.raises(InvalidInputError, match="repeats"):
        evaluate_rankings(repeated, ok, CANDS, TARGETS)
    with pytest.raises(InvalidInputError, match="bool"):
        evaluate_rankings(RANKS, np.array([1, 1]), CANDS, TARGETS)
    with pytest.raises(InvalidInputError, match="targets"):
        evaluate_rankings(RANKS, ok, CANDS, TARGETS[:1])
    with pytest.raises(InvalidInputError, match="integer"):
        evaluate_rankings(RANKS.astype(float), ok, CANDS, TARGETS)
    with pytest.raises(InvalidInputError, match="invalid"):
        evaluate_rankings(RANKS, ok, CANDS, TARGETS, invalid="drop")


def test_baseline_orders():
    cands = np.array([[3, 1, 2], [5, 4, 6]])
    assert (upstream_order(cands) == cands).all()
    counts = np.array([0, 5, 9, 1, 7, 7, 2])
    np.testing.assert_array_equal(popularity_order(cands, counts), [[2, 1, 3], [5, 4, 6]])  # 5/4 tie keeps input order
    np.testing.assert_array_equal(score_order(cands, np.array([[0.1, 0.3, 0.2], [1.0, 2.0, 0.0]])), [[1, 2, 3], [4, 5, 6]])
    shuffled = random_order(cands, seed=3)
    assert (np.sort(shuffled, axis=1) == np.sort(cands, axis=1)).all()
    np.testing.assert_array_equal(shuffled, random_order(cands, seed=3))
    with pytest.raises(InvalidInputError, match="NaN"):
        score_order(cands, np.full((2, 3), np.nan))


def test_paired_difference_against_a_baseline():
    rng = np.random.default_rng(0)
    b, k = 200, 5
    candidates = np.stack([rng.choice(50, k, replace=False) for _ in range(b)])
    targets = candidates[np.arange(b), rng.integers(0, k, b)]
    better = candidates.copy()
    better[:, 0] = targets  # put the target first ...
    pos = np.argmax(candidates == targets[:, None], axis=1)
    better[np.arange(b), pos] = candidates[:, 0]  # ... by swapping it with the old first item
    ok = np.ones(b, dtype=bool)
    r = evaluate_rankings(better, ok, candidates, targets, n_boot=200, baseline=(candidates, ok))
    base = evaluate_rankings(candidates, ok, candidates, targets, n_boot=200)
    d = r["vs"]["recall@1"]
    assert r["vs"]["baseline"] == "upstream"
    assert d["value"] == pytest.approx(1.0 - base["recall@1"]["value"])
    assert 0 < d["ci_low"] <= d["value"] <= d["ci_high"]
    same = evaluate_rankings(candidates, ok, candidates, targets, n_boot=50, baseline=(candidates, ok))
    assert all(same["vs"][m]["value"] == same["vs"][m]["ci_low"] == same["vs"][m]["ci_high"] == 0.0
               for m in ("recall@1", "recall@3", "recall@5", "ndcg@3", "ndcg@5"))


def test_minimum_detectable_effect_has_the_stated_power():
    """MDE = (z_0.975 + z_0.8) sqrt((p (1 - p) + q (1 - q)) / n), q = p + MDE; a paired z-test on
    uncorrelated 0/1 hits whose true gain is the MDE rejects about 80% of the time (simulated, seeded)."""
    p, n = 0.16, 174
    mde = min_detectable_effect(p, n)
    q = p + mde
    assert mde == pytest.approx((1.959964 + 0.841621) * math.sqrt((p * (1 - p) + q * (1 - q)) / n), rel=1e-6)
    assert 0.10 < mde < 0.13  # the 174 MovieLens lists: a 10% relative gain (0.016) is invisible
    assert min_detectable_effect(p, 100 * n) == pytest.approx(2.8016 * math.sqrt(2 * p * (1 - p) / (100 * n)), rel=0.03)
    rng = np.random.default_rng(0)
    trials = 4000
    base = rng.random((trials, n)) < p
    method = rng.random((trials, n)) < p + mde
    d = method.astype(float) - base
    z = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    assert 0.74 < (z > 1.959964).mean() < 0.86
    # from a paired CI: half-width 1.96 SE -> MDE 2.80 SE
    assert paired_mde({"ci_low": -0.0196, "ci_high": 0.0196}) == pytest.approx(0.028016, rel=1e-4)
    zero = min_detectable_effect(0.0, 50)  # an upstream that never hits: still a positive MDE
    assert zero > 0 and zero == pytest.approx(2.801585 * math.sqrt(zero * (1 - zero) / 50), rel=1e-6)
    assert min_detectable_effect(1.0, 50) == 0.0  # nothing left to gain
    assert min_detectable_effect(0.9, 3) == math.inf  # 3 lists: not even recall 1.0 is detectable
    with pytest.raises(InvalidInputError):
        min_detectable_effect(1.5, 10)
    with pytest.raises(InvalidInputError):
        min_detectable_effect(0.2, 0)


@given(st.lists(st.integers(0, 30), min_size=1, max_size=40), st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_rank_metrics_matches_a_plain_loop(ranks, ks):
    from gr2.eval.metrics import rank_metrics

    got = rank_metrics(np.array(ranks, dtype=np.int64), ks)
    for k in ks:
        assert got[f"recall@{k}"].tolist() == [1.0 if 1 <= r <= k else 0.0 for r in ranks]
        assert np.allclose(got[f"ndcg@{k}"], [1 / math.log2(r + 1) if 1 <= r <= k else 0.0 for r in ranks])


def test_every_stage_scores_through_the_one_metric_implementation():
    """Mid-training's beams, the upstream rankers' full rankings, the reward batch's input-order
    metrics and reranked lists give the same numbers for the same target ranks, and no module
    but gr2.eval.metrics spells the NDCG discount (a second copy is a bug waiting to happen)."""
    from pathlib import Path

    import gr2
    from gr2.rewards import rank_metrics as reward_rank_metrics
    from gr2.train.midtrain import per_user_metrics
    from gr2.upstream import ranking_metrics

    ranks = np.array([1, 2, 3, 5, 4, 1, 0])  # 0: the target is not ranked
    k = 5
    candidates = np.tile(np.arange(10, 20), (len(ranks), 1))
    targets = np.full(len(ranks), 10)
    rankings = candidates.copy()
    for row, r in enumerate(ranks):
        if r:  # move the target to position r
            rest = [c for c in candidates[row] if c != 10]
            rankings[row] = rest[: r - 1] + [10] + rest[r - 1:]
    valid = ranks > 0
    listed = per_list_metrics(rankings, valid, candidates, targets)
    beams = [[int(x) for x in row] if v else [int(x) for x in row if x != 10] for row, v in zip(rankings, valid)]
    midtrain = per_user_metrics(beams, targets.tolist(), [k])
    hit, ndcg = reward_rank_metrics(ranks, (k,))
    full = ranking_metrics(np.where(ranks > 0, ranks, 10_000), k)
    for name, values in (("recall", hit[:, 0]), ("ndcg", ndcg[:, 0])):
        assert np.allclose(listed[f"{name}@{k}"], values)
        assert np.allclose(midtrain[f"{name}@{k}"], values)
        assert math.isclose(full[f"{name}@{k}"], values.mean())
    package = Path(gr2.__file__).parent
    spelled = [p.relative_to(package).as_posix() for p in package.rglob("*.py") if "log2(" in p.read_text()]
    assert spelled == ["eval/metrics.py"]
