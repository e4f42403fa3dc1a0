"""The run report (gr2.pipeline.report): provenance (package versions, CPU, commit), the paired difference to
the upstream order with its CI per method, the minimum detectable effect, and the RL curves PNG
drawn from rl/metrics.jsonl. On a small synthetic run directory, no model training."""

import json
import platform

import numpy as np
import pytest
from datasets import load_from_disk

from gr2.candidates import CandidatesConfig
from gr2.pipeline.candidates import run_candidates
from gr2.errors import CorruptFileError
from gr2.eval.rankings import save_rankings
from gr2.pipeline.eval import EvalConfig, run_eval
from gr2.pipeline import RunConfig
from gr2.pipeline.report import environment, plot_rl_curves, read_metrics_log, write_run_report

from _fixtures_upstream import synthetic_tables, write_data_stage


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reportrun")
    write_data_stage(root, *synthetic_tables(n_users=80, n_items=40, seed=5))
    run_candidates(root, CandidatesConfig(upstream="popularity", k=5, train_windows=1))
    test = load_from_disk(str(root / "candidates" / "test"))
    cands = np.array(test["candidates"])
    targets = np.array(test["target"])
    oracle = cands.copy()  # "rl": the target first (swapped with the upstream top-1) on every list
    pos = np.argmax(cands == targets[:, None], axis=1)
    oracle[np.arange(len(cands)), pos] = cands[:, 0]
    oracle[:, 0] = targets
    valid = np.ones(len(cands), bool)
    for stage, ranking in (("rl", oracle), ("sft", cands), ("rl_answer", oracle), ("sft_answer", cands)):
        (root / stage).mkdir()  # RL arms rank the target first, their SFT starts keep the upstream order
        save_rankings(root / stage / "rankings_test.npz", test["list_id"], ranking, valid, candidates=cands)
    run_eval(root, EvalConfig(n_boot=200))
    return root


