"""From a model to the tensors the specialization core needs.

- `weight_network(model)`: every conv and linear layer's weight tensor (batch norm folded in)
  and which layers feed it, found by following the data flow of a torch.fx trace back from
  each layer's input through channel-preserving steps (activations, batch norm, pooling,
  dropout, padding, flatten, input normalization) to the conv/linear layers or the input that
  produced it. Concatenations along channels give one source per joined input, with its
  channel range; residual sums give several sources over the same range.
- `activation_values(model, layers, data)`: per-example pre-activation values of layers
  (a conv channel's value is the L1 norm of its map) for the activation graph.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..core.graphs import WeightEdge, WeightNetwork, fold_batchnorm
from ..errors import UsageError
from ..models.layers import Tracer

INPUT = "input"

WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (
    *_BATCHNORM, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.LocalResponseNorm, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
    nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.InstanceNorm1d, nn.InstanceNorm2d,
)
_PASS_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu,
    F.elu, F.leaky_relu, F.hardswish, F.mish, F.softplus, torch.flatten, F.pad, F.max_pool1d, F.max_pool2d,
    F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.lp_pool2d, F.local_response_norm, F.dropout, F.dropout2d, F.batch_norm,
    F.instance_norm, torch.max_pool2d, torch.avg_pool1d,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "flatten", "view", "reshape", "contiguous", "clone", "float",
                 "to", "detach", "sigmoid_"}
_ELEMENTWISE_BINARY = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                       operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_CATS = {torch.cat, torch.concat}


def trace(model: nn.Module) -> fx.GraphModule:
    """An fx GraphModule of `model` (UsageError when the model cannot be traced)."""
    try:
        graph = Tracer().trace(model)
    except Exception as exc:
        raise UsageError(f"torch.fx cannot trace this model ({type(exc).__name__}: {exc}); the weight graph "
                         "needs a traceable model") from exc
    return fx.GraphModule(model, graph)


@dataclass(frozen=True)
class ExtractedNetwork:
    """The weight network, and for each of its layers the module it comes from ("" for the input)."""

    network: WeightNetwork
    modules: dict[str, str]


def weight_network(model: nn.Module, input_shape: Sequence[int], *, layer_names: dict[str, str] | None = None
                   ) -> ExtractedNetwork:
    """The weight network of `model` (see the module docstring).

    `layer_names` maps module names to display names (from the layer map); layers are named
    by their module otherwise. The input is one layer, "input": its pixels (C*H*W units) when a
    linear layer reads the flattened image (an MLP), its channels when a conv reads it.
    """
    gm = trace(model)
    param = next(model.parameters(), None)
    probe = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0))
    if param is not None:
        probe = probe.to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(probe)
    finally:
        model.train(was_training)
    modules = dict(gm.named_modules())
    names = layer_names or {}
    weight_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], WEIGHT_MODULES)]
    if not weight_nodes:
        raise UsageError("the model has no conv or linear layers")
    seen_targets: set[str] = set()
    for n in weight_nodes:
        if n.target in seen_targets:
            raise UsageError(f"module {n.target} is called more than once; shared weights have no single place "
                             "in a weight graph")
        seen_targets.add(n.target)

    cache: dict[fx.Node, list[tuple[str, int]]] = {}
    walker = _SourceWalker(modules, cache)
    sizes: dict[str, int] = {}
    module_of: dict[str, str] = {}
    edges: list[WeightEdge] = []
    input_units: int | None = None
    pending: list[tuple[str, np.ndarray, list[tuple[str, int]], int]] = []
    for n in weight_nodes:
        m = modules[n.target]
        name = names.get(n.target, n.target)
        if name == INPUT or name in sizes:
            name = n.target
        sizes[name] = int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)
        module_of[name] = n.target
        weight = m.weight.detach().cpu().double().numpy()
        bn = _following_batchnorm(n, modules)
        if bn is not None:
            gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
            weight = fold_batchnorm(weight, gamma, bn.running_var, bn.eps)
        sources = walker.sources(n.args[0])
        if not sources:
            raise UsageError(f"cannot tell which layers feed {name}")
        groups = int(getattr(m, "groups", 1))
        for src, _ in sources:
            if src == INPUT:
                units = int(m.in_features) if isinstance(m, nn.Linear) else int(m.in_channels)
                if input_units is not None and input_units != units:
                    raise UsageError("the input feeds both a linear layer (as pixels) and a conv (as channels); "
                                     "the weight graph needs one kind of input unit")
                input_units = units
        pending.append((name, weight, sources, groups))

    layer_sizes = {INPUT: int(input_units or 0)} if input_units else {}
    layer_sizes.update(sizes)
    target_to_name = {module_of[name]: name for name in module_of}
    for name, weight, sources, groups in pending:
        ranges = []
        for src, start in sources:
            src_name = INPUT if src == INPUT else target_to_name[src]
            units = layer_sizes[src_name]
            ranges.append((src_name, start, start + units))
        edges.append(WeightEdge(name, weight, tuple(ranges), groups))
    network = WeightNetwork(layer_sizes, tuple(edges))
    return ExtractedNetwork(network, {INPUT: "", **module_of} if input_units else dict(module_of))


def _following_batchnorm(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The batch norm that alone reads a conv/linear output, if any (to fold it in)."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], _BATCHNORM):
        return modules[users[0].target]
    return None


class _SourceWalker:
    """Follows a tensor back to the layers whose units it carries: [(layer module or INPUT, channel offset)]."""

    def __init__(self, modules: dict[str, nn.Module], cache: dict[fx.Node, list[tuple[str, int]]]):
        self.modules = modules
        self.cache = cache

    def sources(self, node: fx.Node) -> list[tuple[str, int]]:
        if node not in self.cache:
            self.cache[node] = self._sources(node)
        return self.cache[node]

    def _sources(self, node: fx.Node) -> list[tuple[str, int]]:
        if node.op == "placeholder":
            return [(INPUT, 0)]
        if node.op == "get_attr":
            return []
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, WEIGHT_MODULES):
                return [(node.target, 0)]
            if isinstance(m, _PASS_MODULES) or getattr(m, "netanatomy_transparent", False):
                return self.sources(node.args[0])
            raise UsageError(f"the weight graph cannot follow data through module {node.target} "
                             f"({type(m).__name__})")
        target = node.target
        if node.op == "call_function" and target in _CATS:
            tensors = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim not in (1, -3) and not (dim == -1 and len(node.meta["tensor_meta"].shape) == 2):
                raise UsageError("the weight graph follows concatenations along channels (dim 1) only")
            out, offset = [], 0
            for t in tensors:
                out += [(src, offset + start) for src, start in self.sources(t)]
                offset += int(t.meta["tensor_meta"].shape[1])
            return out
        if (node.op == "call_function" and target in _PASS_FUNCTIONS) or (
                node.op == "call_method" and target in _PASS_METHODS):
            return self.sources(node.args[0])
        if node.op in ("call_function", "call_method") and (target in _ELEMENTWISE_BINARY or target in {
                "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}):
            # Channel i of the result depends on channel i of each computed operand (a residual
            # sum, x * x, a gate): every operand's layers feed it over the same range.
            tensors = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.op != "get_attr"]
            out: list[tuple[str, int]] = []
            for t in tensors:
                for s in self.sources(t):
                    if s not in out:
                        out.append(s)
            return out
        if node.op in ("call_function", "call_method") and self._keeps_channels(node):
            return self.sources(self._computed_args(node)[0])
        raise UsageError(f"the weight graph cannot follow data through {node.format_node()}")

    @staticmethod
    def _computed_args(node: fx.Node) -> list[fx.Node]:
        args = list(node.args) + list(node.kwargs.values())
        return [a for a in args if isinstance(a, fx.Node) and a.op != "get_attr" and "tensor_meta" in a.meta]

    def _keeps_channels(self, node: fx.Node) -> bool:
        """An op of one computed tensor (the rest constants) that keeps batch and channel sizes,
        such as x.pow(2), torch.sqrt, x.mean((2, 3)): each channel stays itself."""
        args = self._computed_args(node)
        out = node.meta.get("tensor_meta")
        if len(args) != 1 or out is None or not hasattr(out, "shape"):
            return False
        shape_in, shape_out = tuple(args[0].meta["tensor_meta"].shape), tuple(out.shape)
        return len(shape_in) >= 2 and len(shape_out) >= 2 and shape_in[:2] == shape_out[:2]


def activation_values(model: nn.Module, layers: Sequence[str], data, *, max_examples: int | None = 5000,
                      seed: int = 0, device: str | torch.device | None = None,
                      input_shape: Sequence[int] | None = None, batch_size: int = 256,
                      show_progress: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-example pre-activation values of `layers` ({layer: [m, units]}) and the labels [m].

    A conv channel's value is the L1 norm of its map. With `max_examples`, a seeded uniform
    sample of that many examples is kept (the same examples for every layer).
    """
    from ..capture import capture_activations

    keep = int(max_examples) if max_examples else (len(data) if hasattr(data, "__len__") else 1 << 30)
    stats = capture_activations(model, list(layers), data, stage="pre", reduce="l1", top_k=0, keep_values=keep,
                                covariance=False, batch_size=batch_size, device=device, seed=seed,
                                input_shape=input_shape, show_progress=show_progress)
    first = next(iter(stats.values()))
    order = np.argsort(first.value_index, kind="stable")
    index = first.value_index[order]
    values = {}
    for name, s in stats.items():
        o = np.argsort(s.value_index, kind="stable")
        if not np.array_equal(s.value_index[o], index):
            raise RuntimeError("captured layers kept different examples")
        values[name] = np.asarray(s.values[o], dtype=np.float64)
    return values, np.asarray(first.labels[order])
