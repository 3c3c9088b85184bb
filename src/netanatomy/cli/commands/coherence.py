"""`netanatomy coherence MODEL --clusters FILE --data D --random R`: do sub-clusters' units agree?"""
from __future__ import annotations

import click

from ..options import (
    check_output,
    cli_runner,
    cli_task_store,
    comma_list,
    device_option,
    emit,
    input_shape_option,
    json_option,
    load_cli_model,
    model_argument,
    open_cli_data,
    ray_option,
    read_cli_clusters,
    seed_option,
)


@click.command("coherence")
@model_argument
@input_shape_option
@click.option("--clusters", "clusters_file", required=True, type=click.Path(dir_okay=False),
              help="Clusters JSON written by `netanatomy clusters --out`.")
@click.option("--data", required=True, metavar="DATA", help="Labelled data set (its test split), e.g. fashion-mnist.")
@click.option("--random", "n_random", type=click.IntRange(1), default=99, show_default=True,
              help="Random same-size sets per sub-cluster.")
@click.option("--kind", "kinds", default="dataset,correlation", show_default=True,
              help="Comma-separated: dataset (label entropy of top inputs), correlation (mean Spearman^2), "
                   "visualization (render each set: prediction entropy and objective reached), or all.")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="Top inputs per set (dataset).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N test examples.")
@click.option("--steps", type=click.IntRange(1), default=256, show_default=True,
              help="Render steps per image (visualization); all sets render in one batch.")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="Renders optimized together (visualization), each batch one task (with --ray, one per worker "
                   "at a time); an image is the same for one --batch with or without Ray  [default: all in one].")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON result here; finished render batches are kept in OUT.tasks/ until it is "
                   "written, so a stopped run resumes.")
@click.option("--restart", is_flag=True, help="Ignore the finished render batches kept beside --out.")
@seed_option
@device_option
@ray_option
@json_option
def command(model, weights, model_args, input_shape, clusters_file, data, n_random, kinds, top, limit, steps, batch,
            out, restart, seed, device, ray, as_json) -> None:
    """Score each sub-cluster's coherence against R random same-size sets of its layer: label
    entropy of its top inputs, correlation of its units, and (--kind visualization) the
    network's prediction entropy on its feature visualization and the objective reached."""
    from ...errors import UsageError
    from ...models.layers import discover_layers
    from ...specialization.coherence import KINDS, coherence, unit_scales
    from ...specialization.extract import activation_values
    from ...specialization.importance import lesionable_layers
    from ...util.io import sha256_of, write_json

    kind_list = comma_list(kinds)
    kind_list = list(KINDS) if kind_list == ["all"] else kind_list
    unknown = [k for k in kind_list if k not in KINDS]
    if unknown or not kind_list:
        raise UsageError(f"unknown coherence kind {unknown[0] if unknown else kinds!r}; use "
                         f"{', '.join(KINDS)} or all")
    check_output(out)
    loaded = load_cli_model(model, weights, model_args, device, input_shape, seed=seed)
    ds = open_cli_data(data, "test", loaded, limit=limit, seed=seed, labels=True)
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    clusters = read_cli_clusters(clusters_file, loaded, layer_map)
    layers = [name for name in lesionable_layers(layer_map)
              if any(layer == name for c in clusters for layer, _ in c.units)]
    values, labels = activation_values(loaded.module, layers, ds, max_examples=None, seed=seed, device=device,
                                       input_shape=loaded.input_shape) if layers else ({}, None)
    scales = unit_scales(loaded.module, layers, ds, max_examples=None, seed=seed, device=device,
                         input_shape=loaded.input_shape) if layers and "visualization" in kind_list else None
    # everything a render batch depends on (the sets come from the clusters, the random count and the seed)
    store = None
    if out and "visualization" in kind_list:
        store = cli_task_store(out + ".tasks", "coherence renders", model, weights, model_args, loaded,
                               restart=restart, clusters=sha256_of(clusters_file), data=data, limit=limit,
                               random=n_random, seed=seed, steps=steps, batch=batch, device=str(device))
    with cli_runner(ray, device) as runner:
        result = coherence(values, labels, clusters, n_random=n_random, seed=seed, top=top, kinds=kind_list,
                           num_classes=loaded.num_classes, model=loaded.module, unit_scale=scales, steps=steps,
                           input_shape=loaded.input_shape, device=device, show_progress=True, batch_size=batch,
                           runner=runner, store=store)
    doc = {"model": loaded.source, "data": data, "examples": len(ds), **result.to_json()}
    if out:
        write_json(out, doc)
        if store is not None:
            store.clear()
    emit(doc, as_json, _human)


def _human(doc: dict) -> str:
    lines = [f"{doc['model']} on {doc['data']} ({doc['examples']} examples), {doc['random']} random sets, "
             f"top {doc['top']}" + (f", {doc['render']['images']} renders of {doc['render']['steps']} steps "
                                    f"(objective {doc['render']['objective']})" if doc.get("render") else ""),
             "Fisher over sub-clusters: " + ", ".join(f"{k} p {v:.3g}" for k, v in doc["fisher"].items()),
             f"{'cluster':>7} {'layer':<16} {'size':>5} {'kind':<23} {'value':>8} {'random':>8} {'p':>7} {'q':>7}"]
    for t in doc["tests"]:
        lines.append(f"{t['cluster']:>7} {t['layer']:<16} {t['size']:>5} {t['kind']:<23} {t['value']:>8.4f} "
                     f"{t['random_mean']:>8.4f} {t['p']:>7.3g} {t['q']:>7.3g}")
    return "\n".join(lines)
