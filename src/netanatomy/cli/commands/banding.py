"""`netanatomy banding MODEL`: weight banding score of every layer (H, V, index, orientation, p)."""
from __future__ import annotations

import click

from ..options import device_option, emit, input_shape_option, json_option, load_cli_model, model_argument, seed_option


def _table(result: dict) -> str:
    lines = [f"{'layer':28s} {'H':>6s} {'V':>6s} {'H-V':>7s} {'orientation':11s} {'p':>7s}  "
             f"{'kernels':>7s} {'eff.':>6s} {'H>V':>5s} {'axis p':>7s}"]
    for r in result["layers"]:
        if r.get("skipped"):
            lines.append(f"{r['layer']:28s} skipped: {r['skipped']}")
            continue
        lines.append(f"{r['layer']:28s} {r['horizontal']:6.3f} {r['vertical']:6.3f} {r['index']:+7.3f} "
                     f"{r['orientation']:11s} {r['p_value']:7.4f}  {r['n_kernels']:7d} {r['effective_kernels']:6.1f} "
                     f"{r['share_h_over_v']:5.0%} {_axis_p(r):>7s}")
    lines.append(f"chance: H = (kh-1)/(kh*kw-1), V = (kw-1)/(kh*kw-1); p: {result['null']}")
    lines.append("H, V weigh kernels by energy; eff.: the number of equal-energy kernels that would give the same "
                 "spread ((sum SS)^2 / sum SS^2); H>V: share of kernels whose own H exceeds their own V, unweighted")
    lines.append("axis p: H - V against random transposes of whole units (two-sided; smooth isotropic kernels do not "
                 "pass it)")
    return "\n".join(lines)


def _axis_p(record: dict) -> str:
    axis = record.get("axis") or {}
    return "n/a" if axis.get("p") is None else f"{axis['p']:.4f}"


@click.command("banding")
@model_argument
@input_shape_option
@click.option("--layer", "layers", multiple=True, metavar="LAYER", help="Layer to score (repeatable) [default: all].")
@click.option("--permutations", type=click.IntRange(1), default=999, show_default=True,
              help="Permutation replicates per layer (p resolution 1/(n+1)).")
@click.option("--method", type=click.Choice(["permutation", "normal"]), default="permutation", show_default=True,
              help="Monte Carlo permutation p-values, or the null's moments with a normal tail.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Significance level for calling a layer banded.")
@click.option("--margin", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="How much more one axis's excess over chance must be than the other's.")
@click.option("--fold-bn", is_flag=True, help="Fold a following batch norm into the weights.")
@seed_option
@device_option
@json_option
def command(model, weights, model_args, input_shape, layers, permutations, method, alpha, margin, fold_bn, seed,
            device, as_json) -> None:
    """Score weight banding in every conv layer of MODEL, and in every linear layer that reads a
    flattened map (scored on its weights reshaped to [units, C, h, w])."""
    from ...anatomy import model_banding
    from ...models.layers import discover_layers

    loaded = load_cli_model(model, weights, model_args, device, input_shape, seed=seed)
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    records = model_banding(loaded.module, layer_map, list(layers) or None, n_permutations=permutations, seed=seed,
                            alpha=alpha, margin=margin, method=method, fold_bn=fold_bn)
    null = ("within-kernel permutation, " + (f"{permutations} replicates (resolution {1 / (permutations + 1):.4g})"
                                             if method == "permutation" else "normal approximation"))
    result = {"model": loaded.source, "weights": loaded.weights, "seed": seed, "alpha": alpha, "margin": margin,
              "null": null, "layers": records}
    emit(result, as_json, _table)
