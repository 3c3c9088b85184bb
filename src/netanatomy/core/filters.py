"""Properties of first-layer filters read from the weights alone, vectorized over units.

Used to name what singular vectors of |W| and branches line up with (Branch Specialization:
colour vs black-and-white, low vs high frequency).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["colourfulness", "spatial_frequency"]


def _check(filters: Tensor) -> Tensor:
    if filters.ndim != 4:
        raise ValueError(f"filters must be [units, C, h, w], got shape {tuple(filters.shape)}")
    return filters.detach().double()


def colourfulness(filters: Tensor) -> Tensor:
    """[U] share of each filter's energy off the grey axis, in [0, 1].

    At every position the C input-channel weights are split into their projection on the
    grey axis (all channels equal) and the rest; colourfulness = energy of the rest / total
    energy. A filter that weighs R, G and B alike is 0; one that uses a single channel is
    1 - 1/C; an opponent filter (R - G) is 1. All-zero filters get 0.
    """
    w = _check(filters)
    if w.shape[1] < 2:
        return torch.zeros(w.shape[0], dtype=torch.float64)
    off_grey = w - w.mean(dim=1, keepdim=True)
    total = w.pow(2).sum(dim=(1, 2, 3))
    off = off_grey.pow(2).sum(dim=(1, 2, 3))
    return torch.where(total > 0, off / total.clamp_min(1e-300), torch.zeros_like(total))


def spatial_frequency(filters: Tensor, *, size: int | None = None) -> Tensor:
    """[U] energy-weighted mean radial frequency of each filter, in cycles per pixel.

    The power spectrum of every input channel (the DFT on the kernel's own grid, or
    zero-padded to `size` x `size`) is summed over channels; the result is
    sum(|f| * power) / sum(power), with |f| = sqrt(fx^2 + fy^2) in [0, 0.71]. The mean (DC)
    counts as frequency 0, so a constant filter is 0, a colour blob low and a fine Gabor
    high. Zero-padding gives a finer frequency grid but adds the leakage of the kernel's
    square window (about 0.1 cycles/pixel for a constant 7x7), so it is off by default.
    All-zero filters get 0.
    """
    w = _check(filters)
    kh, kw = w.shape[-2:]
    sh, sw = (size, size) if size else (kh, kw)
    if sh < kh or sw < kw:
        raise ValueError("size must be at least the kernel size")
    power = torch.fft.fft2(w, s=(sh, sw)).abs().pow(2).sum(dim=1)     # [U, sh, sw]
    fy = torch.fft.fftfreq(sh, dtype=torch.float64)
    fx = torch.fft.fftfreq(sw, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    total = power.sum(dim=(1, 2))
    mean = (power * radius).sum(dim=(1, 2)) / total.clamp_min(1e-300)
    return torch.where(total > 0, mean, torch.zeros_like(mean))
