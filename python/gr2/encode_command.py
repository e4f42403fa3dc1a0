"""``gr2 encode``: an item table in Parquet -> its RQ codes (or its SIDs) in Parquet.

Codes: ``--run-dir RUN`` encodes with the run's sid stage (``RUN/sid/codebooks.safetensors``: the
RQ-VAE encoder, then its codebooks through the Rust encoder); ``--codebooks FILE`` takes that file
itself, or a float32 (L, K, D) ``.npy`` of plain codebooks for embeddings already in their space.
SIDs: ``--index FILE`` looks the ids up in a saved :class:`gr2.SidIndex`; ``--index`` with
``--run-dir`` uses the run's ``sid/index.gr2sid`` and maps the catalog's own item ids
(``data/items`` ``item_id``) to the index's keys. The work is :mod:`gr2.rq_parquet`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from gr2.errors import ConfigError, CorruptFileError, Gr2IOError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gr2.rq_parquet import DEFAULT_CHUNK_ROWS

    parser.add_argument("--input", required=True, help="Parquet file with an id and an embedding column")
    parser.add_argument("--output", required=True, help="Parquet file to write (atomically)")
    parser.add_argument("--column", default="embedding", help="embedding column (list of numbers; default embedding)")
    parser.add_argument("--id-column", default="item_id", help="id column, copied to the output (default item_id)")
    parser.add_argument("--run-dir", help="a run whose sid stage supplies the RQ-VAE and codebooks (and the index)")
    parser.add_argument("--codebooks", metavar="FILE",
                        help="a sid stage's codebooks.safetensors, or a float32 (L, K, D) .npy of codebooks")
    parser.add_argument("--index", nargs="?", const=True, metavar="FILE",
                        help="write SIDs from this SidIndex file (alone with --run-dir: the run's index)")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per batch")
    parser.add_argument("--beam", type=int, default=1, help="beam width of the RQ encoder (1 = greedy)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _codebooks_npy(path: Path):
    from gr2.rq import _open_input

    array = _open_input(path)  # Gr2IOError / CorruptFileError name the file
    if array.dtype != np.float32 or array.ndim != 3:
        raise CorruptFileError(f"{path} holds {array.dtype} {array.shape}; codebooks are float32 (L, K, D)")
    return np.ascontiguousarray(array)


def _encoder(args: argparse.Namespace):
    """(codebooks, transform or None) from --run-dir or --codebooks (exactly one)."""
    from gr2.rq_parquet import RQVAETransform

    if (args.run_dir is None) == (args.codebooks is None):
        raise ConfigError("gr2 encode needs exactly one of --run-dir RUN or --codebooks FILE (or --index for SIDs)")
    if args.codebooks is None:
        transform = RQVAETransform.from_run_dir(args.run_dir)
        return transform.codebooks, transform
    return load_codebooks_file(args.codebooks)


def load_codebooks_file(path) -> tuple:
    """(codebooks, transform or None) from a float32 (L, K, D) ``.npy`` of codebooks (no transform)
    or a sid stage's ``codebooks.safetensors`` (its RQ-VAE encoder is the transform). gr2.ray's
    actors load theirs with this too, so a path means the same thing there as to ``gr2 encode``."""
    from gr2.rq_parquet import RQVAETransform

    path = Path(path)
    if not path.is_file():
        raise Gr2IOError(f"codebooks file not found: {path}")
    if path.suffix == ".npy":
        return _codebooks_npy(path), None
    transform = RQVAETransform(path)
    return transform.codebooks, transform


def _sids(args: argparse.Namespace) -> Path:
    import gr2
    from gr2.rq_parquet import catalog_keys, sids_parquet

    if args.codebooks is not None:
        raise ConfigError("--index writes the index's SIDs; drop --codebooks (codes come from the index)")
    if args.index is True and args.run_dir is None:
        raise ConfigError("--index without a FILE needs --run-dir (the run's sid/index.gr2sid)")
    path = Path(args.run_dir) / "sid" / "index.gr2sid" if args.index is True else Path(args.index)
    index = gr2.SidIndex.load(str(path))
    keys = catalog_keys(args.run_dir) if args.run_dir is not None else None
    return sids_parquet(index, args.input, args.output, id_column=args.id_column, chunk_rows=args.chunk_rows,
                        progress=not args.no_progress, keys=keys)


def _codes(args: argparse.Namespace) -> Path:
    from gr2.rq_parquet import encode_parquet

    codebooks, transform = _encoder(args)
    return encode_parquet(
        codebooks, args.input, args.output, column=args.column, id_column=args.id_column,
        chunk_rows=args.chunk_rows, beam=args.beam, progress=not args.no_progress, transform=transform,
    )


def main(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    start = time.perf_counter()
    output = _sids(args) if args.index is not None else _codes(args)
    rows = pq.ParquetFile(output).metadata.num_rows
    print(json.dumps({"output": str(output), "rows": rows, "seconds": round(time.perf_counter() - start, 2)}))
    return 0
