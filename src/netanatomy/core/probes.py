"""Categories of units without hand labels: numbers from responses to probe stimuli and from
first-layer weights, each with a null that says when a number is more than chance.

Pure NumPy on response arrays (rows = stimuli, columns = units); no models. The stimuli come
from `data/probes.py`, the responses from activation capture, the p-values from `core/stats.py`.

- Colour selectivity: a unit's response to an image against its response to the grey version
  of that image. Null: sign flips of the per-image differences (under "colour does not
  matter" each difference is as likely to have either sign).
- Grating tuning: mean response per (orientation, frequency) over phases, the preferred
  orientation and frequency, the orientation selectivity index (OSI). Null: the same procedure
  with the orientation labels shuffled across the (orientation, phase) responses of each
  frequency.
- Filter colourfulness (a layer that reads the image): null = the exact distribution of the
  colourfulness of a filter of the same shape with iid Gaussian weights, Beta((C-1)hw/2, hw/2).

A category needs both a significant test (Benjamini-Hochberg q <= alpha across the layer's
units) and an effect size above a stated floor, because with exact (noise-free) stimuli a
tiny but consistent effect is significant without being a property worth naming.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps

from ..errors import UsageError
from .filters import colourfulness, spatial_frequency
from .stats import benjamini_hochberg, percentile_pvalue

__all__ = [
    "ALPHA", "DRAWS", "MIN_COLOUR_EFFECT", "MIN_FREQUENCY_MODULATION", "MIN_OSI", "ColourSelectivity",
    "FilterProperties", "GratingTuning", "colour_index", "colour_selectivity", "colourfulness_null",
    "filter_properties", "grating_tuning", "orientation_selectivity",
]

ALPHA = 0.05                    # false discovery rate of every category's test
DRAWS = 999                     # draws of every sampled null (p resolution 1/1000)
MIN_COLOUR_EFFECT = 0.1         # |colour selectivity|: the colour image gives ~22 % more (or less) response
MIN_OSI = 0.2                   # OSI floor of "oriented"
MIN_FREQUENCY_MODULATION = 1 / 3  # (max - min) / (max + min) over frequencies: preferred >= 2x the worst
_NULL_BYTES = 64 * 2**20        # memory of one chunk of permuted responses
_TIE = 1e-6                     # null values this close to the observation count as ties (float32 nulls)
_ROUNDING = 1e-5                # responses below this share of a unit's largest count as zero (float32 sums)


def _bh_mask(q: np.ndarray, alpha: float) -> np.ndarray:
    return np.nan_to_num(q, nan=1.0) <= alpha


def _draws_text(draws: int, units: int, alpha: float) -> str:
    total = max(draws, int(np.ceil(units / alpha)))
    return f"{draws} draws" + (f"; {total} for a unit past the floor that beats them all" if total > draws else "")


def _sampled_pvalues(observed: np.ndarray, simulate, draws: int, alpha: float, refine: np.ndarray) -> np.ndarray:
    """Right-tail p per unit (+1 rule) against `simulate(units, n)` -> null [len(units), n].

    Every unit gets `draws` draws. One that beats all of them (p = 1 / (draws + 1)) and is in
    `refine` (its effect is large enough to name) gets more, up to ceil(U / alpha) in all: with
    999 draws alone the floor 0.001 times U units is above alpha once U > 50, and BH could then
    call no category with fewer than U / 50 members. Still a valid p: for every t, {p <= t}
    lies inside the first stage's {p <= t}, or (below the floor) inside the event of a test
    with all the draws, whichever units are refined. A null value
    equal to the observation up to rounding (the same numbers summed in another order) counts
    as a tie, so a unit whose statistic no shuffle can change gets p = 1, not the floor.
    """
    units = observed.shape[0]
    observed = observed - _TIE * np.maximum(np.abs(observed), 1.0)   # a draw equal up to rounding counts as a tie
    first = simulate(np.arange(units), draws)
    p = np.asarray(percentile_pvalue(observed, first, tail="right"), dtype=np.float64).reshape(units)
    total = max(draws, int(np.ceil(units / alpha)))
    top = np.flatnonzero((p <= 1.0 / (draws + 1)) & refine)
    group = max(1, _NULL_BYTES // (8 * total))
    for start in range(0, top.size if total > draws else 0, group):
        chosen = top[start:start + group]
        null = np.concatenate([first[chosen], simulate(chosen, total - draws)], axis=1)
        p[chosen] = percentile_pvalue(observed[chosen], null, tail="right")
    return p


# ---------------------------------------------------------------------------------------------
# Colour selectivity


def colour_index(colour: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """Per image and unit, (r(x) - r(grey x)) / (|r(x)| + |r(grey x)|) in [-1, 1]; 0/0 gives 0.

    Normalized per image so that a unit's few strong images do not outweigh the rest, and
    bounded so that units of any scale compare.
    """
    colour = np.asarray(colour, dtype=np.float64)
    grey = np.asarray(grey, dtype=np.float64)
    if colour.shape != grey.shape or colour.ndim != 2:
        raise UsageError(f"colour and grey responses must both be [images, units]; got {colour.shape} and {grey.shape}")
    # a response within float32 rounding of zero (a grey-blind unit's "response" to a grey image
    # summed in another order) is zero: else 0/0 cases become +-1 by the sign of rounding noise
    scale = np.maximum(np.abs(colour).max(axis=0, initial=0.0), np.abs(grey).max(axis=0, initial=0.0))
    tol = _ROUNDING * scale
    colour = np.where(np.abs(colour) <= tol, 0.0, colour)
    grey = np.where(np.abs(grey) <= tol, 0.0, grey)
    denom = np.abs(colour) + np.abs(grey)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, (colour - grey) / np.where(denom > 0, denom, 1.0), 0.0)


@dataclass(frozen=True)
class ColourSelectivity:
    """Colour selectivity of each unit with its two-sided sign-flip p and BH q across units."""

    selectivity: np.ndarray  # [U] mean colour index over images
    p: np.ndarray            # [U] two-sided, +1 rule
    q: np.ndarray            # [U] Benjamini-Hochberg over the layer's units
    images: int
    draws: int
    alpha: float = ALPHA
    min_effect: float = MIN_COLOUR_EFFECT

    def categories(self) -> dict[str, np.ndarray]:
        significant = _bh_mask(self.q, self.alpha)
        return {
            "colour": significant & (self.selectivity >= self.min_effect),
            "prefers grey": significant & (self.selectivity <= -self.min_effect),
        }

    def rules(self) -> dict[str, str]:
        test = (f"BH q <= {self.alpha:g} across the layer's units, two-sided sign-flip null over "
                f"{self.images} images ({_draws_text(self.draws, self.p.size, self.alpha)})")
        return {
            "colour": f"colour selectivity >= {self.min_effect:g} (responds more to an image than to its grey "
                      f"version) and {test}",
            "prefers grey": f"colour selectivity <= -{self.min_effect:g} (responds more to the grey version) and "
                            f"{test}",
        }


def colour_selectivity(colour: np.ndarray, grey: np.ndarray, *, draws: int = DRAWS, seed: int = 0,
                       alpha: float = ALPHA, min_effect: float = MIN_COLOUR_EFFECT) -> ColourSelectivity:
    """Mean colour index per unit, tested against sign flips of the per-image indices.

    Under "colour does not matter to this unit" an image and its grey version are
    exchangeable, so each image's index is symmetric about 0: flipping the signs of a random
    subset of images (one set of flips per draw, shared by all units) gives the null of the
    mean. Two-sided: |mean| against |null mean|, p by the +1 rule, BH across units.
    """
    d = colour_index(colour, grey)
    n = d.shape[0]
    if n < 1:
        raise UsageError("the colour probe needs at least one image")
    observed = d.mean(axis=0)
    rng = np.random.default_rng(seed)

    def simulate(units: np.ndarray, count: int) -> np.ndarray:       # |mean of sign-flipped d| [units, count]
        signs = rng.choice(np.array([-1.0, 1.0]), size=(count, n))
        return np.abs(signs @ d[:, units]).T / n

    p = _sampled_pvalues(np.abs(observed), simulate, int(draws), alpha, np.abs(observed) >= min_effect)
    return ColourSelectivity(observed, p, benjamini_hochberg(p), n, int(draws), alpha, min_effect)


# ---------------------------------------------------------------------------------------------
# Grating tuning


def orientation_selectivity(tuning: np.ndarray, orientations_deg: np.ndarray) -> np.ndarray:
    """OSI = |sum_k r_k exp(2i theta_k)| / sum_k r_k over the last axis, r rectified; 0 when sum r = 0.

    The doubled angle makes orientations 180 degrees apart the same: 1 for a unit that answers
    one orientation only, 0 for one that answers all alike.
    """
    r = np.maximum(np.asarray(tuning), 0.0)
    angle = 2 * np.deg2rad(np.asarray(orientations_deg, dtype=np.float64))
    total = r.sum(axis=-1, dtype=np.float64)
    vector = np.hypot(r @ np.cos(angle).astype(r.dtype), r @ np.sin(angle).astype(r.dtype))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, vector / np.where(total > 0, total, 1.0), 0.0)


def _grid(info: Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(orientation, frequency, phase) index of each stimulus, checked to be a full grid."""
    try:
        idx = [np.asarray(info[k], dtype=np.int64) for k in ("orientation_index", "frequency_index", "phase_index")]
    except KeyError as exc:
        raise UsageError(f"grating info lacks {exc.args[0]!r}: pass the info dict of data.probes.gratings") from None
    shape = tuple(int(i.max()) + 1 for i in idx)
    if any(i.shape != (n,) for i in idx) or n != int(np.prod(shape)) or \
            np.unique(np.ravel_multi_index(idx, shape)).size != n:
        raise UsageError("grating responses must cover every (orientation, frequency, phase) once, "
                         "as data.probes.gratings makes them")
    return (*idx, np.asarray(shape))


