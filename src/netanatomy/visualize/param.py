"""Image parameterizations: what the optimizer changes, and how that becomes an image in [0, 1].

Following Lucid's recipe (docs/methods.md, "Feature visualization"): the image lives in Fourier
space with every frequency scaled by 1/f (decay power 1), so that a step of the optimizer
changes all frequencies alike in visual terms and high-frequency noise does not win; colour
channels are decorrelated with the square root of ImageNet's colour covariance (3 channels
only); a sigmoid maps the result into [0, 1]. A plain-pixel parameterization is there for
comparison and for tiny images.

With `param_size` the image is parameterized at that (smaller) size and upsampled bilinearly
to the image size inside `forward` (Lucent's default: 128 px parameters seen by a 224 px
network), which halves the spectrum's free values per side and favours larger structures.

Each image of a batch gets its initial values from its own seed, so an image does not depend
on which other images share its batch. Initial values are drawn on the CPU and then moved to
the device, so the same seed gives the same start on every device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..util.seeding import torch_generator

# Square root of ImageNet's colour covariance (Lucid's `color_correlation_svd_sqrt`).
COLOR_CORRELATION_SVD_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02],
     [0.27, 0.00, -0.05],
     [0.27, -0.09, 0.03]],
    dtype=torch.float64,
)
# Normalized by its largest column norm, so that no channel's range grows.
COLOR_CORRELATION = (COLOR_CORRELATION_SVD_SQRT / COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()).float()

PARAMETERIZATIONS = ("fourier", "pixel")
FOURIER_SD = 0.01
PIXEL_SD = 0.01
DECAY_POWER = 1.0


def rfft2_frequencies(h: int, w: int) -> Tensor:
    """|f| of each bin of a real 2-D FFT of an h x w image, in cycles per pixel, shape [h, w//2+1]."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def spectrum_scale(h: int, w: int, decay_power: float = DECAY_POWER) -> Tensor:
    """Per-bin factor 1/|f|^decay_power (the DC bin floored at the lowest frequency), times sqrt(h*w).

    The sqrt(h*w) undoes the 1/(h*w) of the inverse FFT, so pixel values do not shrink with size.
    """
    freqs = rfft2_frequencies(h, w).clamp_min(1.0 / max(h, w))
    return (freqs.pow(-decay_power) * math.sqrt(h * w)).float()


def spectrum_to_image(spectrum: Tensor, scale: Tensor, size: tuple[int, int]) -> Tensor:
    """Real/imaginary spectrum [B, C, h, w//2+1, 2] -> real image [B, C, h, w] before colour and sigmoid.

    The final division by 4 is Lucid's, which keeps the initial image near the sigmoid's centre.
    """
    coeffs = torch.view_as_complex(spectrum.contiguous()) * scale
    return torch.fft.irfft2(coeffs, s=size, norm="backward") / 4.0


def decorrelate_colors(x: Tensor) -> Tensor:
    """Map decorrelated colour coordinates to RGB (3 channels); any other channel count passes through."""
    if x.shape[1] != 3:
        return x
    matrix = COLOR_CORRELATION.to(device=x.device, dtype=x.dtype)
    return torch.matmul(matrix, x.flatten(2)).view_as(x)


def to_unit_range(x: Tensor, decorrelate: bool = True) -> Tensor:
    """Colour decorrelation (when asked and 3 channels) then a sigmoid into [0, 1]."""
    if decorrelate:
        x = decorrelate_colors(x)
    return torch.sigmoid(x)


class ImageParam(nn.Module):
    """A batch of images as trainable tensors; calling it gives images [B, C, H, W] in [0, 1].

    Build with `image_param`. `raw` is the one trainable tensor (a spectrum or pixels), so an
    optimizer over `parameters()` treats every image of the batch independently.
    """

    def __init__(self, raw: Tensor, kind: str, size: tuple[int, int], decorrelate: bool,
                 decay_power: float = DECAY_POWER, param_size: tuple[int, int] | None = None):
        super().__init__()
        self.kind = kind
        self.size = size
        self.param_size = tuple(param_size) if param_size is not None else tuple(size)
        self.decorrelate = decorrelate
        self.raw = nn.Parameter(raw)
        if kind == "fourier":
            scale = spectrum_scale(*self.param_size, decay_power).to(raw.device)
            self.register_buffer("scale", scale, persistent=False)
        else:
            self.scale = None

    @property
    def batch(self) -> int:
        return int(self.raw.shape[0])

    def forward(self) -> Tensor:
        if self.kind == "fourier":
            x = spectrum_to_image(self.raw, self.scale, self.param_size)
        else:
            x = self.raw
        x = to_unit_range(x, self.decorrelate)
        if self.param_size != tuple(self.size):
            # bilinear, corners aligned as Lucent's upsampling; stays in [0, 1] and differentiable
            x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=True)
        return x


def image_param(seeds: Sequence[int], channels: int, size: int | tuple[int, int], *, kind: str = "fourier",
                sd: float | None = None, decay_power: float = DECAY_POWER, decorrelate: bool = True,
                device: str | torch.device = "cpu", param_size: int | tuple[int, int] | None = None) -> ImageParam:
    """One image per seed: `kind` "fourier" (1/f-scaled spectrum, Lucid's default) or "pixel".

    Image i starts from normal noise drawn with seeds[i] alone. Colour decorrelation applies only
    to 3-channel images; grey and other channel counts go straight to the sigmoid. With
    `param_size` (at most `size`), the image is made at that size and upsampled bilinearly to
    `size` (e.g. 128 -> 224, as Lucent does); None or `size` itself: no upsampling.
    """
    if kind not in PARAMETERIZATIONS:
        raise UsageError(f"unknown image parameterization {kind!r}: use {' or '.join(PARAMETERIZATIONS)}")
    h, w = _pair(size)
    if channels < 1 or h < 1 or w < 1:
        raise UsageError(f"image shape must be positive, got {channels} x {h} x {w}")
    ph, pw = (h, w) if param_size is None else _pair(param_size)
    if ph < 1 or pw < 1 or ph > h or pw > w:
        raise UsageError(f"the parameterization size {ph}x{pw} must be between 1 and the image size {h}x{w}")
    if not seeds:
        raise UsageError("no images to parameterize")
    sd = (FOURIER_SD if kind == "fourier" else PIXEL_SD) if sd is None else float(sd)
    shape = (channels, ph, pw // 2 + 1, 2) if kind == "fourier" else (channels, ph, pw)
    raw = torch.stack([torch.randn(shape, generator=torch_generator(s)) * sd for s in seeds])
    return ImageParam(raw.to(device), kind, (h, w), decorrelate, decay_power, param_size=(ph, pw))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


__all__ = [
    "COLOR_CORRELATION",
    "ImageParam",
    "PARAMETERIZATIONS",
    "decorrelate_colors",
    "image_param",
    "rfft2_frequencies",
    "spectrum_scale",
    "spectrum_to_image",
    "to_unit_range",
]
