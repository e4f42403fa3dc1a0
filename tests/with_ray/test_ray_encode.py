"""gr2.ray on a local Ray cluster (``make test-ray``, in ``.venv-ray``): ray.data.read_parquet(...)
.map_batches(...) with 2 actors equals the in-process gr2.encode_parquet on the same file bit for
bit at several batch sizes; each actor loads the codebooks once and sizes its encoder threads to
its CPUs; a bad row fails the job with the gr2 error recoverable on the driver. Without Ray this
module skips at import, so the default ``make test`` collects nothing from this folder.

The folder is ``with_ray``, not ``ray``: tests/ is on sys.path, and a ``ray`` folder there would
shadow the package."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import gr2  # noqa: E402
import gr2.ray  # noqa: E402
from gr2.errors import InvalidInputError  # noqa: E402

pytestmark = pytest.mark.ray

L, K, D, N = 3, 32, 8, 6000


@pytest.fixture(scope="module")
def cluster():
    # The actors must size their threads from their own CPUs, not inherit a value from this process.
    saved = os.environ.pop("RAYON_NUM_THREADS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # the counting encoder below is defined here, a module Ray's workers cannot import: ship it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()
    if saved is not None:
        os.environ["RAYON_NUM_THREADS"] = saved


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(folder, codebooks .npy, items.parquet with shuffled ids in 4 row groups, encode_parquet's table)."""
    folder = tmp_path_factory.mktemp("ray")
    rng = np.random.default_rng(11)
    np.save(folder / "cb.npy", rng.standard_normal((L, K, D)).astype(np.float32))
    x = rng.standard_normal((N, D)).astype(np.float32)
    ids = rng.permutation(N).astype(np.int64) * 5 + 1
    table = pa.table({"item_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D)})
    pq.write_table(table, folder / "items.parquet", row_group_size=1500)
    cb = gr2.RQCodebooks(np.load(folder / "cb.npy"))
    expected = pq.read_table(gr2.encode_parquet(cb, folder / "items.parquet", folder / "codes.parquet",
                                                progress=False))
    assert len(np.unique(np.stack([expected[f"code_{i}"].to_numpy() for i in range(L)], 1), axis=0)) > 100
    return folder, folder / "cb.npy", folder / "items.parquet", expected


def _read(path: Path) -> "ray.data.Dataset":
    # 4 blocks: one 6000-row file is otherwise one block, which only one of the 2 actors would see
    return ray.data.read_parquet(str(path), override_num_blocks=4)


# Two actors of half a CPU: on this 2-CPU cluster two 1-CPU actors leave none for Ray Data's
# file-listing task, which then waits forever (Ray 2.60, measured); the encode_dataset docstring says so.
ACTOR_CPUS = 0.5


def _collect(ds: "ray.data.Dataset") -> pa.Table:
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    return table.sort_by("item_id")


@pytest.mark.parametrize("batch_size", [1000, 4096])
def test_encode_dataset_equals_encode_parquet(cluster, world, batch_size):
    _, codebooks, items, expected = world
    got = _collect(gr2.ray.encode_dataset(_read(items), codebooks, actors=2, cpus_per_actor=ACTOR_CPUS,
                                                    batch_size=batch_size))
    assert got.schema == expected.schema  # int64 ids, uint16 codes
    assert got.equals(expected.sort_by("item_id"))


class CountingEncoder(gr2.ray.RQEncoder):
    """RQEncoder that appends one line per codebook load and per batch to files in ``log``:
    ``load <pid> <threads> <RAYON_NUM_THREADS>`` / ``call <pid> <rows>``."""

    def __init__(self, codebooks, *, log: str, **kwargs):
        self.log = Path(log)
        super().__init__(codebooks, **kwargs)

    def load(self, path):
        with open(self.log / f"load-{os.getpid()}", "a") as f:
            f.write(f"{os.getpid()} {self.threads} {os.environ.get('RAYON_NUM_THREADS')}\n")
        return super().load(path)

    def __call__(self, batch):
        with open(self.log / f"call-{os.getpid()}", "a") as f:
            f.write(f"{len(batch['item_id'])}\n")
        return super().__call__(batch)


def test_map_batches_numpy_loads_once_per_actor(cluster, world, tmp_path):
    """The plain recipe: read_parquet(...).map_batches(RQEncoder subclass, numpy batches, 2 actors)."""
    _, codebooks, items, expected = world
    ds = _read(items).map_batches(
        CountingEncoder, fn_constructor_kwargs={"codebooks": str(codebooks), "log": str(tmp_path)},
        batch_format="numpy", batch_size=333, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=ACTOR_CPUS)
    got = _collect(ds)
    # numpy batches come back as Arrow columns without the not-null flag; types and values are equal
    assert got.schema.types == expected.schema.types
    assert got.cast(expected.schema).equals(expected.sort_by("item_id"))
    loads = sorted(p.read_text() for p in tmp_path.glob("load-*"))
    # two actors, one load each; each sized its Rust pool from the CPU share it was given (1 thread)
    assert len(loads) == 2 and all(line.split()[1:] == ["1", "1"] for text in loads for line in text.splitlines())
    calls = {p.name: [int(r) for r in p.read_text().split()] for p in tmp_path.glob("call-*")}
    # every batch ran in an actor that loaded once (how Ray spreads the batches over the two is its business)
    assert {name.replace("call", "load") for name in calls} <= {p.name for p in tmp_path.glob("load-*")}
    rows = [r for per_actor in calls.values() for r in per_actor]
    assert sum(rows) == N and len(rows) >= N // 333 and max(rows) <= 333


def test_bad_row_is_a_gr2_error_on_the_driver(cluster, world):
    folder, codebooks, items, _ = world
    table = pq.read_table(items)
    x = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).copy()
    x[4321, 5] = np.inf
    bad = table.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D))
    pq.write_table(bad, folder / "bad.parquet", row_group_size=1500)
    bad_id = table["item_id"][4321].as_py()
    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        _collect(gr2.ray.encode_dataset(_read(folder / "bad.parquet"), codebooks, actors=2,
                                         cpus_per_actor=ACTOR_CPUS, batch_size=1000))
    # what Ray 2.60 raises: RayTaskError(UserCodeException), the gr2 error only as traceback text
    assert isinstance(caught.value, ray.exceptions.UserCodeException)
    err = gr2.ray.gr2_error(caught.value)
    assert isinstance(err, InvalidInputError)
    # the row in its batch (where Ray cut the batches is Ray's business) and the id, which finds the item
    assert re.fullmatch(rf"gr2 batch: row \d+: 'embedding'\[5\] is inf \(NaN and inf cannot be encoded\) "
                        rf"\[item_id={bad_id}\]", str(err)), str(err)