def _first(values: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size)
    out[index] = values
    return out


@dataclass(frozen=True)
class GratingTuning:
    """Tuning of each unit to achromatic gratings, with the OSI and its permutation test."""

    tuning: np.ndarray                     # [U, O, F] mean response over phases
    orientations_deg: np.ndarray           # [O]
    frequencies: np.ndarray                # [F] cycles per image
    cycles_per_pixel: np.ndarray           # [F]
    preferred_orientation_deg: np.ndarray  # [U]
    preferred_frequency: np.ndarray        # [U] cycles per image
    preferred_cycles_per_pixel: np.ndarray  # [U]
    osi: np.ndarray                        # [U] at the preferred frequency, responses rectified
    osi_p: np.ndarray                      # [U] right tail, +1 rule
    osi_q: np.ndarray                      # [U] BH over the layer's units
    frequency_modulation: np.ndarray       # [U] (max - min) / (max + min) over frequencies
    peak: np.ndarray                       # [U] rectified tuning at the preferred grating (above the baseline)
    draws: int
    alpha: float = ALPHA
    min_osi: float = MIN_OSI
    min_modulation: float = MIN_FREQUENCY_MODULATION

    @property
    def frequency_midpoint(self) -> float:
        """Geometric middle of the tested frequencies: the split between low and high."""
        return float(np.sqrt(self.frequencies.min() * self.frequencies.max()))

    def categories(self) -> dict[str, np.ndarray]:
        tuned = (self.frequency_modulation >= self.min_modulation) & (self.peak > 0)
        mid = self.frequency_midpoint
        return {
            "oriented": _bh_mask(self.osi_q, self.alpha) & (self.osi >= self.min_osi),
            "low frequency": tuned & (self.preferred_frequency < mid),
            "high frequency": tuned & (self.preferred_frequency > mid),
        }

    def rules(self) -> dict[str, str]:
        freqs = ", ".join(f"{f:g}" for f in self.frequencies)
        tuned = (f"the preferred grating drives the unit (tuning above its baseline) and the frequency modulation "
                 f"(max - min) / (max + min) of its tuning over frequencies at the preferred orientation is >= "
                 f"{self.min_modulation:.2g} (the best frequency drives it at least twice as much as the worst)")
        mid = self.frequency_midpoint
        middle = f"; {mid:g} itself is neither" if np.any(np.isclose(self.frequencies, mid)) else ""
        where = f"cycles per image (the geometric middle of the tested {freqs}{middle})"
        return {
            "oriented": f"OSI >= {self.min_osi:g} at the preferred frequency and BH q <= {self.alpha:g} across the "
                        f"layer's units against shuffles of the orientation labels over the (orientation, phase) "
                        f"responses of each frequency ({_draws_text(self.draws, self.osi.size, self.alpha)})",
            "low frequency": f"preferred frequency below {mid:.3g} {where}, and {tuned}",
            "high frequency": f"preferred frequency above {mid:.3g} {where}, and {tuned}",
        }


