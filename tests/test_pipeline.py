"""`gr2 run` end to end on a tiny slice of MovieLens-100k: every stage, the final report, stage
caching, resuming after a killed stage, and clear errors for bad configs.

Sizes are tiny (a 2-layer BERT encoder and a demo Llama built from configs, a few training steps)
so the whole pipeline runs in about a minute on a 2-core CPU; the stages' own tests cover quality.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from _tiny_models import save_tiny_encoder
from gr2 import cli
from gr2.config import load_toml
from gr2.pipeline.registry import STAGES
from gr2.data.formats import default_ml100k_dir
from gr2.errors import ConfigError
from gr2.pipeline import STAGE_ORDER, apply_overrides, build_run_config, parse_override, preset_path

SLICE_USERS = 50

TINY_CONFIG = """
name = "tiny"
description = "pipeline test: 50 users of ml-100k, tiny models"

[data]
format = "recbole"
path = "{data}"

[sid]
embed_model = "{encoder}"
[sid.rqvae]
levels = 3
codebook_size = 16
latent_dim = 8
hidden_dims = [32]
epochs = 5

[candidates]
upstream = "popularity"
k = 5
train_windows = 2

[midtrain]
base_model = "demo"
steps = 6
batch_size = 4
eval_users = 8
eval_beams = 5
eval_ks = [1, 5]
[midtrain.demo]
vocab_size = 400
hidden_size = 32
intermediate_size = 64
num_layers = 1
num_heads = 2
max_position_embeddings = 2048  # the prompts of this tiny tokenizer reach ~1,000 tokens; RL needs room for the answer

[traces]
backend = "heuristic"
attempts = 4
max_examples = 24

[sft]
epochs = 1
batch_size = 4

[rl]
steps = 1
group_size = 2
prompts_per_step = 2
max_reasoning_tokens = 4
max_train_prompts = 8
tensorboard = false

[rerank]
max_lists = 8
max_reasoning_tokens = 4

[eval]
n_boot = 50
"""


@pytest.fixture(scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, one_torch_thread) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    encoder = save_tiny_encoder(root / "tiny_bert")

    data = root / "data"
    data.mkdir()
    source = default_ml100k_dir()
    lines = (source / "ml-100k.inter").read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if int(line.split("\t")[0]) <= SLICE_USERS]
    (data / "slice.inter").write_text("\n".join(kept) + "\n")
    (data / "slice.item").write_text((source / "ml-100k.item").read_text())

    path = root / "tiny.toml"
    path.write_text(TINY_CONFIG.format(data=data, encoder=encoder))
    return path


def stage_records(run_dir: Path) -> dict[str, float]:
    return {p.parent.name: os.path.getmtime(p) for p in run_dir.glob("*/stage.json")}


@pytest.fixture(scope="module")
def finished_run(config_path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert cli.main(["run", "--config", str(config_path), "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_pipeline_writes_the_report(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    for key in ("dataset", "coverage", "sid", "methods", "decoding", "model", "teacher"):
        assert key in report
    assert report["sid"]["uniqueness_after_repair"] == 1.0
    assert 0 < report["coverage"] <= 1
    assert "heuristic" in report["teacher"]
    for method in ("upstream", "random", "popularity", "midtrain", "sft", "rl"):
        entry = report["methods"][method]
        for metric in ("recall@1", "recall@3", "recall@5", "ndcg@3", "ndcg@5"):
            value = entry[metric]
            assert value["ci_low"] <= value["value"] <= value["ci_high"]
        assert entry["validity"] == 1.0 and 0 <= entry["order_copy_rate"] <= 1
    for model in ("midtrain", "sft", "rl"):
        assert report["decoding"][model]["latency_ms_per_list"] > 0
    assert report["next_item"]["users"] > 0 and "recall@1" in report["next_item"]["popularity"]
    assert report["sft_heldout_nll"]["heldout_after"]["answer_nll"] > 0
    markdown = (finished_run / "report.md").read_text()
    assert "heuristic teacher" in markdown and "| rl |" in markdown
    assert "## Mid-training: next-item retrieval" in markdown and "| recall@1 |" in markdown
    assert "## SFT: held-out NLL" in markdown
    assert (finished_run / "metrics.png").stat().st_size > 0
    # provenance, the paired difference to upstream, the MDE and the RL curves (issue 17)
    assert report["environment"]["versions"]["torch"] == torch.__version__ and report["environment"]["cpu_model"]
    assert set(report["methods"]["rl"]["vs_upstream"]) >= {"recall@1", "recall@5", "ndcg@5"}
    assert report["mde"]["lists"] == report["eval"]["lists"] and (report["mde"]["value"] is None or report["mde"]["value"] > 0)
    assert "Δ vs upstream [95% CI]" in markdown and "smallest recall@1 gain detectable" in markdown
    assert report["rl_curves"]["rl"]["keys"][:1] == ["reward_mean"]  # eval_every = 0 here: training curves only
    assert (finished_run / "rl_curves.png").read_bytes()[:4] == b"\x89PNG" and "![rl curves](rl_curves.png)" in markdown


def test_same_config_and_seed_give_the_same_metrics(finished_run, config_path, tmp_path):
    """A second run from scratch (every stage retrained: SIDs, mid-training, traces, SFT, RL,
    rerank, eval) reports exactly the same numbers. Runs before the tests below change the first
    run's config."""
    again = tmp_path / "again"
    assert cli.main(["run", "--config", str(config_path), "--run-dir", str(again)]) == 0
    first = json.loads((finished_run / "report.json").read_text())
    second = json.loads((again / "report.json").read_text())
    for key in ("methods", "sid", "coverage", "next_item", "sft_heldout_nll", "mde"):
        assert first[key] == second[key], key
    assert first["environment"]["versions"] == second["environment"]["versions"]


