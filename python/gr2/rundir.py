"""Run-directory plumbing shared by every stage: atomic writes, input/config hashing, caching.

Stages talk only through files in a run directory (``runs/NAME/<stage>/``). Each stage writes its
outputs under a temporary name and renames them into place, then records ``stage.json`` with the
hash of its inputs and config and the hash of every output. :func:`begin_stage` skips a stage whose
record matches the current key and whose outputs are intact; otherwise it deletes the record before
the stage writes anything, so a stage that fails half-way is rerun, never trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from gr2.errors import ConfigError, DataError

STAGE_FILE = "stage.json"
log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_png(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write a matplotlib figure to ``path`` as PNG, atomically, and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    fig.clf()


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, to_json(obj))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    For outputs that are folders (HF datasets, model folders). On an exception the temporary
    folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the previous folder back: a failed write loses nothing
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hash_json(obj: Any) -> str:
    """A stable short hash of a JSON-able value (dataclasses included)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def stage_key(config: Any, *inputs: str) -> str:
    """The cache key of a stage: its config plus the keys of the stages it reads."""
    return hash_json({"config": config, "inputs": list(inputs)})


def _output_files(stage_dir: Path, outputs: Iterable[str] | None, exclude: Iterable[str] = ()) -> list[Path]:
    """The files a stage record vouches for: ``outputs`` (names relative to the stage folder,
    folders expanded), or by default every file in it except records, hidden temporaries,
    ``checkpoints/``, nested stages (sub-folders with their own ``stage.json``) and names matching
    an ``exclude`` glob (files other commands write into the folder, e.g. rerank's rankings)."""
    roots = [stage_dir / name for name in outputs] if outputs is not None else [stage_dir]
    files: list[Path] = []
    for root in roots:
        if root.is_file():
            files.append(root)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"stage output {root} was not written")
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(
                d for d in dirnames
                if not d.startswith(".") and not (here / d / STAGE_FILE).exists()
                and not (outputs is None and here == stage_dir and d == "checkpoints")
            )
            files.extend(here / f for f in sorted(filenames)
                         if not f.startswith(".") and not (outputs is None and here == stage_dir and f == STAGE_FILE))
    patterns = list(exclude)
    return [f for f in files if not any(fnmatch.fnmatch(f.relative_to(stage_dir).as_posix(), g) for g in patterns)]


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hash_file(path)}


def _outputs_intact(stage_dir: Path, manifest: dict[str, dict[str, Any]]) -> bool:
    """Every recorded output exists with its recorded content. Size and mtime are compared first;
    the content hash is recomputed only when the mtime moved (a file rewritten in place, a copy)."""
    for name, want in manifest.items():
        path = stage_dir / name
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_size != want["size"]:
            return False
        if st.st_mtime_ns != want["mtime_ns"] and hash_file(path) != want["sha256"]:
            return False
    return True


def check_run_dir(path: str | os.PathLike) -> Path:
    """A run directory that exists as a directory or can be made: a file in its place (or on its
    path) is a ConfigError naming it, not a raw FileExistsError from deep inside a stage."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--run-dir {path}: {parent} is a file, not a directory; pick another run directory")
    return path


def _check_record_path(path: Path) -> None:
    if path.is_dir():  # not a record, and not ours to delete: say what is in the way
        raise DataError(f"{path} is a directory where the stage keeps its record file; move or remove it and rerun")


def read_stage(stage_dir: str | os.PathLike, record: str = STAGE_FILE) -> dict | None:
    """The record of a finished stage, or None when it has not finished: no record, an unreadable
    or keyless one, or outputs that no longer match the hashes the record holds."""
    stage_dir = Path(stage_dir)
    _check_record_path(stage_dir / record)
    try:
        data = json.loads((stage_dir / record).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if not isinstance(e, FileNotFoundError):
            log.warning("ignoring unreadable stage record %s (%s): the stage counts as not done", stage_dir / record, e)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("key"), str):
        log.warning("ignoring stage record %s without a key: the stage counts as not done", stage_dir / record)
        return None
    manifest = data.get("outputs", {})
    if not isinstance(manifest, dict) or not _outputs_intact(stage_dir, manifest):
        log.warning("outputs of %s differ from its record %s: the stage counts as not done", stage_dir, record)
        return None
    return data


def is_current(stage_dir: str | os.PathLike, key: str, record: str = STAGE_FILE) -> bool:
    found = read_stage(stage_dir, record)
    return found is not None and found.get("key") == key


def begin_stage(stage_dir: str | os.PathLike, key: str, *, force: bool = False,
                record: str = STAGE_FILE) -> dict | None:
    """Start a stage: the summary of a finished run with this ``key`` whose outputs are intact (the
    caller returns it and does nothing), else None -- and the old record is deleted *before* the
    caller touches any output, so a stage that dies half-way through rewriting is never trusted."""
    stage_dir = Path(stage_dir)
    found = None if force else read_stage(stage_dir, record)
    if found is not None and found["key"] == key:
        return found.get("summary", {})
    _check_record_path(stage_dir / record)  # also under force, which skips read_stage
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stage_dir / record)
    return None


def mark_done(stage_dir: str | os.PathLike, key: str, summary: dict[str, Any], *,
              outputs: Iterable[str] | None = None, exclude: Iterable[str] = (), record: str = STAGE_FILE) -> None:
    """Record that the stage finished with ``key``, with the size and hash of each output (see
    :func:`_output_files`); written last, so a killed stage reruns."""
    stage_dir = Path(stage_dir)
    manifest = {p.relative_to(stage_dir).as_posix(): _fingerprint(p) for p in _output_files(stage_dir, outputs, exclude)}
    atomic_write_json(stage_dir / record, {"key": key, "summary": summary, "outputs": manifest})


def load_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
