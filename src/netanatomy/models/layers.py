"""Layers, units and branches of any model, discovered from its computation, not hard-coded.

A *layer* is a place in the forward pass whose output holds units: every conv or linear
module, every concatenation of parallel paths (an Inception block) and every residual sum.
A *branch* is a set of a layer's units computed apart from the rest: a parallel path's channel
range in a concatenation, a group of a grouped conv (and of the layer that feeds only such
groups), or a summand of a residual addition.

Discovery traces the model with torch.fx and propagates shapes on a small random input. Where
fx cannot trace (data-dependent control flow), it falls back to the module structure: hooks
record every module call, and concatenations and residual sums are recognized by comparing the
recorded tensors numerically.

Every layer also carries a capture plan: the module calls whose outputs (or inputs) give its
pre-activation values (the input of its nonlinearity, after per-channel normalization such as
batch norm) and its post-activation values, so activation capture needs only forward hooks.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError, suggest

# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Branch:
    """Units [start, stop) of a layer that are computed apart from the layer's other units."""

    name: str
    kind: str  # "concat" | "group" | "residual"
    start: int
    stop: int
    module: str = ""  # the module that produces these units, when there is one

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Term:
    """One hookable tensor: output (or input) of the `call`-th call of `module` in a forward.

    `start` is where its channels begin in the layer; `transform` is an elementwise function
    (e.g. "relu") to apply to it to get the layer's values.
    """

    module: str
    where: str = "output"
    call: int = 0
    start: int = 0
    transform: str | None = None


@dataclass(frozen=True)
class Layer:
    name: str
    module: str
    kind: str  # "conv" | "linear" | "concat" | "residual"
    units: int
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...] | None = None
    kernel_size: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    groups: int = 1
    activation: str | None = None
    branches: tuple[Branch, ...] = ()
    index: int = 0
    pre: tuple[Term, ...] | None = None
    post: tuple[Term, ...] | None = None
    combine: str = "cat"  # how terms give the layer's values: "cat" along channels, or "sum"

    @property
    def depthwise(self) -> bool:
        """A conv whose every group reads one input channel (its groups are no branches)."""
        return self.kind == "conv" and self.groups > 1 and bool(self.in_shape) and self.in_shape[0] == self.groups

    @property
    def spatial(self) -> tuple[int, ...]:
        """Spatial shape of one unit's map; () for a linear unit."""
        return tuple(self.out_shape[1:])

    def terms(self, stage: str) -> tuple[Term, ...]:
        """The capture plan for "pre" or "post" activation values."""
        if stage not in ("pre", "post"):
            raise UsageError(f"stage must be 'pre' or 'post', not {stage!r}")
        plan = self.pre if stage == "pre" else self.post
        if not plan:
            raise UsageError(f"{stage}-activation values of layer {self.name} cannot be captured with hooks")
        return plan

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "module": self.module,
            "kind": self.kind,
            "units": self.units,
            "out_shape": list(self.out_shape),
            "in_shape": list(self.in_shape) if self.in_shape is not None else None,
            "kernel_size": list(self.kernel_size) if self.kernel_size else None,
            "stride": list(self.stride) if self.stride else None,
            "groups": self.groups,
            "depthwise": self.depthwise,
            "activation": self.activation,
            "branches": [
                {"name": b.name, "kind": b.kind, "start": b.start, "stop": b.stop, "units": b.size, "module": b.module}
                for b in self.branches
            ],
        }
        return out


