"""Expanded weights: how a lower layer's units feed an upper layer's, through the layers between.

The model is linearized: every nonlinearity is replaced by its nearest linear map (ReLU and
its kin -> identity, max-pool -> average pool over the same window, local response norm ->
its slope at 0, 1 / k^beta). The expanded weight from lower unit i to upper unit j is then the
gradient of j's pre-activation at the centre of its map with respect to the lower layer's
activations: a [C_upper, C_lower, h, w] tensor, h x w the receptive field (Visualizing Weights).

Linearization is a `TorchFunctionMode` around the forward pass, not an edit of the model: the
user's module is never changed or copied, module names (and so hooks on the layers) stay as
they are, and functional calls inside `forward` (`F.relu`, `F.max_pool2d`, padding with -inf
before a max-pool) are caught as well as modules. All upper units are done in a few backward
passes: their one-hot output gradients are batched (`is_grads_batched`), in chunks.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import UsageError
from ..models.layers import Layer, LayerMap
from .graph import INPUT

__all__ = ["ExpandedWeights", "Linearized", "expanded_weights", "top_connections"]

_IDENTITY = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.selu, F.celu,
    F.hardtanh, F.gelu, F.silu, F.mish, F.hardswish, torch.Tensor.relu, torch.Tensor.relu_,
}
_IDENTITY_NAMES = {"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "hardtanh", "elu", "selu", "celu"}
_MAX_POOL_NAMES = {"max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d",
                   "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices"}
_ADAPTIVE_MAX_NAMES = {"adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
                       "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices"}


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class Linearized(TorchFunctionMode):
    """Inside this mode a forward pass computes the model's nearest linear (affine) map.

    ReLU-like activations -> identity; max-pool -> average pool over the same window (padding
    not counted, like the max it replaces); adaptive max-pool -> adaptive average pool;
    padding with an infinite value (how some ports pad before a max-pool) -> zero padding;
    local response norm -> x / k^beta. Other nonlinearities are left alone and listed in
    `kept` (e.g. sigmoid), so a caller can say that the map is not fully linear.

    Given the model, a submodule that defines `netanatomy_linear(x)` (its nearest linear map,
    e.g. L2 pooling -> average pooling over the same window) has its output replaced by it.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.replaced: set[str] = set()
        self.kept: set[str] = set()
        self._model = model
        self._handles: list = []

    def __enter__(self):
        if self._model is not None:
            for sub in self._model.modules():
                if callable(getattr(sub, "netanatomy_linear", None)):
                    self._handles.append(sub.register_forward_hook(self._substitute_module))
        try:
            return super().__enter__()
        except BaseException:
            self._remove()
            raise

    def __exit__(self, *exc_info):
        try:
            return super().__exit__(*exc_info)
        finally:
            self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _substitute_module(self, module: nn.Module, args: tuple, output: Any) -> Any:
        self.replaced.add(type(module).__name__)
        return module.netanatomy_linear(args[0])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func in _IDENTITY or name in _IDENTITY_NAMES:
            self.replaced.add(name)
            return args[0]
        if name in _MAX_POOL_NAMES:
            self.replaced.add(name)
            return self._avg_pool(name, args, kwargs)
        if name in _ADAPTIVE_MAX_NAMES:
            self.replaced.add(name)
            dims = int(name.split("_pool")[1][0])
            pooled = getattr(F, f"adaptive_avg_pool{dims}d")(args[0], _arg(args, kwargs, 1, "output_size"))
            return (pooled, None) if name.endswith("with_indices") or _arg(args, kwargs, 2, "return_indices") else pooled
        if name == "pad":
            value = _arg(args, kwargs, 3, "value")
            if value is not None and not torch.isfinite(torch.tensor(float(value))):
                self.replaced.add("pad(-inf)")
                return F.pad(args[0], _arg(args, kwargs, 1, "pad"), mode=_arg(args, kwargs, 2, "mode", "constant"),
                             value=0.0)
        if name == "local_response_norm":
            self.replaced.add(name)
            k = _arg(args, kwargs, 4, "k", 1.0)
            beta = _arg(args, kwargs, 3, "beta", 0.75)
            return args[0] / (k ** beta)
        if name in ("sigmoid", "tanh", "softmax", "log_softmax", "softplus", "max", "amax"):
            self.kept.add(name)
        return func(*args, **kwargs)

    @staticmethod
    def _avg_pool(name: str, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        dims = x.dim() - 2
        kernel = _arg(args, kwargs, 1, "kernel_size")
        stride = _arg(args, kwargs, 2, "stride") or kernel
        padding = _arg(args, kwargs, 3, "padding", 0)
        dilation = _arg(args, kwargs, 4, "dilation", 1)
        ceil_mode = bool(_arg(args, kwargs, 5, "ceil_mode", False))
        if any(d != 1 for d in ((dilation,) if isinstance(dilation, int) else tuple(dilation))):
            raise UsageError("cannot linearize a dilated max-pool (no average-pool equivalent)")
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
        out = pool(x, kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=False)
        wants_indices = name.endswith("with_indices") or bool(_arg(args, kwargs, 6, "return_indices", False))
        return (out, None) if wants_indices else out


@dataclass(frozen=True)
class ExpandedWeights:
    """weights: [C_upper, C_lower, h, w] expanded weights (the receptive field of the upper
    unit at `position` in the lower layer's map, starting at `origin` (y, x) there);
    lower / upper: layer names ("input" for the model input); replaced / kept: the
    nonlinearities linearized, and those met but left as they are."""

    weights: Tensor
    lower: str
    upper: str
    position: tuple[int, int]
    origin: tuple[int, int]
    replaced: tuple[str, ...]
    kept: tuple[str, ...]

    def norms(self) -> Tensor:
        """[C_upper, C_lower] L2 norm of each connection's expanded kernel."""
        return self.weights.flatten(2).norm(dim=2)


def top_connections(expanded: ExpandedWeights | Tensor, k: int = 10, *, per_upper: bool = False) -> list[dict]:
    """The strongest connections by L2 norm of their expanded kernels.

    Overall top k, or (per_upper) the top k lower units of every upper unit. Each entry:
    {"upper", "lower", "norm", "sum"} (sum: the kernel's total, its sign says excite/inhibit).
    """
    w = expanded.weights if isinstance(expanded, ExpandedWeights) else expanded
    norms = w.flatten(2).norm(dim=2)
    sums = w.flatten(2).sum(dim=2)
    out = []
    if per_upper:
        kk = min(k, norms.shape[1])
        vals, idx = norms.topk(kk, dim=1)
        for j in range(norms.shape[0]):
            for v, i in zip(vals[j].tolist(), idx[j].tolist()):
                out.append({"upper": j, "lower": i, "norm": v, "sum": float(sums[j, i])})
        return out
    kk = min(k, norms.numel())
    vals, flat = norms.flatten().topk(kk)
    for v, f in zip(vals.tolist(), flat.tolist()):
        j, i = divmod(f, norms.shape[1])
        out.append({"upper": j, "lower": i, "norm": v, "sum": float(sums[j, i])})
    return out


def _substitute(leaf: Tensor, term: Any, channels: int):
    """A forward hook that replaces the term's output (at its call) by the leaf's channel slice."""
    calls = [0]

    def fn(module, args, output):
        call = calls[0]
        calls[0] += 1
        if call != term.call:
            return None
        return leaf[:, term.start:term.start + channels].expand_as(output)
    return fn


def _channels(t: Tensor) -> int:
    return t.shape[1]


def _hook_terms(stack: ExitStack, module: nn.Module, terms: Sequence[Any], store: list) -> None:
    """Hooks, removed with `stack`, that put the value of terms[i] into store[i] during a forward pass."""
    counts: dict[int, int] = {}
    for i, term in enumerate(terms):
        target = module.get_submodule(term.module) if term.module else module

        def grab(mod, args, output=None, i=i, term=term):
            call = counts.get(i, 0)
            counts[i] = call + 1
            if call == term.call:
                store[i] = args[0] if term.where == "input" else output

        if term.where == "input":
            h = target.register_forward_pre_hook(lambda m, a, grab=grab: grab(m, a))
        else:
            h = target.register_forward_hook(grab)
        stack.callback(h.remove)


def _record(module: nn.Module, terms: Sequence[Any], x: Tensor) -> list[Tensor]:
    """One forward pass (linearized) recording the value of each term."""
    found: list[Tensor | None] = [None] * len(terms)
    with ExitStack() as stack:
        _hook_terms(stack, module, terms, found)
        with Linearized(module):
            module(x)
    if any(f is None for f in found):
        raise UsageError("a layer's values were not produced by the forward pass (is it on the input's path?)")
    return found  # type: ignore[return-value]


def _upper_values(found: Sequence[Tensor], layer: Layer) -> Tensor:
    if layer.combine == "sum":
        out = found[0]
        for t in found[1:]:
            out = out + t
        return out
    return found[0] if len(found) == 1 else torch.cat(list(found), dim=1)


def expanded_weights(module: nn.Module, layer_map: LayerMap, lower: str, upper: str, *,
                     position: tuple[int, int] | None = None, chunk: int = 64) -> ExpandedWeights:
    """Expanded weights from `lower` (a layer, or "input") to `upper` in the linearized model.

    Gradient of every upper unit's pre-activation at `position` (default: the centre of its
    map) with respect to the lower layer's values (post-activation, which the linearization
    makes equal to pre-activation), cropped to the receptive field. Batched over upper units
    in chunks of `chunk` one-hot gradients per backward pass, on the module's device. The
    module is put in eval mode for the passes and back in its mode afterwards.
    """
    up = layer_map.resolve(upper)
    low = None if lower == INPUT else layer_map.resolve(lower)
    if low is not None and low.index >= up.index:
        raise UsageError(f"layer {low.name} does not come before {up.name}")
    if up.kind == "linear" or not up.spatial:
        raise UsageError(f"layer {up.name} has no spatial map: expanded weights need a conv-like upper layer")
    up_terms = up.terms("pre")
    param = next(module.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        x = torch.zeros((1, *layer_map.input_shape), device=dev)
        low_terms = low.terms("post") if low is not None else ()
        if low is not None and low.combine == "sum" and len(low_terms) > 1:
            raise UsageError(f"layer {low.name} is a residual sum: take one of its summands as the lower layer")
        with torch.no_grad():
            found = _record(module, list(up_terms) + list(low_terms), x)
        up_shape = _upper_values(found[: len(up_terms)], up).shape
        if low is None:
            low_shape = x.shape
        else:
            parts = found[len(up_terms):]
            low_shape = (1, sum(_channels(t) for t in parts), *parts[0].shape[2:])
        leaf = torch.zeros(low_shape, device=dev, requires_grad=True)
        c_up, h_up, w_up = up_shape[1], up_shape[2], up_shape[3]
        py, px = position if position is not None else (h_up // 2, w_up // 2)
        if not (0 <= py < h_up and 0 <= px < w_up):
            raise UsageError(f"position {(py, px)} is outside {up.name}'s {h_up}x{w_up} map")
        captured: list[Tensor | None] = [None] * len(up_terms)
        with ExitStack() as stack, Linearized(module) as mode:
            _hook_terms(stack, module, up_terms, captured)
            if low is not None:
                for term, part in zip(low_terms, found[len(up_terms):]):
                    if term.where != "output" or not term.module:
                        raise UsageError(f"layer {low.name}'s values cannot be replaced with a hook")
                    h = module.get_submodule(term.module).register_forward_hook(
                        _substitute(leaf, term, _channels(part)))
                    stack.callback(h.remove)
                module(x)
            else:
                module(leaf)
            replaced, kept = tuple(sorted(mode.replaced)), tuple(sorted(mode.kept))
        out = _upper_values(captured, up)                                # type: ignore[arg-type]
        pieces: list[tuple[Tensor | None, tuple[int, int, int, int] | None, int]] = []
        for start in range(0, c_up, chunk):
            units = torch.arange(start, min(c_up, start + chunk), device=dev)
            seeds = torch.zeros((len(units), *out.shape), device=dev)
            seeds[torch.arange(len(units)), 0, units, py, px] = 1.0
            (grad,) = torch.autograd.grad(out, leaf, grad_outputs=seeds, is_grads_batched=True,
                                          retain_graph=start + chunk < c_up)
            grad = grad[:, 0].detach()
            support = grad.abs().flatten(0, 1).amax(dim=0) > 0            # [H, W]: the receptive field
            if not bool(support.any()):
                pieces.append((None, None, len(units)))
                continue
            ys = torch.nonzero(support.any(dim=1))[:, 0]
            xs = torch.nonzero(support.any(dim=0))[:, 0]
            b = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
            pieces.append((grad[:, :, b[0]:b[1], b[2]:b[3]].cpu(), b, len(units)))   # keep only the field
        boxes = [b for _, b, _ in pieces if b is not None]
        if not boxes:
            raise UsageError(f"{up.name} does not depend on {lower} in the linearized model")
        box = (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes))
        weights = torch.zeros(c_up, low_shape[1], box[1] - box[0], box[3] - box[2])
        row = 0
        for crop, b, count in pieces:
            if crop is not None:
                weights[row:row + count, :, b[0] - box[0]:b[1] - box[0], b[2] - box[2]:b[3] - box[2]] = crop
            row += count
    finally:
        module.train(was_training)
    return ExpandedWeights(weights, low.name if low is not None else INPUT, up.name, (py, px), (box[0], box[2]),
                           replaced, kept)
