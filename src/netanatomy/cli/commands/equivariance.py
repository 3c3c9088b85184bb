"""`netanatomy equivariance MODEL --layer L`: families of units that are rotated copies."""
from __future__ import annotations

import click

from ..options import device_option, emit, input_shape_option, json_option, load_cli_model, model_argument


def _human(r: dict) -> str:
    lines = [f"{r['layer']}: rotation families ({r['mode']}, match threshold {r['threshold']})"]
    if not r["families"]:
        lines.append("no family found")
    for i, f in enumerate(r["families"]):
        period = f"period {f['period']:g}" if f["period"] else "no orientation"
        members = ", ".join(f"{u}@{a:g}" for u, a in zip(f["units"], f["angles"]))
        lines.append(f"family {i}: {len(f['units'])} units ({period}, reference {f['reference']}): {members}")
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    return "\n".join(lines)


@click.command("equivariance")
@model_argument
@input_shape_option
@click.option("--layer", required=True, metavar="LAYER", help="Conv layer with square kernels.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.8, show_default=True,
              help="Cosine similarity at which two units count as rotated copies.")
@click.option("--step", type=click.FloatRange(0.1, 90), default=2.5, show_default=True,
              help="Angle step in degrees for a first layer (deeper layers use quarter turns).")
@device_option
@json_option
def command(model, weights, model_args, input_shape, layer, threshold, step, device, as_json) -> None:
    """Group the units of LAYER into families of rotated copies, with the angle of each member
    (degrees, counter-clockwise, relative to the family's reference unit)."""
    from ...anatomy import layer_rotation_families
    from ...models.layers import discover_layers

    loaded = load_cli_model(model, weights, model_args, device, input_shape)
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    result = {"model": loaded.source,
              **layer_rotation_families(loaded.module, layer_map, layer, threshold=threshold, step=step)}
    emit(result, as_json, _human)
