"""Stage 2 reasoning SFT on heuristic-teacher traces with a tiny mid-trained model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_midtrain_fixtures import make_run_dir, tiny_midtrain_config

from gr2.errors import ConfigError, DataError
from gr2.models import load_pretrained
from gr2.pipeline.traces import TeacherConfig, run_traces
from gr2.train.checkpointing import latest_checkpoint
from gr2.train.optim import LoraSettings
from gr2.pipeline.midtrain import run_midtrain
from gr2.pipeline.sft import run_sft
from gr2.train.sft import SftConfig, split_completion, trace_example


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = make_run_dir(tmp_path_factory.mktemp("sft"), n_users=30)
    run_midtrain(run_dir, tiny_midtrain_config(steps=4, eval_users=2, eval_beams=2, eval_ks=[1]))
    run_traces(run_dir, TeacherConfig(mode="targeted"))
    return run_dir


def config(**overrides):
    base = dict(epochs=3, batch_size=4, lr=3e-3, warmup_steps=1, heldout_fraction=0.2, checkpoint_every=3,
                log_every=1, max_length=2048)
    base.update(overrides)
    return SftConfig(**base)


def copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("sft"))
    return dest


def test_sft_lowers_heldout_answer_nll(run_dir):
    summary = run_sft(run_dir, config())
    assert summary["teacher"] == ["heuristic teacher"]
    assert summary["train_traces"] + summary["heldout_traces"] == 30
    assert summary["heldout_after"]["answer_nll"] < summary["heldout_before"]["answer_nll"]
    assert summary["steps"] == 3 * 6
    model, tok = load_pretrained(run_dir / "sft" / "model")
    assert len(tok) == model.get_input_embeddings().weight.shape[0]
    assert json.loads((run_dir / "sft" / "report.json").read_text())["heldout_after"] == summary["heldout_after"]


def test_loss_weights_split_reasoning_and_answer(run_dir):
    _, tok = load_pretrained(run_dir / "midtrain" / "model")
    record = json.loads((run_dir / "traces" / "traces.jsonl").read_text().splitlines()[0])
    ex = trace_example(tok, record, 0.25, 1.0, 4096)
    reasoning, answer = split_completion(record["completion"])
    n_r = len(tok(reasoning, add_special_tokens=False)["input_ids"])
    n_a = len(tok(answer, add_special_tokens=False)["input_ids"]) + 1  # + end of turn
    assert ex.weights[-n_a:] == [1.0] * n_a
    assert ex.weights[-n_a - n_r:-n_a] == [0.25] * n_r
    assert set(ex.weights[:-n_a - n_r]) == {0.0}  # the prompt is context only
    assert tok.decode(ex.input_ids[-n_a - n_r:-1]) == record["completion"]


def test_sft_resume_after_kill_is_exact(run_dir, tmp_path):
    def kill_at(step):
        if step == 4:
            raise KeyboardInterrupt("killed")

    cfg = config(epochs=1, seed=2)
    killed = copy_run(run_dir, tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        run_sft(killed, cfg, on_step=kill_at)
    assert latest_checkpoint(killed / "sft" / "checkpoints").name == "step-00000003"
    resumed = run_sft(killed, cfg)
    assert resumed["resumed_from_step"] == 3
    straight = copy_run(run_dir, tmp_path / "straight")
    full = run_sft(straight, cfg)
    assert resumed["heldout_after"] == pytest.approx(full["heldout_after"], abs=1e-6)
    a, _ = load_pretrained(killed / "sft" / "model")
    b, _ = load_pretrained(straight / "sft" / "model")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_sft_twice_with_the_same_seed_is_bit_identical(run_dir, tmp_path):
    """Same config and seed on the same traces: identical held-out NLLs, training log and weights."""
    cfg = config(epochs=1, seed=3)
    runs = []
    for name in ("a", "b"):
        copy = copy_run(run_dir, tmp_path / name)
        summary = run_sft(copy, cfg)
        log = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (copy / "sft" / "metrics.jsonl").read_text().splitlines()]
        runs.append((summary, log, load_pretrained(copy / "sft" / "model")[0]))
    (sa, la, ma), (sb, lb, mb) = runs
    assert sa["heldout_after"] == sb["heldout_after"] and sa["heldout_before"] == sb["heldout_before"]
    assert la == lb and len(la) > 0
    for (name, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p, q), name


def test_sft_packing_and_lora(run_dir, tmp_path):
    packed = run_sft(copy_run(run_dir, tmp_path / "p"), config(epochs=1, packing=True, max_length=4096))
    assert packed["rows"] < packed["train_traces"]
    lora = run_sft(copy_run(run_dir, tmp_path / "l"), config(epochs=1, lora=LoraSettings(enabled=True, r=4)))
    assert lora["lora"] and lora["heldout_after"]["answer_nll"] != lora["heldout_before"]["answer_nll"]
    model, _ = load_pretrained(tmp_path / "l" / "sft" / "model")  # merged, loads without peft
    assert not hasattr(model, "peft_config")


def test_sft_bad_inputs(run_dir, tmp_path):
    with pytest.raises(ConfigError):
        SftConfig(lambda_answer=0.0)
    with pytest.raises(ConfigError):
        SftConfig(heldout_fraction=1.0)
    with pytest.raises(DataError, match="`midtrain`"):
        run_sft(tmp_path / "none", config())
    broken = copy_run(run_dir, tmp_path / "broken")
    (broken / "traces" / "traces.jsonl").write_text('{"accepted": true}\nnot json\n')
    with pytest.raises(DataError, match="`traces` has not finished"):  # outputs changed behind the record's back
        run_sft(broken, config(), force=True)
    from gr2 import rundir

    old = json.loads((broken / "traces" / "stage.json").read_text())
    rundir.mark_done(broken / "traces", old["key"], old["summary"])  # a finished traces stage that wrote junk
    with pytest.raises(DataError, match="not JSON"):
        run_sft(broken, config(), force=True)
    with pytest.raises(DataError):
        split_completion("<answer>x</answer>")
    _, tok = load_pretrained(run_dir / "midtrain" / "model")
    record = json.loads((run_dir / "traces" / "traces.jsonl").read_text().splitlines()[0])
    from gr2.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="max_length"):
        trace_example(tok, record, 0.5, 1.0, 16)


def test_bf16_sft_with_lr_1e6_moves_the_weights(run_dir, tmp_path):
    """The bf16 setting trains float32 master weights under autocast: with lr 1e-6 every layer
    weight moves by about the lr per step. Pure-bf16 parameters (the old CUDA path) would leave
    the weights at their bf16 rounding -- off by up to ~1e-4 and with the updates lost."""
    run = copy_run(run_dir, tmp_path / "bf16")
    summary = run_sft(run, config(epochs=1, lr=1e-6, warmup_steps=0, dtype="bf16", seed=4))
    steps = summary["steps"]
    before, _ = load_pretrained(run / "midtrain" / "model")
    after, _ = load_pretrained(run / "sft" / "model")
    old = dict(before.named_parameters())
    moved = total = 0
    for name, p in after.named_parameters():
        if "layers" in name and p.ndim == 2:
            assert p.dtype == torch.float32
            diff = (p - old[name]).detach().abs()
            assert float(diff.max()) <= 2 * steps * 1e-6, name  # moved by Adam steps of ~lr, not by rounding
            moved += int((diff > 0).sum())
            total += p.numel()
    assert moved / total > 0.9


@pytest.mark.parametrize("lr", [1e4, 1e8])
def test_a_diverging_sft_commits_nothing_and_names_the_setting(run_dir, tmp_path, lr):
    from gr2.errors import TrainingError

    run = copy_run(run_dir, tmp_path / "diverged")
    with pytest.raises(TrainingError, match=r"sft.*Lower sft.lr"):
        run_sft(run, config(epochs=2, lr=lr, warmup_steps=0))
    assert not (run / "sft" / "stage.json").exists() and not (run / "sft" / "model").exists()


def test_non_finite_settings_are_config_errors():
    from gr2.config import from_dict

    for value in (float("inf"), float("nan"), float("-inf")):
        with pytest.raises(ConfigError, match="sft.lr: expected a finite number"):
            from_dict(SftConfig, {"lr": value}, where="sft")


def _choices_reference(candidate_codes: list[tuple[int, ...]], answer_codes: list[tuple[int, ...]]) -> list[bool]:
    """Plain-Python reference: for each SID level token of the answer, whether constrained decoding
    had a choice there (the candidates not yet emitted that share the prefix so far differ at that
    level)."""
    remaining = list(candidate_codes)
    out = []
    for sid in answer_codes:
        for level in range(len(sid)):
            matching = {c[level] for c in remaining if c[:level] == sid[:level]}
            out.append(len(matching) > 1)
        remaining.remove(sid)
    return out


def test_decision_weights_keep_exactly_the_tokens_with_a_choice(run_dir):
    from gr2 import SidIndex
    from gr2.models import sid_tokens_of
    from gr2.pipeline.sft import load_kept_traces
    from gr2.train.sft import keep_decisions

    records = load_kept_traces(run_dir)[:12]
    _, tokenizer = load_pretrained(run_dir / "midtrain" / "model")
    index = SidIndex.load(run_dir / "sid" / "index.gr2sid")
    tokens = sid_tokens_of(tokenizer, index.level_sizes)
    code_of = tokens.code_of_token()
    examples = [trace_example(tokenizer, r, 0.5, 1.0, 2048) for r in records]
    kept = keep_decisions(tokenizer, records, examples, index, tokens)
    for record, ex, dec in zip(records, examples, kept):
        assert dec.input_ids == ex.input_ids
        ids, w = ex.input_ids, dec.weights
        start = len(ids) - 1 - ids[::-1].index(tokens.answer_open)  # the prompt's format line shows the tags too
        end = len(ids) - 1 - ids[::-1].index(tokens.answer_close)
        levels = [t for t in range(start + 1, end) if ids[t] in code_of]
        cands = [tuple(int(x) for x in c) for c in index.sids(np.asarray(record["candidates"], dtype=np.uint64))]
        answer = [tuple(code_of[ids[t]][1] for t in levels[i:i + len(cands[0])]) for i in range(0, len(levels), len(cands[0]))]
        expected = _choices_reference(cands, answer)
        assert [w[t] > 0 for t in levels] == expected
        assert any(expected) and not all(expected)
        tags = [t for t in range(start, len(ids)) if t not in levels]  # <answer>, delimiters, </answer>, end of turn
        assert all(w[t] == 0 for t in tags)
        think = [t for t in range(start) if ex.weights[t] > 0]
        if think:  # reasoning: <think> is forced, every free token and </think> are choices
            assert w[think[0]] == 0 and all(w[t] == ex.weights[t] for t in think[1:])


def test_sft_on_decision_tokens_runs_and_is_recorded(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "decisions")
    summary = run_sft(run, config(epochs=1, loss_tokens="decisions"))
    assert summary["loss_tokens"] == "decisions" and summary["heldout_after"]["answer_nll"] > 0
    with pytest.raises(ConfigError, match="sft.loss_tokens"):
        config(loss_tokens="answer")
