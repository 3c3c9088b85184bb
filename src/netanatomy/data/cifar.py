"""CIFAR-10 and CIFAR-100 (the "python version" batches), read without running their code.

The batches are pickles: dicts of strings to lists and NumPy arrays. A plain `pickle.load`
would run whatever a crafted file asks for, so they are read with an Unpickler that resolves
only the few globals a NumPy array needs; every other global (os.system, builtins.eval, ...)
is refused before anything runs. Allowed, and why:
- `numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`: arrays pickled with
  protocols 0-4 (the official files use protocol 2);
- `numpy.core.numeric._frombuffer`: arrays pickled with protocol 5 (re-saved by newer Python);
- `numpy.core.multiarray.scalar`: NumPy scalars (labels re-saved as np.int64);
- `_codecs.encode` with the latin-1 codec only: bytes written by Python 3 with protocol < 3.
The `numpy._core` spellings (NumPy 2) are accepted as well. Object dtypes are refused, so an
array can never smuggle in arbitrary objects.
"""
from __future__ import annotations

import codecs
import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError


def _numpy_attr(module: str, name: str) -> Any:
    for candidate in (f"numpy._core.{module}", f"numpy.core.{module}"):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


def _safe_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object dtype (it could hold arbitrary objects)")
    return dtype


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    return codecs.encode(text, "latin-1", errors)


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _safe_dtype,
                                           ("_codecs", "encode"): _latin1_encode}
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")):
        target = _numpy_attr(module, name)
        for root in ("numpy.core", "numpy._core"):
            allowed[(f"{root}.{module}", name)] = target
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that builds only plain containers, strings, numbers and NumPy arrays."""

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if SafeUnpickler._ALLOWED is None:
            SafeUnpickler._ALLOWED = _allowed()
        try:
            return SafeUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent reference")


def _check_no_objects(value: Any) -> None:
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object array")
    if isinstance(value, dict):
        for item in value.values():
            _check_no_objects(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_no_objects(item)


def safe_load_pickle(path: str | Path) -> Any:
    """Load a data pickle (dicts, lists, str, bytes, numbers, numeric arrays); never runs code."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        value = SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
        _check_no_objects(value)
    except pickle.UnpicklingError as exc:
        raise UsageError(f"{path}: {exc}; a CIFAR batch holds only arrays, lists and strings") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as exc:
        raise UsageError(f"{path} is not a readable CIFAR batch ({type(exc).__name__}: {exc})") from None
    return value


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _as_dict(value: Any, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{path} is not a CIFAR batch: expected a dict, found {type(value).__name__}")
    return {_text(k): v for k, v in value.items()}


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _as_dict(safe_load_pickle(path), path)
    if "data" not in batch or label_key not in batch:
        raise UsageError(f"{path} is not a CIFAR batch: needs keys 'data' and {label_key!r}, "
                         f"has {', '.join(sorted(batch))}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UsageError(f"{path}: 'data' must be uint8 rows of 3072 values, found {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or labels.dtype.kind not in "iu":
        raise UsageError(f"{path}: {label_key!r} must hold one integer per row of 'data'")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _resolve_folder(folder: Path, inner: str, marker: str) -> Path:
    if (folder / marker).is_file():
        return folder
    if (folder / inner / marker).is_file():
        return folder / inner
    return folder


def read_cifar10(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images uint8 [N, 3, 32, 32], labels int64 [N] and the 10 class names."""
    folder = _resolve_folder(folder, "cifar-10-batches-py", "batches.meta")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names + ["batches.meta"] if not (folder / n).is_file()]
    if missing:
        raise UsageError(f"no CIFAR-10 batches in {folder}: missing {', '.join(missing)}; pass the folder "
                         "of the python version (cifar-10-batches-py) as cifar10:DIR")
    parts = [_read_batch(folder / n, "labels") for n in names]
    meta = _as_dict(safe_load_pickle(folder / "batches.meta"), folder / "batches.meta")
    classes = [_text(c) for c in meta.get("label_names", [])] or [str(i) for i in range(10)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes


def read_cifar100(folder: Path, split: str, labels: str = "fine") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, fine (100) or coarse (20) labels, and their class names."""
    if labels not in ("fine", "coarse"):
        raise UsageError(f"cifar100 labels must be fine or coarse, not {labels!r}")
    folder = _resolve_folder(folder, "cifar-100-python", "meta")
    name = "train" if split == "train" else "test"
    missing = [n for n in (name, "meta") if not (folder / n).is_file()]
    if missing:
        raise UsageError(f"no CIFAR-100 files in {folder}: missing {', '.join(missing)}; pass the folder "
                         "of the python version (cifar-100-python) as cifar100:DIR")
    images, targets = _read_batch(folder / name, f"{labels}_labels")
    meta = _as_dict(safe_load_pickle(folder / "meta"), folder / "meta")
    count = 100 if labels == "fine" else 20
    classes = [_text(c) for c in meta.get(f"{labels}_label_names", [])] or [str(i) for i in range(count)]
    return images, targets, classes
