"""Coherence of sub-clusters (Hod et al.): do their units respond to the same inputs?

Both statistics work on per-example values of each layer (pre-activation; a conv channel's
value is the L1 norm of its map) and compare every sub-cluster with R random same-size sets of
its layer, with percentile p-values (+1 rule), Fisher's method across a network's
sub-clusters and Benjamini-Hochberg across all tests:
- dataset-based: the `top` inputs (default 10) with the largest summed |value| over the set's
  units; the entropy (bits) of their label histogram. Low = the set prefers one class: left tail.
- correlation-based: the mean squared Spearman correlation over the set's unit pairs (the
  activation graph's edge weight). High = the units fire together: right tail.
- feature-visualization-based (render the input that maximizes the set's mean activation,
  score the entropy of the network's prediction on it): TODO, to be built on the feature
  visualization engine; asking for it raises a UsageError until then.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.graphs import spearman_squared
from ..core.stats import benjamini_hochberg, fisher_combine, label_entropy, percentile_pvalue
from ..errors import UsageError
from .subclusters import Cluster, SubCluster, random_sets, sub_clusters

KINDS = ("dataset", "correlation")
PLANNED_KINDS = ("visualization",)


def top_inputs_entropy(values: np.ndarray, labels: np.ndarray, sets: np.ndarray, *, top: int = 10,
                       num_classes: int | None = None) -> np.ndarray:
    """Label entropy (bits) of the `top` examples with the largest summed |value| over each set.

    values [N, U], labels [N], sets [M, s] unit indices -> [M]. Ties in the score go to the
    lower example index.
    """
    values = np.abs(np.asarray(values, dtype=np.float64))
    sets = np.asarray(sets, dtype=np.int64)
    top = min(int(top), values.shape[0])
    if top < 1:
        raise UsageError("need at least one example for dataset-based coherence")
    scores = values[:, sets].sum(axis=2).T  # [M, N]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    return label_entropy(np.asarray(labels)[order], num_classes=num_classes)


def mean_pair_correlation(r2: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """Mean of r2[i, j] over the pairs i != j of each set: [M] (r2 symmetric with 0 diagonal)."""
    sets = np.asarray(sets, dtype=np.int64)
    s = sets.shape[1]
    if s < 2:
        raise UsageError("a set needs at least 2 units for a correlation")
    block = r2[sets[:, :, None], sets[:, None, :]]  # [M, s, s]
    return block.sum(axis=(1, 2)) / (s * (s - 1))


def full_spearman_squared(values: np.ndarray) -> np.ndarray:
    """Spearman^2 over all units [U, U]: zero-variance units get 0 everywhere (they never co-vary)."""
    values = np.asarray(values, dtype=np.float64)
    r2_kept, kept = spearman_squared(values)
    full = np.zeros((values.shape[1], values.shape[1]))
    full[np.ix_(kept, kept)] = r2_kept
    return full


@dataclass(frozen=True)
class CoherenceTest:
    cluster: int
    layer: str
    units: np.ndarray
    kind: str          # "dataset" | "correlation"
    value: float       # entropy (bits) or mean Spearman^2
    random: np.ndarray  # [R]
    p: float
    tail: str
    q: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "layer": self.layer, "size": int(self.units.size), "kind": self.kind,
                "value": self.value, "random_mean": float(np.mean(self.random)),
                "random_std": float(np.std(self.random)), "p": self.p, "q": self.q, "tail": self.tail}


@dataclass
class CoherenceResult:
    n_random: int
    seed: int
    top: int
    tests: list[CoherenceTest]

    def fisher(self, kind: str) -> float:
        return fisher_combine([t.p for t in self.tests if t.kind == kind])

    def to_json(self) -> dict[str, Any]:
        kinds = list(dict.fromkeys(t.kind for t in self.tests))
        return {"random": self.n_random, "seed": self.seed, "top": self.top,
                "tests": [t.to_json() for t in self.tests], "fisher": {k: self.fisher(k) for k in kinds}}


def coherence(values: Mapping[str, np.ndarray], labels: np.ndarray | None, clusters: Sequence[Cluster], *,
              n_random: int = 19, seed: int = 0, top: int = 10, kinds: Sequence[str] = KINDS,
              num_classes: int | None = None) -> CoherenceResult:
    """Dataset- and correlation-based coherence of every sub-cluster of `clusters`.

    `values` maps each layer to its per-example values [N, units] (all layers over the same
    examples); `labels` [N] are the examples' classes (needed for "dataset").
    """
    unknown = [k for k in kinds if k not in KINDS]
    if any(k in PLANNED_KINDS for k in unknown):
        raise UsageError("feature-visualization coherence is not available yet (it needs the feature "
                         "visualization engine); use dataset and/or correlation")
    if unknown:
        raise UsageError(f"unknown coherence kind {unknown[0]!r}; use {', '.join(KINDS)}")
    if n_random < 1:
        raise UsageError(f"need at least 1 random set per sub-cluster, got {n_random}")
    if "dataset" in kinds:
        if labels is None or np.all(np.asarray(labels) < 0):
            raise UsageError("dataset-based coherence needs labelled data")
        labels = np.asarray(labels)
        num_classes = int(num_classes or labels.max() + 1)
    layer_units = {name: int(v.shape[1]) for name, v in values.items()}
    subs = sub_clusters(clusters, layer_units)
    if not subs:
        raise UsageError(f"no sub-cluster to test in layers {', '.join(layer_units)} (each needs >= 2 units "
                         "and <= 99% of its layer)")
    tests: list[CoherenceTest] = []
    r2_cache: dict[str, np.ndarray] = {}
    for sub in subs:
        sets = np.concatenate([sub.units[None, :], random_sets(sub, n_random, seed)])
        v = np.asarray(values[sub.layer])
        if "dataset" in kinds:
            ent = top_inputs_entropy(v, labels, sets, top=top, num_classes=num_classes)
            tests.append(_test(sub, "dataset", ent, "left"))
        if "correlation" in kinds:
            if sub.layer not in r2_cache:
                r2_cache[sub.layer] = full_spearman_squared(v)
            corr = mean_pair_correlation(r2_cache[sub.layer], sets)
            tests.append(_test(sub, "correlation", corr, "right"))
    q = benjamini_hochberg([t.p for t in tests])
    tests = [CoherenceTest(**{**t.__dict__, "q": float(qi)}) for t, qi in zip(tests, q)]
    return CoherenceResult(n_random, seed, top, tests)


def _test(sub: SubCluster, kind: str, scores: np.ndarray, tail: str) -> CoherenceTest:
    return CoherenceTest(sub.cluster, sub.layer, sub.units, kind, float(scores[0]), scores[1:],
                         float(percentile_pvalue(scores[0], scores[1:], tail)), tail)
