"""DAPO trainer (gr2.train.dapo) on a tiny model: loss, advantages, dynamic sampling, resume,
multi-process equivalence, config validation."""

from __future__ import annotations

import dataclasses

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import _dapo_fixtures as fx
from gr2.errors import ConfigError
from gr2.train.batches import epoch_order
from gr2.train.distributed import World
from gr2.train.losses import check_finite_weights
from gr2.train.optim import LoraSettings, make_optimizer
from gr2.train.dapo import (
    DapoConfig,
    dapo_loss,
    dapo_update,
    group_advantages,
    informative_groups,
    overlong_penalty,
    pack_rollouts,
    token_logprobs,
    train,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    model, tokenizer, sid_tokens = fx.tiny_policy()
    data, sids = fx.tiny_data(tokenizer)
    return model, tokenizer, sid_tokens, data, sids


def fresh(setup):
    """A fresh copy of the tiny policy (tests must not share trained weights)."""
    model, tokenizer, sid_tokens, data, sids = setup
    clone, _, _ = fx.tiny_policy()
    clone.load_state_dict(model.state_dict())
    return clone, tokenizer, sid_tokens, data, sids


# ---------------------------------------------------------------------------------------------
# pieces on plain arrays


def test_group_advantages_and_overlong_penalty():
    adv = group_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]), std_eps=1e-6)
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-5)
    np.testing.assert_array_equal(adv[1], 0.0)  # uniform group: no signal, no NaN
    pen = overlong_penalty(np.array([10, 60, 70, 80, 100, 120]), l_max=100, l_cache=40)
    np.testing.assert_allclose(pen, [0, 0, -0.25, -0.5, -1.0, -1.0])
    assert overlong_penalty(np.array([5, 500]), 0, 0).tolist() == [0.0, 0.0]


def test_informative_groups_use_outcome():
    outcomes = np.array([[0.1, 0.1, 0.1], [0.1, 0.2, 0.1], [0.0, 0.0, 0.0]])
    assert informative_groups(outcomes).tolist() == [False, True, False]


def test_dapo_loss_clips_asymmetrically_and_normalises_by_tokens():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    loss_pos, stats = dapo_loss(logp, old, torch.tensor([1.0]), mask, total_tokens=6, eps_low=0.2, eps_high=0.28)
    # positive advantage: ratios capped at 1.28 from above, 0.5 is kept as is (min of the two)
    assert loss_pos.item() == pytest.approx(-(1.28 + 0.5 + 1.1) / 6, rel=1e-6)
    assert stats["clipped_tokens"] == 1
    loss_neg, stats = dapo_loss(logp, old, torch.tensor([-1.0]), mask, total_tokens=3, eps_low=0.2, eps_high=0.28)
    # negative advantage: ratio floored at 0.8 (0.5 -> 0.8), large ratios are not capped
    assert loss_neg.item() == pytest.approx((1.5 + 0.8 + 1.1) / 3, rel=1e-6)
    assert stats["clipped_tokens"] == 1


# ---------------------------------------------------------------------------------------------
# on the tiny model


def test_completion_mask_covers_exactly_the_completion(setup):
    _, tokenizer, sid_tokens, data, sids = setup
    rollouts = fx.fixed_rollouts(tokenizer, sid_tokens, data, sids, groups=2, g=2)
    batch = pack_rollouts(rollouts, tokenizer.pad_token_id)
    for i, r in enumerate(rollouts):
        mask = batch["completion_mask"][i]
        assert mask.sum() == len(r.completion_ids)
        targets = batch["input_ids"][i, 1:][mask > 0].tolist()
        assert targets == r.completion_ids


def test_dapo_step_lowers_the_loss_on_a_fixed_batch(setup):
    model, tokenizer, sid_tokens, data, sids = fresh(setup)
    config = fx.small_config(grad_accum=2, lr=5e-3)
    rollouts = fx.fixed_rollouts(tokenizer, sid_tokens, data, sids, groups=3)
    batch = pack_rollouts(rollouts, tokenizer.pad_token_id)
    tokens = float(batch["completion_mask"].sum())
    with torch.no_grad():
        old = token_logprobs(model, batch)

    def loss_now():
        with torch.no_grad():
            loss, _ = dapo_loss(token_logprobs(model, batch), old, batch["advantages"], batch["completion_mask"],
                                tokens, config.eps_low, config.eps_high)
        return loss.item()

    before = loss_now()
    optimizer = make_optimizer(model, config.lr)
    stats = dapo_update(model, optimizer, None, rollouts, config, tokenizer.pad_token_id)
    assert stats["loss"] == pytest.approx(before, rel=1e-5, abs=1e-6)  # first update: ratio 1
    assert stats["clip_fraction"] == 0.0
    after = loss_now()
    assert after < before - 1e-3, (before, after)


