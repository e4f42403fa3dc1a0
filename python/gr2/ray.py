"""RQ codes for a Ray Data dataset: :class:`RQEncoder`, a stateful ``map_batches`` callable, and
:func:`encode_dataset`. Optional: needs Ray Data (``pip install 'gr2[ray]'``); importing this
module without it raises a clear ImportError.

Tested against Ray 2.60.0 (``make test-ray``: its own environment, ``.venv-ray``, at the versions
of ``scripts/constraints-ray.txt``; pyproject's ``ray`` extra allows ``>=2.60,<2.61``)::

    import ray, gr2.ray
    ds = ray.data.read_parquet("s3://bucket/items/")            # item_id, embedding
    codes = gr2.ray.encode_dataset(ds, "/shared/codebooks.npy", actors=8, cpus_per_actor=4)
    codes.write_parquet("s3://bucket/codes/")                    # item_id, code_0 .. code_{L-1}

Each actor loads the codebooks once (a ``.npy``, a ``codebooks.safetensors`` or a run directory:
:func:`gr2.rq_arrow.load_codebooks`; the path must be readable on every node) and encodes each
batch with :class:`gr2.rq_arrow.ArrowRQEncoder` -- :func:`gr2.encode_parquet`'s validation and
encoder, so the codes equal its output bit for bit -- on as many Rust threads as the actor has CPUs.
A bad row fails the job; :func:`gr2_error` finds the gr2 error in what the driver catches.
"""

from __future__ import annotations

import os
import re

try:
    import ray
    import ray.data
except ImportError as exc:  # ray is an optional extra
    raise ImportError(
        "gr2.ray needs Ray Data (ray[data]>=2.60,<2.61): pip install 'gr2[ray]'. "
        "Without Ray use gr2.encode_parquet (one machine) or gr2.rq_arrow (any Arrow batches)."
    ) from exc

from gr2 import _checks as checks
from gr2 import errors
from gr2.errors import Gr2Error, InvalidInputError
from gr2.rq_arrow import ArrowRQEncoder


def actor_cpus() -> int:
    """The CPUs Ray gave this worker (the actor's ``num_cpus``), else this machine's count (outside
    Ray). At least 1: an actor given a fraction of a CPU still needs one thread."""
    if ray.is_initialized():
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            return max(1, int(cpus))
    return os.cpu_count() or 1


class RQEncoder(ArrowRQEncoder):
    """The ``map_batches`` callable: an :class:`~gr2.rq_arrow.ArrowRQEncoder` whose encoder
    threads are the actor's CPUs (unless ``RAYON_NUM_THREADS`` is set)::

        ds.map_batches(RQEncoder, fn_constructor_kwargs={"codebooks": path}, batch_format="pyarrow",
                       compute=ray.data.ActorPoolStrategy(size=n), num_cpus=c)

    ``batch_format="numpy"`` works too (dicts in, dicts out). :func:`encode_dataset` does this."""

    def __init__(self, codebooks: str | os.PathLike, *, column: str = "embedding", id_column: str = "item_id",
                 beam: int = 1):
        super().__init__(codebooks, column=column, id_column=id_column, beam=beam, threads=actor_cpus())


def encode_dataset(
    ds: "ray.data.Dataset",
    codebooks: str | os.PathLike,
    *,
    column: str = "embedding",
    id_column: str = "item_id",
    actors: int = 2,
    cpus_per_actor: float = 1,
    batch_size: int = 65_536,
    beam: int = 1,
) -> "ray.data.Dataset":
    """``ds`` as ids and RQ codes (lazy, like every Ray Data transform: it runs when consumed, e.g.
    by ``write_parquet`` or ``take_all``). ``actors`` actors of ``cpus_per_actor`` CPUs each (Ray's
    ``num_cpus``: a fraction is allowed) load ``codebooks`` once and encode batches of at most
    ``batch_size`` rows on ``max(1, int(cpus_per_actor))`` threads. The counts are checked here, on
    the driver; a bad row fails the job (:func:`gr2_error`).

    Leave CPUs for the read tasks: with ``actors * cpus_per_actor`` equal to the cluster's CPUs, Ray
    Data 2.60 starts the actors first and its file-listing task then waits for a CPU forever
    (measured on ``ray.init(num_cpus=2)`` with 2 actors of 1 CPU)."""
    actors = checks.whole("actors", actors, 1, 1 << 20)
    cpus = checks.finite("cpus_per_actor", cpus_per_actor)
    if not 0 < cpus <= 1 << 16:
        raise InvalidInputError(f"cpus_per_actor must be in (0, 65536], got {cpus_per_actor!r:.60}")
    threads = max(1, int(cpus))  # a fraction of a CPU still runs one thread
    batch_size = checks.whole("batch_size", batch_size, 1, 2**31 - 1)
    return ds.map_batches(
        RQEncoder,
        fn_constructor_kwargs={"codebooks": os.fspath(codebooks), "column": column, "id_column": id_column,
                               "beam": beam},
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        # applied before the worker process starts: the encoder's pool is sized even if something
        # in that process encoded before RQEncoder.__init__ could set it
        runtime_env={"env_vars": {"RAYON_NUM_THREADS": str(threads)}},
        udf_modifying_row_count=False,  # one output row per input row
    )


def gr2_error(exc: BaseException) -> Gr2Error | None:
    """The :class:`gr2.Gr2Error` an actor raised, from the exception the driver caught, or None.

    Ray Data 2.60 raises ``RayTaskError(UserCodeException)`` ("UDF failed to process a data
    block") on the driver; the actor's exception object does not travel, only its traceback text,
    which ends with the gr2 error's class and message. This rebuilds that error (same class, same
    message: batch row, reason and id)::

        try:
            gr2.ray.encode_dataset(ds, path).write_parquet(out)
        except Exception as e:
            if (err := gr2.ray.gr2_error(e)) is None:
                raise
            print(err)  # gr2 batch: row 234: 'embedding'[2] is nan (...) [item_id=1234]
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Gr2Error) and not isinstance(exc, ray.exceptions.RayError):
            return exc
        if (found := _from_traceback(str(exc))) is not None:
            return found
        exc = exc.__cause__ or exc.__context__
    return None


# the last line of a gr2 error's traceback, as Ray prints it: "gr2.errors.InvalidInputError: ..."
_GR2_LINE = re.compile(r"^gr2\.errors\.(\w+): (.*)$", re.MULTILINE)


def _from_traceback(text: str) -> Gr2Error | None:
    matches = _GR2_LINE.findall(text)
    if not matches:
        return None
    name, message = matches[-1]  # the outermost gr2 error: the one that names the id
    cls = getattr(errors, name, None)
    return cls(message) if isinstance(cls, type) and issubclass(cls, Gr2Error) else None


__all__ = ["RQEncoder", "encode_dataset", "gr2_error", "actor_cpus"]