def _preferences(tuning: np.ndarray, orientations: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tuning at the preferred f [U, O, B], preferred f [U, B], OSI there [U, B]) of tuning
    laid out [F, U, O, B] (B: draws of a null, or 1).

    The preferred frequency holds the largest response (the lowest frequency on ties), the
    preferred orientation is the largest response there (the first on ties): the argmax over
    (orientation, frequency). This layout keeps the null's reductions on long contiguous rows.
    """
    pref_f = tuning.max(axis=2).argmax(axis=0)                        # [U, B]
    at_f = np.take_along_axis(tuning, pref_f[None, :, None, :], axis=0)[0]  # [U, O, B]
    return at_f, pref_f, orientation_selectivity(np.moveaxis(at_f, 1, -1), orientations)


def _osi_null(grid: np.ndarray, orientations: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """OSI of every unit on responses whose orientation labels are shuffled across the
    (orientation, phase) responses of each frequency (the same shuffle for every unit in a
    draw), re-running the whole procedure: the preferred frequency is chosen again on the
    shuffled tuning. [U, draws].

    A shuffle deals the O x P labels (each orientation P times) at random over the slots, so
    the shuffled tuning is one matrix product per frequency, responses [U, O*P] times a one-hot
    [O*P, O*draws] / P, in float32 (BLAS instead of a gather of U x draws x O x P values).
    """
    u, o, f, p = grid.shape
    flat = np.ascontiguousarray(np.moveaxis(grid, 2, 0).reshape(f, u, o * p), dtype=np.float32)  # [F, U, O*P]
    dealt = np.repeat(np.arange(o), p)
    chunk = max(1, _NULL_BYTES // (4 * o * f * max(u, o * p)))      # the tuning and the one-hot of a chunk
    out = np.empty((u, draws))
    for start in range(0, draws, chunk):
        b = min(chunk, draws - start)
        labels = rng.permuted(np.tile(dealt, (f, b, 1)), axis=-1)    # [F, b, O*P]: each slot's orientation
        onehot = (labels.transpose(0, 2, 1)[:, :, None, :] == np.arange(o)[:, None]).astype(np.float32) / p
        tuning = np.matmul(flat, onehot.reshape(f, o * p, o * b)).reshape(f, u, o, b)  # [F, U, O, b]
        out[:, start:start + b] = _preferences(tuning, orientations)[2]
    return out


def grating_tuning(responses: np.ndarray, info: Mapping[str, np.ndarray], *, baseline: np.ndarray | None = None,
                   draws: int = DRAWS, seed: int = 0, alpha: float = ALPHA, min_osi: float = MIN_OSI,
                   min_modulation: float = MIN_FREQUENCY_MODULATION) -> GratingTuning:
    """Tuning, preferences and OSI of each unit from its responses [N, U] to `gratings()`.

    `baseline` [U]: each unit's response to a blank image of the gratings' mean luminance,
    subtracted first, so that the tuning is the response the stripes drive. Every grating
    shares the mean luminance; without the subtraction a unit's resting level is added to
    every orientation alike and dilutes its OSI (a unit resting at 0.5 that one of 12
    orientations drives to 0.7 has OSI 0.2 / 6.2 = 0.03 instead of 1).
    Preferred orientation and frequency: the argmax of the tuning over (orientation,
    frequency) (the first on ties). OSI: at the preferred frequency, on rectified tuning. Its
    null shuffles orientation labels across the orientation x phase responses of every
    frequency and repeats all of this; p by the +1 rule (right tail), BH across units.
    """
    r = np.asarray(responses, dtype=np.float64)
    if r.ndim != 2:
        raise UsageError(f"grating responses must be [stimuli, units], got shape {r.shape}")
    if baseline is not None:
        base = np.asarray(baseline, dtype=np.float64).reshape(-1)
        if base.shape != (r.shape[1],):
            raise UsageError(f"baseline must hold one response per unit ({r.shape[1]}), got shape {base.shape}")
        r = r - base
    oi, fi, pi, shape = _grid(info, r.shape[0])
    orientations = _first(np.asarray(info["orientation_deg"], dtype=np.float64), oi, int(shape[0]))
    frequencies = _first(np.asarray(info["frequency"], dtype=np.float64), fi, int(shape[1]))
    cpp = _first(np.asarray(info["cycles_per_pixel"], dtype=np.float64), fi, int(shape[1]))
    grid = np.zeros((r.shape[1], *shape))                             # [U, O, F, P]
    grid[:, oi, fi, pi] = r.T
    tuning = grid.mean(axis=-1)
    at_f, pref_f, osi = (a[..., 0] for a in _preferences(np.moveaxis(tuning, -1, 0)[..., None], orientations))
    pref_o = at_f.argmax(axis=1)
    units = np.arange(r.shape[1])
    across_f = np.maximum(tuning[units, pref_o], 0.0)                 # [U, F] at the preferred orientation
    top, low = across_f.max(axis=1), across_f.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        modulation = np.where(top + low > 0, (top - low) / np.where(top + low > 0, top + low, 1.0), 0.0)
    rng = np.random.default_rng(seed)
    p = _sampled_pvalues(osi, lambda units, count: _osi_null(grid[units], orientations, count, rng), int(draws),
                         alpha, osi >= min_osi)
    return GratingTuning(tuning, orientations, frequencies, cpp, orientations[pref_o], frequencies[pref_f],
                         cpp[pref_f], osi, p, benjamini_hochberg(p), modulation, top, int(draws), alpha, min_osi,
                         min_modulation)


# ---------------------------------------------------------------------------------------------
# First-layer filters


def colourfulness_null(channels: int, positions: int):
    """The exact null of colourfulness: a filter of `channels` x `positions` iid N(0, s^2) weights.

    At each position the weights split into one grey coordinate and C-1 coordinates off the
    grey axis, all iid N(0, s^2) in an orthonormal basis, so off-grey energy ~ s^2 chi2((C-1)hw)
    and grey energy ~ s^2 chi2(hw), independent: colourfulness ~ Beta((C-1)hw/2, hw/2),
    whatever s. Its mean is (C-1)/C: a filter whose channels are unrelated.
    """
    if channels < 2 or positions < 1:
        raise UsageError("the colourfulness null needs at least 2 channels and 1 position")
    return sps.beta((channels - 1) * positions / 2.0, positions / 2.0)


@dataclass(frozen=True)
class FilterProperties:
    """Colourfulness (None for one input channel) and spatial frequency of first-layer filters."""

    colourfulness: np.ndarray | None   # [U] share of energy off the grey axis
    grey_p: np.ndarray | None          # [U] P(null <= colourfulness), iid-Gaussian null (exact)
    grey_q: np.ndarray | None          # [U] BH over the layer's units
    frequency: np.ndarray              # [U] cycles per pixel
    channels: int
    kernel: tuple[int, int]
    alpha: float = ALPHA
    colourful_at: float = 0.5

    def categories(self) -> dict[str, np.ndarray]:
        if self.colourfulness is None:
            return {}
        grey = _bh_mask(self.grey_q, self.alpha)
        return {"colourful filter": ~grey & (self.colourfulness >= self.colourful_at), "grey filter": grey}

    def rules(self) -> dict[str, str]:
        if self.colourfulness is None:
            return {}
        c, (h, w) = self.channels, self.kernel
        return {
            "grey filter": f"filter colourfulness below what iid Gaussian weights give, BH q <= {self.alpha:g} "
                           f"across the layer's units; that null is exactly Beta({(c - 1) * h * w / 2:g}, "
                           f"{h * w / 2:g}) for {c}x{h}x{w} weights (mean {(c - 1) / c:.3g}): the channels share "
                           f"one spatial pattern more than chance",
            "colourful filter": f"filter colourfulness >= {self.colourful_at:g} (more weight energy off the grey "
                                f"axis than on it) and not a grey filter; iid Gaussian weights give "
                                f"{(c - 1) / c:.3g} on average, so random filters are colourful too",
        }


def filter_properties(filters: np.ndarray | torch.Tensor, *, alpha: float = ALPHA) -> FilterProperties:
    """Colourfulness with its grey test, and spatial frequency, of filters [U, C, h, w].

    The grey test's null is exact (`colourfulness_null`), so p is its CDF at the observed
    colourfulness, not a sampled percentile.
    """
    w = torch.as_tensor(np.asarray(filters) if not isinstance(filters, torch.Tensor) else filters)
    if w.ndim != 4:
        raise UsageError(f"filters must be [units, C, h, w], got shape {tuple(w.shape)}")
    channels, kernel = int(w.shape[1]), (int(w.shape[2]), int(w.shape[3]))
    frequency = spatial_frequency(w).numpy()
    if channels < 2:
        return FilterProperties(None, None, None, frequency, channels, kernel, alpha)
    colour = colourfulness(w).numpy()
    p = colourfulness_null(channels, kernel[0] * kernel[1]).cdf(colour)
    return FilterProperties(colour, p, benjamini_hochberg(p), frequency, channels, kernel, alpha)