def test_dynamic_sampling_drops_uniform_groups_and_refills(setup):
    model, tokenizer, sid_tokens, data, sids = fresh(setup)
    uniform = {int(epoch_order(len(data.targets), 1, 0)[i]) for i in (0, 2)}  # 1st and 3rd prompts drawn
    config = fx.small_config(prompts_per_step=3, max_generation_rounds=4)
    tr = fx.trainer(model, tokenizer, sid_tokens, data, sids, config, fx.scripted_rollouts(sids, sid_tokens, uniform))
    batch = tr.collect()
    assert batch.stats["kept_groups"] == 3
    assert batch.stats["generated_groups"] == 5  # two uniform groups dropped, two refills
    assert batch.stats["generation_rounds"] == 2
    assert len(batch.rollouts) == 3 * config.group_size
    kept_prompts = {tuple(r.prompt_ids) for r in batch.rollouts}
    assert not kept_prompts & {tuple(data.prompt_ids[u]) for u in uniform}
    # the cap on rounds: every group uniform -> nothing kept after max_generation_rounds, update skipped
    config = fx.small_config(prompts_per_step=2, max_generation_rounds=2)
    tr = fx.trainer(model, tokenizer, sid_tokens, data, sids, config,
                    fx.scripted_rollouts(sids, sid_tokens, set(range(len(data.targets)))))
    stats = tr.step()
    assert stats["kept_groups"] == 0 and stats["generated_groups"] == 4 and stats["skipped_update"] == 1.0
    assert stats["copy_rate"] == 1.0 and stats["valid_rate"] == 1.0
    # without dynamic sampling the uniform groups are kept
    config = fx.small_config(prompts_per_step=2, dynamic_sampling=False)
    tr = fx.trainer(model, tokenizer, sid_tokens, data, sids, config,
                    fx.scripted_rollouts(sids, sid_tokens, set(range(len(data.targets)))))
    assert tr.collect().stats["kept_groups"] == 2


def test_resume_reproduces_the_next_step_exactly(setup, tmp_path):
    _, tokenizer, sid_tokens, data, sids = setup
    config = fx.small_config(steps=2, save_every=1, keep_checkpoints=5, lr=1e-2)
    rollout = fx.scripted_rollouts(sids, sid_tokens)

    model_a = fresh(setup)[0]
    tr_a = fx.trainer(model_a, tokenizer, sid_tokens, data, sids, config, rollout)
    train(tr_a, tmp_path / "a", resume=False)
    assert (tmp_path / "a" / "checkpoints" / "step-00000002").exists()

    # "interrupted" run: copy the step-1 checkpoint only, then resume to step 2
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000001", tmp_path / "b" / "checkpoints" / "step-00000001")
    shutil.copy(tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl")
    model_b = fresh(setup)[0]
    tr_b = fx.trainer(model_b, tokenizer, sid_tokens, data, sids, config, rollout)
    train(tr_b, tmp_path / "b", resume=True)
    assert tr_b.step_count == 2 and tr_b.cursor == tr_a.cursor
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(pa, pb), name
    lines_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in __import__("json").loads(line).items() if not k.startswith("seconds")}  # noqa: E731
    assert [strip(x) for x in lines_a] == [strip(x) for x in lines_b]
    # the loop logged the reward parts and diagnostics
    assert {"reward_mean", "r_rank_mean", "kept_share", "copy_rate", "valid_rate", "completion_length",
            "clip_fraction", "loss"} <= set(strip(lines_a[-1]))


