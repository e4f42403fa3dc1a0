"""The sid stage end to end on a slice of MovieLens-100k (tiny encoder, few epochs, small K)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from _tiny_models import save_tiny_encoder
import gr2
from gr2.data import load_items
from gr2.pipeline.data import DataConfig, run_data
from gr2.data.formats import default_ml100k_dir
from gr2.errors import ConfigError, DataError
from gr2.pipeline.sid import SidConfig, load_index, run_ablation, run_sid
from gr2.sid import RQVAEConfig
from gr2.sid.rqvae import RQVAE, encode_latent

SLICE_USERS = 60


@pytest.fixture(scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def ml100k_slice(tmp_path_factory, one_torch_thread):
    """RecBole atomic files holding the interactions of the first users of ml-100k, all items."""
    source = default_ml100k_dir()
    folder = tmp_path_factory.mktemp("ml100k_slice")
    lines = (source / "ml-100k.inter").read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if int(line.split("\t")[0]) <= SLICE_USERS]
    (folder / "slice.inter").write_text("\n".join(kept) + "\n")
    (folder / "slice.item").write_text((source / "ml-100k.item").read_text())
    run_dir = folder / "run"
    run_data(run_dir, DataConfig(path=str(folder)))
    return run_dir


def small_config(tiny_encoder, **rq):
    return SidConfig(
        rqvae=RQVAEConfig(**{**dict(levels=3, codebook_size=16, latent_dim=8, hidden_dims=[32], epochs=8), **rq}),
        embed_model=tiny_encoder,
    )


def test_sid_stage_outputs(ml100k_slice, tiny_encoder):
    run_dir = ml100k_slice
    n_items = len(load_items(run_dir))
    threads = torch.get_num_threads()
    summary = run_sid(run_dir, SidConfig(**{**vars(small_config(tiny_encoder)), "threads": threads + 1}), progress=False)
    assert torch.get_num_threads() == threads  # the stage restores the caller's thread setting
    assert summary["items"] == n_items and summary["uniqueness_after_repair"] == 1.0

    report = json.loads((run_dir / "sid" / "report.json").read_text())
    for key in ("uniqueness_before_repair", "uniqueness_after_repair", "levels", "codebook_size", "utilisation",
                "reconstruction", "collision_groups", "timings", "repair"):
        assert key in report
    assert report["levels"] == 3 and report["codebook_size"] == 16
    assert report["uniqueness_before_repair"] == pytest.approx(report["uniqueness_before_repair_check"])
    assert len(report["utilisation"]) == 3

    index = load_index(run_dir)
    assert len(index) == n_items
    ids = np.arange(n_items, dtype=np.uint64)
    sids = index.sids(ids)
    assert len({tuple(s) for s in sids.tolist()}) == n_items
    np.testing.assert_array_equal(index.items(sids), ids)

    # the saved weights reproduce the assignment: encoder -> Rust encoder -> first L-1 levels
    tensors = load_file(str(run_dir / "sid" / "codebooks.safetensors"))
    assert tensors["codebooks"].shape == (3, 16, 8)
    model = RQVAE(32, RQVAEConfig(levels=3, codebook_size=16, latent_dim=8, hidden_dims=[32]))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items() if k != "codebooks"}, strict=False)
    from gr2.pipeline.sid import item_embeddings

    embeddings, _ = item_embeddings(run_dir, small_config(tiny_encoder), progress=False)
    codes = gr2.RQCodebooks(tensors["codebooks"]).encode(encode_latent(model, embeddings))
    moved = report["repair"]["items_moved"] + report["repair"]["items_disambiguated"]
    agree = (codes[:, :2] == sids[:, :2]).all(1).mean()
    assert agree >= 1 - moved / n_items - 1e-9


def test_sid_stage_cache_and_rerun(ml100k_slice, tiny_encoder):
    config = small_config(tiny_encoder)
    run_sid(ml100k_slice, config, progress=False)
    stamp = (ml100k_slice / "sid" / "stage.json").stat().st_mtime_ns
    run_sid(ml100k_slice, config, progress=False)
    assert (ml100k_slice / "sid" / "stage.json").stat().st_mtime_ns == stamp
    run_sid(ml100k_slice, small_config(tiny_encoder, random_last_level=False), progress=False)
    report = json.loads((ml100k_slice / "sid" / "report.json").read_text())
    assert report["random_last_level"] is False
    assert report["uniqueness_before_repair"] == pytest.approx(report["uniqueness_argmin_all_levels"])
    assert report["uniqueness_after_repair"] == 1.0


def test_sid_ablation_rows(ml100k_slice, tiny_encoder):
    config = small_config(tiny_encoder, epochs=3)
    result = run_ablation(ml100k_slice, config, progress=False)
    names = [row["name"] for row in result["rows"]]
    for expected in ("base", "+EMA", "+random last level", "+EMA +random last level", "+EMA +RLL +diversity loss",
                     "+EMA +RLL +dead-code reset", "+EMA +RLL +contrastive"):
        assert expected in names
    for row in result["rows"]:
        assert 0.0 <= row["uniqueness_before_repair"] <= 1.0
        assert np.isfinite(row["reconstruction_relative"])
    markdown = (ml100k_slice / "sid" / "ablation.md").read_text()
    assert "| +EMA +random last level |" in markdown
    assert json.loads((ml100k_slice / "sid" / "ablation.json").read_text())["rows"][0]["name"] == "base"


def test_sid_cli(ml100k_slice, tiny_encoder, capsys, tmp_path):
    from gr2.cli import main

    toml = tmp_path / "sid.toml"
    toml.write_text(f'[sid]\nembed_model = "{tiny_encoder}"\n[sid.rqvae]\nlevels = 2\ncodebook_size = 32\n'
                    'latent_dim = 8\nhidden_dims = [32]\nepochs = 3\n')
    assert main(["sid", "--run-dir", str(ml100k_slice), "--config", str(toml), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 x 32" in out and "after 100.00%" in out


def test_sid_needs_the_data_stage(tmp_path, tiny_encoder):
    with pytest.raises(DataError, match="run `gr2 data` first"):
        run_sid(tmp_path, small_config(tiny_encoder))
    with pytest.raises(DataError, match="run the sid stage first"):
        load_index(tmp_path)


def test_sid_config_errors(tmp_path):
    from gr2.pipeline.sid import config_from_file

    path = tmp_path / "bad.toml"
    path.write_text("[sid.rqvae]\ncodebook_size = 100000\n")
    with pytest.raises(ConfigError, match="codebook_size"):
        config_from_file(str(path))
    path.write_text("[sid]\nembed_modle = 'x'\n")
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_file(str(path))


def test_example_config_file_is_valid_and_matches_defaults():
    from gr2.pipeline.data import config_from_file as data_config
    from gr2.pipeline.sid import config_from_file as sid_config

    path = str(Path(__file__).parents[1] / "configs" / "ml100k_sid.toml")
    assert sid_config(path) == SidConfig()
    assert data_config(path) == DataConfig()
