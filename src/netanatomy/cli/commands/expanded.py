"""`netanatomy expanded MODEL --lower L1 --upper L2`: expanded weights through the linearized model."""
from __future__ import annotations

import click

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


def _human(r: dict) -> str:
    lines = [f"expanded weights {r['lower']} -> {r['upper']}: {r['shape']} "
             f"(receptive field of {r['upper']} at {tuple(r['position'])})",
             f"linearized: {', '.join(r['replaced']) or 'nothing'}"]
    if r["kept"]:
        lines.append(f"left nonlinear: {', '.join(r['kept'])}")
    lines.append("strongest connections (L2 norm):")
    for c in r["top"]:
        lines.append(f"  {r['upper']}:{c['upper']} <- {r['lower']}:{c['lower']}  {c['norm']:.4g} (sum {c['sum']:+.3g})")
    for key in ("tensor", "grid"):
        if r.get(key):
            lines.append(f"{key}: {r[key]}")
    return "\n".join(lines)


@click.command("expanded")
@model_argument
@input_shape_option
@click.option("--lower", required=True, metavar="LAYER", help="Lower layer, or 'input' for the model input.")
@click.option("--upper", required=True, metavar="LAYER", help="Upper layer (with a spatial map).")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="Connections to list.")
@click.option("--chunk", type=click.IntRange(1), default=64, show_default=True,
              help="Upper units per backward pass.")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Directory for the tensor (.safetensors), its NMF pictures (PNG) and a JSON.")
@seed_option
@device_option
@json_option
def command(model, weights, model_args, input_shape, lower, upper, top, chunk, out, seed, device, as_json) -> None:
    """Expanded weights [C_upper, C_lower, h, w] from LOWER to UPPER with ReLU -> identity and
    max-pool -> average pool: the gradient of each upper unit's centre with respect to LOWER."""
    from pathlib import Path

    from safetensors.torch import save as save_safetensors

    from ...anatomy import expanded_weights, layer_pictures, top_connections
    from ...models.layers import discover_layers
    from ...util.io import save_png, write_bytes, write_json
    from .weights import file_stem

    check_output(out, folder=True)
    loaded = load_cli_model(model, weights, model_args, device, input_shape, seed=seed)
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    res = expanded_weights(loaded.module, layer_map, lower, upper, chunk=chunk)
    result = {"model": loaded.source, "lower": res.lower, "upper": res.upper, "shape": list(res.weights.shape),
              "position": list(res.position), "origin": list(res.origin), "replaced": list(res.replaced),
              "kept": list(res.kept), "top": top_connections(res, top)}
    if out:
        out_dir = Path(out)
        stem = f"expanded_{file_stem(res.lower)}_{file_stem(res.upper)}"
        result["tensor"] = str(write_bytes(out_dir / f"{stem}.safetensors",
                                           save_safetensors({"weights": res.weights.contiguous()})))
        if res.weights.shape[-1] * res.weights.shape[-2] > 1:
            pics = layer_pictures(res.weights, seed=seed)
            result["grid"] = str(save_png(pics.grid, out_dir / f"{stem}.png"))
        write_json(out_dir / f"{stem}.json", result)
    emit(result, as_json, _human)