@pytest.mark.parametrize("change", [dict(tensorboard=True), dict(keep_checkpoints=3, save_every=2)])
def test_changed_logging_settings_resume_the_checkpoint(setup, tmp_path, caplog, change):
    """Settings that do not change the weights (DapoConfig.NOT_IN_CHECKPOINT_KEY: logging,
    evaluation, checkpoint cadence) are not in the checkpoint key: a run interrupted after step 1
    and resumed with one of them changed continues from step 1 (no stale-checkpoint line) and ends
    with the weights of the uninterrupted run; an lr change would discard it (the test below)."""
    import logging

    _, tokenizer, sid_tokens, data, sids = setup
    config = fx.small_config(steps=2, save_every=1, keep_checkpoints=5, lr=1e-2)
    rollout = fx.scripted_rollouts(sids, sid_tokens)
    straight = fx.trainer(fresh(setup)[0], tokenizer, sid_tokens, data, sids, config, rollout)
    train(straight, tmp_path / "a", resume=False)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000001", tmp_path / "b" / "checkpoints" / "step-00000001")
    changed = dataclasses.replace(config, **change)
    resumed = fx.trainer(fresh(setup)[0], tokenizer, sid_tokens, data, sids, changed, rollout)
    with caplog.at_level(logging.INFO, logger="gr2"):
        train(resumed, tmp_path / "b")
    assert not [r for r in caplog.records if "stale" in r.getMessage()]
    assert any("resuming from" in r.getMessage() for r in caplog.records)
    for (name, pa), (_, pb) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(pa, pb), name


def test_training_key_covers_what_changes_the_weights():
    from gr2.train.checkpointing import training_key
    from gr2.train.midtrain import MidtrainConfig
    from gr2.train.sft import SftConfig

    for cls, same, other in ((DapoConfig, dict(eval_every=7, eval_prompts=3, tensorboard=False), dict(lr=1e-3)),
                             (SftConfig, dict(log_every=1, checkpoint_every=3), dict(loss_tokens="decisions")),
                             (MidtrainConfig, dict(eval_users=5, eval_beams=30, log_every=1), dict(steps=7))):
        base = training_key(cls(), "input")
        assert training_key(cls(**same), "input") == base, cls
        assert training_key(cls(**other), "input") != base, cls
        assert training_key(cls(), "another input") != base, cls
        assert set(cls.NOT_IN_CHECKPOINT_KEY) <= {f.name for f in dataclasses.fields(cls)}, cls  # no stale names


def test_changed_lr_never_resumes_the_old_checkpoint(setup, tmp_path, caplog):
    """A finished run at rl.lr 1e-2, then the same folder at rl.lr 1e-3: the old step-2
    checkpoint is stale (another key), so the new run trains from the start (one log line) and
    equals a fresh lr-1e-3 run, instead of resuming the old policy and running zero steps."""
    import logging

    _, tokenizer, sid_tokens, data, sids = setup
    rollout = fx.scripted_rollouts(sids, sid_tokens)
    old = fx.trainer(fresh(setup)[0], tokenizer, sid_tokens, data, sids,
                     fx.small_config(steps=2, save_every=1, lr=1e-2), rollout)
    train(old, tmp_path / "rl")
    changed = fx.small_config(steps=2, save_every=1, lr=1e-3)
    again = fx.trainer(fresh(setup)[0], tokenizer, sid_tokens, data, sids, changed, rollout)
    with caplog.at_level(logging.WARNING, logger="gr2"):
        train(again, tmp_path / "rl")
    stale = [r.getMessage() for r in caplog.records if "stale checkpoint" in r.getMessage()]
    assert len(stale) == 1 and stale[0].startswith("rl: stale checkpoint (key ")
    assert stale[0].endswith(") ignored; training from the start")
    straight = fx.trainer(fresh(setup)[0], tokenizer, sid_tokens, data, sids, changed, rollout)
    train(straight, tmp_path / "straight", resume=False)
    assert again.step_count == 2 and again.cursor == straight.cursor
    assert again.optimizer.param_groups[0]["lr"] == 1e-3
    for (name, pa), (_, pb) in zip(again.model.named_parameters(), straight.model.named_parameters()):
        assert torch.equal(pa, pb), name


