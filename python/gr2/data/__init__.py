"""Data loading and preprocessing: raw formats -> k-cored chronological sequences in a run dir.

Typical use::

    from gr2.data import DataConfig, run_data, ItemCatalog, load_sequences, leave_one_out
    run_data("runs/demo", DataConfig())          # bundled MovieLens-100k
    catalog = ItemCatalog.from_run_dir("runs/demo")
    history, target = leave_one_out(load_sequences("runs/demo")[0]["items"], "test")
"""

from gr2.data.catalog import (
    SPLITS,
    ItemCatalog,
    iter_split,
    leave_one_out,
    load_items,
    load_sequences,
    load_stats,
    train_sequences,
)
from gr2.data.formats import FORMATS, RawData, default_ml100k_dir, load_raw
from gr2.data.preprocess import item_text, kcore, preprocess
from gr2.data.stage import DataConfig, run_data

__all__ = [
    "SPLITS", "ItemCatalog", "iter_split", "leave_one_out", "load_items", "load_sequences", "load_stats",
    "train_sequences", "FORMATS", "RawData", "default_ml100k_dir", "load_raw", "item_text", "kcore",
    "preprocess", "DataConfig", "run_data",
]
