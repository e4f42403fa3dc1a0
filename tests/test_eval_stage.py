"""The `gr2 eval` stage and report writer on a small synthetic run directory."""

import json

import numpy as np
import pytest
from datasets import load_from_disk

from gr2.candidates import CandidatesConfig
from gr2.pipeline.candidates import run_candidates
from gr2.cli import main as cli_main
from gr2.errors import CorruptFileError, DataError, InvalidInputError
from gr2.eval import evaluate_rankings, min_detectable_effect, write_report
from gr2.eval.rankings import load_rankings, save_rankings
from gr2.pipeline.eval import EvalConfig, run_eval

from _fixtures_upstream import synthetic_tables, write_data_stage


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    write_data_stage(root, *synthetic_tables(n_users=80, n_items=40, seed=5))
    run_candidates(root, CandidatesConfig(upstream="popularity", k=5, train_windows=1))
    return root


def test_eval_stage_with_a_method(run_dir, capsys):
    test = load_from_disk(str(run_dir / "candidates" / "test"))
    cands = np.array(test["candidates"])
    reversed_order = cands[:, ::-1].copy()
    valid = np.ones(len(cands), dtype=bool)
    valid[::4] = False
    (run_dir / "sft").mkdir(exist_ok=True)
    save_rankings(run_dir / "sft" / "rankings_test.npz", test["list_id"], reversed_order, valid, candidates=cands)
    # a second method that ranked only half the users: everything is scored on the shared half
    half = slice(0, len(cands) // 2)
    save_rankings(run_dir / "half.npz", np.array(test["list_id"])[half], cands[half], valid[half])
    assert cli_main(["eval", "--run-dir", str(run_dir), "--method", "copy=half.npz"]) == 0
    out = capsys.readouterr().out
    assert "upstream" in out and "sft" in out and "copy" in out
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    methods = report["methods"]
    assert set(methods) == {"upstream", "random", "popularity", "itemknn", "sft", "copy"}
    assert report["meta"]["lists"] == len(cands) // 2 and report["meta"]["lists_in_split"] == len(cands)
    shared = slice(0, len(cands) // 2)
    want = evaluate_rankings(reversed_order[shared], valid[shared], cands[shared], np.array(test["target"])[shared])
    assert methods["sft"]["recall@1"] == want["recall@1"]
    assert methods["sft"]["validity"]["value"] == pytest.approx(valid[shared].mean())
    assert methods["upstream"]["order_copy"]["value"] == 1.0
    assert methods["popularity"]["order_copy"]["value"] == 1.0  # popularity upstream: same order
    for name in ("metrics.png", "position_bias.png", "report.md"):
        assert (run_dir / "eval" / name).stat().st_size > 0
    assert (run_dir / "eval" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    md = (run_dir / "eval" / "report.md").read_text()
    assert "| sft |" in md and "recall@1" in md and "Δ vs upstream [95% CI]" in md
    assert "vs_upstream" not in methods["upstream"] and "vs" not in methods["sft"]
    delta = methods["sft"]["vs_upstream"]["ndcg@5"]["value"]
    assert delta == pytest.approx(methods["sft"]["ndcg@5"]["value"] - methods["upstream"]["ndcg@5"]["value"])
    paired = evaluate_rankings(reversed_order[shared], valid[shared], cands[shared], np.array(test["target"])[shared],
                               baseline=(cands[shared], np.ones(len(cands) // 2, bool)))["vs"]
    assert methods["sft"]["vs_upstream"] == {m: d for m, d in paired.items() if m != "baseline"}
    assert set(methods["sft"]["vs_upstream"]) == {"recall@1", "recall@3", "recall@5", "ndcg@3", "ndcg@5"}
    # the MDE at this number of lists and the environment that produced the numbers
    mde = report["meta"]["mde"]
    p = methods["upstream"]["recall@1"]["value"]
    assert mde["lists"] == len(cands) // 2 and mde["upstream_value"] == p
    assert mde["value"] == min_detectable_effect(p, mde["lists"]) > 0
    assert set(mde["paired"]) == {"random", "popularity", "itemknn", "sft", "copy"} and mde["paired"]["popularity"] == 0.0
    assert f"With {mde['lists']} lists the smallest recall@1 gain detectable at 80% power" in md
    env = report["meta"]["environment"]
    assert env["versions"]["torch"] and env["versions"]["numpy"] == np.__version__ and env["cpu_count"] >= 1
    assert {"python", "gr2", "transformers", "datasets"} <= set(env["versions"]) and env["cpu_model"]
    assert "environment: " in md and f"numpy {np.__version__}" in md


def test_eval_errors(run_dir, tmp_path):
    test = load_from_disk(str(run_dir / "candidates" / "test"))
    cands = np.array(test["candidates"])
    bad_user = np.array(test["list_id"]).copy()
    bad_user[0] = 10_000
    save_rankings(tmp_path / "r.npz", bad_user, cands, np.ones(len(cands), bool))
    cfg = EvalConfig(methods={"x": str(tmp_path / "r.npz")}, discover=False, n_boot=10)
    with pytest.raises(DataError, match="not in this split"):
        run_eval(run_dir, cfg, force=True)
    other = cands.copy()
    other[:, 0] = 39 - other[:, 0]
    save_rankings(tmp_path / "r.npz", test["list_id"], cands, np.ones(len(cands), bool), candidates=other)
    with pytest.raises(DataError, match="different candidate lists"):
        run_eval(run_dir, cfg, force=True)
    (tmp_path / "r.npz").write_bytes(b"not a zip")
    with pytest.raises(CorruptFileError):
        load_rankings(tmp_path / "r.npz")
    with pytest.raises(DataError, match="does not exist"):
        load_rankings(tmp_path / "missing.npz")
    with pytest.raises(InvalidInputError):
        save_rankings(tmp_path / "s.npz", [1, 2], np.zeros((3, 5)), [True, True])
    with pytest.raises(DataError, match="candidates"):
        run_eval(tmp_path, EvalConfig())


def test_write_report_needs_evaluate_rankings_dicts(tmp_path):
    with pytest.raises(InvalidInputError):
        write_report(tmp_path, {}, {})
    with pytest.raises(InvalidInputError, match="lacks"):
        write_report(tmp_path, {"m": {"recall@1": 0.3}}, {})


def test_evidence_line_baseline_and_top1_agreement(tmp_path):
    """With co-engagement evidence in the prompts, eval scores the evidence line itself as a
    ranking (the candidates as the prompt's last line lists them) and reports, per method, how
    often the top-1 is that line's first item: 1 for the line, the upstream order's agreement for
    the upstream order, and a method that copies the line's first item then stops counts only its
    valid lists."""
    from gr2.prompts import PromptConfig
    from gr2.pipeline.prompts import run_prompts

    root = tmp_path / "run"
    write_data_stage(root, *synthetic_tables(n_users=80, n_items=40, seed=5))
    run_candidates(root, CandidatesConfig(upstream="popularity", k=5, train_windows=1))
    run_prompts(root, PromptConfig(evidence="cooccur"))
    prompts = load_from_disk(str(root / "prompts" / "test"))
    cands = np.array(prompts["candidates"])
    scores = np.array(prompts["evidence"])
    line = np.take_along_axis(cands, np.argsort(-scores, axis=1, kind="stable"), axis=1)  # plain reference
    valid = np.ones(len(cands), dtype=bool)
    valid[::3] = False
    (root / "sft").mkdir()
    save_rankings(root / "sft" / "rankings_test.npz", prompts["list_id"], line, valid, candidates=cands)
    run_eval(root, EvalConfig())
    report = json.loads((root / "eval" / "report.json").read_text())
    agree = report["meta"]["top1_agrees_with_evidence_line"]
    assert agree["evidence_line"] == 1.0
    assert agree["sft"] == pytest.approx(valid.mean(), abs=1e-4)
    assert agree["upstream"] == pytest.approx((cands[:, 0] == line[:, 0]).mean(), abs=1e-4)
    targets = np.array(prompts["target"])
    assert report["methods"]["evidence_line"]["recall@1"]["value"] == pytest.approx((line[:, 0] == targets).mean())
    assert "Top-1 agreement with the prompt's evidence line" in (root / "eval" / "report.md").read_text()