def test_bf16_setting_trains_fp32_master_weights(setup):
    """rl.dtype = bf16 with a policy loaded in bf16 (from_pretrained's "auto" dtype for Qwen3):
    the trainer keeps float32 parameters and runs forwards under autocast, so an lr-1e-6 step
    moves nearly every layer weight; on bf16 parameters it would round away."""
    _, tokenizer, sid_tokens, data, sids = setup
    model = fresh(setup)[0].to(torch.bfloat16)
    config = fx.small_config(steps=1, lr=1e-6, dtype="bf16", prompts_per_step=2)
    tr = fx.trainer(model, tokenizer, sid_tokens, data, sids, config, fx.scripted_rollouts(sids, sid_tokens))
    assert tr.precision == torch.bfloat16 and all(p.dtype == torch.float32 for p in tr.model.parameters())
    layer = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "layers" in n and p.ndim == 2}
    stats = tr.step()
    assert "skipped_update" not in stats
    params = dict(tr.model.named_parameters())
    moved = sum(int((params[n] != b).sum()) for n, b in layer.items())
    assert moved / sum(b.numel() for b in layer.values()) > 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(group_size=1), "group_size"),
        (dict(eps_low=0.3, eps_high=0.2), "eps_high"),
        (dict(outcome="reward"), "outcome"),
        (dict(overlong_max=10, overlong_cache=20), "overlong"),
        (dict(updates_per_batch=0), "updates_per_batch"),
        (dict(reward="mrr"), "rl.reward"),
        (dict(select="best"), "rl.select"),
        (dict(select="recall@1"), "rl.eval_every"),
        (dict(eval_prompts=-1), "eval_prompts"),
        (dict(max_train_prompts=-1), "max_train_prompts"),
        (dict(prompts_per_step=0), "prompts_per_step"),
        (dict(steps=0), "rl.steps"),
        (dict(kl_coef=-0.1), "kl_coef"),
    ],
)
def test_bad_configs_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DapoConfig(**kwargs)


def test_k_mismatch_is_rejected(setup):
    model, tokenizer, sid_tokens, data, sids = setup
    with pytest.raises(ConfigError, match="K = 4"):
        fx.trainer(model, tokenizer, sid_tokens, data, sids, fx.small_config(k=10), fx.scripted_rollouts(sids, sid_tokens))


def test_kl_without_a_reference_model_is_rejected(setup):
    """rl.kl_coef > 0 with no reference policy would silently train without the KL term."""
    model, tokenizer, sid_tokens, data, sids = setup
    with pytest.raises(ConfigError, match="rl.kl_coef"):
        fx.trainer(model, tokenizer, sid_tokens, data, sids, fx.small_config(kl_coef=0.1),
                   fx.scripted_rollouts(sids, sid_tokens))


def test_kl_to_the_reference_holds_the_policy_back(setup):
    """The same rollouts and advantages with and without the k3 KL term: with a large rl.kl_coef the
    policy moves less from the reference (the start model) -- the term is live, and pulls back."""
    import copy

    model, tokenizer, sid_tokens, data, sids = setup
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def moved(kl_coef: float) -> float:
        policy = copy.deepcopy(model)
        policy.load_state_dict(start)
        ref = copy.deepcopy(policy).eval().requires_grad_(False) if kl_coef else None
        config = fx.small_config(kl_coef=kl_coef, steps=4, updates_per_batch=3, dynamic_sampling=False, lr=3e-2)
        trainer = fx.DapoTrainer(policy, tokenizer, data, config, sid_tokens=sid_tokens, candidate_sids=sids,
                              rollout_fn=fx.scripted_rollouts(sids, sid_tokens), ref_model=ref)
        for _ in range(config.steps):
            trainer.step()
        return sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in policy.named_parameters())

    free, held = moved(0.0), moved(50.0)
    assert held < 0.9 * free, (free, held)


def test_config_from_toml(tmp_path):
    from gr2.config import from_dict

    cfg = from_dict(DapoConfig, {"group_size": 8, "lora": {"enabled": True, "r": 4}}, where="rl")
    assert cfg.group_size == 8 and cfg.lora.enabled and cfg.lora.r == 4
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(DapoConfig, {"group": 8}, where="rl")


def test_two_processes_give_the_same_update_as_one(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this python")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"params{n}.safetensors"
        done = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={n}",
                               str(Path(__file__).parent / "_dapo_ddp_worker.py"), str(out)],
                              env=env, capture_output=True, text=True, timeout=240)
        # the workers' own error, not only "exit status 1" (it failed once in a fresh clone, unexplained)
        assert done.returncode == 0, f"torchrun with {n} process(es) failed:\n{done.stderr[-4000:]}"
        from safetensors.torch import load_file

        outs[n] = load_file(str(out))
    model, _, _ = fx.tiny_policy()
    start = dict(model.named_parameters())
    moved = 0
    for name, p1 in outs[1].items():
        torch.testing.assert_close(outs[2][name], p1, rtol=1e-5, atol=1e-7)
        moved += int(not torch.equal(p1, start[name].detach()))
    assert moved > 0  # the update did change the weights


