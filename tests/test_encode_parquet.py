"""gr2.rq_parquet / `gr2 encode`: streaming Parquet encode equals the in-memory encoder bit for
bit at every chunk size (batches ending mid-row-group and across several row groups); every bad
input is a typed gr2 error naming file, row and reason; the output appears whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gr2
from gr2 import cli
from gr2.errors import CorruptFileError, DataError, Gr2Error, Gr2IOError, InvalidInputError, UnknownItemError
from gr2.rq_parquet import RQVAETransform, encode_parquet, sids_parquet

L, K, D = 3, 16, 8


def _codebooks(seed: int = 0, levels: int = L, k: int = K, d: int = D) -> gr2.RQCodebooks:
    rng = np.random.default_rng(seed)
    return gr2.RQCodebooks(rng.standard_normal((levels, k, d)).astype(np.float32))


def _embedding_array(x: np.ndarray, kind: str = "fixed", value_type=pa.float32()) -> pa.Array:
    values = pa.array(x.reshape(-1), type=value_type)
    if kind == "fixed":
        return pa.FixedSizeListArray.from_arrays(values, x.shape[1])
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32 if kind == "list" else np.int64))
    return (pa.ListArray if kind == "list" else pa.LargeListArray).from_arrays(offsets, values)


def _write(path: Path, ids, x: np.ndarray, row_group_size: int | None = None, kind: str = "fixed",
           value_type=pa.float32(), id_name: str = "item_id", column: str = "embedding") -> Path:
    table = pa.table({id_name: ids, column: _embedding_array(x, kind, value_type)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _read_codes(path: Path, prefix: str = "code") -> np.ndarray:
    table = pq.read_table(path)
    names = [n for n in table.column_names if n.startswith(prefix + "_")]
    return np.stack([table[n].to_numpy() for n in names], axis=1) if names else np.zeros((0, 0), np.uint16)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# -- bit-equality ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 7, 128, 300, 301, 1000, 4096])
def test_equals_in_memory_encoder_across_chunks_and_row_groups(tmp_path, chunk_rows):
    cb = _codebooks()
    rng = np.random.default_rng(1)
    n = 1000
    x = rng.standard_normal((n, D)).astype(np.float32)
    src = _write(tmp_path / "items.parquet", np.arange(n, dtype=np.int64) * 3, x, row_group_size=300)
    assert pq.ParquetFile(src).metadata.num_row_groups == 4
    if chunk_rows == 1:  # one row per batch is slow to write; a prefix of the file shows it
        src = _write(tmp_path / "few.parquet", np.arange(40, dtype=np.int64), x[:40], row_group_size=13)
        x = x[:40]
    out = encode_parquet(cb, src, tmp_path / "codes.parquet", chunk_rows=chunk_rows, progress=False)
    table = pq.read_table(out)
    assert table.schema.field("code_0").type == pa.uint16() and table.num_columns == 1 + L
    np.testing.assert_array_equal(_read_codes(out), cb.encode(x))
    np.testing.assert_array_equal(table["item_id"].to_numpy(), pq.read_table(src)["item_id"].to_numpy())
    assert _leftovers(tmp_path) == []


def test_equals_encode_npy_with_beam(tmp_path):
    cb = _codebooks(3)
    x = np.random.default_rng(4).standard_normal((777, D)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    gr2.encode_npy(cb, tmp_path / "x.npy", tmp_path / "codes.npy", chunk_size=100, beam=4, progress=False)
    src = _write(tmp_path / "items.parquet", np.arange(777), x, row_group_size=250)
    out = encode_parquet(cb, src, tmp_path / "codes.parquet", chunk_rows=99, beam=4, progress=False)
    np.testing.assert_array_equal(_read_codes(out), np.load(tmp_path / "codes.npy"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 120),
    d=st.integers(1, 12),
    chunk_rows=st.integers(1, 64),
    row_group=st.integers(1, 50),
    kind=st.sampled_from(["fixed", "list", "large_list"]),
    value_type=st.sampled_from([pa.float32(), pa.float64(), pa.float16(), pa.int32()]),
    string_ids=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_tables_equal_in_memory_encode(tmp_path, n, d, chunk_rows, row_group, kind, value_type, string_ids, seed):
    rng = np.random.default_rng(seed)
    cb = _codebooks(seed % 7, levels=2, k=8, d=d)
    scale = rng.choice([1e-3, 1.0, 1e3])  # tiny and large values: the float32 rounding must match too
    raw = rng.standard_normal((n, d)) * scale
    if pa.types.is_integer(value_type):
        raw = np.round(raw)
    ids = (pa.array([f"id-{i}" for i in rng.permutation(n)], pa.string()) if string_ids
           else pa.array(rng.permutation(n).astype(np.uint64) * 7))
    src = _write(tmp_path / f"in-{seed}.parquet", ids, raw, row_group_size=row_group, kind=kind, value_type=value_type)
    out = encode_parquet(cb, src, tmp_path / f"out-{seed}.parquet", chunk_rows=chunk_rows, progress=False)
    expected = pq.read_table(src)["embedding"].to_numpy()
    x = np.asarray([np.asarray(r, dtype=np.float64) for r in expected], dtype=np.float64).reshape(n, d).astype(np.float32)
    np.testing.assert_array_equal(_read_codes(out), cb.encode(x))
    assert pq.read_table(out)["item_id"].to_pylist() == ids.to_pylist()


# -- bad input: file, row, reason; nothing written ---------------------------------------------


def _good(tmp_path: Path, n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n, dtype=np.int64), np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)


def _bad_nan(tmp_path):
    ids, x = _good(tmp_path)
    x[37, 5] = np.nan
    return _write(tmp_path / "nan.parquet", ids, x, row_group_size=20), (InvalidInputError, "row 37", "NaN")


def _bad_inf(tmp_path):
    ids, x = _good(tmp_path)
    x[3, 0] = -np.inf
    return _write(tmp_path / "inf.parquet", ids, x, kind="list"), (InvalidInputError, "row 3", "inf")


def _bad_duplicate(tmp_path):
    ids, x = _good(tmp_path)
    ids[44] = ids[6]  # in another row group and another batch
    return _write(tmp_path / "dup.parquet", ids, x, row_group_size=20), (InvalidInputError, "row 44", "duplicate id 6")


def _bad_duplicate_string(tmp_path):
    ids, x = _good(tmp_path)
    names = [f"item-{i}" for i in ids]
    names[30] = names[29] = "same"
    return _write(tmp_path / "dups.parquet", names, x), (InvalidInputError, "row 30", "first at row 29")


def _bad_width_fixed(tmp_path):
    ids, _ = _good(tmp_path)
    x = np.zeros((len(ids), D + 1), np.float32)
    return _write(tmp_path / "wide.parquet", ids, x), (InvalidInputError, "row 0", f"expected {D}")


def _bad_width_row(tmp_path):
    ids, x = _good(tmp_path)
    rows = [list(r) for r in x]
    rows[41] = rows[41][:-2]
    table = pa.table({"item_id": ids, "embedding": pa.array(rows, type=pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "ragged.parquet", row_group_size=16)
    return tmp_path / "ragged.parquet", (InvalidInputError, "row 41", f"has {D - 2} values, expected {D}")


def _bad_null_row(tmp_path):
    ids, x = _good(tmp_path)
    rows: list = [list(r) for r in x]
    rows[12] = None
    table = pa.table({"item_id": ids, "embedding": pa.array(rows, type=pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "null.parquet")
    return tmp_path / "null.parquet", (InvalidInputError, "row 12", "null")


def _bad_missing_column(tmp_path):
    ids, x = _good(tmp_path)
    return _write(tmp_path / "nocol.parquet", ids, x, column="vector"), (DataError, "nocol.parquet", "no embedding column 'embedding'")


def _bad_missing_id(tmp_path):
    ids, x = _good(tmp_path)
    return _write(tmp_path / "noid.parquet", ids, x, id_name="id"), (DataError, "noid.parquet", "no id column 'item_id'")


def _bad_non_numeric(tmp_path):
    ids, _ = _good(tmp_path)
    table = pa.table({"item_id": ids, "embedding": pa.array([["a"] * D] * len(ids))})
    pq.write_table(table, tmp_path / "text.parquet")
    return tmp_path / "text.parquet", (DataError, "text.parquet", "must be numeric")


def _bad_not_a_list(tmp_path):
    ids, _ = _good(tmp_path)
    pq.write_table(pa.table({"item_id": ids, "embedding": np.zeros(len(ids))}), tmp_path / "flat.parquet")
    return tmp_path / "flat.parquet", (DataError, "flat.parquet", "not a list of numbers")


def _bad_float_ids(tmp_path):
    ids, x = _good(tmp_path)
    return _write(tmp_path / "fids.parquet", ids + 0.5, x), (DataError, "fids.parquet", "float ids would be truncated")


def _bad_not_parquet(tmp_path):
    (tmp_path / "items.parquet").write_text("item_id,embedding\n1,0.5\n")
    return tmp_path / "items.parquet", (CorruptFileError, "items.parquet", "not a readable Parquet file")


def _bad_damaged_page(tmp_path):
    ids, x = _good(tmp_path, n=200)
    src = _write(tmp_path / "damaged.parquet", ids, x, row_group_size=50)
    offset = pq.ParquetFile(src).metadata.row_group(2).column(1).data_page_offset
    data = bytearray(src.read_bytes())
    data[offset:offset + 40] = b"\xff" * 40  # the page header of row group 2's embeddings (rows 100..149)
    src.write_bytes(bytes(data))
    return src, (CorruptFileError, "damaged.parquet: row 96:", "cannot read")


def _bad_missing_file(tmp_path):
    return tmp_path / "absent.parquet", (Gr2IOError, "absent.parquet", "not found")


BAD = [_bad_nan, _bad_inf, _bad_duplicate, _bad_duplicate_string, _bad_width_fixed, _bad_width_row, _bad_null_row,
       _bad_missing_column, _bad_missing_id, _bad_non_numeric, _bad_not_a_list, _bad_float_ids, _bad_not_parquet,
       _bad_missing_file, _bad_damaged_page]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__[5:] for f in BAD])
def test_bad_input_is_a_typed_error_and_leaves_the_output_alone(tmp_path, make):
    src, (error, *needles) = make(tmp_path)
    out = tmp_path / "out" / "codes.parquet"
    out.parent.mkdir()
    out.write_bytes(b"the previous output")
    with pytest.raises(error) as info:
        encode_parquet(_codebooks(), src, out, chunk_rows=16, progress=False)
    message = str(info.value)
    assert isinstance(info.value, Gr2Error) and src.name in message and "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert out.read_bytes() == b"the previous output"
    assert _leftovers(out.parent) == [] and sorted(p.name for p in out.parent.iterdir()) == ["codes.parquet"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(2, 90),
    bad=st.lists(st.tuples(st.sampled_from(["nan", "inf", "dup"]), st.integers(0, 10**6)), min_size=1, max_size=4),
    chunk_rows=st.integers(1, 40),
    row_group=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_bad_rows_name_the_first_one(tmp_path, n, bad, chunk_rows, row_group, seed):
    """NaN/inf/duplicate ids planted at random rows: the error names the first row the file
    cannot be encoded at (non-finite rows are found while streaming, duplicates after the pass)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    ids = rng.permutation(n).astype(np.int64)
    nonfinite, repeats = [], []
    for kind, where in bad:
        row = where % n
        if kind == "dup":
            row = max(row, 1)
            ids[row] = ids[rng.integers(0, row)]
        else:
            x[row, where % D] = np.nan if kind == "nan" else np.inf
            nonfinite.append(row)
    seen: set[int] = set()
    for row, item in enumerate(ids):
        if int(item) in seen:
            repeats.append(row)
        seen.add(int(item))
    src = _write(tmp_path / f"bad-{seed}.parquet", ids, x, row_group_size=row_group)
    out = tmp_path / f"out-{seed}.parquet"
    with pytest.raises(InvalidInputError) as info:
        encode_parquet(_codebooks(), src, out, chunk_rows=chunk_rows, progress=False)
    first = min(nonfinite) if nonfinite else min(repeats)
    assert f"{src.name}: row {first}:" in str(info.value)
    assert ("NaN" in str(info.value)) == bool(nonfinite) and not out.exists() and _leftovers(tmp_path) == []


