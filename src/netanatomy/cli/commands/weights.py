"""`netanatomy weights MODEL --layer L --out DIR`: NMF weight pictures of a layer."""
from __future__ import annotations

import click

from ...util.io import file_stem
from ..options import (
    check_output,
    device_option,
    emit,
    input_shape_option,
    json_option,
    load_cli_model,
    model_argument,
    seed_option,
)


@click.command("weights")
@model_argument
@input_shape_option
@click.option("--layer", required=True, metavar="LAYER", help="Conv layer (or linear layer on a map) to draw.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--mode", type=click.Choice(["shared", "per-unit"]), default="shared", show_default=True,
              help="One NMF for the whole layer (colours mean the same in every unit), or one per unit "
                   "aligned to the shared factors.")
@click.option("--scale", type=click.IntRange(1), default=None, help="Upscaling factor [default: ~48 px per picture].")
@click.option("--fold-bn", is_flag=True, help="Fold a following batch norm into the weights.")
@seed_option
@device_option
@json_option
def command(model, weights, model_args, input_shape, layer, out, mode, scale, fold_bn, seed, device, as_json) -> None:
    """Draw every unit of LAYER as an NMF picture (sign-split input channels -> 3 colours),
    in a grid sorted by similarity; write the grid PNG and a JSON of the factors."""
    from pathlib import Path

    from ...anatomy import layer_pictures, layer_weights
    from ...errors import UsageError
    from ...models.layers import discover_layers
    from ...util.io import save_png, write_json

    check_output(out, folder=True)
    loaded = load_cli_model(model, weights, model_args, device, input_shape, seed=seed)
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    lw = layer_weights(loaded.module, layer_map, layer, fold_bn=fold_bn)
    if not lw.spatial:
        raise UsageError(f"layer {lw.layer} is a linear layer on a vector: it has no spatial weights to draw")
    pics = layer_pictures(lw.weights, mode=mode.replace("-", "_"), scale=scale, seed=seed)
    out_dir = Path(out)
    stem = file_stem(lw.layer)
    grid_path = save_png(pics.grid, out_dir / f"{stem}_weights.png")
    import matplotlib.pyplot as plt

    from ...anatomy.plots import weights_figure
    from ...util.io import save_figure

    from ...anatomy import INPUT, feeding_layer

    reads_image = feeding_layer(loaded.module, layer_map, lw.layer) == INPUT and lw.weights.shape[1] in (1, 3)
    channel_names = (["R", "G", "B"] if lw.weights.shape[1] == 3 else ["grey"]) if reads_image else None
    fig = weights_figure(pics, lw.layer, note=lw.note, channel_names=channel_names)
    figure_path = save_figure(fig, out_dir / f"{stem}_weights_labelled.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    doc = {"model": loaded.source, "layer": lw.layer, "shape": list(lw.weights.shape), "note": lw.note,
           "grid": str(grid_path), "figure": str(figure_path), **pics.factors_json()}
    json_path = write_json(out_dir / f"{stem}_factors.json", doc)
    result = {"model": loaded.source, "layer": lw.layer, "units": int(lw.weights.shape[0]),
              "kernel": list(lw.weights.shape[2:]), "mode": pics.factors.mode,
              "mean_error": float(pics.factors.error.mean()), "grid": str(grid_path), "figure": str(figure_path),
              "factors": str(json_path)}
    if lw.note:
        result["note"] = lw.note
    emit(result, as_json, lambda r: (f"{r['layer']}: {r['units']} units, {r['kernel'][0]}x{r['kernel'][1]}, "
                                     f"{r['mode']} NMF (mean relative error {r['mean_error']:.3f})\n"
                                     f"grid:    {r['grid']}\nfigure:  {r['figure']} (unit numbers, colour key)\n"
                                     f"factors: {r['factors']}"))
