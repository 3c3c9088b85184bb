"""Transformation robustness: a random small geometric change of every image at every step.

An image that excites a unit only at one exact pixel alignment is adversarial noise, not a
feature; optimizing through random jitter, scaling and rotation keeps what survives them.
Lucid's chain (docs/methods.md) is pad 12 (value 0.5), jitter 8, scale 0.90-1.10, rotate -10..10
degrees, jitter 4. Lucid applies it step by step and lets the image size vary with the scale;
here the whole chain is composed into one affine map per image and sampled once (bilinear)
at a fixed output size, so that a batch stays rectangular, models that take one input size
work, and the image is interpolated once instead of twice. Sampling outside the image gives the
pad value (with `pad=0`, the nearest edge pixel instead).

The random draws of image i depend only on its own seed (see `draw_params`), never on the
other images of the batch: a unit renders the same alone or in a batch of 64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError
from ..util.seeding import torch_generator

# Columns of a step's parameters: first jitter (y, x), scale, angle in degrees, second jitter (y, x).
N_PARAMS = 6


@dataclass(frozen=True)
class TransformConfig:
    """Lucid's standard transforms; pixel amounts are in pixels of the rendered image."""

    pad: int = 12
    pad_value: float = 0.5
    jitter: int = 8
    scale: tuple[float, float] = (0.90, 1.10)
    angle: tuple[float, float] = (-10.0, 10.0)
    jitter2: int = 4

    def __post_init__(self) -> None:
        if self.pad < 0 or self.jitter < 0 or self.jitter2 < 0:
            raise UsageError("pad and jitter must not be negative")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise UsageError(f"scale range must be positive and ordered, got {self.scale}")
        if self.angle[0] > self.angle[1]:
            raise UsageError(f"angle range must be ordered, got {self.angle}")

    @property
    def is_identity(self) -> bool:
        return self.jitter == 0 and self.jitter2 == 0 and self.scale == (1.0, 1.0) and self.angle == (0.0, 0.0)


NO_TRANSFORMS = TransformConfig(pad=0, jitter=0, scale=(1.0, 1.0), angle=(0.0, 0.0), jitter2=0)


def draw_params(seeds: Sequence[int], steps: int, config: TransformConfig = TransformConfig(),
                device: str | torch.device = "cpu") -> Tensor:
    """Random transform parameters [B, steps, 6] for every image and step, image i from seeds[i] only.

    Drawn on the CPU and moved to `device`, so that every device sees the same numbers.
    Jitters are whole pixels, centred: a crop offset in 0..d becomes a shift in -d/2..d/2.
    """
    rows = []
    for seed in seeds:
        u = torch.rand((steps, N_PARAMS), generator=torch_generator(seed), dtype=torch.float64)
        j1 = torch.floor(u[:, 0:2] * (config.jitter + 1)).clamp_max(config.jitter) - config.jitter / 2
        scale = config.scale[0] + u[:, 2] * (config.scale[1] - config.scale[0])
        angle = config.angle[0] + u[:, 3] * (config.angle[1] - config.angle[0])
        j2 = torch.floor(u[:, 4:6] * (config.jitter2 + 1)).clamp_max(config.jitter2) - config.jitter2 / 2
        rows.append(torch.cat([j1, scale[:, None], angle[:, None], j2], dim=1))
    return torch.stack(rows).float().to(device)


def affine_matrices(params: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, 6] step parameters -> [B, 2, 3] matrices for `F.affine_grid` (output -> input coordinates).

    In centred pixel coordinates, an output pixel v comes from input pixel R(-angle)(v + j2)/scale + j1:
    the second jitter moves the view, rotation and scaling act about the centre, the first jitter
    moves the image under them.
    """
    h, w = size
    hx, hy = w / 2.0, h / 2.0  # D = diag(w/2, h/2): pixels per normalized unit
    scale = params[:, 2]
    theta = params[:, 3] * (math.pi / 180.0)
    cos, sin = torch.cos(theta) / scale, torch.sin(theta) / scale
    j1x, j1y, j2x, j2y = params[:, 1], params[:, 0], params[:, 5], params[:, 4]
    # linear part in normalized coordinates: D^-1 R D / scale; translation D^-1 (R j2 / scale + j1)
    row_x = torch.stack([cos, sin * (hy / hx), (cos * j2x + sin * j2y + j1x) / hx], dim=1)
    row_y = torch.stack([-sin * (hx / hy), cos, (-sin * j2x + cos * j2y + j1y) / hy], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def apply_transforms(images: Tensor, params: Tensor, config: TransformConfig = TransformConfig(),
                     out_size: tuple[int, int] | None = None) -> Tensor:
    """Transform each image of [B, C, H, W] by its row of `params` [B, 6]; differentiable.

    The output has `out_size` (default: the input's size). With all-identity parameters and the
    same size the output equals the input exactly.
    """
    if config.is_identity and (out_size is None or tuple(out_size) == tuple(images.shape[2:])):
        return images
    b, c = images.shape[:2]
    h, w = out_size if out_size is not None else images.shape[2:]
    matrices = affine_matrices(params.to(images.dtype), (int(images.shape[2]), int(images.shape[3])))
    if out_size is not None:  # keep the pixel scale: an output pixel is an input pixel
        ratio = images.new_tensor([w / images.shape[3], h / images.shape[2]])
        matrices = torch.cat([matrices[:, :, :2] * ratio[None, None, :], matrices[:, :, 2:]], dim=2)
    grid = F.affine_grid(matrices, [b, c, int(h), int(w)], align_corners=False)
    if config.pad > 0:
        shifted = images - config.pad_value
        return F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False) \
            + config.pad_value
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


__all__ = ["NO_TRANSFORMS", "TransformConfig", "affine_matrices", "apply_transforms", "draw_params"]
