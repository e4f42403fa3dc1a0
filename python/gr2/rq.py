"""Residual-quantization encoding of catalogs larger than RAM.

:class:`gr2.RQCodebooks` (native, ``rust/src/rq``) encodes arrays in memory. :func:`encode_npy`
streams a float32 ``.npy`` file through it chunk by chunk: the input is memory-mapped (pages are
read on demand and can be evicted), the uint16 codes go into a memory-mapped ``.npy`` written
under a temporary name and renamed into place, so a reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from gr2._gr2 import RQCodebooks
from gr2.errors import CorruptFileError, Gr2IOError, InvalidInputError

DEFAULT_CHUNK_SIZE = 65_536


def _as_codebooks(codebooks: RQCodebooks | np.ndarray) -> RQCodebooks:
    if isinstance(codebooks, RQCodebooks):
        return codebooks
    return RQCodebooks(codebooks)


def _open_input(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as e:
        raise Gr2IOError(f"input file not found: {path}") from e
    except OSError as e:
        raise Gr2IOError(f"cannot read {path}: {e}") from e
    except ValueError as e:  # bad magic, truncated header, object arrays
        raise CorruptFileError(f"{path} is not a readable .npy file: {e}") from e
    if not isinstance(array, np.ndarray):
        raise CorruptFileError(f"{path} holds an archive, not a single .npy array")
    return array


def encode_npy(
    codebooks: RQCodebooks | np.ndarray,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    beam: int = 1,
    progress: bool = True,
) -> Path:
    """Encodes the float32 (n, D) array in ``input_path`` into uint16 (n, L) codes at ``output_path``.

    Both files are memory-mapped and processed ``chunk_size`` rows at a time, so the catalog may
    be larger than RAM. The result equals ``codebooks.encode(np.load(input_path), beam)``.
    The output is written to a temporary file next to ``output_path`` and renamed into place
    only when complete. Returns the output path.

    Raises InvalidInputError (wrong dtype/shape, NaN/inf, bad chunk_size/beam), Gr2IOError
    (missing or unreadable input) and CorruptFileError (not a .npy file).
    """
    cb = _as_codebooks(codebooks)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    input_path, output_path = Path(input_path), Path(output_path)
    x = _open_input(input_path)
    if x.dtype != np.float32:
        raise InvalidInputError(
            f"{input_path} holds {x.dtype}, not float32; convert it once with "
            f"np.save(path, np.load(path, mmap_mode='r').astype(np.float32))"
        )
    if x.ndim != 2 or x.shape[1] != cb.dim:
        raise InvalidInputError(f"{input_path} has shape {x.shape}; expected (n, {cb.dim}) to match the codebooks")
    n = x.shape[0]

    output_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output_path.name}.", suffix=".tmp", dir=output_path.parent)
    os.close(fd)
    try:
        codes = open_memmap(tmp_name, mode="w+", dtype=np.uint16, shape=(n, cb.levels))
        with tqdm(total=n, unit="item", desc="rq encode", disable=not progress) as bar:
            for start in range(0, n, int(chunk_size)):
                stop = min(start + int(chunk_size), n)
                try:
                    codes[start:stop] = cb.encode(x[start:stop], beam=beam)
                except InvalidInputError as e:
                    # Row numbers in the message are relative to the chunk; say where it starts.
                    raise InvalidInputError(f"{input_path}, rows {start}..{stop - 1}: {e}") from e
                bar.update(stop - start)
        codes.flush()
        del codes
        with open(tmp_name, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, output_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return output_path


__all__ = ["RQCodebooks", "encode_npy", "DEFAULT_CHUNK_SIZE"]
