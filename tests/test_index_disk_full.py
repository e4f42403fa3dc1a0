"""A disk that fills up while an index is written: ``SidIndex.save``, ``SidIndexWriter`` and the
sid stage's update fail with a typed ``gr2.Gr2IOError`` naming the file, leave the previous index
byte-identical and leave no temporary file behind (issue 31, "Bad input").

Simulated without root: the write runs in a subprocess whose file-size limit (RLIMIT_FSIZE) is
below what it must write, with SIGXFSZ ignored, so the write fails with EFBIG like a full disk
fails with ENOSPC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gr2

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE/SIGXFSZ semantics are Linux's")

# Run in the child: `setup` (no limit), then the limit, then `action`; prints the error as JSON.
_CHILD = """
import json, resource, signal, sys
import numpy as np
import gr2
args = json.loads(sys.argv[1])
{setup}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (args["limit"], args["limit"]))
try:
{action}
    print(json.dumps({{"error": None}}))
except Exception as e:
    print(json.dumps({{"error": type(e).__name__, "classes": [c.__name__ for c in type(e).__mro__],
                       "message": str(e)}}))
"""


def run_limited(setup: str, action: str, **args) -> dict:
    code = _CHILD.format(setup=textwrap.dedent(setup), action=textwrap.indent(textwrap.dedent(action), "    "))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _index(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(n, dtype=np.uint64) * 3)
    codes = rng.integers(0, 256, (n, 4), dtype=np.uint16)
    return ids, codes


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_save_on_a_full_disk(tmp_path):
    target = tmp_path / "index.gr2sid"
    ids, codes = _index(1000)
    gr2.SidIndex.build(ids, codes, 256).save(target)
    before = target.read_bytes()
    np.save(tmp_path / "ids.npy", *_index(50_000)[:1])
    np.save(tmp_path / "codes.npy", _index(50_000)[1])
    result = run_limited(
        """
        index = gr2.SidIndex.build(np.load(args["ids"]), np.load(args["codes"]), 256)
        """,
        """
        index.save(args["target"])
        """,
        limit=len(before) + 4096, target=str(target), ids=str(tmp_path / "ids.npy"),
        codes=str(tmp_path / "codes.npy"),
    )
    assert result["error"] == "Gr2IOError", result
    assert str(target) in result["message"] and "File too large" in result["message"]
    assert target.read_bytes() == before
    assert _only(tmp_path) == ["codes.npy", "ids.npy", "index.gr2sid"]


@pytest.mark.parametrize("limit", [4096, 200_000], ids=["runs", "index file"])
def test_writer_on_a_full_disk(tmp_path, limit):
    """A limit that fails the first sorted run, and one that fails later (the temporary merge
    files or the index file itself)."""
    target = tmp_path / "index.gr2sid"
    ids, codes = _index(1000)
    gr2.SidIndex.build(ids, codes, 256).save(target)
    before = target.read_bytes()
    ids, codes = _index(40_000, seed=1)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "codes.npy", codes)
    result = run_limited(
        """
        ids, codes = np.load(args["ids"]), np.load(args["codes"])
        writer = gr2.SidIndexWriter(args["target"], [256] * 4, chunk_items=5000)
        """,
        """
        for start in range(0, len(ids), 5000):
            writer.add(ids[start:start + 5000], codes[start:start + 5000])
        writer.finish()
        """,
        limit=limit, target=str(target), ids=str(tmp_path / "ids.npy"), codes=str(tmp_path / "codes.npy"),
    )
    assert result["error"] == "Gr2IOError", result
    assert str(target) in result["message"] and "File too large" in result["message"], result["message"]
    assert target.read_bytes() == before
    assert _only(tmp_path) == ["codes.npy", "ids.npy", "index.gr2sid"]


from test_sid_update import sid_run  # noqa: E402,F401  (module-scoped fixture: data + sid stages)


def test_stage_update_on_a_full_disk(sid_run):  # noqa: F811
    from gr2.pipeline.sid import load_index

    run_dir, toml, config = sid_run
    stage = run_dir / "sid"
    index_path = stage / "index.gr2sid"
    files = {p.name: p.read_bytes() for p in stage.iterdir() if p.is_file()}
    index = load_index(run_dir)
    report = json.loads((stage / "report.json").read_text())
    m = 100
    new_ids = np.arange(10**9, 10**9 + m, dtype=np.uint64)
    embeddings = np.random.default_rng(0).standard_normal((m, report["embedding_dim"]), dtype=np.float32)
    np.save(stage.parent / "new_ids.npy", new_ids)
    np.save(stage.parent / "new_emb.npy", embeddings)
    result = run_limited(
        """
        import torch
        torch.set_num_threads(1)
        from gr2.pipeline.sid import config_from_file, update_index
        config = config_from_file(args["toml"])
        new_ids, embeddings = np.load(args["ids"]), np.load(args["emb"])
        """,
        """
        update_index(args["run_dir"], config, item_ids=new_ids, embeddings=embeddings, progress=False)
        """,
        limit=len(files["index.gr2sid"]) + 1024, run_dir=str(run_dir), toml=str(toml),
        ids=str(stage.parent / "new_ids.npy"), emb=str(stage.parent / "new_emb.npy"),
    )
    assert result["error"] == "Gr2IOError", result
    assert str(index_path) in result["message"] and "File too large" in result["message"]
    # the stage is as it was: same files, same bytes (the index, its record, the report)
    assert {p.name: p.read_bytes() for p in stage.iterdir() if p.is_file()} == files
    assert len(load_index(run_dir)) == len(index)
