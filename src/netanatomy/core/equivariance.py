"""Rotation families: units whose weights are rotated copies of each other (equivariance).

First-layer filters can be rotated by any angle (bilinear resampling inside the inscribed
disc, so the kernel's corners, which a rotation moves out of the square, never count). Deeper
layers are compared at multiples of 90 degrees, where the rotation of a kernel is exact
(`torch.rot90`) but its input channels must be mapped too: rotating the input image turns
the feature of lower channel c into that of another channel c'. That map is either given or
estimated from the lower layer itself (`quarter_turn_map`, applied layer after layer from
the image, whose colour channels map to themselves).

Angles are in degrees, counter-clockwise as the kernel is displayed (row 0 at the top), the
convention of `torch.rot90(w, 1, dims=(-2, -1))`. A match is the cosine similarity of the two
weight vectors over all channels and positions compared (not mean-centred: a kernel's mean
is part of what it computes, and a constant blob must match itself); units whose best match
reaches `threshold` are linked, and families are complete-linkage groups of that graph.

Small kernels cannot show small rotations: on a k x k kernel one pixel at the edge of the
inscribed disc subtends atan(2 / (k - 1)) (45 degrees at 3x3, 26.6 at 5x5, 11.3 at 11x11).
Angles are rounded to the largest divisor of 90 degrees within that (`angle_resolution`), and
a member whose angle from the reference rounds to 0 (modulo the period) is a duplicate of it,
not a rotated copy: a family of duplicates only is reported as such. Orientation is measured
from the kernel's power spectrum (`filter_orientation`), which works at 3x3 where comparing a
kernel with itself rotated by 45 degrees does not.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from torch import Tensor

__all__ = [
    "ORIENTED_COHERENCE",
    "RotationFamily",
    "angle_resolution",
    "filter_orientation",
    "expand_channel_map",
    "quarter_turn_map",
    "quarter_turn_scores",
    "rotate_filters",
    "rotation_families",
    "rotation_families_quarter",
    "ring_rotate_3x3",
    "rotation_scores",
]


# a kernel is oriented when its spectrum's energy is at least 3:1 along one axis (coherence 0.5)
ORIENTED_COHERENCE = 0.5
_DIVISORS_OF_90 = (45.0, 22.5, 15.0, 11.25, 7.5, 5.0, 2.5, 1.0)


@dataclass(frozen=True)
class RotationFamily:
    """Units that are rotated copies (or duplicates) of one another.

    units: unit indices; angles: degrees (counter-clockwise) that rotate the reference unit
    onto each member, reduced modulo `period` and rounded to `resolution`; reference: the
    member best matched by the others; period: 360, or 180 / 90 when the reference matches
    itself rotated by that much (an even Gabor is the same filter after 180 degrees), None
    when it has no orientation and matches itself at 45 degrees (a blob); scores: cosine
    similarity of each member with the rotated reference; kind: "rotated", or "duplicates"
    when every member sits at angle 0 (copies, not rotations); duplicates: members other than
    the reference at angle 0; orientation: the reference's orientation in degrees [0, 180)
    (None when not oriented) and coherence: how oriented it is (0 isotropic, 1 a line).
    """

    units: list[int]
    angles: list[float]
    reference: int
    period: float | None
    scores: list[float]
    kind: str = "rotated"
    duplicates: list[int] = field(default_factory=list)
    resolution: float = 1.0
    orientation: float | None = None
    coherence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def angle_resolution(k: int) -> float:
    """The rotation step a k x k kernel can show: the angle one pixel subtends at the edge of
    its inscribed disc, atan(2 / (k - 1)), rounded down to a divisor of 90 degrees."""
    if k < 3:
        return 90.0
    limit = math.degrees(math.atan(2.0 / (k - 1)))
    return next((d for d in _DIVISORS_OF_90 if d <= limit + 1e-9), 1.0)


def filter_orientation(filters: Tensor) -> tuple[Tensor, Tensor]:
    """Orientation (degrees in [0, 180), counter-clockwise from horizontal as displayed) and
    coherence [0, 1] of each filter [U, C, k, k], from the second moments of its power spectrum.

    The power spectrum (summed over input channels) is a distribution over frequency vectors;
    its 2x2 moment matrix has eigenvalues l1 >= l2, coherence = (l1 - l2) / (l1 + l2), and the
    stripes run perpendicular to the main frequency axis. A line, an edge or a Gabor has
    coherence near 1, a blob or centre-surround 0. Works at any kernel size (a 3x3 vertical
    line is oriented at 90 degrees with coherence 1).
    """
    if filters.ndim != 4:
        raise ValueError(f"filters must be [units, C, kh, kw], got shape {tuple(filters.shape)}")
    w = filters.detach().double().cpu()
    kh, kw = w.shape[-2:]
    power = torch.fft.fft2(w).abs().pow(2).sum(dim=1)                      # [U, kh, kw]
    fy = torch.fft.fftfreq(kh, dtype=torch.float64)[:, None].expand(kh, kw)
    fx = torch.fft.fftfreq(kw, dtype=torch.float64)[None, :].expand(kh, kw)
    fy = -fy                                                                # rows grow downwards; angles count upwards
    txx = (power * fx * fx).sum(dim=(1, 2))
    tyy = (power * fy * fy).sum(dim=(1, 2))
    txy = (power * fx * fy).sum(dim=(1, 2))
    trace = txx + tyy
    spread = torch.sqrt(((txx - tyy) / 2) ** 2 + txy ** 2)
    coherence = torch.where(trace > 0, 2 * spread / trace.clamp_min(1e-300), torch.zeros_like(trace))
    axis = 0.5 * torch.atan2(2 * txy, txx - tyy)                            # main frequency axis
    orientation = torch.remainder(torch.rad2deg(axis) + 90.0, 180.0)
    return orientation, coherence.clamp(0.0, 1.0)


def _disc_mask(k: int) -> Tensor:
    coords = torch.linspace(-1.0, 1.0, k, dtype=torch.float64) if k > 1 else torch.zeros(1, dtype=torch.float64)
    return (coords[:, None] ** 2 + coords[None, :] ** 2) <= 1.0 + 1e-9


def rotate_filters(filters: Tensor, angles: Tensor | list[float]) -> Tensor:
    """[U, C, k, k] -> [U, A, C, k, k]: every filter rotated by every angle (degrees, CCW).

    Bilinear resampling about the kernel centre (pixel centres on the [-1, 1] grid, so a
    rotation by 90 degrees equals torch.rot90 exactly); values from outside the kernel are 0.
    """
    if filters.ndim != 4 or filters.shape[-1] != filters.shape[-2]:
        raise ValueError(f"filters must be square [units, C, k, k], got shape {tuple(filters.shape)}")
    w = filters.detach().double().cpu()
    u, c, k, _ = w.shape
    ang = torch.as_tensor(angles, dtype=torch.float64).reshape(-1) * (math.pi / 180.0)
    a = ang.numel()
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(a, 2, 3, dtype=torch.float64)
    # output pixel (x, y) samples the input at the point rotated back by the angle
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    grid = F.affine_grid(theta, [a, c, k, k], align_corners=True)      # [A, k, k, 2]
    grid = grid[None].expand(u, a, k, k, 2).reshape(u * a, k, k, 2)
    src = w[:, None].expand(u, a, c, k, k).reshape(u * a, c, k, k)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(u, a, c, k, k)


def _normalize(x: Tensor) -> Tensor:
    """Scale the last dimension to unit norm (zero vectors stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


_RING_3x3 = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0)]  # the border, clockwise


