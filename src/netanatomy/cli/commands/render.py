"""`netanatomy render MODEL --layer L --out DIR`: feature visualizations, one batched optimization."""
from __future__ import annotations

import time

import click

from ...util.io import file_stem

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
    parse_units,
    ray_option,
    seed_option,
)


def objective_class(obj, loaded, layer_map, logits: str | None) -> str:
    """The class an objective on one logit stands for ('Egyptian cat' for fc:285), or ''."""
    from ...errors import UsageError
    from ...models import class_name
    from ...visualize.objectives import LinearTerm

    if logits is None or len(obj.terms) != 1:
        return ""
    _, term = obj.terms[0]
    if not isinstance(term, LinearTerm) or term.units is None or len(term.units) != 1:
        return ""
    try:
        name = layer_map.resolve(term.layer).name
    except UsageError:
        return ""
    return class_name(loaded, term.units[0]) if name == logits else ""




@click.command("render")
@model_argument
@input_shape_option
@click.option("--layer", default=None, metavar="LAYER", help="Layer whose units to render (see 'netanatomy layers').")
@click.option("--units", default=None, metavar="LIST", help="Units of --layer, e.g. 0-63 or 1,5,9 [default: all].")
@click.option("--objective", "objectives", multiple=True, metavar="LAYER:UNITS",
              help="Objective instead of --layer/--units (repeatable): mixed4a:97, fc2:3, conv1:0-7 (mean of a set), "
                   "conv1:5@center (centre position).")
@click.option("--steps", type=click.IntRange(1), default=512, show_default=True, help="Optimization steps.")
@click.option("--batch", "batch", type=click.IntRange(1), default=64, show_default=True,
              help="Images optimized together in one batch.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True,
              help="Adam learning rate.")
@click.option("--param", type=click.Choice(["fourier", "pixel"]), default="fourier", show_default=True,
              help="Image parameterization.")
@click.option("--size", type=click.IntRange(1), default=None,
              help="Render at SIZE x SIZE instead of the model's input size (convolutional layers).")
@click.option("--param-size", "param_size", type=click.IntRange(1), default=None, metavar="N",
              help="Parameterize the image at N x N and upsample it to the render size (Lucent's default "
                   "for 224 px models: 128) [default: the render size].")
@click.option("--stage", type=click.Choice(["pre", "post"]), default="pre", show_default=True,
              help="Maximize pre-activation values (as Lucid's pre_relu layers) or post-activation values.")
@click.option("--transforms/--no-transforms", default=True, show_default=True,
              help="Random pad/jitter/scale/rotate at every step (transformation robustness).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output directory (finished batches are kept in OUT/render.tasks/ until the render is written, "
                   "so a stopped render resumes).")
@click.option("--restart", is_flag=True, help="Ignore the finished batches kept in OUT/render.tasks/.")
@seed_option
@device_option
@ray_option
@json_option
def command(model, weights, model_args, input_shape, layer, units, objectives, steps, batch, lr, param, size,
            param_size, stage, transforms, out, restart, seed, device, ray, as_json) -> None:
    """Render the units of LAYER of MODEL (or --objective names): one PNG each, a contact sheet, a JSON."""
    from pathlib import Path

    from ...errors import UsageError
    from ...models import logits_layer
    from ...models.layers import discover_layers
    from ...util.io import save_png, write_json
    from ...visualize import TransformConfig, channel, parse_objective, render
    from ...visualize.sheet import contact_sheet, to_hwc

    if not objectives and not layer:
        raise UsageError("say what to render: --layer LAYER [--units LIST] or --objective LAYER:UNIT")
    if objectives and (layer or units):
        raise UsageError("use either --objective or --layer/--units, not both")
    check_output(out, folder=True)
    loaded = load_cli_model(model, weights, model_args, device, input_shape, seed=seed)
    module = loaded.module
    layer_map = discover_layers(module, loaded.input_shape)
    render_side = size or (min(loaded.input_shape[1:]) if len(loaded.input_shape) == 3 else None)
    if param_size is not None and render_side is not None and param_size > render_side:
        raise UsageError(f"--param-size {param_size} is larger than the rendered image ({render_side} px)")
    if objectives:
        objs = [parse_objective(text) for text in objectives]
        unit_list = None
        layer_name = None
    else:
        resolved = layer_map.resolve(layer)
        unit_list = parse_units(units, resolved.units)
        objs = [channel(resolved.name, u) for u in unit_list]
        layer_name = resolved.name
    out_dir = Path(out)
    # everything a batch's images depend on
    store = cli_task_store(out_dir / "render.tasks", "render", model, weights, model_args, loaded, restart=restart,
                           objectives=[o.name for o in objs], steps=steps, batch=batch, lr=lr, param=param, size=size,
                           param_size=param_size, stage=stage, transforms=transforms, seed=seed, device=str(device))
    started = time.perf_counter()
    with cli_runner(ray, device) as runner:
        result = render(module, objs, steps=steps, lr=lr, seed=seed, batch_size=batch, size=size, param=param,
                        param_size=param_size,
                        stage=stage, transforms=TransformConfig() if transforms else None,
                        input_shape=layer_map.input_shape, device=device, runner=runner, store=store)
    seconds = time.perf_counter() - started

    files = []
    for i, obj in enumerate(objs):
        stem = f"unit_{unit_list[i]:04d}" if unit_list is not None else f"{i:03d}_{file_stem(obj.name)}"
        path = out_dir / f"{stem}.png"
        save_png(to_hwc(result.images[i]), path)
        files.append(path.name)
    logits = logits_layer(loaded, layer_map)
    names = [objective_class(o, loaded, layer_map, logits) for o in objs]
    shown = [f"{u}" for u in unit_list] if unit_list is not None else [o.name for o in objs]
    shown = [f"{text} {name}" if name else text for text, name in zip(shown, names)]
    labels = [f"{text}: {v:.2f}" for text, v in zip(shown, result.values)]
    what = layer_name or (shown[0] if len(shown) == 1 else "")
    title = f"{loaded.source} {what} ({steps} steps, seed {seed})".replace("  ", " ")
    save_png(contact_sheet(result.images, labels, title=title, label_lines=2 if any(names) else 1),
             out_dir / "contact_sheet.png")
    summary = {
        "model": loaded.source, "weights": loaded.weights, "layer": layer_name, "units": unit_list,
        "objectives": result.names, "class_names": names if any(names) else None, "values": result.values,
        "files": files, "contact_sheet": "contact_sheet.png",
        "steps": steps, "batch": batch, "lr": lr, "param": param, "stage": stage, "transforms": transforms,
        "size": list(result.images.shape[2:]), "seed": seed, "seeds": result.seeds, "device": str(device),
        "seconds": seconds, "out": str(out_dir),
    }
    write_json(out_dir / "render.json", summary)
    store.clear()

    def human(s):
        what = s["layer"] or (shown[0] if len(shown) == 1 else "the objectives")
        named = "".join(f"\n{text}: {v:.3g}" for text, name, v in zip(shown, names, s["values"]) if name)
        return (f"rendered {len(files)} images of {what} in {seconds:.1f} s "
                f"({steps} steps); objective values {min(s['values']):.3g} to {max(s['values']):.3g}"
                f"{named if 1 < len(files) <= 16 else ''}\n"
                f"wrote {out_dir}/ (PNG per image, contact_sheet.png, render.json)")

    emit(summary, as_json, human)
