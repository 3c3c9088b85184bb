"""Weight pictures: NMF loadings and RGB filters as images, upscaled, in similarity-sorted grids.

Pure array functions (numpy in, numpy out); saving is the caller's business
(`netanatomy.util.io.save_png`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.cluster.hierarchy import leaves_list, linkage

__all__ = [
    "filters_to_rgb",
    "loadings_to_rgb",
    "picture_grid",
    "similarity_order",
    "upscale",
]


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def loadings_to_rgb(loadings: np.ndarray | torch.Tensor) -> np.ndarray:
    """[U, h, w, k] non-negative loadings -> [U, h, w, 3] RGB in [0, 1], scaled per unit by its max.

    Factor 0 is red, 1 green, 2 blue; with fewer than 3 factors the missing channels stay
    black, with more only the first 3 are drawn.
    """
    arr = _numpy(loadings).astype(np.float32)
    if arr.ndim != 4:
        raise ValueError(f"loadings must be [units, h, w, k], got shape {arr.shape}")
    u, h, w, k = arr.shape
    rgb = np.zeros((u, h, w, 3), dtype=np.float32)
    rgb[..., : min(k, 3)] = arr[..., :3]
    peak = rgb.reshape(u, -1).max(axis=1)
    rgb /= np.where(peak > 0, peak, 1.0)[:, None, None, None]
    return np.clip(rgb, 0.0, 1.0)


def filters_to_rgb(filters: np.ndarray | torch.Tensor) -> np.ndarray:
    """First-layer filters [U, C, h, w] -> [U, h, w, 3] images, grey = 0, scaled per unit.

    Each filter is shown as the image it responds to most: 0.5 + W / (2 max|W|), so the sign
    and colour of every weight are visible. One-channel filters are drawn grey; with C > 3
    only the first three channels are shown.
    """
    arr = _numpy(filters).astype(np.float32)
    if arr.ndim != 4:
        raise ValueError(f"filters must be [units, C, h, w], got shape {arr.shape}")
    u, c = arr.shape[:2]
    if c == 1:
        arr = np.repeat(arr, 3, axis=1)
    elif c == 2:
        arr = np.concatenate([arr, np.zeros_like(arr[:, :1])], axis=1)
    arr = arr[:, :3].transpose(0, 2, 3, 1)
    peak = np.abs(arr).reshape(u, -1).max(axis=1)
    arr = 0.5 + arr / (2 * np.where(peak > 0, peak, 1.0))[:, None, None, None]
    return np.clip(arr, 0.0, 1.0)


def upscale(pictures: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of [..., h, w, C] pictures by an integer factor (sharp pixels)."""
    if factor < 1:
        raise ValueError("upscale factor must be >= 1")
    arr = np.asarray(pictures)
    return arr.repeat(factor, axis=-3).repeat(factor, axis=-2)


def similarity_order(features: np.ndarray | torch.Tensor, *, metric: str = "cosine",
                     method: str = "average", optimal: bool | None = None) -> np.ndarray:
    """An order of the rows so that similar rows sit together: hierarchical-clustering leaf order.

    features [U, d]; rows of zeros go last. `optimal` leaf ordering (which also makes
    neighbouring leaves across branches similar) is used up to 1000 rows by default: it costs
    more than the clustering itself on larger inputs.
    """
    arr = _numpy(features).astype(np.float64).reshape(len(features), -1)
    n = arr.shape[0]
    if n <= 2:
        return np.arange(n)
    live = np.flatnonzero(np.abs(arr).sum(axis=1) > 0)
    dead = np.setdiff1d(np.arange(n), live)
    if len(live) <= 2:
        return np.concatenate([live, dead])
    if optimal is None:
        optimal = len(live) <= 1000
    z = linkage(arr[live], method=method, metric=metric, optimal_ordering=optimal)
    return np.concatenate([live[leaves_list(z)], dead]).astype(np.int64)


def picture_grid(pictures: np.ndarray, *, order: np.ndarray | None = None, ncols: int | None = None,
                 scale: int = 1, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile [U, h, w, 3] pictures (in `order`, default as given) into one [H, W, 3] image.

    Pictures are upscaled by `scale` (nearest) and separated by `pad` pixels of `pad_value`;
    the grid is about square unless `ncols` is given.
    """
    arr = np.asarray(pictures, dtype=np.float32)
    if arr.ndim != 4:
        raise ValueError(f"pictures must be [units, h, w, channels], got shape {arr.shape}")
    if order is not None:
        arr = arr[np.asarray(order)]
    arr = upscale(arr, scale)
    u, h, w, c = arr.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(u)))
    nrows = max(1, math.ceil(u / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, dtype=np.float32)
    for i in range(u):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return grid
