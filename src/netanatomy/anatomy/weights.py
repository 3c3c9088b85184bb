"""A layer's weights as the tensors the core methods take.

Conv layers give [units, C_in, kh, kw]. A linear layer gives [units, features], or, when it
reads a flattened map (no global average pooling: the Weight Banding intervention), its
weights reshaped to [units, C, h, w] so that pictures and banding see the map's positions.
Batch norm after a conv rescales each unit; folding it in (gamma / sqrt(var + eps)) gives the
weights the unit effectively applies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..models.dataflow import is_depthwise
from ..models.layers import AFFINE_MODULES, Layer, LayerMap
from .graph import linear_input_map

__all__ = ["LayerWeights", "dense_grouped", "fold_batchnorm", "layer_weights", "linear_as_map"]


@dataclass(frozen=True)
class LayerWeights:
    """weights: [units, C_in, kh, kw] (conv, or a linear layer on a map) or [units, features];
    layer: the layer's name; spatial: whether the last two dims are positions; note: how the
    tensor was made (e.g. "linear reshaped to [units, C, h, w]", "batch norm folded")."""

    weights: Tensor
    layer: str
    spatial: bool
    note: str = ""


def linear_as_map(weight: Tensor, map_shape: tuple[int, int, int]) -> Tensor:
    """[units, C*h*w] -> [units, C, h, w], the order in which torch flattens an NCHW map."""
    c, h, w = map_shape
    if weight.ndim != 2 or weight.shape[1] != c * h * w:
        raise ValueError(f"weight {tuple(weight.shape)} does not read a flattened {map_shape} map")
    return weight.reshape(weight.shape[0], c, h, w)


def fold_batchnorm(weight: Tensor, bn: nn.Module) -> Tensor:
    """Scale each output unit's weights by gamma / sqrt(running_var + eps) of the batch norm after it."""
    if not isinstance(bn, AFFINE_MODULES):
        raise TypeError(f"expected a batch norm module, got {type(bn).__name__}")
    var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
    scale = 1.0 / torch.sqrt(var.to(weight) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(weight)
    if scale.numel() != weight.shape[0]:
        raise ValueError(f"batch norm has {scale.numel()} channels for {weight.shape[0]} units")
    return weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))


def dense_grouped(weight: Tensor, groups: int) -> Tensor:
    """A grouped conv's [out, in/groups, kh, kw] as a dense [out, in, kh, kw], zero between groups,
    so that input channel i is lower unit i for every output unit."""
    if groups == 1:
        return weight
    out_ch, per_group = weight.shape[:2]
    dense = weight.new_zeros(out_ch, per_group * groups, *weight.shape[2:])
    step = out_ch // groups
    for g in range(groups):
        dense[g * step:(g + 1) * step, g * per_group:(g + 1) * per_group] = weight[g * step:(g + 1) * step]
    return dense


def _following_batchnorm(module: nn.Module, layer: Layer) -> nn.Module | None:
    """The batch norm whose output the layer map takes as the layer's pre-activation, if any."""
    for term in layer.pre or ():
        if term.module and term.module != layer.module:
            m = module.get_submodule(term.module)
            if isinstance(m, AFFINE_MODULES):
                return m
    return None


def layer_weights(module: nn.Module, layer_map: LayerMap, layer: Layer | str, *, fold_bn: bool = False,
                  map_shape: tuple[int, int, int] | None = None, dense_groups: bool | None = None) -> LayerWeights:
    """The weights of a conv or linear layer, detached, on the CPU, float32.

    A linear layer reading a flattened map is reshaped to [units, C, h, w] (the map shape is
    found by a forward pass, or given as `map_shape`). `fold_bn` folds a following batch norm.
    A grouped conv is made dense (zeros between groups) when `dense_groups` is True, kept as
    [out, in/groups, kh, kw] when False; None (default) makes grouped convs dense but keeps a
    depthwise conv's kernels as they are ([1, kh, kw] per unit: a dense [U, U, kh, kw] would be
    all zeros off the diagonal, and its pictures black).
    """
    layer = layer_map.resolve(layer)
    if layer.kind not in ("conv", "linear") or not layer.module:
        convs = [b.module for b in layer.branches if b.module]
        hint = f": pick one of its convs ({', '.join(convs[:6])})" if convs else ""
        raise UsageError(f"layer {layer.name} is a {layer.kind} layer with no weights of its own{hint}")
    mod = module.get_submodule(layer.module)
    weight = mod.weight.detach().float().cpu()
    notes = []
    if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        weight = weight.transpose(0, 1)
        notes.append("transposed conv: weights read as [out, in, kh, kw]")
    if fold_bn:
        bn = _following_batchnorm(module, layer)
        if bn is not None:
            weight = fold_batchnorm(weight, bn)
            notes.append("batch norm folded")
    if layer.kind == "conv":
        if weight.ndim != 4:
            raise UsageError(f"layer {layer.name} is not a 2-D convolution (weights {tuple(weight.shape)})")
        groups = int(getattr(mod, "groups", 1))
        if dense_groups is None:
            dense_groups = not is_depthwise(mod)
        if groups > 1 and not dense_groups and is_depthwise(mod):
            notes.append("depthwise conv: one [1, kh, kw] kernel per unit")
        if groups > 1 and dense_groups:
            weight = dense_grouped(weight, groups)
            notes.append(f"grouped conv ({groups} groups) as dense weights, zero between groups")
        return LayerWeights(weight, layer.name, True, "; ".join(notes))
    shape = map_shape or linear_input_map(module, layer, layer_map.input_shape)
    if shape is not None and shape[1] * shape[2] > 1:
        notes.append(f"linear layer on an unpooled {shape[0]}x{shape[1]}x{shape[2]} map, reshaped to [units, C, h, w]")
        return LayerWeights(linear_as_map(weight, shape), layer.name, True, "; ".join(notes))
    return LayerWeights(weight, layer.name, False, "; ".join(notes))
