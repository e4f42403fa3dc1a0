"""The memory plan (gr2.train.memory, issue 29): parameter counts on the meta device equal a real
model's, LoRA's trainable count equals peft's, a full fine-tune of Qwen3-8B is refused on an 80 GB
GPU, and every training stage of the `paper` preset fits one on 8 GPUs."""

from __future__ import annotations

import pytest
import torch

from gr2.errors import ConfigError
from gr2.pipeline import PRESET_DIR
from gr2.train import memory
from gr2.train.optim import LoraSettings, wrap_lora

GB80 = 80 * 10**9


def tiny_config():
    return dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=500, max_position_embeddings=256,
                tie_word_embeddings=False)


def test_meta_counts_equal_a_real_model_and_peft():
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = tiny_config()
    real = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    meta = memory.meta_model(tiny_config())
    assert all(p.device.type == "meta" for p in meta.parameters())
    full = memory.estimate(meta, lora=LoraSettings(), tokens_per_step=100, compute_dtype=torch.float32)
    assert full.parameters == full.trainable == sum(p.numel() for p in real.parameters())
    lora = LoraSettings(enabled=True, r=4)
    plan = memory.estimate(meta, lora=lora, tokens_per_step=100, compute_dtype=torch.bfloat16)
    wrapped = wrap_lora(real, lora)
    assert plan.trainable == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert plan.gradients == 4 * plan.trainable and plan.optimizer == 8 * plan.trainable


def test_frozen_weights_go_to_the_compute_dtype_and_trainable_stay_float32():
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = tiny_config()
    model = wrap_lora(AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)),
                      LoraSettings(enabled=True, r=4))
    memory.freeze_in_compute_dtype(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_full_fine_tune_of_qwen3_8b_is_refused_on_an_80gb_gpu():
    from gr2.train.midtrain import MidtrainConfig

    model = memory.meta_model("Qwen/Qwen3-8B")
    assert 8.1e9 < sum(p.numel() for p in model.parameters()) < 8.3e9
    config = MidtrainConfig(base_model="Qwen/Qwen3-8B", batch_size=64, max_length=512)
    plan = memory.estimate(model, lora=config.lora, tokens_per_step=memory.tokens_per_step("midtrain", config, 8),
                           compute_dtype=torch.bfloat16)
    assert plan.total > 128 * 2**30  # weights + gradients + AdamW alone: 16 bytes per parameter
    with pytest.raises(ConfigError, match=r"midtrain: the training plan needs about .* GiB per GPU.*midtrain.lora"):
        memory.check_fits(plan, torch.device("cuda", 0), "midtrain", capacity=GB80)


@pytest.mark.parametrize("stage", ["midtrain", "sft", "rl"])
def test_the_paper_preset_fits_8_gpus_of_80gb(stage):
    from gr2.config import load_toml
    from gr2.pipeline import build_run_config

    run = build_run_config(load_toml(PRESET_DIR / "paper.toml"))
    config = run.stage_configs[stage]
    base = run.stage_configs["midtrain"].base_model
    model = memory.meta_model(base)
    prompt_tokens = run.stage_configs["prompts"].max_tokens
    plan = memory.estimate(model, lora=config.lora, compute_dtype=torch.bfloat16,
                           tokens_per_step=memory.tokens_per_step(stage, config, 8, prompt_tokens))
    memory.check_fits(plan, torch.device("cuda", 0), stage, capacity=GB80)  # no ConfigError
    assert config.lora.enabled and plan.total > 20 * 2**30  # a real plan, not an empty one


def test_an_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="not a local model folder"):
        memory.meta_model("nobody/no-such-model")
