"""Coherence of sub-clusters (Hod et al.): do their units respond to the same inputs?

Every statistic compares a sub-cluster with R random same-size sets of its layer, with
percentile p-values (+1 rule), Fisher's method across a network's sub-clusters (one p per
kind of test) and Benjamini-Hochberg across all tests of the call:
- dataset-based: the `top` inputs (default 10) with the largest summed |value| over the set's
  units (per-example pre-activation values; a conv channel's value is the L1 norm of its map);
  the entropy (bits) of their label histogram. Low = the set prefers one class: left tail.
- correlation-based: the mean squared Spearman correlation over the set's unit pairs (the
  activation graph's edge weight). High = the units fire together: right tail.
- feature-visualization-based: render, for every set, the input that maximizes the set's mean
  pre-activation (objective `units(layer, members)`); all sub-clusters and all their random
  sets render in one batched optimization. Two tests per sub-cluster:
  `visualization_entropy`, the entropy (bits) of the network's own prediction (softmax of the
  logits) on the rendering: low = the picture is of one class, left tail; and
  `visualization_objective`, the objective reached, standardized per unit: the mean over the
  set's units of (a_u(image) - mean_u) / std_u, with mean_u and std_u the unit's pre-activation
  (spatial mean for conv channels, as the objective reads it) over data examples (see
  `unit_scales`; std floored at 1% of the layer's median std). It says how far beyond ordinary
  inputs one picture can drive all the set's units at once, on each unit's own scale, so that
  sets of large-weight units (which weight-graph clustering favours) do not win on scale
  alone; high = coherent, right tail. Without scales the raw mean pre-activation is used
  (still a valid test, since random sets come from the same layer, but scale-sensitive).
  Images are rendered with Lucid's recipe; the transforms' pixel amounts are scaled from
  224-pixel images to the model's input (`scaled_transforms`: pad 2, jitter 1 on 28x28).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.graphs import spearman_squared
from ..core.stats import benjamini_hochberg, fisher_combine, label_entropy, percentile_pvalue
from ..errors import UsageError
from ..scale import Runner, TaskStore
from .subclusters import Cluster, SubCluster, random_sets, sub_clusters

KINDS = ("dataset", "correlation", "visualization")
RENDER_STEPS = 256
RENDER_LR = 0.05
#: a unit's data std is floored at this fraction of its layer's median std (near-dead units)
STD_FLOOR = 0.01
_LUCID_SIDE = 224


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
    member = np.zeros((sets.shape[0], values.shape[1]))
    np.put_along_axis(member, sets, 1.0, axis=1)  # [M, U]: one matrix product, no [N, M, s] gather
    scores = member @ values.T  # [M, N]
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


# ---------------------------------------------------------------------------------------------
# Feature-visualization-based scores


def prediction_entropy(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Entropy (bits) of softmax(logits) per row, in float64 (a confident row is small, not 0)."""
    z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    logp = torch.log_softmax(z, dim=1)
    return (-(logp.exp() * logp).sum(dim=1) / math.log(2.0)).numpy()


def scaled_transforms(height: int, width: int):
    """Lucid's transforms with pixel amounts scaled from 224-pixel images to this size.

    A non-zero amount stays at least 1 pixel; scale and angle ranges are kept. On a 28x28
    input: pad 2, jitter 1, second jitter 1 (Lucid's pad 12 and jitter 8 would move the
    picture by a third of its side).
    """
    from ..visualize import TransformConfig

    base = TransformConfig()
    f = min(int(height), int(width)) / _LUCID_SIDE

    def px(amount: int) -> int:
        return max(1, round(amount * f)) if amount > 0 else 0

    return replace(base, pad=px(base.pad), jitter=px(base.jitter), jitter2=px(base.jitter2))


