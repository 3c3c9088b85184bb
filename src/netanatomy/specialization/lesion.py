"""Accuracy of a model with sets of one layer's units silenced, many sets per pass.

**What is silenced.** A unit's output is its activation (DESIGN.md, "Importance"). Exactly:
start at the conv or linear call; follow the batch norms that directly follow it (each the
only reader of the step before: per-channel affine maps before the nonlinearity); then follow
ONE nonlinearity if it directly follows (the only reader); stop there. That tensor's channels
are set to 0, and whatever reads it (a batch norm after the nonlinearity, pooling, dropout, the
next conv, a residual sum) processes the 0 as any value. With no nonlinearity it is the layer's
own output (after its batch norms). Both evaluation paths zero this same tensor: the traced
path cuts the graph there (`_follow_post`), the hook path hooks the layer map's post-activation
term (`Layer.post`, which models/layers.py finds by the same rule); tests/test_lesion_paths.py
checks the two against each other on a zoo of architectures.

**Speed.** Two facts make many lesions cheap:
- nothing below the lesioned layer changes, so the model is split with torch.fx at that
  tensor: the prefix runs once per batch of data, and only the suffix runs per lesion;
- many lesions are many masks: M masks over n examples become one suffix pass over M*n rows.
When the lesioned values feed a linear layer (or a conv with groups=1) and nothing else, that
layer is moved into the prefix too: with z = W h + b computed once, a lesion of the units S
gives z - W[:, S] h[S], a product over |S| inputs instead of all of them ("delta" mode; the
result equals the masked forward up to float rounding; `exact=True` turns it off).
Models that fx cannot split run a forward hook that multiplies the layer's output by the
masks on the full network (still M masks per pass). That fallback is taken only on a known
tracing failure (torch.fx's TraceError, its "not supported in symbolic tracing" errors, or the
UsageError of `_split_at`: a module called more than once, a forward with several inputs);
any other exception propagates. `method` says which path runs ("fx-delta", "fx" or "hook"),
`fallback_reason` why the hook runs.

**The model is never changed.** Evaluation runs with every submodule in eval mode, and each
module's own training flag is put back afterwards; every tensor the suffix may write in place
is fresh (never a view of a parameter, of a prefix value reused by the next group of masks, or
of a tensor with overlapping memory); the fx graphs share the model's modules but not its
tensors' storage.

**Mixed precision** (`refine=True`, as `importance` runs it): the lesions run in the model's
float32 and the counts are meant to be those of a float64 evaluation (the float64 twin: a
float64 copy of the model on the float64 data). `precision` reports which of two modes ran
and what it checked. `precision="auto"` (the default) certifies models without convolutions
and samples the others: a certified run needs the prefix in float64, and float64
convolutions on a CPU (no oneDNN) plus the looser conv bounds made certified runs of
zoo:minception-fmnist 1.5-2.5x slower than sampled ones; `precision="certified"` certifies a
conv model anyway (the bounds cover convs), `precision="sampled"` samples any model.
- "certified": an fx split, a float32 model on a CPU whose float32 matmuls and convolutions
  are IEEE (torch's "highest" matmul precision, oneDNN without reduced-precision fp32 math;
  NNPACK, whose Winograd/FFT convolutions the bound does not cover, is switched off for the
  run), and a suffix made only of the operations `_Bounds` knows (linear, conv, batch norm at
  evaluation, ReLU, max/average pooling, means, flatten/view, dropout/identity, sums and
  concatenations of computed tensors, arithmetic with constants). The prefix runs once per
  batch of data on the twin, in float64, and is rounded to float32, so the suffix starts within
  half an ulp of float64's values (for the delta layer this is what keeps the bound tight: its
  z = W h + b comes from float64). Each row (mask, example) then carries a rigorous bound of
  its float32 error in the 2-norm, propagated op by op: for y = W h + b over n inputs,
  |err_y| <= ||W||_2 |err_h| + gamma_{n+1} (|||W|||_2 |h| + |b|), gamma_n = n u / (1 - n u),
  u = 2^-24 (spectral norms from eigenvalues of the Gram matrix in float64; a conv uses an
  operator-norm bound over its kernel offsets; ReLU and max pooling do not increase the error;
  batch norm scales it by max |scale|; `_Bounds` lists every rule). At the last linear layer,
  the gap between the top logit t and any other j moves by at most ||W_t - W_j|| |err_h| +
  r_t + r_j (r_i: logit i's own rounding); a row is decided when its top-two gap exceeds the
  largest of these for its top class, times 1 + 2^-10 (room for float64's own rounding and for
  the float32 arithmetic of the bound). A decided row's class is that of exact arithmetic on
  the float64 prefix values, hence the twin's; every other row is recomputed on the twin in
  float64 (in one batched float64 pass when more than a quarter of a batch's rows are
  undecided). This is sound, not a heuristic, as far as torch's kernels compute each sum in
  float32 in some order (the standard model of floating-point arithmetic). A step whose bound
  needs real shapes (a linear layer on a 3-d tensor) is checked on the first batch, which then
  switches to "sampled" and says why. A seeded sample of
  64 decided rows per batch of data is still recomputed in float64 as a self-test: a
  disagreement would be a bug; it is reported and recovered by recomputing the batch.
- "sampled": every other case (the hook path, suffixes with other operations, GPUs, other
  dtypes). No bound is claimed: rows whose top-two gap is within `refine_tol * (1 + max
  |logit|)` are recomputed in float64 (a heuristic: large cancelling activations can move a
  float32 logit by more), and a seeded random sample of max(64, 1%) of each batch's rows is
  recomputed in float64 on every run; any disagreement on a decided row recomputes that whole
  batch (every mask) in float64. A miss can still go unseen where it is rare (a sample of 1%
  misses a single wrong row 99 times in 100); `precision` gives the rows checked and the
  disagreements found, so a report can say how far the counts were checked.
"""
from __future__ import annotations

import copy
import math
import operator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.proxy import TraceError
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import UsageError
from ..models.layers import Layer, Tracer
from ..models.layout import channels_last, prefers_channels_last
from ..util.devices import ieee_float32, one_thread
from ..util.seeding import derive

# What a unit's output is (see the module docstring): the kinds of steps come from the one list
# in models/dataflow.py, shared with layer discovery, the weight graph and layer wiring.
from ..models.dataflow import ACTIVATION_FUNCTIONS as _ACTIVATION_FUNCTIONS  # noqa: E402
from ..models.dataflow import ACTIVATION_METHODS as _ACTIVATION_METHODS  # noqa: E402
from ..models.dataflow import ACTIVATION_MODULES as _ACTIVATION_MODULES  # noqa: E402
from ..models.dataflow import AFFINE_FUNCTIONS as _AFFINE_FUNCTIONS  # noqa: E402
from ..models.dataflow import AFFINE_MODULES as _AFFINE_MODULES  # noqa: E402
from ..models.dataflow import IDENTITY_MODULES as _TRANSPARENT_MODULES  # noqa: E402

_CHECK_ROWS = 64         # rows of each batch recomputed in float64 as a check (at least)
_CHECK_FRACTION = 0.01   # ... and at least this fraction of them in "sampled" mode
_WHOLE_BATCH = 0.25      # more undecided rows than this fraction: the batch in float64, batched


@dataclass
class _Split:
    prefix: fx.GraphModule     # x -> tuple of the values the suffix needs (the post value first)
    suffix: fx.GraphModule     # those values -> model output
    delta: nn.Module | None    # the linear/conv that alone reads the post value (delta mode)