def test_failure_with_no_previous_output_leaves_nothing(tmp_path):
    src, _ = _bad_duplicate(tmp_path)
    out = tmp_path / "new" / "codes.parquet"
    with pytest.raises(InvalidInputError):
        encode_parquet(_codebooks(), src, out, chunk_rows=8, progress=False)
    assert list(out.parent.iterdir()) == []


def test_bad_output_paths_and_arguments(tmp_path):
    ids, x = _good(tmp_path)
    src = _write(tmp_path / "items.parquet", ids, x)
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(InvalidInputError, match="is a directory"):
        encode_parquet(_codebooks(), src, tmp_path / "dir.parquet", progress=False)
    with pytest.raises(InvalidInputError, match="is the input file"):
        encode_parquet(_codebooks(), src, src, progress=False)
    with pytest.raises(Gr2IOError, match="is a directory"):
        encode_parquet(_codebooks(), tmp_path / "dir.parquet", tmp_path / "o.parquet", progress=False)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InvalidInputError, match="chunk_rows"):
            encode_parquet(_codebooks(), src, tmp_path / "o.parquet", chunk_rows=bad, progress=False)
    with pytest.raises(InvalidInputError, match="both 'item_id'"):
        encode_parquet(_codebooks(), src, tmp_path / "o.parquet", column="item_id", progress=False)
    with pytest.raises(InvalidInputError, match="beam"):
        encode_parquet(_codebooks(), src, tmp_path / "o.parquet", beam=0, progress=False)
    assert not (tmp_path / "o.parquet").exists() and src.read_bytes()[:4] == b"PAR1"


