"""RQ codes for in-memory Arrow batches: what a Ray Data actor (:mod:`gr2.ray`) or a Spark
``mapInArrow`` function (:func:`map_in_arrow`) runs on each batch. No dependency beyond gr2's own.

:class:`ArrowRQEncoder` loads the codebooks once and then encodes one batch per call: a pyarrow
Table (or a dict of numpy arrays) with an id column and an embedding column, with
:func:`gr2.encode_parquet`'s conventions (integer or string ids; a ``fixed_size_list``/``list`` of
numbers, or a 2-D numpy array, per row) and its validation functions, so the codes of a row equal
``encode_parquet``'s bit for bit. The result holds the ids and uint16 ``code_0`` .. ``code_{L-1}``,
rows in batch order.

Errors are ``encode_parquet``'s, labelled ``gr2 batch`` instead of a file and naming the row in the
batch and its id, e.g. ``gr2 batch: row 3: 'embedding'[1] is nan (NaN and inf cannot be encoded)
[item_id=1003]``: a batch row number alone does not find the item. Not checked: duplicate ids across
batches (a batch is all one call sees; ``encode_parquet`` checks a whole file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from gr2 import _checks as checks
from gr2.errors import InvalidInputError
from gr2.rq import _as_codebooks
from gr2.rq_parquet import (
    _check_embedding_type,
    _check_id_type,
    _check_options,
    _embedding_chunk,
    _encode,
    _field,
    _id_chunk,
    _output_schema,
    _table,
)

# what error messages call a batch, where encode_parquet names the file
BATCH_LABEL = "gr2 batch"
_ROW = re.compile(r"^gr2 batch: row (\d+):")


def load_codebooks(path: str | os.PathLike) -> tuple[Any, Any]:
    """(RQCodebooks, transform or None) from a float32 (L, K, D) ``.npy``, a sid stage's
    ``codebooks.safetensors`` (its RQ-VAE encoder is the transform) or a run directory (its
    ``sid/codebooks.safetensors``): ``gr2 encode``'s loaders, so a path means the same as there."""
    from gr2.encode_command import load_codebooks_file
    from gr2.rq_parquet import RQVAETransform

    if Path(path).is_dir():
        transform = RQVAETransform.from_run_dir(path)
        return transform.codebooks, transform
    codebooks, transform = load_codebooks_file(path)
    return _as_codebooks(codebooks), transform  # a .npy comes back as its array


def size_encoder_threads(threads: int) -> int:
    """Sets the Rust encoder's thread count unless the user already did; returns the count in force.

    The encoder runs on rayon's global pool, which reads ``RAYON_NUM_THREADS`` once, when the process
    first encodes. Without this each of several workers on a node starts one thread per core of
    the node (8 actors on 32 cores: 256 threads). A process that has already encoded keeps its
    pool, so set the variable before the worker starts where the framework allows it (gr2.ray does)."""
    threads = checks.whole("threads", threads, 1, 1 << 16)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    return int(os.environ["RAYON_NUM_THREADS"])


