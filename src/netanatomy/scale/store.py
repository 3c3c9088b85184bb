"""Task results on disk: one file per finished task, so a re-run redoes only the missing ones.

A store is a folder with `config.json` (what the run computes: model, data, seeds, sizes) and
one `KEY.npz` per finished task, written atomically by the process that collects the results.
A store whose config differs from the run's is stale: its task files are removed before any
is read, so a changed argument can never mix old and new results.

A task's result is a dict of NumPy arrays and plain JSON values; arrays go in as arrays, the
rest as one JSON string. Nothing is unpickled on reading (`allow_pickle=False`), so a store
from elsewhere cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..util.io import atomic_open, file_stem, read_json, to_jsonable, write_json

_JSON_KEY = "__json__"


def _file_name(key: str) -> str:
    safe = file_stem(key)
    if safe != key:   # two keys that differ only in replaced characters must not share a file
        safe += "-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]
    return f"{safe}.npz"


def _ours(folder: Path) -> bool:
    """A folder holding only what a store writes (its config, task files, temporary files)."""
    return all(p.is_file() and (p.name == "config.json" or p.suffix in (".npz", ".tmp")) for p in folder.iterdir())


class TaskStore:
    """Finished task results of one run configuration (see the module docstring)."""

    def __init__(self, folder: str | Path, config: dict[str, Any], *, restart: bool = False) -> None:
        self.folder = Path(folder)
        self.config = json.loads(json.dumps(to_jsonable(config)))  # as it reads back
        stored = read_json(self.folder / "config.json") if self.folder.is_dir() else None
        if restart or stored != self.config:
            self.clear()
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.folder / "config.json", self.config)

    def clear(self) -> None:
        """Remove the store (and every task file in it); a folder that holds anything else is
        not a store and is never removed."""
        if not self.folder.exists():
            return
        if not self.folder.is_dir() or not _ours(self.folder):
            raise UsageError(f"{self.folder} is in the way of this run's task store and holds other files; "
                             "move it, or write the result elsewhere")
        shutil.rmtree(self.folder)

    def path(self, key: str) -> Path:
        return self.folder / _file_name(key)

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result of task `key`, or None when it is not finished (or unreadable)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                out: dict[str, Any] = {name: stored[name] for name in stored.files if name != _JSON_KEY}
                if _JSON_KEY in stored.files:
                    out.update(json.loads(str(stored[_JSON_KEY])))
        except (OSError, ValueError, KeyError, AttributeError, zipfile.BadZipFile, EOFError):
            return None  # a damaged file counts as not done: the task runs again
        return out

    def put(self, key: str, result: dict[str, Any]) -> None:
        """Write task `key`'s result atomically."""
        arrays = {name: value for name, value in result.items() if isinstance(value, np.ndarray)}
        plain = {name: value for name, value in result.items() if not isinstance(value, np.ndarray)}
        if _JSON_KEY in arrays:
            raise ValueError(f"{_JSON_KEY} is reserved")
        if plain:
            arrays[_JSON_KEY] = np.asarray(json.dumps(to_jsonable(plain)))
        with atomic_open(self.path(key), "wb") as handle:
            np.savez(handle, **arrays)

    def done(self) -> int:
        return sum(1 for _ in self.folder.glob("*.npz"))
