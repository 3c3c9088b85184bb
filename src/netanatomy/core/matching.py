"""Unit matching between two layers, its null, and the recurrence of modules across models.

- Best match: each unit of A and the unit of B it correlates with most (Pearson r).
- One-to-one matching: the assignment of A's units to distinct units of B with the largest
  total r (the Hungarian method, SciPy's `linear_sum_assignment`).
- Counterparts: a unit of A has a counterpart in B when its best-match r beats what the same
  procedure gives against null models (B with random weights): p = (#{null best-match r >=
  observed} + 1) / (M + 1) over the M best-match values of every unit of A against every null
  model, pooled (the null says how high a best match goes by chance for this layer of A), with
  Benjamini-Hochberg across A's units.
- Module recurrence: a cluster of A recurs in B when the counterparts of its units (the
  one-to-one matching, layer by layer) fall in one cluster of B: recurrence = the largest share
  of its units whose counterparts share a B cluster. Null: B's cluster labels permuted within
  each layer (cluster sizes per layer kept), so a large cluster is not mistaken for a recurring one.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stats import benjamini_hochberg, percentile_pvalue

__all__ = ["Matching", "best_matches", "counterpart_tests", "match_units", "module_recurrence"]


def best_matches(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every row unit, the column it correlates with most, and that r."""
    r = np.asarray(r, dtype=np.float64)
    j = np.argmax(r, axis=1)
    return j, r[np.arange(r.shape[0]), j]


@dataclass(frozen=True)
class Matching:
    pairs: list[tuple[int, int, float]]   # (unit of A, unit of B, r), the one-to-one matching, by A's unit
    mean_r: float                          # mean r over the matched pairs

    def to_json(self) -> dict[str, Any]:
        return {"pairs": [[a, b, r] for a, b, r in self.pairs], "mean_r": self.mean_r}


def match_units(r: np.ndarray) -> Matching:
    """One-to-one matching maximizing total r (rectangular: min(#A, #B) pairs)."""
    from scipy.optimize import linear_sum_assignment

    r = np.asarray(r, dtype=np.float64)
    rows, cols = linear_sum_assignment(r, maximize=True)
    pairs = [(int(a), int(b), float(r[a, b])) for a, b in zip(rows, cols)]
    return Matching(pairs, float(np.mean([p[2] for p in pairs])) if pairs else float("nan"))


def counterpart_tests(observed_best: np.ndarray, null_best: Sequence[np.ndarray], *, alpha: float = 0.05
                      ) -> dict[str, Any]:
    """Per-unit p of the best-match r against the pooled null best matches, BH q, and the share
    of units with a counterpart (q <= alpha)."""
    observed = np.asarray(observed_best, dtype=np.float64)
    pooled = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in null_best])
    p = np.asarray(percentile_pvalue(observed, pooled, tail="right"), dtype=np.float64).reshape(-1)
    q = benjamini_hochberg(p)
    return {"p": p.tolist(), "q": q.tolist(), "counterparts": int(np.sum(q <= alpha)),
            "share": float(np.mean(q <= alpha)) if q.size else float("nan"), "alpha": alpha,
            "null_values": int(pooled.size), "null_quantiles": {
                "50": float(np.quantile(pooled, 0.5)), "95": float(np.quantile(pooled, 0.95)),
                "99": float(np.quantile(pooled, 0.99))}}


def _recurrence(labels_a: np.ndarray, mapped_b: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Per cluster of A: the largest share of its units whose counterparts share a B cluster."""
    out = np.zeros(len(clusters))
    for i, c in enumerate(clusters):
        members = mapped_b[labels_a == c]
        members = members[members >= 0]
        size = int(np.sum(labels_a == c))
        out[i] = np.bincount(members).max() / size if members.size else 0.0
    return out


def module_recurrence(labels_a: Sequence[np.ndarray], labels_b: Sequence[np.ndarray],
                      matchings: Sequence[Sequence[tuple[int, int, float]]], *, permutations: int = 999,
                      seed: int = 0) -> dict[str, Any]:
    """How much of each cluster of A recurs in B, against B's labels permuted within layers.

    `labels_a[l]`, `labels_b[l]`: cluster ids of layer l's units in A and in B (ids are shared
    across layers: a cluster spans layers; -1: in no cluster, so never a cluster of A and never
    a place where a counterpart recurs). `matchings[l]`: the one-to-one pairs
    (unit of A, unit of B, r) of layer l. A unit of A left unmatched counts as not recurring.
    Returns per cluster its size, recurrence, best B cluster and p (+1 rule), and the
    size-weighted mean recurrence with its p.
    """
    rng = np.random.default_rng(seed)
    la = np.concatenate([np.asarray(x, dtype=np.int64) for x in labels_a])
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in labels_a])])

    def mapped(b_labels: Sequence[np.ndarray]) -> np.ndarray:
        out = np.full(la.size, -1, dtype=np.int64)
        for layer, pairs in enumerate(matchings):
            for a, b, _ in pairs:
                out[offsets[layer] + a] = b_labels[layer][b]
        return out

    lb = [np.asarray(x, dtype=np.int64) for x in labels_b]
    clusters = np.unique(la[la >= 0])
    observed_map = mapped(lb)
    observed = _recurrence(la, observed_map, clusters)
    sizes = np.array([int(np.sum(la == c)) for c in clusters])
    weights = sizes / sizes.sum()
    null = np.empty((permutations, len(clusters)))
    for t in range(permutations):
        null[t] = _recurrence(la, mapped([rng.permutation(x) for x in lb]), clusters)
    p = percentile_pvalue(observed, null.T, tail="right")
    weighted = float(observed @ weights)
    null_weighted = null @ weights
    per = []
    for i, c in enumerate(clusters):
        members = observed_map[la == c]
        members = members[members >= 0]
        per.append({"cluster": int(c), "size": int(sizes[i]), "recurrence": float(observed[i]),
                    "best_match": int(np.bincount(members).argmax()) if members.size else None,
                    "null_mean": float(null[:, i].mean()), "p": float(np.atleast_1d(p)[i])})
    return {"clusters": per, "mean_recurrence": weighted, "null_mean": float(null_weighted.mean()),
            "null_sd": float(null_weighted.std()),
            "p": float(percentile_pvalue(weighted, null_weighted, tail="right")), "permutations": permutations}
