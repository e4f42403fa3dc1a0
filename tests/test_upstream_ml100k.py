"""SASRec against popularity (and item-kNN) on MovieLens-100k, leave-one-out, full ranking.

One SASRec training run shared by the module. The candidates stage itself runs on ml-100k with
``train_windows=0`` (no prefix model) to keep the test to one training; the prefix protocol is
covered on synthetic data in test_upstream_candidates.py.
"""

import json

import numpy as np
import pytest

from gr2.candidates import CandidatesConfig
from gr2.pipeline.candidates import run_candidates
from gr2.data import load_sequences
from gr2.pipeline.data import DataConfig, run_data
from gr2.upstream.sasrec import SASRecConfig

from _fixtures_upstream import ml100k_tables

pytest.importorskip("recbole", reason="ml-100k ships in the recbole asset package")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ml100k")
    run_data(run_dir, DataConfig())  # the data stage on the bundled MovieLens-100k
    return run_dir


@pytest.fixture(scope="module")
def report(run_dir):
    # capped at 12 epochs for the test budget (the stage default early-stops around epoch 18)
    sasrec = SASRecConfig(max_epochs=12, eval_every=2, patience=2)
    run_candidates(run_dir, CandidatesConfig(upstream="sasrec", train_windows=0, sasrec=sasrec))
    return json.loads((run_dir / "candidates" / "report.json").read_text())


def test_fixture_tables_match_the_data_stage(run_dir):
    # the synthetic-free fixture of _fixtures_upstream builds exactly what gr2.data builds
    _, seq_cols = ml100k_tables()
    assert [list(s) for s in load_sequences(run_dir)["items"]] == seq_cols["items"]


def test_sasrec_beats_popularity_full_ranking(report):
    test = report["full_ranking"]["test"]
    for name in ("sasrec", "popularity", "itemknn"):
        print(f"ml-100k test full ranking {name:>10}: Recall@10 {test[name]['recall@10']:.4f} NDCG@10 {test[name]['ndcg@10']:.4f}")
    assert test["sasrec"]["recall@10"] > 1.5 * test["popularity"]["recall@10"]
    assert test["sasrec"]["ndcg@10"] > 1.5 * test["popularity"]["ndcg@10"]
    assert report["users"] == 943 and report["items"] > 1000


def test_coverage_is_recall_at_k(report):
    # with K = 10 the share of users whose target is in the top-10 is the upstream's full Recall@10
    assert report["coverage"]["test"] == pytest.approx(report["full_ranking"]["test"]["sasrec"]["recall@10"])
    assert report["coverage"]["valid"] == pytest.approx(report["full_ranking"]["valid"]["sasrec"]["recall@10"])
    hist = np.array(report["splits"]["test"]["target_position_histogram"])
    assert hist.sum() == report["splits"]["test"]["kept"] and hist[:3].sum() > hist[-3:].sum()
