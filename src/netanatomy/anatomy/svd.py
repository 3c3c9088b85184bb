"""SVD of |W| between a layer and the layer that feeds it, with first-layer filter properties."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..core.filters import colourfulness, spatial_frequency
from ..core.svd import AbsSVD, abs_svd, correlate_components
from ..errors import UsageError
from ..models.layers import LayerMap
from .graph import INPUT, feeding_layer
from .weights import layer_weights

__all__ = ["SVDReport", "layer_svd"]


@dataclass(frozen=True)
class SVDReport:
    """upper / lower: layer names; svd: the decomposition; filters: the lower layer's weights
    when it is a first layer (its units are then drawn as their filters), else None;
    properties: colourfulness and spatial frequency of those filters; correlations: Pearson
    and Spearman of singular vectors 0 and 1 of the lower units with them."""

    upper: str
    lower: str
    svd: AbsSVD
    filters: Tensor | None
    properties: dict[str, Tensor]
    correlations: dict[str, Any]
    note: str = ""

    def to_dict(self, components: int = 2) -> dict[str, Any]:
        out = {"upper": self.upper, "lower": self.lower, **self.svd.to_dict(components)}
        if self.properties:
            out["lower_properties"] = {k: v.tolist() for k, v in self.properties.items()}
            out["correlations"] = self.correlations
        if self.note:
            out["note"] = self.note
        return out


def layer_svd(module: nn.Module, layer_map: LayerMap, upper: str, lower: str | None = None, *,
              center: bool = False, fold_bn: bool = False, through: bool = False) -> SVDReport:
    """SVD of |W| of `upper`; the lower layer is the one feeding it (found on the graph).

    When the feeding layer is a concatenation its units are all the concatenated channels
    (every branch), in the concatenated order. With `through`, W is the expanded weight from
    `lower` (any earlier layer) to `upper` through the layers between, linearized (summed |.|
    over the receptive field): the Branch Specialization article's SVD from a stem to a later
    layer. When the lower layer is a first layer (it reads the image), its filters'
    colourfulness and spatial frequency are correlated with singular vectors 0 and 1 of the
    lower units.
    """
    up = layer_map.resolve(upper)
    found = feeding_layer(module, layer_map, up)
    if through:
        if not lower:
            raise UsageError("--through needs the lower layer: name it with --lower")
        from .expanded import expanded_weights

        low_name = layer_map.resolve(lower).name
        ew = expanded_weights(module, layer_map, low_name, up.name)
        weights = ew.weights.float().cpu()
        note = f"expanded weights from {low_name} to {up.name} (nonlinearities linearized)"
        if ew.kept:
            note += f"; left nonlinear: {', '.join(ew.kept)}"
    else:
        if up.depthwise:
            feeder = f" --lower {found}" if found and found != INPUT else " --lower LAYER"
            raise UsageError(
                f"layer {up.name} is depthwise: each unit reads one channel, so |W| is diagonal and its SVD says "
                f"nothing about who connects to whom; ask it of the pointwise conv after it, or through the "
                f"depthwise conv with expanded weights: netanatomy svd MODEL --layer NEXT{feeder} --through")
        lw = layer_weights(module, layer_map, up, fold_bn=fold_bn, dense_groups=True)
        weights = lw.weights
        low_name = layer_map.resolve(lower).name if lower else found
        note = lw.note
    if low_name is None:
        raise UsageError(f"cannot tell which layer feeds {up.name}: name it with --lower")
    if low_name == INPUT:
        raise UsageError(f"{up.name} reads the model input: take the layer after it as the upper layer")
    res = abs_svd(weights, center=center)
    filters, properties, correlations = None, {}, {}
    low = layer_map.resolve(low_name)
    first = low
    if low.depthwise:
        # a depthwise layer's units are its input's channels one to one (each filters one):
        # when that input is a first layer, its filters describe the lower units
        below = feeding_layer(module, layer_map, low)
        if below not in (None, INPUT) and layer_map.resolve(below).units == low.units:
            first = layer_map.resolve(below)
            note = (note + "; " if note else "") + (
                f"{low.name} is depthwise: its units are {first.name}'s channels, described by {first.name}'s filters")
    if first.kind == "conv" and feeding_layer(module, layer_map, first) == INPUT:
        lower_w = layer_weights(module, layer_map, first, dense_groups=True).weights
        if lower_w.shape[0] == weights.shape[1]:
            filters = lower_w
            properties = {"frequency": spatial_frequency(filters)}
            if filters.shape[1] >= 2:
                properties = {"colourfulness": colourfulness(filters), **properties}
            else:
                note = (note + "; " if note else "") + (
                    f"colour does not apply: {first.name} reads {filters.shape[1]}-channel images")
            correlations = correlate_components(res.lower, properties)
    if weights.shape[1] != low.units:
        note = (note + "; " if note else "") + f"{up.name} reads {weights.shape[1]} channels, {low.name} has {low.units} units"
    return SVDReport(up.name, low.name, res, filters, properties, correlations, note)
