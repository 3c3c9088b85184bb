"""Weight banding score: how much of a layer's kernel variation is horizontal or vertical bands.

Every kernel K = W[o, i] (kh x kw) is decomposed about its mean as in a two-way ANOVA:
row SS (variation of the row means: constant along x, varying along y, i.e. horizontal
bands), column SS (vertical bands) and the rest. Over a layer

    H = sum of row SS / sum of total SS,     V = sum of column SS / sum of total SS,

and for i.i.d. noise E[H] = (kh-1)/(kh*kw-1), E[V] = (kw-1)/(kh*kw-1) (the ANOVA degrees of
freedom). The p-values come from a permutation null that shuffles the positions inside every
kernel independently.

Why it is fast: under that null the denominator is fixed, so a replicate of H is a sum over
kernels of each kernel's row SS after its own shuffle.
- Each kernel's row and column SS are computed once for a pool of M random position
  permutations; a replicate then picks one of those M values per kernel instead of
  re-shuffling the weights. For kernels of up to 49 positions (7x7) the pool values are one
  small matrix product over the kernel's P(P+1)/2 pairwise products. Larger kernels (a linear
  layer reading an unpooled map, scored as [units, C, h, w]) gather each permuted kernel and
  take its row and column sums as segment sums: O(P) per kernel and permutation, in slices
  of at most 2^24 values, so time and memory grow linearly with the positions (the pairwise
  tables grow as P^2: a 28x28 map took 29 s and 5.4 GB, now 0.2 s). Both ways give the same
  numbers up to float32 rounding, from the same random stream.
- Kernels are dealt into groups of up to M (at least 256 groups remain): in a replicate the
  j-th kernel of a group takes pool permutation (i + j) mod M for the group's random index i,
  so kernels of a group always get distinct permutations, and a group has M possible values,
  summed once. M replicates at a time then cost one scatter-add of the groups into bins
  (or, with fewer groups than M in a chunk, one gather of each group's values).
- A pool shared by all replicates would shift the whole null by its sampling error (about
  1/sqrt(M) null standard deviations, however many kernels), so each kernel's pool values
  are re-centred on the exact null mean, total SS * (kh-1)/(kh*kw-1); what remains is a
  relative error of about sqrt(2 / (M * groups)) in the null variance. M is about
  2^16 / kernels, between 64 and 1024.
The replicates are thus, for practical purposes, independent draws from the within-kernel
permutation null (checked against fresh per-kernel shuffles in the tests and the
benchmark, and for calibration on i.i.d. layers). The p-value is
(#{null >= observed} + 1) / (n + 1): its resolution is 1 / (n + 1), 0.001 by default.

Orientation rule: with excess_h = (H - E[H]) / (1 - E[H]) (0 at chance, 1 when every kernel
is a pure row pattern) and excess_v likewise, a layer is "horizontal" when
p_horizontal <= alpha and excess_h - excess_v >= margin, "vertical" symmetrically, "none"
otherwise (defaults alpha = 0.01, margin = 0.1): banding must be significant AND clearly
stronger along one axis, so smooth, isotropic kernels (whose H and V both rise) are "none".
The reported p_value is that of the axis with the larger excess.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import norm
from torch import Tensor

from ..util.progress import progress

# Pool values by pairwise products (one matrix product, P(P+1)/2 pairs) up to this many
# positions per kernel, by gathering the permuted kernels (O(P)) above it.
_PAIRWISE_MAX_POSITIONS = 49
# At most this many float32 values in one gathered slice of permuted kernels (64 MB).
_GATHER_BUDGET = 1 << 24
# A progress bar only for a layer with at least this many gathered values (about a second).
_PROGRESS_MIN_WORK = 1 << 28

__all__ = [
    "BandingScore",
    "AxisTest",
    "anova_ss",
    "axis_test",
    "banding_score",
    "expected_shares",
    "orientation",
]


@dataclass(frozen=True)
class BandingScore:
    """The banding of one layer. Fields are None for a skipped layer (see `skipped`)."""

    horizontal: float | None
    vertical: float | None
    index: float | None
    orientation: str
    p_value: float | None
    p_horizontal: float | None
    p_vertical: float | None
    z_horizontal: float | None
    z_vertical: float | None
    expected_h: float | None
    expected_v: float | None
    kernel: tuple[int, int]
    n_kernels: int
    n_permutations: int
    resolution: float | None
    method: str
    skipped: str | None = None
    # H and V weigh each kernel by its energy; these say how many kernels carry that energy
    # and what the kernels do unweighted (on a real layer a few loud kernels can set the score)
    effective_kernels: float | None = None     # (sum SS)^2 / sum SS^2: kernels of equal energy that would give it
    share_h_over_v: float | None = None        # share of non-constant kernels whose own H exceeds their own V
    mean_h: float | None = None                # unweighted mean of per-kernel H
    mean_v: float | None = None                # unweighted mean of per-kernel V

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kernel"] = list(self.kernel)
        return out


def expected_shares(kh: int, kw: int) -> tuple[float, float]:
    """Chance values (E[H], E[V]) for i.i.d. kernels: the row and column degrees of freedom."""
    dof = kh * kw - 1
    if dof <= 0:
        return math.nan, math.nan
    return (kh - 1) / dof, (kw - 1) / dof


def _as_kernels(weights: Tensor) -> Tensor:
    if weights.ndim == 4:
        return weights.reshape(-1, weights.shape[-2], weights.shape[-1])
    if weights.ndim == 3:
        return weights
    raise ValueError(f"weights must be [units, C_in, kh, kw] or [kernels, kh, kw], got shape {tuple(weights.shape)}")


def anova_ss(weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per kernel (row SS, column SS, total SS) about the kernel's mean, all [N] in float64."""
    k = _as_kernels(weights.detach()).double()
    kh, kw = k.shape[-2:]
    centred = k - k.mean(dim=(-2, -1), keepdim=True)
    row = kw * centred.mean(dim=-1).pow(2).sum(dim=-1)
    col = kh * centred.mean(dim=-2).pow(2).sum(dim=-1)
    total = centred.pow(2).sum(dim=(-2, -1))
    return row, col, total


