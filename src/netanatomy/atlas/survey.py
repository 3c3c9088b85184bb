"""The survey: every analysis that applies to a model, within a time budget, resumable, as an atlas.

Parts run cheapest and most informative first (layers, banding, weight pictures, SVD, rotation
families, connections), then the ones that cost model passes (probes and branch statistics,
clusters with shuffles, dataset examples layer by layer, feature visualizations in chunks of
layers), and last coherence and lesions (the slowest, and not what a reader opens first). Each part's result is a stage (`labs/stages.py`): written once, atomically, under
`OUT/results/`, and re-used by a later run with the same settings, so a killed survey re-run
does only what is missing; within a part, its finished tasks (shuffles, render batches, lesion
blocks: `scale`) are kept in `OUT/results/tasks/PART/` until the part is written, so even a
long part resumes where it stopped. Before an expensive part (or layer) starts, its cost is estimated
from what the run has measured so far; if it would not fit in what is left of the budget it is
"left out", with the reason, and the atlas says so. `OUT/atlas.json` (the site's one input) is
assembled from the stages at the end, and the site is built from it (`atlas/site.py`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..labs.stages import run_stage
from ..scale import TaskStore
from ..util.devices import synchronize
from ..util.io import write_json
from ..util.progress import progress
from . import parts as P

DEFAULT_MODEL = "zoo:minception-fmnist"
DEFAULT_DATA = "bundled"


@dataclass(frozen=True)
class SurveySettings:
    model: str = DEFAULT_MODEL
    weights: str | None = None
    model_args: tuple[str, ...] = ()
    data: str | None = None          # None: bundled for the default model, photo patches for colour models
    layers: tuple[str, ...] = ()     # layers with unit pages; () = every conv, linear and concat layer
    budget_min: float = 5.0
    steps: int = 128                 # render steps
    param_size: int | None = None
    k: int = 12
    shuffles: int = 19
    n_random: int = 49              # random sets per sub-cluster: p can reach 0.02
    examples: int = 2000             # data examples used (a seeded sample when the set is larger)
    seed: int = 0
    device: str = "cpu"

    def key_settings(self) -> dict[str, Any]:
        """What the results depend on (the budget and device do not change a finished part)."""
        d = asdict(self)
        d.pop("budget_min")
        d.pop("device")
        return d


@dataclass
class Budget:
    """Seconds left, and the record of what ran, was re-used or was left out."""

    seconds: float
    started: float = field(default_factory=time.perf_counter)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    render_rate: float = 0.0  # seconds per image-step, from a short calibration render

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def fits(self, estimate: float) -> bool:
        return estimate <= self.left()

    def record(self, name: str, status: str, seconds: float = 0.0, reason: str = "") -> None:
        self.parts[name] = {"status": status, "seconds": round(float(seconds), 2), **({"reason": reason} if reason else {})}


def default_layers(layer_map) -> list[str]:
    """Layers whose units get pages: every conv, linear and concatenation layer (not residual sums,
    whose units are their summands')."""
    return [lay.name for lay in layer_map.values() if lay.kind in ("conv", "linear", "concat")]


def run_survey(out: str | Path, settings: SurveySettings = SurveySettings(), *, loaded=None, dataset=None,
               log: Callable[[str], None] | None = None, build: bool = True, runner: Any = None) -> dict[str, Any]:
    """Survey a model into the atlas folder `out`; returns the atlas document (also atlas.json).

    `runner` (`scale`) runs the parts' repeated work (shuffles, render batches, lesions) as tasks
    there (Ray workers); the parts' results do not depend on it."""
    from ..models.layers import discover_layers

    root = Path(out)
    results = root / "results"
    log = log or (lambda m: None)
    budget = Budget(settings.budget_min * 60.0)
    if loaded is None or dataset is None:
        raise ValueError("run_survey needs the loaded model and data set (the CLI opens them)")
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    layers = [layer_map.resolve(n).name for n in settings.layers] if settings.layers else default_layers(layer_map)
    ctx = P.SurveyContext(loaded, layer_map, dataset, root, layers, settings.seed, settings.device, settings.steps,
                          settings.param_size, runner)
    base = settings.key_settings()
    got: dict[str, Any] = {}

    def stage(name: str, compute: Callable[[], Any], estimate: float = 0.0, extra: dict | None = None,
              files: Sequence[str] = ()) -> Any:
        stage_settings = {**base, "part": name, **(extra or {})}
        from ..labs.stages import read_stage

        stored = read_stage(results, _file_name(name), stage_settings)
        if stored is not None and all((root / f).exists() for f in _files_of(stored.result, files)):
            budget.record(name, "done (re-used)", stored.seconds)
            return stored.result
        if not budget.fits(estimate):
            budget.record(name, "left out", reason=f"the budget: needs about {estimate:.0f} s, {max(budget.left(), 0):.0f} s left")
            log(f"left out {name}: {budget.parts[name]['reason']}")
            return None
        log(f"{name} ...")
        began = time.perf_counter()
        # the part's finished tasks (shuffles, render batches, lesion blocks), kept until its stage is written
        ctx.store = TaskStore(results / "tasks" / _file_name(name), stage_settings)
        try:
            result = run_stage(results, _file_name(name), stage_settings, compute).result
        except UsageError as exc:  # the part does not apply to this model or data: say why, go on
            budget.record(name, "skipped", time.perf_counter() - began, reason=str(exc))
            log(f"skipped {name}: {exc}")
            return None
        finally:
            store, ctx.store = ctx.store, None
        store.clear()
        budget.record(name, "done", time.perf_counter() - began)
        if estimate:
            budget.parts[name]["estimate"] = round(float(estimate), 1)
        log(f"{name}: {time.perf_counter() - began:.1f} s")
        return result

    # cheap parts: seconds even on large models
    got["layers"] = stage("layers", lambda: P.layers_part(ctx))
    got["banding"] = stage("banding", lambda: P.banding_part(ctx))
    got["weights"] = stage("weights", lambda: P.weights_part(ctx), files=("figure",))
    got["svd"] = stage("svd", lambda: P.svd_part(ctx))
    got["families"] = stage("families", lambda: P.families_part(ctx))
    got["connections"] = stage("connections", lambda: P.connections_part(ctx))

    # one forward over a batch calibrates the estimates of the parts that run the model
    per_example = _forward_seconds(loaded, dataset, settings.device)
    n_data = len(dataset)
    got["probes"] = stage("probes", lambda: P.probes_part(ctx, layers), estimate=per_example * (2 * min(n_data, 500) + 400))
    got["branches"] = stage("branches", lambda: P.branches_part(ctx), estimate=per_example * (2 * min(n_data, 500) + 400 + n_data))
    got["clusters"] = stage("clusters", lambda: P.clusters_part(ctx, settings.k, settings.shuffles),
                            estimate=0.0, extra={"k": settings.k, "shuffles": settings.shuffles})
    # dataset examples layer by layer; renders in chunks of layers (one batched optimization each),
    # each estimate from the rate measured so far
    got["examples"], got["render"] = {}, {}
    drawn = own_pictures(layer_map, layers)
    chunks = render_chunks(layer_map, drawn)
    bar = progress(total=len(drawn) + len(chunks), desc="survey pages", unit="part")
    try:
        for name in drawn:
            got["examples"][name] = stage(f"examples/{name}", lambda n=name: P.examples_part(ctx, n),
                                          estimate=_examples_estimate(budget, per_example, n_data), files=("units",))
            bar.update(1)
        for i, chunk in enumerate(chunks):
            units = sum(layer_map.resolve(n).units for n in chunk)
            part = f"render/{i}"
            extra = {"layers": list(chunk), "steps": settings.steps, "param_size": settings.param_size}
            if i == 0 and not _stored(results, base, part, extra):
                budget.render_rate = P.render_rate(ctx, chunk)
            done = stage(part, lambda c=chunk: P.render_part(ctx, c),
                         estimate=_render_estimate(budget, units, settings.steps), extra=extra)
            budget.parts[part]["layers"] = list(chunk)
            if done is not None:
                got["render"].update(done)
                budget.parts[part]["units_steps"] = units * settings.steps
            bar.update(1)
    finally:
        bar.close()
    pairs = P.diversity_units(ctx, drawn)
    got["diversity"] = stage("diversity", lambda: P.diversity_part(ctx, drawn),
                             estimate=_render_estimate(budget, len(pairs) * P.DIVERSITY_COPIES, settings.steps),
                             extra={"layers": drawn, "steps": settings.steps, "param_size": settings.param_size,
                                    "copies": P.DIVERSITY_COPIES, "units": P.DIVERSITY_UNITS}) if pairs else None

    # lesions and coherence last: the pictures are what a reader opens first
    reason = P.labels_are_classes(ctx)
    if got["clusters"] is not None and reason is None:
        got["coherence"] = stage("coherence", lambda: P.coherence_part(ctx, got["clusters"], settings.n_random),
                                 estimate=per_example * n_data, extra={"n_random": settings.n_random})
        estimate = 0.0
        if not _stored(results, base, "importance", {"n_random": settings.n_random}) and budget.left() > 0:
            estimate = P.importance_estimate(ctx, got["clusters"], settings.n_random)
        got["importance"] = stage("importance", lambda: P.importance_part(ctx, got["clusters"], settings.n_random),
                                  estimate=estimate,
                                  extra={"n_random": settings.n_random})
    else:
        why = reason or "no clusters"
        for name in ("importance", "coherence"):
            budget.record(name, "skipped", reason=why)
            got[name] = None

    try:
        (results / "tasks").rmdir()   # every part's tasks are written into its stage by now
    except OSError:
        pass
    doc = assemble(ctx, settings, got, budget)
    write_json(root / "atlas.json", doc)
    if build:
        from .site import build_site

        build_site(root)
    return doc


def _stored(results: Path, base: dict, part: str, extra: dict) -> bool:
    from ..labs.stages import read_stage

    return read_stage(results, _file_name(part), {**base, "part": part, **extra}) is not None


def _file_name(part: str) -> str:
    return part.replace("/", "__").replace("@", "_at_")


def _files_of(result: Any, keys: Sequence[str]) -> list[str]:
    """Files a stored part wrote (so a re-run recomputes a part whose figures were deleted)."""
    out: list[str] = []
    if not isinstance(result, dict):
        return out
    for key in keys:
        value = result.get(key)
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):
            out += [v for v in value.values() if isinstance(v, str)]
    for value in result.values():
        if isinstance(value, dict) and "figure" in keys and isinstance(value.get("figure"), str):
            out.append(value["figure"])
    return out


