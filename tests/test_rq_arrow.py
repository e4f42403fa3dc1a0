"""gr2.rq_arrow: the per-batch encoder of gr2.ray and of the Spark mapInArrow recipe. Every batch
format gives encode_parquet's codes bit for bit; bad rows are encode_parquet's typed errors naming
the batch row and its id; the mapInArrow function (run here on Arrow record batches, without a
Spark session) loads once per partition and matches encode_parquet. No Ray needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gr2
from gr2.errors import DataError, Gr2IOError, InvalidInputError
from gr2.rq_arrow import ArrowRQEncoder, map_in_arrow, size_encoder_threads

L, K, D, N = 3, 16, 8, 500


@pytest.fixture
def world(tmp_path):
    """(codebooks .npy path, items table, encode_parquet's output table) for N random items."""
    rng = np.random.default_rng(7)
    np.save(tmp_path / "cb.npy", rng.standard_normal((L, K, D)).astype(np.float32))
    x = rng.standard_normal((N, D)).astype(np.float32)
    ids = rng.permutation(N).astype(np.int64) * 7 + 3
    table = pa.table({"item_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D)})
    pq.write_table(table, tmp_path / "items.parquet", row_group_size=200)
    cb = gr2.RQCodebooks(np.load(tmp_path / "cb.npy"))
    expected = pq.read_table(gr2.encode_parquet(cb, tmp_path / "items.parquet", tmp_path / "codes.parquet",
                                                progress=False))
    return tmp_path / "cb.npy", table, expected


def _slices(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


@pytest.mark.parametrize("size", [1, 64, 200, N])
def test_table_batches_equal_encode_parquet(world, size):
    path, table, expected = world
    encoder = ArrowRQEncoder(path)
    got = pa.concat_tables([encoder(t) for t in _slices(table, size)])
    assert got.schema == expected.schema  # int64 ids, uint16 code_0..code_2, non-null
    assert got.equals(expected)


def test_numpy_and_record_batch_formats(world):
    path, table, expected = world
    encoder = ArrowRQEncoder(path)
    x = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    as_2d = encoder({"item_id": table["item_id"].to_numpy(), "embedding": x})
    as_objects = encoder({"item_id": table["item_id"].to_numpy(), "embedding": np.array(list(x.astype(np.float64)),
                                                                                       dtype=object)})
    for got in (as_2d, as_objects):
        assert got.keys() == {"item_id", "code_0", "code_1", "code_2"} and got["code_0"].dtype == np.uint16
        for name in got:
            np.testing.assert_array_equal(got[name], expected[name].to_numpy())
    assert encoder(table.to_batches()[0]).equals(expected.slice(0, table.to_batches()[0].num_rows))


def test_string_ids_and_variable_lists(world):
    path, table, expected = world
    strings = pa.array([f"item-{i}" for i in table["item_id"].to_pylist()])
    values = table["embedding"].combine_chunks().flatten()
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, N * D + 1, D, dtype=np.int32)), values.cast(pa.float64()))
    got = ArrowRQEncoder(path)(pa.table({"item_id": strings, "embedding": lists}))
    assert got["item_id"].to_pylist() == strings.to_pylist()
    assert got.drop(["item_id"]).equals(expected.drop(["item_id"]))


def _bad(table: pa.Table, row: int, value: float) -> pa.Table:
    x = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).copy()
    x[row, 1] = value
    return table.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D))