class LayerMap(Mapping[str, Layer]):
    """Layers in forward order, by display name; `resolve` also takes module names and aliases."""

    def __init__(self, layers: Sequence[Layer], method: str, input_shape: tuple[int, ...], note: str = ""):
        self._layers = {layer.name: layer for layer in layers}
        self.method = method
        self.input_shape = tuple(input_shape)
        self.note = note
        self._by_module: dict[str, str] = {}
        for layer in layers:
            if layer.module and layer.module not in self._by_module:
                self._by_module[layer.module] = layer.name
        self._aliases: dict[str, str] = {}
        self._owner: "weakref.ref[nn.Module] | None" = None  # the model, to name any module's output
        self._module_layers: dict[str, Layer] = {}

    def __getitem__(self, name: str) -> Layer:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def add_aliases(self, aliases: Mapping[str, str]) -> None:
        for short, full in aliases.items():
            target = self._by_module.get(full, full if full in self._layers else None)
            if target is not None and short not in self._layers:
                self._aliases[short] = target

    def resolve(self, name: str | Layer) -> Layer:
        """The layer called `name` (display name, module name or alias), or a UsageError with suggestions."""
        if isinstance(name, Layer):
            return name
        key = name.strip()
        if key in self._layers:
            return self._layers[key]
        if key in self._by_module:
            return self._layers[self._by_module[key]]
        if key in self._aliases:
            return self._layers[self._aliases[key]]
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            if key not in self._module_layers:
                found = module_layer(owner, key, self.input_shape)
                if found is not None:
                    self._module_layers[key] = found
            if key in self._module_layers:
                return self._module_layers[key]
        choices = list(self._layers) + list(self._aliases)
        raise UsageError(f"no layer named {key!r}{suggest(key, choices)}; run 'netanatomy layers MODEL' to list them")

    def resolve_many(self, names: Sequence[str] | None) -> list[Layer]:
        if not names:
            return list(self._layers.values())
        return [self.resolve(n) for n in names]

    def of_kind(self, *kinds: str) -> list[Layer]:
        return [layer for layer in self._layers.values() if layer.kind in kinds]

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "input_shape": list(self.input_shape),
            "note": self.note,
            "layers": [layer.to_json() for layer in self._layers.values()],
        }


# ---------------------------------------------------------------------------------------------
# What the walks may pass through: one list, in models/dataflow.py (re-exported here)

from .dataflow import (  # noqa: E402
    ACTIVATION_MODULES,
    AFFINE_MODULES,
    ANALYZABLE,
    CHANNEL_PRESERVING_MODULES,
    CHANNEL_STEPS,
    TRANSFORMS,
    DataFlow,
    Step,
    Tracer,
    activation_module_name,
    is_depthwise,
    probe_input,
)

_CAT = {torch.cat, torch.concat}


# ---------------------------------------------------------------------------------------------
# Public entry points

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, LayerMap]]" = weakref.WeakKeyDictionary()


def discover_layers(module: nn.Module, input_shape: Sequence[int] | None = None, *, method: str = "auto") -> LayerMap:
    """The layer map of `module` for inputs of shape `input_shape` (C, H, W) or (F,).

    `method` is "auto" (fx, falling back to module structure), "fx" or "modules". Cached per
    module and shape.
    """
    shape = tuple(input_shape) if input_shape else tuple(getattr(module, "netanatomy_input_shape", ()) or ())
    key = (shape, method)
    cached = _CACHE.get(module, {}).get(key)
    if cached is not None:
        return cached
    if not shape:
        shape = _guess_input_shape(module)
    was_training = module.training
    module.eval()
    try:
        result = None
        note = ""
        if method in ("auto", "fx"):
            try:
                result = _discover_fx(module, shape)
            except UsageError:
                raise
            except Exception as exc:
                if method == "fx":
                    raise UsageError(f"torch.fx cannot trace this model: {type(exc).__name__}: {exc}") from exc
                note = f"torch.fx could not trace the model ({type(exc).__name__}); layers found from module calls"
        if result is None:
            result = _discover_modules(module, shape)
            result.note = note or result.note
    finally:
        module.train(was_training)
    result.add_aliases(getattr(module, "netanatomy_aliases", {}) or {})
    result._owner = weakref.ref(module)
    _CACHE.setdefault(module, {})[key] = result
    return result


