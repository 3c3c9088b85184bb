"""`netanatomy clusters MODEL --k K --shuffles S`: spectral clusters and clusterability."""
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
    seed_option,
)


@click.command("clusters")
@model_argument
@input_shape_option
@click.option("--graph", "graph_kind", type=click.Choice(["weights", "activations"]), default="weights",
              show_default=True, help="Edges from |weights| (no data) or from activation correlations on --data.")
@click.option("--data", default=None, metavar="DATA", help="Data set for --graph activations (test split).")
@click.option("--k", type=click.IntRange(2), default=12, show_default=True, help="Number of clusters.")
@click.option("--shuffles", type=click.IntRange(0), default=50, show_default=True,
              help="Shuffled networks to compare the n-cut with.")
@click.option("--shuffle-method", type=click.Choice(["layer", "layer_nonzero"]), default="layer", show_default=True,
              help="Permute all of each layer's weights, or only its non-zero ones (pruned networks).")
@click.option("--n-init", type=click.IntRange(1), default=25, show_default=True, help="k-means restarts.")
@click.option("--examples", type=click.IntRange(2), default=5000, show_default=True,
              help="Activation graph: examples kept (a seeded sample).")
@click.option("--layers", default=None, metavar="A,B,...", help="Activation graph: layers (default: all hidden).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the result here (for `importance` and `coherence`); finished shuffles are kept in "
                   "OUT.tasks/ until it is written, so a stopped run resumes.")
@click.option("--restart", is_flag=True, help="Ignore the finished shuffles kept beside --out.")
@seed_option
@device_option
@ray_option
@json_option
def command(model, weights, model_args, input_shape, graph_kind, data, k, shuffles, shuffle_method, n_init, examples,
            layers, out, restart, seed, device, ray, as_json) -> None:
    """Cluster MODEL's units (spectral clustering of a neuron graph) and test clusterability:
    the n-cut against networks with each layer's weights shuffled (p and z)."""
    from ...errors import UsageError
    from ...models.layers import discover_layers
    from ...specialization.clusters import activation_graph_bytes, activation_layers, cluster_model
    from ...util.io import write_json
    from ...util.progress import progress
    from ..boundary import check_memory

    if graph_kind == "activations" and not data:
        raise UsageError("--graph activations needs --data")
    if graph_kind == "weights" and layers:
        raise UsageError("--layers is for --graph activations; the weight graph takes every layer")
    check_output(out)

    loaded = load_cli_model(model, weights, model_args, device, input_shape, seed=seed)
    dataset = open_cli_data(data, "test", loaded, seed=seed) if graph_kind == "activations" else None
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    layer_names = [layer_map.resolve(n).name for n in comma_list(layers)] if layers else None
    if dataset is not None:
        names = activation_layers(layer_map, layer_names)
        units = sum(layer_map.resolve(n).units for n in names)
        check_memory(activation_graph_bytes(units, min(examples, len(dataset))),
                     f"the activation graph of {units} units over {min(examples, len(dataset))} examples",
                     "choose fewer layers with --layers A,B or fewer examples with --examples N")

    # what one shuffle's n-cut depends on (not the number of shuffles: a longer run re-uses a shorter one's)
    store = cli_task_store(out + ".tasks", "clusters shuffle", model, weights, model_args, loaded, restart=restart,
                           graph=graph_kind, data=data, k=k, method=shuffle_method, seed=seed, n_init=n_init,
                           examples=examples, layers=layer_names) if out else None
    bar = progress(total=shuffles, desc="shuffles", unit="net")
    try:
        with cli_runner(ray, device) as runner:
            result = cluster_model(loaded.module, layer_map, graph=graph_kind, data=dataset, k=k, n_shuffles=shuffles,
                                   method=shuffle_method, seed=seed, n_init=n_init, layers=layer_names,
                                   max_examples=examples, device=device, runner=runner, store=store,
                                   on_result=lambda i, v: bar.update(1))
    finally:
        bar.close()
    widths = {}
    for name in result.graph.layers:
        try:
            widths[name] = layer_map.resolve(name).units
        except UsageError:  # the weight graph's "input"
            pass
    # the model, its arguments and its layer widths: `importance` and `coherence` check them
    doc = {**result.to_json(), "model": loaded.source, "model_args": list(model_args), "weights": loaded.weights,
           "widths": widths, "seed": seed, "n_init": n_init}
    if out:
        write_json(out, doc)
        if store is not None:
            store.clear()
    emit(doc, as_json, _human)


def _human(doc: dict) -> str:
    s = doc["shuffle"]
    lines = [f"{doc['model']}: {doc['graph']} graph, {doc['nodes']} nodes ({doc['isolated']} isolated), k={doc['k']}",
             f"n-cut {doc['ncut']:.4f}"]
    if s["n"]:
        lines.append(f"shuffled ({s['method']}, n={s['n']}): mean {s['mean']:.4f}, std {s['std']:.4f}, "
                     f"z {s['z']:.2f}, p {s['p']:.4g}" if s["z"] is not None else
                     f"shuffled ({s['method']}, n={s['n']}): mean {s['mean']:.4f}, p {s['p']:.4g}")
    for c in doc["clusters"]:
        per_layer: dict[str, int] = {}
        for u in c["units"]:
            per_layer[u["layer"]] = per_layer.get(u["layer"], 0) + 1
        lines.append(f"  cluster {c['id']:>2}: {len(c['units']):>5} units  "
                     + ", ".join(f"{layer} {n}" for layer, n in per_layer.items()))
    return "\n".join(lines)
