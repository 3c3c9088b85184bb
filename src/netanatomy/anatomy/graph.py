"""Which layer feeds which, and the map a linear layer reads: the wiring weight analyses need.

The layer map lists layers; weight analyses also need, for a conv or linear layer, the layer
whose units are its input channels (the "lower" layer of an SVD of |W|, of a rotation-channel
map, of expanded weights). We find it on the torch.fx graph by walking back from the layer's
call through channel-preserving steps (activations, pooling, padding, normalization,
dropout) to a conv/linear call, a concatenation, a residual sum or the model input.
"""
from __future__ import annotations

import operator
import weakref

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..models.layers import (
    ACTIVATION_MODULES,
    AFFINE_MODULES,
    ANALYZABLE,
    CHANNEL_PRESERVING_MODULES,
    Layer,
    LayerMap,
    Tracer,
)

INPUT = "input"

_PRESERVING_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardswish, F.mish,
    F.softplus, torch.sigmoid, torch.tanh, F.pad, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.lp_pool2d, F.local_response_norm,
    F.dropout, F.dropout2d, F.batch_norm, F.instance_norm, torch.max_pool2d, torch.avg_pool1d,
}
_PRESERVING_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "detach"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_CAT = {torch.cat, torch.concat}
_ADD = {operator.add, operator.iadd, torch.add}
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_ARITHMETIC_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}


_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, fx.Graph | None]" = weakref.WeakKeyDictionary()


def _graph(module: nn.Module) -> fx.Graph | None:
    if module not in _GRAPHS:
        try:
            _GRAPHS[module] = Tracer().trace(module)
        except Exception:                                                # untraceable: data-dependent control flow
            _GRAPHS[module] = None
    return _GRAPHS[module]


def _is_preserving(module: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = module.get_submodule(str(node.target))
        marked = getattr(m, "netanatomy_transparent", False)
        return bool(marked) or isinstance(m, ACTIVATION_MODULES + AFFINE_MODULES + CHANNEL_PRESERVING_MODULES)
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if node.op == "call_function":
        # arithmetic with constants (input scaling such as x * 255 - 117) keeps the channels
        return node.target in _PRESERVING_FUNCTIONS or (node.target in _ARITHMETIC and len(tensors) == 1)
    if node.op == "call_method":
        return node.target in _PRESERVING_METHODS or (node.target in _ARITHMETIC_METHODS and len(tensors) == 1)
    return False


def _walk_back(module: nn.Module, node: fx.Node) -> fx.Node:
    """From a node, back through channel-preserving steps, to the node that made its channels."""
    for _ in range(256):
        if not _is_preserving(module, node):
            return node
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        if not inputs:
            return node
        node = inputs[0]
    return node


def _producer_module(module: nn.Module, node: fx.Node) -> str | None:
    src = _walk_back(module, node)
    if src.op == "call_module" and isinstance(module.get_submodule(str(src.target)), ANALYZABLE):
        return str(src.target)
    return None


def _layer_for(module: nn.Module, layer_map: LayerMap, node: fx.Node) -> str | None:
    """The layer (or INPUT) whose values a node carries, or None when none matches."""
    src = _walk_back(module, node)
    if src.op == "placeholder":
        return INPUT
    if src.op == "call_module" and isinstance(module.get_submodule(str(src.target)), ANALYZABLE):
        try:
            return layer_map.resolve(str(src.target)).name
        except Exception:
            return None
    if src.op == "call_function" and (src.target in _CAT or src.target in _ADD):
        parts = [a for a in (src.args[0] if src.target in _CAT else src.args[:2])]
        producers = [_producer_module(module, a) if isinstance(a, fx.Node) else None for a in parts]
        kind = "concat" if src.target in _CAT else "residual"
        for layer in layer_map.values():
            if layer.kind != kind:
                continue
            mods = [b.module or None for b in layer.branches]
            if kind == "concat" and mods == producers:
                return layer.name
            if kind == "residual" and set(m for m in mods if m) == set(m for m in producers if m):
                return layer.name
    return None


def feeding_layer(module: nn.Module, layer_map: LayerMap, layer: Layer | str) -> str | None:
    """Name of the layer whose units are `layer`'s input channels; "input" for the model input.

    None when it cannot be told (the model does not trace with torch.fx, or the input is made
    by something other than a layer, a concatenation of layers, a residual sum or the input).
    """
    layer = layer_map.resolve(layer)
    graph = _graph(module)
    if graph is None or not layer.module or layer.kind not in ("conv", "linear"):
        return None
    calls = [n for n in graph.nodes if n.op == "call_module" and str(n.target) == layer.module]
    if not calls or not calls[0].args or not isinstance(calls[0].args[0], fx.Node):
        return None
    node = calls[0].args[0]
    # a linear layer reads its map through a flatten
    for _ in range(8):
        if node.op in ("call_function", "call_method") and (node.target in (torch.flatten,) or node.target in _FLATTEN_METHODS):
            node = node.args[0]
        elif _is_preserving(module, node) and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        else:
            break
    return _layer_for(module, layer_map, node)


class _FlattenSpy(TorchFunctionMode):
    """Remembers the input shape of every flatten / view / reshape, keyed by the output tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[torch.Tensor, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ("flatten", "view", "reshape") and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            self.shapes.append((out, tuple(args[0].shape[1:])))
        return out


def linear_input_map(module: nn.Module, layer: Layer, input_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(C, h, w) of the map a linear layer reads flattened, or None when its input is not a
    flattened map (e.g. a pooled vector). Found by one forward pass on a probe input."""
    if layer.kind != "linear" or not layer.module:
        return None
    target = module.get_submodule(layer.module)
    seen: dict[str, torch.Tensor] = {}

    def grab(_mod, args):
        if args and isinstance(args[0], torch.Tensor) and "x" not in seen:
            seen["x"] = args[0]

    handle = target.register_forward_pre_hook(grab)
    spy = _FlattenSpy()
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.no_grad(), spy:
            module(torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(0)).to(device))
    finally:
        handle.remove()
    x = seen.get("x")
    if x is None:
        return None
    for out, shape in spy.shapes:
        if out is x and len(shape) == 3 and shape[0] * shape[1] * shape[2] == x.shape[-1]:
            return (int(shape[0]), int(shape[1]), int(shape[2]))
    return None
