# size: one streaming encoder: schema checks, prefetch, the duplicate-id check and atomic output share per-file state
"""Parquet in, Parquet out: RQ codes (or a SidIndex's SIDs) for item tables larger than memory.

:func:`encode_parquet` reads an item table (an id column and an embedding column, a
``fixed_size_list`` or ``list`` of numbers) one row batch at a time
(``pyarrow.parquet.ParquetFile.iter_batches``), encodes each batch with the Rust encoder
(:class:`gr2.RQCodebooks`, the one ``encode_npy`` and the sid stage use) and appends the ids and
one uint16 column per level (``code_0`` .. ``code_{L-1}``) to the output. :func:`sids_parquet`
writes the SIDs a :class:`gr2.SidIndex` holds for the ids of a table instead (``sid_0`` ..).

Memory is two batches (the next is read while one is encoded) plus 8 bytes per row, 16 during
the final check: the id of every row is kept (as a 64-bit key; strings are hashed) so that a
duplicate id anywhere in the file is found. The output is written to a
temporary file in its own folder (``.{name}.tmp-{pid}-{random}``, the naming of
:mod:`gr2.rq`, so a killed run's leftovers are removed by the next), fsynced and renamed into
place only when every row passed: on any error nothing is left behind and an existing output is
untouched. Every error is a :class:`gr2.Gr2Error` naming the file, the row (0-based, in file
order) where it applies, and the reason.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gr2 import _checks as checks
from gr2._gr2 import RQCodebooks, SidIndex
from gr2.errors import CorruptFileError, DataError, Gr2IOError, InvalidInputError, UnknownItemError
from gr2.rq import _as_codebooks, _remove_stale_temp_files, _same_file, _temp_prefix

try:
    import fcntl
except ImportError:  # not POSIX: no lock on the temporary file (gr2.rq then removes no leftovers)
    fcntl = None  # type: ignore[assignment]

DEFAULT_CHUNK_ROWS = 65_536
# pyarrow takes the batch size as a C long; a batch past this is a typo, not a plan.
MAX_CHUNK_ROWS = 2**31 - 1
# Groups of equal id keys whose rows one extra pass over the id column compares by value; more
# only when every group of a block was a hash collision of distinct string ids.
_DUPLICATE_GROUPS_PER_PASS = 1024
_ROWS_PER_GROUP = 16


# -- input -----------------------------------------------------------------------------------


def _oneline(e: BaseException) -> str:
    """pyarrow's messages may span lines; the CLI's error is one line."""
    return " ".join(str(e).split())


def _open_parquet(path: Path) -> pq.ParquetFile:
    if path.is_dir():
        raise Gr2IOError(f"{path} is a directory; name one Parquet file")
    try:
        # pre_buffer=False: with pre-buffering (pyarrow's default) the reader caches every column
        # chunk it has read until it is closed, so memory grows with the file (measured: the
        # whole 531 MiB of a 4M-row file held at the end); without it, one batch at a time.
        return pq.ParquetFile(path, pre_buffer=False)
    except FileNotFoundError as e:
        raise Gr2IOError(f"input file not found: {path}") from e
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:  # bad magic, truncated footer
        raise CorruptFileError(f"{path} is not a readable Parquet file: {_oneline(e)}") from e
    except OSError as e:
        raise Gr2IOError(f"cannot read {path}: {e}") from e


def _field(schema: pa.Schema, path: Path, name: str, role: str) -> pa.Field:
    """``schema``'s column ``name``; a DataError naming the columns there are (``path`` labels the
    message: the input file, or the batch for :mod:`gr2.rq_arrow`)."""
    if schema.get_field_index(name) < 0:
        raise DataError(f"{path}: no {role} column {name!r} (columns: {', '.join(schema.names)})")
    return schema.field(name)


def _check_embedding_type(field: pa.Field, path: Path) -> int | None:
    """The fixed width of the embedding column (None for variable-length lists, checked per row)."""
    t = field.type
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise DataError(f"{path}: column {field.name!r} is {t}, not a list of numbers (fixed_size_list<float> "
                        "or list<float>, one embedding per row)")
    value = t.value_type
    if not (pa.types.is_floating(value) or pa.types.is_integer(value)):
        raise DataError(f"{path}: column {field.name!r} holds {value} values; embeddings must be numeric")
    return t.list_size if pa.types.is_fixed_size_list(t) else None


def _check_id_type(field: pa.Field, path: Path, integer_only: bool) -> None:
    t = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
    ok_int = pa.types.is_integer(t)
    ok_str = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
    if not ok_int and (integer_only or not ok_str):
        kinds = "integers" if integer_only else "integers or strings"
        raise DataError(f"{path}: id column {field.name!r} is {field.type}; ids must be {kinds} "
                        "(float ids would be truncated)")


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _no_nulls(arr: pa.Array, path: Path, name: str, start: int) -> None:
    if arr.null_count:
        row = start + _first(arr.is_null().to_numpy(zero_copy_only=False))
        raise InvalidInputError(f"{path}: row {row}: column {name!r} is null")


def _embedding_chunk(arr: pa.Array, path: Path, name: str, start: int, width: int) -> np.ndarray:
    """float32 (n, width), C-contiguous; InvalidInputError naming the first bad row."""
    _no_nulls(arr, path, name, start)
    n = len(arr)
    if not pa.types.is_fixed_size_list(arr.type):
        lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
        if n and (lengths != width).any():
            row = _first(lengths != width)
            raise InvalidInputError(f"{path}: row {start + row}: {name!r} has {lengths[row]} values, expected {width}")
    values = arr.flatten()  # respects the slice offset of the batch
    if values.null_count:
        row = start + _first(values.is_null().to_numpy(zero_copy_only=False)) // width
        raise InvalidInputError(f"{path}: row {row}: {name!r} holds a null value")
    # numpy's astype, so float64 input rounds exactly as `np.asarray(...).astype(np.float32)` would
    x = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, width)
    finite = np.isfinite(x)
    if not finite.all():
        row, col = (int(i[0]) for i in np.nonzero(~finite))
        raise InvalidInputError(f"{path}: row {start + row}: {name!r}[{col}] is {x[row, col]} (NaN and inf cannot be "
                                "encoded)")
    return np.ascontiguousarray(x)


def _id_chunk(arr: pa.Array, path: Path, name: str, start: int) -> pa.Array:
    _no_nulls(arr, path, name, start)
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def _id_keys(ids: pa.Array) -> np.ndarray:
    """uint64 keys, equal for equal ids: integers exactly (two's complement), strings hashed."""
    if pa.types.is_integer(ids.type):
        return ids.to_numpy(zero_copy_only=False).astype(np.int64 if pa.types.is_signed_integer(ids.type) else np.uint64,
                                                        copy=False).view(np.uint64)
    import pandas as pd  # a pyarrow/datasets dependency; its hash is vectorised and stable

    return pd.util.hash_array(ids.to_numpy(zero_copy_only=False), categorize=False)


def _batches(pf: pq.ParquetFile, path: Path, columns: list[str], chunk_rows: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(row of the batch's first row in the file, batch), in file order. A page that cannot be
    read or decoded (a file damaged after its footer was written) is a CorruptFileError, not a
    bare pyarrow error."""
    start = 0
    batches = pf.iter_batches(batch_size=chunk_rows, columns=columns, use_threads=True)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise CorruptFileError(f"{path}: row {start}: cannot read the batch of rows starting here: {_oneline(e)}") from e
        if batch is None:
            return
        yield start, batch
        start += batch.num_rows


def _prefetched(items: Iterator) -> Iterator:
    """``items``, each read in a background thread while the caller works on the one before:
    Parquet decoding and the Rust encoder both release the GIL, so reading overlaps encoding.
    At most two batches are in memory."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gr2-parquet-read") as pool:
        future = pool.submit(next, items, None)
        while (item := future.result()) is not None:
            future = pool.submit(next, items, None)
            yield item


# -- duplicate ids -----------------------------------------------------------------------------


class _Keys:
    """Every row's id key, appended batch by batch, searched for duplicates once at the end."""

    def __init__(self, n: int):
        self.keys = np.empty(n, dtype=np.uint64)
        self.filled = 0

    def add(self, keys: np.ndarray) -> None:
        self.keys[self.filled:self.filled + len(keys)] = keys
        self.filled += len(keys)

    def candidate_groups(self) -> list[np.ndarray]:
        """Row groups sharing a key (ascending rows), ordered by their second row: the group of
        the first repeated id comes first. Empty when every key is distinct (the common case,
        decided by one in-place sort)."""
        keys = self.keys[:self.filled]
        sorted_keys = np.sort(keys)
        if not (sorted_keys[1:] == sorted_keys[:-1]).any():
            return []
        del sorted_keys
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        starts = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1])))
        sizes = np.diff(np.append(starts, len(sk)))
        multi = starts[sizes > 1]
        groups = [order[s:s + min(int(sz), _ROWS_PER_GROUP)] for s, sz in zip(multi, sizes[sizes > 1])]
        return sorted(groups, key=lambda g: int(g[1]))


