"""Sentence embeddings: pooling against a direct reference, normalisation, cache, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny_models import save_tiny_encoder
import gr2.embed as embed
from gr2.embed import default_model_path, embed_texts, embedding_cache_key, encode_texts
from gr2.errors import Gr2IOError, InvalidInputError


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A 2-layer BERT built from a config (random weights) with the offline MiniLM tokenizer."""
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))


def test_mean_pooling_matches_unbatched_reference(tiny_encoder):
    from transformers import AutoModel, AutoTokenizer

    texts = ["Toy Story (1995) | Animation", "a much longer title with many more word pieces in it | Drama", "x"]
    got = encode_texts(texts, tiny_encoder, batch_size=2, progress=False)
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_encoder), AutoModel.from_pretrained(tiny_encoder).eval()
    for text, row in zip(texts, got):
        with torch.no_grad():  # one text at a time: no padding, plain mean over its tokens
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        expected = hidden.mean(0)
        expected = (expected / expected.norm()).numpy()
        np.testing.assert_allclose(row, expected, atol=1e-5)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_cache_hit_skips_the_model(tiny_encoder, tmp_path, monkeypatch):
    texts = ["alpha", "beta"]
    first = embed_texts(texts, tiny_encoder, tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.npy"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the model ran although the cache holds these texts")

    monkeypatch.setattr(embed, "encode_texts", fail)
    np.testing.assert_array_equal(embed_texts(texts, tiny_encoder, tmp_path, progress=False), first)


def test_cache_key_depends_on_texts_order_and_model(tiny_encoder):
    key = embedding_cache_key(["a", "b"], tiny_encoder, 128)
    assert key != embedding_cache_key(["b", "a"], tiny_encoder, 128)
    assert key != embedding_cache_key(["a", "b"], default_model_path(), 128)
    assert key != embedding_cache_key(["ab"], tiny_encoder, 128)
    assert key != embedding_cache_key(["a", "b"], tiny_encoder, 64)


def test_bad_input(tiny_encoder, tmp_path):
    with pytest.raises(InvalidInputError, match="non-empty list"):
        embed_texts([], tiny_encoder)
    with pytest.raises(InvalidInputError, match="empty or not strings.*position 1"):
        embed_texts(["ok", "  "], tiny_encoder)
    with pytest.raises(Gr2IOError, match="cannot load the sentence encoder"):
        embed_texts(["ok"], str(tmp_path / "no_model_here"))


def test_default_minilm_puts_related_titles_closer():
    texts = ["Toy Story (1995) | Animation, Children's, Comedy", "Toy Story 2 (1999) | Animation, Children's, Comedy",
             "Schindler's List (1993) | Drama, War"]
    vectors = embed_texts(texts, progress=False)
    assert vectors.shape == (3, 384)
    similar, different = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > different + 0.2
