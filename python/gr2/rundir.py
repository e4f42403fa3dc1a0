"""Run-directory plumbing shared by every stage: atomic writes, input/config hashing, caching.

Stages talk only through files in a run directory (``runs/NAME/<stage>/``). Each stage writes its
outputs under a temporary name and renames them into place, then records ``stage.json`` with the
hash of its inputs and config; a stage whose ``stage.json`` matches the current key is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

STAGE_FILE = "stage.json"


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
            os.replace(tmp, path)
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


def read_stage(stage_dir: str | os.PathLike) -> dict | None:
    """The ``stage.json`` record of a finished stage, or None when it has not finished."""
    path = Path(stage_dir) / STAGE_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def is_current(stage_dir: str | os.PathLike, key: str) -> bool:
    record = read_stage(stage_dir)
    return record is not None and record.get("key") == key


def mark_done(stage_dir: str | os.PathLike, key: str, summary: dict[str, Any]) -> None:
    """Record that the stage finished with ``key``; written last, so a killed stage reruns."""
    atomic_write_json(Path(stage_dir) / STAGE_FILE, {"key": key, "summary": summary})


def load_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