def _forward_seconds(loaded, dataset, device: str) -> float:
    """Seconds per example of one forward pass (a batch of up to 32, after a warm-up)."""
    import torch

    x, _ = dataset.tensors(list(range(min(32, len(dataset)))))
    module = loaded.module.eval()
    with torch.no_grad():
        module(x[:2].to(device))
        synchronize(device)
        began = time.perf_counter()
        module(x.to(device))
        synchronize(device)   # a CUDA call returns before its work is done
    return (time.perf_counter() - began) / max(1, x.shape[0])


def own_pictures(layer_map, layers: Sequence[str]) -> list[str]:
    """The layers that need renders and examples of their own: a concatenation whose paths all
    have pages shows its paths' pictures (its unit i is a path's unit), so it is not drawn twice."""
    chosen = set(layers)
    out = []
    for name in layers:
        lay = layer_map.resolve(name)
        if lay.kind == "concat" and lay.branches and all(b.name in chosen for b in lay.branches):
            continue
        out.append(name)
    return out


def render_chunks(layer_map, layers: Sequence[str], max_images: int = 256) -> list[list[str]]:
    """Consecutive layers grouped so that a chunk renders at most `max_images` images (a layer
    larger than that is a chunk of its own)."""
    chunks: list[list[str]] = []
    size = 0
    for name in layers:
        units = layer_map.resolve(name).units
        if chunks and size + units <= max_images:
            chunks[-1].append(name)
            size += units
        else:
            chunks.append([name])
            size = units
    return chunks