def rl_log(path, eval_keys=True):
    rows = []
    if eval_keys:
        rows.append({"step": 0, "eval_recall@1": 0.1, "eval_ndcg@5": 0.3, "eval_valid_rate": 0.9,
                     "eval_pre_recall@1": 0.2, "eval_pre_ndcg@5": 0.4})
    for step in range(1, 5):
        row = {"step": step, "reward_mean": 0.1 * step, "r_rank_mean": 0.05 * step, "valid_rate": 0.8 + 0.05 * step,
               "loss": 1.0 / step, "seconds": 0.1}
        if eval_keys and step % 2 == 0:
            row.update({"eval_recall@1": 0.1 + 0.1 * step, "eval_ndcg@5": 0.3 + 0.05 * step, "eval_valid_rate": 1.0,
                        "eval_pre_recall@1": 0.2, "eval_pre_ndcg@5": 0.4})
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_environment_names_versions_cpu_and_commit():
    env = environment()
    import datasets
    import torch
    import transformers

    assert env["versions"]["python"] == platform.python_version()
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["transformers"] == transformers.__version__
    assert env["versions"]["numpy"] == np.__version__ and env["versions"]["datasets"] == datasets.__version__
    assert env["versions"]["gr2"] and env["cpu_model"] and env["cpu_count"] >= 1 and env["platform"]
    assert env["cuda_device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    if env["git"] is not None:  # the tests run from a checkout: its commit
        assert len(env["git"]["commit"]) == 40 and isinstance(env["git"]["dirty"], bool)


def test_run_report_shows_vs_upstream_mde_environment_and_rl_curves(run_dir):
    rl_log(run_dir / "rl" / "metrics.jsonl")
    report = write_run_report(run_dir, RunConfig(name="t"), {"eval": 1.0})
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["methods"]["rl"]["vs_upstream"] == report["methods"]["rl"]["vs_upstream"]
    evaluation = json.loads((run_dir / "eval" / "report.json").read_text())
    d = on_disk["methods"]["rl"]["vs_upstream"]["recall@1"]
    assert d == evaluation["methods"]["rl"]["vs_upstream"]["recall@1"]
    up = on_disk["methods"]["upstream"]["recall@1"]["value"]
    assert d["value"] == pytest.approx(1.0 - up) and d["ci_low"] > 0  # the oracle beats upstream, CI above 0
    assert "vs_upstream" not in on_disk["methods"]["upstream"]
    assert on_disk["mde"] == evaluation["meta"]["mde"] and on_disk["mde"]["lists"] == evaluation["meta"]["lists"]
    assert on_disk["environment"]["versions"]["numpy"] == np.__version__
    assert on_disk["rl_curves"]["rl"]["keys"] == ["reward_mean", "r_rank_mean", "valid_rate", "eval_valid_rate", "eval_recall@1",
                                            "eval_ndcg@5", "eval_pre_recall@1", "eval_pre_ndcg@5"]
    png = (run_dir / "rl_curves.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5000
    md = (run_dir / "report.md").read_text()
    assert "Δ vs upstream [95% CI]" in md and "| method | Δ recall@1 | Δ recall@5 | Δ ndcg@5 |" in md
    assert f"| rl | {d['value']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]*" in md
    assert f"With {on_disk['mde']['lists']} lists the smallest recall@1 gain detectable at 80% power" in md
    assert "RL beats the upstream order on recall@1: paired difference" in md
    assert "![rl curves](rl_curves.png)" in md and "## Environment" in md and f"numpy {np.__version__}" in md


def test_every_rl_arm_gets_a_verdict_against_upstream_and_sft_and_its_curves(run_dir):
    rl_log(run_dir / "rl" / "metrics.jsonl")
    rl_log(run_dir / "rl_answer" / "metrics.jsonl", eval_keys=False)
    report = write_run_report(run_dir, RunConfig(name="t"), {"eval": 1.0})
    for rl, sft in (("rl", "sft"), ("rl_answer", "sft_answer")):
        d = report["methods"][rl]["vs_sft"]["recall@1"]
        sft_r1 = report["methods"][sft]["recall@1"]["value"]
        assert d["value"] == pytest.approx(1.0 - sft_r1) and d["ci_low"] > 0
    assert "vs_sft" not in report["methods"]["sft"]
    assert report["rl_curves"]["rl_answer"]["keys"] == ["reward_mean", "r_rank_mean", "valid_rate"]
    assert (run_dir / "rl_answer_curves.png").read_bytes()[:4] == b"\x89PNG"
    md = (run_dir / "report.md").read_text()
    for line in ("RL beats its SFT start on recall@1", "RL (answer-only) beats the upstream order on ndcg@5",
                 "RL (answer-only) beats its SFT start on ndcg@5", "## RL training curves (rl_answer)",
                 "![rl_answer curves](rl_answer_curves.png)"):
        assert line in md, line


def test_rl_curves_skip_absent_keys(tmp_path, run_dir):
    rl_log(tmp_path / "metrics.jsonl", eval_keys=False)  # rl.eval_every = 0: no valid-split curves
    png, keys = plot_rl_curves(read_metrics_log(tmp_path / "metrics.jsonl"))
    assert png[:4] == b"\x89PNG" and keys == ["reward_mean", "r_rank_mean", "valid_rate"]
    assert plot_rl_curves([{"step": 1, "loss": 0.5}]) is None
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{"step": 2, "reward_mean"\n')
    with pytest.raises(CorruptFileError, match="line 2"):
        read_metrics_log(tmp_path / "bad.jsonl")
    # a run without an RL stage: no PNG, no section
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "eval").mkdir()
    (bare / "eval" / "report.json").write_bytes((run_dir / "eval" / "report.json").read_bytes())
    report = write_run_report(bare, RunConfig(name="bare"), {})
    assert "rl_curves" not in report and not (bare / "rl_curves.png").exists()
    assert "## RL training curves" not in (bare / "report.md").read_text()
