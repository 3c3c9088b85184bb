"""`netanatomy survey [MODEL] --out DIR`: every analysis that applies, within a budget, as an atlas."""
from __future__ import annotations

import click

from ..options import (
    check_output,
    cli_runner,
    comma_list,
    device_option,
    emit,
    input_shape_option,
    json_option,
    load_cli_model,
    open_cli_data,
    ray_option,
    seed_option,
)


@click.command("survey")
@click.argument("model", metavar="[MODEL]", required=False, default=None)
@click.option("--weights", "weights", default=None, metavar="FILE",
              help="State dict to load (.pt/.pth loaded weights-only, or .safetensors); strict.")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Keyword argument for the model factory (repeatable).")
@input_shape_option
@click.option("--data", default=None, metavar="DATA",
              help="Data for examples, probes, lesions [default: bundled for the default model, else 1000 photo "
                   "patches at the model's size].")
@click.option("--layers", "layers", default=None, metavar="L1,L2,...",
              help="Layers whose units get pages (renders, examples, probes) [default: every conv, linear and "
                   "concatenation layer].")
@click.option("--budget", "budget", type=click.FloatRange(0.1), default=5.0, show_default=True, metavar="MIN",
              help="Minutes to spend; parts that would not fit are left out and listed.")
@click.option("--steps", type=click.IntRange(1), default=128, show_default=True, help="Render steps per unit.")
@click.option("--param-size", type=click.IntRange(8), default=None,
              help="Render parameterization size, upsampled to the model's (Lucent: 128 for 224 px models).")
@click.option("--k", type=click.IntRange(2), default=12, show_default=True, help="Clusters of the weight graph.")
@click.option("--shuffles", type=click.IntRange(0), default=19, show_default=True,
              help="Shuffled networks for clusterability (19: p can reach 0.05).")
@click.option("--random", "n_random", type=click.IntRange(1), default=49, show_default=True,
              help="Random same-size sets per sub-cluster (lesions, coherence).")
@click.option("--examples", type=click.IntRange(10), default=2000, show_default=True,
              help="Data examples used (the first N of the data set).")
@click.option("--out", "out", default="runs/atlas", show_default=True, type=click.Path(file_okay=False),
              help="The atlas folder (re-used on a re-run: finished parts are kept).")
@seed_option
@device_option
@ray_option
@json_option
def command(model, weights, model_args, input_shape, data, layers, budget, steps, param_size, k, shuffles, n_random,
            examples, out, seed, device, ray, as_json) -> None:
    """Run every analysis that applies to MODEL (default: the bundled branched model on the bundled
    data) within --budget minutes and write a browsable atlas: OUT/index.html (open it, or run
    'netanatomy serve OUT'), the raw results in OUT/results/ and OUT/atlas.json."""
    from pathlib import Path

    from ...atlas.survey import DEFAULT_DATA, DEFAULT_MODEL, SurveySettings, run_survey

    check_output(out, folder=True)
    name = model or DEFAULT_MODEL
    loaded = load_cli_model(name, weights, model_args, device, input_shape, seed=seed)
    channels = int(loaded.input_shape[0]) if loaded.input_shape else 3
    spec = data or (DEFAULT_DATA if name == DEFAULT_MODEL else
                    "photos?n=1000" + ("" if channels == 3 else f"&channels={channels}"))
    dataset = open_cli_data(spec, "test", loaded, limit=examples, seed=seed)
    chosen = tuple(comma_list(layers)) if layers else ()
    if chosen:
        from ...models.layers import discover_layers

        layer_map = discover_layers(loaded.module, loaded.input_shape)
        chosen = tuple(layer_map.resolve(x).name for x in chosen)
    settings = SurveySettings(model=name, weights=weights, model_args=tuple(model_args), data=spec, layers=chosen,
                              budget_min=budget, steps=steps, param_size=param_size, k=k, shuffles=shuffles,
                              n_random=n_random, examples=examples, seed=seed, device=device)
    with cli_runner(ray, device) as runner:
        doc = run_survey(out, settings, loaded=loaded, dataset=dataset, log=lambda m: click.echo(m, err=True),
                         runner=runner)
    index = Path(out) / "index.html"
    summary = {"atlas": str(Path(out)), "index": str(index), "seconds": doc["survey"]["seconds"],
               "budget_s": doc["survey"]["budget_s"], "parts": doc["survey"]["parts"], "headlines": doc["headlines"]}

    def human(s):
        left = [f"{p} ({v['reason']})" for p, v in s["parts"].items() if v["status"] in ("left out", "skipped")]
        lines = [f"surveyed {doc['model']['name']} on {doc['model']['data']} in {s['seconds']:.0f} s "
                 f"(budget {s['budget_s'] / 60:g} min)"]
        lines += [f"- {h['text']}" for h in s["headlines"][:12]]
        if left:
            lines.append("left out: " + "; ".join(left))
        lines.append(f"atlas: {s['index']}  (open it in a browser, or: netanatomy serve {s['atlas']})")
        return "\n".join(lines)

    emit(summary, as_json, human)
