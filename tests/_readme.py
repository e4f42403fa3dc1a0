"""The README's code blocks, and a run folder shaped like ``runs/demo`` for the serving example
(shared by tests/test_readme_examples.py, which runs the examples in this tree, and
tests/test_wheel.py, which runs the serving example from the installed wheel)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def code_blocks(lang: str) -> list[tuple[str, str]]:
    """(the ``##``/``###`` heading above it, its text) of every fenced ``lang`` block of the README."""
    text = README.read_text()
    found = []
    for match in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M):
        heading = re.findall(r"^#{2,3} (.+)$", text[:match.start()], re.M)
        found.append((heading[-1] if heading else "", match.group(1)))
    return found


def serving_example() -> str:
    return next(code for heading, code in code_blocks("python") if heading == "Serving: constrained reranking")


def tiny_run(run_dir: Path) -> None:
    """A run folder shaped like runs/demo: bundled MovieLens-100k items, a SID index, and a small
    untrained model with the SID vocabulary at rl/model (the example only needs a valid model)."""
    import gr2
    from gr2.data.catalog import ItemCatalog
    from gr2.models import DemoModelConfig, extend_with_sids, load_base_model, save_pretrained_atomic
    from gr2.pipeline.data import run_data

    run_data(run_dir)
    catalog = ItemCatalog.from_run_dir(run_dir)
    levels = (16, 16, 8)
    rng = np.random.default_rng(0)
    flat = rng.permutation(int(np.prod(levels)))[: len(catalog)]
    codes = np.array(np.unravel_index(flat, levels)).T.astype(np.uint16)
    index = gr2.SidIndex.build(np.arange(len(catalog), dtype=np.uint64), codes, list(levels))
    (run_dir / "sid").mkdir()
    index.save(str(run_dir / "sid" / "index.gr2sid"))
    demo = DemoModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    model, tokenizer = load_base_model("demo", corpus=catalog.texts, demo=demo)
    extend_with_sids(model, tokenizer, codes, levels, [catalog.item_text(i) for i in range(len(catalog))])
    save_pretrained_atomic(model, tokenizer, run_dir / "rl" / "model")
