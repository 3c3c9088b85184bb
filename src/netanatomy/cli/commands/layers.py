"""`netanatomy layers MODEL`: every analyzable layer, its units, kernel and branches."""
from __future__ import annotations

import click

from ..options import device_option, emit, input_shape_option, json_option, load_cli_model, model_argument


@click.command("layers")
@model_argument
@input_shape_option
@click.option("--method", type=click.Choice(["auto", "fx", "modules"]), default="auto", show_default=True,
              help="How to discover layers: torch.fx tracing, module calls, or fx with fallback.")
@device_option
@json_option
def command(model: str, weights: str | None, model_args: tuple[str, ...], input_shape: str | None, method: str,
            device: str, as_json: bool) -> None:
    """List the layers of MODEL with unit counts, kernels and branches (unit ranges in the joined output)."""
    from ...models.layers import discover_layers, layers_summary

    loaded = load_cli_model(model, weights, model_args, device, input_shape)
    layer_map = discover_layers(loaded.module, loaded.input_shape, method=method)
    result = {"model": loaded.source, "weights": loaded.weights, **layer_map.to_json()}
    emit(result, as_json, lambda _: f"{loaded.source}  (input {tuple(layer_map.input_shape)}, found by {layer_map.method})\n"
         + layers_summary(layer_map))
