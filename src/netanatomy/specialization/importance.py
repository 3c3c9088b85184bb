"""Importance of sub-clusters (Hod et al.): how much does silencing them hurt, and whom?

Each sub-cluster (a cluster's units in one layer, 2 <= size <= 0.99 of the layer) is lesioned
(its outputs set to 0) and compared with R random same-size sets of the same layer:
- damage: test accuracy after the lesion; p = percentile of the true accuracy among the
  random ones, left tail (more damage than random), with the +1 rule;
- class specificity: S = (max_c d_c - min_c d_c) / max(mean_c d_c, floor), d_c the drop in
  class c's accuracy and floor one example of the smallest class (so a lesion that changes
  nothing does not divide by ~0); right tail against the random sets' S;
- effect factor: the true accuracy drop over the mean random drop (floored the same way):
  "this set does F times the damage of a random set of its size";
- Fisher's method across a network's sub-clusters (one p per statistic), and
  Benjamini-Hochberg q-values across all tests (sub-clusters x statistics).
Accuracies are meant to be those of a float64 evaluation whatever the model's dtype: lesions
run in the model's precision and the predictions float32 cannot decide are recomputed in
float64 (see `lesion.py`). Where the model's suffix is bounded ("certified": by default models
without convolutions) this is guaranteed; elsewhere ("sampled") near-ties are recomputed and a seeded sample of the other
predictions is checked in float64 on every run, a miss recomputing the whole batch. The JSON
says per layer which path ran (`lesion_method`) and which precision mode, with the rows checked
and the disagreements found (`lesion_precision`).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.stats import benjamini_hochberg, fisher_combine, percentile_pvalue, zscore
from ..errors import UsageError
from ..models.layers import LayerMap
from ..scale import Runner, TaskStore, map_tasks
from .lesion import LesionEvaluator
from .subclusters import Cluster, SubCluster, keep_masks, random_sets, sub_clusters


# ---------------------------------------------------------------------------------------------
# Statistics on correct counts (pure)


def _class_accuracy(correct: np.ndarray, totals: np.ndarray) -> np.ndarray:
    present = totals > 0
    return correct[..., present] / totals[present]


def specificity(drops: np.ndarray, floor: float) -> np.ndarray:
    """(max - min) / max(mean, floor) of per-class accuracy drops along the last axis."""
    drops = np.asarray(drops, dtype=np.float64)
    return (drops.max(axis=-1) - drops.min(axis=-1)) / np.maximum(drops.mean(axis=-1), floor)


@dataclass(frozen=True)
class LesionTest:
    """One sub-cluster's lesion against its random sets."""

    cluster: int
    layer: str
    units: np.ndarray
    accuracy: float
    drop: float
    class_drop: np.ndarray          # per class present in the data
    random_drop: np.ndarray         # [R]
    p_drop: float
    z_drop: float
    specificity: float
    random_specificity: np.ndarray  # [R]
    p_specificity: float
    effect_factor: float
    q_drop: float = float("nan")
    q_specificity: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster, "layer": self.layer, "size": int(self.units.size),
            "units": [int(u) for u in self.units], "accuracy": self.accuracy, "drop": self.drop,
            "class_drop": self.class_drop, "random_drop_mean": float(self.random_drop.mean()),
            "random_drop_std": float(self.random_drop.std()), "p_drop": self.p_drop, "q_drop": self.q_drop,
            "z_drop": self.z_drop, "specificity": self.specificity,
            "random_specificity_mean": float(self.random_specificity.mean()), "p_specificity": self.p_specificity,
            "q_specificity": self.q_specificity, "effect_factor": self.effect_factor,
        }


def lesion_test(sub: SubCluster, base: np.ndarray, totals: np.ndarray, true: np.ndarray, random: np.ndarray
                ) -> LesionTest:
    """Statistics of one lesion from correct counts per class: base [C], true [C], random [R, C]."""
    base, totals = np.asarray(base, np.float64), np.asarray(totals, np.float64)
    true, random = np.asarray(true, np.float64), np.asarray(random, np.float64)
    n = totals.sum()
    floor = 1.0 / totals[totals > 0].min()
    acc0, acc, acc_r = base.sum() / n, true.sum() / n, random.sum(axis=1) / n
    class_drop = _class_accuracy(base, totals) - _class_accuracy(true, totals)
    random_class_drop = _class_accuracy(base, totals)[None, :] - _class_accuracy(random, totals)
    spec, spec_r = float(specificity(class_drop, floor)), specificity(random_class_drop, floor)
    drop, drop_r = acc0 - acc, acc0 - acc_r
    return LesionTest(
        cluster=sub.cluster, layer=sub.layer, units=sub.units, accuracy=float(acc), drop=float(drop),
        class_drop=class_drop, random_drop=drop_r,
        p_drop=float(percentile_pvalue(acc, acc_r, "left")), z_drop=float(zscore(drop, drop_r)),
        specificity=spec, random_specificity=spec_r, p_specificity=float(percentile_pvalue(spec, spec_r, "right")),
        effect_factor=float(drop / max(drop_r.mean(), floor)),
    )


