"""Tests of whether a layer's branches differ in what their units do, from activations.

- Class preference: a unit's preferred class is the class with the highest mean (z-scored)
  activation; "units that prefer class c" is then a category, and each branch x category pair
  gets the hypergeometric tail and Fisher's test of `core.stats`, with BH across pairs.
- Correlation: if a branch's units work together, their activations correlate more with each
  other than with units of other branches. The statistic is mean |r| within branches minus mean
  |r| between them; the null shuffles which units belong to which branch (sizes kept).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from .stats import BranchCategoryTest, branch_category_tests


def preferred_class(values: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """[n, U] values and n labels -> [U] index of the class with each unit's highest mean z-score."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels)
    if values.shape[0] != labels.shape[0]:
        raise UsageError("values and labels must have the same number of examples")
    k = int(num_classes or labels.max() + 1)
    std = values.std(0)
    z = (values - values.mean(0)) / np.where(std > 0, std, 1.0)
    means = np.stack([z[labels == c].mean(0) if np.any(labels == c) else np.full(values.shape[1], -np.inf)
                      for c in range(k)])
    return means.argmax(0)


def branch_class_tests(values: np.ndarray, labels: np.ndarray, branches: Mapping[str, tuple[int, int]],
                       class_names: list[str] | None = None) -> list[BranchCategoryTest]:
    """Enrichment of each class's preferring units in each branch (unit ranges [start, stop))."""
    prefer = preferred_class(values, labels)
    units = prefer.shape[0]
    masks = {}
    for name, (start, stop) in branches.items():
        mask = np.zeros(units, dtype=bool)
        mask[start:stop] = True
        masks[name] = mask
    k = int(np.asarray(labels).max() + 1)
    names = class_names or [str(c) for c in range(k)]
    categories = {f"prefers {names[c]}": prefer == c for c in range(k) if np.any(prefer == c)}
    return branch_category_tests(masks, categories)


@dataclass(frozen=True)
class BranchCorrelation:
    within: float        # mean |r| over pairs of units in the same branch
    between: float       # mean |r| over pairs in different branches
    difference: float    # within - between
    null_mean: float
    null_std: float
    p: float             # (#{null >= observed} + 1) / (n + 1)
    n_permutations: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def branch_correlation_test(corr: np.ndarray, branch_of_unit: np.ndarray, *, n_permutations: int = 999,
                            seed: int = 0) -> BranchCorrelation:
    """Is |correlation| higher within branches than between them, beyond a relabelling null?"""
    a = np.abs(np.nan_to_num(np.asarray(corr, dtype=np.float64)))
    labels = np.asarray(branch_of_unit)
    u = a.shape[0]
    if a.shape != (u, u) or labels.shape != (u,):
        raise UsageError("need a square correlation matrix and one branch label per unit")
    if len(np.unique(labels)) < 2:
        raise UsageError("need at least two branches")
    off = ~np.eye(u, dtype=bool)
    total = a[off].sum()
    n_pairs = off.sum()

    def stat(lab: np.ndarray) -> np.ndarray:
        # lab: [P, U]; same[p] is the within-branch pair mask of relabelling p
        same = (lab[:, :, None] == lab[:, None, :]) & off
        w_sum = np.einsum("pij,ij->p", same, a)
        w_n = same.sum((1, 2))
        return w_sum / w_n - (total - w_sum) / (n_pairs - w_n)

    observed = float(stat(labels[None, :])[0])
    rng = np.random.default_rng(seed)
    null = np.concatenate([stat(np.stack([rng.permutation(labels) for _ in range(min(200, n_permutations - i))]))
                           for i in range(0, n_permutations, 200)])
    same = (labels[:, None] == labels[None, :]) & off
    within = float(a[same].mean())
    between = float(a[~same & off].mean())
    p = (np.sum(null >= observed) + 1) / (n_permutations + 1)
    return BranchCorrelation(within, between, observed, float(null.mean()), float(null.std()), float(p), n_permutations)
