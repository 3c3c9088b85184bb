"""Branch statistics of a model's layers: which kinds of units sit in which branch.

The core tests (`core.stats.branch_category_tests`, `core.branches.branch_correlation_test`)
work on boolean masks and a correlation matrix over one *population* of units. This module
builds that population for any layer with branches and fills it:

- a concatenation (Inception paths) or a grouped conv (and the conv that feeds only its
  groups): the population is the layer's units; each branch owns a channel range;
- a residual sum: the population is the summands side by side (the block's output and the
  stream it is added to), each summand a branch of `units` units. Their units are the
  summands' own units, captured from the layers that produce them.

Categories come from probes (`anatomy.probes`), from a user's CSV (layer, unit, category), and
from class preference (the class with the highest mean z-scored activation). Every branch x
category pair of a run gets the hypergeometric upper tail and Fisher's exact test, with
Benjamini-Hochberg across every test of the run (all layers together).
"""
from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..core.branches import BranchCorrelation, branch_correlation_test, preferred_class
from ..core.stats import BranchCategoryTest, benjamini_hochberg, branch_category_tests
from ..errors import UsageError
from ..models.layers import Layer, LayerMap

__all__ = ["BranchPart", "BranchPopulation", "LayerBranchStats", "UnitLabel", "branch_population",
           "branch_report", "branched_layers", "class_categories", "label_categories", "population_values", "probe_categories",
           "read_labels_csv", "run_branch_stats"]


@dataclass(frozen=True)
class BranchPart:
    """One branch's units: population indices [start, stop) = units [source_start, ...) of `source`."""

    name: str
    kind: str
    start: int
    stop: int
    source: str
    source_start: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class BranchPopulation:
    layer: str
    kind: str
    parts: tuple[BranchPart, ...]

    @property
    def units(self) -> int:
        return self.parts[-1].stop if self.parts else 0

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(p.source for p in self.parts))

    def branch_of_unit(self) -> np.ndarray:
        return np.concatenate([np.full(p.size, i) for i, p in enumerate(self.parts)])

    def masks(self) -> dict[str, np.ndarray]:
        out = {}
        for p in self.parts:
            m = np.zeros(self.units, dtype=bool)
            m[p.start:p.stop] = True
            out[p.name] = m
        return out

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "units": self.units,
                "branches": [{"name": p.name, "kind": p.kind, "units": p.size, "range": [p.start, p.stop],
                              "source": p.source, "source_units": [p.source_start, p.source_start + p.size]}
                             for p in self.parts]}


def branched_layers(layer_map: LayerMap) -> list[Layer]:
    """Layers with two or more branches (a depthwise conv's one-channel groups are not branches)."""
    return [layer for layer in layer_map.values() if len(layer.branches) >= 2 and not layer.depthwise]


def branch_population(layer_map: LayerMap, name: str) -> BranchPopulation:
    """The units a layer's branch tests run over, with each branch's range and source layer."""
    layer = layer_map.resolve(name)
    if layer.depthwise:
        raise UsageError(f"layer {layer.name} is depthwise: its {layer.groups} groups are one channel each, not "
                         f"branches; residual sums around it are (see 'netanatomy layers')")
    if len(layer.branches) < 2:
        names = [lay.name for lay in branched_layers(layer_map)]
        hint = (f"; layers with branches: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}" if names
                else "; this model has no layer with branches (concatenations, grouped convs or residual sums)")
        raise UsageError(f"layer {layer.name} has no branches{hint}")
    if layer.kind != "residual":
        parts = tuple(BranchPart(b.name, b.kind, b.start, b.stop, layer.name, b.start) for b in layer.branches)
        return BranchPopulation(layer.name, layer.kind, parts)
    parts, start = [], 0
    for b in layer.branches:
        source = _residual_source(layer_map, layer, b.module or b.name)
        parts.append(BranchPart(b.name, "residual", start, start + b.size, source, 0))
        start += b.size
    return BranchPopulation(layer.name, layer.kind, tuple(parts))


