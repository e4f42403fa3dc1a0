"""Data loading and preprocessing: raw formats -> k-cored chronological sequences in a run dir.

The ``data`` stage that writes them is :mod:`gr2.pipeline.data`. Typical use::

    from gr2.data import ItemCatalog, load_sequences
    from gr2.pipeline.data import DataConfig, run_data
    run_data("runs/demo", DataConfig())          # bundled MovieLens-100k
    catalog = ItemCatalog.from_run_dir("runs/demo")
    catalog.title(0), load_sequences("runs/demo")[0]["items"]

Splits (leave-one-out, time cutoff) are :mod:`gr2.splits`.
"""

from gr2.data.catalog import ItemCatalog, load_items, load_sequences, load_stats
from gr2.data.formats import FORMATS, RawData, default_ml100k_dir, load_raw
from gr2.data.preprocess import item_text, kcore, preprocess

__all__ = [
    "ItemCatalog", "load_items", "load_sequences", "load_stats", "FORMATS", "RawData", "default_ml100k_dir", "load_raw", "item_text", "kcore",
    "preprocess",
]
