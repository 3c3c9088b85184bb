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
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..models.layers import Layer
from ..models.layout import channels_last, prefers_channels_last
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
        with torch.no_grad(), ExitStack() as layouts:
            for model in (self.model, *((self._twin.model,) if self._twin is not None else ())):
                layouts.enter_context(channels_last(model, enabled=prefers_channels_last(model, self.device)))
            for start in range(0, self.x.shape[0], self.batch_size):
                xb = self.x[start:start + self.batch_size].to(self.device)
                yb = self.y[start:start + self.batch_size].to(self.device)
                ties_m, ties_e = [], []
                for m0, logits in self._outputs(xb, masks):
                    if self._twin is not None and logits.dim() == 3 and logits.shape[2] >= 2:
                        right, close = _decided(logits, yb, self.refine_tol)
                        mi, ei = torch.nonzero(close, as_tuple=True)
                        ties_m.append(mi + m0)
                        ties_e.append(ei)
                        out[m0:m0 + logits.shape[0]] += self._tally(right, yb)
                    else:
                        out[m0:m0 + logits.shape[0]] += self._count(logits, yb)
                if ties_m and sum(t.numel() for t in ties_m):
                    self._count_refined(out, masks, torch.cat(ties_m), torch.cat(ties_e), start, yb)
        return out

    def _count_refined(self, out: torch.Tensor, masks: torch.Tensor, mask_idx: torch.Tensor,
                       example_idx: torch.Tensor, start: int, yb: torch.Tensor, rows: int = 4096) -> None:
        """Count the near-tie (mask, example) pairs of a batch from the float64 twin, all of
        them in a few row-wise passes (each row its own example and mask)."""
        twin = self._twin
        for r0 in range(0, mask_idx.numel(), rows):
            mi, ei = mask_idx[r0:r0 + rows], example_idx[r0:r0 + rows]
            xb = twin.x[start + ei.cpu()].to(twin.device)
            logits = twin._row_outputs(xb, masks[mi.cpu()].to(twin.device, xb.dtype))
            right = logits.argmax(dim=1) == yb[ei]
            flat = (mi.to(yb.device) * self.num_classes + yb[ei])[right]
            out += torch.bincount(flat, minlength=out.numel()).view_as(out).cpu()
            self.refined_rows += int(mi.numel())

    def _row_outputs(self, xb: torch.Tensor, row_masks: torch.Tensor) -> torch.Tensor:
        """Model outputs [P, ...] with example p's layer output multiplied by row_masks[p]:
        the plain masked forward (no delta arithmetic), for the few rows that need it."""
        if self.split is None:
            return self._hooked_forward(xb, row_masks, per_row=True)
        split = self.split
        values = split.prefix(_root_pre_hooks(self.model, xb))
        post, rest = values[0], list(values[1:])
        if split.delta is not None:
            rest.pop(0)
        masked = post * row_masks.view(*row_masks.shape, *(1,) * (post.dim() - 2))
        first = split.delta(masked) if split.delta is not None else masked
        return split.suffix(first, *rest)

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
        rows = _LinearRows.of(split.delta, post) if split.delta is not None else None
        for m0 in range(0, masks.shape[0], per_mask):
            mb = masks[m0:m0 + per_mask].to(self.device, post.dtype)
            k = mb.shape[0]
            if split.delta is None:
                shape = (k, 1, mb.shape[1]) + (1,) * (post.dim() - 2)
                first = (post.unsqueeze(0) * mb.view(shape)).reshape(k * n, *post.shape[1:])
            else:
                first = _delta_forward(split.delta, post, z_full, mb, rows)
            others = [v.unsqueeze(0).expand(k, *v.shape).reshape(k * n, *v.shape[1:]) for v in rest]
            logits = split.suffix(first, *others)
            yield m0, logits.view(k, n, *logits.shape[1:])

    def _hooked_forward(self, xb: torch.Tensor, mb: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        """The full model on xb repeated per mask, the layer's output multiplied by the masks
        (per_row: xb once, row p multiplied by mask p)."""
        n, k = xb.shape[0], mb.shape[0]
        if per_row:
            n, k = 1, xb.shape[0]
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
            return self.model(xb if per_row else xb.repeat(k, *([1] * (xb.dim() - 1))))
        finally:
            handle.remove()

    def _count(self, logits: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """Correct predictions (argmax == label) per mask and class."""
        if logits.dim() != 3:
            raise UsageError(f"the model returns {tuple(logits.shape[1:])}; lesion accuracy needs logits [N, classes]")
        return self._tally(logits.argmax(dim=2) == yb.view(1, logits.shape[1]), yb)

    def _tally(self, right: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """[k, n] bool of correct predictions -> counts [k, num_classes]."""
        k, n = right.shape
        index = (torch.arange(k, device=yb.device).view(k, 1) * self.num_classes + yb.view(1, n))[right]
        return torch.bincount(index, minlength=k * self.num_classes).view(k, self.num_classes).cpu()


def _decided(logits: torch.Tensor, yb: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits [M, n, C]: (right, close), both [M, n] bool.

    close: the top-two gap is within tol * (1 + max |logit|) (exact ties included: gap 0);
    right: the label's logit is the top one and the row is not close, so the maximum is
    unique there and this is argmax == label. Reductions run over the classes laid out as
    the middle axis: over a short last axis they are several times slower.
    """
    lt = logits.transpose(1, 2).contiguous()                                # [M, C, n]
    top = lt.amax(dim=1, keepdim=True)
    is_top = lt == top
    second = lt.masked_fill(is_top, float("-inf")).amax(dim=1)
    top = top.squeeze(1)
    scale = 1 + torch.maximum(top.abs(), lt.amin(dim=1).abs())
    close = ((top - second) <= tol * scale) | (is_top.sum(dim=1) > 1)
    label = yb.view(1, 1, -1).expand(lt.shape[0], 1, lt.shape[2])
    right = (lt.gather(1, label).squeeze(1) == top) & ~close
    return right, close


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
    _relu_in_place(sg, senv[cut], modules)
    suffix = fx.GraphModule(gm, sg)
    return _Split(prefix, suffix, delta)


_FRESH_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _relu_in_place(graph: fx.Graph, lesioned: fx.Node, modules: dict[str, nn.Module]) -> None:
    """ReLUs of the suffix overwrite their input where nothing else can see it: the input is
    the lesioned tensor (always made fresh per call) or a linear/conv/batch-norm output, and
    the ReLU is its only reader. The suffix runs on masks x examples rows, so each saved
    allocation is megabytes."""
    for node in list(graph.nodes):
        is_relu = ((node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU)
                   or (node.op == "call_function" and node.target in (torch.relu, F.relu) and not node.kwargs))
        if not is_relu or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        fresh = source is lesioned or (source.op == "call_module" and isinstance(modules.get(source.target),
                                                                                 _FRESH_MODULES))
        if fresh and len(source.users) == 1:
            with graph.inserting_after(node):
                replacement = graph.call_function(torch.relu_, (source,))
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
    graph.lint()


@dataclass
class _LinearRows:
    """A linear delta layer's input and weight with units as rows ([U, n] and [U, out]), made
    once per batch: a lesion's units are then gathered as whole contiguous rows."""

    post_t: torch.Tensor
    weight_t: torch.Tensor
    bias: torch.Tensor | None

    @staticmethod
    def of(module: nn.Module, post: torch.Tensor) -> "_LinearRows | None":
        if not isinstance(module, nn.Linear) or post.dim() != 2:
            return None
        return _LinearRows(post.t().contiguous(), module.weight.t().contiguous(), module.bias)


def _delta_forward(module: nn.Module, post: torch.Tensor, z_full: torch.Tensor, keep: torch.Tensor,
                   rows_of: _LinearRows | None = None) -> torch.Tensor:
    """module(post * mask) for each mask: [M * n, ...]. Masks with equal silenced counts run as
    one batched product. A linear layer takes the cheaper side: z_full minus the product over
    the s silenced inputs, or, when more than half are silenced, bias plus the product over the
    kept ones; a conv always subtracts the silenced channels' contribution."""
    k = keep.shape[0]
    n = post.shape[0]
    units = keep.shape[1]
    if isinstance(module, nn.Linear) and rows_of is None:      # not [n, units]: the plain masked product
        shape = (k, 1, units) + (1,) * (post.dim() - 2)
        return module((post.unsqueeze(0) * keep.view(shape)).reshape(k * n, *post.shape[1:]))
    out = torch.empty((k, *z_full.shape), dtype=z_full.dtype, device=z_full.device)
    silenced = keep == 0
    counts = silenced.sum(dim=1)
    for size in torch.unique(counts).tolist():
        rows = torch.nonzero(counts == size).flatten()
        r = rows.numel()
        if size == 0:
            out[rows] = z_full
            continue
        if rows_of is not None:
            from_kept = size > units - size
            chosen = ~silenced[rows] if from_kept else silenced[rows]
            width = units - size if from_kept else size
            idx = torch.nonzero(chosen)[:, 1].view(r, width)                # [r, width] sorted units
            h = rows_of.post_t[idx].transpose(1, 2)                          # [r, n, width] (a view)
            w = rows_of.weight_t[idx]                                        # [r, width, out]
            if not from_kept:
                part = torch.baddbmm(z_full.unsqueeze(0).expand(r, *z_full.shape), h, w, alpha=-1.0)
            elif width == 0:
                part = (rows_of.bias if rows_of.bias is not None else z_full.new_zeros(())).expand(r, *z_full.shape)
            elif rows_of.bias is not None:
                part = torch.baddbmm(rows_of.bias.expand(r, *z_full.shape), h, w)
            else:
                part = torch.bmm(h, w)
        else:  # conv2d, groups=1: the silenced input channels alone, all masks as one grouped conv
            idx = torch.nonzero(silenced[rows])[:, 1].view(r, size)
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