def _ids_at(pf: pq.ParquetFile, path: Path, id_column: str, rows: np.ndarray, chunk_rows: int) -> dict[int, object]:
    wanted = np.sort(rows)
    found: dict[int, object] = {}
    for start, batch in _batches(pf, path, [id_column], chunk_rows):
        lo, hi = np.searchsorted(wanted, [start, start + batch.num_rows])
        if lo == hi:
            continue
        ids = _id_chunk(batch.column(0), path, id_column, start)
        for row in wanted[lo:hi]:
            found[int(row)] = ids[int(row) - start].as_py()
    return found


def _first_duplicate(groups: list[np.ndarray], values: dict[int, object]) -> tuple[int, int] | None:
    """(earlier row, repeating row) with the smallest repeating row, or None (hash collisions only)."""
    best: tuple[int, int] | None = None
    for group in groups:
        seen: dict[object, int] = {}
        for row in (int(r) for r in group):
            if values[row] in seen:
                if best is None or row < best[1]:
                    best = (seen[values[row]], row)
                break
            seen[values[row]] = row
    return best


def _raise_duplicates(keys: _Keys, pf: pq.ParquetFile, path: Path, id_column: str, chunk_rows: int) -> None:
    groups = keys.candidate_groups()
    for b in range(0, len(groups), _DUPLICATE_GROUPS_PER_PASS):
        block = groups[b:b + _DUPLICATE_GROUPS_PER_PASS]
        values = _ids_at(pf, path, id_column, np.concatenate(block), chunk_rows)
        hit = _first_duplicate(block, values)
        if hit is not None:
            first, row = hit
            raise InvalidInputError(f"{path}: row {row}: duplicate id {values[row]!r} in column {id_column!r} "
                                    f"(first at row {first})")


