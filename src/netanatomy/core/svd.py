"""SVD of |W| between two layers: the main factors of who connects to whom (Branch Specialization).

For weights W [out, in, kh, kw] (or a linear layer's [out, in]), M = sum over kh, kw of |W|
is an out x in matrix of how strongly each lower unit feeds each upper unit, sign ignored.
M = U S V^T: lower-layer units are placed by the right singular vectors (columns of V),
upper-layer units by the left (columns of U). Singular vector 0 is the largest factor of
variation in connectivity; in InceptionV1 it is colour (the first layer's colour vs grey
units feed different second-layer units).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import Tensor

__all__ = ["AbsSVD", "abs_svd", "abs_weight_matrix", "correlate_components"]


@dataclass(frozen=True)
class AbsSVD:
    """The SVD of M = sum_{kh,kw} |W|.

    singular_values [r]; shares [r] = s_i^2 / sum s^2 (the share of M's squared Frobenius
    norm each factor carries); upper [out, r] = U (left vectors, one row per upper unit);
    lower [in, r] = V (right vectors, one row per lower unit); upper_order / lower_order:
    units sorted by their coordinate on singular vector 0 (descending), ties broken by
    vector 1. Signs: every pair (u_i, v_i) is flipped so that the largest-magnitude entry of
    v_i is positive (for vector 0 of a non-negative M: all of v_0 and u_0 non-negative).
    centered: whether M's mean was removed before the SVD.
    """

    singular_values: Tensor
    shares: Tensor
    upper: Tensor
    lower: Tensor
    upper_order: Tensor
    lower_order: Tensor
    centered: bool

    def to_dict(self, components: int = 2) -> dict[str, Any]:
        return {
            "singular_values": self.singular_values.tolist(),
            "shares": self.shares.tolist(),
            "share_definition": "s_i^2 / sum_j s_j^2",
            "centered": self.centered,
            "upper_order": self.upper_order.tolist(),
            "lower_order": self.lower_order.tolist(),
            "upper_vectors": self.upper[:, :components].T.tolist(),
            "lower_vectors": self.lower[:, :components].T.tolist(),
        }


def abs_weight_matrix(weights: Tensor) -> Tensor:
    """M [out, in] = sum over the spatial positions of |W| (float64)."""
    w = weights.detach().double().abs()
    if w.ndim == 2:
        return w
    if w.ndim == 4:
        return w.sum(dim=(2, 3))
    raise ValueError(f"weights must be [out, in, kh, kw] or [out, in], got shape {tuple(weights.shape)}")


def _order(coords: Tensor) -> Tensor:
    primary = coords[:, 0].numpy()
    secondary = coords[:, 1].numpy() if coords.shape[1] > 1 else np.zeros_like(primary)
    return torch.from_numpy(np.lexsort((-secondary, -primary)).astype(np.int64))


def abs_svd(weights: Tensor, *, center: bool = False) -> AbsSVD:
    """SVD of |W| summed over positions, with a deterministic sign per singular pair.

    center=False (the method as defined): the raw M, whose vector 0 mixes overall connection strength with
    the main split; center=True removes M's grand mean first, so vector 0 is the main
    contrast between groups of units.
    """
    m = abs_weight_matrix(weights).cpu()
    if center:
        m = m - m.mean()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    v = vh.T
    pivot = v.abs().argmax(dim=0)
    sign = torch.sign(v[pivot, torch.arange(v.shape[1])])
    sign[sign == 0] = 1.0
    u, v = u * sign, v * sign
    power = s.pow(2)
    shares = power / power.sum() if float(power.sum()) > 0 else torch.zeros_like(power)
    return AbsSVD(s, shares, u, v, _order(u), _order(v), center)


def correlate_components(vectors: Tensor, properties: dict[str, Tensor | np.ndarray],
                         components: tuple[int, ...] = (0, 1)) -> dict[str, dict[str, dict[str, float]]]:
    """Pearson and Spearman correlation of singular-vector coordinates with unit properties.

    vectors [units, r] (e.g. AbsSVD.lower); properties: name -> [units]. Returns
    {"vector_0": {"colourfulness": {"pearson", "pearson_p", "spearman", "spearman_p"}, ...}, ...};
    a constant property or vector gives NaN.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    vec = vectors.detach().double().cpu().numpy()
    for comp in components:
        if comp >= vec.shape[1]:
            continue
        x = vec[:, comp]
        row: dict[str, dict[str, float]] = {}
        for name, values in properties.items():
            y = np.asarray(values.detach().cpu().numpy() if isinstance(values, Tensor) else values, dtype=np.float64)
            if y.shape != x.shape:
                raise ValueError(f"property {name!r} has {y.shape[0]} values for {x.shape[0]} units")
            if np.ptp(x) == 0 or np.ptp(y) == 0 or len(x) < 3:
                row[name] = {"pearson": float("nan"), "pearson_p": float("nan"),
                             "spearman": float("nan"), "spearman_p": float("nan")}
                continue
            pr = pearsonr(x, y)
            sr = spearmanr(x, y)
            row[name] = {"pearson": float(pr.statistic), "pearson_p": float(pr.pvalue),
                         "spearman": float(sr.statistic), "spearman_p": float(sr.pvalue)}
        out[f"vector_{comp}"] = row
    return out
