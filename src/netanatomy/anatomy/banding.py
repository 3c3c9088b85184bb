"""Banding scores for the layers of a model."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..core.banding import axis_test, banding_score
from ..models.layers import LayerMap
from ..util.progress import progress
from ..util.seeding import derive
from .weights import layer_weights

__all__ = ["model_banding"]


def model_banding(module: nn.Module, layer_map: LayerMap, layers: Sequence[str] | None = None, *,
                  n_permutations: int = 999, seed: int = 0, alpha: float = 0.01, margin: float = 0.1,
                  method: str = "permutation", fold_bn: bool = False,
                  show_progress: bool = True) -> list[dict[str, Any]]:
    """One banding record per conv / linear layer (all of them, or those named).

    A linear layer reading a flattened map is scored on its weights reshaped to
    [units, C, h, w]; a linear layer on a vector, and 1x1 kernels, are skipped with a reason.
    Each layer's permutations use their own seed derived from `seed` and the layer's name.
    Progress (stderr): one bar over the layers, and one inside a layer large enough to wait on.
    """
    chosen = layer_map.resolve_many(layers) if layers else [l for l in layer_map.values()
                                                            if l.kind in ("conv", "linear")]
    out = []
    bar = progress(chosen, desc="banding", unit="layer", disable=None if show_progress else True)
    try:
        for layer in bar:
            out.append(_layer_record(module, layer_map, layer, n_permutations, seed, alpha, margin, method,
                                     fold_bn, show_progress))
    finally:
        bar.close()
    return out


def _layer_record(module: nn.Module, layer_map: LayerMap, layer, n_permutations: int, seed: int, alpha: float,
                  margin: float, method: str, fold_bn: bool, show_progress: bool) -> dict[str, Any]:
    if layer.kind not in ("conv", "linear"):
        return {"layer": layer.name, "horizontal": None, "vertical": None, "index": None,
                "orientation": "none", "p_value": None,
                "skipped": f"{layer.kind} layer: no weights of its own (score its convs)"}
    lw = layer_weights(module, layer_map, layer, fold_bn=fold_bn, dense_groups=False)
    if not lw.spatial:
        return {"layer": layer.name, "horizontal": None, "vertical": None, "index": None,
                "orientation": "none", "p_value": None,
                "skipped": "linear layer on a vector (pooled input): no spatial kernel"}
    res = banding_score(lw.weights, n_permutations=n_permutations, seed=derive(seed, layer.name),
                        alpha=alpha, margin=margin, method=method,  # type: ignore[arg-type]
                        show_progress=show_progress)
    record = {"layer": layer.name, **res.to_dict()}
    if lw.weights.ndim == 4 and res.skipped is None:
        record["axis"] = axis_test(lw.weights, seed=derive(seed, layer.name, "axis")).to_dict()
    if lw.note:
        record["note"] = lw.note
    return record