@contextmanager
def _evaluation(*models: nn.Module):
    """Every submodule in eval mode for the duration; each module's own flag put back after."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _is_trace_failure(exc: BaseException) -> bool:
    """The failures that mean "fx cannot split this model" (the hook path then runs)."""
    if isinstance(exc, (TraceError, UsageError)):
        return True
    return isinstance(exc, RuntimeError) and "symbolic trac" in str(exc)


class LesionEvaluator:
    """Per-class correct counts of `model` on (x, y) with masks over one layer's units.

    masks [M, U]: 1 keeps a unit, 0 silences it. The data stays on `device` in chunks of
    `batch_size` examples; the suffix runs on as many masks at once as keep its first tensor
    near `chunk_elements` values (a few MB: elementwise steps stay in cache).
    """

    def __init__(self, model: nn.Module, layer: Layer, x: torch.Tensor, y: torch.Tensor, *,
                 num_classes: int | None = None, batch_size: int = 1000, chunk_elements: int = 1 << 20,
                 device: str | torch.device | None = None, method: str = "auto", exact: bool = False,
                 refine: bool = False, refine_tol: float = 1e-3, check_seed: int = 0, precision: str = "auto"):
        if method not in ("auto", "fx", "hook"):
            raise UsageError(f"lesion method must be auto, fx or hook, not {method!r}")
        if precision not in ("auto", "certified", "sampled"):
            raise UsageError(f"lesion precision must be auto, certified or sampled, not {precision!r}")
        self.model = model
        self.layer = layer
        self.device = torch.device(device) if device is not None else next(
            (p.device for p in model.parameters()), torch.device("cpu"))
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        self.dtype = param.dtype if param is not None else torch.float32
        self.x = x.to(param.dtype) if param is not None and x.is_floating_point() else x
        self.y = torch.as_tensor(y).long()
        if self.y.numel() and int(self.y.min()) < 0:
            raise UsageError("lesion accuracy needs labelled data (labels >= 0)")
        self.num_classes = int(num_classes or (int(self.y.max()) + 1 if self.y.numel() else 1))
        self.batch_size, self.chunk_elements = int(batch_size), int(chunk_elements)
        self.class_totals = torch.bincount(self.y, minlength=self.num_classes).cpu()
        self.split: _Split | None = None
        self.fallback_reason: str | None = None
        self._hook_term = None
        if model._forward_pre_hooks_with_kwargs and method == "auto":
            method = "hook"  # root pre-hooks that take kwargs: only the real forward runs them faithfully
            self.fallback_reason = "the model has forward pre-hooks that take keyword arguments"
        with _evaluation(model):
            if method in ("auto", "fx") and layer.module:
                try:
                    self.split = _split_at(model, layer.module, allow_delta=not exact)
                except Exception as exc:
                    if method == "fx" or not _is_trace_failure(exc):
                        raise
                    self.fallback_reason = f"{type(exc).__name__}: {exc}"
            elif method == "fx":
                raise UsageError(f"layer {layer.name} is not one module's output; use the hook method")
            elif not layer.module:
                self.fallback_reason = f"layer {layer.name} is not one module's output"
            if self.split is None:
                self._hook_term = _hook_term(layer)
            self.refine_tol = float(refine_tol)
            self.check_seed = int(check_seed)
            self._twin: LesionEvaluator | None = None
            self._bounds: _Bounds | None = None
            self.precision_mode = "float64" if self.dtype == torch.float64 else "off"
            self.precision_reason: str | None = None
            self.refined_rows = self.checked_rows = self.disagreements = self.recomputed_batches = 0
            if refine and param is not None and self.dtype != torch.float64:
                twin_model = copy.deepcopy(model).double()
                self._twin = LesionEvaluator(twin_model, layer, x.double(), y, num_classes=self.num_classes,
                                             batch_size=batch_size, chunk_elements=chunk_elements, device=device,
                                             method="hook" if self.split is None else "fx", exact=exact)
                self._bounds, self.precision_reason = self._certify(precision)
                self.precision_mode = "certified" if self._bounds is not None else "sampled"

    @property
    def method(self) -> str:
        return "hook" if self.split is None else ("fx-delta" if self.split.delta is not None else "fx")

    @property
    def precision(self) -> dict[str, Any]:
        """How the counts were made exact: the mode ("certified", "sampled", "float64" for a
        float64 model, "off" without refinement), why a mode that is not certified was chosen,
        and, over every `correct` call so far, the rows recomputed in float64 as near-ties, the
        decided rows checked in float64, the disagreements found and the batches recomputed."""
        return {"mode": self.precision_mode, "reason": self.precision_reason, "refined_rows": self.refined_rows,
                "checked_rows": self.checked_rows, "disagreements": self.disagreements,
                "recomputed_batches": self.recomputed_batches}

    def _models(self) -> tuple[nn.Module, ...]:
        return (self.model, *((self._twin.model,) if self._twin is not None else ()))

    def correct(self, masks: torch.Tensor) -> torch.Tensor:
        """Correct predictions per mask and class: int64 [M, num_classes]."""
        masks = torch.as_tensor(masks)
        if masks.dim() != 2 or masks.shape[1] != self.layer.units:
            raise UsageError(f"masks must be [M, {self.layer.units}] for layer {self.layer.name}")
        out = torch.zeros((masks.shape[0], self.num_classes), dtype=torch.long)
        with torch.no_grad(), _evaluation(*self._models()), ExitStack() as stack:
            stack.enter_context(ieee_float32(self.device))   # no TF32: the counts must be float64's
            for model in self._models():
                stack.enter_context(channels_last(model, enabled=prefers_channels_last(model, self.device)))
            if self._bounds is not None:
                stack.enter_context(torch.backends.nnpack.flags(enabled=False))
            for start in range(0, self.x.shape[0], self.batch_size):
                yb = self.y[start:start + self.batch_size].to(self.device)
                if self._twin is None:
                    xb = self.x[start:start + self.batch_size].to(self.device)
                    for m0, logits in self._outputs(xb, masks):
                        out[m0:m0 + logits.shape[0]] += self._count(logits, yb)
                else:
                    out += self._refined_batch(start, yb, masks)
        return out

    # -- mixed precision -------------------------------------------------------------------------

    def _certify(self, precision: str) -> tuple["_Bounds | None", str | None]:
        """The error bounds of the suffix, or None and why the sampled mode runs instead.

        "auto" certifies models without convolutions: their float64 prefix costs about twice
        the float32 one. With convolutions the float64 prefix (no oneDNN for float64 on a CPU)
        and the looser conv bounds made certified runs 1.5-2.5x slower than sampled ones on
        zoo:minception-fmnist, so "auto" samples there; precision="certified" asks for it anyway."""
        if precision == "sampled":
            return None, "sampled mode was asked for"
        if precision == "auto" and any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in self.model.modules()):
            return None, ("auto: a model with convolutions samples (its float64 prefix is slow on a CPU); "
                          "precision='certified' certifies it")
        if self.split is None:
            return None, "hook path: no traced suffix to bound"
        if self.dtype != torch.float32:
            return None, f"bounds are derived for float32 models, not {self.dtype}"
        if self.device.type != "cpu":
            return None, f"bounds assume IEEE float32 arithmetic; on {self.device.type} TF32 and cuDNN's algorithms may not be"
        if torch.get_float32_matmul_precision() != "highest":
            return None, f"float32 matmul precision is {torch.get_float32_matmul_precision()!r}"
        mkldnn = getattr(torch.backends, "mkldnn", None)
        for part in ("matmul", "conv"):
            setting = getattr(getattr(mkldnn, part, None), "fp32_precision", "none")
            if setting not in ("none", "ieee"):
                return None, f"oneDNN {part} fp32 precision is {setting!r}"
        try:
            # static checks here; shape-dependent ones (a linear layer on a 3-d tensor) on the first
            # batch, which then switches to "sampled" (see _refined_batch)
            return _Bounds(self.split, self.layer.units), None
        except _Unbounded as exc:
            return None, str(exc)

    def _refined_batch(self, start: int, yb: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Counts of one batch of data that equal a float64 evaluation's (see the module docstring)."""
        twin = self._twin
        M, n = masks.shape[0], yb.shape[0]
        counts = torch.zeros((M, self.num_classes), dtype=torch.long)
        certified = self._bounds is not None
        sample = self._sample(start, M, n, certified)
        s_top = torch.zeros(sample.numel(), dtype=torch.long)
        s_close = torch.ones(sample.numel(), dtype=torch.bool)     # rows not seen below are not checked
        prefix64 = None
        if certified:
            x64 = twin.x[start:start + self.batch_size].to(self.device)
            prefix64 = twin.split.prefix(_root_pre_hooks(twin.model, x64))
            groups = self._certified_outputs(prefix64, masks, self._bounds)
        else:
            xb = self.x[start:start + self.batch_size].to(self.device)
            groups = ((m0, logits, None, None) for m0, logits in self._outputs(xb, masks))
        ties_m, ties_e = [], []
        try:
            for m0, logits, top, close in groups:
                self._tally_group(m0, logits, top, close, yb, n, certified, sample, s_top, s_close, ties_m, ties_e,
                                  counts)
        except _Unbounded as exc:   # a step without a bound only shows on real shapes: sample instead
            self._bounds, self.precision_mode, self.precision_reason = None, "sampled", str(exc)
            return self._refined_batch(start, yb, masks)
        return self._finish_batch(start, yb, masks, counts, sample, s_top, s_close, ties_m, ties_e, prefix64)

    def _tally_group(self, m0, logits, top, close, yb, n, certified, sample, s_top, s_close, ties_m, ties_e,
                     counts) -> None:
        """Count one group of masks' decided rows; note its undecided rows and its sampled rows."""
        if logits.dim() != 3 or logits.shape[2] < 2:
            counts[m0:m0 + logits.shape[0]] += self._count(logits, yb)
            return
        k = logits.shape[0]
        if certified:
            right = (top == yb.view(1, n)) & ~close
        else:
            right, close = _decided(logits, yb, self.refine_tol)
        lo, hi = (int(i) for i in torch.searchsorted(sample, torch.tensor([m0 * n, (m0 + k) * n])))
        if hi > lo:
            flat = sample[lo:hi] - m0 * n
            mi, ei = (flat // n).to(logits.device), (flat % n).to(logits.device)
            s_close[lo:hi] = close[mi, ei].cpu()
            s_top[lo:hi] = (top[mi, ei] if top is not None else logits[mi, ei].argmax(dim=-1)).cpu()
        mi, ei = torch.nonzero(close, as_tuple=True)
        ties_m.append((mi + m0).cpu())
        ties_e.append(ei.cpu())
        counts[m0:m0 + k] += self._tally(right, yb)

    def _finish_batch(self, start, yb, masks, counts, sample, s_top, s_close, ties_m, ties_e, prefix64):
        """One float64 pass over the undecided rows and the decided rows of the sample."""
        M, n = masks.shape[0], yb.shape[0]
        checked = sample[~s_close]
        tie_m = torch.cat(ties_m) if ties_m else torch.zeros(0, dtype=torch.long)
        tie_e = torch.cat(ties_e) if ties_e else torch.zeros(0, dtype=torch.long)
        if tie_m.numel() > _WHOLE_BATCH * M * n:   # cheaper as one batched float64 pass
            self.refined_rows += tie_m.numel()
            self.recomputed_batches += 1
            return self._float64_counts(start, yb, masks)
        mi = torch.cat([tie_m, checked // n])
        ei = torch.cat([tie_e, checked % n])
        if mi.numel() == 0:
            return counts
        pred = self._float64_predictions(masks, mi, ei, start, prefix64)
        ties = tie_m.numel()
        right = pred[:ties] == yb.cpu()[tie_e]
        flat = (tie_m * self.num_classes + yb.cpu()[tie_e])[right]
        counts += torch.bincount(flat, minlength=counts.numel()).view_as(counts)
        self.refined_rows += ties
        disagree = int((pred[ties:] != s_top[~s_close]).sum())
        self.checked_rows += int(checked.numel())
        self.disagreements += disagree
        if disagree:  # a float32 decision was wrong: this whole batch in float64, every mask
            self.recomputed_batches += 1
            return self._float64_counts(start, yb, masks)
        return counts

    def _float64_counts(self, start: int, yb: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One batch of data under every mask on the float64 twin, batched (delta mode included)."""
        twin = self._twin
        counts = torch.zeros((masks.shape[0], self.num_classes), dtype=torch.long)
        x64 = twin.x[start:start + self.batch_size].to(twin.device)
        for m0, logits in twin._outputs(x64, masks):
            counts[m0:m0 + logits.shape[0]] += twin._count(logits, yb)
        return counts

    def _sample(self, start: int, M: int, n: int, certified: bool) -> torch.Tensor:
        """Sorted flat indices (mask * n + example) of the rows of one batch checked in float64."""
        total = M * n
        count = min(total, _CHECK_ROWS if certified else max(_CHECK_ROWS, math.ceil(_CHECK_FRACTION * total)))
        if count == 0:
            return torch.zeros(0, dtype=torch.long)
        g = torch.Generator().manual_seed(derive(self.check_seed, "lesion-check", self.layer.name, start))
        if total <= 1 << 16 or 4 * count > total:
            rows = torch.randperm(total, generator=g)[:count]
        else:
            rows = torch.randint(total, (count,), generator=g).unique()
        return rows.sort().values

    def _float64_predictions(self, masks: torch.Tensor, mask_idx: torch.Tensor, example_idx: torch.Tensor,
                             start: int, prefix64: tuple | None, rows: int = 4096) -> torch.Tensor:
        """The float64 twin's class for (mask, example) pairs of a batch (cpu int64 [P]), in a
        few row-wise passes, each row its own example and mask; `prefix64` is the batch's
        float64 prefix when it is at hand (then only the suffix runs)."""
        twin = self._twin
        out = []
        for r0 in range(0, mask_idx.numel(), rows):
            mi, ei = mask_idx[r0:r0 + rows], example_idx[r0:r0 + rows]
            row_masks = masks[mi].to(twin.device, torch.float64)
            if prefix64 is not None:
                index = ei.to(twin.device)
                logits = twin._row_outputs(None, row_masks, values=[v[index] for v in prefix64])
            else:
                logits = twin._row_outputs(twin.x[start + ei].to(twin.device), row_masks)
            out.append(logits.argmax(dim=1).cpu())
        return torch.cat(out)

    def _certified_outputs(self, prefix64, masks: torch.Tensor, bounds: "_Bounds"):
        """Yields (first mask index, logits [k, n, C], top class [k, n], undecided [k, n]) with
        the float64 twin's prefix values rounded to float32 and the suffix in float32 under
        error bounds."""
        split = self.split
        values = [v.to(self.dtype) for v in prefix64]
        post, rest = values[0], values[1:]
        z_full = rest.pop(0) if split.delta is not None else None
        n = post.shape[0]
        hsq_t = _unit_squares(post).t().contiguous()              # [U, n]
        z_norm = _row_norm(z_full) if z_full is not None else None
        rest_err = [_U1 * _row_norm(v) for v in rest]
        rows = _LinearRows.of(split.delta, post) if split.delta is not None else None
        if isinstance(split.delta, nn.Linear) and rows is None:
            raise _Unbounded("the delta layer reads the units along another axis than its features")
        # every mask's first-tensor bounds at once: one small product per batch, not per group
        e_all = bounds.first_error(bounds.mask_coefficients(masks), masks.to(self.device, post.dtype), hsq_t, z_norm)
        for m0, mb, first in self._firsts(post, z_full, rows, masks):
            k = mb.shape[0]
            e_first = e_all[m0:m0 + k].reshape(k * n)
            others = [_per_mask(v, k) for v in rest]
            logits, top, close = bounds.run([first, *others], [e_first, *(e.repeat(k) for e in rest_err)])
            yield m0, logits.view(k, n, *logits.shape[1:]), top.view(k, n), close.view(k, n)

    # -- evaluation ------------------------------------------------------------------------------

    def _row_outputs(self, xb: torch.Tensor | None, row_masks: torch.Tensor, values=None) -> torch.Tensor:
        """Model outputs [P, ...] with example p's layer output multiplied by row_masks[p]:
        the plain masked forward (no delta arithmetic), for the few rows that need it.
        `values`: the prefix's outputs for these rows, when they are at hand (then xb is unused)."""
        if self.split is None:
            return self._hooked_forward(xb, row_masks, per_row=True)
        split = self.split
        if values is None:
            values = split.prefix(_root_pre_hooks(self.model, xb))
        post, rest = values[0], [v.clone() for v in values[1:]]
        if split.delta is not None:
            rest.pop(0)
        masked = post * row_masks.view(*row_masks.shape, *(1,) * (post.dim() - 2))
        first = split.delta(masked) if split.delta is not None else masked
        return split.suffix(first, *rest)

    def outputs(self, xb: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Model outputs for one batch under every mask: [M, n, ...] (for checks and custom statistics)."""
        masks = torch.as_tensor(masks)
        with torch.no_grad(), _evaluation(self.model):
            out = list(self._outputs(xb.to(self.device, self.x.dtype), masks))
        return torch.cat([o for _, o in out], dim=0)

    def _per_mask(self, n: int) -> int:
        per_example = max(1, int(torch.Size(self.layer.out_shape).numel()))
        return max(1, self.chunk_elements // max(n * per_example, 1))

    def _firsts(self, post: torch.Tensor, z_full: torch.Tensor | None, rows: "_LinearRows | None",
                masks: torch.Tensor):
        """Yields (first mask index, masks [k, U], the suffix's first tensor [k * n, ...]), a
        fresh tensor every time (the suffix may overwrite it)."""
        n = post.shape[0]
        per_mask = self._per_mask(n)
        for m0 in range(0, masks.shape[0], per_mask):
            mb = masks[m0:m0 + per_mask].to(self.device, post.dtype)
            k = mb.shape[0]
            if self.split.delta is None:
                shape = (k, 1, mb.shape[1]) + (1,) * (post.dim() - 2)
                first = (post.unsqueeze(0) * mb.view(shape)).reshape(k * n, *post.shape[1:])
            else:
                first = _delta_forward(self.split.delta, post, z_full, mb, rows)
            yield m0, mb, first

    def _outputs(self, xb: torch.Tensor, masks: torch.Tensor):
        """Yields (first mask index, outputs [k, n, ...]) for consecutive groups of masks."""
        n = xb.shape[0]
        if self.split is None:
            per_mask = self._per_mask(n)
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
        for m0, mb, first in self._firsts(post, z_full, rows, masks):
            k = mb.shape[0]
            others = [_per_mask(v, k) for v in rest]
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


def _per_mask(v: torch.Tensor, k: int) -> torch.Tensor:
    """A prefix value [n, ...] repeated for k masks ([k * n, ...]), always a copy of its own, so
    an in-place step of the suffix cannot write into a value the next group of masks reads
    (expand + reshape is a view when k or n is 1). The copy keeps v's memory layout
    (channels-last convs and pools are several times faster)."""
    out = v.unsqueeze(0).expand(k, *v.shape).reshape(k * v.shape[0], *v.shape[1:])
    if out._is_view() or out.data_ptr() == v.data_ptr():
        out = out.clone()
    return out


def _decided(logits: torch.Tensor, yb: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits [M, n, C]: (right, close), both [M, n] bool ("sampled" mode's heuristic).

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
    close = ((top - second) <= tol * scale) | (is_top.sum(dim=1) > 1) | ~torch.isfinite(top)
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


def _is_affine(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _AFFINE_MODULES)
    return node.op == "call_function" and node.target in _AFFINE_FUNCTIONS


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _follow_post(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """From a conv/linear call to the node holding its units' outputs: through the batch norms
    that directly follow it, then one nonlinearity if it directly follows, each the only reader
    of the step before (see the module docstring). Nothing after that nonlinearity (a second
    batch norm, pooling, dropout) is part of the unit."""
    user = _only_user(node)
    while user is not None and _is_affine(user, modules):
        node, user = user, _only_user(user)
    if user is not None and _is_activation(user, modules):
        node = user
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
    gm = fx.GraphModule(model, Tracer().trace(model))  # raises what torch.fx raises
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
    the lesioned tensor (always made fresh per call) or the output of a linear/conv/batch-norm
    module of exactly those types (a new tensor per call), and the ReLU is its only reader. The
    suffix runs on masks x examples rows, so each saved allocation is megabytes."""
    for node in list(graph.nodes):
        is_relu = ((node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU)
                   or (node.op == "call_function" and node.target in (torch.relu, F.relu) and not node.kwargs))
        if not is_relu or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        fresh = source is lesioned or (source.op == "call_module" and type(modules.get(source.target))
                                       in _FRESH_MODULES)
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
    """module(post * mask) for each mask: [M * n, ...], always a fresh tensor. Masks with equal
    silenced counts run as one batched product. A linear layer takes the cheaper side: z_full
    minus the product over the s silenced inputs, or, when more than half are silenced, bias
    plus the product over the kept ones; a conv always subtracts the silenced channels'
    contribution."""
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
            width = units - size if from_kept else size
            if from_kept and width == 0:   # every unit silenced: the bias alone (written, never a view of it)
                if rows_of.bias is None:
                    out[rows] = 0
                else:
                    out[rows] = rows_of.bias.expand(r, *z_full.shape)
                continue
            chosen = ~silenced[rows] if from_kept else silenced[rows]
            idx = torch.nonzero(chosen)[:, 1].view(r, width)                # [r, width] sorted units
            h = rows_of.post_t[idx].transpose(1, 2)                          # [r, n, width] (a view)
            w = rows_of.weight_t[idx]                                        # [r, width, out]
            if not from_kept:
                part = torch.baddbmm(z_full.unsqueeze(0).expand(r, *z_full.shape), h, w, alpha=-1.0)
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
            out = part    # a new tensor (the result of a product or a subtraction)
        else:
            out[rows] = part
    return out.reshape(k * n, *z_full.shape[1:])


# ---------------------------------------------------------------------------------------------
# Error bounds of a float32 suffix ("certified" mixed precision; see the module docstring)
#
# Every bound is on the 2-norm of one row's error (a float32 tensor [rows]); a row is one
# (mask, example) pair. The reference is exact arithmetic on the float64 prefix values and the
# model's float32 parameters (which float64 holds exactly). The quantities computed in float32
# to build a bound (norms, sums of squares) are inflated by their own worst-case rounding;
# the bound's own arithmetic (a few dozen float32 operations per row, each within u of the
# exact result: relative error < 1e-5) is covered by _MARGIN, as is float64's rounding of
# the reference. Overflow gives inf and NaN, which leave a row undecided.

_U = 2.0 ** -24                    # unit roundoff of float32
_U1 = _U / (1 - _U)                # |fl(x) - x| <= _U1 |fl(x)|
_TINY = 2.0 ** -100                # per element: room for underflow (flush-to-zero included)
_MARGIN = 1 + 2.0 ** -10           # room for float64's rounding and for the bound's own arithmetic
_BN_ROUNDINGS = 10                 # roundings per element of batch norm at evaluation (7 in torch's kernels)
_MAX_GRAM = 4096                   # larger matrices: no bound (their norms would take minutes)


class _Unbounded(Exception):
    """An operation of the suffix has no float32 error bound here."""


def _gamma(n):
    """gamma_n = n u / (1 - n u), for a count or a tensor of counts."""
    if isinstance(n, torch.Tensor):
        nu = n.double() * _U
        return torch.where(nu < 0.5, nu / (1 - nu), torch.full_like(nu, math.inf))
    nu = n * _U
    return nu / (1 - nu) if nu < 0.5 else math.inf


def _norm_slack(length: int) -> tuple[float, float]:
    """(factor, floor): the exact 2-norm of a row of `length` float32 values is at most factor *
    (torch's float32 norm) + floor (rounding of the squares and their sum; squares that
    underflow, flush-to-zero included)."""
    return 1 + _gamma(length + 2), math.sqrt(length) * 2.0 ** -63


def _raw_norm(t: torch.Tensor) -> torch.Tensor:
    """torch's float32 2-norm of each row (see _norm_slack for the exact norm's bound)."""
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim()))) if t.dim() > 1 else t.abs()


def _row_norm(t: torch.Tensor) -> torch.Tensor:
    """Upper bounds of the rows' exact 2-norms (float32 [rows])."""
    factor, floor = _norm_slack(max(1, t[0].numel()) if t.shape[0] else 1)
    return _raw_norm(t).mul_(factor).add_(floor)


def _unit_squares(post: torch.Tensor) -> torch.Tensor:
    """Upper bounds of each (example, unit)'s sum of squares over its map: float32 [n, U]."""
    sq = post.square()
    length = 1
    if post.dim() > 2:
        sq = sq.sum(dim=tuple(range(2, post.dim())))
        length = post[0, 0].numel() if post.numel() else 1
    return sq.float().mul_(1 + 2 * _gamma(length + 1)).add_(length * 2.0 ** -126)


_NORMS = WeakIdKeyDictionary()   # parameter -> (stamp, {key: norms}); tensors compare by identity


def _spectral(weight: torch.Tensor, key: str, matrices) -> torch.Tensor:
    """Upper bounds of the largest singular values of `matrices(weight)` ([..., m, k]), float64,
    from the eigenvalues of the smaller Gram matrix (its products are exact in float64);
    cached per parameter tensor and version."""
    stamp = (weight._version, weight.data_ptr(), tuple(weight.shape), weight.dtype)
    entry = _NORMS.get(weight)
    if entry is None or entry[0] != stamp:
        entry = (stamp, {})
        _NORMS[weight] = entry
    if key not in entry[1]:
        a = matrices(weight.detach().to("cpu", torch.float64))
        if a.shape[-1] > a.shape[-2]:
            a = a.transpose(-1, -2)
        if a.shape[-1] > _MAX_GRAM:
            raise _Unbounded(f"a {a.shape[-2]}x{a.shape[-1]} weight is too large to bound its norm")
        gram = a.transpose(-1, -2) @ a
        with one_thread():   # LAPACK's threaded eigensolver stalls on busy machines (1.5 s vs 3 ms)
            top = torch.linalg.eigvalsh(gram)[..., -1].clamp(min=0)
        # eigvalsh is backward stable: |error| <= p(k) u64 ||gram||, far below 1e-9 of the trace
        entry[1][key] = (top * (1 + 1e-9) + 1e-9 * gram.diagonal(dim1=-2, dim2=-1).sum(-1)).sqrt() * (1 + 1e-12)
    return entry[1][key]


def _linear_norms(m: nn.Module) -> tuple[float, float]:
    """(||W||_2, |||W|||_2) upper bounds of a linear layer's weight."""
    return (float(_spectral(m.weight, "w", lambda w: w)), float(_spectral(m.weight, "|w|", torch.abs)))


def _conv_norms(m: nn.Module) -> tuple[float, float]:
    """Upper bounds of the operator 2-norms of a zero-padded conv with W and with |W|: the conv
    is a sum over kernel offsets o of a channel map W_o followed by an injective selection of
    positions (norm <= 1), so its norm is at most min(sum_o s_o, sqrt(K sum_o s_o^2)), s_o =
    ||W_o||_2; groups make it block-diagonal (the largest block's)."""
    g = m.groups
    out, cin = m.weight.shape[:2]
    kernel = int(torch.Size(m.weight.shape[2:]).numel())

    def blocks(w: torch.Tensor) -> torch.Tensor:
        return w.reshape(g, out // g, cin, kernel).permute(0, 3, 1, 2)      # [g, K, out/g, cin]

    result = []
    for key, fn in (("conv", blocks), ("|conv|", lambda w: blocks(w.abs()))):
        s = _spectral(m.weight, key, fn)                                    # [g, K]
        per_group = torch.minimum(s.sum(1), (kernel * s.square().sum(1)).sqrt())
        result.append(float(per_group.max()) * (1 + 1e-12))
    return result[0], result[1]


def _pool_overlap(kernel, stride, dilation) -> int:
    """How many pooling windows can contain one input position (per dim: min(k, (k-1)d // s + 1))."""
    c = 1
    for k, s, d in zip(kernel, stride, dilation):
        c *= min(k, (k - 1) * d // s + 1)
    return c


def _tuple(v, nd: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * nd


def _f64(t: torch.Tensor | None, like: torch.Tensor | None = None) -> torch.Tensor:
    if t is None:
        return torch.zeros_like(like.detach(), dtype=torch.float64)
    return t.detach().to("cpu", torch.float64)


_SAME_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, operator.neg, torch.neg}
_CONSTANT_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_SAME_METHODS = {"relu", "relu_", "contiguous", "clone", "detach", "neg"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_AUX_METHODS = {"size", "dim"}
_ADD = {operator.add, torch.add, operator.iadd, operator.sub, torch.sub, operator.isub}
_MUL = {operator.mul, torch.mul, operator.imul, operator.truediv, torch.div, operator.itruediv}
_DIVIDE = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_METHOD_ARITH = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ADAPTIVE_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_MAX_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_POOL_FUNCTIONS = {F.max_pool1d: ("maxpool", _MAX_ARGS), F.max_pool2d: ("maxpool", _MAX_ARGS),
                   F.max_pool3d: ("maxpool", _MAX_ARGS), torch.max_pool1d: ("maxpool", _MAX_ARGS),
                   torch.max_pool2d: ("maxpool", _MAX_ARGS), torch.max_pool3d: ("maxpool", _MAX_ARGS),
                   F.avg_pool1d: ("avgpool", _AVG_ARGS), F.avg_pool2d: ("avgpool", _AVG_ARGS),
                   F.avg_pool3d: ("avgpool", _AVG_ARGS), torch.avg_pool1d: ("avgpool", _AVG_ARGS)}


def _plain_forward(m: nn.Module, base: type) -> bool:
    return type(m).forward is base.forward


class _Bounds:
    """Runs a traced suffix node by node in float32 and bounds each row's error (see above).

    Rules, per row (e: the input's error bound, |h| the input's norm, |y| the output's):
    - linear, n inputs: ||W||_2 e + gamma_{n+1} (|||W|||_2 |h| + ||b||);
    - conv (zero padding; groups): N(W) e + gamma_{fan+1} (N(|W|) |h| + ||b|| sqrt(positions)),
      N the operator-norm bound of `_conv_norms`, fan = in/groups * kernel;
    - batch norm at evaluation: max|a| e + 10 u (max|a| |h| + ||(|mean a| + |beta|)|| sqrt(positions)),
      a = gamma / sqrt(var + eps);
    - ReLU, ReLU6, dropout/identity at evaluation, flatten/view/reshape, negation: e;
    - max pooling: sqrt(c) e, c the most windows one input lies in;
    - average pooling (window K): L (e + gamma_{K+1} |h|), L = sqrt(c / K) (sqrt(c) when the
      divisor can be smaller than K); adaptive average pooling with equal windows and means
      over non-row axes: (e + gamma_{K+1} |h|) / sqrt(K);
    - sums of two computed tensors: e1 + e2 + u' |y|; concatenation: sqrt(e1^2 + e2^2 + ...);
    - a computed tensor with a constant (a parameter, a buffer or a Python number): + and -: e +
      u' |y| (+ u |c| sqrt(d) for a Python number, rounded to float32 first); * and /: |c|max e +
      u' |y| (2 u' |y| for a Python number).
    Anything else (another function, a module of another kind, a tensor made from constants,
    an in-place write into a tensor read elsewhere) has no bound, and the evaluator runs in
    "sampled" mode instead.
    """

    def __init__(self, split: _Split, units: int):
        self.gm = split.suffix
        self.nodes = list(self.gm.graph.nodes)
        self.modules = dict(self.gm.named_modules())
        self.consts: dict[fx.Node, Any] = {}
        self.kinds = {node: self._kind(node) for node in self.nodes}
        index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in self.nodes}
        result = self.nodes[-1].args[0]
        if not isinstance(result, fx.Node):
            raise _Unbounded("the suffix does not return one tensor")
        self.final = result if self.kinds[result] == "linear" and len(result.users) == 1 else None
        if self.final is not None:
            self._final_setup(self.modules[self.final.target])
            self.last_use[self.final.args[0]] = len(self.nodes)     # its input is read at the output
        self._delta_setup(split.delta, units)

    def _final_setup(self, m: nn.Module) -> None:
        """The last linear layer decides on its input's bound: for top class t, every gap
        l_t - l_j moves by at most ||W_t - W_j|| e_h + r_t + r_j, r_i = gamma_{n+1} (||W_i|| |h| +
        |b_i|) (the rounding of logit i); per row, with the largest such ||W_t - W_j|| and r_j."""
        w = m.weight.detach().to("cpu", torch.float64)
        b = _f64(m.bias, w[:, 0]).abs()
        g = _gamma(m.in_features + 1)
        pair = torch.cdist(w, w)                                      # ||W_t - W_j||
        rows = w.norm(dim=1)
        slack = 1 + 1e-6
        factor, floor = _norm_slack(m.in_features)
        # per top class t: (coefficient of e_h, coefficient of the raw |h|, constant), times _MARGIN
        table = torch.stack([pair.max(dim=1).values,
                             g * (rows.max() + rows) * factor,
                             g * ((rows.max() + rows) * floor + b.max() + b) + 2 * _TINY * (1 + m.in_features)],
                            dim=1)
        self.final_table = (table * slack * _MARGIN).float()           # [C, 3]

    # -- the first tensor ------------------------------------------------------------------------

    def _delta_setup(self, delta: nn.Module | None, units: int) -> None:
        self.delta = delta
        if delta is None:
            return
        if isinstance(delta, nn.Linear) and _plain_forward(delta, nn.Linear):
            self.kernel = 1
            self.norm_w, self.norm_abs = _linear_norms(delta)
            if delta.in_features != units:
                raise _Unbounded("the delta layer does not read the units as its features")
        elif isinstance(delta, nn.Conv2d) and _plain_forward(delta, nn.Conv2d):
            self.kernel = int(torch.Size(delta.weight.shape[2:]).numel())
            self.norm_w, self.norm_abs = _conv_norms(delta)
        else:
            raise _Unbounded(f"no bound for a delta step through {type(delta).__name__}")
        w = delta.weight.detach().to("cpu", torch.float64)
        colsq = w.square().sum(dim=[d for d in range(w.dim()) if d != 1])  # ||W[:, j]||^2 [U]
        self.colsq = colsq * (1 + 1e-9)
        self.bias_norm = float(_f64(delta.bias, w[:, 0, ...].flatten()).norm()) * (1 + 1e-12)

    def mask_coefficients(self, masks: torch.Tensor) -> torch.Tensor | None:
        """Per mask, the coefficients of `first_error` that depend on the mask alone (float32
        [M, 4]: of ||z||, of ||h[S]||, of ||h[K]||, a constant), made once per `correct` call.
        - h * mask: u' ||h[K]||;
        - z - W[:, S] h[S] over s silenced units (K kernel positions): u' ||z|| + n_S u' ||h[S]|| +
          gamma_{sK+1} (||z|| + n_S ||h[S]||), n_S = min(sqrt(K) ||W[:, S]||_F, N(W)) (and N(|W|));
        - b + W[:, K] h[K] (a linear layer, more than half silenced, see `_delta_forward`):
          n_K u' ||h[K]|| + gamma_{w+1} (||b|| + n_K ||h[K]||)."""
        keep = masks.detach().to("cpu", torch.float64)
        coef = torch.zeros((keep.shape[0], 4), dtype=torch.float64)
        if self.delta is None:
            coef[:, 2] = _U1
            return coef.float()
        sil = 1 - keep
        s = sil.sum(1)
        root = math.sqrt(self.kernel)
        f_s = (sil @ self.colsq).sqrt()                                # ||W[:, S]||_F
        g = _gamma(s * self.kernel + 1)
        coef[:, 0] = _U1 + g
        coef[:, 1] = (root * f_s).clamp(max=self.norm_w) * _U1 + g * (root * f_s).clamp(max=self.norm_abs)
        if isinstance(self.delta, nn.Linear):
            w_k = keep.shape[1] - s
            kept = s > w_k
            f_k = (keep @ self.colsq).sqrt()
            g_k = _gamma(w_k + 1)
            coef[kept, 0] = 0.0
            coef[kept, 1] = 0.0
            coef[kept, 2] = (f_k.clamp(max=self.norm_w) * _U1 + g_k * f_k.clamp(max=self.norm_abs))[kept]
            coef[kept, 3] = (g_k * self.bias_norm)[kept]
        return (coef * (1 + 1e-6)).float()

    def first_error(self, coef: torch.Tensor, mb: torch.Tensor, hsq_t: torch.Tensor,
                    z_norm: torch.Tensor | None) -> torch.Tensor:
        """Bounds [k, n] of the error of the suffix's first tensor, whose inputs are the float64
        prefix values rounded to float32 (error <= u' |value|), from `mask_coefficients`. The
        sums of squares ||h[S]||^2, ||h[K]||^2 come from one small float32 product each, inflated
        by gamma_U."""
        grow = 1 + _gamma(mb.shape[1] + 1)
        coef = coef.to(mb.device)
        err = coef[:, 3:4].expand(mb.shape[0], hsq_t.shape[1]).clone()
        if bool((coef[:, 2] != 0).any()):
            err.addcmul_(coef[:, 2:3], (mb.float() @ hsq_t).mul_(grow).sqrt_())
        if bool((coef[:, 1] != 0).any()):
            err.addcmul_(coef[:, 1:2], ((1 - mb.float()) @ hsq_t).mul_(grow).sqrt_())
        if z_norm is not None:
            err.addcmul_(coef[:, 0:1], z_norm.unsqueeze(0))
        return err.add_(_TINY * 2.0 ** 12)       # rows of up to 2^24 values

    # -- the suffix ------------------------------------------------------------------------------

    def _kind(self, node: fx.Node) -> str:
        op, target = node.op, node.target
        if op in ("placeholder", "output", "get_attr"):
            return op
        if op == "call_module":
            return self._module_kind(node, self.modules[target])
        if op == "call_function":
            if target in _SAME_FUNCTIONS and set(node.kwargs) <= {"inplace"}:
                return "same"
            if target in _DROPOUT_FUNCTIONS:
                training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
                if training is False:
                    return "same"
            if target is F.pad and node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant") \
                    == "constant":
                return "same"          # padded entries are exact constants in both precisions
            if target in _RESHAPE_FUNCTIONS:
                return "reshape"
            if target in (torch.cat, torch.concat):
                return "cat"
            if target in _ADD and not node.kwargs:
                return "add"
            if target in _MUL and not node.kwargs:
                return "mul"
            if target in _ADAPTIVE_FUNCTIONS:
                return "adaptive"
            if target in _POOL_FUNCTIONS:
                pool = self._pool_args(node)
                if pool.get("return_indices") or pool.get("divisor_override") is not None:
                    raise _Unbounded(f"no error bound for {node.name}")
                self.consts[node] = pool
                return pool["kind"]
            if target is torch.mean:
                return "mean"
            if target in (operator.getitem, getattr):
                return "aux"
            raise _Unbounded(f"no error bound for {getattr(target, '__name__', target)}")
        if op == "call_method":
            if target in _SAME_METHODS and (target in ("relu", "relu_") or not node.kwargs):
                return "same"
            if target in _RESHAPE_METHODS:
                return "reshape"
            if target in _AUX_METHODS:
                return "aux"
            if target == "mean":
                return "mean"
            if target in _METHOD_ARITH and not node.kwargs:
                return "add" if target.rstrip("_") in ("add", "sub") else "mul"
            raise _Unbounded(f"no error bound for the method .{target}()")
        raise _Unbounded(f"no error bound for {op} {target}")

    def _module_kind(self, node: fx.Node, m: nn.Module) -> str:
        if isinstance(m, nn.Linear) and _plain_forward(m, nn.Linear):
            sig, sig_abs = _linear_norms(m)
            b = float(_f64(m.bias, m.weight[:, 0]).norm()) * (1 + 1e-12)
            self.consts[node] = (sig, sig_abs, b, _gamma(m.in_features + 1), _norm_slack(m.in_features),
                                 _TINY * math.sqrt(m.out_features) * (1 + sig_abs))
            return "linear"
        for base in (nn.Conv1d, nn.Conv2d):
            if (isinstance(m, base) and _plain_forward(m, base) and type(m)._conv_forward is base._conv_forward
                    and m.padding_mode == "zeros"):
                n_w, n_abs = _conv_norms(m)
                kernel = int(torch.Size(m.weight.shape[2:]).numel())
                b = float(_f64(m.bias, m.weight[:, 0, ...].flatten()).norm()) * (1 + 1e-12)
                self.consts[node] = (n_w, n_abs, b, _gamma((m.in_channels // m.groups) * kernel + 1))
                return "conv"
        if (isinstance(m, _AFFINE_MODULES) and _plain_forward(m, nn.modules.batchnorm._BatchNorm)
                and m.running_mean is not None and m.running_var is not None):
            var = _f64(m.running_var)
            alpha = _f64(m.weight, var) if m.weight is not None else torch.ones_like(var)
            alpha = alpha / (var + m.eps).sqrt()
            shift = (_f64(m.running_mean) * alpha).abs() + _f64(m.bias, var).abs()
            self.consts[node] = (float(alpha.abs().max()) * (1 + 1e-12), float(shift.norm()) * (1 + 1e-12),
                                 var.numel())
            return "bn"
        if type(m) in (nn.ReLU, nn.ReLU6) or isinstance(m, _TRANSPARENT_MODULES + _CONSTANT_PADS):
            return "same"
        if type(m) is nn.Flatten:
            return "reshape"
        if isinstance(m, _POOL_MODULES) and not m.return_indices:
            self.consts[node] = {"kernel_size": m.kernel_size, "stride": m.stride, "dilation": m.dilation}
            return "maxpool"
        if isinstance(m, _AVG_MODULES) and getattr(m, "divisor_override", None) is None:
            self.consts[node] = {"kernel_size": m.kernel_size, "stride": m.stride, "ceil_mode": m.ceil_mode,
                                 "count_include_pad": m.count_include_pad}
            return "avgpool"
        if isinstance(m, _ADAPTIVE_MODULES):
            return "adaptive"
        raise _Unbounded(f"no error bound for module {node.target} ({type(m).__name__})")

    @staticmethod
    def _pool_args(node: fx.Node) -> dict[str, Any]:
        """The settings of a functional max/average pooling call, by name."""
        kind, names = _POOL_FUNCTIONS[node.target]
        args = dict(zip(names, node.args[1:]))
        args.update(node.kwargs)
        if any(isinstance(v, fx.Node) for v in args.values()) or "kernel_size" not in args:
            raise _Unbounded(f"{node.name}: pooling settings that are computed")
        return {"kind": kind, "stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                "count_include_pad": True, **args}

    def _attr(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def run(self, inputs: list[torch.Tensor], errs: list[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The suffix on `inputs` (rows = masks x examples) with input error bounds `errs`
        (float32 [rows]): (logits [R, C], top class [R], undecided [R] bool)."""
        rows = inputs[0].shape[0]
        env: dict[fx.Node, Any] = {}
        err: dict[fx.Node, torch.Tensor | None] = {}
        exact: set[fx.Node] = set()       # tensors with no error: parameters, buffers and views of them
        norms: dict[fx.Node, torch.Tensor] = {}
        feed = iter(zip(inputs, errs))

        def norm(a: fx.Node) -> torch.Tensor:
            """torch's float32 norm of each row of `a` (callers add `_norm_slack`)."""
            if a not in norms:
                norms[a] = _raw_norm(env[a])
            return norms[a]

        for i, node in enumerate(self.nodes):
            kind = self.kinds[node]
            if kind == "placeholder":
                env[node], err[node] = next(feed)
                continue
            if kind == "get_attr":
                env[node], err[node] = self._attr(node.target), None
                exact.add(node)
                continue
            if kind == "output":
                return self._decide(env, err, node.args[0], rows)
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            inputs_ = node.all_input_nodes
            bounded = [a for a in inputs_ if err.get(a) is not None]
            if node.op == "call_module":
                value = self.modules[node.target](*args, **kwargs)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            else:
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            env[node] = value
            err[node] = self._bound(node, kind, value, bounded, inputs_, env, err, exact, norm, rows)
            if err[node] is None and isinstance(value, torch.Tensor):
                if kind in ("same", "reshape", "aux") and all(a in exact or not isinstance(env[a], torch.Tensor)
                                                               for a in inputs_):
                    exact.add(node)
                else:
                    raise _Unbounded(f"{node.name} computes a tensor from constants")
            for a in inputs_:
                if self.last_use[a] == i:
                    env.pop(a, None)
                    norms.pop(a, None)
        raise _Unbounded("the suffix has no output")

    def _bound(self, node, kind, value, bounded, inputs_, env, err, exact, norm, rows):
        if not bounded:
            return None
        if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != rows):
            raise _Unbounded(f"{node.name} does not keep one row per (mask, example)")
        if kind == "aux":
            if isinstance(value, torch.Tensor):
                raise _Unbounded(f"no error bound for {node.name}")
            return None
        if kind in ("same", "reshape"):   # other inputs may only be sizes (x.view(x.size(0), -1))
            if len(bounded) != 1 or any(isinstance(env[a], torch.Tensor) for a in inputs_ if a is not bounded[0]):
                raise _Unbounded(f"{node.name} reads several tensors")
            return err[bounded[0]]
        d = value[0].numel()
        if kind == "cat":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim % value.dim() == 0 or len(bounded) != len(inputs_):
                raise _Unbounded(f"{node.name} concatenates along rows or with constants")
            return torch.stack([err[a] for a in bounded]).square().sum(0).sqrt_()
        if len(bounded) == 2 and kind == "add":
            a, b = bounded
            if tuple(env[a].shape) != tuple(value.shape) or tuple(env[b].shape) != tuple(value.shape):
                raise _Unbounded(f"{node.name} broadcasts a computed tensor")
            self._in_place_ok(node, a)
            factor, floor = _norm_slack(d)
            return (err[a] + err[b]).add_(_raw_norm(value), alpha=_U1 * factor).add_(_U1 * floor + _TINY * math.sqrt(d))
        if len(bounded) != 1:
            raise _Unbounded(f"no error bound for {node.name} of {len(bounded)} computed tensors")
        a = bounded[0]
        e, h = err[a], env.get(a)
        if kind in ("add", "mul"):
            return self._constant_op(node, kind, a, e, value, exact, env, d)
        if kind == "linear":
            if h.dim() != 2:
                raise _Unbounded(f"{node.name} applies a linear layer to a {h.dim()}-d tensor")
            if node is self.final:
                return e                       # the output decides pairwise from the input's bound
            sig, sig_abs, b, g, (factor, floor), tiny = self.consts[node]
            return torch.add(e * sig, norm(a), alpha=g * sig_abs * factor).add_(g * (sig_abs * floor + b) + tiny)
        if kind == "conv":
            n_w, n_abs, b, g = self.consts[node]
            factor, floor = _norm_slack(h[0].numel())
            bias = b * math.sqrt(d // value.shape[1])
            return torch.add(e * n_w, norm(a), alpha=g * n_abs * factor).add_(
                g * (n_abs * floor + bias) + _TINY * math.sqrt(d) * (1 + n_abs))
        if kind == "bn":
            amax, shift, channels = self.consts[node]
            factor, floor = _norm_slack(h[0].numel())
            r = _BN_ROUNDINGS * _U
            positions = h[0].numel() // channels
            return torch.add(e * amax, norm(a), alpha=r * amax * factor).add_(
                r * (amax * floor + shift * math.sqrt(positions)) + _TINY * math.sqrt(d) * (1 + amax))
        if kind == "maxpool":
            p, nd = self.consts[node], h.dim() - 2
            k = _tuple(p["kernel_size"], nd)
            s = _tuple(p["stride"] or p["kernel_size"], nd)
            return e * math.sqrt(_pool_overlap(k, s, _tuple(p["dilation"], nd)))
        factor, floor = _norm_slack(h[0].numel())
        if kind == "avgpool":
            p, nd = self.consts[node], h.dim() - 2
            k = _tuple(p["kernel_size"], nd)
            s = _tuple(p["stride"] or p["kernel_size"], nd)
            window = int(torch.Size(k).numel())
            c = _pool_overlap(k, s, (1,) * nd)
            full_divisor = p["count_include_pad"] and not p["ceil_mode"]
            lip = math.sqrt(c / window) if full_divisor else math.sqrt(c)
        elif kind in ("adaptive", "mean"):
            window = self._window(node, kind, h)
            lip = 1 / math.sqrt(window)
        else:
            raise _Unbounded(f"no error bound for {node.name}")
        g = _gamma(window + 1)
        return torch.add(e * lip, norm(a), alpha=lip * g * factor).add_(lip * g * floor + _TINY * math.sqrt(d))

    def _constant_op(self, node, kind, a, e, value, exact, env, d):
        """A computed tensor and a constant: +, -, * or /."""
        self._in_place_ok(node, a)
        others = [v for v in node.args if v is not a]
        if len(others) != 1 or len(node.args) != 2:
            raise _Unbounded(f"no error bound for {node.name}")
        c = others[0]
        if isinstance(c, fx.Node):
            if c not in exact:
                raise _Unbounded(f"{node.name} reads a computed tensor that is not one row per (mask, example)")
            c_abs, scalar = env[c].detach().abs().double(), False
        elif isinstance(c, (int, float)):
            c_abs, scalar = torch.tensor(abs(float(c)), dtype=torch.float64), True
        else:
            raise _Unbounded(f"no error bound for {node.name}")
        factor, floor = _norm_slack(d)
        out = _raw_norm(value)
        if kind == "add":
            # a Python number is rounded to float32 first: |c - fl(c)| <= u |c| per element
            extra = _U * float(c_abs.max()) * math.sqrt(d) if scalar else 0.0
            return (e + _U1 * factor * out).add_(_U1 * floor + extra + _TINY * math.sqrt(d))
        if node.target in _DIVIDE:
            if node.args[0] is not a or bool((c_abs == 0).any()):
                raise _Unbounded(f"{node.name} divides by a computed tensor or by 0")
            scale = float((1 / c_abs).max())
        else:
            scale = float(c_abs.max())
        rounding = (2 if scalar else 1) * _U1
        return torch.add(e * (scale * (1 + _U1)), out, alpha=rounding * factor).add_(
            rounding * floor + _TINY * math.sqrt(d))

    def _in_place_ok(self, node: fx.Node, a: fx.Node) -> None:
        in_place = node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv) or (
            node.op == "call_method" and str(node.target).endswith("_"))
        if in_place and (node.args[0] is not a or len(a.users) != 1):
            raise _Unbounded(f"{node.name} writes in place into a tensor read elsewhere")

    def _window(self, node: fx.Node, kind: str, h: torch.Tensor) -> int:
        """Inputs averaged into each output of an adaptive average pool (equal windows only) or a mean."""
        if kind == "mean":
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            if dims is None or "dtype" in node.kwargs:
                raise _Unbounded(f"{node.name} averages over the rows")
            dims = [d % h.dim() for d in ((dims,) if isinstance(dims, int) else dims)]
            if 0 in dims:
                raise _Unbounded(f"{node.name} averages over the rows")
            return int(torch.Size([h.shape[d] for d in dims]).numel())
        nd = h.dim() - 2
        size = self.modules[node.target].output_size if node.op == "call_module" else (
            node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None))
        size = tuple(size) if isinstance(size, (tuple, list)) else _tuple(size, nd)
        window = 1
        for inp, o in zip(h.shape[2:], size):
            o = inp if o is None else int(o)
            if inp % o:
                raise _Unbounded(f"{node.name}: adaptive pooling windows of unequal sizes")
            window *= inp // o
        return window

    def _decide(self, env, err, result: fx.Node, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, top class, undecided): a row is decided when its top logit beats the second
        by more than the bound of any gap's error, times _MARGIN. NaN or inf in the logits or
        the bound leaves a row undecided."""
        logits = env[result]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != rows:
            raise _Unbounded("the suffix does not return logits [rows, classes]")
        if logits.shape[1] < 2:
            raise _Unbounded("one class")
        lt = logits.t().contiguous()          # [C, R]: reductions over a short last axis are slow
        top_val, top = lt.max(dim=0)
        second = lt.scatter(0, top.unsqueeze(0), float("-inf")).amax(dim=0)    # an equal maximum stays
        if self.final is not None:
            coef = self.final_table.to(logits.device)[top]                   # [R, 3]
            h = env[self.final.args[0]]
            thr = torch.addcmul(coef[:, 2], coef[:, 0], err[self.final]).addcmul_(coef[:, 1], _raw_norm(h))
        else:
            thr = err[result] * (math.sqrt(2) * _MARGIN)                     # |e_t - e_j| <= sqrt(2) ||e||
        self.last_threshold = thr           # for tests: a bound of |error| of every gap l_top - l_j
        gap = top_val - second
        close = ~(gap > thr) | ~torch.isfinite(lt.sum(dim=0))
        return logits, top, close


__all__ = ["LesionEvaluator"]
