"""The analyses a survey runs, one function per part, each returning plain JSON and writing
its figures under the atlas's `files/` folder (paths in the JSON are relative to the atlas).

Every part is a thin composition of the library's own functions (banding, NMF pictures, SVD,
rotation families, probes, branch statistics, clusters, lesions, coherence, examples, renders),
so the atlas shows exactly what the commands print.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..models.layers import Layer, LayerMap
from ..util.figures import pyplot
from ..util.io import save_figure, save_png

Progress = Callable[[str], None]


@dataclass
class SurveyContext:
    """What every part needs: the loaded model, its layers, the data, where files go."""

    loaded: Any
    layer_map: LayerMap
    dataset: Any
    root: Path            # the atlas folder
    layers: list[str]     # layers whose units get pages (renders, examples, probes)
    seed: int
    device: str
    steps: int
    param_size: int | None
    runner: Any = None    # where the parts' tasks run (scale): here when None
    store: Any = None     # the running part's TaskStore (set by the survey around each part)

    @property
    def module(self) -> torch.nn.Module:
        return self.loaded.module

    def file(self, *parts: str) -> Path:
        path = self.root.joinpath("files", *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def stem(name: str) -> str:
    """A file name for a layer name (the names users type may hold dots and @)."""
    from ..util.io import file_stem

    return file_stem(name)


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)



# ---------------------------------------------------------------------------------------------
# layers


def layers_part(ctx: SurveyContext) -> dict[str, Any]:
    from ..anatomy import INPUT, feeding_layer

    out = []
    for layer in ctx.layer_map.values():
        reads: list[str] = []
        if layer.kind in ("conv", "linear"):
            found = feeding_layer(ctx.module, ctx.layer_map, layer)
            reads = [found if found != INPUT else "input"] if found else []
        elif layer.kind == "concat":
            reads = [b.name for b in layer.branches if b.name in ctx.layer_map]
        elif layer.kind == "residual":
            reads = [_source(ctx.layer_map, b) for b in layer.branches]
            reads = [r for r in reads if r]
        j = layer.to_json()
        out.append({"name": layer.name, "kind": layer.kind, "units": layer.units, "kernel_size": j["kernel_size"],
                    "groups": layer.groups, "depthwise": layer.depthwise, "reads": reads,
                    "branches": j["branches"], "activation": layer.activation})
    return {"layers": out}


def _source(layer_map: LayerMap, branch) -> str | None:
    for name in (branch.module, branch.name):
        if name:
            try:
                return layer_map.resolve(name).name
            except UsageError:
                continue
    return None


# ---------------------------------------------------------------------------------------------
# banding


def banding_part(ctx: SurveyContext, permutations: int = 999) -> dict[str, Any]:
    from ..anatomy import model_banding

    records = model_banding(ctx.module, ctx.layer_map, n_permutations=permutations, seed=ctx.seed, show_progress=False)
    scored = [r for r in records if r.get("horizontal") is not None]
    figure = None
    if scored:
        fig = banding_figure(scored, ctx.loaded.source)
        figure = ctx.rel(save_figure(fig, ctx.file("banding", "all_layers.png"), dpi=100, bbox_inches="tight"))
        _close(fig)
    return {"records": records, "figure": figure}


def banding_figure(records: Sequence[dict[str, Any]], model: str) -> Any:
    """H and V of every scored layer, the chance level of its kernel size, and the verdict."""
    plt = pyplot()
    n = len(records)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.34 * n + 2.5), 4.2))
    x = np.arange(n)
    h = [r["horizontal"] for r in records]
    v = [r["vertical"] for r in records]
    ax.bar(x - 0.2, h, width=0.4, color="#d62728", label="H: energy in row averages (horizontal bands)")
    ax.bar(x + 0.2, v, width=0.4, color="#1f77b4", label="V: energy in column averages (vertical bands)")
    for xi, r in zip(x, records):
        chance = r.get("expected_h")   # E[H] of a kernel of iid weights: (kh - 1) / (kh kw - 1)
        if chance is not None:
            ax.plot([xi - 0.42, xi + 0.42], [chance, chance], color="k", lw=1)
        mark = {"horizontal": "H", "vertical": "V"}.get(r.get("orientation") or "", "")
        if mark:
            ax.text(xi, max(r["horizontal"], r["vertical"]) + 0.01, mark, ha="center", fontsize=8, weight="bold")
    ax.set_xticks(x, [r["layer"] for r in records], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("share of the kernels' centred energy")
    ax.set_title(f"{model}: weight banding per layer (black line: chance, E[H] for iid weights; "
                 "letter: banded, permutation p < 0.01)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# weights: NMF pictures, per unit and per layer


def _drawable(layer: Layer) -> bool:
    return layer.kind == "conv" and bool(layer.kernel_size) and max(layer.kernel_size) > 1


def weights_part(ctx: SurveyContext, max_units: int = 256) -> dict[str, Any]:
    from ..anatomy import INPUT, feeding_layer, layer_pictures, layer_weights
    from ..anatomy.plots import weights_figure
    from ..core.pictures import upscale

    # per-unit pictures for the layers with unit pages, and the paths of their concatenations
    # (a concatenation's unit shows its path's unit)
    paged = set(ctx.layers)
    for name in ctx.layers:
        lay = ctx.layer_map.resolve(name)
        if lay.kind == "concat":
            paged |= {b.name for b in lay.branches}
    out: dict[str, Any] = {}
    for layer in ctx.layer_map.values():
        if not _drawable(layer):
            continue
        lw = layer_weights(ctx.module, ctx.layer_map, layer, dense_groups=None)
        pics = layer_pictures(lw.weights, seed=ctx.seed)
        reads_image = feeding_layer(ctx.module, ctx.layer_map, layer) == INPUT
        names = (["R", "G", "B"] if lw.weights.shape[1] == 3 else None) if reads_image else None
        fig = weights_figure(pics, layer.name, max_units=max_units, channel_names=names, note=lw.note)
        grid = ctx.rel(save_figure(fig, ctx.file("weights", f"{stem(layer.name)}.png"), dpi=100, bbox_inches="tight"))
        _close(fig)
        units = {}
        if layer.name in paged:
            factor = max(1, 48 // max(pics.pictures.shape[1:3]))
            for u in range(pics.pictures.shape[0]):
                path = ctx.file("weights", stem(layer.name), f"{u}.png")
                save_png(upscale(pics.pictures[u:u + 1], factor)[0], path)
                units[str(u)] = ctx.rel(path)
        out[layer.name] = {"figure": grid, "units": units, "error": float(pics.factors.error.mean())}
    return out


# ---------------------------------------------------------------------------------------------
# SVD of |W| between a layer and the one feeding it


def svd_part(ctx: SurveyContext) -> dict[str, Any]:
    from ..anatomy import INPUT, feeding_layer, layer_svd
    from ..anatomy.plots import svd_placement_figure

    out: dict[str, Any] = {}
    for layer in ctx.layer_map.values():
        if layer.kind != "conv" or layer.depthwise:
            continue
        lower = feeding_layer(ctx.module, ctx.layer_map, layer)
        if lower in (None, INPUT):
            continue
        try:
            report = layer_svd(ctx.module, ctx.layer_map, layer.name)
        except UsageError:
            continue
        d = report.to_dict(2)
        fig = svd_placement_figure(report)
        path = ctx.rel(save_figure(fig, ctx.file("svd", f"{stem(layer.name)}.png"), dpi=90, bbox_inches="tight"))
        _close(fig)
        out[layer.name] = {"lower": report.lower, "shares": [float(s) for s in d["shares"][:5]],
                           "correlations": d.get("correlations") or {}, "figure": path, "note": report.note}
    return out


# ---------------------------------------------------------------------------------------------
# rotation families of the first layers


def families_part(ctx: SurveyContext) -> dict[str, Any]:
    from ..anatomy import INPUT, family_figure, feeding_layer, layer_rotation_families, layer_weights

    out: dict[str, Any] = {}
    for layer in ctx.layer_map.values():
        if not _drawable(layer) or feeding_layer(ctx.module, ctx.layer_map, layer) != INPUT:
            continue
        if layer.kernel_size[0] != layer.kernel_size[1]:
            continue
        found = layer_rotation_families(ctx.module, ctx.layer_map, layer.name)
        figure = None
        if found["families"]:
            filters = layer_weights(ctx.module, ctx.layer_map, layer.name).weights
            fig = family_figure(filters, found["families"], title=f"Rotation families of {ctx.loaded.source}, "
                                f"layer {layer.name}", resolution=float(found["families"][0]["resolution"]))
            figure = ctx.rel(save_figure(fig, ctx.file("families", f"{stem(layer.name)}.png"), dpi=fig.dpi,
                                         facecolor="white"))
            _close(fig)
        out[layer.name] = {**found, "figure": figure}
    return out


# ---------------------------------------------------------------------------------------------
# probes and branch statistics


def probes_part(ctx: SurveyContext, layers: Sequence[str]) -> dict[str, Any]:
    from ..anatomy.probes import default_probes, probe_layers

    data = ctx.dataset if _channels(ctx) == 3 else None
    results = probe_layers(ctx.module, ctx.layer_map, list(layers), default_probes(_channels(ctx)), data=data,
                           device=ctx.device, seed=ctx.seed, show_progress=False)
    return {name: r.to_json() for name, r in results.items()}


def _channels(ctx: SurveyContext) -> int:
    return int(ctx.loaded.input_shape[0]) if ctx.loaded.input_shape else 3


def branches_part(ctx: SurveyContext, examples: int = 1000, permutations: int = 999) -> dict[str, Any]:
    from ..anatomy import branch_stats as bs
    from ..anatomy.branch_plots import branch_figures
    from ..anatomy.probes import default_probes

    layers = bs.branched_layers(ctx.layer_map)
    if not layers:
        return {"layers": [], "note": "no layer with branches"}
    populations = [bs.branch_population(ctx.layer_map, lay.name) for lay in layers]
    stats = bs.branch_report(ctx.module, ctx.layer_map, populations, ctx.dataset, probes=default_probes(_channels(ctx)),
                             examples=examples, permutations=permutations,
                             seed=ctx.seed, device=ctx.device, show_progress=False)
    out = []
    for s in stats:
        doc = s.to_json()
        files = branch_figures(ctx.module, ctx.layer_map, s, ctx.root / "files" / "branches")
        doc["figures"] = {k: ctx.rel(Path(v)) for k, v in files.items()}
        out.append(doc)
    return {"layers": out}


# ---------------------------------------------------------------------------------------------
# clusters, importance, coherence


def clusters_part(ctx: SurveyContext, k: int, shuffles: int) -> dict[str, Any]:
    from ..specialization.clusters import cluster_model

    result = cluster_model(ctx.module, ctx.layer_map, graph="weights", k=k, n_shuffles=shuffles, seed=ctx.seed,
                           n_init=10, runner=ctx.runner, store=ctx.store)
    return result.to_json()


def _clusters(doc: dict[str, Any]):
    from ..specialization.subclusters import clusters_from_json

    return clusters_from_json(doc)


def labels_are_classes(ctx: SurveyContext) -> str | None:
    """None when the data's labels are the model's classes (lesions and coherence mean something),
    else the reason they are not."""
    ds = ctx.dataset
    labels = getattr(ds, "targets", None)
    if labels is None or len(labels) == 0 or int(np.min(np.asarray(labels))) < 0:
        return "the data has no labels"
    model_names = list(getattr(ctx.loaded, "class_names", None) or [])
    data_names = list(getattr(ds, "classes", None) or [])
    if model_names and data_names:
        return None if model_names[:len(data_names)] == data_names else \
            "the data's labels are not the model's classes (e.g. photo names for an ImageNet model)"
    outputs = getattr(ctx.loaded, "num_classes", None)
    if outputs and int(np.max(np.asarray(labels))) < outputs:
        return None
    return "the data's labels do not match the model's outputs"


LESION_EXAMPLES = 500  # examples the lesions are scored on (the first of the survey's data)


def importance_part(ctx: SurveyContext, clusters_doc: dict[str, Any], n_random: int) -> dict[str, Any]:
    from ..specialization.importance import importance

    x, y = ctx.dataset.tensors(list(range(min(len(ctx.dataset), LESION_EXAMPLES))))
    result = importance(ctx.module, ctx.layer_map, _clusters(clusters_doc), x, y, n_random=n_random, seed=ctx.seed,
                        num_classes=ctx.loaded.num_classes, device=ctx.device, runner=ctx.runner,
                        store=ctx.store)
    doc = result.to_json()
    for t, j in zip(result.tests, doc["sub_clusters"]):
        j["random_drops"] = [float(v) for v in t.random_drop]
    return doc


def importance_estimate(ctx: SurveyContext, clusters_doc: dict[str, Any], n_random: int,
                        calibration: int = 200) -> float:
    """Seconds the lesions would take, scaled from one random set per sub-cluster on a few examples."""
    import time

    from ..specialization.importance import importance

    x, y = ctx.dataset.tensors(list(range(min(len(ctx.dataset), calibration))))
    began = time.perf_counter()
    try:
        importance(ctx.module, ctx.layer_map, _clusters(clusters_doc), x, y, n_random=1, seed=ctx.seed,
                   num_classes=ctx.loaded.num_classes, device=ctx.device)
    except UsageError:
        return 0.0  # the part itself will say why it does not apply
    seconds = time.perf_counter() - began
    # the calibration is mostly fixed costs (tracing, the float64 check); lesion forwards grow with
    # sets x examples. Measured on Minception: 1/4 of the calibration per extra unit of work
    # over-estimates 1.5x, which errs on the side of the budget
    work = (n_random + 1) * min(len(ctx.dataset), LESION_EXAMPLES) / (2 * max(1, x.shape[0]))
    return seconds * (1 + 0.25 * max(0.0, work - 1))


def coherence_part(ctx: SurveyContext, clusters_doc: dict[str, Any], n_random: int) -> dict[str, Any]:
    from ..specialization.coherence import coherence
    from ..specialization.extract import activation_values
    from ..specialization.importance import lesionable_layers

    clusters = _clusters(clusters_doc)
    layers = [n for n in lesionable_layers(ctx.layer_map) if any(lay == n for c in clusters for lay, _ in c.units)]
    if not layers:
        return {"tests": []}
    values, labels = activation_values(ctx.module, layers, ctx.dataset, max_examples=None, seed=ctx.seed,
                                       device=ctx.device, input_shape=ctx.loaded.input_shape, show_progress=False)
    result = coherence(values, labels, clusters, n_random=n_random, seed=ctx.seed, kinds=["dataset", "correlation"],
                       num_classes=ctx.loaded.num_classes, show_progress=False)
    return result.to_json()


# ---------------------------------------------------------------------------------------------
# connections: strongest upstream and downstream units through each layer's own weights


def connections_part(ctx: SurveyContext, top: int = 5) -> dict[str, Any]:
    """{layer: {unit: {"upstream": [...], "downstream": [...]}}} from |W| summed over positions of
    every conv/linear layer whose input layer is known (adjacent layers: the expanded weights are
    the weights themselves)."""
    from ..anatomy import INPUT, feeding_layer, layer_weights

    out: dict[str, dict[str, dict[str, list]]] = {}

    def entry(layer: str, unit: int) -> dict[str, list]:
        return out.setdefault(layer, {}).setdefault(str(unit), {"upstream": [], "downstream": []})

    for layer in ctx.layer_map.values():
        if layer.kind not in ("conv", "linear"):
            continue
        lower = feeding_layer(ctx.module, ctx.layer_map, layer)
        if lower is None:
            continue
        try:
            w = layer_weights(ctx.module, ctx.layer_map, layer, dense_groups=True).weights
        except UsageError:
            continue
        m = w.abs().flatten(2).sum(2) if w.ndim == 4 else w.abs()
        m = m.double().numpy()
        lower_name = "input" if lower == INPUT else lower
        lower_units = m.shape[1]
        if lower != INPUT and ctx.layer_map.resolve(lower).units != lower_units:
            continue
        kk = min(top, lower_units)
        for u in range(m.shape[0]):
            best = np.argsort(-m[u], kind="stable")[:kk]
            entry(layer.name, u)["upstream"] = [{"layer": lower_name, "unit": int(i), "weight": float(m[u, i])}
                                                for i in best if m[u, i] > 0]   # no links that do not exist
        if lower == INPUT:
            continue
        kk = min(top, m.shape[0])
        for i in range(lower_units):
            best = np.argsort(-m[:, i], kind="stable")[:kk]
            entry(lower, i)["downstream"] += [{"layer": layer.name, "unit": int(u), "weight": float(m[u, i])}
                                              for u in best if m[u, i] > 0]
    for layer_units in out.values():
        for e in layer_units.values():
            e["downstream"] = sorted(e["downstream"], key=lambda d: -d["weight"])[:top]
    return out


# ---------------------------------------------------------------------------------------------
# dataset examples and feature visualizations, one layer at a time


def examples_part(ctx: SurveyContext, layer: str, top_k: int = 6) -> dict[str, Any]:
    from ..visualize.examples import dataset_examples, examples_sheet

    found = dataset_examples(ctx.module, layer, ctx.dataset, top_k=top_k, rank="max", device=ctx.device,
                             input_shape=ctx.layer_map.input_shape, show_progress=False)
    classes = list(getattr(ctx.dataset, "classes", None) or []) or None
    units = {}
    for i, u in enumerate(found.units):
        path = ctx.file("examples", stem(layer), f"{u}.png")
        save_png(examples_sheet(found.subset([i]), class_names=classes), path)
        units[str(u)] = ctx.rel(path)
    return {"units": units, "top_k": top_k}


def render_rate(ctx: SurveyContext, layers: Sequence[str], images: int = 64, steps: int = 3) -> float:
    """Seconds per image-step of rendering `layers`' units, from a short timed run (the first
    step, which pays for tracing, is left out)."""
    import time

    from ..visualize import channel, render

    resolved = [ctx.layer_map.resolve(n) for n in layers]
    objectives = [channel(lay.name, u) for lay in resolved for u in range(lay.units)][:images]
    render(ctx.module, objectives[:1], steps=1, seed=ctx.seed, device=ctx.device, show_progress=False,
           param_size=ctx.param_size)
    began = time.perf_counter()
    render(ctx.module, objectives, steps=steps, seed=ctx.seed, device=ctx.device, show_progress=False,
           param_size=ctx.param_size)
    return (time.perf_counter() - began) / (len(objectives) * steps)


# Renders of a chunk of layers are optimized this many at a time, each batch one task (`scale`):
# the same batches here and on Ray workers, so the same images.
RENDER_TASK_IMAGES = 64


def render_part(ctx: SurveyContext, layers: Sequence[str]) -> dict[str, Any]:
    """Feature visualizations of every unit of `layers`, in batches of RENDER_TASK_IMAGES (the
    forward stops at the deepest layer of a batch; on a CPU a batch runs in cache-sized
    micro-batches)."""
    from ..core.pictures import picture_grid
    from ..visualize import channel, render

    resolved = [ctx.layer_map.resolve(n) for n in layers]
    objectives = [channel(lay.name, u) for lay in resolved for u in range(lay.units)]
    rendering = render(ctx.module, objectives, steps=ctx.steps, seed=ctx.seed, device=ctx.device,
                       show_progress=False, param_size=ctx.param_size, batch_size=RENDER_TASK_IMAGES,
                       runner=ctx.runner, store=ctx.store)
    images = rendering.images.permute(0, 2, 3, 1).numpy()
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    out: dict[str, Any] = {}
    start = 0
    for lay in resolved:
        block = images[start:start + lay.units]
        units = {}
        for u in range(lay.units):
            path = ctx.file("render", stem(lay.name), f"{u}.png")
            save_png(block[u], path)
            units[str(u)] = ctx.rel(path)
        scale = max(1, 64 // block.shape[1])
        grid = ctx.rel(save_png(picture_grid(block, scale=scale, pad=2), ctx.file("render", f"{stem(lay.name)}_grid.png")))
        out[lay.name] = {"units": units, "values": [float(v) for v in rendering.values[start:start + lay.units]],
                         "steps": ctx.steps, "grid": grid}
        start += lay.units
    return out


DIVERSITY_COPIES = 3     # images per unit in a diversity group
DIVERSITY_UNITS = 8      # units per layer that get diversity samples (the first ones)
DIVERSITY_WEIGHT = 100.0


def diversity_units(ctx: SurveyContext, layers: Sequence[str]) -> list[tuple[str, int]]:
    """The (layer, unit) pairs that get diversity samples: the first units of every layer with maps."""
    out = []
    for name in layers:
        lay = ctx.layer_map.resolve(name)
        if lay.spatial:
            out += [(lay.name, u) for u in range(min(lay.units, DIVERSITY_UNITS))]
    return out


def diversity_part(ctx: SurveyContext, layers: Sequence[str]) -> dict[str, Any]:
    """Several different images that each excite a unit: its channel objective plus a Gram-matrix
    diversity term shared by its copies (Lucid's recipe), a few units per batched optimization."""
    from ..visualize import channel, diversity, render

    pairs = diversity_units(ctx, layers)
    if not pairs:
        return {}
    objectives = []
    for name, u in pairs:
        obj = channel(name, u) + DIVERSITY_WEIGHT * diversity(name, key=f"unit{u}")
        objectives += [obj] * DIVERSITY_COPIES
    # whole groups per batch: the diversity term is over a unit's copies
    per_batch = DIVERSITY_COPIES * max(1, RENDER_TASK_IMAGES // DIVERSITY_COPIES)
    rendering = render(ctx.module, objectives, steps=ctx.steps, seed=ctx.seed, device=ctx.device,
                       show_progress=False, param_size=ctx.param_size, batch_size=per_batch, runner=ctx.runner,
                       store=ctx.store)
    images = rendering.images.permute(0, 2, 3, 1).numpy()
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    out: dict[str, dict[str, list[str]]] = {}
    for i, (name, u) in enumerate(pairs):
        files = []
        for k in range(DIVERSITY_COPIES):
            path = ctx.file("render", stem(name), f"{u}_d{k}.png")
            save_png(images[i * DIVERSITY_COPIES + k], path)
            files.append(ctx.rel(path))
        out.setdefault(name, {})[str(u)] = files
    return out
