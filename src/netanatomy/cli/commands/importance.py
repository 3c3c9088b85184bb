"""`netanatomy importance MODEL --clusters FILE --data D --random R`: lesion tests of sub-clusters."""
from __future__ import annotations

import click

from ..options import (
    check_output,
    cli_runner,
    cli_task_store,
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


@click.command("importance")
@model_argument
@input_shape_option
@click.option("--clusters", "clusters_file", required=True, type=click.Path(dir_okay=False),
              help="Clusters JSON written by `netanatomy clusters --out`.")
@click.option("--data", required=True, metavar="DATA", help="Labelled data set (its test split), e.g. fashion-mnist.")
@click.option("--random", "n_random", type=click.IntRange(1), default=99, show_default=True,
              help="Random same-size sets per sub-cluster (the smallest p is 1/(R+1): 0.01 at 99, 0.05 at 19).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N test examples.")
@click.option("--batch-size", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--exact", is_flag=True, help="Run lesions as masked forwards only (no low-rank update).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON result here; finished lesion tasks are kept in OUT.tasks/ until it is "
                   "written, so a stopped run resumes.")
@click.option("--restart", is_flag=True, help="Ignore the finished lesion tasks kept beside --out.")
@seed_option
@device_option
@ray_option
@json_option
def command(model, weights, model_args, input_shape, clusters_file, data, n_random, limit, batch_size, exact, out,
            restart, seed, device, ray, as_json) -> None:
    """Silence each sub-cluster (a cluster's units in one layer) and R random same-size sets of its
    layer; report the accuracy drop, class specificity and effect factor with p, q and Fisher."""
    from ...models.layers import discover_layers
    from ...specialization.importance import TASK_MASKS, importance
    from ...util.io import sha256_of, write_json
    from ...util.progress import progress

    check_output(out)
    loaded = load_cli_model(model, weights, model_args, device, input_shape, seed=seed)
    ds = open_cli_data(data, "test", loaded, limit=limit, seed=seed, labels=True)
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    clusters = read_cli_clusters(clusters_file, loaded, layer_map)
    x, y = ds.tensors()
    # everything a lesion task's counts depend on
    store = cli_task_store(out + ".tasks", "importance lesions", model, weights, model_args, loaded, restart=restart,
                           clusters=sha256_of(clusters_file), data=data, limit=limit, random=n_random, seed=seed,
                           batch_size=batch_size, exact=exact, task_masks=TASK_MASKS) if out else None
    bar = progress(desc="lesions", unit="layer")
    try:
        with cli_runner(ray, device) as runner:
            result = importance(loaded.module, layer_map, clusters, x, y, n_random=n_random, seed=seed,
                                num_classes=loaded.num_classes, batch_size=batch_size, device=device, exact=exact,
                                on_layer=lambda _: bar.update(1), runner=runner, store=store)
    finally:
        bar.close()
    doc = {"model": loaded.source, "data": data, "examples": int(x.shape[0]), **result.to_json()}
    doc["class_names"] = _class_names(loaded, ds, len(doc["class_accuracy"]))
    if out:
        write_json(out, doc)
        store.clear()
    emit(doc, as_json, _human)


def _class_names(loaded, ds, count: int) -> list[str]:
    """A name per class of the accuracy tables: the model's class names (label i is output i),
    else the data set's, else the index."""
    from ...models import class_name

    data_names = list(getattr(ds, "classes", None) or [])
    return [class_name(loaded, c) or (str(data_names[c]) if c < len(data_names) else str(c)) for c in range(count)]


def _human(doc: dict) -> str:
    names = doc.get("class_names") or [str(c) for c in range(len(doc["class_accuracy"]))]
    lines = [f"{doc['model']} on {doc['data']} ({doc['examples']} examples): accuracy {doc['accuracy']:.4f}, "
             f"{doc['random']} random sets per sub-cluster",
             f"Fisher over sub-clusters: drop p {doc['fisher']['drop']:.3g}, "
             f"specificity p {doc['fisher']['specificity']:.3g}"]
    if len(names) <= 20:
        lines.append("accuracy per class: " + ", ".join(f"{n} {a:.3f}" for n, a in zip(names, doc["class_accuracy"])))
    lines.append(f"{'cluster':>7} {'layer':<16} {'size':>5} {'drop':>8} {'random':>8} {'p':>7} {'q':>7} "
                 f"{'factor':>7} {'spec':>7} {'p':>7}  most hurt class")
    for t in doc["sub_clusters"]:
        drops = [] if t.get("class_drop") is None else [float(d) for d in t["class_drop"]]
        worst = max(range(len(drops)), key=lambda c: drops[c]) if drops else None
        hurt = f"{names[worst]} ({drops[worst]:+.3f})" \
            if worst is not None and worst < len(names) and drops[worst] > 0 else "-"
        lines.append(f"{t['cluster']:>7} {t['layer']:<16} {t['size']:>5} {t['drop']:>8.4f} "
                     f"{t['random_drop_mean']:>8.4f} {t['p_drop']:>7.3g} {t['q_drop']:>7.3g} "
                     f"{t['effect_factor']:>7.2f} {t['specificity']:>7.2f} {t['p_specificity']:>7.3g}  {hurt}")
    return "\n".join(lines)
