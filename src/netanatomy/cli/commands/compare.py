"""`netanatomy compare MODEL_A MODEL_B --data D`: how much two models share, layer by layer and unit by unit."""
from __future__ import annotations

import click

from ..boundary import check_data_fits
from ..options import (check_output, comma_list, device_option, emit, json_option, load_cli_model, open_cli_data,
                       seed_option)

DEFAULT_LAYERS = 8      # evenly spaced layers when a model has more than MAX_ALL_LAYERS and none are named
MAX_ALL_LAYERS = 12


def default_layers(layer_map) -> list[str]:
    """Every layer of a small model; 8 evenly spaced ones (first and last included) of a large one."""
    names = [layer.name for layer in layer_map.values()]
    if len(names) <= MAX_ALL_LAYERS:
        return names
    picks = sorted({round(i * (len(names) - 1) / (DEFAULT_LAYERS - 1)) for i in range(DEFAULT_LAYERS)})
    return [names[i] for i in picks]


@click.command("compare")
@click.argument("model_a", metavar="MODEL_A")
@click.argument("model_b", metavar="MODEL_B")
@click.option("--data", required=True, metavar="DATA", help="Inputs both models see, e.g. photos, fashion-mnist.")
@click.option("--split", default="test", show_default=True, help="Split of the data set.")
@click.option("--weights-a", default=None, metavar="FILE", help="State dict of model A (weights-only, strict).")
@click.option("--weights-b", default=None, metavar="FILE", help="State dict of model B.")
@click.option("--model-arg-a", "model_args_a", multiple=True, metavar="KEY=VALUE", help="Factory argument of A.")
@click.option("--model-arg-b", "model_args_b", multiple=True, metavar="KEY=VALUE", help="Factory argument of B.")
@click.option("--layers-a", multiple=True, metavar="LIST",
              help="Layers of A, comma-separated or repeated  [default: all, or 8 evenly spaced of a deep model].")
@click.option("--layers-b", multiple=True, metavar="LIST", help="Layers of B (as --layers-a).")
@click.option("--match", "match_pairs", multiple=True, metavar="LA:LB",
              help="A pair of layers to match unit by unit (repeatable)  [default: the i-th layers of A and B when "
                   "both lists are as long, else each layer of A with its most similar layer of B].")
@click.option("--examples", type=click.IntRange(4), default=2000, show_default=True, help="Examples to stream.")
@click.option("--null-models", type=click.IntRange(1), default=3, show_default=True,
              help="Copies of B with random weights, the null of the unit matching.")
@click.option("--stage", type=click.Choice(["pre", "post"]), default="post", show_default=True,
              help="Compare post-activation values (the layer's output) or the input of its nonlinearity.")
@click.option("--reduce", type=click.Choice(["mean", "max", "center"]), default="mean", show_default=True,
              help="How a conv unit's map becomes one value per example.")
@click.option("--knn-examples", type=click.IntRange(12), default=1000, show_default=True,
              help="Examples kept for the mutual k-NN metric and for showing matched units.")
@click.option("--clusters-a", default=None, metavar="FILE",
              help="Clusters of A (netanatomy clusters --out): with --clusters-b, how much of each recurs in B.")
@click.option("--clusters-b", default=None, metavar="FILE", help="Clusters of B.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for compare.json and the figures (CKA heatmaps, matches against the null, matched units).")
@seed_option
@device_option
@json_option
def command(model_a, model_b, data, split, weights_a, weights_b, model_args_a, model_args_b, layers_a, layers_b,
            match_pairs, examples, null_models, stage, reduce, knn_examples, clusters_a, clusters_b, batch_size, out,
            seed, device, as_json) -> None:
    """Linear and debiased CKA between every layer of A and every layer of B (streamed: memory does
    not grow with the examples), the mutual k-NN alignment, and for matched layer pairs each
    unit's best match, a one-to-one (Hungarian) matching and which units have a counterpart
    against copies of B with random weights; with --clusters-a/-b, the recurrence of A's modules in B."""
    from ...errors import UsageError
    from ...models.layers import discover_layers

    check_output(out, folder=True)
    if (clusters_a is None) != (clusters_b is None):
        raise UsageError("give both --clusters-a and --clusters-b, or neither")
    a = load_cli_model(model_a, weights_a, model_args_a, device, seed=seed)
    b = load_cli_model(model_b, weights_b, model_args_b, device, seed=seed)
    if a.input_shape and b.input_shape and tuple(a.input_shape) != tuple(b.input_shape):
        raise UsageError(f"the two models take different inputs ({'x'.join(map(str, a.input_shape))} and "
                         f"{'x'.join(map(str, b.input_shape))}): compare models on the same inputs")
    dataset = open_cli_data(data, split, a, limit=examples, seed=seed)
    check_data_fits(dataset, b, data)  # B must take the same images
    map_a, map_b = discover_layers(a.module, a.input_shape), discover_layers(b.module, b.input_shape)
    names_a = comma_list(layers_a) or default_layers(map_a)
    names_b = comma_list(layers_b) or default_layers(map_b)
    names_a = [map_a.resolve(n).name for n in names_a]
    names_b = [map_b.resolve(n).name for n in names_b]
    found_a = found_b = None
    if clusters_a:
        from ..boundary import read_cli_clusters

        found_a = read_cli_clusters(clusters_a, a, map_a)
        found_b = read_cli_clusters(clusters_b, b, map_b)
        for names, found in ((names_a, found_a), (names_b, found_b)):
            for layer in dict.fromkeys(l for c in found for l, _ in c.units if l != "input"):
                if layer not in names:
                    names.append(layer)
    pairs = None
    if match_pairs:
        pairs = []
        for text in match_pairs:
            if text.count(":") != 1:
                raise UsageError(f"--match takes LAYER_A:LAYER_B, not {text!r}")
            la, lb = text.split(":")
            pairs.append((map_a.resolve(la).name, map_b.resolve(lb).name))
    doc = run_compare(a, b, dataset, names_a, names_b, pairs=pairs, examples=examples, null_models=null_models,
                      stage=stage, reduce=reduce, knn_examples=knn_examples, batch_size=batch_size, seed=seed,
                      device=device, out=out, clusters=(found_a, found_b) if found_a is not None else None,
                      meta={"model_a": a.source, "weights_a": a.weights, "model_b": b.source, "weights_b": b.weights,
                            "data": data, "split": split})
    emit(doc, as_json, _human)


