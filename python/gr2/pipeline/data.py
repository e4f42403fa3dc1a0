"""The ``data`` stage: read a dataset, k-core it, order it, write ``<run_dir>/data/``.

Outputs (the run-directory layout in README.md):

* ``data/items``      HF Dataset: item_idx, item_id, title, categories, year, text
* ``data/sequences``  HF Dataset: user_idx, user_id, items, timestamps (chronological)
* ``data/stats.json`` users, items, interactions, avg_seq_len, dropped rows by reason, notes

Run from Python with ``run_data(run_dir, DataConfig(...))`` or from the shell with ``gr2 data``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from gr2 import rundir
from gr2.config import from_dict, load_toml
from gr2.data.formats import load_raw
from gr2.data.preprocess import preprocess
from gr2.errors import ConfigError

ITEM_FEATURES = datasets.Features(
    {
        "item_idx": datasets.Value("int64"),
        "item_id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "categories": datasets.Sequence(datasets.Value("string")),
        "year": datasets.Value("int64"),
        "text": datasets.Value("string"),
    }
)
SEQUENCE_FEATURES = datasets.Features(
    {
        "user_idx": datasets.Value("int64"),
        "user_id": datasets.Value("string"),
        "items": datasets.Sequence(datasets.Value("int64")),
        "timestamps": datasets.Sequence(datasets.Value("int64")),
    }
)


@dataclass
class DataConfig:
    """Where the data comes from and how it is filtered.

    ``format`` is one of recbole, movielens, amazon, table; ``path=None`` with recbole means the
    MovieLens-100k copy inside the recbole wheel. ``items_path`` is the metadata file (amazon) or
    items table (table). ``columns`` maps logical fields (user, item, timestamp, rating, title,
    year, categories, description) to source column names.
    """

    format: str = "recbole"
    path: str | None = None
    items_path: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    kcore: int = 5
    max_seq_len: int = 0  # keep only the most recent N interactions per user; 0 keeps all
    min_rating: float | None = None
    dedupe: bool = True
    max_description_chars: int = 400
    # share of interaction rows that may be unusable (a line with the wrong field count, an empty
    # user or item id, a rating that is not a number): they are dropped and counted per reason in
    # data/stats.json ("dropped"); past it the stage fails naming the first one (0: any bad row fails)
    max_bad_fraction: float = 0.001

    def __post_init__(self) -> None:
        if self.kcore < 0:
            raise ConfigError(f"data.kcore must be >= 0, got {self.kcore}")
        if not 0.0 <= self.max_bad_fraction < 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")
        if self.max_seq_len < 0 or 0 < self.max_seq_len < 3:
            raise ConfigError(f"data.max_seq_len must be 0 (no cap) or >= 3, got {self.max_seq_len}")


def _source_fingerprint(paths: list[Path]) -> list[str]:
    return [f"{p.name}:{rundir.hash_file(p)}" for p in paths]


def run_data(run_dir: str | Path, config: DataConfig | None = None, force: bool = False) -> dict[str, Any]:
    """Run the data stage into ``<run_dir>/data``; skipped when its inputs and config are unchanged."""
    config = config or DataConfig()
    stage_dir = Path(run_dir) / "data"
    start = time.perf_counter()
    raw = load_raw(config.format, config.path, config.items_path, config.columns, config.max_bad_fraction)
    key = rundir.stage_key(config, *_source_fingerprint(raw.sources))
    if (done := rundir.begin_stage(stage_dir, key, force=force)) is not None:
        return done
    processed = preprocess(
        raw,
        kcore_k=config.kcore,
        max_seq_len=config.max_seq_len,
        min_rating=config.min_rating,
        dedupe=config.dedupe,
        max_description_chars=config.max_description_chars,
    )
    items = datasets.Dataset.from_pandas(processed.items, features=ITEM_FEATURES, preserve_index=False)
    sequences = datasets.Dataset.from_pandas(processed.sequences, features=SEQUENCE_FEATURES, preserve_index=False)
    with rundir.atomic_dir(stage_dir / "items") as tmp:
        items.save_to_disk(str(tmp))
    with rundir.atomic_dir(stage_dir / "sequences") as tmp:
        sequences.save_to_disk(str(tmp))
    stats = dict(processed.stats, seconds=round(time.perf_counter() - start, 2))
    rundir.atomic_write_json(stage_dir / "stats.json", stats)
    summary = {k: stats[k] for k in ("users", "items", "interactions", "avg_seq_len", "dropped")}
    rundir.mark_done(stage_dir, key, summary)
    return summary


def config_from_file(path: str | None) -> DataConfig:
    if path is None:
        return DataConfig()
    return from_dict(DataConfig, load_toml(path).get("data", {}), where="data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``gr2 data``'s own shortcuts (the common flags come from gr2.pipeline.registry)."""
    parser.add_argument("--format", choices=["recbole", "movielens", "amazon", "table"])
    parser.add_argument("--path", help="dataset folder or interactions file (default: bundled ml-100k)")
    parser.add_argument("--items-path", help="item metadata file (amazon) or items table (table)")
    parser.add_argument("--kcore", type=int)
    parser.add_argument("--max-seq-len", type=int)


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {"format": args.format, "path": args.path, "items_path": args.items_path,
              "kcore": args.kcore, "max_seq_len": args.max_seq_len}
    return {k: v for k, v in values.items() if v is not None}


def main(args: argparse.Namespace, config: DataConfig) -> int:
    summary = run_data(args.run_dir, config, force=args.force)
    print(
        f"data: {summary['users']} users, {summary['items']} items, {summary['interactions']} interactions, "
        f"avg sequence {summary['avg_seq_len']:.1f}; dropped {summary['dropped'] or 'nothing'}"
    )
    return 0