def test_constrained_rollouts_train_and_ablation_plots(setup, tmp_path):
    """Real rollouts through gr2.constrained_decode on the tiny model, and the ablation command's loop."""
    from gr2.train.dapo import DapoTrainer, RlData, ablation

    _, tokenizer, sid_tokens, data, sids = setup
    index = fx.tiny_index(data, sids)
    eval_data = RlData(data.prompt_texts[:3], data.prompt_ids[:3], data.candidates[:3], data.targets[:3])
    config = fx.small_config(steps=2, prompts_per_step=2, max_reasoning_tokens=3, constrained=True, eval_every=1,
                             max_generation_rounds=2)

    def make(cfg, out_dir):
        model = fresh(setup)[0]
        return DapoTrainer(model, tokenizer, data, cfg, index=index, sid_tokens=sid_tokens), eval_data

    result = ablation(make, config, tmp_path / "ablation")
    assert (tmp_path / "ablation" / "ablation.png").stat().st_size > 1000
    for arm in ("conditional", "unconditional"):
        curve = result["curves"][arm]
        assert [r["step"] for r in curve] == [0, 1, 2]
        assert all(r["eval_valid_rate"] == 1.0 for r in curve)  # constrained decoding is always valid
    rows = [__import__("json").loads(x) for x in (tmp_path / "ablation" / "conditional" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "valid_rate" in r]
    assert steps and all(r["valid_rate"] == 1.0 for r in steps)
    assert "verdict" in result


def test_rl_stage_end_to_end_from_the_cli(setup, tmp_path, monkeypatch):
    """`gr2 rl` on a run directory: data/items + sid index + candidates + sft/model -> rl/model,
    stage.json, a cache hit on the second call, exit code 2 on a bad config; the stage's last act
    is a barrier after rank 0 wrote its record (no rank returns before rl/ is complete)."""
    import json

    from datasets import Dataset

    import gr2
    from gr2.cli import main as cli_main
    from gr2.models import save_pretrained_atomic

    model, tokenizer, sid_tokens, _, _ = fresh(setup)
    data, sids = fx.tiny_data(tokenizer, stride=fx.K)  # items 0..n*K-1, dense as data/items wants
    run = tmp_path / "run"
    save_pretrained_atomic(model, tokenizer, run / "sft" / "model")
    n, n_items = len(data.targets), data.candidates.size
    Dataset.from_dict({"item_idx": list(range(n_items)), "item_id": [f"m{i}" for i in range(n_items)],
                       "title": [f"movie {i}" for i in range(n_items)], "categories": [["Drama"]] * n_items,
                       "year": [1990] * n_items, "text": [f"movie {i}" for i in range(n_items)]}
                      ).save_to_disk(str(run / "data" / "items"))
    index = gr2.SidIndex.build(data.candidates.reshape(-1), sids.reshape(-1, fx.LEVELS), codebook_size=list(fx.LEVEL_SIZES))
    assert index.levels == fx.LEVELS  # SIDs were unique: no disambiguation level
    (run / "sid").mkdir()
    index.save(str(run / "sid" / "index.gr2sid"))
    table = {"list_id": list(range(n)), "user_idx": list(range(n)),
             "history": [[int(data.candidates[(i + 1) % n, 0])] for i in range(n)],
             "candidates": data.candidates.astype(np.int64).tolist(), "scores": [[1.0] * fx.K] * n,
             "target": data.targets.astype(np.int64).tolist()}
    table["target"][0] = int(data.candidates[1, 0])  # a row whose target was not retrieved: dropped and counted
    for split in ("train", "valid", "test"):
        Dataset.from_dict(table).save_to_disk(str(run / "candidates" / split))
        Dataset.from_dict({"user_idx": list(range(n)), "items": [[int(data.candidates[(i + 1) % n, 0])] for i in range(n)]}
                          ).save_to_disk(str(run / "candidates" / f"fit_{split}"))
    from gr2.pipeline.prompts import run_prompts
    from gr2.prompts import PromptConfig
    from gr2.rundir import mark_done

    mark_done(run / "candidates", "cand", {})
    run_prompts(run, PromptConfig(max_tokens=4096))
    config = tmp_path / "rl.toml"
    config.write_text("[rl]\ngroup_size = 2\nprompts_per_step = 2\nsteps = 2\nmax_reasoning_tokens = 2\n"
                      "device = \"cpu\"\ntensorboard = false\neval_every = 0\nlr = 1e-3\n")
    barriers: list[bool] = []  # at each barrier: was the stage record already written?
    monkeypatch.setattr(World, "barrier", lambda self: barriers.append((run / "rl" / "stage.json").exists()))
    assert cli_main(["rl", "--run-dir", str(run), "--config", str(config)]) == 0
    assert barriers and barriers[-1], barriers
    record = json.loads((run / "rl" / "stage.json").read_text())
    assert record["summary"]["steps"] == 2 and record["summary"]["dropped_no_target"] == 1
    assert record["summary"]["base_stage"] == "sft" and record["summary"]["train_prompts"] == n - 1
    assert (run / "rl" / "model" / "config.json").exists() and (run / "rl" / "metrics.jsonl").exists()
    assert not (run / "rl" / "checkpoints").exists()  # cleaned up on success: nothing stale to resume later
    mtime = (run / "rl" / "model" / "config.json").stat().st_mtime
    assert cli_main(["rl", "--run-dir", str(run), "--config", str(config)]) == 0  # current: skipped
    assert (run / "rl" / "model" / "config.json").stat().st_mtime == mtime
    bad = tmp_path / "bad.toml"
    bad.write_text("[rl]\ngroup_size = 1\n")
    assert cli_main(["rl", "--run-dir", str(run), "--config", str(bad)]) == 2  # ConfigError -> exit 2
    # the answer-only arm: starts from sft_answer/, writes rl_answer/, decodes without <think>
    save_pretrained_atomic(model, tokenizer, run / "sft_answer" / "model")
    mark_done(run / "sft_answer", "sft-answer", {})
    assert cli_main(["rl", "--run-dir", str(run), "--config", str(config), "--arm", "answer"]) == 0
    answer = json.loads((run / "rl_answer" / "stage.json").read_text())["summary"]
    assert answer["arm"] == "answer" and answer["base_stage"] == "sft_answer" and answer["steps"] == 2
    assert answer["completion_length"] < record["summary"]["completion_length"]  # no reasoning tokens
    # best-of-validation selection: rl/model is the best evaluated policy, and the stage's record
    # still vouches for its folder (the selection's scratch files are gone before it is written)
    from gr2.rundir import read_stage

    selecting = tmp_path / "select.toml"
    selecting.write_text(config.read_text().replace("eval_every = 0", "eval_every = 1\nselect = \"ndcg@5\""))
    assert cli_main(["rl", "--run-dir", str(run), "--config", str(selecting), "--arm", "answer"]) == 0
    done = read_stage(run / "rl_answer")
    assert done is not None and done["summary"]["selected_step"] in (0, 1, 2)
    assert not (run / "rl_answer" / "best_policy.pt").exists() and not (run / "rl_answer" / "best.json").exists()


def test_lora_update_trains_adapters_only(setup):
    from gr2.train.dapo import DapoTrainer

    model, tokenizer, sid_tokens, data, sids = fresh(setup)
    config = fx.small_config(lora=LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0, train_embeddings=False))
    tr = DapoTrainer(model, tokenizer, data, config, sid_tokens=sid_tokens, candidate_sids=sids,
                     rollout_fn=fx.scripted_rollouts(sids, sid_tokens))
    frozen = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    stats = tr.step()
    assert stats["kept_groups"] > 0 and "loss" in stats
    params = dict(tr.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in lora.items())


