"""The sid stage's diagnostics include the co-occurrence alignment probe and are recomputed for the
updated index after ``update_index`` (also when an interrupted update is finished)."""

from __future__ import annotations

import json

import numpy as np
from test_sid_update import sid_run  # noqa: F401  (the module-scoped fixture: data + sid stages)

from gr2.data import load_sequences


def _pairs_in(index_ids, sequences):
    """Consecutive pairs of different items that the index both holds (plain loops)."""
    held = set(int(i) for i in index_ids)
    return sum(1 for seq in sequences for a, b in zip(seq[:-1], seq[1:])
               if a != b and int(a) in held and int(b) in held)


def test_update_recomputes_the_diagnostics(sid_run):  # noqa: F811
    from gr2.pipeline.sid import load_index
    from gr2.pipeline.sid import update_index

    run_dir, _, config = sid_run
    stage = run_dir / "sid"
    report = json.loads((stage / "report.json").read_text())
    built = report["diagnostics"]
    sequences = [list(s) for s in load_sequences(run_dir)["items"]]
    index = load_index(run_dir)
    alignment = built["cooccurrence_alignment"]
    assert alignment["pairs"] == _pairs_in(index.item_ids(), sequences) > 0
    assert [row["prefix_length"] for row in alignment["per_prefix"]] == list(range(1, built["levels"] + 1))
    assert built["neighbour_agreement"] is not None and "computed_on" not in built

    gone = np.sort(index.item_ids())[::7]
    (stage / "diagnostics.png").unlink()
    update_index(run_dir, config, remove=gone, progress=False)
    updated = load_index(run_dir)
    diag = json.loads((stage / "report.json").read_text())["diagnostics"]
    assert diag["items"] == len(updated) == len(index) - len(gone)
    assert f"generation {updated.generation}" in diag["computed_on"]
    assert diag["cooccurrence_alignment"]["pairs"] == _pairs_in(updated.item_ids(), sequences)
    assert diag["popularity"]["total"] == sum(1 for s in sequences for i in s if int(i) not in set(gone.tolist()))
    assert diag["neighbour_agreement"] is None  # needs every item's embedding
    assert (stage / "diagnostics.png").exists()