def module_layer(module: nn.Module, name: str, input_shape: Sequence[int]) -> Layer | None:
    """The output of any submodule as a layer (its channels, or features, are the units), as
    Lucent names layers: `features.3`, a ReLU module `det`, a whole block. `NAME@K` is the
    K-th call of a module called more than once. None when `name` names no submodule."""
    base, _, call_text = name.partition("@")
    if not base or (call_text and not call_text.isdigit()):
        return None
    try:
        sub = module.get_submodule(base)
    except AttributeError:
        return None
    call = int(call_text or 0)
    outputs: list[Any] = []
    handle = sub.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(probe_input(module, input_shape))
    except Exception as exc:
        raise UsageError(f"cannot run the model to find the output of module {base}: {type(exc).__name__}: {exc}") \
            from exc
    finally:
        handle.remove()
        module.train(was_training)
    if call >= len(outputs):
        raise UsageError(f"module {base} is called {len(outputs)} time(s) in the forward; there is no call {call}")
    out = outputs[call]
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise UsageError(f"module {base} does not return a tensor of [batch, units, ...]; it has no units to name")
    term = (Term(base, "output", call),)
    label = base if not call else f"{base}@{call}"
    return Layer(name=label, module=base, kind="module", units=int(out.shape[1]), out_shape=tuple(out.shape[1:]),
                 activation=activation_module_name(sub), pre=term, post=term)


def resolve_layer(module: nn.Module, name: str, input_shape: Sequence[int] | None = None) -> Layer:
    return discover_layers(module, input_shape).resolve(name)


