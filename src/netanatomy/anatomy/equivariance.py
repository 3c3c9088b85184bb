"""Rotation families of a model's layer: any angle for a first layer, quarter turns deeper."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..core.equivariance import expand_channel_map, quarter_turn_map, rotation_families, rotation_families_quarter
from ..errors import UsageError
from ..models.layers import LayerMap
from .graph import INPUT, feeding_layer
from .weights import layer_weights

__all__ = ["layer_rotation_families"]


def _chain(module: nn.Module, layer_map: LayerMap, name: str) -> list[str] | None:
    """Conv layers from the first one up to (not including) `name`, each feeding the next; None
    when the path from the input is not a simple chain of convs."""
    chain = []
    current = name
    for _ in range(len(layer_map)):
        below = feeding_layer(module, layer_map, current)
        if below == INPUT:
            return list(reversed(chain))
        if below is None or layer_map[below].kind != "conv":
            return None
        chain.append(below)
        current = below
    return None


def layer_rotation_families(module: nn.Module, layer_map: LayerMap, layer: str, *, threshold: float = 0.8,
                            step: float = 2.5, input_map: Tensor | None = None) -> dict[str, Any]:
    """Families of units of `layer` that are rotated copies of one another.

    A layer that reads the image is searched at any angle (step `step` degrees). A deeper
    layer is compared at quarter turns, its input channels mapped by `input_map` when given,
    else by quarter-turn maps estimated layer by layer from the first layer up (each layer's
    units matched to their own rotated copies, colour channels mapping to themselves); when
    the layers below are not a simple chain of convs, channels are assumed to map to
    themselves, which the result says.
    """
    target = layer_map.resolve(layer)
    weights = layer_weights(module, layer_map, target, dense_groups=True).weights
    if not weights.ndim == 4 or weights.shape[-1] != weights.shape[-2]:
        raise UsageError(f"layer {target.name} has no square spatial kernels to rotate")
    below = feeding_layer(module, layer_map, target)
    if below == INPUT:
        families = rotation_families(weights, step=step, threshold=threshold)
        return {"layer": target.name, "mode": "any angle", "step": step, "threshold": threshold,
                "families": [f.to_dict() for f in families]}
    note = ""
    if input_map is None:
        chain = _chain(module, layer_map, target.name)
        if chain is None:
            note = "input channels assumed to map to themselves under rotation (the layers below are not a chain of convs)"
        else:
            current = None
            for name in chain:
                w = layer_weights(module, layer_map, name, dense_groups=True).weights
                if w.shape[-1] != w.shape[-2]:
                    current = None
                    note = f"input channels assumed to map to themselves ({name} has non-square kernels)"
                    break
                current = quarter_turn_map(w, current, threshold=threshold)
            input_map = current
            if input_map is not None:
                mapped = int((input_map[1] >= 0).sum())
                note = f"input channels mapped by quarter-turn matches from the first layer up ({mapped} of {input_map.shape[1]} mapped)"
    families = rotation_families_quarter(weights, input_map, threshold=threshold)
    out = {"layer": target.name, "mode": "quarter turns", "threshold": threshold,
           "families": [f.to_dict() for f in families]}
    if input_map is not None:
        out["input_map_90"] = expand_channel_map(input_map, weights.shape[1])[1].tolist()
    if note:
        out["note"] = note
    return out