# -- output ------------------------------------------------------------------------------------


def _check_paths(input_path, output_path) -> tuple[Path, Path]:
    try:
        input_path, output_path = Path(input_path), Path(output_path)
    except TypeError as e:
        raise InvalidInputError(f"input_path and output_path must be str or os.PathLike: {e}") from e
    if input_path.absolute() == output_path.absolute() or _same_file(input_path, output_path):
        raise InvalidInputError(f"output path {output_path} is the input file {input_path}; write to another file")
    if output_path.is_dir():
        raise InvalidInputError(f"output path {output_path} is a directory; name the Parquet file to write")
    return input_path, output_path


def _check_options(chunk_rows: Any, progress: Any, **columns: Any) -> int:
    """The batch size as an int; column names must be non-empty strings, progress a bool."""
    for arg, name in columns.items():
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"{arg} must be a column name (a non-empty str), got {name!r:.60}")
    checks.flag("progress", progress)
    return checks.whole("chunk_rows", chunk_rows, 1, MAX_CHUNK_ROWS)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Output:
    """The ParquetWriter of the temporary file; a failed write (a full disk, say) is a Gr2IOError
    naming the output, not a bare OSError or pyarrow error."""

    def __init__(self, tmp: str, schema: pa.Schema, output_path: Path):
        self.output_path = output_path
        self.writer = self._io("create", lambda: pq.ParquetWriter(tmp, schema))

    def _io(self, what: str, action: Callable):
        try:
            return action()
        except (OSError, pa.ArrowException) as e:
            raise Gr2IOError(f"{self.output_path}: cannot {what} the output: {_oneline(e)}") from e

    def write(self, table: pa.Table) -> None:
        self._io("write", lambda: self.writer.write_table(table))

    def close(self) -> None:
        self._io("finish", self.writer.close)


