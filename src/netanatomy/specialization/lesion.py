"""Accuracy of a model with sets of one layer's units silenced, many sets per pass.

Silencing (lesioning) a set of units sets their outputs, after the nonlinearity, to 0. Two
facts make many lesions cheap:
- nothing below the lesioned layer changes, so the model is split with torch.fx at the
  layer's output: the prefix runs once per batch of data, and only the suffix runs per lesion;
- many lesions are many masks: M masks over n examples become one suffix pass over M*n rows.
When the lesioned values feed a linear layer (or a conv with groups=1) and nothing else, that
layer is moved into the prefix too: with z = W h + b computed once, a lesion of the units S
gives z - W[:, S] h[S], a product over |S| inputs instead of all of them ("delta" mode; the
result equals the masked forward up to float rounding; `exact=True` turns it off).
Models that fx cannot trace fall back to a forward hook that multiplies the layer's output by
the masks on the full network (still M masks per pass).

Certified mixed precision (`refine=True`): the lesions run in float32, and only the rows whose
top-two logit gap is within `refine_tol * (1 + max |logit|)` (far above float32 rounding of
these networks) are recomputed in float64 on a float64 twin of the model. A prediction whose
gap exceeds what rounding can move is the float64 prediction, so the counts are those of a
float64 evaluation at about the cost of a float32 one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..models.layers import Layer
from .extract import trace

_ACTIVATION_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh,
                         F.tanh, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardswish, F.mish, F.softplus, F.batch_norm}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh"}
_TRANSPARENT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_POST_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.PReLU,
    *_TRANSPARENT_MODULES,
)


@dataclass
class _Split:
    prefix: fx.GraphModule     # x -> tuple of the values the suffix needs (the post value first)
    suffix: fx.GraphModule     # those values -> model output
    delta: nn.Module | None    # the linear/conv that alone reads the post value (delta mode)


class LesionEvaluator:
    """Per-class correct counts of `model` on (x, y) with masks over one layer's units.

    masks [M, U]: 1 keeps a unit, 0 silences it. The data stays on `device` in chunks of
    `batch_size` examples; the suffix runs on as many masks at once as keep its first tensor
    near `chunk_elements` values (a few MB: elementwise steps stay in cache).
    """

    def __init__(self, model: nn.Module, layer: Layer, x: torch.Tensor, y: torch.Tensor, *,
                 num_classes: int | None = None, batch_size: int = 1000, chunk_elements: int = 1 << 20,
                 device: str | torch.device | None = None, method: str = "auto", exact: bool = False,
                 refine: bool = False, refine_tol: float = 1e-3):
        if method not in ("auto", "fx", "hook"):
            raise UsageError(f"lesion method must be auto, fx or hook, not {method!r}")
        self.model = model.eval()
        self.layer = layer
        self.device = torch.device(device) if device is not None else next(
            (p.device for p in model.parameters()), torch.device("cpu"))
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        self.x = x.to(param.dtype) if param is not None and x.is_floating_point() else x
        self.y = torch.as_tensor(y).long()
        if self.y.numel() and int(self.y.min()) < 0:
            raise UsageError("lesion accuracy needs labelled data (labels >= 0)")
        self.num_classes = int(num_classes or (int(self.y.max()) + 1 if self.y.numel() else 1))
        self.batch_size, self.chunk_elements = int(batch_size), int(chunk_elements)
        self.class_totals = torch.bincount(self.y, minlength=self.num_classes).cpu()
        self.split: _Split | None = None
        if model._forward_pre_hooks_with_kwargs and method == "auto":
            method = "hook"  # root pre-hooks that take kwargs: only the real forward runs them faithfully
        if method in ("auto", "fx") and layer.module:
            try:
                self.split = _split_at(model, layer.module, allow_delta=not exact)
            except Exception:  # auto: any failure to split falls back to the hook
                if method == "fx":
                    raise
        elif method == "fx":
            raise UsageError(f"layer {layer.name} is not one module's output; use the hook method")
        if self.split is None:
            self._hook_term = _hook_term(layer)
        self.refine_tol = float(refine_tol)
        self._twin: LesionEvaluator | None = None
        self.refined_rows = 0
        if refine and param is not None and param.dtype != torch.float64:
            twin_model = copy.deepcopy(model).double()
            self._twin = LesionEvaluator(twin_model, layer, x.double(), y, num_classes=self.num_classes,
                                         batch_size=batch_size, chunk_elements=chunk_elements, device=device,
                                         method=method, exact=exact)

    @property
    def method(self) -> str:
        return "hook" if self.split is None else ("fx-delta" if self.split.delta is not None else "fx")

    def correct(self, masks: torch.Tensor) -> torch.Tensor:
        """Correct predictions per mask and class: int64 [M, num_classes]."""
        masks = torch.as_tensor(masks)
        if masks.dim() != 2 or masks.shape[1] != self.layer.units:
            raise UsageError(f"masks must be [M, {self.layer.units}] for layer {self.layer.name}")
        out = torch.zeros((masks.shape[0], self.num_classes), dtype=torch.long)
        with torch.no_grad():
            for start in range(0, self.x.shape[0], self.batch_size):
                xb = self.x[start:start + self.batch_size].to(self.device)
                yb = self.y[start:start + self.batch_size].to(self.device)
                for m0, logits in self._outputs(xb, masks):
                    if self._twin is not None:
                        logits = self._refined(logits, start, masks[m0:m0 + logits.shape[0]])
                    out[m0:m0 + logits.shape[0]] += self._count(logits, yb)
        return out

    def _refined(self, logits: torch.Tensor, start: int, mb: torch.Tensor) -> torch.Tensor:
        """Recompute in float64 the (mask, example) rows whose prediction rounding could flip."""
        if logits.dim() != 3 or logits.shape[2] < 2:
            return logits
        top = logits.topk(2, dim=2).values
        close = (top[..., 0] - top[..., 1]) <= self.refine_tol * (1 + logits.abs().amax(dim=2))
        if not bool(close.any()):
            return logits
        logits = logits.double()
        twin = self._twin
        for i in torch.nonzero(close.any(dim=1)).flatten().tolist():
            cols = torch.nonzero(close[i]).flatten()
            xb = twin.x[start + cols.cpu()].to(twin.device)
            _, exact_logits = next(twin._outputs(xb, mb[i:i + 1]))
            logits[i, cols] = exact_logits[0].to(logits.device)
            self.refined_rows += int(cols.numel())
        return logits

    def outputs(self, xb: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Model outputs for one batch under every mask: [M, n, ...] (for checks and custom statistics)."""
        masks = torch.as_tensor(masks)
        with torch.no_grad():
            out = list(self._outputs(xb.to(self.device, self.x.dtype), masks))
        return torch.cat([o for _, o in out], dim=0)

    def _outputs(self, xb: torch.Tensor, masks: torch.Tensor):
        """Yields (first mask index, outputs [k, n, ...]) for consecutive groups of masks."""
        n = xb.shape[0]
        per_example = max(1, int(torch.Size(self.layer.out_shape).numel()))
        per_mask = max(1, self.chunk_elements // max(n * per_example, 1))
        if self.split is None:
            for m0 in range(0, masks.shape[0], per_mask):
                mb = masks[m0:m0 + per_mask].to(self.device)
                logits = self._hooked_forward(xb, mb)
                yield m0, logits.view(mb.shape[0], n, *logits.shape[1:])
            return
        split = self.split
        values = split.prefix(_root_pre_hooks(self.model, xb))
        post, rest = values[0], list(values[1:])
        z_full = rest.pop(0) if split.delta is not None else None
        for m0 in range(0, masks.shape[0], per_mask):
            mb = masks[m0:m0 + per_mask].to(self.device, post.dtype)
            k = mb.shape[0]
            if split.delta is None:
                shape = (k, 1, mb.shape[1]) + (1,) * (post.dim() - 2)
                first = (post.unsqueeze(0) * mb.view(shape)).reshape(k * n, *post.shape[1:])
            else:
                first = _delta_forward(split.delta, post, z_full, mb)
            others = [v.unsqueeze(0).expand(k, *v.shape).reshape(k * n, *v.shape[1:]) for v in rest]
            logits = split.suffix(first, *others)
            yield m0, logits.view(k, n, *logits.shape[1:])

    def _hooked_forward(self, xb: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        """The full model on xb repeated per mask, the layer's output multiplied by the masks."""
        n, k = xb.shape[0], mb.shape[0]
        term = self._hook_term
        module = self.model.get_submodule(term.module) if term.module else self.model
        state = {"call": 0}

        def apply(value: torch.Tensor) -> torch.Tensor:
            units = slice(term.start, term.start + self.layer.units)
            if value.shape[1] < units.stop:
                raise UsageError(f"layer {self.layer.name}: the hooked tensor has {value.shape[1]} channels")
            full = torch.ones((k, 1, value.shape[1]) + (1,) * (value.dim() - 2), dtype=value.dtype, device=value.device)
            full[:, :, units] = mb.to(value.dtype).view((k, 1, self.layer.units) + (1,) * (value.dim() - 2))
            return (value.reshape(k, n, *value.shape[1:]) * full).reshape(value.shape)

        def post_hook(mod, args, output):
            state["call"] += 1
            return apply(output) if state["call"] - 1 == term.call else output

        def pre_hook(mod, args):
            state["call"] += 1
            return (apply(args[0]), *args[1:]) if state["call"] - 1 == term.call else None

        handle = (module.register_forward_pre_hook(pre_hook) if term.where == "input"
                  else module.register_forward_hook(post_hook))
        try:
            return self.model(xb.repeat(k, *([1] * (xb.dim() - 1))))
        finally:
            handle.remove()

    def _count(self, logits: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3:
            raise UsageError(f"the model returns {tuple(logits.shape[1:])}; lesion accuracy needs logits [N, classes]")
        k, n = logits.shape[:2]
        right = logits.argmax(dim=2) == yb.view(1, n)
        index = (torch.arange(k, device=yb.device).view(k, 1) * self.num_classes + yb.view(1, n))[right]
        return torch.bincount(index, minlength=k * self.num_classes).view(k, self.num_classes).cpu()


def _root_pre_hooks(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the model's own forward pre-hooks (e.g. input normalization) make of `x`.

    The fx prefix runs the traced forward, which skips the root module's hooks.
    """
    for hook in model._forward_pre_hooks.values():
        result = hook(model, (x,))
        if result is not None:
            x = result[0] if isinstance(result, tuple) else result
    return x


def _hook_term(layer: Layer):
    terms = layer.post or layer.pre
    if not terms or len(terms) != 1:
        raise UsageError(f"layer {layer.name} cannot be lesioned with one hook (its values come from "
                         f"{len(terms or ())} tensors)")
    term = terms[0]
    if term.transform not in (None, "relu", "relu6", "tanh", "gelu", "silu", "elu", "leaky_relu", "hardswish",
                              "mish"):
        raise UsageError(f"layer {layer.name}: zeroing before a {term.transform} does not silence the unit")
    return term


# ---------------------------------------------------------------------------------------------
# fx surgery


def _follow_post(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """From a conv/linear call to the node holding its units' outputs after batch norm and the
    nonlinearity (each step the only reader of the previous one)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(modules[user.target], _POST_MODULES):
            node = user
        elif user.op == "call_function" and user.target in _ACTIVATION_FUNCTIONS:
            node = user
        elif user.op == "call_method" and user.target in _ACTIVATION_METHODS:
            node = user
        else:
            break
    return node


def _delta_consumer(post: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The linear (or groups=1 conv) that is the only reader of `post`, through dropout/identity."""
    node = post
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module":
            return None
        m = modules[user.target]
        if isinstance(m, _TRANSPARENT_MODULES):
            node = user
            continue
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"):
            return user
        return None
    return None


def _split_at(model: nn.Module, module_name: str, allow_delta: bool) -> _Split:
    gm = trace(model)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == module_name]
    if len(calls) != 1:
        raise UsageError(f"module {module_name} is called {len(calls)} times in the forward; cannot split there")
    if sum(n.op == "placeholder" for n in nodes) != 1:
        raise UsageError("the model's forward takes more than one input; cannot split it")
    post = _follow_post(calls[0], modules)
    cut = post
    delta = None
    if allow_delta:
        consumer = _delta_consumer(post, modules)
        if consumer is not None:
            delta, cut = modules[consumer.target], consumer
    position = {n: i for i, n in enumerate(nodes)}
    prefix_nodes = [n for n in nodes if position[n] <= position[cut] and n.op != "output"]
    suffix_nodes = [n for n in nodes if position[n] > position[cut]]
    suffix_set = set(suffix_nodes)
    needed = [n for n in prefix_nodes if n.op != "get_attr" and n is not cut
              and any(u in suffix_set for u in n.users)]
    # The prefix returns the layer's output (and the consumer's unlesioned output in delta
    # mode), then the other values the suffix needs; the suffix reads the lesioned cut first.
    outputs = [post] + ([cut] if delta is not None else []) + needed

    pg = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in prefix_nodes:
        env[n] = pg.node_copy(n, lambda a: env[a])
    pg.output(tuple(env[n] for n in outputs))
    prefix = fx.GraphModule(gm, pg)

    sg = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {}
    senv[cut] = sg.placeholder("lesioned")
    for i, n in enumerate(needed):
        senv[n] = sg.placeholder(f"value{i}")

    def lookup(a: fx.Node) -> fx.Node:
        if a not in senv:
            if a.op != "get_attr":
                raise UsageError(f"cannot split the model at {module_name}: {a.name} is needed after it")
            senv[a] = sg.node_copy(a)
        return senv[a]

    for n in suffix_nodes:
        senv[n] = sg.node_copy(n, lookup)
    suffix = fx.GraphModule(gm, sg)
    return _Split(prefix, suffix, delta)


def _delta_forward(module: nn.Module, post: torch.Tensor, z_full: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """module(post * mask) for each mask, as z_full - module_without_bias(post restricted to the
    silenced units): [M * n, ...]. Masks with equal silenced counts run as one batched product."""
    k = keep.shape[0]
    n = post.shape[0]
    out = torch.empty((k, *z_full.shape), dtype=z_full.dtype, device=z_full.device)
    silenced = keep == 0
    counts = silenced.sum(dim=1)
    for size in torch.unique(counts).tolist():
        rows = torch.nonzero(counts == size).flatten()
        r = rows.numel()
        if size == 0:
            out[rows] = z_full
            continue
        idx = torch.nonzero(silenced[rows])[:, 1].view(r, size)  # [r, s] silenced units, sorted
        if isinstance(module, nn.Linear):
            h = post[:, idx].permute(1, 0, 2)                       # [r, n, s]
            w = module.weight[:, idx].permute(1, 2, 0)              # [r, s, out]
            part = torch.baddbmm(z_full.unsqueeze(0).expand(r, *z_full.shape), h, w, beta=1.0, alpha=-1.0)
        else:  # conv2d, groups=1: the silenced input channels alone, all masks as one grouped conv
            h = post[:, idx.reshape(-1)]                            # [n, r*s, H, W]
            w = module.weight[:, idx].permute(1, 0, 2, 3, 4).reshape(r * module.out_channels, size,
                                                                     *module.weight.shape[2:])
            delta = F.conv2d(h, w, None, module.stride, module.padding, module.dilation, groups=r)
            part = z_full.unsqueeze(0) - delta.view(n, r, module.out_channels, *delta.shape[2:]).transpose(0, 1)
        if r == k:
            out = part
        else:
            out[rows] = part
    return out.reshape(k * n, *z_full.shape[1:])


__all__ = ["LesionEvaluator"]
