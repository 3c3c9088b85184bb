"""`netanatomy probe MODEL --layer L`: categories of units from probes (colour, orientation and
frequency, first-layer filter colour), with the rule of each category."""
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
    seed_option,
)

FULL_TABLE_UNITS = 64  # up to this many units a layer gets a row per unit; above, counts and top units
SHOWN_MEMBERS = 12
TOP_UNITS = 5


def _parse_probes(_ctx, _param, value: str | None) -> tuple[str, ...] | None:
    from ...anatomy.probes import check_probes
    from ...errors import UsageError

    if value is None:
        return None
    try:
        return check_probes(value.split(","))
    except UsageError as exc:
        raise click.BadParameter(str(exc), param_hint="--probe") from None


@click.command("probe")
@model_argument
@input_shape_option
@click.option("--layer", "layers", required=True, multiple=True, metavar="LAYER",
              help="Layer to probe (repeatable): any name 'netanatomy layers' lists, or any submodule.")
@click.option("--probe", "probes", default=None, callback=_parse_probes, metavar="LIST",
              help="Probes, comma-separated: colour, orientation, filter [default: every one that applies].")
@click.option("--data", default=None, metavar="DATA",
              help="Colour images for the colour probe [default: 128 photo patches at the model's input size].")
@click.option("--split", default="test", show_default=True, help="Split of --data.")
@click.option("--batch-size", type=click.IntRange(2), default=64, show_default=True)
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False), metavar="FILE.json",
              help="Also write the JSON document to this file.")
@seed_option
@device_option
@json_option
def command(model, weights, model_args, input_shape, layers, probes, data, split, batch_size, out, seed, device,
            as_json) -> None:
    """Probe units of LAYER: colour selectivity, grating tuning (orientation, OSI, frequency) and,
    for a layer that reads the image, filter colourfulness; categories with their rules."""
    from ...anatomy.probes import PROBES, probe_layers
    from ...models.layers import discover_layers
    from ...util.io import write_json

    check_output(out)
    loaded = load_cli_model(model, weights, model_args, device, input_shape, seed=seed)
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    resolved = [layer_map.resolve(name) for name in layers]
    chosen = _applicable(loaded, layer_map, resolved, probes)
    dataset = None
    if data is not None:
        _check_data_use(loaded, layer_map, resolved, chosen)
        dataset = open_cli_data(data, split, loaded, seed=seed)
    started = time.perf_counter()
    results = probe_layers(loaded.module, layer_map, [layer.name for layer in resolved], chosen, data=dataset,
                           device=device, seed=seed, batch_size=batch_size)
    document = {
        "model": loaded.source, "weights": loaded.weights, "model_args": list(model_args), "seed": seed,
        "input_shape": list(layer_map.input_shape), "probes": list(probes or PROBES),
        "seconds": time.perf_counter() - started,
        "layers": {name: result.to_json() for name, result in results.items()},
    }
    if out:
        write_json(out, document)
    emit(document, as_json, _human)


def _applicable(loaded, layer_map, resolved, probes) -> tuple[str, ...]:
    """The probes to run. An explicit probe that applies to none of the layers is refused
    (exit 2, saying why); by default every probe runs where it applies, notes say where not."""
    from ...anatomy.probes import PROBES, not_applicable
    from ...errors import UsageError

    if probes is None:
        return PROBES
    for probe in probes:
        reasons = [not_applicable(loaded.module, layer_map, layer, probe) for layer in resolved]
        if all(reasons):
            head = reasons[0].split(": ", 2)[-1] if len(reasons) == 1 else \
                f"none of {', '.join(layer.name for layer in resolved)} qualifies ({reasons[0].split(': ', 2)[-1]})"
            raise UsageError(f"--probe {probe} does not apply to {loaded.source}: {head}")
    return probes


