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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..core.graphs import WeightEdge, WeightNetwork, fold_batchnorm
from ..errors import UsageError
from ..models.dataflow import AFFINE_MODULES, FEEDING_STEPS, WEIGHT_MODULES, DataFlow, Step
from ..models.dataflow import trace as trace_dataflow

INPUT = "input"


def trace(model: nn.Module) -> fx.GraphModule:
    """An fx GraphModule of `model` (UsageError when the model cannot be traced)."""
    try:
        return trace_dataflow(model)
    except Exception as exc:
        raise UsageError(f"torch.fx cannot trace this model ({type(exc).__name__}: {exc}); the weight graph "
                         "needs a traceable model") from exc


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
    flow = DataFlow(model, input_shape, gm=trace(model))
    gm = flow.gm
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

    walker = _SourceWalker(flow)
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
        bn = _following_batchnorm(flow, n)
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


def _following_batchnorm(flow: DataFlow, node: fx.Node) -> nn.Module | None:
    """The batch norm that alone reads a conv/linear output, if any (to fold it in)."""
    users = list(node.users)
    if len(users) == 1 and isinstance(flow.mod(users[0]), AFFINE_MODULES):
        return flow.mod(users[0])
    return None


class _SourceWalker:
    """Follows a tensor back to the layers whose units it carries: [(layer module or INPUT, channel offset)].

    The walk passes the steps that keep channel i as channel i (models/dataflow.py's
    FEEDING_STEPS, flatten included: a linear layer reads a map flat); a concatenation along
    channels gives one source per part at its offset; an elementwise op of computed tensors (a
    residual sum, a gate) gives every operand's sources over the same range.
    """

    def __init__(self, flow: DataFlow):
        self.flow = flow
        self.cache: dict[fx.Node, list[tuple[str, int]]] = {}

    def sources(self, node: fx.Node) -> list[tuple[str, int]]:
        if node not in self.cache:
            self.cache[node] = self._sources(node)
        return self.cache[node]

    def _sources(self, node: fx.Node) -> list[tuple[str, int]]:
        flow = self.flow
        node = flow.walk_back(node, FEEDING_STEPS)
        kind = flow.step(node)
        if kind is Step.INPUT:
            return [(INPUT, 0)]
        if kind is Step.CONSTANT:
            return []
        if kind is Step.LAYER:
            if not isinstance(flow.mod(node), WEIGHT_MODULES):
                raise UsageError(f"the weight graph cannot follow data through module {node.target} "
                                 f"({type(flow.mod(node)).__name__})")
            return [(str(node.target), 0)]
        if kind is Step.CONCAT:
            tensors = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim not in (1, -3) and not (dim == -1 and len(node.meta["tensor_meta"].shape) == 2):
                raise UsageError("the weight graph follows concatenations along channels (dim 1) only")
            out, offset = [], 0
            for t in tensors:
                out += [(src, offset + start) for src, start in self.sources(t)]
                offset += int(t.meta["tensor_meta"].shape[1])
            return out
        if kind is Step.ELEMENTWISE:
            # Channel i of the result depends on channel i of each computed operand (a residual
            # sum, x * x, a gate): every operand's layers feed it over the same range.
            out: list[tuple[str, int]] = []
            for t in flow.tensor_args(node):
                for s in self.sources(t):
                    if s not in out:
                        out.append(s)
            return out
        if node.op == "call_module":
            raise UsageError(f"the weight graph cannot follow data through module {node.target} "
                             f"({type(flow.mod(node)).__name__})")
        raise UsageError(f"the weight graph cannot follow data through {node.format_node()}")


def activation_values(model: nn.Module, layers: Sequence[str], data, *, max_examples: int | None = 5000,
                      seed: int = 0, device: str | torch.device | None = None,
                      input_shape: Sequence[int] | None = None, batch_size: int = 256,
                      show_progress: bool = True, reduce: str = "l1") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-example pre-activation values of `layers` ({layer: [m, units]}) and the labels [m].

    A conv channel's value is the L1 norm of its map (`reduce`: any reduction of
    `capture_activations`, e.g. "mean"). With `max_examples`, a seeded uniform sample of that
    many examples is kept (the same examples for every layer), in data order.
    """
    from ..capture import capture_activations

    keep = int(max_examples) if max_examples else (len(data) if hasattr(data, "__len__") else 1 << 30)
    stats = capture_activations(model, list(layers), data, stage="pre", reduce=reduce, top_k=0, keep_values=keep,
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
