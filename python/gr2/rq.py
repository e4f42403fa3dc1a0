"""Residual-quantization encoding of catalogs larger than RAM.

:class:`gr2.RQCodebooks` (native, ``rust/src/rq``) encodes arrays in memory. :func:`encode_npy`
streams a float32 ``.npy`` file through it chunk by chunk: the input is memory-mapped (pages are
read on demand and can be evicted), the uint16 codes go into a memory-mapped ``.npy`` written
under a temporary name (``.{name}.tmp-{pid}-{random}``, locked while written) and renamed into
place, so a reader never sees a half-written file. Temporary files of killed runs writing the
same output are removed by the next run (writer pid gone and lock free).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, no clean-up of stale temporary files
    fcntl = None  # type: ignore[assignment]

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


def _temp_prefix(output_path: Path) -> str:
    return f".{output_path.name}.tmp-"


def _pid_may_be_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, OSError):
        return True
    return True


def _remove_stale_temp_files(output_path: Path) -> None:
    """Removes temporary files of killed runs writing ``output_path`` (see the module docs)."""
    if fcntl is None:
        return
    prefix = _temp_prefix(output_path)
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[A-Za-z0-9_]+")
    try:
        entries = list(os.scandir(output_path.parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_may_be_alive(pid):
            continue
        with contextlib.suppress(OSError):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a writer (perhaps in another PID namespace) still holds it
            finally:
                os.close(fd)
            os.unlink(entry.path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


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

    Raises InvalidInputError (wrong dtype/shape, NaN/inf with the file row and column, bad
    chunk_size/beam, ``output_path`` naming the input file itself, also through a link),
    Gr2IOError (missing or unreadable input) and CorruptFileError (not a .npy file).
    """
    cb = _as_codebooks(codebooks)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not isinstance(progress, (bool, np.bool_)):
        raise InvalidInputError(f"progress must be True or False, got {type(progress).__name__}")
    try:
        input_path, output_path = Path(input_path), Path(output_path)
    except TypeError as e:
        raise InvalidInputError(f"input_path and output_path must be str or os.PathLike: {e}") from e
    if input_path.absolute() == output_path.absolute() or _same_file(input_path, output_path):
        raise InvalidInputError(
            f"output_path {output_path} is the input file {input_path}: encoding in place would replace "
            "the embeddings with codes; write the codes to another file"
        )
    if output_path.is_dir():
        raise InvalidInputError(f"output_path {output_path} is a directory; name the .npy file to write the codes to")
    x = _open_input(input_path)
    if x.dtype != np.float32:
        raise InvalidInputError(
            f"{input_path} holds {x.dtype}, not float32; convert it once with "
            f"np.save(path, np.load(path, mmap_mode='r').astype(np.float32))"
        )
    if x.ndim != 2 or x.shape[1] != cb.dim:
        raise InvalidInputError(f"{input_path} has shape {x.shape}; expected (n, {cb.dim}) to match the codebooks")
    n = x.shape[0]
    cb.encode(np.zeros((0, cb.dim), np.float32), beam=beam)  # checks beam even when n == 0

    output_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(output_path)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_temp_prefix(output_path)}{os.getpid()}-", dir=output_path.parent)
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until fd is closed
    try:
        codes = open_memmap(tmp_name, mode="w+", dtype=np.uint16, shape=(n, cb.levels))
        with tqdm(total=n, unit="item", desc="rq encode", disable=not progress) as bar:
            for start in range(0, n, int(chunk_size)):
                stop = min(start + int(chunk_size), n)
                try:
                    codes[start:stop] = cb.encode(x[start:stop], beam=beam, row_offset=start)
                except InvalidInputError as e:
                    raise InvalidInputError(f"{input_path}: {e}") from e
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
    finally:
        os.close(fd)
    return output_path


__all__ = ["RQCodebooks", "encode_npy", "DEFAULT_CHUNK_SIZE"]
