"""Tiny models built from configs for tests (random weights, offline tokenizers)."""

from __future__ import annotations

from pathlib import Path

import torch

from gr2.embed import default_model_path


def save_tiny_encoder(path: Path) -> str:
    """A 2-layer BERT (random weights) with the offline MiniLM tokenizer, saved as an HF folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