@dataclass
class ImportanceResult:
    accuracy: float
    class_accuracy: np.ndarray
    n_random: int
    seed: int
    tests: list[LesionTest]
    methods: dict[str, str] = field(default_factory=dict)  # layer -> how lesions ran (fx-delta, fx, hook)
    precision: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer -> LesionEvaluator.precision

    @property
    def fisher_drop(self) -> float:
        return fisher_combine([t.p_drop for t in self.tests])

    @property
    def fisher_specificity(self) -> float:
        return fisher_combine([t.p_specificity for t in self.tests])

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy, "class_accuracy": self.class_accuracy, "random": self.n_random,
            "seed": self.seed, "sub_clusters": [t.to_json() for t in self.tests],
            "fisher": {"drop": self.fisher_drop, "specificity": self.fisher_specificity},
            "lesion_method": self.methods,
            "lesion_precision": self.precision,
        }


def with_q_values(tests: list[LesionTest]) -> list[LesionTest]:
    """Benjamini-Hochberg across all of a network's tests (both statistics of every sub-cluster)."""
    if not tests:
        return tests
    q = benjamini_hochberg([t.p_drop for t in tests] + [t.p_specificity for t in tests])
    m = len(tests)
    return [LesionTest(**{**t.__dict__, "q_drop": float(q[i]), "q_specificity": float(q[m + i])})
            for i, t in enumerate(tests)]


# ---------------------------------------------------------------------------------------------
# Driver


# The lesions of a layer run as tasks of this many masks. The split depends on the sizes only,
# never on the runner, so the counts (and the float64 checks behind them) are the same here and
# on any number of Ray workers.
TASK_MASKS = 256
_COUNTERS = ("refined_rows", "checked_rows", "disagreements", "recomputed_batches")


def lesionable_layers(layer_map: LayerMap) -> dict[str, int]:
    """Layers whose units can be silenced, name -> units: conv and linear layers but the last
    (the logits). Concatenations and residual sums are left out (their units are other layers')."""
    layers = [layer for layer in layer_map.values() if layer.kind in ("conv", "linear")]
    return {layer.name: layer.units for layer in layers[:-1]}