def test_a_killed_run_s_temporary_file_is_removed_by_the_next(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid no longer exists: the temporary file below is a killed writer's
    stale = tmp_path / f".codes.parquet.tmp-{dead.pid}-abc123"
    stale.write_bytes(b"half a file")
    ids, x = _good(tmp_path)
    src = _write(tmp_path / "items.parquet", ids, x)
    encode_parquet(_codebooks(), src, tmp_path / "codes.parquet", progress=False)
    assert not stale.exists() and _leftovers(tmp_path) == []


def test_unwritable_output_is_a_gr2_io_error(tmp_path, monkeypatch):
    ids, x = _good(tmp_path)
    src = _write(tmp_path / "items.parquet", ids, x)
    (tmp_path / "file").write_text("")
    with pytest.raises(Gr2IOError, match="cannot create"):
        encode_parquet(_codebooks(), src, tmp_path / "file" / "codes.parquet", progress=False)
    out = tmp_path / "out" / "codes.parquet"
    out.parent.mkdir()
    out.write_bytes(b"old")

    def disk_full(self, table, row_group_size=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full)
    with pytest.raises(Gr2IOError, match="codes.parquet: cannot write the output: .*No space left"):
        encode_parquet(_codebooks(), src, out, chunk_rows=16, progress=False)
    assert out.read_bytes() == b"old" and _leftovers(out.parent) == []


def test_success_replaces_an_existing_output_and_progress_can_be_off(tmp_path, capsys):
    ids, x = _good(tmp_path)
    src = _write(tmp_path / "items.parquet", ids, x)
    out = tmp_path / "codes.parquet"
    out.write_bytes(b"old")
    encode_parquet(_codebooks(), src, out, progress=False)
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(_read_codes(out), _codebooks().encode(x))
    encode_parquet(_codebooks(), src, out, progress=True)
    assert "rq encode" in capsys.readouterr().err


def test_empty_table(tmp_path):
    src = _write(tmp_path / "empty.parquet", np.zeros(0, np.int64), np.zeros((0, D), np.float32))
    out = encode_parquet(_codebooks(), src, tmp_path / "codes.parquet", progress=False)
    table = pq.read_table(out)
    assert table.num_rows == 0 and table.column_names == ["item_id", "code_0", "code_1", "code_2"]


# -- SIDs from an index -------------------------------------------------------------------------


def _index(n: int = 200) -> gr2.SidIndex:
    codes = np.random.default_rng(5).integers(0, 4, size=(n, 3), dtype=np.uint16)  # forces collisions
    return gr2.SidIndex.build(np.arange(n, dtype=np.uint64) * 10, codes, codebook_size=4)


def test_sids_equal_the_index(tmp_path):
    index = _index()
    ids = np.random.default_rng(6).permutation(200).astype(np.int64) * 10
    pq.write_table(pa.table({"item_id": ids}), tmp_path / "ids.parquet", row_group_size=64)
    out = sids_parquet(index, tmp_path / "ids.parquet", tmp_path / "sids.parquet", chunk_rows=50, progress=False)
    np.testing.assert_array_equal(_read_codes(out, "sid"), index.sids(ids.astype(np.uint64)))
    assert pq.read_table(out)["item_id"].to_pylist() == ids.tolist()


@pytest.mark.parametrize("ids, error, needles", [
    ([0, 10, 15, 20], UnknownItemError, ["row 2", "id 15 is not in the SID index"]),
    ([0, 10, -10], InvalidInputError, ["row 2", "negative"]),
    ([0, 10, 20, 10], InvalidInputError, ["row 3", "duplicate id 10", "first at row 1"]),
])
def test_sids_bad_ids(tmp_path, ids, error, needles):
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64())}), tmp_path / "ids.parquet")
    with pytest.raises(error) as info:
        sids_parquet(_index(), tmp_path / "ids.parquet", tmp_path / "sids.parquet", chunk_rows=2, progress=False)
    for needle in ("ids.parquet", *needles):
        assert needle in str(info.value)
    assert not (tmp_path / "sids.parquet").exists() and _leftovers(tmp_path) == []


