"""Probe stimuli: sinusoidal gratings and grey versions of images, as pure tensor functions.

Probes turn questions about units into numbers without hand labels: a unit's preferred
orientation and spatial frequency come from its responses to gratings, its colour
selectivity from its response to an image against the grey version of that image.

Conventions (the analysis code relies on them):
- Images are float tensors in [0, 1] shaped [..., C, H, W].
- A grating's `orientation_deg` is the direction of its wave vector (the direction in which
  brightness changes), counter-clockwise on screen from the image's x axis (rightwards):
  0 deg gives vertical stripes (brightness varies along x), 90 deg horizontal stripes.
  Orientations lie in [0, 180).
- `frequency` is in cycles per image (along the wave vector); `cycles_per_pixel` is
  frequency / size. `phase` is in radians, relative to the image centre ((size - 1) / 2):
  phase 0 puts a bright crest through the centre.
- Grey uses Rec. 601 luma weights (0.299, 0.587, 0.114) on the stored (gamma-encoded)
  values, as PIL's "L" mode and most vision code do; the weights sum to 1, so a grey image
  has the same luma as its colour original.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UsageError

REC601 = (0.299, 0.587, 0.114)


def default_frequencies(size: int) -> list[float]:
    """Octaves 1, 2, 4, ... cycles per image up to a quarter of the size (well below Nyquist)."""
    out, f = [], 1.0
    while f <= size / 4:
        out.append(f)
        f *= 2
    return out or [1.0]


def _orientation_list(orientations: int | Sequence[float]) -> np.ndarray:
    if isinstance(orientations, (int, np.integer)):
        if orientations < 1:
            raise UsageError(f"orientations must be at least 1, not {orientations}")
        return np.arange(int(orientations), dtype=np.float64) * (180.0 / int(orientations))
    values = np.asarray(list(orientations), dtype=np.float64)
    if values.size == 0:
        raise UsageError("give at least one orientation")
    return values


def _phase_list(phases: int | Sequence[float]) -> np.ndarray:
    if isinstance(phases, (int, np.integer)):
        if phases < 1:
            raise UsageError(f"phases must be at least 1, not {phases}")
        return np.arange(int(phases), dtype=np.float64) * (2 * np.pi / int(phases))
    values = np.asarray(list(phases), dtype=np.float64)
    if values.size == 0:
        raise UsageError("give at least one phase")
    return values


def gratings(size: int, orientations: int | Sequence[float] = 8, frequencies: Sequence[float] | None = None,
             phases: int | Sequence[float] = 4, channels: int = 3, contrast: float = 1.0, *,
             device: str | torch.device = "cpu") -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Achromatic sinusoidal gratings, every orientation x frequency x phase, in that order.

    `orientations`: a count n (evenly spaced, i * 180 / n degrees) or explicit degrees.
    `frequencies`: cycles per image (default: `default_frequencies(size)`); must stay below
    the Nyquist limit size / 2. `phases`: a count (evenly spaced over 2 pi) or radians.
    `contrast` is Michelson contrast around mean 0.5, so values stay in [0, 1].
    Returns images [N, channels, size, size] (float32) and per-image arrays
    `orientation_deg`, `frequency`, `cycles_per_pixel`, `phase`, `orientation_index`,
    `frequency_index`, `phase_index`.
    """
    size = int(size)
    if size < 2:
        raise UsageError(f"grating size must be at least 2 pixels, not {size}")
    if channels < 1:
        raise UsageError(f"channels must be at least 1, not {channels}")
    if not 0.0 <= contrast <= 1.0:
        raise UsageError(f"contrast must lie in [0, 1], not {contrast}")
    theta = _orientation_list(orientations)
    freq = np.asarray(default_frequencies(size) if frequencies is None else list(frequencies), dtype=np.float64)
    if freq.size == 0 or np.any(freq <= 0):
        raise UsageError("grating frequencies must be positive (cycles per image)")
    if np.any(freq >= size / 2):
        raise UsageError(f"grating frequencies must be below the Nyquist limit of {size / 2:g} cycles per image "
                         f"for size {size}; got {freq.max():g}")
    phi = _phase_list(phases)

    centre = (size - 1) / 2.0
    coords = torch.arange(size, dtype=torch.float64, device=device) - centre
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    t = torch.as_tensor(np.deg2rad(theta), device=device)[:, None, None]
    # Rows grow downwards, so -y points up: angles run counter-clockwise as seen on screen.
    along = xx[None] * torch.cos(t) - yy[None] * torch.sin(t)  # [O, H, W]
    f = torch.as_tensor(freq, device=device)[:, None, None]
    p = torch.as_tensor(phi, device=device)[:, None, None]
    arg = (2 * np.pi / size) * along[:, None, None] * f[None, :, None] + p[None, None, :]  # [O, F, P, H, W]
    images = (0.5 + 0.5 * contrast * torch.cos(arg)).clamp_(0.0, 1.0).to(torch.float32)
    images = images.reshape(-1, 1, size, size).expand(-1, channels, -1, -1).contiguous()

    oi, fi, pi = np.meshgrid(np.arange(theta.size), np.arange(freq.size), np.arange(phi.size), indexing="ij")
    oi, fi, pi = oi.ravel(), fi.ravel(), pi.ravel()
    info = {
        "orientation_deg": theta[oi], "frequency": freq[fi], "cycles_per_pixel": freq[fi] / size,
        "phase": phi[pi], "orientation_index": oi.astype(np.int64), "frequency_index": fi.astype(np.int64),
        "phase_index": pi.astype(np.int64),
    }
    return images, info


def _check_channels(images: torch.Tensor) -> int:
    if images.dim() < 3:
        raise UsageError(f"images must be shaped [..., C, H, W], got {tuple(images.shape)}")
    c = images.shape[-3]
    if c not in (1, 3):
        raise UsageError(f"grey conversion needs 1 or 3 channels, got {c}")
    return c


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma [..., 1, H, W] of RGB images (grey images are returned as they are)."""
    if _check_channels(images) == 1:
        return images
    w = torch.tensor(REC601, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * w).sum(dim=-3, keepdim=True)


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """Grey version of images, same shape: the luma replicated over the channels."""
    c = _check_channels(images)
    if c == 1:
        return images.clone()
    return luminance(images).expand_as(images).contiguous()


def colour_and_grey(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour, grey) pairs for the colour-selectivity probe: same shapes, same luma."""
    return images, to_grey(images)