def unit_scales(model: nn.Module, layers: Sequence[str], data, *, max_examples: int | None = 5000, seed: int = 0,
                device: str | torch.device | None = None, input_shape: Sequence[int] | None = None,
                batch_size: int = 256, show_progress: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-unit mean and std of `layers`' pre-activations over `data` ({layer: (mean, std)}).

    Conv channels are averaged over space, the quantity a `units` objective reads; these are
    the scales that standardize the visualization objective.
    """
    from ..capture import capture_activations

    stats = capture_activations(model, list(layers), data, stage="pre", reduce="mean", top_k=0, keep_values=0,
                                covariance=False, max_examples=max_examples, batch_size=batch_size, device=device,
                                seed=seed, input_shape=input_shape, show_progress=show_progress)
    return {name: (np.asarray(s.mean, np.float64), np.asarray(s.std, np.float64)) for name, s in stats.items()}


def _floored_std(std: np.ndarray) -> np.ndarray:
    std = np.asarray(std, dtype=np.float64)
    positive = std[std > 0]
    floor = STD_FLOOR * float(np.median(positive)) if positive.size else 1.0
    return np.maximum(std, max(floor, 1e-12))


@dataclass
class VisualizationScores:
    """One rendering per set and what the network makes of it."""

    entropy: np.ndarray    # [M] bits of the prediction on the rendering
    objective: np.ndarray  # [M] standardized objective reached (raw when no scales were given)
    raw: np.ndarray        # [M] mean pre-activation of the set's units reached
    predicted: np.ndarray  # [M] the class the network assigns to the rendering
    images: torch.Tensor   # [M, C, H, W] in [0, 1], on the CPU
    standardized: bool


def visualization_scores(model: nn.Module, sets: Sequence[tuple[str, Sequence[int]]], *,
                         unit_scale: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                         steps: int = RENDER_STEPS, lr: float = RENDER_LR, seed: int = 0, transforms="scaled",
                         batch_size: int | None = None, input_shape: Sequence[int] | None = None,
                         device: str | torch.device | None = None, show_progress: bool = False,
                         runner: Runner | None = None, store: TaskStore | None = None) -> VisualizationScores:
    """Render the input that maximizes each (layer, units) set's mean pre-activation and score it.

    All sets render in one batched optimization (`batch_size` None) or in chunks, the chunks
    being tasks on `runner` (`scale`); image i's start and transforms depend on (seed, its
    layer and units) alone. `transforms` is
    "scaled" (`scaled_transforms` of the input size), a TransformConfig, or None (none).
    """
    from ..models.layers import discover_layers
    from ..visualize import direction, objective_values, render, units
    from ..visualize.render import frozen_eval

    if not sets:
        raise UsageError("no sets to render")
    layer_map = discover_layers(model, input_shape)
    shape = tuple(input_shape) if input_shape else tuple(layer_map.input_shape or ())
    if len(shape) != 3:
        raise UsageError(f"feature-visualization coherence needs image inputs (C, H, W); this model takes {shape}")
    if isinstance(transforms, str):
        if transforms != "scaled":
            raise UsageError(f"transforms must be 'scaled', a TransformConfig or None, not {transforms!r}")
        transforms = scaled_transforms(shape[1], shape[2])
    objectives = [units(layer, [int(u) for u in members]) for layer, members in sets]
    rendering = render(model, objectives, steps=steps, lr=lr, seed=seed, batch_size=batch_size,
                       transforms=transforms, input_shape=shape, device=device, show_progress=show_progress,
                       runner=runner, store=store)
    images = rendering.images
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    step = batch_size or images.shape[0]
    with frozen_eval(model), torch.no_grad():
        logits = torch.cat([model(images[i:i + step].to(dev)).float().cpu() for i in range(0, len(images), step)])
    raw = np.asarray(rendering.values, dtype=np.float64)
    objective = raw
    if unit_scale is not None:
        missing = sorted({layer for layer, _ in sets} - set(unit_scale))
        if missing:
            raise UsageError(f"no data scales for layer {missing[0]}")
        weighted, offsets = [], []
        for layer, members in sets:
            mean, std = unit_scale[layer]
            idx = np.asarray(members, dtype=np.int64)
            coef = np.zeros(len(mean))
            coef[idx] = 1.0 / (idx.size * _floored_std(std)[idx])
            weighted.append(direction(layer, coef))
            offsets.append(float(np.dot(coef, mean)))
        values = objective_values(model, weighted, images.to(dev), input_shape=shape)
        objective = np.asarray(values, dtype=np.float64) - np.asarray(offsets)
    return VisualizationScores(entropy=prediction_entropy(logits), objective=objective, raw=raw,
                               predicted=logits.argmax(dim=1).numpy(), images=images,
                               standardized=unit_scale is not None)


# ---------------------------------------------------------------------------------------------
# Tests against random same-size sets


@dataclass(frozen=True)
class CoherenceTest:
    cluster: int
    layer: str
    units: np.ndarray
    kind: str          # "dataset" | "correlation" | "visualization_entropy" | "visualization_objective"
    value: float       # entropy (bits), mean Spearman^2, prediction entropy (bits) or objective reached
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
    render: dict[str, Any] | None = None  # how the visualization tests rendered (None: not asked)
    renderings: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (cluster, layer) -> image

    def fisher(self, kind: str) -> float:
        return fisher_combine([t.p for t in self.tests if t.kind == kind])

    def significant(self, kind: str, alpha: float = 0.05) -> int:
        """How many sub-clusters pass the `kind` test at false discovery rate alpha (q < alpha)."""
        return sum(1 for t in self.tests if t.kind == kind and t.q < alpha)

    def to_json(self) -> dict[str, Any]:
        kinds = list(dict.fromkeys(t.kind for t in self.tests))
        doc = {"random": self.n_random, "seed": self.seed, "top": self.top,
               "tests": [t.to_json() for t in self.tests], "fisher": {k: self.fisher(k) for k in kinds}}
        if self.render is not None:
            doc["render"] = self.render
        return doc


def coherence(values: Mapping[str, np.ndarray], labels: np.ndarray | None, clusters: Sequence[Cluster], *,
              n_random: int = 99, seed: int = 0, top: int = 10, kinds: Sequence[str] = ("dataset", "correlation"),
              num_classes: int | None = None, model: nn.Module | None = None,
              unit_scale: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, steps: int = RENDER_STEPS,
              lr: float = RENDER_LR, transforms="scaled", input_shape: Sequence[int] | None = None,
              device: str | torch.device | None = None, show_progress: bool = False,
              batch_size: int | None = None, runner: Runner | None = None,
              store: TaskStore | None = None) -> CoherenceResult:
    """Coherence of every sub-cluster of `clusters` (see the module docstring).

    `values` maps each layer to its per-example values [N, units] (all layers over the same
    examples; they also give the layers' sizes); `labels` [N] are the examples' classes
    (needed for "dataset"). "visualization" needs `model` and renders every sub-cluster and
    every random set in one batched call (or `batch_size` at a time, each batch a task on
    `runner`, kept in `store` when given); `unit_scale` (from `unit_scales`) standardizes its
    objective.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UsageError(f"unknown coherence kind {unknown[0]!r}; use {', '.join(KINDS)}")
    if not kinds:
        raise UsageError(f"no coherence kind asked for; use {', '.join(KINDS)}")
    if n_random < 1:
        raise UsageError(f"need at least 1 random set per sub-cluster, got {n_random}")
    if "dataset" in kinds:
        if labels is None or np.all(np.asarray(labels) < 0):
            raise UsageError("dataset-based coherence needs labelled data")
        labels = np.asarray(labels)
        num_classes = int(num_classes or labels.max() + 1)
    if "visualization" in kinds and model is None:
        raise UsageError("feature-visualization coherence needs the model")
    layer_units = {name: int(v.shape[1]) for name, v in values.items()}
    subs = sub_clusters(clusters, layer_units)
    if not subs:
        raise UsageError(f"no sub-cluster to test in layers {', '.join(layer_units)} (each needs >= 2 units "
                         "and <= 99% of its layer)")
    all_sets = [np.concatenate([sub.units[None, :], random_sets(sub, n_random, seed)]) for sub in subs]
    vis = render_doc = None
    if "visualization" in kinds:
        flat = [(sub.layer, row) for sub, sets in zip(subs, all_sets) for row in sets]
        vis = visualization_scores(model, flat, unit_scale=unit_scale, steps=steps, lr=lr, seed=seed,
                                   transforms=transforms, input_shape=input_shape, device=device,
                                   show_progress=show_progress, batch_size=batch_size, runner=runner,
                                   store=store)
        render_doc = {"steps": steps, "lr": lr, "transforms": _describe(transforms, vis.images.shape),
                      "objective": "standardized" if vis.standardized else "raw", "images": len(flat)}
    tests: list[CoherenceTest] = []
    renderings: dict[tuple[int, str], torch.Tensor] = {}
    r2_cache: dict[str, np.ndarray] = {}
    block = n_random + 1
    for i, (sub, sets) in enumerate(zip(subs, all_sets)):
        v = np.asarray(values[sub.layer])
        if "dataset" in kinds:
            ent = top_inputs_entropy(v, labels, sets, top=top, num_classes=num_classes)
            tests.append(_test(sub, "dataset", ent, "left"))
        if "correlation" in kinds:
            if sub.layer not in r2_cache:
                r2_cache[sub.layer] = full_spearman_squared(v)
            corr = mean_pair_correlation(r2_cache[sub.layer], sets)
            tests.append(_test(sub, "correlation", corr, "right"))
        if vis is not None:
            rows = slice(i * block, (i + 1) * block)
            tests.append(_test(sub, "visualization_entropy", vis.entropy[rows], "left"))
            tests.append(_test(sub, "visualization_objective", vis.objective[rows], "right"))
            renderings[(sub.cluster, sub.layer)] = vis.images[i * block]
    q = benjamini_hochberg([t.p for t in tests])
    tests = [replace(t, q=float(qi)) for t, qi in zip(tests, q)]
    return CoherenceResult(n_random, seed, top, tests, render_doc, renderings)


def _describe(transforms, image_shape) -> dict[str, Any] | None:
    if transforms is None:
        return None
    if isinstance(transforms, str):
        transforms = scaled_transforms(int(image_shape[2]), int(image_shape[3]))
    return {"pad": transforms.pad, "jitter": transforms.jitter, "scale": list(transforms.scale),
            "angle": list(transforms.angle), "jitter2": transforms.jitter2}


def _test(sub: SubCluster, kind: str, scores: np.ndarray, tail: str) -> CoherenceTest:
    return CoherenceTest(sub.cluster, sub.layer, sub.units, kind, float(scores[0]), scores[1:],
                         float(percentile_pvalue(scores[0], scores[1:], tail)), tail)