def _check_data_use(loaded, layer_map, resolved, chosen) -> None:
    from ...anatomy.probes import not_applicable
    from ...errors import UsageError

    if "colour" not in chosen:
        raise UsageError("--data feeds only the colour probe, and --probe leaves it out: drop --data or add colour")
    reason = not_applicable(loaded.module, layer_map, resolved[0], "colour")
    if reason:
        raise UsageError(f"--data feeds only the colour probe, which does not apply to {loaded.source} "
                         f"({reason.split(': ', 2)[-1]}): drop --data")


# ---------------------------------------------------------------------------------------------
# Human output


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _stimuli_line(result: dict) -> str:
    parts = []
    colour = result["stimuli"].get("colour")
    if colour:
        parts.append(f"{colour['images']} images of {colour['data']} and their grey versions")
    gratings = result["stimuli"].get("orientation")
    if gratings:
        parts.append(f"{gratings['gratings']} gratings ({gratings['orientations']} orientations x "
                     f"{len(gratings['frequencies'])} frequencies x {gratings['phases']} phases, "
                     f"{gratings['size']} px) and a blank")
    return "; ".join(parts)


_COLUMNS = (  # (header, value key, format, width)
    ("colour", "colour_selectivity", "+.2f", 6), ("q", "colour_q", ".3f", 5),
    ("ori", "preferred_orientation_deg", ".0f", 4), ("c/img", "preferred_frequency", "g", 5),
    ("OSI", "osi", ".2f", 4), ("q", "osi_q", ".3f", 5),
    ("filt.col", "filter_colourfulness", ".2f", 8), ("filt.c/px", "filter_frequency", ".3f", 9),
)


def _unit_rows(result: dict) -> list[str]:
    table = result["units_table"]
    columns = [c for c in _COLUMNS if table and c[1] in table[0]]
    header = "  unit  " + "  ".join(f"{h:>{w}}" for h, _, _, w in columns) + "  categories"
    rows = [header]
    for row in table:
        cells = "  ".join(f"{_fmt(row[k], spec):>{w}}" for _, k, spec, w in columns)
        rows.append(f"  {row['unit']:>4}  {cells}  {', '.join(row['categories'])}")
    return rows


def _top_rows(result: dict) -> list[str]:
    table = result["units_table"]
    lines = []
    for key, label in (("colour_selectivity", "colour selectivity"), ("osi", "OSI"),
                       ("filter_colourfulness", "filter colourfulness")):
        if not table or key not in table[0]:
            continue
        ranked = sorted((r for r in table if r[key] is not None), key=lambda r: -r[key])[:TOP_UNITS]
        lines.append(f"  top by {label}: " + ", ".join(f"{r['unit']} ({r[key]:.2f})" for r in ranked))
    return lines


def _layer_text(result: dict) -> list[str]:
    lines = [f"{result['layer']}: {result['units']} units; probes: {', '.join(result['probes']) or 'none'} "
             f"(responses: {result['stage']}-activation, {result['reduce']} over space)"]
    stimuli = _stimuli_line(result)
    if stimuli:
        lines.append(f"  stimuli: {stimuli}")
    lines += [f"  note: {note}" for note in result["notes"]]
    for name, members in result["categories"].items():
        shown = ", ".join(map(str, members[:SHOWN_MEMBERS]))
        more = f" (+{len(members) - SHOWN_MEMBERS} more)" if len(members) > SHOWN_MEMBERS else ""
        lines.append(f"  {name:<17} {len(members):>4}" + (f"  units {shown}{more}" if members else ""))
    if result["units"] <= FULL_TABLE_UNITS:
        lines += _unit_rows(result)
    else:
        lines += _top_rows(result)
    return lines


def _human(document: dict) -> str:
    lines = [f"{document['model']}: probes in {document['seconds']:.1f} s"]
    rules: dict[str, str] = {}
    for result in document["layers"].values():
        lines += _layer_text(result)
        for name, rule in result["rules"].items():
            key = name if rules.get(name, rule) == rule else f"{name} ({result['layer']})"
            rules.setdefault(key, rule)
    if rules:
        lines.append("rules:")
        lines += [f"  {name}: {rule}" for name, rule in rules.items()]
    return "\n".join(lines)