def _temp_file(output_path: Path) -> tuple[int, str]:
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(output_path)
        fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(output_path)}{os.getpid()}-", dir=output_path.parent)
    except OSError as e:
        raise Gr2IOError(f"cannot create {output_path}: {_oneline(e)}") from e
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # tells gr2.rq's clean-up a writer is alive
    return fd, tmp


def _commit(fd: int, tmp: str, output_path: Path) -> None:
    try:
        os.fsync(fd)  # the same file: the data is on disk before the name points at it
        os.replace(tmp, output_path)
    except OSError as e:
        raise Gr2IOError(f"cannot write {output_path}: {_oneline(e)}") from e
    _fsync_dir(output_path.parent)  # so the rename itself survives a crash


@contextlib.contextmanager
def _atomic_parquet(output_path: Path, schema: pa.Schema) -> Iterator[_Output]:
    """An :class:`_Output` on a locked temporary file next to ``output_path``, renamed over it
    only when the body returns; removed on any exception, so a reader never sees a partial file."""
    fd, tmp = _temp_file(output_path)
    try:
        out = _Output(tmp, schema, output_path)
        try:
            yield out
        except BaseException:
            with contextlib.suppress(Exception):  # the body's error is the one to report
                out.writer.close()
            raise
        out.close()
        _commit(fd, tmp, output_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def _output_schema(id_field: pa.Field, prefix: str, levels: int) -> pa.Schema:
    id_type = id_field.type.value_type if pa.types.is_dictionary(id_field.type) else id_field.type
    fields = [pa.field(id_field.name, id_type, nullable=False)]
    fields += [pa.field(f"{prefix}_{level}", pa.uint16(), nullable=False) for level in range(levels)]
    return pa.schema(fields)


def _table(schema: pa.Schema, ids: pa.Array, codes: np.ndarray) -> pa.Table:
    columns = [ids] + [pa.array(codes[:, level]) for level in range(codes.shape[1])]
    return pa.Table.from_arrays(columns, schema=schema)


# -- the two entry points -----------------------------------------------------------------------


def encode_parquet(
    codebooks: RQCodebooks | np.ndarray,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    column: str = "embedding",
    id_column: str = "item_id",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    beam: int = 1,
    progress: bool = True,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    input_dim: int | None = None,
) -> Path:
    """Encodes the embeddings of ``input_path`` (Parquet) into RQ codes at ``output_path``.

    The output holds ``id_column`` (same type; integer or string ids) and uint16 columns
    ``code_0`` .. ``code_{L-1}``, rows in input order. The codes equal
    ``codebooks.encode(embeddings.astype(np.float32), beam)`` of the whole table, whatever
    ``chunk_rows`` (rows per batch, read across row group boundaries).

    ``transform`` maps each float32 (n, input_dim) batch to the (n, codebooks.dim) vectors the
    codebooks quantise (the sid stage's RQ-VAE encoder, :class:`RQVAETransform`); without it the
    embeddings are encoded as they are. ``input_dim`` (the width every row must have) defaults to
    ``transform.input_dim`` when the transform has one, else ``codebooks.dim``.

    Raises Gr2IOError (missing or unreadable input, an output that cannot be written),
    CorruptFileError (not a Parquet file, a damaged page), DataError (missing column, non-list or
    non-numeric embeddings, float ids) and InvalidInputError (a row of the wrong width, a null,
    NaN/inf, a duplicate id, a bad argument, an output path that is a directory or the input),
    each naming file, row and reason.
    """
    cb = _as_codebooks(codebooks)
    chunk_rows = _check_options(chunk_rows, progress, column=column, id_column=id_column)
    cb.encode(np.zeros((0, cb.dim), np.float32), beam=beam)  # checks beam before any work
    width = int(input_dim) if input_dim is not None else int(getattr(transform, "input_dim", cb.dim))
    if column == id_column:
        raise InvalidInputError(f"the embedding column and the id column are both {column!r}; name two columns")
    input_path, output_path = _check_paths(input_path, output_path)
    pf = _open_parquet(input_path)
    id_field = _field(pf.schema_arrow, input_path, id_column, "id")
    _check_id_type(id_field, input_path, integer_only=False)
    fixed = _check_embedding_type(_field(pf.schema_arrow, input_path, column, "embedding"), input_path)
    if fixed is not None and fixed != width:
        raise InvalidInputError(f"{input_path}: row 0: {column!r} has {fixed} values per row (every row), "
                                f"expected {width}")
    schema = _output_schema(id_field, "code", cb.levels)
    n = pf.metadata.num_rows
    keys = _Keys(n)
    with _atomic_parquet(output_path, schema) as writer, \
            tqdm(total=n, unit="item", desc="rq encode", disable=not progress) as bar:
        for start, batch in _prefetched(_batches(pf, input_path, [id_column, column], chunk_rows)):
            ids = _id_chunk(batch.column(id_column), input_path, id_column, start)
            keys.add(_id_keys(ids))
            x = _embedding_chunk(batch.column(column), input_path, column, start, width)
            codes = _encode(cb, x if transform is None else transform(x), beam, input_path, start)
            writer.write(_table(schema, ids, codes))
            bar.update(batch.num_rows)
        _raise_duplicates(keys, pf, input_path, id_column, chunk_rows)
    return output_path


def _encode(cb: RQCodebooks, x: np.ndarray, beam: int, path: Path, start: int) -> np.ndarray:
    try:
        return cb.encode(np.ascontiguousarray(x, dtype=np.float32), beam=beam, row_offset=start)
    except InvalidInputError as e:  # e.g. a transform output that overflows float32 distances
        raise InvalidInputError(f"{path}: {e}") from e


def sids_parquet(
    index: SidIndex,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    id_column: str = "item_id",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool = True,
    keys: Callable[[pa.Array, Path, int], np.ndarray] | None = None,
) -> Path:
    """Writes the SIDs ``index`` holds for the ids of ``input_path`` (Parquet) to ``output_path``:
    ``id_column`` and uint16 columns ``sid_0`` .. ``sid_{index.levels-1}``, rows in input order.
    Only the id column is read.

    The ids must be the index's keys (non-negative integers) unless ``keys(ids, input_path, first_row)``
    maps each id batch (a pyarrow Array) to them (the run's catalog does, for ``gr2 encode --run-dir``).
    Errors as for :func:`encode_parquet`, plus UnknownItemError for an id the index lacks and
    InvalidInputError for a negative id, each naming file and row.
    """
    chunk_rows = _check_options(chunk_rows, progress, id_column=id_column)
    if not isinstance(index, SidIndex):
        raise InvalidInputError(f"index must be a gr2.SidIndex (gr2.SidIndex.load(path)), got {type(index).__name__}")
    input_path, output_path = _check_paths(input_path, output_path)
    pf = _open_parquet(input_path)
    id_field = _field(pf.schema_arrow, input_path, id_column, "id")
    _check_id_type(id_field, input_path, integer_only=keys is None)
    schema = _output_schema(id_field, "sid", index.levels)
    n = pf.metadata.num_rows
    seen = _Keys(n)
    with _atomic_parquet(output_path, schema) as writer, \
            tqdm(total=n, unit="item", desc="sid lookup", disable=not progress) as bar:
        for start, batch in _prefetched(_batches(pf, input_path, [id_column], chunk_rows)):
            ids = _id_chunk(batch.column(0), input_path, id_column, start)
            seen.add(_id_keys(ids))
            item_keys = _index_keys(ids, input_path, id_column, start) if keys is None else keys(ids, input_path, start)
            writer.write(_table(schema, ids, _lookup(index, item_keys, ids, input_path, start)))
            bar.update(batch.num_rows)
        _raise_duplicates(seen, pf, input_path, id_column, chunk_rows)
    return output_path


def _index_keys(ids: pa.Array, path: Path, name: str, start: int) -> np.ndarray:
    values = ids.to_numpy(zero_copy_only=False)
    if values.dtype.kind == "i" and len(values) and (values < 0).any():
        row = _first(values < 0)
        raise InvalidInputError(f"{path}: row {start + row}: id {values[row]} in column {name!r} is negative; "
                                "SidIndex ids are unsigned")
    return values.astype(np.uint64, copy=False)


def _lookup(index: SidIndex, item_keys: np.ndarray, ids: pa.Array, path: Path, start: int) -> np.ndarray:
    try:
        return index.sids(np.ascontiguousarray(item_keys, dtype=np.uint64))
    except UnknownItemError:
        row = next(i for i, k in enumerate(item_keys) if int(k) not in index)
        raise UnknownItemError(f"{path}: row {start + row}: id {ids[row].as_py()!r} is not in the SID index") from None


# -- a run's RQ-VAE and catalog -----------------------------------------------------------------


class RQVAETransform:
    """The sid stage's RQ-VAE encoder (input standardisation + MLP), embedding -> latent, loaded
    from a run's ``sid/codebooks.safetensors`` (:meth:`from_run_dir`, or the file itself);
    ``codebooks`` quantise its output.

    Codes from it are the RQ-VAE's argmin codes; the SIDs the run uses also carry the random last
    level and the collision repair, which only the run's index holds (``sids_parquet``)."""

    def __init__(self, path: str | os.PathLike):
        from gr2.sid.assign import load_rqvae_file  # torch: only imported for this mode

        self.model, _, _, codebooks = load_rqvae_file(path)
        self.codebooks = RQCodebooks(np.ascontiguousarray(codebooks, dtype=np.float32))
        self.input_dim = int(self.model.input_mean.shape[0])

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike) -> "RQVAETransform":
        path = Path(run_dir) / "sid" / "codebooks.safetensors"
        if not path.is_file():
            raise DataError(f"{path} does not exist; run the sid stage first (`gr2 sid --run-dir {run_dir}`)")
        return cls(path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from gr2.sid.rqvae import encode_latent

        # Arrow's zero-copy float32 buffers are read-only, which torch.from_numpy warns about
        return encode_latent(self.model, x if x.flags.writeable else x.copy())


def catalog_keys(run_dir: str | os.PathLike) -> Callable[[pa.Array, Path, int], np.ndarray]:
    """Maps a batch of the catalog's own item ids (``data/items`` ``item_id``, compared as text)
    to the ``item_idx`` keys the run's SID index is built on; UnknownItemError names the row."""
    from gr2.data.catalog import load_items

    items = load_items(run_dir)
    by_id = {str(item_id): idx for idx, item_id in zip(items["item_idx"], items["item_id"])}

    def keys(ids: pa.Array, path: Path, start: int) -> np.ndarray:
        out = np.empty(len(ids), dtype=np.uint64)
        for row, item_id in enumerate(ids.to_pylist()):
            text = item_id.decode() if isinstance(item_id, bytes) else str(item_id)
            if text not in by_id:
                raise UnknownItemError(f"{path}: row {start + row}: id {item_id!r} is not in the catalog of {run_dir}")
            out[row] = by_id[text]
        return out

    return keys


__all__ = ["encode_parquet", "sids_parquet", "RQVAETransform", "catalog_keys", "DEFAULT_CHUNK_ROWS"]