# -- a run's RQ-VAE -----------------------------------------------------------------------------


def _tiny_run(run: Path, n: int = 30):
    """A run directory with what `gr2 encode --run-dir` reads: data/items (catalog ids "m<i>"),
    sid/codebooks.safetensors (an untrained tiny RQ-VAE) and sid/index.gr2sid keyed on item_idx."""
    import datasets
    import torch

    from gr2.sid.rqvae import RQVAE, RQVAEConfig
    from gr2.sid.assign import save_rqvae_file as _save_codebooks

    config = RQVAEConfig(levels=2, codebook_size=8, latent_dim=4, hidden_dims=[16], random_last_level=False)
    torch.manual_seed(0)
    model = RQVAE(12, config).eval()
    _save_codebooks(run / "sid" / "codebooks.safetensors", model, config, 0)
    datasets.Dataset.from_dict({"item_idx": list(range(n)), "item_id": [f"m{i}" for i in range(n)]}).save_to_disk(
        str(run / "data" / "items"))
    codes = np.random.default_rng(8).integers(0, 8, size=(n, 2), dtype=np.uint16)
    index = gr2.SidIndex.build(np.arange(n, dtype=np.uint64), codes, codebook_size=8)
    index.save(str(run / "sid" / "index.gr2sid"))
    return model, index


