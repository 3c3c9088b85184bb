"""`netanatomy equivariance MODEL --layer L`: families of units that are rotated copies."""
from __future__ import annotations

import click

from ..options import check_output, device_option, emit, input_shape_option, json_option, load_cli_model, model_argument


def _member_order(f: dict) -> list[tuple[int, float]]:
    """Members in angle order, the reference first among those at 0 degrees."""
    rows = list(zip(f["units"], f["angles"]))
    return sorted(rows, key=lambda r: (float(r[1]), int(r[0]) != int(f["reference"])))


def _family_line(i: int, f: dict) -> str:
    n = len(f["units"])
    period = f"period {f['period']:g}" if f["period"] else "no period (the same turned 45 deg)"
    if f.get("orientation") is not None:
        orient = f"oriented {f['orientation']:.0f} deg, coherence {f['coherence']:.2f}"
    elif f.get("coherence") is not None:
        orient = f"no orientation (coherence {f['coherence']:.2f})"
    else:
        orient = ""  # not measured (quarter turns of a deeper layer)
    ref = f"reference {f['reference']}" + (f" {orient}" if orient else "")
    dups = {int(u) for u in f.get("duplicates") or []}
    if f.get("kind") == "duplicates":
        members = ", ".join(str(u) for u, _ in _member_order(f))
        return f"family {i}: {n} units, duplicates (copies at 0 degrees), {period}; {ref}: {members}"
    members = ", ".join(f"{u}@{a:g}" + (" dup" if int(u) in dups else "") for u, a in _member_order(f))
    copies = f", {len(dups)} duplicate{'s' if len(dups) > 1 else ''} of the reference" if dups else ""
    return f"family {i}: {n} units, rotated{copies}, {period}; {ref}: {members}"


def _human(r: dict) -> str:
    lines = [f"{r['layer']}: rotation families ({r['mode']}, match threshold {r['threshold']:g})",
             r["resolution_note"]]
    if not r["families"]:
        lines.append("no family found")
    lines += [_family_line(i, f) for i, f in enumerate(r["families"])]
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    if r.get("figure"):
        lines.append(f"figure:   {r['figure']}")
        lines.append(f"families: {r['families_json']}")
    return "\n".join(lines)


@click.command("equivariance")
@model_argument
@input_shape_option
@click.option("--layer", required=True, metavar="LAYER", help="Conv layer with square kernels.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.8, show_default=True,
              help="Cosine similarity at which two units count as rotated copies.")
@click.option("--step", type=click.FloatRange(0.1, 90), default=2.5, show_default=True,
              help="Angle step in degrees for a first layer (deeper layers use quarter turns).")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Folder for families.png (each family's filters in angle order) and families.json.")
@device_option
@json_option
def command(model, weights, model_args, input_shape, layer, threshold, step, out, device, as_json) -> None:
    """Group the units of LAYER into families of rotated copies, with the angle of each member
    (degrees, counter-clockwise, relative to the family's reference unit). Members at 0 degrees
    are duplicates of the reference; angles are rounded to what the kernel size resolves."""
    from ...anatomy import layer_rotation_families, layer_weights
    from ...anatomy.family_plots import resolution_text
    from ...core.equivariance import angle_resolution
    from ...models.layers import discover_layers

    check_output(out, folder=True)
    loaded = load_cli_model(model, weights, model_args, device, input_shape)
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    found = layer_rotation_families(loaded.module, layer_map, layer, threshold=threshold, step=step)
    filters = layer_weights(loaded.module, layer_map, found["layer"]).weights
    k = int(filters.shape[-1])
    if found["families"]:
        resolution = float(found["families"][0]["resolution"])
    else:
        resolution = max(angle_resolution(k), step) if found["mode"] == "any angle" else 90.0
    result = {"model": loaded.source, **found, "resolution": resolution}
    note = resolution_text(found["mode"], resolution, k, step if found["mode"] == "any angle" else None)
    if out:
        result.update(_write(out, result, filters, note))
    emit(result, as_json, lambda r: _human({**r, "resolution_note": note}))


def _write(out: str, result: dict, filters, note: str) -> dict:
    """families.png and families.json under `out`, each written atomically."""
    from pathlib import Path

    from ...anatomy import family_figure
    from ...util.io import save_figure, write_json

    out_dir = Path(out)
    title = f"Rotation families of {result['model']}, layer {result['layer']}"
    search = "searched at any angle" if result["mode"] == "any angle" else "compared at quarter turns"
    subtitle = f"units whose filters match a rotated copy at cosine \N{GREATER-THAN OR EQUAL TO} " \
               f"{result['threshold']:g} ({search})"
    fig = family_figure(filters, result["families"], title=title, subtitle=subtitle,
                        resolution=result["resolution"], note=note.replace(" deg", "\N{DEGREE SIGN}"))
    figure = save_figure(fig, out_dir / "families.png", dpi=fig.dpi, facecolor="white")
    paths = {"figure": str(figure), "families_json": str(out_dir / "families.json")}
    write_json(out_dir / "families.json", {**result, **paths})
    return paths