class ArrowRQEncoder:
    """Codebooks loaded once (from a path, :func:`load_codebooks`), then ``encoder(batch)`` per batch.

    ``threads``: the encoder threads of this process (:func:`size_encoder_threads`); None leaves
    the default (``RAYON_NUM_THREADS``, else one per core)."""

    def __init__(self, codebooks: str | os.PathLike, *, column: str = "embedding", id_column: str = "item_id",
                 beam: int = 1, threads: int | None = None):
        _check_options(1, False, column=column, id_column=id_column)
        if column == id_column:
            raise InvalidInputError(f"the embedding column and the id column are both {column!r}; name two columns")
        self.column, self.id_column = column, id_column
        self.beam = checks.whole("beam", beam, 1, 1024)
        # before the first encode, which builds the pool
        self.threads = size_encoder_threads(threads) if threads is not None else None
        self.codebooks, self.transform = self.load(codebooks)
        self.width = int(getattr(self.transform, "input_dim", self.codebooks.dim))

    def load(self, path: str | os.PathLike) -> tuple[Any, Any]:
        """(codebooks, transform): the one load of this encoder (a method, so a subclass can count it)."""
        return load_codebooks(path)

    def __call__(self, batch: pa.Table | pa.RecordBatch | dict[str, np.ndarray]) -> pa.Table | dict[str, np.ndarray]:
        """The ids and codes of ``batch``: a Table for a Table or RecordBatch, a dict for a dict."""
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        if isinstance(batch, pa.Table):
            return self.encode_table(batch)
        if isinstance(batch, dict):
            table = self.encode_table(_numpy_to_table(batch, self.id_column, self.column))
            return {name: table.column(name).to_numpy() for name in table.column_names}
        raise InvalidInputError(f"{BATCH_LABEL}: a batch must be a pyarrow Table or RecordBatch or a dict of numpy "
                                f"arrays, got {type(batch).__name__}")

    def encode_table(self, table: pa.Table) -> pa.Table:
        """``encode_parquet``'s per-batch steps on one table; errors name the batch row and its id."""
        try:
            return self._encode_table(table)
        except InvalidInputError as e:
            raise type(e)(_with_id(str(e), table, self.id_column)) from e

    def _encode_table(self, table: pa.Table) -> pa.Table:
        id_field = _field(table.schema, BATCH_LABEL, self.id_column, "id")
        _check_id_type(id_field, BATCH_LABEL, integer_only=False)
        embeddings = _as_list_array(table.column(_field(table.schema, BATCH_LABEL, self.column, "embedding").name))
        fixed = _check_embedding_type(pa.field(self.column, embeddings.type), BATCH_LABEL)
        if fixed is not None and fixed != self.width:
            raise InvalidInputError(f"{BATCH_LABEL}: row 0: {self.column!r} has {fixed} values per row (every row), "
                                    f"expected {self.width}")
        ids = _id_chunk(table.column(self.id_column).combine_chunks(), BATCH_LABEL, self.id_column, 0)
        x = _embedding_chunk(embeddings, BATCH_LABEL, self.column, 0, self.width)
        codes = _encode(self.codebooks, x if self.transform is None else self.transform(x), self.beam, BATCH_LABEL, 0)
        return _table(_output_schema(id_field, "code", self.codebooks.levels), ids, codes)


def _as_list_array(column: pa.ChunkedArray) -> pa.Array:
    """One array of lists. Ray stores 2-D numpy columns as its tensor extension type; the storage
    of an extension array is the plain list array gr2's checks read."""
    arr = column.combine_chunks()
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    return arr


def _numpy_to_table(batch: dict[str, np.ndarray], id_column: str, column: str) -> pa.Table:
    """A numpy batch as Arrow: a 2-D embedding array becomes a fixed_size_list column, an object
    array of per-row arrays a list column; other columns are not encoded and are dropped."""
    arrays = {}
    for name in (id_column, column):
        if name not in batch:
            continue  # _field then names the missing column, as for a table
        values = batch[name]
        if name == column and isinstance(values, np.ndarray) and values.ndim == 2:
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
        else:
            arrays[name] = pa.array(list(values) if name == column else values)
    return pa.table(arrays)


def _with_id(message: str, table: pa.Table, id_column: str) -> str:
    """``message`` plus the id of the batch row it names (the row number alone finds nothing)."""
    match = _ROW.match(message)
    if match is None or id_column not in table.column_names or int(match.group(1)) >= table.num_rows:
        return message
    return f"{message} [{id_column}={table.column(id_column)[int(match.group(1))].as_py()!r}]"


def map_in_arrow(
    codebooks: str | os.PathLike,
    *,
    column: str = "embedding",
    id_column: str = "item_id",
    beam: int = 1,
    threads: int | None = 1,
    code_type: pa.DataType = pa.int32(),
) -> Callable[[Iterable[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function for Spark's ``df.mapInArrow(f, schema)``: per partition, it loads the codebooks
    once and yields each record batch's ids and codes.

    Spark has no unsigned types, so the codes are cast to ``code_type`` (int32: the schema
    ``"item_id long, code_0 int, ..."``; ``pa.uint16()`` keeps gr2's type for other consumers).
    ``threads``: the encoder threads per Python worker; match ``spark.task.cpus`` (default 1)."""

    def encode_partition(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        encoder = ArrowRQEncoder(codebooks, column=column, id_column=id_column, beam=beam, threads=threads)
        for batch in batches:
            table = encoder.encode_table(pa.Table.from_batches([batch]))
            yield from _cast_codes(table, code_type).to_batches()

    return encode_partition


def _cast_codes(table: pa.Table, code_type: pa.DataType) -> pa.Table:
    schema = pa.schema([f if i == 0 else f.with_type(code_type) for i, f in enumerate(table.schema)])
    return table.cast(schema)


__all__ = ["ArrowRQEncoder", "map_in_arrow", "load_codebooks", "size_encoder_threads", "BATCH_LABEL"]
