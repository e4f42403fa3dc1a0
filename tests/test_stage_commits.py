"""Stage commits cannot go half-way (issue 16): a stage that fails at any write is rerun, never
trusted; a corrupt, keyless or tampered record means "not done"; a failed folder write loses
nothing.

Fault injection: every file a stage commits ends in an ``os.replace`` (``rundir``'s atomic
writers, ``atomic_dir``); the tests fail the n-th one of a forced run with a *changed* config, for
every n, then rerun with the previous config and check the stage really reran and reproduces that
config's outputs (on main before this test, a sid run failing after its new index was written was
skipped on the rerun and served the new index).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_models import save_tiny_encoder
from gr2 import rundir
from gr2.candidates import CandidatesConfig
from gr2.pipeline.candidates import run_candidates
from gr2.pipeline.data import DataConfig, run_data
from gr2.data.formats import default_ml100k_dir
from gr2.pipeline.prompts import run_prompts
from gr2.prompts import PromptConfig
from gr2.pipeline.sid import SidConfig, load_index, run_sid
from gr2.sid import RQVAEConfig

SLICE_USERS = 30


class InjectedFault(OSError):
    pass


class FailNthReplace:
    """Counts ``os.replace`` calls; raises :class:`InjectedFault` instead of the ``fail_at``-th."""

    def __init__(self, fail_at: int | None):
        self.fail_at, self.calls, self.real = fail_at, 0, os.replace

    def __call__(self, src, dst, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise InjectedFault(f"injected failure at write {self.calls} ({dst})")
        return self.real(src, dst, **kw)


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("slice")
    source = default_ml100k_dir()
    lines = (source / "ml-100k.inter").read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if int(line.split("\t")[0]) <= SLICE_USERS]
    (folder / "slice.inter").write_text("\n".join(kept) + "\n")
    (folder / "slice.item").write_text((source / "ml-100k.item").read_text())
    yield folder
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))


def sid_config(encoder, epochs: int) -> SidConfig:
    return SidConfig(rqvae=RQVAEConfig(levels=3, codebook_size=16, latent_dim=8, hidden_dims=[32], epochs=epochs),
                     embed_model=encoder)


def sids_of(run_dir: Path) -> np.ndarray:
    index = load_index(run_dir)
    return index.sids(np.arange(len(index), dtype=np.uint64))


def sequences_of(run_dir: Path) -> list:
    from datasets import load_from_disk

    return load_from_disk(str(run_dir / "data" / "sequences"))["items"]


def lists_of(run_dir: Path, folder: str) -> list:
    from datasets import load_from_disk

    table = load_from_disk(str(run_dir / folder / "test"))
    return table.to_list()


def stages(slice_dir: Path, encoder: str):
    """(name, run(config_variant, force), content-of-outputs) for the cheap stages, in order; the
    variant 0 is the config every later stage is built on, 1 is the changed one."""
    return [
        ("data", lambda run_dir, v, force: run_data(run_dir, DataConfig(path=str(slice_dir), kcore=[5, 8][v]), force=force),
         sequences_of),
        ("sid", lambda run_dir, v, force: run_sid(run_dir, sid_config(encoder, [4, 6][v]), force=force, progress=False),
         sids_of),
        ("candidates", lambda run_dir, v, force: run_candidates(run_dir, CandidatesConfig(
            upstream="popularity", k=[5, 4][v], train_windows=2), force=force), lambda d: lists_of(d, "candidates")),
        ("prompts", lambda run_dir, v, force: run_prompts(run_dir, PromptConfig(max_history=[5, 3][v]), force=force),
         lambda d: lists_of(d, "prompts")),
    ]


def same(a, b) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b))) if isinstance(a, np.ndarray) else a == b


def test_a_stage_failing_at_any_write_is_rerun_not_trusted(slice_dir, encoder, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    for name, run, content in stages(slice_dir, encoder):
        run(run_dir, 0, False)
        clean = content(run_dir)
        clean_key = rundir.read_stage(run_dir / name)["key"]
        counter = FailNthReplace(None)  # how many commits a forced run with the changed config makes
        with monkeypatch.context() as m:
            m.setattr(os, "replace", counter)
            run(run_dir, 1, True)
        changed = content(run_dir)
        assert not same(changed, clean), f"{name}: the variant must change the outputs for this test to mean anything"
        writes = counter.calls
        assert writes >= 2, name
        for fail_at in range(1, writes + 1):
            run(run_dir, 0, False)  # back to the clean state (reruns: the last loop left the variant or a failure)
            with monkeypatch.context() as m:
                m.setattr(os, "replace", FailNthReplace(fail_at))
                with pytest.raises(InjectedFault):
                    run(run_dir, 1, True)
            assert rundir.read_stage(run_dir / name) is None, f"{name}: record still valid after a failure at write {fail_at}"
            run(run_dir, 0, False)
            record = rundir.read_stage(run_dir / name)
            assert record is not None and record["key"] == clean_key
            assert same(content(run_dir), clean), f"{name}: rerun after a failure at write {fail_at} serves other outputs"
        # the failed variant runs through afterwards, too
        run(run_dir, 1, False)
        assert same(content(run_dir), changed), name
        run(run_dir, 0, False)


def test_corrupt_keyless_or_tampered_records_mean_not_done(slice_dir, encoder, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_data(run_dir, DataConfig(path=str(slice_dir)))
    run_sid(run_dir, sid_config(encoder, 4), progress=False)
    sid = run_dir / "sid"
    good = (sid / "stage.json").read_text()
    clean = sids_of(run_dir)

    for bad in ("{not json", json.dumps({"summary": {}}), json.dumps([1, 2]), "\xff\xfe"):
        (sid / "stage.json").write_text(bad, encoding="latin-1")
        assert rundir.read_stage(sid) is None
        run_sid(run_dir, sid_config(encoder, 4), progress=False)  # reruns instead of a traceback
        assert rundir.read_stage(sid)["key"] == json.loads(good)["key"]
    assert "not done" in caplog.text

    # an output changed behind the record's back (same size: a copied-over index) is rerun
    record = json.loads((sid / "stage.json").read_text())
    assert "index.gr2sid" in record["outputs"] and "codebooks.safetensors" in record["outputs"]
    data = bytearray((sid / "index.gr2sid").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (sid / "index.gr2sid").write_bytes(bytes(data))
    assert rundir.read_stage(sid) is None
    stamp = (sid / "stage.json").stat().st_mtime_ns
    run_sid(run_dir, sid_config(encoder, 4), progress=False)
    assert (sid / "stage.json").stat().st_mtime_ns > stamp
    assert np.array_equal(sids_of(run_dir), clean)

    # a missing output too; a stage that reads it is told to run sid first
    (sid / "codebooks.safetensors").unlink()
    assert rundir.read_stage(sid) is None


def test_record_leaves_out_files_other_commands_write(tmp_path):
    stage = tmp_path / "sft"
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "weights.bin").write_bytes(b"w")
    (stage / "summary.json").write_text("{}")
    (stage / "checkpoints").mkdir()
    (stage / "checkpoints" / "step-1").write_text("x")
    (stage / ".summary.json.123.tmp").write_text("half")
    (stage / "nested").mkdir()
    (stage / "nested" / "stage.json").write_text("{}")
    (stage / "rankings_test.npz").write_bytes(b"r")
    rundir.mark_done(stage, "k", {"a": 1}, exclude=("rankings_*.npz",))
    assert set(json.loads((stage / "stage.json").read_text())["outputs"]) == {"model/weights.bin", "summary.json"}
    (stage / "rankings_test.npz").write_bytes(b"rerank rewrote this")
    (stage / "checkpoints" / "step-1").write_text("yy")
    assert rundir.begin_stage(stage, "k") == {"a": 1}
    assert rundir.begin_stage(stage, "other") is None and not (stage / "stage.json").exists()


def test_atomic_dir_failure_keeps_the_previous_folder(tmp_path, monkeypatch):
    target = tmp_path / "items"
    with rundir.atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    for fail_at in (1, 2):
        with monkeypatch.context() as m:
            m.setattr(os, "replace", FailNthReplace(fail_at))
            with pytest.raises(InjectedFault):
                with rundir.atomic_dir(target) as tmp:
                    (tmp / "a").write_text("new")
        assert (target / "a").read_text() == "old"
        assert [p.name for p in tmp_path.iterdir()] == ["items"]