def test_run_dir_codes_and_catalog_sids(tmp_path, capsys):
    from gr2.sid.rqvae import codebooks_array, encode_latent

    run = tmp_path / "run"
    model, index = _tiny_run(run)
    x = np.random.default_rng(7).standard_normal((30, 12)).astype(np.float32)
    order = np.random.default_rng(9).permutation(30)
    src = _write(tmp_path / "items.parquet", [f"m{i}" for i in order], x, row_group_size=11)
    expected = gr2.RQCodebooks(codebooks_array(model)).encode(encode_latent(model, x))
    transform = RQVAETransform.from_run_dir(run)
    out = encode_parquet(transform.codebooks, src, tmp_path / "codes.parquet", chunk_rows=8, progress=False,
                         transform=transform)
    np.testing.assert_array_equal(_read_codes(out), expected)
    rc, _, _ = _cli(["--input", src, "--output", tmp_path / "cli.parquet", "--run-dir", run, "--no-progress"], capsys)
    assert rc == 0 and pq.read_table(tmp_path / "cli.parquet").equals(pq.read_table(out))
    # SIDs of the catalog's own ids: "m<i>" -> item_idx i -> the run's index
    rc, _, _ = _cli(["--input", src, "--output", tmp_path / "sids.parquet", "--run-dir", run, "--index",
                     "--chunk-rows", 7, "--no-progress"], capsys)
    assert rc == 0
    np.testing.assert_array_equal(_read_codes(tmp_path / "sids.parquet", "sid"), index.sids(order.astype(np.uint64)))
    pq.write_table(pa.table({"item_id": ["m1", "m2", "zz"]}), tmp_path / "unknown.parquet")
    rc, _, err = _cli(["--input", tmp_path / "unknown.parquet", "--output", tmp_path / "u.parquet", "--run-dir", run,
                       "--index", "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "unknown.parquet: row 2: id 'zz' is not in the catalog" in err
    wide = _write(tmp_path / "wide.parquet", np.arange(5), np.zeros((5, 8), np.float32))
    rc, _, err = _cli(["--input", wide, "--output", tmp_path / "w.parquet", "--run-dir", run, "--no-progress"], capsys)
    assert rc == 2 and "expected 12" in err and not (tmp_path / "w.parquet").exists()


# -- the CLI ---------------------------------------------------------------------------------------


def _cli(args, capsys) -> tuple[int, str, str]:
    rc = cli.main(["encode", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_codes_and_sids(tmp_path, capsys):
    cb = _codebooks()
    np.save(tmp_path / "codebooks.npy", cb.codebooks)
    ids, x = _good(tmp_path)
    src = _write(tmp_path / "items.parquet", ids * 10, x)
    rc, out, _ = _cli(["--input", src, "--output", tmp_path / "codes.parquet", "--codebooks", tmp_path / "codebooks.npy",
                       "--chunk-rows", 7, "--no-progress"], capsys)
    assert rc == 0 and '"rows": 50' in out
    np.testing.assert_array_equal(_read_codes(tmp_path / "codes.parquet"), cb.encode(x))
    _index().save(str(tmp_path / "index.gr2sid"))
    rc, out, _ = _cli(["--input", src, "--output", tmp_path / "sids.parquet", "--index", tmp_path / "index.gr2sid",
                       "--no-progress"], capsys)
    assert rc == 0
    np.testing.assert_array_equal(_read_codes(tmp_path / "sids.parquet", "sid"), _index().sids(ids.astype(np.uint64) * 10))


@pytest.mark.parametrize("case", ["missing column", "no codebooks", "index without file", "codebooks missing",
                                  "nan", "output is a directory"])
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, case):
    np.save(tmp_path / "codebooks.npy", _codebooks().codebooks)
    ids, x = _good(tmp_path)
    if case == "nan":
        x[9, 1] = np.nan
    src = _write(tmp_path / "items.parquet", ids, x)
    (tmp_path / "outdir").mkdir()
    base = ["--input", src, "--no-progress"]
    output = tmp_path / ("outdir" if case == "output is a directory" else "codes.parquet")
    args = {
        "missing column": [*base, "--output", output, "--codebooks", tmp_path / "codebooks.npy", "--column", "vec"],
        "no codebooks": [*base, "--output", output],
        "index without file": [*base, "--output", output, "--index"],
        "codebooks missing": [*base, "--output", output, "--codebooks", tmp_path / "nope.npy"],
        "nan": [*base, "--output", output, "--codebooks", tmp_path / "codebooks.npy"],
        "output is a directory": [*base, "--output", output, "--codebooks", tmp_path / "codebooks.npy"],
    }[case]
    rc, out, err = _cli(args, capsys)
    assert rc == 2 and out == ""
    assert err.startswith("gr2 encode: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "codes.parquet").exists() and _leftovers(tmp_path) == []
    if case == "nan":
        assert "items.parquet" in err and "row 9" in err