def ring_rotate_3x3(filters: Tensor, steps: int) -> Tensor:
    """A 3x3 kernel turned by steps * 45 degrees counter-clockwise: its 8 border pixels move
    `steps` places around the ring (two steps are exactly torch.rot90). On a 3x3 kernel this
    uses all 9 pixels, where resampling inside the inscribed disc would keep only 5."""
    flat = [r * 3 + c for r, c in _RING_3x3]
    w = filters.reshape(*filters.shape[:-2], 9)
    out = w.clone()
    for i, pos in enumerate(flat):
        out[..., flat[(i - steps) % 8]] = w[..., pos]
    return out.reshape(filters.shape)


def rotation_scores(filters: Tensor, step: float = 2.5) -> tuple[Tensor, Tensor]:
    """Best match of every filter rotated by any angle with every other filter.

    Returns (score [U, U], angle [U, U]): score[i, j] = max over angles of the cosine
    similarity between filter i rotated by the angle and filter j, inside the inscribed
    disc; angle[i, j] the maximizing angle in [0, 360), refined between grid steps by a
    parabola through the neighbouring scores. 3x3 kernels are turned in 45-degree steps of
    their border ring (`ring_rotate_3x3`), over all 9 pixels.
    """
    w = filters.detach().double().cpu()
    u, c, k, _ = w.shape
    if k == 3:
        rotated = torch.stack([ring_rotate_3x3(w, r) for r in range(8)], dim=1).reshape(u, 8, -1)
        table = torch.einsum("iad,jd->ija", _normalize(rotated), _normalize(w.reshape(u, -1)))
        best, idx = table.max(dim=2)
        return best, idx.double() * 45.0
    grid = torch.arange(0.0, 360.0, step, dtype=torch.float64)
    mask = _disc_mask(k).reshape(-1)
    rotated = rotate_filters(w, grid).reshape(u, len(grid), c, k * k)[..., mask].reshape(u, len(grid), -1)
    plain = w.reshape(u, c, k * k)[..., mask].reshape(u, -1)
    table = torch.einsum("iad,jd->ija", _normalize(rotated), _normalize(plain))   # [U, U, A]
    best, idx = table.max(dim=2)
    left = table.gather(2, ((idx - 1) % len(grid))[..., None])[..., 0]
    right = table.gather(2, ((idx + 1) % len(grid))[..., None])[..., 0]
    curve = left - 2 * best + right
    shift = torch.where(curve < 0, 0.5 * (left - right) / curve.clamp_max(-1e-12), torch.zeros_like(best))
    angle = torch.remainder(grid[idx] + shift.clamp(-0.5, 0.5) * step, 360.0)
    return best, torch.where(angle > 360.0 - 1e-6, torch.zeros_like(angle), angle)


