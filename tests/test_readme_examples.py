"""The README's examples run as written: its Python blocks (serving, the core API), its `gr2 encode`
shell block and its run config. Each block is read from README.md at test time, so an edit there
is tested as it reads; a new block fails :func:`test_every_readme_block_is_run_or_skipped_with_a_reason`
until it is added here.

What a block needs that it does not make itself comes from outside, and only that: the serving
example reads a run folder (``runs/demo``; a small one is built, as in tests/test_wheel.py), the
core-API snippet uses arrays it names but does not define (``codebooks``, ``x``, ``item_ids``, ...;
bound to small random ones), and the shell block calls ``gr2`` and ``python`` (this tree's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import numpy as np

from _readme import ROOT, code_blocks, serving_example, tiny_run

RUN = {  # (language, heading above the block) -> the test that runs it
    ("python", "Serving: constrained reranking"): "test_serving_example",
    ("python", "Serving: constrained reranking", "core"): "test_core_api_example",
    ("bash", "Catalogs in Parquet: `gr2 encode`"): "test_encode_example",
    ("toml", "Bring your own data, model and teacher"): "test_run_config_example",
}
SKIPPED = {  # blocks not run here, and why
    ("bash", "Quick start"): "`make demo` / `make test` run the whole pipeline and the whole test suite",
}


def _key(lang: str, heading: str, code: str) -> tuple[str, ...]:
    return (lang, heading, "core") if code.startswith("cb = gr2.RQCodebooks") else (lang, heading)


def test_every_readme_block_is_run_or_skipped_with_a_reason():
    blocks = [_key(lang, heading, code) for lang in ("python", "bash", "toml") for heading, code in code_blocks(lang)]
    assert blocks, "README.md has no code blocks"
    unknown = [b for b in blocks if b not in RUN and b not in SKIPPED]
    assert not unknown, f"README blocks no test runs: {unknown}; run them here or say in SKIPPED why not"
    missing = [b for b in RUN if b not in blocks]
    assert not missing, f"blocks this file runs are gone from README.md (or their heading changed): {missing}"


def test_serving_example(tmp_path, monkeypatch, capsys):
    """`load_pretrained("runs/demo/rl/model")` ... `gr2.constrained_decode`: prints a permutation of
    the 10 candidates, the reasoning text and the item log-probabilities."""
    tiny_run(tmp_path / "runs" / "demo")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(serving_example(), "README.md (serving)", "exec"), {"__name__": "__main__"})
    lines = capsys.readouterr().out.splitlines()
    items = [int(x) for x in lines[0].strip("[]").replace(",", " ").split()]
    assert sorted(items) == [1, 7, 49, 99, 120, 180, 257, 300, 404, 500], lines


def test_core_api_example(tmp_path, monkeypatch):
    """RQCodebooks.encode, SidIndex.build / save / load, SidIndexWriter and verify_rewards, with the
    arrays the snippet names bound to small random ones (the completions list every candidate)."""
    import gr2
    from gr2.tokens import answer_text

    code = next(c for h, c in code_blocks("python") if _key("python", h, c)[-1] == "core")
    rng = np.random.default_rng(0)
    codebooks = rng.standard_normal((3, 16, 8)).astype(np.float32)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    item_ids = np.arange(300, dtype=np.uint64) * 3
    candidates = rng.choice(item_ids, size=(4, 10), replace=False).reshape(4, 10)
    targets = candidates[:, 2].copy()
    same = gr2.SidIndex.build(item_ids, gr2.RQCodebooks(codebooks).encode(x))  # the index the snippet builds
    completions = ["<think>why</think>" + answer_text(same.sids(row[::-1].copy())) for row in candidates]
    names = {"gr2": gr2, "codebooks": codebooks, "x": x, "item_ids": item_ids,
             "ids_chunk": np.arange(500, dtype=np.uint64), "codes_chunk": rng.integers(0, 256, (500, 4)).astype(np.uint16),
             "completions": completions, "candidates": candidates, "targets": targets}
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (core API)", "exec"), names)
    assert names["codes"].shape == (300, 3) and names["codes"].dtype == np.uint16
    assert len(names["index"]) == 300 and (tmp_path / "catalog.gr2sid").exists()
    assert len(gr2.SidIndex.load(str(tmp_path / "big.gr2sid"))) == 500
    assert names["rb"].valid.all()


def test_encode_example(tmp_path):
    """The toy table and codebooks made by the heredoc, then `gr2 encode` into codes.parquet."""
    import pyarrow.parquet as pq

    code = next(c for h, c in code_blocks("bash") if h == "Catalogs in Parquet: `gr2 encode`")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("python", f'exec "{sys.executable}" "$@"'),
                         ("gr2", f'exec "{sys.executable}" -m gr2.cli "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{target}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    table = pq.read_table(tmp_path / "codes.parquet")
    assert table.column_names == ["item_id", "code_0", "code_1", "code_2", "code_3"] and table.num_rows == 10_000


def test_run_config_example():
    """The `beauty` run config is a valid run config: every table and key it names exists."""
    from gr2.pipeline import build_run_config

    text = next(c for h, c in code_blocks("toml") if h == "Bring your own data, model and teacher")
    run = build_run_config(tomllib.loads(text))
    assert run.name == "beauty" and run.stage_configs["data"].format == "amazon"
    assert run.stage_configs["traces"].backend == "openai" and run.stage_configs["midtrain"].base_model == "/models/Qwen3-8B"