def test_rerun_skips_every_finished_stage(finished_run, config_path):
    before = stage_records(finished_run)
    assert set(before) >= {"data", "sid", "candidates", "midtrain", "traces", "sft", "rl", "eval"}
    assert cli.main(["run", "--config", str(config_path), "--run-dir", str(finished_run)]) == 0
    assert stage_records(finished_run) == before


def test_resume_after_a_killed_stage_reruns_only_what_is_missing(finished_run, config_path):
    before = stage_records(finished_run)
    # a kill during sft leaves no sft/stage.json (it is written last); later stages never ran
    for stage in ("sft", "rl"):
        (finished_run / stage / "stage.json").unlink()
    assert cli.main(["run", "--config", str(config_path), "--run-dir", str(finished_run)]) == 0
    after = stage_records(finished_run)
    for stage in ("data", "sid", "candidates", "midtrain", "traces"):
        assert after[stage] == before[stage], f"{stage} reran"
    for stage in ("sft", "rl"):
        assert after[stage] > before[stage], f"{stage} did not rerun"


def test_the_reward_ablation_runs_over_a_finished_run(finished_run):
    """`gr2 rl --ablation`: both format-reward arms from the run's start model, evaluated on its
    valid prompts, with their curves, verdict and plot in rl_ablation/; a second call reuses both."""
    from gr2.pipeline.rl import run_ablation
    from gr2.train.dapo import DapoConfig

    config = DapoConfig(steps=2, eval_every=1, group_size=2, prompts_per_step=2, max_reasoning_tokens=4,
                        max_train_prompts=8, eval_prompts=4, tensorboard=False)
    result = run_ablation(finished_run, config)
    assert set(result["curves"]) == {"conditional", "unconditional"} and result["verdict"]
    for rows in result["curves"].values():
        assert [r["step"] for r in rows] == [0, 1, 2] and all(0 <= r["eval_recall@1"] <= 1 for r in rows)
    root = finished_run / "rl_ablation"
    assert json.loads((root / "ablation.json").read_text())["verdict"] == result["verdict"]
    assert (root / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    records = {arm: os.path.getmtime(root / arm / "stage.json") for arm in result["curves"]}
    assert run_ablation(finished_run, config)["final"] == result["final"]
    assert {arm: os.path.getmtime(root / arm / "stage.json") for arm in records} == records


def test_a_config_change_reruns_that_stage_and_what_follows(finished_run, config_path):
    before = stage_records(finished_run)
    assert cli.main(["run", "--config", str(config_path), "--run-dir", str(finished_run),
                     "--set", "eval.n_boot=60"]) == 0
    after = stage_records(finished_run)
    assert after["eval"] > before["eval"] and after["rl"] == before["rl"]


def test_bad_configs_get_clear_errors(config_path, tmp_path, capsys):
    table = load_toml(config_path)
    with pytest.raises(ConfigError, match="unknown key"):
        build_run_config({**table, "sft": {**table["sft"], "epochz": 1}})
    with pytest.raises(ConfigError, match="unknown stage"):
        build_run_config({**table, "stages": ["data", "magic"]})
    with pytest.raises(ConfigError, match="expected an integer"):
        build_run_config(apply_overrides(dict(table), ["sft.epochs='two'"]))
    with pytest.raises(ConfigError, match="stage.key=value"):
        parse_override("sft.epochs")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_path("nope")
    assert cli.main(["run", "--preset", "nope", "--run-dir", str(tmp_path / "x")]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_presets_parse():
    for name in ("demo", "smollm2", "paper"):
        run = build_run_config(load_toml(preset_path(name)))
        assert run.stages == list(STAGE_ORDER)


def test_under_torchrun_rank_1_trains_but_leaves_single_process_stages_to_rank_0(finished_run, config_path,
                                                                                monkeypatch, capsys):
    """`torchrun ... gr2 run` on rank 1 of 2 (the process group faked): the training stages run on
    every rank, the others (data ... prompts, traces, rerank, eval) on rank 0 alone -- one teacher
    request per list, one eval -- and every rank waits at a barrier after each stage. Rank 1 logs
    nothing. A stage subcommand that is not a training stage exits at once on rank != 0."""
    from gr2.pipeline import run as pipeline
    from gr2.train.distributed import World

    barriers: list[int] = []

    class RankOne(World):
        def barrier(self) -> None:
            barriers.append(1)

    for stage in ("rl", "eval"):
        (finished_run / stage / "stage.json").unlink()
    monkeypatch.setattr(pipeline, "pipeline_world", lambda run: RankOne(rank=1, size=2))
    capsys.readouterr()
    assert cli.main(["run", "--config", str(config_path), "--run-dir", str(finished_run)]) == 0
    assert (finished_run / "rl" / "stage.json").exists()  # a training stage: every rank trains
    assert not (finished_run / "eval" / "stage.json").exists()  # rank 0's job
    assert len(barriers) >= len(STAGES) - 1 and "[gr2 run]" not in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["eval", "--run-dir", str(finished_run)]) == 0
    assert not (finished_run / "eval" / "stage.json").exists()
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["eval", "--run-dir", str(finished_run)]) == 0  # rank 0 does it (and restores the run)
    assert (finished_run / "eval" / "stage.json").exists()
