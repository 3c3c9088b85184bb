"""Which layer feeds which, and the map a linear layer reads: the wiring weight analyses need.

The layer map lists layers; weight analyses also need, for a conv or linear layer, the layer
whose units are its input channels (the "lower" layer of an SVD of |W|, of a rotation-channel
map, of expanded weights). We find it with the one data-flow walker (models/dataflow.py), back
from the layer's call through channel-preserving steps (activations, pooling, padding,
normalization, dropout, input scaling, a flatten) to a conv/linear call, a concatenation, a
residual sum or the model input.
"""
from __future__ import annotations

import weakref

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

from ..models.dataflow import ANALYZABLE, CHANNEL_STEPS, DataFlow, Step
from ..models.layers import Layer, LayerMap

INPUT = "input"

_FLOWS: "weakref.WeakKeyDictionary[nn.Module, DataFlow | None]" = weakref.WeakKeyDictionary()


def _flow(module: nn.Module) -> DataFlow | None:
    if module not in _FLOWS:
        try:
            _FLOWS[module] = DataFlow(module)
        except Exception:                                                # untraceable: data-dependent control flow
            _FLOWS[module] = None
    return _FLOWS[module]


def _producer_module(flow: DataFlow, node: fx.Node) -> str | None:
    src = flow.producer(node)
    return str(src.target) if src is not None else None


def _layer_for(flow: DataFlow, layer_map: LayerMap, node: fx.Node) -> str | None:
    """The layer (or INPUT) whose values a node carries, or None when none matches."""
    src = flow.walk_back(node, CHANNEL_STEPS)
    kind = flow.step(src)
    if kind is Step.INPUT:
        return INPUT
    if kind is Step.LAYER and isinstance(flow.mod(src), ANALYZABLE):
        try:
            return layer_map.resolve(str(src.target)).name
        except Exception:
            return None
    if kind is Step.CONCAT or flow.is_add(src):
        parts = list(src.args[0]) if kind is Step.CONCAT else list(src.args[:2])
        producers = [_producer_module(flow, a) if isinstance(a, fx.Node) else None for a in parts]
        wanted = "concat" if kind is Step.CONCAT else "residual"
        for layer in layer_map.values():
            if layer.kind != wanted:
                continue
            mods = [b.module or None for b in layer.branches]
            if wanted == "concat" and mods == producers:
                return layer.name
            if wanted == "residual" and set(m for m in mods if m) == set(m for m in producers if m):
                return layer.name
    return None


def feeding_layer(module: nn.Module, layer_map: LayerMap, layer: Layer | str) -> str | None:
    """Name of the layer whose units are `layer`'s input channels; "input" for the model input.

    None when it cannot be told (the model does not trace with torch.fx, or the input is made
    by something other than a layer, a concatenation of layers, a residual sum or the input).
    """
    layer = layer_map.resolve(layer)
    flow = _flow(module)
    if flow is None or not layer.module or layer.kind not in ("conv", "linear"):
        return None
    calls = flow.calls_of(layer.module)
    if not calls or not flow.tensor_args(calls[0]):
        return None
    # a linear layer reads its map through a flatten
    node = flow.walk_back(flow.tensor_args(calls[0])[0], CHANNEL_STEPS | {Step.RESHAPE})
    return _layer_for(flow, layer_map, node)


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