def orientation(h: float, v: float, p_h: float, p_v: float, kh: int, kw: int, *,
                alpha: float = 0.01, margin: float = 0.1) -> str:
    """'horizontal', 'vertical' or 'none' by the rule in the module docstring."""
    eh, ev = expected_shares(kh, kw)
    excess_h = (h - eh) / (1 - eh) if eh < 1 else 0.0
    excess_v = (v - ev) / (1 - ev) if ev < 1 else 0.0
    if p_h <= alpha and excess_h - excess_v >= margin:
        return "horizontal"
    if p_v <= alpha and excess_v - excess_h >= margin:
        return "vertical"
    return "none"


def _pair_weights(perms: np.ndarray, kh: int, kw: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column SS of every permuted kernel as one linear map of pairwise products.

    For a centred kernel x and a permutation s, row SS = (1/kw) sum over rows of (the sum of
    the values s sends into that row)^2 = sum_{a<=b} c_ab x_a x_b [s(a), s(b) share a row],
    c_aa = 1/kw, c_ab = 2/kw. Returns [P, T] selections A, B (with the centring folded in) so
    that (x @ A) * (x @ B) are the T = P(P+1)/2 pairwise products of the centred kernel, and
    a [T, 2M] map to (row SS, column SS) under each pool permutation m (columns 2m, 2m+1).
    """
    m, p = perms.shape
    a, b = np.triu_indices(p)
    weight = np.where(a == b, 1.0, 2.0)
    rows, cols = perms // kw, perms % kw                                # [M, P]: new row / column of each position
    mat = np.empty((len(a), m, 2), dtype=np.float32)
    mat[:, :, 0] = ((rows[:, a] == rows[:, b]) * weight / kw).T
    mat[:, :, 1] = ((cols[:, a] == cols[:, b]) * weight / kh).T
    centre = np.eye(p) - 1.0 / p
    return (torch.from_numpy((centre[:, a]).astype(np.float32)), torch.from_numpy((centre[:, b]).astype(np.float32)),
            torch.from_numpy(mat.reshape(len(a), 2 * m)))


def _gather_ss(centred: Tensor, inverse: Tensor, kh: int, kw: int, budget: int) -> Tensor:
    """[c, M, 2]: (row SS, column SS) of each centred kernel [c, P] under each pool permutation.

    `inverse` [M, P] holds, for each permutation s and each position b, the position a with
    s(a) = b, so gathering a kernel by it lays out the permuted kernel; its row and column SS
    are segment sums over positions, O(P) per kernel and permutation. Permutations are taken
    in slices so that a gathered slice holds at most `budget` values.
    """
    c, p = centred.shape
    m = inverse.shape[0]
    out = torch.empty(c, m, 2, dtype=centred.dtype)
    step = max(1, budget // max(1, c * p))
    for s in range(0, m, step):
        idx = inverse[s:s + step]
        y = centred.index_select(1, idx.reshape(-1)).view(c, idx.shape[0], kh, kw)
        out[:, s:s + step, 0] = y.sum(dim=-1).pow_(2).sum(dim=-1).div_(kw)
        out[:, s:s + step, 1] = y.sum(dim=-2).pow_(2).sum(dim=-1).div_(kh)
    return out


def _group_values(ss: Tensor, group: int, shift: Tensor) -> Tensor:
    """[groups, M, 2]: the values a group of kernels can take in one replicate.

    Kernels are dealt, in order, into groups of `group` (<= M); in a replicate the j-th kernel
    of a group takes pool permutation (i + j) mod M for the group's index i, so the kernels of
    a group always get distinct pool permutations. Summing each group's kernels for each of
    the M values of i leaves one row of M values per group. `shift` [c, 2] is added to every
    value of each kernel (the correction of its pool mean).
    """
    c, m, _ = ss.shape
    groups = -(-c // group)
    if c % group:
        ss = torch.cat([ss, ss.new_zeros(groups * group - c, m, 2)])
        shift = torch.cat([shift, shift.new_zeros(groups * group - c, 2)])
    by_slot = ss.view(groups, group, m, 2)
    out = by_slot[:, 0].clone()
    for j in range(1, group):                                           # out[:, i] += slot j at (i + j) mod M
        out[:, : m - j] += by_slot[:, j, j:]
        out[:, m - j:] += by_slot[:, j, :j]
    return out + shift.view(groups, group, 2).sum(dim=1)[:, None, :]


def _replicate_sums(values: Tensor, blocks: int, rng: np.random.Generator) -> Tensor:
    """[blocks*M, 2] replicate sums of (row, col) SS, every group at an independent random index.

    values [G, M, 2]. Within a block of M replicates group g takes index (j + a_g) mod M in
    replicate j, with a_g uniform and independent across groups and blocks: in every replicate
    the groups' indices are independent and uniform. With at least M groups a block costs one
    scatter-add of the groups into M bins by a_g, then one [M, M] gather (O(G*M + M^2));
    with fewer (a layer of large kernels, dealt in small chunks) each group's M values are
    gathered at their own indices (O(G*M)). Both sum the same values.
    """
    g, m, _ = values.shape
    out = torch.empty(blocks, m, 2, dtype=torch.float64)
    ramp = torch.arange(m)
    if g >= m:
        shift = ((ramp[:, None] + ramp[None, :]) % m)[:, :, None].expand(m, m, 2)
    for blk in range(blocks):
        offsets = torch.from_numpy(rng.integers(0, m, size=g))
        if g >= m:
            bins = torch.zeros(m, m, 2).index_add_(0, offsets, values)       # [offset, index, 2]
            out[blk] = bins.gather(1, shift).double().sum(dim=0)             # replicate j: index (j + o) mod M
        else:
            index = ((offsets[:, None] + ramp[None, :]) % m)[:, :, None].expand(g, m, 2)
            out[blk] = values.gather(1, index).double().sum(dim=0)
    return out.view(blocks * m, 2)


def _skipped(reason: str, kh: int, kw: int, n: int, method: str) -> BandingScore:
    eh, ev = expected_shares(kh, kw)
    finite = not math.isnan(eh)
    return BandingScore(None, None, None, "none", None, None, None, None, None,
                        eh if finite else None, ev if finite else None, (kh, kw), n, 0, None, method, reason)


def banding_score(weights: Tensor, *, n_permutations: int = 999, seed: int = 0, alpha: float = 0.01,
                  margin: float = 0.1, method: Literal["permutation", "normal"] = "permutation",
                  pool: int | None = None, chunk: int = 16384, show_progress: bool = False,
                  _path: Literal["pairwise", "gather"] | None = None) -> BandingScore:
    """Banding of a layer's weights [units, C_in, kh, kw] (or [kernels, kh, kw]).

    method 'permutation' (default): Monte Carlo p-values from `n_permutations` replicates of
    the within-kernel permutation null (resolution 1 / (n + 1)). 'normal': the null's exact
    mean and its variance estimated on the pool, with a normal tail: no replicates.
    z scores (excess over chance in null standard deviations) are reported either way.
    `pool` (rounded up to a power of two) is the number of random permutations per layer;
    by default about 2^16 / kernels, between 64 and 1024, so that a small layer gets many.
    `show_progress`: a bar on stderr (util.progress) for a layer large enough to wait on.
    `_path` forces the pool's evaluation ('pairwise' or 'gather', see the module docstring);
    both give the same numbers up to float32 rounding.
    """
    if method not in ("permutation", "normal"):
        raise ValueError(f"method must be 'permutation' or 'normal', got {method!r}")
    if method == "permutation" and n_permutations < 1:
        raise ValueError("n_permutations must be >= 1")
    kernels = _as_kernels(weights.detach()).cpu()
    n, kh, kw = kernels.shape
    if kh * kw == 1:
        return _skipped("1x1 kernels have no spatial structure", kh, kw, n, method)
    if kh == 1 or kw == 1:
        return _skipped(f"{kh}x{kw} kernels have a single row or column: no two-way decomposition", kh, kw, n, method)
    if n == 0:
        return _skipped("no kernels", kh, kw, n, method)
    p = kh * kw
    rng = np.random.default_rng(seed)
    if pool is None:
        pool = min(1024, max(64, (1 << 16) // n))
    pool = 1 << max(1, int(pool - 1).bit_length())
    perms = np.argsort(rng.random((pool, p)), axis=1)
    pairwise = p <= _PAIRWISE_MAX_POSITIONS if _path is None else _path == "pairwise"
    pairs_per_kernel = p * (p + 1) // 2                                # the chunk size below depends on it in
    if pairwise:                                                       # both paths, so they draw the same stream
        sel_a, sel_b, pair_map = _pair_weights(perms, kh, kw)
        pool_mean = pair_map.view(-1, pool, 2).mean(dim=1)             # [pairs, 2]: pool mean as a linear map
    else:
        inverse = torch.from_numpy(np.argsort(perms, axis=1))          # [M, P]: where each position's value comes from
    n_rep = n_permutations if method == "permutation" else 0
    blocks = -(-n_rep // pool)
    null = torch.zeros(blocks * pool, 2, dtype=torch.float64)
    pool_var = torch.zeros(2, dtype=torch.float64)                      # sum over kernels of pool variances
    observed = torch.zeros(3, dtype=torch.float64)                     # row SS, column SS, total SS
    per_kernel = torch.zeros(5, dtype=torch.float64)                   # sum SS^2, #H>V, sum h, sum v, #non-constant
    exact_share = torch.tensor(expected_shares(kh, kw), dtype=torch.float32)
    flat = kernels.reshape(n, p)
    group = min(pool, max(1, n // 256))                                # keep >= 256 independent groups
    chunk = max(group, min(chunk, (1 << 22) // (pairs_per_kernel + 4 * pool)) // group * group)
    work = n * pool * p                                                # gathered values, for the progress bar
    bar = progress(total=n, desc=f"banding {kh}x{kw}", unit="kernel",
                   disable=None if show_progress and work >= _PROGRESS_MIN_WORK else True)
    try:
        for start in range(0, n, chunk):
            block = flat[start:start + chunk]
            centred = block.double()
            centred = centred - centred.mean(dim=1, keepdim=True)
            grid = centred.view(-1, kh, kw)
            row_ss = grid.sum(dim=2).pow_(2).sum(dim=1) / kw
            col_ss = grid.sum(dim=1).pow_(2).sum(dim=1) / kh
            observed[0] += row_ss.sum()
            observed[1] += col_ss.sum()
            kernel_ss = centred.pow(2).sum(dim=1)
            observed[2] += kernel_ss.sum()
            live = kernel_ss > 0
            per_kernel[0] += kernel_ss.pow(2).sum()
            per_kernel[1] += (row_ss[live] > col_ss[live]).sum()
            per_kernel[2] += (row_ss[live] / kernel_ss[live]).sum()
            per_kernel[3] += (col_ss[live] / kernel_ss[live]).sum()
            per_kernel[4] += live.sum()
            if pairwise:
                block = block.float()
                pairs = (block @ sel_a) * (block @ sel_b)                    # [c, pairs] products of the centred kernel
                ss = (pairs @ pair_map).view(-1, pool, 2)                    # (row, col) SS per pool permutation
                ss_mean = pairs @ pool_mean
            else:
                ss = _gather_ss(centred.float(), inverse, kh, kw, _GATHER_BUDGET)
                ss_mean = ss.mean(dim=1)
            # each kernel's pool values re-centred on the exact null mean (total SS times the
            # degrees-of-freedom share): the shared pool then shifts no replicate
            shift = kernel_ss.float()[:, None] * exact_share - ss_mean
            if n_rep:
                null += _replicate_sums(_group_values(ss, group, shift), blocks, rng)
            else:
                pool_var += ss.double().var(dim=1, unbiased=False).sum(dim=0)
            bar.update(block.shape[0])
    finally:
        bar.close()
    denom = float(observed[2])
    if denom <= 0:
        return _skipped("all kernels are constant", kh, kw, n, method)
    h_obs, v_obs = float(observed[0]) / denom, float(observed[1]) / denom
    eh, ev = expected_shares(kh, kw)
    if n_rep:
        null = null[:n_rep] / denom
        slack = 1e-6 * max(h_obs, v_obs)                                 # the null is summed in float32
        p_h = (int((null[:, 0] >= h_obs - slack).sum()) + 1) / (n_rep + 1)
        p_v = (int((null[:, 1] >= v_obs - slack).sum()) + 1) / (n_rep + 1)
        sd_h, sd_v = (float(null[:, 0].std()), float(null[:, 1].std())) if n_rep > 1 else (math.nan, math.nan)
        resolution = 1.0 / (n_rep + 1)
    else:
        sd_h, sd_v = math.sqrt(float(pool_var[0])) / denom, math.sqrt(float(pool_var[1])) / denom
        p_h = float(norm.sf((h_obs - eh) / sd_h)) if sd_h > 0 else float(h_obs <= eh)
        p_v = float(norm.sf((v_obs - ev) / sd_v)) if sd_v > 0 else float(v_obs <= ev)
        resolution = None
    z_h = (h_obs - eh) / sd_h if sd_h > 0 else math.nan
    z_v = (v_obs - ev) / sd_v if sd_v > 0 else math.nan
    excess_h = (h_obs - eh) / (1 - eh)
    excess_v = (v_obs - ev) / (1 - ev)
    return BandingScore(
        horizontal=h_obs, vertical=v_obs, index=h_obs - v_obs,
        orientation=orientation(h_obs, v_obs, p_h, p_v, kh, kw, alpha=alpha, margin=margin),
        p_value=p_h if excess_h >= excess_v else p_v, p_horizontal=p_h, p_vertical=p_v,
        z_horizontal=z_h, z_vertical=z_v, expected_h=eh, expected_v=ev, kernel=(kh, kw),
        n_kernels=n, n_permutations=n_rep, resolution=resolution, method=method,
        effective_kernels=denom ** 2 / float(per_kernel[0]), share_h_over_v=float(per_kernel[1] / per_kernel[4]),
        mean_h=float(per_kernel[2] / per_kernel[4]), mean_v=float(per_kernel[3] / per_kernel[4]))


@dataclass(frozen=True)
class AxisTest:
    """Is a layer's banding along one axis more than along the other? (H - V against unit transposes)"""

    index: float | None        # H - V of the layer (energy-weighted, as in BandingScore)
    p: float | None            # two-sided, +1 rule
    z: float | None            # index in null standard deviations
    units: int
    draws: int
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def axis_test(weights: Tensor, *, draws: int = 9999, seed: int = 0) -> AxisTest:
    """H - V of square kernels [units, C_in, k, k] against random transposes of whole units.

    Why this null and not the position permutations of `banding_score`: those destroy smooth
    kernels' correlations, so smooth but isotropic layers (H and V both above chance) look
    banded along whichever axis happens to lead. Under "no preferred axis" a unit's weights and
    their transpose (every kernel of the unit transposed) are equally likely, so each unit's
    share of row SS - column SS is symmetric about 0; flipping the signs of a random subset of
    units gives the null of H - V. Units, not kernels, are flipped: a unit's kernels are learned
    together and are not independent draws.
    """
    w = weights.detach().cpu().double()
    if w.ndim != 4:
        raise ValueError(f"axis_test needs [units, C_in, kh, kw] weights, got shape {tuple(w.shape)}")
    units, _, kh, kw = w.shape
    if kh != kw or kh < 2:
        return AxisTest(None, None, None, units, 0, f"{kh}x{kw} kernels: transposes need square kernels of 2x2 or more")
    centred = w - w.mean(dim=(2, 3), keepdim=True)
    row = centred.sum(dim=3).pow(2).sum(dim=2) / kw             # [units, C_in]
    col = centred.sum(dim=2).pow(2).sum(dim=2) / kh
    total = float(centred.pow(2).sum())
    if total <= 0:
        return AxisTest(None, None, None, units, 0, "all kernels are constant")
    d = ((row - col).sum(dim=1) / total).numpy()                # each unit's share of H - V
    from .stats import null_test

    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(int(draws), units))
    null = signs @ d
    observed = float(d.sum())
    test = null_test(abs(observed), np.abs(null), tail="right")
    sd = float(null.std())
    return AxisTest(observed, test.p, observed / sd if sd > 0 else None, units, int(draws))

