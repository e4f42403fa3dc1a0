"""RQ-VAE pieces against plain numpy / Python references, and small training runs."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gr2
from gr2.errors import ConfigError, InvalidInputError
from gr2.sid.rqvae import (
    RQVAEConfig,
    ResidualQuantizer,
    co_engagement_pairs,
    codebooks_array,
    collision_groups,
    contrastive_loss,
    diversity_loss,
    encode_latent,
    kmeans,
    random_last_level,
    squared_distances,
    train_rqvae,
    uniqueness,
    utilisation,
)

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is faster and immune to oversubscription on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


codes_strategy = hnp.arrays(np.uint16, st.tuples(st.integers(1, 40), st.integers(1, 4)), elements=st.integers(0, 3))


@given(codes_strategy)
def test_uniqueness_and_collision_groups_match_counter(codes):
    counts = collections.Counter(map(tuple, codes.tolist()))
    expected_unique = sum(1 for row in map(tuple, codes.tolist()) if counts[row] == 1) / len(codes)
    assert uniqueness(codes) == pytest.approx(expected_unique)
    expected_groups = collections.Counter(c for c in counts.values() if c >= 2)
    assert collision_groups(codes) == {str(k): v for k, v in sorted(expected_groups.items())}


@given(codes_strategy)
def test_utilisation_matches_sets(codes):
    assert utilisation(codes, 4) == [len(set(codes[:, l].tolist())) / 4 for l in range(codes.shape[1])]


@given(codes_strategy, st.integers(0, 2**32 - 1))
def test_random_last_level_replaces_only_the_last_column(codes, seed):
    out = random_last_level(codes, 7, seed)
    assert out.dtype == np.uint16 and out.shape == codes.shape
    np.testing.assert_array_equal(out[:, :-1], codes[:, :-1])
    assert out[:, -1].max() < 7
    np.testing.assert_array_equal(out, random_last_level(codes, 7, seed))
    np.testing.assert_array_equal(codes, codes.copy())  # input untouched


def test_random_last_level_is_spread():
    codes = np.zeros((2000, 3), dtype=np.uint16)
    last = random_last_level(codes, 16, 0)[:, -1]
    assert set(last.tolist()) == set(range(16))
    assert random_last_level(codes, 16, 1)[:, -1].tolist() != last.tolist()


@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 20), st.just(5)), elements=st.floats(-10, 10, width=32)),
       hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.just(5)), elements=st.floats(-10, 10, width=32)))
def test_squared_distances_match_numpy(x, c):
    expected = ((x[:, None, :].astype(np.float64) - c[None, :, :]) ** 2).sum(-1)
    got = squared_distances(torch.from_numpy(x), torch.from_numpy(c)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-2, rtol=1e-4)


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 4)) * 20
    points = np.concatenate([c + rng.normal(size=(50, 4)) * 0.1 for c in centres]).astype(np.float32)
    found = kmeans(torch.from_numpy(points), 5, 20, torch.Generator().manual_seed(0)).numpy()
    nearest = np.sqrt(((centres[:, None] - found[None]) ** 2).sum(-1)).min(1)
    assert nearest.max() < 0.2


def test_kmeans_with_more_clusters_than_points():
    points = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    found = kmeans(points, 5, 10, torch.Generator().manual_seed(0))
    assert found.shape == (5, 2)
    assert torch.isfinite(found).all()


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(levels=1, codebook_size=3, dim=2, ema=True, ema_decay=0.9)
    start = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    quantizer.set_codebook(0, start)
    residual = torch.tensor([[0.2, 0.0], [0.0, 0.2], [1.2, 1.0]])
    codes = torch.tensor([[0], [0], [1]])
    quantizer.ema_update([residual], codes)
    count = 0.9 * torch.ones(3) + 0.1 * torch.tensor([2.0, 1.0, 0.0])
    total = 0.9 * start + 0.1 * torch.stack([residual[0] + residual[1], residual[2], torch.zeros(2)])
    n = count.sum()
    smoothed = (count + 1e-5) / (n + 3e-5) * n
    torch.testing.assert_close(quantizer.codebooks[0], total / smoothed[:, None])


def test_diversity_loss_zero_when_usage_uniform_and_positive_when_collapsed():
    uniform = [torch.tensor([[0.0, 9.0], [9.0, 0.0]])]
    collapsed = [torch.tensor([[0.0, 9.0], [0.0, 9.0]])]
    assert float(diversity_loss(uniform, 0.1)) == pytest.approx(0.0, abs=1e-4)
    assert float(diversity_loss(collapsed, 0.1)) > 0.6


def test_contrastive_loss_prefers_aligned_pairs():
    z = torch.eye(4)
    assert float(contrastive_loss(z, z, 0.1)) < 0.01
    assert float(contrastive_loss(z, z.roll(1, 0), 0.1)) > 5


def test_co_engagement_pairs():
    pairs = co_engagement_pairs([np.array([0, 1, 1, 2]), np.array([2, 1]), np.array([3])], 4)
    assert pairs.tolist() == [[0, 1], [1, 2]]
    with pytest.raises(InvalidInputError, match="outside"):
        co_engagement_pairs([np.array([0, 9])], 4)


def test_config_validation():
    with pytest.raises(ConfigError):
        RQVAEConfig(codebook_size=70000)
    with pytest.raises(ConfigError):
        RQVAEConfig(ema_decay=1.0)
    with pytest.raises(ConfigError):
        RQVAEConfig(levels=0)


def clustered_embeddings(n=120, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, dim))
    x = centres[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


SMALL = dict(levels=3, codebook_size=16, latent_dim=8, hidden_dims=[32], epochs=30, batch_size=32)


@pytest.mark.parametrize("ema", [True, False])
def test_training_reduces_loss_and_rust_encoder_agrees_with_torch(ema):
    x = clustered_embeddings()
    model, log = train_rqvae(x, RQVAEConfig(**SMALL, ema=ema), progress=False)
    assert log["reconstruction"][-1] < log["reconstruction"][0]
    latent = encode_latent(model, x)
    with torch.no_grad():
        _, torch_codes, _, _ = model.quantizer(torch.from_numpy(latent))
    rust_codes = gr2.RQCodebooks(codebooks_array(model)).encode(latent)
    agreement = (rust_codes == torch_codes.numpy()).all(1).mean()
    assert agreement > 0.99  # float ties may differ, nothing else
    if ema:  # gradient-trained codebooks may partly collapse on such small data; EMA ones do not
        assert uniqueness(rust_codes) > 0.3


def test_training_is_deterministic_for_a_seed():
    x = clustered_embeddings()
    a, _ = train_rqvae(x, RQVAEConfig(**SMALL), progress=False)
    b, _ = train_rqvae(x, RQVAEConfig(**SMALL), progress=False)
    np.testing.assert_array_equal(codebooks_array(a), codebooks_array(b))


def test_dead_code_reset_moves_unused_codes():
    x = clustered_embeddings(n=40)
    config = RQVAEConfig(**dict(SMALL, codebook_size=64), dead_code_reset=True, dead_code_every=5)
    _, log = train_rqvae(x, config, progress=False)
    assert log["dead_codes_reset"] > 0


def test_contrastive_and_diversity_train(tmp_path):
    x = clustered_embeddings()
    sequences = [np.arange(i, i + 6) % 120 for i in range(0, 120, 6)]
    config = RQVAEConfig(**SMALL, contrastive_weight=0.1, diversity_weight=0.1)
    model, log = train_rqvae(x, config, sequences, progress=False)
    assert np.isfinite(log["loss"]).all()
    with pytest.raises(InvalidInputError, match="co-engagement pairs"):
        train_rqvae(x, config, [np.array([1])], progress=False)


def test_bad_embeddings():
    with pytest.raises(InvalidInputError, match="NaN"):
        train_rqvae(np.full((4, 3), np.nan, dtype=np.float32), RQVAEConfig(**SMALL), progress=False)
    with pytest.raises(InvalidInputError, match="shape"):
        train_rqvae(np.zeros(4, dtype=np.float32), RQVAEConfig(**SMALL), progress=False)
