"""The one data set type every reader returns, and a seeded loader for it.

Images are stored compactly (uint8, N x C x H x W, in memory or decoded from files on demand)
and become float32 in [0, 1] only when asked for, one item or one batch at a time (converted
to another channel count or resized then, when the spec asks for it). Indexing
with an int gives one item (x [C, H, W], y); indexing with a list, array, tensor or slice
gives a whole batch (x [n, C, H, W], y [n]) in one vectorized step, which `make_loader` uses
so that a loader never stacks items one by one.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from ..errors import UsageError
from ..util.seeding import torch_generator
from .probes import luminance, to_grey

#: channel conversions applied after loading: grey keeps C, luma gives 1 channel, rgb gives 3
CHANNEL_MODES = (None, "grey", "luma", "rgb")


class ImageSource(Protocol):
    """Where the pixels live: `load` returns uint8 or float32 [n, C, H, W] for an index array."""

    shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def load(self, indices: np.ndarray) -> np.ndarray: ...

    def take(self, indices: np.ndarray) -> ImageSource: ...


class ArraySource:
    """Pixels held in memory as one array [N, C, H, W] (uint8, or float32 in [0, 1])."""

    def __init__(self, images: np.ndarray):
        images = np.asarray(images)
        if images.ndim != 4:
            raise UsageError(f"images must be shaped N x C x H x W, got {images.shape}")
        if images.dtype.kind == "f" and images.dtype != np.float32:
            images = images.astype(np.float32)
        if images.dtype not in (np.uint8, np.float32):
            raise UsageError(f"images must be uint8 or floats in [0, 1], got {images.dtype}")
        self.images = images
        self.shape = tuple(int(s) for s in images.shape[1:])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load(self, indices: np.ndarray) -> np.ndarray:
        return self.images[indices]

    def take(self, indices: np.ndarray) -> ArraySource:
        return ArraySource(self.images[indices])


def _as_float(raw: np.ndarray) -> torch.Tensor:
    if raw.dtype == np.uint8:
        return torch.from_numpy(np.true_divide(raw, np.float32(255.0), dtype=np.float32))
    return torch.from_numpy(np.array(raw, dtype=np.float32, copy=True))


class ImageDataset(Dataset):
    """Images with integer labels (-1 when unlabelled), as float32 tensors in [0, 1].

    Attributes: `name` (reader name), `split`, `spec` (the spec string it was opened from),
    `classes` (names of labels 0..K-1, or None), `image_shape` (C, H, W), `targets` (int64 [N]),
    `meta` (per-item arrays a reader adds, e.g. a grating's orientation).
    """

    def __init__(self, images: np.ndarray | torch.Tensor | ImageSource,
                 targets: Sequence[int] | np.ndarray | None = None, *,
                 name: str = "images", split: str = "test", classes: Sequence[str] | None = None,
                 meta: Mapping[str, np.ndarray] | None = None, spec: str | None = None,
                 channels: str | None = None, size: tuple[int, int] | None = None):
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        self.source: ImageSource = ArraySource(images) if isinstance(images, np.ndarray) else images
        n = len(self.source)
        self.targets = (np.full(n, -1, dtype=np.int64) if targets is None
                        else np.asarray(targets, dtype=np.int64).reshape(-1))
        if self.targets.shape[0] != n:
            raise UsageError(f"{n} images but {self.targets.shape[0]} labels")
        self.name, self.split, self.spec = name, split, spec or name
        self.classes = list(classes) if classes is not None else None
        self.meta = {k: np.asarray(v) for k, v in (meta or {}).items()}
        for key, value in self.meta.items():
            if value.shape[:1] != (n,):
                raise UsageError(f"meta {key!r} has {value.shape[:1]} entries for {n} images")
        if channels not in CHANNEL_MODES:
            raise UsageError(f"channel mode must be one of {CHANNEL_MODES}, not {channels!r}")
        if channels in ("grey", "luma") and self.source.shape[0] not in (1, 3):
            raise UsageError(f"grey conversion needs 1 or 3 channels, the images have {self.source.shape[0]}")
        if channels == "rgb" and self.source.shape[0] not in (1, 3):
            raise UsageError(f"rgb needs 1 or 3 channels, the images have {self.source.shape[0]}")
        self.channels = channels
        if size is not None:
            size = (int(size[0]), int(size[1]))
            if min(size) < 1:
                raise UsageError(f"image size must be positive, not {size}")
            if size == tuple(self.source.shape[1:]):
                size = None
        self.size = size

    # -- shape and size -------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.source.shape
        if self.channels == "luma":
            c = 1
        elif self.channels == "rgb":
            c = 3
        if self.size is not None:
            h, w = self.size
        return (c, h, w)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        k = f", classes={len(self.classes)}" if self.classes is not None else ""
        return (f"ImageDataset({self.spec!r}, split={self.split!r}, n={len(self)}, "
                f"image_shape={self.image_shape}{k})")

    # -- access ---------------------------------------------------------------------------
    def _index_array(self, index: Any) -> np.ndarray:
        n = len(self)
        if isinstance(index, slice):
            return np.arange(n)[index]
        if isinstance(index, torch.Tensor):
            index = index.detach().cpu().numpy()
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean mask of shape {idx.shape} for {n} items")
            return np.flatnonzero(idx)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        if idx.min() < -n or idx.max() >= n:
            raise IndexError(f"index out of range for {n} items")
        return np.where(idx < 0, idx + n, idx)

    def _convert(self, raw: np.ndarray) -> torch.Tensor:
        x = _as_float(raw)
        if self.channels == "grey":
            x = to_grey(x)
        elif self.channels == "luma":
            x = luminance(x)
        elif self.channels == "rgb" and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        if self.size is not None and x.shape[0]:
            # bilinear with antialiasing: shrinking averages, as a camera would, instead of aliasing
            x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                                                antialias=True).clamp_(0.0, 1.0)
        return x

    def tensors(self, indices: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float32 [n, C, H, W], y int64 [n]) for `indices` (default: everything), in one step."""
        idx = np.arange(len(self)) if indices is None else self._index_array(indices)
        if idx.size == 0:
            return torch.zeros((0, *self.image_shape)), torch.zeros(0, dtype=torch.long)
        return self._convert(self.source.load(idx)), torch.from_numpy(self.targets[idx].copy())

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for {len(self)} items")
            i %= len(self)
            x, y = self.tensors(np.array([i]))
            return x[0], y[0]
        return self.tensors(index)

    def subset(self, indices: Any) -> ImageDataset:
        """A new data set of the chosen items, in the given order (meta and classes carried over)."""
        idx = self._index_array(indices)
        return ImageDataset(self.source.take(idx), self.targets[idx], name=self.name, split=self.split,
                            classes=self.classes, meta={k: v[idx] for k, v in self.meta.items()},
                            spec=self.spec, channels=self.channels, size=self.size)

    def with_channels(self, channels: str | None) -> ImageDataset:
        """The same items seen through another channel mode (None, 'grey', 'luma', 'rgb')."""
        return ImageDataset(self.source, self.targets, name=self.name, split=self.split, classes=self.classes,
                            meta=self.meta, spec=self.spec, channels=channels, size=self.size)

    def resized(self, size: int | tuple[int, int] | None) -> ImageDataset:
        """The same items resized to `size` (H, W), or an int for a square (None: as stored)."""
        if isinstance(size, int):
            size = (size, size)
        return ImageDataset(self.source, self.targets, name=self.name, split=self.split, classes=self.classes,
                            meta=self.meta, spec=self.spec, channels=self.channels, size=size)


def _as_is(batch: Any) -> Any:
    return batch


def make_loader(ds: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader over `ds` whose shuffling is seeded: the same seed gives the same batches.

    Each pass over the loader draws a new order from the seeded generator, so epochs differ
    from each other but the whole sequence repeats for the same seed. For an ImageDataset
    each batch is fetched with one vectorized index (no per-item stacking).
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, not {batch_size}")
    if num_workers < 0:
        raise UsageError(f"num_workers must be >= 0, not {num_workers}")
    gen = torch_generator(seed)
    sampler = RandomSampler(ds, generator=gen) if shuffle else SequentialSampler(ds)
    if isinstance(ds, ImageDataset):
        batches = BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
        return DataLoader(ds, batch_size=None, sampler=batches, collate_fn=_as_is, num_workers=num_workers,
                          generator=torch_generator(seed + 1))
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                      generator=torch_generator(seed + 1))