def _self_match(filters: Tensor, angle: float) -> Tensor:
    w = filters.detach().double().cpu()
    u, c, k, _ = w.shape
    if k == 3 and angle % 45.0 == 0:
        rotated = ring_rotate_3x3(w, int(angle // 45.0)).reshape(u, -1)
        return (_normalize(rotated) * _normalize(w.reshape(u, -1))).sum(dim=1)
    mask = _disc_mask(k).reshape(-1)
    rotated = rotate_filters(w, [angle])[:, 0].reshape(u, c, k * k)[..., mask].reshape(u, -1)
    plain = w.reshape(u, c, k * k)[..., mask].reshape(u, -1)
    return (_normalize(rotated) * _normalize(plain)).sum(dim=1)


def _families(score: Tensor, angle: Tensor, threshold: float, min_size: int,
              periods: dict[int, float | None], resolution: float = 1.0,
              orientation: tuple[Tensor, Tensor] | None = None) -> list[RotationFamily]:
    """Complete-linkage groups: every pair of a family matches at `threshold` or better.

    (Connected components would chain: a ~ b and b ~ c would put a and c together even when a
    and c are not rotated copies of each other.)
    """
    sym = 0.5 * (score + score.T)
    n = sym.shape[0]
    if n < 2:
        return []
    dist = np.clip(1.0 - sym.numpy(), 0.0, None)
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="complete")
    labels = fcluster(tree, t=1.0 - threshold, criterion="distance")
    families = []
    for comp in np.unique(labels):
        members = np.flatnonzero(labels == comp)
        if len(members) < min_size:
            continue
        sub = sym[np.ix_(members, members)].clone()
        sub.fill_diagonal_(0.0)
        ref = int(members[int(sub.sum(dim=1).argmax())])
        period = periods.get(ref, 360.0)
        modulus = period if period else 360.0
        angles = []
        for m in members:
            raw = 0.0 if int(m) == ref else float(angle[ref, m]) % modulus
            snapped = (round(raw / resolution) * resolution) % modulus
            angles.append(0.0 if abs(snapped - modulus) < 1e-9 else snapped)
        scores = [1.0 if int(m) == ref else float(score[ref, m]) for m in members]
        order = np.argsort(angles, kind="stable")  # members sorted by their angle from the reference
        units = [int(members[i]) for i in order]
        sorted_angles = [round(angles[i], 3) for i in order]
        duplicates = [u for u, a in zip(units, sorted_angles) if a == 0.0 and u != ref]
        kind = "duplicates" if all(a == 0.0 for a in sorted_angles) else "rotated"
        orient = coh = None
        if orientation is not None:
            coh = round(float(orientation[1][ref]), 4)
            orient = round(float(orientation[0][ref]), 1) if coh >= ORIENTED_COHERENCE else None
        families.append(RotationFamily(units, sorted_angles, ref, period, [scores[i] for i in order], kind,
                                       duplicates, resolution, orient, coh))
    families.sort(key=lambda f: (-len(f.units), f.units[0]))
    return families


def rotation_families(filters: Tensor, *, step: float = 2.5, threshold: float = 0.8,
                      min_size: int = 2) -> list[RotationFamily]:
    """Families of first-layer filters [U, C, k, k] that are rotated copies at any angle.

    Two filters are linked when the mean of their two best rotated matches reaches
    `threshold`; families are complete-linkage groups (every pair linked) of at least
    `min_size` units. Angles are rounded to `angle_resolution(k)`; a filter has no
    orientation (period None) only when it is not oriented (`filter_orientation`) and matches
    itself rotated by 45 degrees.
    """
    score, angle = rotation_scores(filters, step)
    orient = filter_orientation(filters)
    self45, self90, self180 = (_self_match(filters, a) for a in (45.0, 90.0, 180.0))
    periods: dict[int, float | None] = {}
    for i in range(filters.shape[0]):
        oriented = float(orient[1][i]) >= ORIENTED_COHERENCE
        if self45[i] >= threshold and not oriented:
            periods[i] = None
        elif self90[i] >= threshold and not oriented:
            periods[i] = 90.0
        elif self180[i] >= threshold:
            periods[i] = 180.0
        else:
            periods[i] = 360.0
    resolution = max(angle_resolution(int(filters.shape[-1])), step)
    return _families(score, angle, threshold, min_size, periods, resolution, orient)


def expand_channel_map(input_map: Tensor | None, channels: int) -> Tensor:
    """[4, C] channel map per quarter turn (-1 where a channel has no rotated counterpart) from
    None (identity), a [C] map for 90 degrees (composed for 180 and 270), [3, C] or [4, C]."""
    ident = torch.arange(channels)
    if input_map is None:
        return ident.expand(4, channels).clone()
    m = torch.as_tensor(input_map, dtype=torch.int64)
    if m.ndim == 1:                                                      # a map for 90 degrees: compose it
        if m.numel() != channels:
            raise ValueError(f"channel map has {m.numel()} entries for {channels} input channels")
        maps = [ident, m]
        for _ in range(2):
            prev = maps[-1]
            maps.append(torch.where(prev >= 0, m[prev.clamp_min(0)], torch.full_like(prev, -1)))
        return torch.stack(maps)
    if m.shape == (3, channels):
        return torch.cat([ident[None], m])
    if m.shape == (4, channels):
        return m
    raise ValueError(f"channel map must be [C], [3, C] or [4, C] for C={channels}, got shape {tuple(m.shape)}")


def quarter_turn_scores(weights: Tensor, input_map: Tensor | None = None) -> Tensor:
    """[U, U, 4]: cosine similarity of unit i rotated by r*90 degrees with unit j.

    Rotating unit i's kernel by r quarter turns, its input channel c becomes input_map[r, c]
    (the channel that sees the rotated version of c's feature); unmapped channels (-1) are
    left out of the comparison. input_map None: channels map to themselves (true for an
    image's colour channels).
    """
    w = weights.detach().double().cpu()
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"weights must be square [units, C, k, k], got shape {tuple(w.shape)}")
    u, c = w.shape[:2]
    maps = expand_channel_map(input_map, c)
    out = torch.empty(u, u, 4, dtype=torch.float64)
    for r in range(4):
        valid = maps[r] >= 0
        src = torch.nonzero(valid)[:, 0]
        dst = maps[r][src]
        rotated = torch.rot90(w[:, src], r, dims=(2, 3)).reshape(u, -1)
        target = w[:, dst].reshape(u, -1)
        out[:, :, r] = _normalize(rotated) @ _normalize(target).T
    return out