def importance(model: nn.Module, layer_map: LayerMap, clusters: Sequence[Cluster], x: torch.Tensor, y: torch.Tensor,
               *, n_random: int = 99, seed: int = 0, num_classes: int | None = None, batch_size: int = 1000,
               device: str | torch.device | None = None, exact: bool = False,
               on_layer: Callable[[str], None] | None = None, precision: str = "auto",
               runner: Runner | None = None, store: TaskStore | None = None,
               task_masks: int = TASK_MASKS) -> ImportanceResult:
    """Lesion every sub-cluster of `clusters` and R random same-size sets; see the module docstring.

    `precision`: "auto", "certified" or "sampled", how float32 counts are made float64's (see
    `LesionEvaluator`).

    A layer's lesions (sub-clusters and their random sets) run as batches of masks on a model
    split at that layer, `task_masks` masks per task; the tasks run on `runner` (here by
    default) and are kept in `store` when given, so a stopped run resumes.
    """
    if n_random < 1:
        raise UsageError(f"need at least 1 random set per sub-cluster, got {n_random}")
    y = torch.as_tensor(y).long()
    if y.numel() == 0 or int(y.min()) < 0:
        raise UsageError("importance needs labelled data (every label >= 0)")
    num_classes = int(num_classes or int(y.max()) + 1)
    layers = lesionable_layers(layer_map)
    subs = sub_clusters(clusters, layers)
    if not subs:
        raise UsageError("no sub-cluster to test: none has >= 2 units and <= 99% of a hidden layer "
                         f"(lesionable layers: {', '.join(layers)})")
    totals = torch.bincount(y, minlength=num_classes).numpy()
    base = _base_counts(model, x, y, num_classes, batch_size, device)
    order = list(dict.fromkeys(s.layer for s in subs))
    masks = {}
    for layer_name in order:
        masks[layer_name] = np.concatenate([block for s in subs if s.layer == layer_name
                                            for block in (s.mask()[None, :], keep_masks(random_sets(s, n_random, seed),
                                                                                         s.layer_units))])
    context = LesionContext(model, {name: layer_map.resolve(name) for name in order}, x, y, num_classes, batch_size,
                            device, exact, seed, precision, masks)
    items = [(name, start, min(start + task_masks, len(masks[name])))
             for name in order for start in range(0, len(masks[name]), task_masks)]
    left = {name: sum(1 for item in items if item[0] == name) for name in order}

    def arrived(item: tuple[str, int, int], result: dict[str, Any]) -> None:
        left[item[0]] -= 1
        if on_layer is not None and left[item[0]] == 0:
            on_layer(item[0])

    results = map_tasks(_lesion_task, items, context=context, runner=runner, store=store,
                        key=lambda item: f"lesions-{item[0]}-{item[1]}", on_result=arrived)
    tests, methods, precisions = [], {}, {}
    for layer_name in order:
        parts = [r for item, r in zip(items, results) if item[0] == layer_name]
        counts = np.concatenate([r["counts"] for r in parts])
        methods[layer_name] = parts[0]["method"]
        precisions[layer_name] = merged_precision(parts)
        group = [s for s in subs if s.layer == layer_name]
        for i, s in enumerate(group):
            block = counts[i * (n_random + 1):(i + 1) * (n_random + 1)]
            tests.append(lesion_test(s, base, totals, block[0], block[1:]))
    acc_c = base / np.maximum(totals, 1)
    return ImportanceResult(float(base.sum() / totals.sum()), acc_c, n_random, seed, with_q_values(tests), methods,
                            precisions)


@dataclass
class LesionContext:
    """What every lesion task shares: the model, the data and every layer's masks."""

    model: nn.Module
    layers: dict[str, Any]
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    batch_size: int
    device: Any
    exact: bool
    seed: int
    precision: str
    masks: dict[str, np.ndarray]
    # (layer, its evaluator) in the process that runs the tasks; never sent to a worker
    cached: tuple[str, LesionEvaluator] | None = field(default=None, repr=False, compare=False)

    def evaluator(self, layer_name: str) -> LesionEvaluator:
        """The layer's evaluator, kept while tasks of the same layer follow (one at a time: its
        prefix activations are the size of the data)."""
        if self.cached is None or self.cached[0] != layer_name:
            self.cached = (layer_name, LesionEvaluator(
                self.model, self.layers[layer_name], self.x, self.y, num_classes=self.num_classes,
                batch_size=self.batch_size, device=self.device, exact=self.exact, refine=True, check_seed=self.seed,
                precision=self.precision))
        return self.cached[1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "cached": None}


def _lesion_task(context: LesionContext, item: tuple[str, int, int]) -> dict[str, Any]:
    """Correct counts of masks [start, stop) of a layer, and how they were made exact."""
    layer_name, start, stop = item
    evaluator = context.evaluator(layer_name)
    before = evaluator.precision
    counts = evaluator.correct(torch.from_numpy(context.masks[layer_name][start:stop])).numpy()
    after = evaluator.precision
    return {"counts": counts, "method": evaluator.method, "fallback_reason": evaluator.fallback_reason,
            "mode": after["mode"], "reason": after["reason"], **{k: after[k] - before[k] for k in _COUNTERS}}


def merged_precision(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One layer's precision record from its tasks': counters summed, the last mode (a
    certified evaluator may switch to sampled on its first batch)."""
    last = parts[-1]
    return {"mode": last["mode"], "reason": last["reason"], **{k: int(sum(p[k] for p in parts)) for k in _COUNTERS},
            "fallback_reason": last["fallback_reason"]}


def _base_counts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int,
                 device: str | torch.device | None) -> np.ndarray:
    dev = torch.device(device) if device is not None else next((p.device for p in model.parameters()),
                                                                torch.device("cpu"))
    model = model.eval()
    if next((p.dtype for p in model.parameters()), torch.float64) != torch.float64:
        model = copy.deepcopy(model).double()  # the unlesioned accuracy in float64, like the lesions
    correct = torch.zeros(num_classes, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start:start + batch_size].to(dev, torch.float64), y[start:start + batch_size].to(dev)
            right = model(xb).argmax(dim=1) == yb
            correct += torch.bincount(yb[right], minlength=num_classes).cpu()
    return correct.numpy()