def test_gr2_error_from_an_actor_that_failed_to_start():
    """A codebooks path an actor cannot read fails its constructor; Ray 2.60 then raises
    ActorDiedError on the driver with the traceback as text (seen with a missing file; the text
    below is that message's shape). Built here, not run: a real run costs ~25 s of actor retries."""
    text = ("The actor died because of an error raised in its creation task, ray::MapWorker(MapBatches(RQEncoder))"
            ".__init__() (pid=2478)\n  File \"gr2/encode_command.py\", line 69\n"
            "    raise Gr2IOError(f\"codebooks file not found: {path}\")\n"
            "gr2.errors.Gr2IOError: codebooks file not found: /nonexistent/cb.npy")
    err = gr2.ray.gr2_error(RuntimeError(text))
    assert type(err) is gr2.Gr2IOError and str(err) == "codebooks file not found: /nonexistent/cb.npy"


def test_gr2_error_passes_other_errors_through():
    assert gr2.ray.gr2_error(ValueError("no gr2 here")) is None
    plain = InvalidInputError("on the driver")
    assert gr2.ray.gr2_error(RuntimeError("wrapped")) is None
    try:
        raise RuntimeError("outer") from plain
    except RuntimeError as e:
        assert gr2.ray.gr2_error(e) is plain


def test_encode_dataset_checks_arguments_on_the_driver(cluster, world):
    _, codebooks, _, _ = world
    ds = ray.data.from_items([{"item_id": 1}])  # lazy: nothing runs, no cluster needed
    for kwargs, name in [({"actors": 0}, "actors"), ({"cpus_per_actor": 0}, "cpus_per_actor"),
                         ({"cpus_per_actor": "2"}, "cpus_per_actor"), ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(InvalidInputError, match=name):
            gr2.ray.encode_dataset(ds, codebooks, **kwargs)
