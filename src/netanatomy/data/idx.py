"""The IDX format of MNIST and Fashion-MNIST, read and written with NumPy alone.

An IDX file is: two zero bytes, a type code, the number of dimensions, each dimension as a
big-endian uint32, then the values in big-endian C order. Files may be gzipped (detected by
content, not by name). Everything is checked, so a truncated or foreign file gives one clear
UsageError instead of garbage images.
"""
from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import UsageError

_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {(v.kind, v.itemsize): k for k, v in _TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise UsageError(f"{path} is a damaged or truncated gzip file ({exc})") from None
    return raw


def parse_idx(raw: bytes, origin: str = "IDX data") -> np.ndarray:
    """The array held by IDX bytes (native byte order; uint8 data is not copied)."""
    if len(raw) < 4:
        raise UsageError(f"{origin} is not an IDX file: only {len(raw)} bytes")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise UsageError(f"{origin} is not an IDX file: bad magic number 0x{raw[:4].hex()}")
    dtype, ndim = _TYPES[raw[2]], raw[3]
    if ndim == 0:
        raise UsageError(f"{origin}: IDX file with zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UsageError(f"{origin} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise UsageError(f"{origin} is {what}: dims {dims} need {expected} data bytes, found {found}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzipped or not."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialize an array (uint8, int8, int16, int32, float32, float64) as IDX bytes."""
    array = np.asarray(array)
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _CODES:
        raise UsageError(f"IDX cannot hold dtype {array.dtype}")
    if array.ndim == 0 or array.ndim > 255:
        raise UsageError("IDX needs 1 to 255 dimensions")
    code = _CODES[key]
    head = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return head + np.ascontiguousarray(array, dtype=_TYPES[code]).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write an IDX file; gzipped when `compress` (default: when the name ends in .gz).

    Gzip output is byte-for-byte reproducible (no time stamp, no file name in the header).
    """
    from ..util.io import write_bytes

    path = Path(path)
    data = idx_bytes(array)
    if compress if compress is not None else path.suffix == ".gz":
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buffer, mtime=0) as handle:
            handle.write(data)
        data = buffer.getvalue()
    return write_bytes(path, data)


def _split_prefixes(split: str) -> tuple[str, ...]:
    return ("train",) if split == "train" else ("t10k", "test")


def find_idx_pair(folder: Path, split: str, prefix: str = "") -> tuple[Path, Path] | None:
    """The (images, labels) files of a split in `folder`, in any of the usual spellings, or None."""
    for head in _split_prefixes(split):
        pair = []
        for kind, rank in (("images", 3), ("labels", 1)):
            names = [f"{prefix}{head}-{kind}-idx{rank}-ubyte", f"{prefix}{head}-{kind}.idx{rank}-ubyte"]
            hit = next((folder / (n + ext) for n in names for ext in (".gz", "")
                        if (folder / (n + ext)).is_file()), None)
            if hit is None:
                break
            pair.append(hit)
        if len(pair) == 2:
            return pair[0], pair[1]
    return None


def expected_names(split: str, prefix: str = "") -> str:
    head = _split_prefixes(split)[0]
    return f"{prefix}{head}-images-idx3-ubyte[.gz] and {prefix}{head}-labels-idx1-ubyte[.gz]"


def read_idx_split(folder: Path, split: str, prefix: str = "") -> tuple[np.ndarray, np.ndarray] | None:
    """Images [N, C, H, W] uint8 and labels [N] int64 of a split, or None when its files are absent."""
    pair = find_idx_pair(folder, split, prefix)
    if pair is None:
        return None
    images, labels = read_idx(pair[0]), read_idx(pair[1])
    if images.dtype != np.uint8:
        raise UsageError(f"{pair[0]}: images must be unsigned bytes, found {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:  # N, H, W, C
        images = images.transpose(0, 3, 1, 2)
    else:
        raise UsageError(f"{pair[0]}: images must have 3 dimensions (N, H, W), found {images.ndim}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UsageError(f"{pair[1]}: labels must be one integer per image")
    if labels.shape[0] != images.shape[0]:
        raise UsageError(f"{pair[0].name} holds {images.shape[0]} images but {pair[1].name} {labels.shape[0]} labels")
    return images, labels.astype(np.int64)
