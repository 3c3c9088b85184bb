"""`netanatomy examples MODEL --layer L --data D --out DIR`: the real inputs that excite each unit most."""
from __future__ import annotations

import time

import click

from ..options import (
    check_output,
    device_option,
    emit,
    input_shape_option,
    json_option,
    load_cli_model,
    model_argument,
    open_cli_data,
    parse_units,
    seed_option,
)


@click.command("examples")
@model_argument
@input_shape_option
@click.option("--layer", required=True, metavar="LAYER", help="Layer whose units to show (see 'netanatomy layers').")
@click.option("--data", required=True, metavar="DATA", help="Data set, e.g. bundled, fashion-mnist, cifar10:DIR.")
@click.option("--split", default="test", show_default=True, help="Split of the data set to search.")
@click.option("--units", default=None, metavar="LIST", help="Units, e.g. 0-63 or 1,5,9 [default: all].")
@click.option("--top-k", "top_k", type=click.IntRange(1), default=9, show_default=True, help="Examples per unit.")
@click.option("--rank", type=click.Choice(["max", "mean"]), default="max", show_default=True,
              help="Rank inputs by the maximum of each unit's map (local response) or by its spatial mean.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Search only the first N examples.")
@click.option("--crop/--no-crop", default=True, show_default=True,
              help="Crop conv units' examples to the receptive field around the map's maximum.")
@click.option("--stage", type=click.Choice(["pre", "post"]), default="pre", show_default=True,
              help="Rank by pre-activation or post-activation values.")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@seed_option
@device_option
@json_option
def command(model, weights, model_args, input_shape, layer, data, split, units, top_k, rank, limit, crop, stage,
            batch_size, out, seed, device, as_json) -> None:
    """Find the top-k inputs of each unit of LAYER over DATA: a PNG per unit, a contact sheet, a JSON."""
    from pathlib import Path

    from ...models import class_name, logits_layer
    from ...models.layers import discover_layers
    from ...util.io import save_png, write_json
    from ...visualize.examples import dataset_examples, examples_sheet, label_names
    from ..boundary import warn_size_mismatch

    check_output(out, folder=True)
    loaded = load_cli_model(model, weights, model_args, device, input_shape, seed=seed)
    module = loaded.module
    dataset = open_cli_data(data, split, loaded, limit=limit, seed=seed)
    warn_size_mismatch(dataset, loaded, data)
    layer_map = discover_layers(module, loaded.input_shape)
    resolved = layer_map.resolve(layer)
    unit_list = parse_units(units, resolved.units)
    classes = list(getattr(dataset, "classes", None) or []) or None
    unit_names = [class_name(loaded, u) for u in unit_list] \
        if logits_layer(loaded, layer_map) == resolved.name else None
    started = time.perf_counter()
    found = dataset_examples(module, resolved.name, dataset, units=unit_list, top_k=top_k, rank=rank, crop=crop,
                             stage=stage, batch_size=batch_size, device=device, input_shape=layer_map.input_shape)
    seconds = time.perf_counter() - started

    out_dir = Path(out)
    files = []
    for i, u in enumerate(found.units):
        one = found.subset([i])
        path = out_dir / f"unit_{u:04d}.png"
        save_png(examples_sheet(one, class_names=classes, unit_names=unit_names and unit_names[i:i + 1]), path)
        files.append(path.name)
    save_png(examples_sheet(found, class_names=classes, unit_names=unit_names), out_dir / "contact_sheet.png")
    summary = {
        "model": loaded.source, "weights": loaded.weights, "data": data, "split": split, "limit": limit,
        "top_k": found.index.shape[1], "stage": stage, "crop": crop, **found.to_json(),
        "unit_names": unit_names, "label_names": label_names(found, classes),
        "classes": classes, "files": files, "contact_sheet": "contact_sheet.png", "seconds": seconds,
        "out": str(out_dir),
    }
    write_json(out_dir / "examples.json", summary)

    def human(s):
        field = s["receptive_field"]
        rf = f"; crops {field['size'][0]}x{field['size'][1]} ({field['method']} receptive field)" if field else ""
        return (f"top {s['top_k']} examples of {len(files)} units of {s['layer']} over {data} "
                f"in {seconds:.1f} s{rf}\nwrote {out_dir}/ (PNG per unit, contact_sheet.png, examples.json)")

    emit(summary, as_json, human)