def _examples_estimate(budget: Budget, per_example: float, n_data: int) -> float:
    """From the example searches done so far, else one forward over the data."""
    done = [p["seconds"] for name, p in budget.parts.items() if name.startswith("examples/") and p["status"] == "done"]
    return max(done) if done else per_example * n_data


def _render_estimate(budget: Budget, units: int, steps: int) -> float:
    """From the renders done so far (seconds per image-step), else from the calibration run."""
    done = [(p["seconds"], p["units_steps"]) for p in budget.parts.values() if p.get("units_steps")]
    rate = sum(s for s, _ in done) / sum(n for _, n in done) if done else budget.render_rate
    return rate * units * steps


# ---------------------------------------------------------------------------------------------
# atlas.json


def assemble(ctx: P.SurveyContext, settings: SurveySettings, got: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """The site's one input (docs/atlas.md): the parts' results arranged by layer, unit and cluster."""
    loaded = ctx.loaded
    layers_doc = (got.get("layers") or {}).get("layers", [])
    banding = {r["layer"]: r for r in ((got.get("banding") or {}).get("records") or [])}
    weights = got.get("weights") or {}
    svd = got.get("svd") or {}
    branches = {b["layer"]: b for b in ((got.get("branches") or {}).get("layers") or [])}
    probes = got.get("probes") or {}
    connections = got.get("connections") or {}
    clusters_doc = got.get("clusters")
    cluster_of: dict[tuple[str, int], int] = {}
    for c in (clusters_doc or {}).get("clusters", []):
        for u in c["units"]:
            cluster_of[(u["layer"], int(u["index"]))] = int(c["id"])

    class_names = list(getattr(loaded, "class_names", None) or []) or None
    from ..models import logits_layer

    logits = logits_layer(loaded, ctx.layer_map)
    layers_out = []
    for lay in layers_doc:
        name = lay["name"]
        b = banding.get(name)
        figures = {}
        if name in weights:
            figures["weights"] = weights[name]["figure"]
        if (got.get("banding") or {}).get("figure") and b and b.get("horizontal") is not None:
            figures["banding"] = got["banding"]["figure"]
        if name in svd:
            figures["svd"] = svd[name]["figure"]
        if name in branches:
            bf = branches[name].get("figures", {})
            if "correlation" in bf:
                figures["branch_correlation"] = bf["correlation"]
            if "categories" in bf:
                figures["branch_categories"] = bf["categories"]
            if "svd" in bf:
                figures["branch_svd"] = bf["svd"]
        render = (got.get("render") or {}).get(name)
        if render:
            figures["render_grid"] = render["grid"]
        fam = (got.get("families") or {}).get(name)
        if fam and fam.get("figure"):
            figures["families"] = fam["figure"]
        counts: dict[str, int] = {}
        for (layer, _), cid in cluster_of.items():
            if layer == name:
                counts[str(cid)] = counts.get(str(cid), 0) + 1
        layers_out.append({
            **lay,
            "banding": _banding_summary(b),
            "figures": figures,
            "svd": {k: v for k, v in svd[name].items() if k != "figure"} if name in svd else None,
            "branch_stats": _branch_summary(branches.get(name)),
            "clusters": counts,
            "probe_rules": (probes.get(name) or {}).get("rules", {}),
            "families": {k: v for k, v in fam.items() if k != "figure"} if fam else None,
            "pages": name in ctx.layers,
        })

    units_out: dict[str, dict[str, Any]] = {}
    branch_of = _branch_of_units(layers_doc)
    pictures = {part: {layer: (v or {}).get("units") or {} for layer, v in (got.get(part) or {}).items()}
                for part in ("render", "examples")}
    pictures["weights"] = {layer: v.get("units") or {} for layer, v in weights.items()}
    pictures["diversity"] = got.get("diversity") or {}
    for name in ctx.layers:
        n = ctx.layer_map.resolve(name).units
        probe_units = {str(r["unit"]): r for r in (probes.get(name) or {}).get("units_table", [])}
        per = {}
        for u in range(n):
            key = str(u)
            probe = probe_units.get(key)
            per[key] = {
                "render": _unit_entry(pictures["render"], layers_doc, name, u),
                "diversity": list(_unit_entry(pictures["diversity"], layers_doc, name, u, [])),
                "examples": _unit_entry(pictures["examples"], layers_doc, name, u),
                "weights": _unit_entry(pictures["weights"], layers_doc, name, u),
                "probe": {k: v for k, v in probe.items() if k != "unit"} if probe else None,
                "branch": branch_of.get((name, u)), "cluster": cluster_of.get((name, u)),
                "class_name": class_names[u] if class_names and name == logits and u < len(class_names) else None,
                "upstream": ((connections.get(name) or {}).get(key) or {}).get("upstream", []),
                "downstream": ((connections.get(name) or {}).get(key) or {}).get("downstream", []),
            }
        units_out[name] = per

    clusters_out = _clusters_out(ctx, clusters_doc, got.get("importance"), got.get("coherence"))
    doc = {
        "version": 1,
        "model": {"name": loaded.source, "weights": loaded.weights, "input_shape": list(loaded.input_shape or []),
                  "classes": class_names, "data": ctx_data_name(settings, ctx)},
        "survey": {"seconds": round(time.perf_counter() - budget.started, 1), "budget_s": budget.seconds,
                   "parts": budget.parts, "settings": settings.key_settings()},
        "layers": layers_out, "units": units_out, "clusters": clusters_out,
        "clusterability": _clusterability(clusters_doc),
    }
    doc["headlines"] = headlines(doc)
    return doc


def ctx_data_name(settings: SurveySettings, ctx: P.SurveyContext) -> str:
    return getattr(ctx.dataset, "spec", None) or settings.data or DEFAULT_DATA


def _banding_summary(b: dict | None) -> dict | None:
    if not b or b.get("horizontal") is None:
        return None
    keys = ("horizontal", "vertical", "index", "orientation", "effective_kernels", "share_h_over_v")
    return {**{k: b.get(k) for k in keys}, "p": b.get("p_value")}


def _branch_summary(b: dict | None) -> dict | None:
    if not b:
        return None
    tests = [{"branch": br["name"], **t} for br in b["branches"] for t in br["categories"]]
    return {"correlation": b.get("correlation"), "tests": sorted(tests, key=lambda t: t["p"]),
            "categories": b.get("categories", {}), "kind": b.get("kind")}


def _branch_of_units(layers_doc: list[dict]) -> dict[tuple[str, int], str]:
    out = {}
    for lay in layers_doc:
        if lay["kind"] == "residual" or lay.get("depthwise"):
            continue
        for b in lay.get("branches", []):
            for u in range(b["start"], b["stop"]):
                out[(lay["name"], u)] = b["name"]
    return out


def _unit_entry(by_layer: dict[str, dict[str, Any]], layers_doc: list[dict], name: str, unit: int,
                default: Any = None) -> Any:
    """A unit's entry in {layer: {unit: value}}. A layer with entries of its own uses them; a
    concatenation without any shows its path's unit (its unit i is a path's unit)."""
    own = by_layer.get(name)
    if own:
        return own.get(str(unit), default)
    lay = next((x for x in layers_doc if x["name"] == name), None)
    if lay and lay["kind"] == "concat":
        for b in lay["branches"]:
            if b["start"] <= unit < b["stop"]:
                return (by_layer.get(b["name"]) or {}).get(str(unit - b["start"]), default)
    return default


def _clusterability(doc: dict | None) -> dict | None:
    if not doc:
        return None
    s = doc["shuffle"]
    return {"graph": doc["graph"], "k": doc["k"], "ncut": doc["ncut"], "null_mean": s.get("mean"),
            "null_std": s.get("std"), "z": s.get("z"), "p": s.get("p"), "shuffles": s.get("n"),
            "nodes": doc.get("nodes")}


def _clusters_out(ctx: P.SurveyContext, clusters_doc, importance_doc, coherence_doc) -> list[dict]:
    if not clusters_doc:
        return []
    lesions: dict[int, list] = {}
    for t in (importance_doc or {}).get("sub_clusters", []):
        lesions.setdefault(int(t["cluster"]), []).append(t)
    coh: dict[int, list] = {}
    for t in (coherence_doc or {}).get("tests", []):
        coh.setdefault(int(t["cluster"]), []).append(t)
    out = []
    for c in clusters_doc["clusters"]:
        cid = int(c["id"])
        units: dict[str, list[int]] = {}
        for u in c["units"]:
            units.setdefault(u["layer"], []).append(int(u["index"]))
        figures: dict[str, str] = {}  # the site draws each sub-cluster's lesion against its random sets
        entry_importance = None
        if cid in lesions:
            entry_importance = {"by_layer": [{"layer": t["layer"], "units": t["size"], "drop": t["drop"],
                                              "random_drops": t.get("random_drops", []), "p": t["p_drop"],
                                              "q": t["q_drop"], "specificity": t["specificity"],
                                              "p_specificity": t["p_specificity"]} for t in lesions[cid]]}
        entry_coherence = None
        if cid in coh:
            entry_coherence = {"by_layer": [{"layer": t["layer"], "units": t["size"], "statistic": t["kind"],
                                             "value": t["value"], "null_mean": t["random_mean"], "p": t["p"],
                                             "q": t["q"]} for t in coh[cid]]}
        out.append({"id": cid, "size": len(c["units"]), "units": units, "importance": entry_importance,
                    "coherence": entry_coherence, "figures": figures})
    return out


def headlines(doc: dict[str, Any]) -> list[dict[str, str]]:
    """The findings worth a sentence on the overview, each with its statistic and a link."""
    out = []
    for lay in doc["layers"]:
        b = lay.get("banding")
        if b and b.get("orientation") in ("horizontal", "vertical") and (b.get("p") or 1) < 0.01:
            out.append({"text": f"{lay['name']} bands {b['orientation']}ly: H {b['horizontal']:.2f} vs V "
                                f"{b['vertical']:.2f}, p {b['p']:.3g}", "link": {"layer": lay["name"]}})
    for lay in doc["layers"]:
        bs = lay.get("branch_stats") or {}
        for t in bs.get("tests", []):
            if t["q"] < 0.05 and t["count"] > t["expected"]:
                out.append({"text": f"{t['category']} units enriched in branch {t['branch']} of {lay['name']}: "
                                    f"{t['count']} vs {t['expected']:.1f} expected, q {t['q']:.2g}",
                            "link": {"layer": lay["name"]}})
        c = bs.get("correlation")
        if c and c.get("p", 1) < 0.05:
            out.append({"text": f"units of {lay['name']} correlate more within branches than between: "
                                f"{c['within']:.2f} vs {c['between']:.2f}, p {c['p']:.2g}",
                        "link": {"layer": lay["name"]}})
    cl = doc.get("clusterability")
    if cl and cl.get("shuffles"):
        floor = 1.0 / (cl["shuffles"] + 1)
        numbers = (f"n-cut {cl['ncut']:.3f} vs {cl['null_mean']:.3f} ± {cl['null_std']:.3f}, p {cl['p']:.2g} "
                   f"({cl['shuffles']} shuffles)")
        if (cl["p"] or 1) < 0.05:
            text = f"the weight graph is more clusterable than its shuffles: {numbers}"
        elif cl["p"] is not None and cl["p"] <= floor + 1e-12:
            text = (f"the weight graph's n-cut is below all of its shuffles, but {cl['shuffles']} shuffles cannot "
                    f"give p < 0.05: {numbers}")
        else:
            text = f"the weight graph is not more clusterable than its shuffles: {numbers}"
        out.append({"text": text, "link": "index.html#clusters"})
    important = [(c["id"], t) for c in doc["clusters"] for t in ((c.get("importance") or {}).get("by_layer") or [])]
    if important:
        hits = [(cid, t) for cid, t in important if t["q"] < 0.05]
        out.append({"text": f"{len(hits)} of {len(important)} sub-clusters hurt accuracy more than random sets "
                            f"of their size (q < 0.05)",
                    "link": {"cluster": hits[0][0]} if hits else "index.html#clusters"})
    for lay in doc["layers"]:
        fam = lay.get("families")
        if fam and fam.get("families"):
            n_units = sum(len(f.get("units", [])) for f in fam["families"])
            out.append({"text": f"{len(fam['families'])} rotation families in {lay['name']} ({n_units} units)",
                        "link": {"layer": lay["name"]}})
    return out


__all__ = ["DEFAULT_DATA", "DEFAULT_MODEL", "SurveySettings", "assemble", "default_layers", "headlines",
           "run_survey"]
