"""gr2.sid.diagnostics against plain-Python references, on random and adversarial inputs, and in the
sid stage."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gr2.errors import ConfigError, DataError, InvalidInputError
from gr2.sid.diagnostics import gini, nearest_neighbours, plot_diagnostics, sid_diagnostics

# ----------------------------------------------------------------------------------------------
# plain-Python references


def ref_per_level(codes, K):
    rows = [tuple(int(c) for c in row) for row in codes]
    out = []
    for level in range(len(rows[0])):
        counts = Counter(row[level] for row in rows)
        n = len(rows)
        entropy = -sum(c / n * math.log(c / n) for c in counts.values())
        children = defaultdict(set)
        for row in rows:
            children[row[:level]].add(row[level])
        sizes = [len(s) for s in children.values()]
        out.append({"utilisation": len(counts) / K, "perplexity": math.exp(entropy), "codes_used": len(counts),
                    "prefixes": len(children), "fanout_mean": sum(sizes) / len(sizes), "fanout_max": max(sizes)})
    return out


def ref_aliasing(codes):
    counts = Counter(tuple(int(c) for c in row) for row in codes)
    shared = [c for c in counts.values() if c >= 2]
    return {"items_aliased": sum(shared), "items_aliased_fraction": sum(shared) / len(codes),
            "collision_groups": len(shared), "largest_group": max(counts.values()), "distinct_codes": len(counts)}


def ref_gini(values):
    x = [float(v) for v in values]
    n, total = len(x), sum(x)
    if total == 0:
        return 0.0
    return sum(abs(a - b) for a in x for b in x) / (2 * n * total)


def ref_neighbours(embeddings, query, k):
    e = embeddings.astype(np.float64)
    q = e[query] / max(np.linalg.norm(e[query]), 1e-12)
    sims = []
    for j in range(len(e)):
        if j != query:
            sims.append((-(float(e[j] @ q) / max(np.linalg.norm(e[j]), 1e-12)), j))
    return [j for _, j in sorted(sims)[:k]]


def ref_agreement(codes, embeddings, queries, k):
    rows = [tuple(int(c) for c in row) for row in codes]
    n = len(rows)
    out = []
    for length in range(1, len(rows[0]) + 1):
        agree, rand = [], []
        for i in queries:
            nb = ref_neighbours(embeddings, i, k)
            agree.append(sum(rows[j][:length] == rows[i][:length] for j in nb) / len(nb))
            rand.append(sum(rows[j][:length] == rows[i][:length] for j in range(n) if j != i) / (n - 1))
        out.append((sum(agree) / len(agree), sum(rand) / len(rand)))
    return out


def check_code_figures(diag, before, after, K):
    for got, want in zip(diag["per_level"], ref_per_level(before, K), strict=True):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9), key
    for key, value in ref_aliasing(before).items():
        assert diag["aliasing"][key] == pytest.approx(value), key
    moved = sum(any(int(a) != int(b) for a, b in zip(rb, ra)) for rb, ra in zip(before, after[:, : before.shape[1]]))
    assert diag["repair"]["items_moved"] == moved
    assert diag["repair"]["level_appended"] == (after.shape[1] > before.shape[1])
    for got, want in zip(diag["repair"]["fanout_after_repair"], ref_per_level(after, max(int(after.max()) + 1, 1)),
                         strict=True):
        assert got["fanout_mean"] == pytest.approx(want["fanout_mean"])
        assert got["fanout_max"] == want["fanout_max"] and got["prefixes"] == want["prefixes"]


# ----------------------------------------------------------------------------------------------
# code figures


@pytest.mark.parametrize("seed", range(4))
def test_code_figures_random(seed):
    rng = np.random.default_rng(seed)
    n, levels, K = int(rng.integers(1, 200)), int(rng.integers(1, 5)), int(rng.integers(1, 9))
    before = rng.integers(0, K, size=(n, levels)).astype(np.uint16)
    after = before.copy()
    after[rng.random(n) < 0.2, -1] = rng.integers(0, K)
    if seed % 2:
        after = np.concatenate([after, rng.integers(0, 3, size=(n, 1)).astype(np.uint16)], axis=1)
    diag = sid_diagnostics(before, after, K)
    check_code_figures(diag, before, after, K)
    json.dumps(diag)  # JSON-able as it is


@pytest.mark.parametrize("case", ["all_same", "all_distinct", "one_level", "K1", "N1"])
def test_code_figures_adversarial(case):
    K = 16
    if case == "all_same":
        before = np.full((50, 3), 7, dtype=np.uint16)
    elif case == "all_distinct":
        before = np.stack([np.arange(64) // 16, (np.arange(64) // 4) % 4, np.arange(64) % 4], axis=1).astype(np.uint16)
    elif case == "one_level":
        before = np.random.default_rng(0).integers(0, K, size=(40, 1)).astype(np.uint8)
    elif case == "K1":
        K, before = 1, np.zeros((30, 2), dtype=np.uint16)
    else:
        before = np.array([[3, 5, 1]], dtype=np.uint16)
    diag = sid_diagnostics(before, before.copy(), K)
    check_code_figures(diag, before, before, K)
    if case == "all_same":
        assert diag["aliasing"] == {**diag["aliasing"], "items_aliased": 50, "collision_groups": 1, "largest_group": 50}
        assert all(row["perplexity"] == pytest.approx(1.0) and row["fanout_max"] == 1 for row in diag["per_level"])
    if case == "all_distinct":
        assert diag["aliasing"]["items_aliased"] == 0 and diag["aliasing"]["uniqueness"] == 1.0
        assert [row["perplexity"] for row in diag["per_level"]] == pytest.approx([4.0, 4.0, 4.0])
        assert [row["fanout_mean"] for row in diag["per_level"]] == pytest.approx([4.0, 4.0, 4.0])
    if case == "K1":
        assert all(row["utilisation"] == 1.0 and row["perplexity"] == pytest.approx(1.0) for row in diag["per_level"])
    if case == "N1":
        assert diag["aliasing"]["largest_group"] == 1 and diag["per_level"][0]["utilisation"] == 1 / 16


@given(
    hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12), elements=st.integers(0, 3)),
)
def test_code_figures_property(codes):
    diag = sid_diagnostics(codes, codes, 4)
    check_code_figures(diag, codes, codes, 4)
    for row in diag["per_level"]:
        assert 1.0 - 1e-9 <= row["perplexity"] <= row["codes_used"] + 1e-9
        assert row["fanout_max"] <= row["codes_used"]


def test_repair_counts():
    before = np.array([[0, 0], [0, 0], [1, 1], [1, 1], [2, 2]], dtype=np.uint16)
    moved = np.array([[0, 0], [0, 1], [1, 1], [1, 2], [2, 2]], dtype=np.uint16)
    diag = sid_diagnostics(before, moved, 4)
    assert diag["repair"] == {**diag["repair"], "items_moved": 2, "items_moved_fraction": 0.4, "level_appended": False}
    appended = np.concatenate([before, np.array([[0], [1], [0], [1], [0]], dtype=np.uint16)], axis=1)
    diag = sid_diagnostics(before, appended, 4)
    assert diag["repair"] == {**diag["repair"], "items_moved": 0, "level_appended": True, "items_nonzero_appended": 2,
                              "items_changed": 2, "levels_after": 3}


# ----------------------------------------------------------------------------------------------
# neighbour agreement


@pytest.mark.parametrize("seed", range(3))
def test_nearest_neighbours_brute_force(seed, monkeypatch):
    import gr2.sid.diagnostics as diagnostics

    monkeypatch.setattr(diagnostics, "_SIM_BLOCK_ELEMENTS", 64)  # many blocks
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(57, 6)).astype(np.float32)
    queries = np.sort(rng.choice(57, size=9, replace=False))
    got = nearest_neighbours(x, queries, 5)
    for row, q in zip(got, queries):
        assert list(row) == ref_neighbours(x, int(q), 5)


@pytest.mark.parametrize("seed", range(3))
def test_agreement_vs_reference(seed):
    rng = np.random.default_rng(seed)
    n, K = 60, 3
    codes = rng.integers(0, K, size=(n, 3)).astype(np.uint16)
    x = rng.normal(size=(n, 5)) + codes[:, :1] * 0.7  # some signal in level 1
    diag = sid_diagnostics(codes, codes, K, embeddings=x, sample=n, k=4)
    agreement = diag["neighbour_agreement"]
    assert agreement["sample"] == n and agreement["k"] == 4
    for got, (agree, rand) in zip(agreement["per_prefix"], ref_agreement(codes, x, range(n), 4), strict=True):
        assert got["agreement"] == pytest.approx(agree)
        assert got["random_baseline"] == pytest.approx(rand)
    # a sample is the seeded draw without replacement
    diag = sid_diagnostics(codes, codes, K, embeddings=x, sample=7, k=3, seed=5)
    queries = np.sort(np.random.default_rng(5).choice(n, size=7, replace=False))
    for got, (agree, rand) in zip(diag["neighbour_agreement"]["per_prefix"], ref_agreement(codes, x, queries, 3)):
        assert got["agreement"] == pytest.approx(agree) and got["random_baseline"] == pytest.approx(rand)


def test_agreement_clustered_is_one_and_random_is_baseline():
    rng = np.random.default_rng(0)
    n, K, levels = 2000, 8, 2
    codes = rng.integers(0, K, size=(n, levels)).astype(np.uint16)
    centres = rng.normal(size=(K * K, 32))
    clustered = centres[codes[:, 0].astype(int) * K + codes[:, 1]] + 1e-4 * rng.normal(size=(n, 32))
    agreement = sid_diagnostics(codes, codes, K, embeddings=clustered, sample=300, k=5)["neighbour_agreement"]
    assert [row["agreement"] for row in agreement["per_prefix"]] == [1.0, 1.0]
    assert agreement["per_prefix"][0]["random_baseline"] == pytest.approx(1 / K, rel=0.2)
    noise = rng.normal(size=(n, 32))
    agreement = sid_diagnostics(codes, codes, K, embeddings=noise, sample=500, k=10)["neighbour_agreement"]
    level1 = agreement["per_prefix"][0]
    assert abs(level1["agreement"] - level1["random_baseline"]) < 0.03  # ~ 1/8 each; sd ~ 0.005
    assert level1["lift"] == pytest.approx(1.0, abs=0.25)


def test_agreement_edge_cases():
    codes = np.array([[0, 1], [0, 2], [1, 0]], dtype=np.uint16)
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    agreement = sid_diagnostics(codes, codes, 4, embeddings=x, sample=10, k=10)["neighbour_agreement"]
    assert agreement["k"] == 2 and agreement["sample"] == 3  # k capped at N - 1, sample at N
    assert sid_diagnostics(codes, codes, 4, embeddings=x, sample=0)["neighbour_agreement"] is None
    assert sid_diagnostics(codes, codes, 4)["neighbour_agreement"] is None
    one = np.array([[1, 2]], dtype=np.uint16)
    assert sid_diagnostics(one, one, 4, embeddings=np.ones((1, 3)))["neighbour_agreement"] is None
    zeros = np.zeros((3, 2))  # zero vectors: similarity 0 to everything, still k neighbours each
    assert sid_diagnostics(codes, codes, 4, embeddings=zeros, k=1)["neighbour_agreement"]["k"] == 1


# ----------------------------------------------------------------------------------------------
# popularity


@pytest.mark.parametrize("seed", range(3))
def test_popularity_vs_reference(seed):
    rng = np.random.default_rng(seed)
    n, K = int(rng.integers(1, 80)), 6
    codes = rng.integers(0, K, size=(n, 2)).astype(np.uint16)
    popularity = rng.integers(0, 50, size=n).astype(np.int64)
    pop = sid_diagnostics(codes, codes, K, popularity=popularity)["popularity"]
    assert pop["gini_items"] == pytest.approx(ref_gini(popularity), abs=1e-12)
    mass = defaultdict(float)
    for row, p in zip(codes, popularity):
        mass[int(row[0])] += float(p)
    assert pop["gini_level1_codes"] == pytest.approx(ref_gini(mass.values()), abs=1e-12)
    total = sum(mass.values())
    shares = sorted((m / total for m in mass.values()), reverse=True) if total else [0.0] * len(mass)
    assert pop["level1_code_shares_sorted"] == pytest.approx(shares)
    assert pop["top_code_share"] == pytest.approx(shares[0])


def test_gini_extremes():
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.zeros(5)) == 0.0
    assert gini(np.array([0, 0, 0, 7.0])) == pytest.approx(3 / 4)
    assert gini(np.array([3.0])) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------
# errors


def test_errors():
    codes = np.zeros((4, 2), dtype=np.uint16)
    with pytest.raises(DataError):
        sid_diagnostics(np.zeros((0, 2), dtype=np.uint16), np.zeros((0, 2), dtype=np.uint16), 4)
    with pytest.raises(DataError):
        sid_diagnostics(np.zeros((3, 0), dtype=np.uint16), np.zeros((3, 0), dtype=np.uint16), 4)
    with pytest.raises(InvalidInputError, match="2-D"):
        sid_diagnostics(np.zeros(4, dtype=np.uint16), codes, 4)
    with pytest.raises(InvalidInputError, match="rows"):
        sid_diagnostics(codes, codes[:3], 4)
    with pytest.raises(InvalidInputError, match="levels"):
        sid_diagnostics(codes, np.zeros((4, 4), dtype=np.uint16), 4)
    with pytest.raises(InvalidInputError, match="integer"):
        sid_diagnostics(codes.astype(np.float32), codes, 4)
    with pytest.raises(InvalidInputError, match="negative"):
        sid_diagnostics(codes.astype(np.int64) - 1, codes, 4)
    with pytest.raises(InvalidInputError, match="codebook_size"):
        sid_diagnostics(codes + 4, codes, 4)
    with pytest.raises(InvalidInputError, match="codebook_size"):
        sid_diagnostics(codes, codes, 0)
    with pytest.raises(InvalidInputError, match="k must be"):
        sid_diagnostics(codes, codes, 4, embeddings=np.ones((4, 3)), k=0)
    with pytest.raises(InvalidInputError, match="sample"):
        sid_diagnostics(codes, codes, 4, sample=-1)
    with pytest.raises(InvalidInputError, match="NaN"):
        sid_diagnostics(codes, codes, 4, embeddings=np.array([[1.0, np.nan]] * 4))
    with pytest.raises(InvalidInputError, match="embeddings"):
        sid_diagnostics(codes, codes, 4, embeddings=np.ones((3, 2)))
    with pytest.raises(InvalidInputError, match="popularity"):
        sid_diagnostics(codes, codes, 4, popularity=np.ones(3))
    with pytest.raises(InvalidInputError, match="non-negative"):
        sid_diagnostics(codes, codes, 4, popularity=-np.ones(4))
    with pytest.raises(InvalidInputError, match="numpy"):
        sid_diagnostics([[0, 1]], codes, 4)


@pytest.mark.parametrize("key,value", [("diagnostics_sample", -1), ("diagnostics_k", 0), ("diagnostics_seed", -2),
                                       ("diagnostics_k", 2.5)])
def test_config_validation(key, value):
    from gr2.pipeline.sid import SidConfig

    with pytest.raises(ConfigError, match=key):
        SidConfig(**{key: value})


# ----------------------------------------------------------------------------------------------
# plot and stage


def test_plot_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8, size=(300, 3)).astype(np.uint16)
    diag = sid_diagnostics(codes, codes, 8, embeddings=rng.normal(size=(300, 4)), popularity=rng.random(300), sample=50)
    plot_diagnostics(diag, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_diagnostics(sid_diagnostics(codes[:1], codes[:1], 8), tmp_path / "bare.png")  # panels not computed
    assert (tmp_path / "bare.png").stat().st_size > 0


def test_sid_stage_writes_diagnostics(tmp_path_factory):
    from _tiny_models import save_tiny_encoder
    from gr2.data import load_items
    from gr2.pipeline.data import DataConfig, run_data
    from gr2.data.formats import default_ml100k_dir
    from gr2.pipeline.sid import SidConfig, run_sid
    from gr2.sid import RQVAEConfig

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source = default_ml100k_dir()
        folder = tmp_path_factory.mktemp("ml100k_diag")
        lines = (source / "ml-100k.inter").read_text().splitlines()
        kept = [lines[0]] + [line for line in lines[1:] if int(line.split("\t")[0]) <= 30]
        (folder / "slice.inter").write_text("\n".join(kept) + "\n")
        (folder / "slice.item").write_text((source / "ml-100k.item").read_text())
        run_dir = folder / "run"
        run_data(run_dir, DataConfig(path=str(folder)))
        config = SidConfig(
            rqvae=RQVAEConfig(levels=3, codebook_size=16, latent_dim=8, hidden_dims=[32], epochs=3),
            embed_model=save_tiny_encoder(tmp_path_factory.mktemp("tiny_bert")),
            diagnostics_sample=100, diagnostics_k=5,
        )
        run_sid(run_dir, config, progress=False)
    finally:
        torch.set_num_threads(before)
    report = json.loads((run_dir / "sid" / "report.json").read_text())
    diag = report["diagnostics"]
    n = len(load_items(run_dir))
    assert diag["items"] == n and len(diag["per_level"]) == 3
    assert diag["aliasing"]["uniqueness"] == pytest.approx(report["uniqueness_before_repair"])
    assert [row["utilisation"] for row in diag["per_level"]] == pytest.approx(report["utilisation"])
    assert diag["repair"]["level_appended"] == report["repair"]["level_appended"]
    assert diag["neighbour_agreement"]["sample"] == 100 and diag["neighbour_agreement"]["k"] == 5
    inter_rows = len(kept) - 1
    assert diag["popularity"]["total"] <= inter_rows and diag["popularity"]["total"] > 0
    assert (run_dir / "sid" / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    assert "diagnostics_s" in report["timings"]
