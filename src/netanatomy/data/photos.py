"""Natural-image patches cut from colour photographs: colour natural images with no download.

The default photographs are the natural colour photos that ship with scikit-image (astronaut,
chelsea, coffee, rocket, the left view of stereo_motorcycle; its microscopy, retina, space and
synthetic images are left out) and, when present, Debian's MATE nature wallpapers in
/usr/share/backgrounds/mate/nature/. `photos:DIR` adds every JPEG/PNG in DIR
(`?builtin=0` uses DIR alone).

Each patch is a random square crop whose side is a fraction of the photo's shorter side,
drawn log-uniformly from `scale` (default 0.1 to 0.5, so patches cover a range of scales;
never less than `size` pixels, so nothing is upsampled), resized to `size` x `size`
(bilinear, antialiased) and mirrored left-right with probability 1/2 (`?flip=0` turns that
off). `size` is the spec's `size=`, else the model's input side in commands that run a model
(`open_dataset(default_size=...)`), else 32. The photo is drawn uniformly, so photos are
equally represented. The label is the photo's index (`classes` holds the photo names), so the
set can also serve a "which photo" task. Everything follows from the seed; the split changes
the seed stream.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .folder import IMAGE_SUFFIXES

MATE_NATURE_DIR = Path("/usr/share/backgrounds/mate/nature")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")


@dataclass(frozen=True)
class Photo:
    name: str
    open: Callable[[], object]  # returns a PIL image (lazily: photos are decoded one at a time)
    path: Path | None = None


def _skimage_photo(name: str) -> Callable[[], object]:
    def opener():
        from PIL import Image
        from skimage import data

        try:
            array = getattr(data, name)()
        except Exception as exc:  # a scikit-image without this photo, or one that wants to download it
            raise UsageError(f"scikit-image cannot provide its {name} photo ({exc}); pass photos:DIR?builtin=0") \
                from None
        if name == "stereo_motorcycle":
            array = array[0]
        return Image.fromarray(np.ascontiguousarray(array[..., :3]))
    return opener


def _file_photo(path: Path) -> Callable[[], object]:
    def opener():
        from PIL import Image
        return Image.open(path)
    return opener


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def default_photos() -> list[Photo]:
    photos = [Photo(f"skimage:{name}", _skimage_photo(name)) for name in SKIMAGE_PHOTOS]
    if MATE_NATURE_DIR.is_dir():
        photos += [Photo(f"mate:{p.stem}", _file_photo(p), p) for p in _files_in(MATE_NATURE_DIR)]
    return photos


def photo_list(folder: Path | None, builtin: bool = True) -> list[Photo]:
    photos = default_photos() if builtin else []
    if folder is not None:
        if not folder.is_dir():
            raise UsageError(f"no folder {folder}: photos:DIR needs a directory of JPEG/PNG photos")
        files = _files_in(folder)
        if not files:
            raise UsageError(f"no photos in {folder}: expected *.jpg or *.png files")
        photos += [Photo(p.stem, _file_photo(p), p) for p in files]
    if not photos:
        raise UsageError("no photos to cut patches from: pass photos:DIR")
    return photos


def sample_patches(photos: list[Photo], n: int, size: int, scale: tuple[float, float] = (0.1, 0.5),
                   flip: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """`n` patches uint8 [n, 3, size, size], photo index per patch, and each patch's geometry.

    The random draws are made up front and do not depend on the photos' sizes, so one seed
    always asks for the same relative crops.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    lo, hi = scale
    if n < 1 or size < 1:
        raise UsageError(f"photos need n >= 1 and size >= 1, got n={n}, size={size}")
    if not 0 < lo <= hi <= 1:
        raise UsageError(f"photo patch scale must satisfy 0 < low <= high <= 1, got {lo}-{hi}")
    gen = np.random.default_rng(seed)
    which = gen.integers(0, len(photos), n)
    frac = np.exp(gen.uniform(np.log(lo), np.log(hi), n))
    pos = gen.random((n, 2))
    mirror = gen.random(n) < 0.5 if flip else np.zeros(n, dtype=bool)

    out = np.empty((n, 3, size, size), dtype=np.uint8)
    geom = np.zeros((n, 3), dtype=np.float64)  # crop's left and top (fractions of width, height), side / short
    for p, photo in enumerate(photos):
        members = np.flatnonzero(which == p)
        if members.size == 0:
            continue
        try:
            img = photo.open()
            w, h = img.size
            finest = max(size, float(frac[members].min()) * min(w, h))
            if getattr(img, "format", None) == "JPEG" and finest > 2 * size:  # decode no finer than needed
                img.draft("RGB", (max(1, int(w * size / finest)), max(1, int(h * size / finest))))
            img = ImageOps.exif_transpose(img).convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise UsageError(f"cannot read photo {photo.path or photo.name}: {exc}") from None
        w, h = img.size
        short = min(w, h)
        if short < size:
            raise UsageError(f"photo {photo.name} ({w}x{h}) is smaller than the patch size {size}")
        for i in members:
            side = int(min(short, max(size, round(frac[i] * short))))
            x0 = int(pos[i, 0] * (w - side + 1))
            y0 = int(pos[i, 1] * (h - side + 1))
            patch = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
            if mirror[i]:
                patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
            out[i] = np.asarray(patch, dtype=np.uint8).transpose(2, 0, 1)
            geom[i] = (x0 / w, y0 / h, side / short)
    geometry = {"photo": which.astype(np.int64), "x": geom[:, 0], "y": geom[:, 1], "scale": geom[:, 2],
                "flip": mirror}
    return out, which.astype(np.int64), geometry