def _guess_input_shape(module: nn.Module) -> tuple[int, ...]:
    """Try common input shapes for a model that does not say what it takes."""
    first = next((m for m in module.modules() if isinstance(m, ANALYZABLE)), None)
    candidates: list[tuple[int, ...]] = []
    if isinstance(first, nn.Linear):
        side = int(round(first.in_features ** 0.5))
        if side * side == first.in_features:
            candidates.append((1, side, side))
        if first.in_features % 3 == 0:
            side3 = int(round((first.in_features // 3) ** 0.5))
            if 3 * side3 * side3 == first.in_features:
                candidates.append((3, side3, side3))
        candidates.append((first.in_features,))
    elif first is not None:
        channels = first.in_channels
        candidates += [(channels, 224, 224), (channels, 64, 64), (channels, 32, 32), (channels, 28, 28)]
    for shape in candidates:
        try:
            with torch.no_grad():
                module(_probe_input(module, shape))
            return shape
        except Exception:
            continue
    raise UsageError("cannot tell what input shape this model takes; pass --input-shape C,H,W")


_probe_input = probe_input


# ---------------------------------------------------------------------------------------------
# fx discovery


class _Graph(DataFlow):
    """The data flow of a model as discovery reads it: the one walker (models/dataflow.py),
    plus which run of each enclosing module's forward a node belongs to (call indices of
    non-leaf modules, for hooks on what a block returns)."""

    def __init__(self, module: nn.Module, shape: tuple[int, ...]):
        super().__init__(module, shape)
        self.regions: dict[tuple[fx.Node, str], int] = {}  # (node, module) -> call index
        # a module's forward occupies a contiguous run of nodes; number the runs to get call indices
        runs: dict[str, int] = defaultdict(lambda: -1)
        active: set[str] = set()
        for node in self.nodes:
            scope = set(self.scopes(node))
            for owner in scope - active:
                runs[owner] += 1
            active = scope
            for owner in scope:
                self.regions[(node, owner)] = runs[owner]

    def scopes(self, node: fx.Node) -> list[str]:
        stack = node.meta.get("nn_module_stack") or {}
        names = [value[0] if isinstance(value, tuple) else str(value) for value in stack.values()]
        if node.op == "call_module" and names and names[-1] == node.target:
            names = names[:-1]
        return names

    def module_output_term(self, node: fx.Node, start: int = 0) -> Term | None:
        """Term for a node that is what an enclosing (non-leaf) module returns."""
        users = list(node.users)
        if not users:
            return None
        for owner in reversed(self.scopes(node)):
            region = self.regions.get((node, owner))
            if all(self.regions.get((u, owner)) != region for u in users):
                return Term(owner, "output", region, start)
        return None

    def is_affine(self, node: fx.Node) -> bool:
        return self.step(node) is Step.AFFINE

    def is_preserving(self, node: fx.Node) -> bool:
        """Channel-preserving steps a branch may pass through (activations and norms included)."""
        return self.step(node) in CHANNEL_STEPS

    def hook_term(self, node: fx.Node, start: int = 0) -> Term | None:
        """A hook that yields exactly this node's value, if there is one."""
        if node.op == "call_module":
            return Term(str(node.target), "output", self.calls[node], start)
        if node.op == "placeholder":
            return Term("", "input", 0, start)
        owned = self.module_output_term(node, start)
        if owned is not None:
            return owned
        act = self.activation_name(node)
        if act in TRANSFORMS and node.args and isinstance(node.args[0], fx.Node) and len(node.args) == 1:
            inner = self.hook_term(node.args[0], start)
            if inner is not None and inner.transform is None:
                return replace(inner, transform=act)
        return None

    def pre_and_activation(self, node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
        """(pre node, activation node) of a conv/linear call: see DataFlow.unit_output."""
        return self.unit_output(node)


def _trace(module: nn.Module, shape: tuple[int, ...]) -> _Graph:
    return _Graph(module, shape)


def _enclosing(g: _Graph, node: fx.Node) -> str:
    """The innermost module whose forward contains `node` ('' for the root)."""
    names = g.scopes(node)
    return names[-1] if names else ""


def _common_prefix_name(names: Sequence[str]) -> str:
    if len(names) < 2:
        return ""
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.rstrip("_.-/")


class _Namer:
    """Hands out layer names, suffixing '#k' to a name already given."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, name: str) -> str:
        base, k = name, 1
        while name in self.used:
            name = f"{base}#{k}"
            k += 1
        self.used.add(name)
        return name


def _discover_fx(module: nn.Module, shape: tuple[int, ...]) -> LayerMap:
    g = _trace(module, shape)
    aliases_inv = {full: short for short, full in (getattr(module, "netanatomy_aliases", {}) or {}).items()}
    layers: list[Layer] = []
    unique = _Namer()

    def display(module_name: str) -> str:
        return aliases_inv.get(module_name, module_name)

    named: dict[fx.Node, str] = {}  # graph-level layers by node, to label residual operands
    for node in g.nodes:
        m = g.mod(node)
        layer = None
        if isinstance(m, ANALYZABLE):
            layer = _fx_param_layer(g, node, m, unique, display)
        elif node.op == "call_function" and node.target in _CAT:
            layer = _fx_concat_layer(g, node, unique, display)
        elif g.is_add(node):
            layer = _fx_residual_layer(g, node, unique, display, named)
        if layer is not None:
            layers.append(layer)
            named[node] = layer.name

    layers = _inherit_groups(g, layers)
    layers = [replace(layer, index=i) for i, layer in enumerate(layers)]
    return LayerMap(layers, "fx", shape)


def _fx_param_layer(g: _Graph, node: fx.Node, m: nn.Module, unique, display) -> Layer:
    name = display(str(node.target))
    if g.calls[node]:
        name = f"{name}@{g.calls[node]}"
    name = unique(name)
    out_shape = g.shape(node) or ()
    in_node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    in_shape = g.shape(in_node) if in_node is not None else None
    if isinstance(m, nn.Linear):
        units, kind, kernel, stride, groups = m.out_features, "linear", None, None, 1
    else:
        units, kind = m.out_channels, "conv"
        kernel, stride, groups = tuple(m.kernel_size), tuple(m.stride), int(m.groups)
    pre_node, act_node = g.pre_and_activation(node)
    pre = g.hook_term(pre_node) or g.hook_term(node)
    post = g.hook_term(act_node) if act_node is not None else pre
    branches: tuple[Branch, ...] = ()
    if groups > 1 and not is_depthwise(m):
        size = units // groups
        branches = tuple(Branch(f"{name}.group{k}", "group", k * size, (k + 1) * size, str(node.target)) for k in range(groups))
    return Layer(
        name=name, module=str(node.target), kind=kind, units=units, out_shape=out_shape, in_shape=in_shape,
        kernel_size=kernel, stride=stride, groups=groups,
        activation=g.activation_name(act_node) if act_node is not None else None,
        branches=branches, pre=(pre,) if pre else None, post=(post,) if post else None,
    )


def _cat_dim(node: fx.Node) -> int:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return int(dim) if isinstance(dim, int) else 0


def _fx_concat_layer(g: _Graph, node: fx.Node, unique, display) -> Layer | None:
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    out_shape = g.shape(node)
    if not isinstance(parts, (list, tuple)) or len(parts) < 2 or not out_shape:
        return None
    ndim = len(out_shape) + 1
    dim = _cat_dim(node)
    if dim < 0:
        dim += ndim
    if dim != 1:  # only channel/feature concatenation joins branches
        return None
    ranges, start = [], 0
    for part in parts:
        shp = g.shape(part) if isinstance(part, fx.Node) else None
        if shp is None:
            return None
        ranges.append((part, start, start + shp[0]))
        start += shp[0]
    producers = [g.producer(part) for part, _, _ in ranges]
    branch_names = [display(str(p.target)) if p is not None else part.name for p, (part, _, _) in zip(producers, ranges)]
    owner = _enclosing(g, node)
    name = display(owner) if owner else (_common_prefix_name(branch_names) or node.name)
    name = unique(name)
    branches = tuple(
        Branch(bname, "concat", a, b, str(p.target) if p is not None else "")
        for bname, p, (_, a, b) in zip(branch_names, producers, ranges)
    )
    post = [g.hook_term(part, a) for part, a, _ in ranges]
    pre = []
    for p, (part, a, _) in zip(producers, ranges):
        term = None
        if p is not None:
            pre_node, act_node = g.pre_and_activation(p)
            # pre-activation values exist for this part when the part is the producer's activation
            # (or its pre-activation node itself)
            if part is act_node or part is pre_node:
                term = g.hook_term(pre_node, a)
        pre.append(term)
    acts = {g.activation_name(part) for part in (r[0] for r in ranges)}
    return Layer(
        name=name, module=owner, kind="concat", units=start, out_shape=out_shape, branches=branches,
        activation=acts.pop() if len(acts) == 1 else None,
        pre=tuple(pre) if all(pre) else None, post=tuple(post) if all(post) else None, combine="cat",
    )


def _fx_residual_layer(g: _Graph, node: fx.Node, unique, display, named: dict[fx.Node, str]) -> Layer | None:
    a, b = node.args[0], node.args[1]
    out_shape, sa, sb = g.shape(node), g.shape(a), g.shape(b)
    if not out_shape or sa != out_shape or sb != out_shape or len(out_shape) < 1:
        return None  # broadcasting adds (biases, scalars) are not residual sums
    owner = _enclosing(g, node)
    name = unique(display(owner) if owner else node.name)
    units = out_shape[0]
    branches = []
    for operand in (a, b):
        p = g.producer(operand)
        inside = p is not None and owner and str(p.target).startswith(owner + ".")
        if inside:
            branches.append(Branch(display(str(p.target)), "residual", 0, units, str(p.target)))
        elif operand in named:
            branches.append(Branch(named[operand], "residual", 0, units, ""))
            continue
        else:
            label = f"{name}.shortcut" if owner else f"{operand.name}"
            branches.append(Branch(label, "residual", 0, units, str(p.target) if p is not None else ""))
    terms = (g.hook_term(a), g.hook_term(b))
    pre = terms if all(terms) else None
    users = list(node.users)
    act_node = users[0] if len(users) == 1 and g.activation_name(users[0]) else None
    if act_node is None:
        post = pre  # no nonlinearity after the sum: post-activation equals pre-activation
    else:
        act_term = g.hook_term(act_node)
        post = (act_term,) if act_term is not None else None
    return Layer(
        name=name, module=owner, kind="residual", units=units, out_shape=out_shape, branches=tuple(branches),
        activation=g.activation_name(act_node) if act_node is not None else None,
        pre=pre, post=post, combine="sum",
    )


def _inherit_groups(g: _Graph, layers: list[Layer]) -> list[Layer]:
    """A conv whose output feeds only grouped convs (through channel-preserving steps) is split like them."""
    node_of = {str(n.target): n for n in g.nodes if n.op == "call_module" and g.calls.get(n) == 0}
    out = []
    for layer in layers:
        node = node_of.get(layer.module)
        if layer.kind == "conv" and layer.groups == 1 and node is not None:
            consumers = _consumers(g, node)
            groups = {int(c.groups) for c in consumers if isinstance(c, ANALYZABLE) and not isinstance(c, nn.Linear)}
            if consumers and len(groups) == 1 and all(isinstance(c, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                                                      and not is_depthwise(c) for c in consumers):
                k = groups.pop()
                if k > 1 and layer.units % k == 0:
                    size = layer.units // k
                    branches = tuple(Branch(f"{layer.name}.group{i}", "group", i * size, (i + 1) * size, layer.module)
                                     for i in range(k))
                    layer = replace(layer, branches=branches)
        out.append(layer)
    return out


def _consumers(g: _Graph, node: fx.Node) -> list[nn.Module]:
    """Parametric modules that read this node's units, through channel-preserving steps."""
    readers = g.readers(node)
    return [g.mod(r) for r in readers] if readers else []


# ---------------------------------------------------------------------------------------------
# Module-structure discovery (fallback when fx cannot trace)


@dataclass
class _Call:
    name: str
    module: nn.Module
    call: int
    order: int
    inputs: tuple
    output: Any
    first_inside: int  # order of the first call made while this module ran


def _record_calls(module: nn.Module, shape: tuple[int, ...]) -> list[_Call]:
    calls: list[_Call] = []
    counts: dict[str, int] = defaultdict(int)
    starts: dict[int, list[int]] = defaultdict(list)
    handles = []

    def pre_hook(name: str):
        def hook(mod, args):
            starts[id(mod)].append(len(calls))
        return hook

    def post_hook(name: str):
        def hook(mod, args, output):
            begin = starts[id(mod)].pop()
            inputs = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
            out = output.detach().clone() if isinstance(output, torch.Tensor) else None
            calls.append(_Call(name, mod, counts[name], len(calls), inputs, out, begin))
            counts[name] += 1
        return hook

    try:
        for name, sub in module.named_modules():
            if sub is module:
                continue
            handles.append(sub.register_forward_pre_hook(pre_hook(name)))
            handles.append(sub.register_forward_hook(post_hook(name)))
        with torch.no_grad():
            module(_probe_input(module, shape))
    finally:
        for h in handles:
            h.remove()
    return calls


def _discover_modules(module: nn.Module, shape: tuple[int, ...]) -> LayerMap:
    calls = _record_calls(module, shape)
    aliases_inv = {full: short for short, full in (getattr(module, "netanatomy_aliases", {}) or {}).items()}
    found: list[tuple[int, Layer]] = []
    unique = _Namer()

    def reader_of(value: torch.Tensor, after: int, kinds: tuple) -> _Call | None:
        """The first later call of a module of `kinds` whose input is exactly `value`."""
        for d in calls:
            if d.order > after and isinstance(d.module, kinds) and d.inputs and isinstance(d.inputs[0], torch.Tensor) \
                    and d.inputs[0].shape == value.shape and torch.equal(d.inputs[0], value):
                return d
        return None

    def reads_relu_of(value: torch.Tensor, after: int) -> bool:
        """Some later call reads relu(value) (a functional ReLU that hooks cannot see)."""
        rectified = F.relu(value)
        if torch.equal(rectified, value):
            return False
        return any(t.shape == value.shape and torch.equal(t, rectified)
                   for d in calls if d.order > after for t in _tensors(d.inputs))

    for c in calls:
        if not (isinstance(c.module, ANALYZABLE) and isinstance(c.output, torch.Tensor)):
            continue
        m = c.module
        name = unique(aliases_inv.get(c.name, c.name) + (f"@{c.call}" if c.call else ""))
        pre_call = reader_of(c.output, c.order, AFFINE_MODULES) or c
        act = reader_of(pre_call.output, pre_call.order, ACTIVATION_MODULES)
        pre = Term(pre_call.name, "output", pre_call.call)
        if act is not None:
            post, activation = Term(act.name, "output", act.call), type(act.module).__name__.lower()
        elif reads_relu_of(pre_call.output, pre_call.order):
            post, activation = replace(pre, transform="relu"), "relu"
        else:
            post, activation = pre, None
        if isinstance(m, nn.Linear):
            units, kind, kernel, stride, groups = m.out_features, "linear", None, None, 1
        else:
            units, kind = m.out_channels, "conv"
            kernel, stride, groups = tuple(m.kernel_size), tuple(m.stride), int(m.groups)
        branches: tuple[Branch, ...] = ()
        if groups > 1 and not is_depthwise(m):
            size = units // groups
            branches = tuple(Branch(f"{name}.group{k}", "group", k * size, (k + 1) * size, c.name) for k in range(groups))
        found.append((c.order, Layer(
            name=name, module=c.name, kind=kind, units=units, out_shape=tuple(c.output.shape[1:]),
            in_shape=tuple(c.inputs[0].shape[1:]) if c.inputs and isinstance(c.inputs[0], torch.Tensor) else None,
            kernel_size=kernel, stride=stride, groups=groups, activation=activation,
            branches=branches, pre=(pre,), post=(post,),
        )))
    claimed: list[torch.Tensor] = []
    for c in calls:
        if isinstance(c.module, ANALYZABLE) or not isinstance(c.output, torch.Tensor) or c.output.dim() < 2:
            continue
        if isinstance(c.module, ACTIVATION_MODULES + AFFINE_MODULES + CHANNEL_PRESERVING_MODULES):
            continue
        if any(t.shape == c.output.shape and torch.equal(t, c.output) for t in claimed):
            continue  # an outer module returning the same tensor as an inner one already found
        earlier = [d for d in calls if d.order < c.order]
        layer = _match_concat(c, earlier, aliases_inv, unique) or _match_residual(c, earlier, aliases_inv, unique)
        if layer is not None:
            found.append((c.order, layer))
            claimed.append(c.output)
    found.sort(key=lambda item: item[0])
    layers = [replace(layer, index=i) for i, (_, layer) in enumerate(found)]
    return LayerMap(layers, "modules", shape)


def _tensors(values: Any) -> Iterator[torch.Tensor]:
    """Tensors in call arguments, looking inside lists and tuples (a joiner takes a list)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _match_concat(c: _Call, earlier: list[_Call], aliases_inv, unique) -> Layer | None:
    """Cover the module's output channels with slices equal to earlier outputs (or their ReLU)."""
    out = c.output
    total, start, pieces = out.shape[1], 0, []
    candidates = [d for d in reversed(earlier) if isinstance(d.output, torch.Tensor) and d.output.dim() == out.dim()
                  and d.output.shape[2:] == out.shape[2:] and d.output.shape[1] < total]
    while start < total:
        best = None
        for d in candidates:  # most recent first: the last step that produced the slice
            width = d.output.shape[1]
            if start + width > total:
                continue
            piece = out[:, start:start + width]
            if torch.equal(piece, d.output):
                best = (d, None)
            elif torch.equal(piece, F.relu(d.output)) and not torch.equal(d.output, F.relu(d.output)):
                best = (d, "relu")
            if best is not None:
                break
        if best is None:
            return None
        pieces.append((best[0], best[1], start, start + best[0].output.shape[1]))
        start += best[0].output.shape[1]
    if len(pieces) < 2:
        return None
    branches, post, pre = [], [], []
    for d, transform, a, b in pieces:
        producer = _producer_call(d, earlier)
        bname = aliases_inv.get(producer.name, producer.name) if producer is not None else d.name
        branches.append(Branch(bname, "concat", a, b, producer.name if producer is not None else ""))
        post.append(Term(d.name, "output", d.call, a, transform))
        if transform == "relu":  # d's output is the pre-activation value itself
            pre.append(Term(d.name, "output", d.call, a))
        elif isinstance(d.module, ACTIVATION_MODULES) and d.inputs and isinstance(d.inputs[0], torch.Tensor):
            source = next((e for e in reversed(earlier) if e.order < d.order and isinstance(e.output, torch.Tensor)
                           and e.output.shape == d.inputs[0].shape and torch.equal(e.output, d.inputs[0])), None)
            pre.append(Term(source.name, "output", source.call, a) if source is not None else None)
        else:
            pre.append(None)
    name = unique(aliases_inv.get(c.name, c.name))
    acts = {t for _, t, _, _ in pieces}
    return Layer(name=name, module=c.name, kind="concat", units=total, out_shape=tuple(out.shape[1:]),
                 branches=tuple(branches), activation=acts.pop() if len(acts) == 1 else None,
                 pre=tuple(pre) if all(pre) else None, post=tuple(post), combine="cat")


def _producer_call(d: _Call, earlier: list[_Call]) -> _Call | None:
    """Walk back from call `d` through channel-preserving calls to the conv/linear call feeding it."""
    cur = d
    for _ in range(16):
        if isinstance(cur.module, ANALYZABLE):
            return cur
        if not isinstance(cur.module, ACTIVATION_MODULES + AFFINE_MODULES + CHANNEL_PRESERVING_MODULES):
            return None
        src = cur.inputs[0] if cur.inputs else None
        if not isinstance(src, torch.Tensor):
            return None
        prev = next((e for e in reversed(earlier) if e.order < cur.order and isinstance(e.output, torch.Tensor)
                     and e.output.shape == src.shape and torch.equal(e.output, src)), None)
        if prev is None:
            return None
        cur = prev
    return None


def _match_residual(c: _Call, earlier: list[_Call], aliases_inv, unique) -> Layer | None:
    """A module whose output is a + b (or relu(a + b)) of its input or tensors computed inside it."""
    out = c.output
    inside = [d for d in earlier if d.order >= c.first_inside]
    pool: list[tuple[str, Term, torch.Tensor]] = []
    if c.inputs and isinstance(c.inputs[0], torch.Tensor) and c.inputs[0].shape == out.shape:
        pool.append((f"{c.name}.shortcut", Term(c.name, "input", c.call), c.inputs[0]))
    for d in inside:
        if isinstance(d.output, torch.Tensor) and d.output.shape == out.shape:
            pool.append((d.name, Term(d.name, "output", d.call), d.output))
    for i in range(len(pool)):
        for j in range(i + 1, len(pool)):
            total = pool[i][2] + pool[j][2]
            for act, fn in ((None, None), ("relu", F.relu)):
                value = fn(total) if fn is not None else total
                if torch.allclose(value, out, atol=1e-5, rtol=1e-4) and not torch.allclose(value, pool[i][2]) \
                        and not torch.allclose(value, pool[j][2]):
                    name = unique(aliases_inv.get(c.name, c.name))
                    branches = []
                    for label, _, _ in (pool[i], pool[j]):
                        if label.endswith(".shortcut"):
                            branches.append(Branch(label, "residual", 0, out.shape[1], ""))
                        else:
                            branches.append(Branch(aliases_inv.get(label, label), "residual", 0, out.shape[1], label))
                    pre = (pool[i][1], pool[j][1])
                    post = (Term(c.name, "output", c.call),)
                    return Layer(name=name, module=c.name, kind="residual", units=out.shape[1],
                                 out_shape=tuple(out.shape[1:]), branches=tuple(branches), activation=act,
                                 pre=pre, post=post, combine="sum")
    return None


def layers_summary(layer_map: LayerMap) -> str:
    """A human-readable table of layers and their branches."""
    lines = [f"{'layer':<40} {'kind':<9} {'units':>6}  {'kernel':<7} branches"]
    for layer in layer_map.values():
        kernel = "x".join(map(str, layer.kernel_size)) if layer.kernel_size else "-"
        if layer.depthwise:
            kernel += " dw"
        sizes = {b.size for b in layer.branches}
        if len(layer.branches) > 8 and len(sizes) == 1:
            branch_text = f"{len(layer.branches)} {layer.branches[0].kind}s of {sizes.pop()} units"
        elif layer.branches:
            parts = [f"{b.name} {b.size} [{b.start}:{b.stop})" for b in layer.branches]
            branch_text = "; ".join(parts)
        else:
            branch_text = ""
        lines.append(f"{layer.name:<40} {layer.kind:<9} {layer.units:>6}  {kernel:<7} {branch_text}")
    if layer_map.note:
        lines.append(f"note: {layer_map.note}")
    return "\n".join(lines)


__all__ = ["Branch", "Layer", "LayerMap", "Term", "Tracer", "discover_layers", "layers_summary", "resolve_layer"]