def test_ndcg_reward_is_the_targets_top_weighted_gain(setup):
    model, tokenizer, sid_tokens, data, sids = setup
    tr = fx.trainer(model, tokenizer, sid_tokens, data, sids, fx.small_config(reward="ndcg"),
                    fx.scripted_rollouts(sids, sid_tokens))
    rank_tr = fx.trainer(model, tokenizer, sid_tokens, data, sids, fx.small_config(), fx.scripted_rollouts(sids, sid_tokens))
    row = 5
    target = int(np.flatnonzero(data.candidates[row] == data.targets[row])[0])
    others = [c for c in range(fx.K) if c != target]
    orders = [[target, *others], [*others[:1], target, *others[1:]], [*others, target]]
    completions = [fx.answer_ids(sid_tokens, sids[row], o, tokenizer.eos_token_id) for o in orders]
    ndcg = tr._rewards(completions, [row] * 3)
    expected = [1.0, 1 / np.log2(3), 1 / np.log2(fx.K + 1)]
    copied = [o == list(range(fx.K)) for o in orders]  # copying a non-optimal input order earns 0
    np.testing.assert_allclose(ndcg.reward, [0.0 if c and target != 0 else e for e, c in zip(expected, copied)])
    rank = rank_tr._rewards(completions, [row] * 3)
    assert not np.allclose(rank.reward, ndcg.reward)  # the option changes the reward


