"""The main job on the embedded default: the bundled models and data sample, no network.

It walks through what netanatomy measures, on models small enough for a laptop CPU:
1. zoo:minception-fmnist (a branched CNN) on the bundled Fashion-MNIST test sample: accuracy,
   its layers and branches, and whether its branches specialize (class preferences per branch
   with hypergeometric tails and BH; correlation within vs between branches against a
   relabelling null);
2. its weights: banding scores of every layer, SVD of |W| into a mixed layer, NMF pictures;
3. zoo:mlp-fmnist (Filan et al.'s MLP): spectral clusters of the weight graph against shuffled
   networks, and lesion importance of every sub-cluster against random sets;
4. pictures: feature visualizations and dataset examples of a mixed layer's units.
Results go to OUT/summary.json, OUT/summary.md and PNG files.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .util.io import save_png, write_json, write_text

BRANCHED = "zoo:minception-fmnist"
MLP = "zoo:mlp-fmnist"


def _branch_section(loaded, layer_map, ds, seed: int) -> dict[str, Any]:
    from .capture import capture_activations
    from .core.branches import branch_class_tests, branch_correlation_test

    concat = layer_map.of_kind("concat")
    stats = capture_activations(loaded.module, [l.name for l in concat], ds, stage="pre", reduce="mean",
                                top_k=0, keep_values=len(ds), seed=seed)
    out = []
    for layer in concat:
        s = stats[layer.name]
        ranges = {b.name: (b.start, b.stop) for b in layer.branches}
        tests = branch_class_tests(s.values, s.labels, ranges, ds.classes)
        labels = np.concatenate([np.full(b.size, i) for i, b in enumerate(layer.branches)])
        corr = branch_correlation_test(s.pearson(), labels, n_permutations=999, seed=seed)
        significant = sorted((t for t in tests if t.q < 0.05), key=lambda t: t.p_tail)
        out.append({
            "layer": layer.name, "units": layer.units,
            "branches": [{"name": b.name, "units": b.size, "range": [b.start, b.stop]} for b in layer.branches],
            "correlation": corr.to_dict(),
            "class_preference_tests": [t.to_json() for t in tests],
            "significant": [{"branch": t.branch, "category": t.category, "in_branch": t.in_both,
                             "branch_size": t.branch_size, "category_size": t.category_size,
                             "p": t.p_tail, "q": t.q} for t in significant],
        })
    return {"layers": out}


def _weights_section(loaded, layer_map, out: Path, seed: int) -> dict[str, Any]:
    from .anatomy import layer_pictures, layer_svd, layer_weights, model_banding

    banding = model_banding(loaded.module, layer_map, seed=seed)
    concat = layer_map.of_kind("concat")
    upper = layer_map.resolve(concat[-1].branches[0].module) if concat else None
    svd = None
    if upper is not None:
        report = layer_svd(loaded.module, layer_map, upper.name)
        d = report.svd.to_dict(2)
        svd = {"upper": report.upper, "lower": report.lower,
               "shares": [float(v) for v in np.asarray(d["shares"])[:5]]}
    pictures = []
    for layer in layer_map.of_kind("conv"):
        if layer.kernel_size and min(layer.kernel_size) >= 3 and "5x5" in layer.name:
            import matplotlib.pyplot as plt

            from .anatomy.plots import weights_figure
            from .util.io import save_figure

            pics = layer_pictures(layer_weights(loaded.module, layer_map, layer).weights, seed=seed)
            fig = weights_figure(pics, layer.name)
            path = save_figure(fig, out / f"nmf_{layer.name}.png", dpi=110, bbox_inches="tight")
            plt.close(fig)
            pictures.append({"layer": layer.name, "units": int(pics.pictures.shape[0]), "png": path.name})
    return {"banding": banding, "svd": svd, "nmf_pictures": pictures}


def _modules_section(x, y, seed: int, shuffles: int) -> dict[str, Any]:
    from .models import load_model
    from .models.layers import discover_layers
    from .specialization.clusters import cluster_model
    from .specialization.importance import importance

    mlp = load_model(MLP)
    layer_map = discover_layers(mlp.module, mlp.input_shape)
    clusters = cluster_model(mlp.module, layer_map, graph="weights", k=12, n_shuffles=shuffles, seed=seed)
    result = importance(mlp.module, layer_map, clusters.clusters, x, y, n_random=99, seed=seed)
    tests = result.tests
    return {
        "model": MLP,
        "clusters": {k: v for k, v in clusters.to_json().items() if k != "clusters"},
        "importance": {
            "accuracy": result.accuracy,
            "sub_clusters": len(tests),
            "important": sum(1 for t in tests if t.q_drop < 0.05),
            "class_specific": sum(1 for t in tests if t.q_specificity < 0.05),
            "fisher_drop": result.fisher_drop,
            "fisher_specificity": result.fisher_specificity,
            "largest_drops": [{"cluster": t.cluster, "layer": t.layer, "size": int(t.units.size), "drop": t.drop,
                               "random_drop_mean": float(t.random_drop.mean()), "p": t.p_drop, "q": t.q_drop}
                              for t in sorted(tests, key=lambda t: -t.drop)[:5]],
        },
    }


def _pictures_section(loaded, layer_map, ds, out: Path, seed: int, steps: int) -> dict[str, Any]:
    from .visualize import channel, render
    from .visualize.examples import dataset_examples, examples_sheet

    layer = layer_map.of_kind("concat")[-1]
    units = list(range(min(layer.units, 16)))
    rendering = render(loaded.module, [channel(layer.name, u) for u in units], steps=steps, seed=seed)
    # ranked by the map's mean: the same statistic the channel objective maximizes
    examples = dataset_examples(loaded.module, layer.name, ds, units=units, top_k=6, rank="mean")
    sheet = examples_sheet(examples, rendering.images, class_names=ds.classes)
    path = save_png(sheet, out / f"units_{layer.name}.png")
    best = np.asarray(examples.value)[:, 0]
    return {"layer": layer.name, "units": units, "png": path.name, "steps": steps,
            "render_values": rendering.values, "best_example_values": best,
            "render_beats_best_example": int(np.sum(np.asarray(rendering.values) > best))}


def run_demo(out: str | Path = "runs/demo", *, seed: int = 0, steps: int = 128, shuffles: int = 20,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every section, write OUT/summary.json and OUT/summary.md, return the summary."""
    from .data import open_dataset
    from .models import load_model
    from .models.layers import discover_layers
    from .training import evaluate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    ds = open_dataset("bundled", "test")
    x, y = ds.tensors()
    loaded = load_model(BRANCHED)
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    accuracy, _ = evaluate(loaded.module, x, y)
    summary: dict[str, Any] = {
        "data": {"spec": "bundled", "split": "test", "examples": len(ds)},
        "model": {"name": BRANCHED, "test_accuracy_on_sample": accuracy, "layers": layer_map.to_json()["layers"]},
    }
    steps_done = [("branches", lambda: _branch_section(loaded, layer_map, ds, seed)),
                  ("weights", lambda: _weights_section(loaded, layer_map, out, seed)),
                  ("modules", lambda: _modules_section(x, y, seed, shuffles)),
                  ("pictures", lambda: _pictures_section(loaded, layer_map, ds, out, seed, steps))]
    for name, fn in steps_done:
        started = time.perf_counter()
        log(f"[{name}] ...")
        summary[name] = fn()
        summary[name]["seconds"] = round(time.perf_counter() - started, 2)
    summary["seconds"] = round(time.perf_counter() - began, 2)
    write_json(out / "summary.json", summary)
    text = render_markdown(summary)
    write_text(out / "summary.md", text)
    return summary


