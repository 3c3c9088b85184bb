"""Image folders in the ImageNet layout, decoded lazily, one item at a time.

`DIR/CLASS/**/*.jpg` gives labels by sorted class-folder name; a folder of loose images gives
label -1. When DIR has `train`, `val` or `test` subfolders, the split picks one of them.
Each image is converted to RGB, its shorter side resized to `resize` (bilinear, antialiased)
and the centre `size` x `size` square cut out, as ImageNet evaluation does (resize 256, crop
224 is `?size=224&resize=256`; the default resize equals size, keeping the whole short side).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UsageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "test"), "val": ("val", "test")}


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if _is_image(Path(f)))
    return found


def split_folder(folder: Path, split: str) -> Path:
    """DIR/train, DIR/val or DIR/test when DIR is split that way, else DIR itself."""
    if not folder.is_dir():
        raise UsageError(f"no folder {folder}: folder:DIR needs a directory of images (DIR/CLASS/*.jpg)")
    present = [name for names in SPLIT_FOLDERS.values() for name in names if (folder / name).is_dir()]
    if not present:
        return folder
    for name in SPLIT_FOLDERS[split]:
        if (folder / name).is_dir():
            return folder / name
    raise UsageError(f"{folder} is split into {', '.join(sorted(set(present)))} but has no folder for "
                     f"split {split!r} (expected {' or '.join(SPLIT_FOLDERS[split])})")


def list_images(folder: Path) -> tuple[list[Path], np.ndarray, list[str] | None]:
    """Paths, labels and class names of an image folder (labels -1 and no classes when flat)."""
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    for d in class_dirs:
        images = _images_under(d)
        if images:
            labels.extend([len(classes)] * len(images))
            classes.append(d.name)
            paths.extend(images)
    if paths:
        return paths, np.asarray(labels, dtype=np.int64), classes
    flat = sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p))
    if not flat:
        raise UsageError(f"no images in {folder}: expected DIR/CLASS/*.jpg (or .png, .jpeg, ...) "
                         "or a flat folder of images")
    return flat, np.full(len(flat), -1, dtype=np.int64), None


def load_rgb(path: Path, size: int, resize: int) -> np.ndarray:
    """One image as uint8 [3, size, size]: shorter side resized to `resize`, centre-cropped."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
            short = min(w, h)
            if img.format == "JPEG":  # let the decoder skip detail that the resize would drop
                img.draft("RGB", (max(1, -(-resize * w // short)), max(1, -(-resize * h // short))))
            img = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise UsageError(f"cannot read image {path}: {exc}") from None
    w, h = img.size
    scale = resize / min(w, h)
    new = (max(resize, round(w * scale)), max(resize, round(h * scale)))
    if new != (w, h):
        img = img.resize(new, Image.BILINEAR)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


class FileSource:
    """Images decoded from files on demand (ImageNet does not fit in memory)."""

    def __init__(self, paths: list[Path], size: int, resize: int):
        self.paths, self.size, self.resize = list(paths), int(size), int(resize)
        self.shape = (3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        for k, i in enumerate(indices):
            out[k] = load_rgb(self.paths[int(i)], self.size, self.resize)
        return out

    def take(self, indices: np.ndarray) -> FileSource:
        return FileSource([self.paths[int(i)] for i in indices], self.size, self.resize)