def run_compare(a, b, dataset, names_a, names_b, *, pairs, examples, null_models, stage, reduce, knn_examples,
                batch_size, seed, device, out, clusters, meta) -> dict:
    """The work of the command (also what the survey or a script calls): compare, figures, JSON."""
    import time
    from pathlib import Path

    from ...anatomy.compare import compare_models, recurrence_between
    from ...util.io import save_figure, write_json

    from ...labs.stages import settings_key

    started = time.perf_counter()
    # an interrupted pass resumes from OUT/compare.state.npz when every setting is the same
    key = settings_key({**meta, "files": [_file_id(a.weights), _file_id(b.weights)], "layers": [names_a, names_b],
                        "pairs": pairs, "examples": examples, "null_models": null_models, "stage": stage,
                        "reduce": reduce, "knn": knn_examples, "batch": batch_size, "seed": seed})
    result = compare_models(a.module, b.module, names_a, names_b, dataset, input_shape_a=a.input_shape,
                            input_shape_b=b.input_shape, pairs=pairs, null_models=null_models, seed=seed, stage=stage,
                            reduce=reduce, batch_size=batch_size, max_examples=examples, knn_examples=knn_examples,
                            device=device, checkpoint=Path(out) / "compare.state.npz" if out else None,
                            checkpoint_key=key)
    kept = result.pop("_kept")
    if clusters is not None:
        widths_a = {l["name"]: l["units"] for l in result["layers_a"]}
        widths_b = {l["name"]: l["units"] for l in result["layers_b"]}
        result["recurrence"] = recurrence_between(kept["moments"], kept["offset_b"], list(widths_a), list(widths_b),
                                                  clusters[0], clusters[1], widths_a, widths_b, seed=seed)
    doc = {**meta, **result, "seconds": time.perf_counter() - started}
    if out:
        from ...anatomy.compare_plots import cka_figure, matched_examples_figure, matching_figure
        from ...util.figures import pyplot
        from ...util.io import file_stem

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        figures = {"cka": "cka.png"}
        made = [(cka_figure(doc, meta["model_a"], meta["model_b"]), folder / "cka.png")]

        def images(indices):
            return dataset.tensors(indices)[0].numpy()

        for m in doc["matching"]:
            stem = f"{file_stem(m['layer_a'])}__{file_stem(m['layer_b'])}"
            made.append((matching_figure(m), folder / f"match_{stem}.png"))
            made.append((matched_examples_figure(m, kept, images), folder / f"pairs_{stem}.jpg"))
            figures[f"{m['layer_a']}:{m['layer_b']}"] = {"matching": f"match_{stem}.png", "pairs": f"pairs_{stem}.jpg"}
        for fig, path in made:
            try:   # the matched units' photos as JPEG: a tenth of the PNG's size
                save_figure(fig, path, dpi=110, **({"pil_kwargs": {"quality": 85}} if path.suffix == ".jpg" else {}))
            finally:
                pyplot().close(fig)
        doc["figures"] = figures
        write_json(folder / "compare.json", doc)
    return doc


def _file_id(path) -> list | None:
    """A weights file as its path, size and modification time (a changed file is another run)."""
    import os

    if not path:
        return None
    info = os.stat(path)
    return [str(path), info.st_size, info.st_mtime_ns]


def _human(doc: dict) -> str:
    lines = [f"A {doc['model_a']}  vs  B {doc['model_b']}  on {doc['examples']} examples of {doc['data']}",
             f"{'layer A':<24} {'layer B':<24} {'linear':>7} {'debiased':>8} {'kNN':>6}"]
    for c in doc["cka"]:
        knn = "n/a" if c["mutual_knn"] is None else f"{c['mutual_knn']:.3f}"
        lines.append(f"{c['layer_a'][:24]:<24} {c['layer_b'][:24]:<24} {c['linear']:>7.3f} {c['debiased']:>8.3f} "
                     f"{knn:>6}")
    for m in doc["matching"]:
        n = len(m["best"]["r"])
        lines.append(f"match {m['layer_a']} -> {m['layer_b']}: {m['counterparts']} of {n} units have a counterpart "
                     f"(BH q <= {m['alpha']:g} against {doc['null_models']} random-weight copies of B); one-to-one "
                     f"mean r {m['mean_matched_r']:.3f} vs null {sum(m['null_mean_matched_r']) / len(m['null_mean_matched_r']):.3f} "
                     f"(p {m['p']:.2g})")
    if "recurrence" in doc:
        r = doc["recurrence"]
        lines.append(f"module recurrence over {', '.join(r['layers'])}: {r['mean_recurrence']:.3f} vs shuffled "
                     f"labels {r['null_mean']:.3f} ± {r['null_sd']:.3f} (p {r['p']:.2g})")
    lines.append(f"{doc['seconds']:.1f} s")
    return "\n".join(lines)
