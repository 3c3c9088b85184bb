"""`netanatomy svd MODEL --layer L`: SVD of |W| between L and the layer feeding it."""
from __future__ import annotations

import click

from ..options import check_output, device_option, emit, input_shape_option, json_option, load_cli_model, model_argument


def _human(r: dict) -> str:
    if r.get("through"):
        lines = [f"SVD of |W|, W the expanded weights from {r['lower']} to {r['upper']} through the layers between "
                 f"(nonlinearities linearized, |.| summed over the receptive field; rows: {r['upper']}'s units, "
                 f"columns: {r['lower']}'s)"]
    else:
        lines = [f"SVD of |W| of {r['upper']} (rows: its units) against {r['lower']} (columns)"]
    shares = r["shares"][:5]
    lines.append("singular values: " + ", ".join(f"{s:.3g}" for s in r["singular_values"][:5])
                 + "  shares (s^2/sum s^2): " + ", ".join(f"{100 * s:.1f}%" for s in shares))
    for vec, props in (r.get("correlations") or {}).items():
        for name, c in props.items():
            lines.append(f"{vec} vs {name}: Pearson {c['pearson']:+.3f} (p {c['pearson_p']:.2g}), "
                         f"Spearman {c['spearman']:+.3f}")
    lines.append("lower units by vector 0: " + " ".join(map(str, r["lower_order"][:24]))
                 + (" ..." if len(r["lower_order"]) > 24 else ""))
    if r.get("figure"):
        lines.append(f"figure: {r['figure']}")
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    return "\n".join(lines)


@click.command("svd")
@model_argument
@input_shape_option
@click.option("--layer", required=True, metavar="LAYER", help="Upper layer (a conv or linear layer).")
@click.option("--lower", default=None, metavar="LAYER",
              help="Name of the layer whose units are LAYER's input columns (used to label them and, for a "
                   "first layer, to draw its filters) [default: the layer feeding LAYER; a concatenation counts "
                   "as one layer]. Without --through the matrix is LAYER's own |W|.")
@click.option("--through", is_flag=True,
              help="W is the expanded weights from --lower (any earlier layer) to LAYER through the layers "
                   "between, linearized, |.| summed over the receptive field (e.g. a stem to the pointwise "
                   "conv after a depthwise one). Needs --lower.")
@click.option("--center", is_flag=True, help="Remove the mean of |W| first (vector 0 becomes the main contrast).")
@click.option("--components", type=click.IntRange(1), default=2, show_default=True,
              help="Singular vectors to report per unit.")
@click.option("--fold-bn", is_flag=True, help="Fold a following batch norm into the weights.")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Directory for the placement figure (PNG) and the JSON.")
@device_option
@json_option
def command(model, weights, model_args, input_shape, layer, lower, through, center, components, fold_bn, out, device,
            as_json) -> None:
    """Singular values and vectors of |W| summed over positions: the main factors of who connects
    to whom; for a first lower layer, their correlation with filter colour and frequency."""
    from pathlib import Path

    from ...anatomy import layer_svd
    from ...anatomy.plots import svd_placement_figure
    from ...models.layers import discover_layers
    from ...util.io import save_figure, write_json
    from ...errors import UsageError
    from .weights import file_stem

    if through and not lower:
        raise UsageError("--through needs the lower layer the expanded weights start from: add --lower LAYER "
                         "(e.g. the stem)")
    if through and fold_bn:
        raise UsageError("--fold-bn applies to one layer's own |W|, not to --through (expanded weights already "
                         "pass through every batch norm between)")
    check_output(out, folder=True)
    loaded = load_cli_model(model, weights, model_args, device, input_shape)
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    report = layer_svd(loaded.module, layer_map, layer, lower, center=center, fold_bn=fold_bn, through=through)
    result = {"model": loaded.source, "through": through, **report.to_dict(components)}
    if out:
        import matplotlib.pyplot as plt

        out_dir = Path(out)
        fig = svd_placement_figure(report)
        result["figure"] = str(save_figure(fig, out_dir / f"svd_{file_stem(report.upper)}.png", dpi=120))
        plt.close(fig)
        write_json(out_dir / f"svd_{file_stem(report.upper)}.json", result)
    emit(result, as_json, _human)