def test_select_keeps_the_policy_with_the_best_validation_metric(setup, tmp_path, monkeypatch):
    from gr2.train.dapo import trainer as trainer_mod

    model, tokenizer, sid_tokens, data, sids = fresh(setup)
    config = fx.small_config(steps=3, eval_every=1, select="ndcg@5", save_every=1)
    tr = fx.trainer(model, tokenizer, sid_tokens, data, sids, config, fx.scripted_rollouts(sids, sid_tokens))
    scores, states = iter([0.30, 0.50, 0.45, 0.20]), []  # step 0 (start), 1, 2, 3: step 1 is best

    def scripted_evaluate(trainer, _data):
        states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return {"eval_recall@1": 0.0, "eval_ndcg@5": next(scores)}

    monkeypatch.setattr(trainer_mod, "evaluate", scripted_evaluate)
    last = trainer_mod.train(tr, tmp_path / "rl", eval_data=data)
    assert len(states) == 4 and last["selected_step"] == 1 and last["selected_eval_ndcg@5"] == 0.5
    assert not torch.equal(states[1]["model.embed_tokens.weight"], states[3]["model.embed_tokens.weight"])
    for name, value in tr.model.state_dict().items():
        assert torch.equal(value, states[1][name]), name
    saved = __import__("json").loads((tmp_path / "rl" / "best.json").read_text())
    assert saved["step"] == 1 and saved["metric"] == "eval_ndcg@5"


def test_a_diverging_rl_step_raises_before_anything_is_committed(setup):
    from gr2.errors import TrainingError

    model, tokenizer, sid_tokens, data, sids = fresh(setup)
    tr = fx.trainer(model, tokenizer, sid_tokens, data, sids, fx.small_config(lr=1e12, max_grad_norm=1e30, steps=8),
                    fx.scripted_rollouts(sids, sid_tokens))
    with pytest.raises(TrainingError, match=r"rl diverged.*Lower rl.lr"):
        for _ in range(8):
            tr.step()
    with pytest.raises(TrainingError, match="rl: weight .* non-finite"):
        check_finite_weights(tr.model, "rl")


def test_sampled_rollouts_stop_at_the_end_of_turn_token(setup):
    """Unconstrained rollouts of a ChatML student: SFT taught it to close its turn with <|im_end|>,
    which is not the tokenizer's eos here; generation must stop there (and the verifier must take
    it as a trailer), or every sampled completion runs on to max_new_tokens and is invalid."""
    from gr2.train.dapo.rollouts import sampled_rollouts

    model, tokenizer, sid_tokens, data, sids = setup
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.eos_token_id
    answer = fx.answer_ids(sid_tokens, sids[0], list(range(fx.K)), im_end)[4:]  # <answer> ... </answer> <|im_end|>
    assert answer[0] == sid_tokens.answer_open
    config = fx.small_config(constrained=False, reasoning=False, max_reasoning_tokens=0, max_new_tokens=len(answer) + 5)
    trainer = fx.trainer(model, tokenizer, sid_tokens, data, sids, config, fx.scripted_rollouts(sids, sid_tokens))
    assert im_end in trainer.ctx["stop_ids"] and tokenizer.eos_token_id in trainer.ctx["stop_ids"]
    seen = {}

    def generate(ids, *, eos_token_id, max_new_tokens, num_return_sequences, **_):
        seen["eos"] = eos_token_id
        tail = torch.tensor(answer + [7, 8, 9, 10, 11])[:max_new_tokens]  # what follows the turn is noise
        return torch.cat([ids.repeat_interleave(num_return_sequences, 0),
                          tail.expand(ids.shape[0] * num_return_sequences, -1)], dim=1)

    model.generate = generate
    try:
        out = sampled_rollouts(model, tokenizer, [data.prompt_texts[0]], data.candidates[:1], 2, [0], config, trainer.ctx)
    finally:
        del model.generate
    assert set(seen["eos"]) == set(trainer.ctx["stop_ids"])
    assert out[0][0] == answer and out[0][1] == answer  # cut right after <|im_end|>
    rewards = trainer._rewards(out[0], [0, 0])
    assert rewards.valid.all()