def test_bad_rows_name_batch_row_and_id(world):
    path, table, _ = world
    encoder = ArrowRQEncoder(path)
    bad_id = table["item_id"][37].as_py()
    with pytest.raises(InvalidInputError, match=rf"^gr2 batch: row 37: 'embedding'\[1\] is nan .*\[item_id={bad_id}\]$"):
        encoder(_bad(table, 37, np.nan))
    short = pa.table({"item_id": [1, 2], "embedding": pa.array([[0.0] * D, [0.0] * (D - 1)])})
    with pytest.raises(InvalidInputError, match=r"row 1: 'embedding' has 7 values, expected 8 \[item_id=2\]"):
        encoder(short)
    with pytest.raises(InvalidInputError, match=r"row 0: 'embedding' has 9 values per row"):
        encoder(pa.table({"item_id": [1], "embedding": pa.FixedSizeListArray.from_arrays(pa.array([0.0] * 9), 9)}))
    with pytest.raises(InvalidInputError, match=r"row 1: column 'item_id' is null"):
        encoder(pa.table({"item_id": pa.array([1, None]), "embedding": pa.array([[0.0] * D] * 2)}))
    with pytest.raises(DataError, match=r"no embedding column 'emb' \(columns: item_id, embedding\)"):
        ArrowRQEncoder(path, column="emb")(table)
    with pytest.raises(DataError, match=r"ids must be integers or strings"):
        encoder(table.set_column(0, "item_id", pa.array(np.arange(N, dtype=np.float64))))
    with pytest.raises(InvalidInputError, match="a batch must be a pyarrow Table"):
        encoder([1, 2])


def test_constructor_checks(world, tmp_path):
    path, _, _ = world
    with pytest.raises(Gr2IOError, match="codebooks file not found"):
        ArrowRQEncoder(tmp_path / "missing.npy")
    with pytest.raises(InvalidInputError, match="both 'x'"):
        ArrowRQEncoder(path, column="x", id_column="x")
    with pytest.raises(InvalidInputError, match="beam must be an int"):
        ArrowRQEncoder(path, beam=0)


def test_threads_set_unless_the_user_did(world, monkeypatch):
    path, _, _ = world
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    assert ArrowRQEncoder(path, threads=2).threads == 2
    monkeypatch.setenv("RAYON_NUM_THREADS", "3")
    assert size_encoder_threads(1) == 3
    with pytest.raises(InvalidInputError, match="threads must be an int"):
        size_encoder_threads(0)


class _Counting(ArrowRQEncoder):
    loads = 0

    def load(self, path):
        type(self).loads += 1
        return super().load(path)


def test_map_in_arrow_body_per_partition(world, monkeypatch):
    """What Spark runs: the function gets an iterator of record batches per partition. Here two
    partitions of uneven batches; codes int32 (Spark has no uint16), equal to encode_parquet's."""
    path, table, expected = world
    monkeypatch.setattr("gr2.rq_arrow.ArrowRQEncoder", _Counting)
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    f = map_in_arrow(path)
    partitions = [table.slice(0, 230).to_batches(max_chunksize=100), table.slice(230).to_batches(max_chunksize=64)]
    out = [batch for part in partitions for batch in f(iter(part))]
    assert _Counting.loads == 2 and len(out) == 3 + 5
    got = pa.Table.from_batches(out)
    assert [f.type for f in got.schema] == [pa.int64()] + [pa.int32()] * L
    assert got.cast(expected.schema).equals(expected)


_THREAD_PROBE = """
import os, sys, numpy as np, pyarrow as pa
from gr2.rq_arrow import ArrowRQEncoder
enc = ArrowRQEncoder(sys.argv[1], threads=int(sys.argv[2]))
x = np.random.default_rng(1).standard_normal((20000, 8)).astype(np.float32)
table = pa.table({"item_id": np.arange(20000), "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)})
before = len(os.listdir("/proc/self/task"))
enc(table)
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_threads_is_the_rust_pool_size(world):
    """The first encode starts the Rust pool: exactly ``threads`` new threads, here more than this
    machine's cores so the default (one per core) would show. In a fresh process: a pool, once built,
    keeps its size."""
    import os
    import subprocess
    import sys

    path, _, _ = world
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    threads = (os.cpu_count() or 1) + 1
    out = subprocess.run([sys.executable, "-c", _THREAD_PROBE, str(path), str(threads)], env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    assert int(out.stdout) == threads
