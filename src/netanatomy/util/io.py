"""Atomic writes: a result file is either complete or absent, never half-written."""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual permissions
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only set it, and setting it
    to read it races with every other thread creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def check_writable(path: str | os.PathLike, *, folder: bool = False, what: str = "--out") -> Path:
    """Refuse, before any work, an output path that cannot be written, creating nothing.

    `path` is a file (written atomically: a temporary file beside it, then a rename) or, with
    `folder=True`, a folder to write files into. Its nearest existing ancestor must be a folder
    in which a file can be made; that is tried (a probe file, removed at once), because
    permission bits say nothing to root and nothing about read-only mounts or /proc.
    """
    from ..errors import UsageError

    p = Path(path).expanduser()
    if folder and p.exists() and not p.is_dir():
        raise UsageError(f"cannot write {what} {p}: it is a file, not a folder")
    if not folder and p.is_dir():
        raise UsageError(f"cannot write {what} {p}: it is a folder, not a file")
    if not folder and not p.name:
        raise UsageError(f"cannot write {what} {str(path)!r}: it names no file")
    start = p if folder else p.parent
    ancestor = start.absolute()
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"cannot write {what} {p}: {ancestor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".netanatomy-write-check-", dir=ancestor)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"cannot write {what} {p}: {ancestor} is not a writable folder ({reason})") from None
    os.close(fd)
    os.unlink(probe)
    return p


def to_jsonable(obj: Any) -> Any:
    """Turn numpy/torch scalars and arrays, tuples and paths into plain JSON values.

    Non-finite floats become None so that the output is strict JSON.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch tensor
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as strict JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(dumps(obj))
        handle.write("\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (the caller then redoes the work)."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically; the format comes from the file's suffix."""
    path = Path(path)
    fmt = kwargs.pop("format", path.suffix.lstrip(".") or "png")
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format=fmt, **kwargs)
    return path


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Save an HxW or HxWx3 array in [0, 1] (float) or uint8 as a PNG, atomically."""
    from PIL import Image

    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        Image.fromarray(arr).save(handle, format="PNG")
    return path


def file_stem(name: str) -> str:
    """A file name for a layer or objective name (the names users type may hold dots, @ and /)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "layer"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), cached while its size and modification time stay the same."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
