"""`netanatomy branches MODEL [--layer L]`: which kinds of units sit in which branch, against chance."""
from __future__ import annotations

import time

import click

from ..options import (
    check_output,
    comma_list,
    device_option,
    emit,
    input_shape_option,
    json_option,
    load_cli_model,
    model_argument,
    open_cli_data,
    seed_option,
)

PROBE_NAMES = ("colour", "orientation", "filter", "classes")


def parse_probes(text: str, channels: int) -> tuple[str, ...]:
    """'auto' -> the probes that apply (colour only for 3-channel models), 'none' -> (), else a list."""
    text = text.strip().lower()
    if text == "none":
        return ()
    if text == "auto":
        from ...anatomy.probes import default_probes

        return default_probes(channels)
    names = tuple(dict.fromkeys(comma_list(text)))
    bad = [p for p in names if p not in PROBE_NAMES]
    if bad or not names:
        raise click.BadParameter(f"unknown probe {bad[0] if bad else text!r}; use auto, none or a list of "
                                 f"{', '.join(PROBE_NAMES)}", param_hint="--probe")
    if "colour" in names and channels != 3:
        raise click.BadParameter(f"the colour probe needs a 3-channel model; this one reads {channels} channel(s)",
                                 param_hint="--probe")
    return names


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _human(r: dict) -> str:
    lines = [f"branch statistics of {r['model']}: {len(r['layers'])} layer(s), {r['tests']} branch x category tests, "
             f"q by Benjamini-Hochberg over all of them; categories from {', '.join(r['category_sources']) or 'none'}"]
    for lay in r["layers"]:
        lines.append(f"\n{lay['layer']} ({lay['kind']}, {lay['units']} units): "
                     + ", ".join(f"{b['name']} {b['units']}" for b in lay["branches"]))
        c = lay.get("correlation")
        if c:
            lines.append(f"  correlation: mean |r| within branches {c['within']:.3f}, between {c['between']:.3f}, "
                         f"p {_fmt_p(c['p'])} ({c['n_permutations']} relabellings)")
        rows = [(b["name"], t) for b in lay["branches"] for t in b["categories"]]
        rows.sort(key=lambda bt: bt[1]["p"])
        shown = [bt for bt in rows if bt[1]["q"] < 0.05] or rows[:3]
        if rows:
            lines.append(f"  {'branch':<28} {'category':<24} {'count':>5} {'expected':>8} {'p':>8} {'q':>8}")
        for bname, t in shown[:12]:
            lines.append(f"  {bname[:28]:<28} {t['category'][:24]:<24} {t['count']:>5} {t['expected']:>8.1f} "
                         f"{_fmt_p(t['p']):>8} {_fmt_p(t['q']):>8}")
        if len(shown) < len(rows):
            lines.append(f"  ({len(rows) - len(shown)} more tests with q >= 0.05: see --json)")
        for note in lay.get("notes", []):
            lines.append(f"  note: {note}")
    if r.get("out"):
        lines.append(f"\nwrote {r['out']}/ (branches.json and figures per layer)")
    return "\n".join(lines)


@click.command("branches")
@model_argument
@input_shape_option
@click.option("--layer", "layers", multiple=True, metavar="LAYER",
              help="Layer with branches (repeatable) [default: every layer with branches].")
@click.option("--data", default=None, metavar="DATA",
              help="Images for activations and the colour probe [default: 500 photo patches at the model's size].")
@click.option("--split", default="test", show_default=True, help="Split of the data set.")
@click.option("--labels", "labels_csv", default=None, type=click.Path(dir_okay=False),
              help="CSV of layer,unit,category rows: categories of your own (any labels).")
@click.option("--probe", "probe_text", default="auto", show_default=True, metavar="LIST",
              help="Probes that give categories: colour, orientation, filter (first layer), classes (the class "
                   "each unit prefers on labelled data); 'auto' = those that apply, 'none' = labels only.")
@click.option("--examples", type=click.IntRange(3), default=1000, show_default=True,
              help="Examples for the correlation test and class preference.")
@click.option("--permutations", type=click.IntRange(1), default=999, show_default=True,
              help="Relabellings of units in the within- vs between-branch correlation test.")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Directory for branches.json and figures (correlation by branch, category shares, SVD of |W|).")
@seed_option
@device_option
@json_option
def command(model, weights, model_args, input_shape, layers, data, split, labels_csv, probe_text, examples,
            permutations, out, seed, device, as_json) -> None:
    """Per branch and category: count, expected count, hypergeometric tail p, Fisher's exact test and
    BH-adjusted q over the run; and whether units correlate more within branches than between."""
    from pathlib import Path

    from ...anatomy import branch_stats as bs
    from ...anatomy.branch_plots import branch_figures
    from ...models.layers import discover_layers
    from ...util.io import write_json

    check_output(out, folder=True)
    labels = bs.read_labels_csv(labels_csv) if labels_csv else []
    loaded = load_cli_model(model, weights, model_args, device, input_shape, seed=seed)
    channels = int(loaded.input_shape[0]) if loaded.input_shape else 3
    probes = parse_probes(probe_text, channels)
    spec = data or ("photos?n=500" + ("" if channels == 3 else f"&channels={channels}"))
    dataset = open_cli_data(spec, split, loaded, seed=seed, labels="classes" in probes)
    module = loaded.module
    layer_map = discover_layers(module, loaded.input_shape)
    names = list(layers) or [lay.name for lay in bs.branched_layers(layer_map)]
    if not names:
        raise click.UsageError("this model has no layer with branches (concatenations, grouped convs or residual "
                               "sums); see 'netanatomy layers'")
    populations = [bs.branch_population(layer_map, n) for n in names]

    started = time.perf_counter()
    stats = bs.branch_report(module, layer_map, populations, dataset, probes=[p for p in probes if p != "classes"],
                             labels=labels, classes="classes" in probes, examples=examples, permutations=permutations,
                             seed=seed, device=device)
    seconds = time.perf_counter() - started

    result = {
        "model": loaded.source, "weights": loaded.weights, "data": spec, "split": split, "examples": examples,
        "probes": list(probes), "labels": labels_csv,
        "category_sources": sorted({v for st in stats for v in st.sources.values()}),
        "tests": sum(len(s.tests) for s in stats), "correction": "Benjamini-Hochberg over every test of the run",
        "layers": [s.to_json() for s in stats], "seconds": seconds,
    }
    if out:
        out_dir = Path(out)
        for s, lay in zip(stats, result["layers"]):
            lay["figures"] = branch_figures(module, layer_map, s, out_dir)
        result["out"] = str(out_dir)
        write_json(out_dir / "branches.json", result)
    emit(result, as_json, _human)