def _residual_source(layer_map: LayerMap, layer: Layer, target: str) -> str:
    try:
        found = layer_map.resolve(target)
    except UsageError:
        raise UsageError(f"cannot capture the summand {target!r} of residual layer {layer.name} on its own") from None
    if found.units != layer.units:
        raise UsageError(f"summand {target!r} of {layer.name} has {found.units} units, the sum {layer.units}")
    return found.name


# ---------------------------------------------------------------------------------------------
# Filling the population: activations, probes, labels, class preference


def population_values(module: nn.Module, populations: Sequence[BranchPopulation], data, *, max_examples: int = 2000,
                      seed: int = 0, device=None, input_shape=None, batch_size: int = 64,
                      show_progress: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{layer: [n, population units]} spatial-mean pre-activations, one capture pass for all."""
    from ..specialization.extract import activation_values

    sources = list(dict.fromkeys(s for pop in populations for s in pop.sources))
    values, labels = activation_values(module, sources, data, max_examples=max_examples, seed=seed, device=device,
                                       input_shape=input_shape, batch_size=batch_size, show_progress=show_progress,
                                       reduce="mean")
    out = {pop.layer: np.concatenate([values[p.source][:, p.source_start:p.source_start + p.size] for p in pop.parts],
                                     axis=1) for pop in populations}
    return out, labels


def _gather(pop: BranchPopulation, per_source: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(per_source[p.source])[p.source_start:p.source_start + p.size] for p in pop.parts])


def probe_categories(module: nn.Module, layer_map: LayerMap, populations: Sequence[BranchPopulation],
                     probes: Sequence[str], **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Per layer: {"categories": {name: mask}, "values": {name: [units]}, "rules": {...}, "notes": [...]}
    from the unit probes of `anatomy.probes`, run once on every source layer."""
    from .probes import probe_layers

    sources = list(dict.fromkeys(s for pop in populations for s in pop.sources))
    results = probe_layers(module, layer_map, sources, probes, **kwargs)
    out = {}
    for pop in populations:
        parts = [results[s] for s in dict.fromkeys(p.source for p in pop.parts)]
        cats = sorted(set.intersection(*(set(r.categories) for r in parts))) if parts else []
        vals = sorted(set.intersection(*(set(r.values) for r in parts))) if parts else []
        rules: dict[str, str] = {}
        for r in parts:
            rules.update({c: r.rules[c] for c in cats if c in r.rules})
        out[pop.layer] = {
            "categories": {c: _gather(pop, {s: results[s].categories[c] for s in pop.sources}).astype(bool)
                           for c in cats},
            "values": {v: _gather(pop, {s: results[s].values[v] for s in pop.sources}) for v in vals},
            "rules": rules,
            "notes": sorted({n for r in parts for n in getattr(r, "notes", ()) or ()}),
        }
    return out


@dataclass(frozen=True)
class UnitLabel:
    layer: str
    unit: int
    category: str


def read_labels_csv(path: str | Path) -> list[UnitLabel]:
    """Rows `layer,unit,category` (a header row with those names is optional; any labels)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"cannot read labels file {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"labels file {p} is not UTF-8 text (expected CSV rows layer,unit,category)") from None
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0]][:3] == ["layer", "unit", "category"]:
        rows = rows[1:]
    labels = []
    for i, row in enumerate(rows, 1):
        if len(row) != 3:
            raise UsageError(f"labels file {p}, row {i}: expected 3 columns layer,unit,category, got {len(row)}")
        layer, unit, category = (c.strip() for c in row)
        try:
            u = int(unit)
        except ValueError:
            raise UsageError(f"labels file {p}, row {i}: unit {unit!r} is not a whole number") from None
        if not layer or not category:
            raise UsageError(f"labels file {p}, row {i}: empty layer or category")
        labels.append(UnitLabel(layer, u, category))
    if not labels:
        raise UsageError(f"labels file {p} has no rows (expected layer,unit,category)")
    return labels


def label_categories(pop: BranchPopulation, labels: Sequence[UnitLabel], layer_map: LayerMap) -> dict[str, np.ndarray]:
    """Category masks over the population from labelled units.

    A row names either the analysed layer (unit = population index; for a residual layer the
    summands' units side by side, as `branch_population` lays them out) or a branch's source
    layer (unit = that layer's own unit). Rows of other layers are left for those layers.
    """
    cats: dict[str, np.ndarray] = {}
    resolved: dict[str, str | None] = {}
    for row in labels:
        if row.layer not in resolved:
            try:
                resolved[row.layer] = layer_map.resolve(row.layer).name
            except UsageError:
                raise UsageError(f"labels: unknown layer {row.layer!r} (see 'netanatomy layers')") from None
        name = resolved[row.layer]
        index = None
        if name == pop.layer:
            if not 0 <= row.unit < pop.units:
                raise UsageError(f"labels: unit {row.unit} of {row.layer} is out of range (0-{pop.units - 1})")
            index = row.unit
        else:
            # a branch named by its own layer (a concatenated path) or a summand's source layer
            part = next((q for q in pop.parts if name in (q.name, q.source) or row.layer == q.name), None)
            if part is not None:
                offset = part.source_start if part.source == name and part.source != pop.layer else 0
                if not 0 <= row.unit - offset < part.size:
                    raise UsageError(f"labels: unit {row.unit} of {row.layer} is out of range (it has "
                                     f"{part.size} units)")
                index = part.start + row.unit - offset
        if index is not None:
            cats.setdefault(row.category, np.zeros(pop.units, dtype=bool))[index] = True
    return cats


def class_categories(values: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None) -> dict[str, np.ndarray]:
    """"prefers C": units whose highest mean z-scored activation is on class C."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() < 0 or len(np.unique(labels)) < 2:
        raise UsageError("the class-preference probe needs labelled data with at least two classes")
    prefer = preferred_class(values, labels)
    k = int(labels.max()) + 1
    names = list(class_names or []) + [str(c) for c in range(len(class_names or []), k)]
    return {f"prefers {names[c]}": prefer == c for c in range(k) if np.any(prefer == c)}


# ---------------------------------------------------------------------------------------------
# The run: every layer's tests, BH over all of them


@dataclass
class LayerBranchStats:
    population: BranchPopulation
    tests: list[BranchCategoryTest]
    correlation: BranchCorrelation | None
    categories: dict[str, np.ndarray] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # category -> "probe" | "labels" | "classes"
    unit_values: dict[str, np.ndarray] = field(default_factory=dict)
    corr: np.ndarray | None = None
    rules: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        by_branch: dict[str, list[dict]] = {p.name: [] for p in self.population.parts}
        for t in self.tests:
            by_branch[t.branch].append({
                "category": t.category, "source": self.sources.get(t.category, ""), "count": t.in_both,
                "expected": t.branch_size * t.category_size / t.population, "category_units": t.category_size,
                "p": t.p_tail, "log_p": t.log_p_tail, "p_fisher": t.p_fisher, "odds_ratio": t.odds_ratio,
                "q": t.q})
        out = self.population.to_json()
        for b in out["branches"]:
            b["categories"] = by_branch[b["name"]]
        out["categories"] = {c: {"units": int(m.sum()), "source": self.sources.get(c, ""),
                                 **({"rule": self.rules[c]} if c in self.rules else {})}
                             for c, m in self.categories.items()}
        out["correlation"] = self.correlation.to_dict() if self.correlation is not None else None
        if self.notes:
            out["notes"] = self.notes
        return out


def _testable(categories: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Categories that hold some but not all units (the others cannot be enriched anywhere)."""
    return {c: m for c, m in categories.items() if 0 < int(np.sum(m)) < m.size}


def run_branch_stats(populations: Sequence[BranchPopulation], categories: Mapping[str, Mapping[str, np.ndarray]],
                     sources: Mapping[str, Mapping[str, str]], values: Mapping[str, np.ndarray] | None = None, *,
                     n_permutations: int = 999, seed: int = 0) -> list[LayerBranchStats]:
    """Enrichment tests for every layer x branch x category, q by BH over the whole run, and the
    within- vs between-branch correlation test where activations are given."""
    results = []
    for pop in populations:
        cats = _testable(categories.get(pop.layer, {}))
        tests = branch_category_tests(pop.masks(), cats) if cats else []
        corr, corr_test = None, None
        if values is not None and pop.layer in values:
            v = values[pop.layer]
            if v.shape[0] >= 3:
                with np.errstate(invalid="ignore", divide="ignore"):
                    corr = np.nan_to_num(np.corrcoef(v, rowvar=False))
                corr_test = branch_correlation_test(corr, pop.branch_of_unit(), n_permutations=n_permutations, seed=seed)
        dropped = sorted(set(categories.get(pop.layer, {})) - set(cats))
        notes = [f"not tested (no unit or every unit): {', '.join(dropped)}"] if dropped else []
        results.append(LayerBranchStats(pop, tests, corr_test, dict(cats), dict(sources.get(pop.layer, {})), corr=corr,
                                        notes=notes))
    every = [t for r in results for t in r.tests]
    if every:
        q = benjamini_hochberg([t.p_tail for t in every])
        it = iter(q)
        for r in results:
            r.tests = [BranchCategoryTest(**{**t.__dict__, "q": float(next(it))}) for t in r.tests]
    return results


def branch_report(module: nn.Module, layer_map: LayerMap, populations: Sequence[BranchPopulation], data, *,
                  probes: Sequence[str] = (), labels: Sequence[UnitLabel] = (), classes: bool = False,
                  examples: int = 1000, permutations: int = 999, seed: int = 0, device=None,
                  show_progress: bool = True) -> list[LayerBranchStats]:
    """The whole run behind `netanatomy branches` and the survey: categories from `labels`, the unit
    `probes` (the colour probe on `data`) and, with `classes`, class preference on `data`;
    activations of `data` for the correlation test; every test with BH over the run."""
    categories: dict[str, dict] = {p.layer: {} for p in populations}
    sources: dict[str, dict] = {p.layer: {} for p in populations}
    rules: dict[str, dict] = {p.layer: {} for p in populations}
    notes: dict[str, list] = {p.layer: [] for p in populations}
    for pop in populations:
        for c, m in label_categories(pop, labels, layer_map).items():
            categories[pop.layer][c], sources[pop.layer][c] = m, "labels"
    if probes:
        found = probe_categories(module, layer_map, populations, probes, data=data, device=device, seed=seed,
                                 show_progress=show_progress)
        for pop in populations:
            for c, m in found[pop.layer]["categories"].items():
                categories[pop.layer][c], sources[pop.layer][c] = m, "probe"
            rules[pop.layer].update(found[pop.layer]["rules"])
            notes[pop.layer] += found[pop.layer]["notes"]
    values, data_labels = population_values(module, populations, data, max_examples=examples, seed=seed,
                                            device=device, input_shape=layer_map.input_shape,
                                            show_progress=show_progress)
    if classes:
        class_names = list(getattr(data, "classes", None) or []) or None
        for pop in populations:
            for c, m in class_categories(values[pop.layer], data_labels, class_names).items():
                categories[pop.layer][c], sources[pop.layer][c] = m, "classes"
    stats = run_branch_stats(populations, categories, sources, values, n_permutations=permutations, seed=seed)
    for st in stats:
        st.rules = rules[st.population.layer]
        st.notes = notes[st.population.layer] + st.notes
    return stats