def _fmt_p(p: float) -> str:
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def render_markdown(s: dict[str, Any]) -> str:
    """The human report of a demo summary."""
    lines = [f"# netanatomy demo ({s['seconds']:.0f} s)", ""]
    m = s["model"]
    lines.append(f"{m['name']} on {s['data']['examples']} bundled Fashion-MNIST test images: "
                 f"accuracy {m['test_accuracy_on_sample']:.3f}.")
    lines += ["", "## Branches", ""]
    for layer in s["branches"]["layers"]:
        widths = ", ".join(f"{b['name']} {b['units']}" for b in layer["branches"])
        c = layer["correlation"]
        lines.append(f"- {layer['layer']} ({layer['units']} units: {widths})")
        lines.append(f"  - mean |r| within branches {c['within']:.3f} vs between {c['between']:.3f}: difference "
                     f"{c['difference']:.3f}, against {c['null_mean']:.3f} ± {c['null_std']:.3f} when units are "
                     f"relabelled at random (p {_fmt_p(c['p'])})")
        if layer["significant"]:
            for t in layer["significant"][:4]:
                lines.append(f"  - {t['branch']} holds {t['in_branch']} of the {t['category_size']} units that "
                             f"{t['category']} ({t['branch_size']} of {layer['units']} units; "
                             f"p {_fmt_p(t['p'])}, q {_fmt_p(t['q'])})")
        else:
            lines.append("  - no branch holds more units preferring one class than chance allows (all q >= 0.05)")
    w = s["weights"]
    lines += ["", "## Weights", ""]
    scored = [b for b in w["banding"] if not b.get("skipped")]
    banded = [b for b in scored if b["orientation"] != "none"]
    lines.append(f"- banding: {len(scored)} layers scored, {len(banded)} banded"
                 + (": " + ", ".join(f"{b['layer']} {b['orientation']}" for b in banded) if banded else ""))
    if w["svd"]:
        shares = ", ".join(f"{v:.2f}" for v in w["svd"]["shares"][:3])
        lines.append(f"- SVD of |W| {w['svd']['lower']} -> {w['svd']['upper']}: shares of the squared norm s²/Σs² of the first singular values {shares}")
    for p in w["nmf_pictures"]:
        lines.append(f"- NMF weight pictures of {p['layer']} ({p['units']} units): {p['png']}")
    mod = s["modules"]
    c, imp = mod["clusters"], mod["importance"]
    sh = c["shuffle"]
    lines += ["", "## Modules", ""]
    lines.append(f"- {mod['model']}: K={c['k']} spectral clusters of the weight graph, n-cut {c['ncut']:.3f} vs "
                 f"{sh['n']} `{sh['method']}` shuffles {sh['mean']:.3f} ± {sh['std']:.3f} "
                 f"(z {sh['z']:.2f}, p {_fmt_p(sh['p'])}); published anchor: 9.86-9.91 vs 10.06-10.11, z about -5 to -6")
    lines.append(f"- importance: {imp['important']} of {imp['sub_clusters']} sub-clusters hurt accuracy more than "
                 f"99 random same-size sets (BH q < 0.05), {imp['class_specific']} class-specifically; "
                 f"Fisher p {_fmt_p(imp['fisher_drop'])}")
    pic = s["pictures"]
    lines += ["", "## Pictures", ""]
    lines.append(f"- {pic['layer']}: feature visualizations ({pic['steps']} steps) and top dataset examples of units "
                 f"{pic['units'][0]}-{pic['units'][-1]}: {pic['png']}; the visualization beats the best example for "
                 f"{pic['render_beats_best_example']} of {len(pic['units'])} units")
    return "\n".join(lines) + "\n"


__all__ = ["render_markdown", "run_demo"]