def quarter_turn_map(weights: Tensor, input_map: Tensor | None = None, *, threshold: float = 0.8) -> Tensor:
    """[4, U]: for each quarter turn, the unit that is this unit rotated (-1 where none reaches
    `threshold`). Feed it as `input_map` of the next layer to compare that layer's units."""
    scores = quarter_turn_scores(weights, input_map)
    best, idx = scores.max(dim=1)                                        # [U, 4]
    return torch.where(best >= threshold, idx, torch.full_like(idx, -1)).T.contiguous()


def rotation_families_quarter(weights: Tensor, input_map: Tensor | None = None, *, threshold: float = 0.8,
                              min_size: int = 2) -> list[RotationFamily]:
    """Families of units [U, C, k, k] that are copies of each other rotated by multiples of 90
    degrees, input channels mapped by `input_map` (see `quarter_turn_scores`)."""
    scores = quarter_turn_scores(weights, input_map)
    u = scores.shape[0]
    eye = torch.eye(u, dtype=torch.bool)
    turns = scores[:, :, 1:].clone()
    best, idx = torch.cat([scores[:, :, :1].masked_fill(eye[..., None], -2.0), turns], dim=2).max(dim=2)
    angle = idx.double() * 90.0
    periods: dict[int, float | None] = {}
    for i in range(u):
        if scores[i, i, 1] >= threshold:
            periods[i] = 90.0
        elif scores[i, i, 2] >= threshold:
            periods[i] = 180.0
        else:
            periods[i] = 360.0
    return _families(best, angle, threshold, min_size, periods, 90.0)
