"""Dataset examples: the real inputs that excite a unit most, cropped to what the unit sees.

The top-k inputs per unit come from one streaming pass of the activation capture
(`netanatomy.capture.capture_activations`, ranked by the maximum of each unit's map), with the
position of that maximum. For a conv unit, that position is mapped back to input pixels by a
gradient probe of the layer's receptive field (`receptive_field`): the gradient of the layer's
values at a few positions with respect to random inputs is non-zero exactly on the input
pixels those positions see, whatever the padding, strides, pooling or branches in between;
a straight line through the centres of those supports maps any position to its input centre,
and their extent gives the crop size. Scaling the position by input size / map size, the
usual shortcut, is off by the padding offset for unpadded convs and knows nothing of the size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..capture.hooks import recording
from ..errors import UsageError
from ..models.layers import Layer, discover_layers
from ..util.devices import resolve_device
from .render import frozen_eval
from .sheet import contact_sheet


@dataclass(frozen=True)
class ReceptiveField:
    """Map position -> input pixel centre per axis (centre = slope * position + offset), and extent.

    `size` is the receptive field's height and width in input pixels, at most the input's own.
    `method` is "gradient" (the probe) or "scale" (the fallback: position scaled to input size).
    """

    slope: tuple[float, float]
    offset: tuple[float, float]
    size: tuple[int, int]
    input_size: tuple[int, int]
    method: str = "gradient"

    def center(self, pos: Sequence[int]) -> tuple[float, float]:
        return (self.slope[0] * pos[0] + self.offset[0], self.slope[1] * pos[1] + self.offset[1])

    def box(self, pos: Sequence[int], min_size: int | tuple[int, int] = 0) -> tuple[int, int, int, int]:
        """A crop (y0, x0, y1, x1), half-open, of the field's size (at least `min_size`) around the
        position's centre, moved inside the input so that every crop has the same size."""
        mins = (min_size, min_size) if isinstance(min_size, int) else min_size
        out = []
        for axis in (0, 1):
            limit = self.input_size[axis]
            size = min(limit, max(self.size[axis], int(mins[axis])))
            start = int(round(self.center(pos)[axis] - (size - 1) / 2))
            start = min(max(start, 0), limit - size)
            out.append((start, start + size))
        return (out[0][0], out[1][0], out[0][1], out[1][1])


def scaled_field(map_size: Sequence[int], input_size: Sequence[int]) -> ReceptiveField:
    """The shortcut mapping: a position's centre scaled to input size; extent one map cell."""
    slope = tuple(input_size[a] / map_size[a] for a in (0, 1))
    offset = tuple(slope[a] / 2 - 0.5 for a in (0, 1))
    size = tuple(max(1, int(np.ceil(slope[a]))) for a in (0, 1))
    return ReceptiveField(slope, offset, size, (int(input_size[0]), int(input_size[1])), "scale")


def receptive_field(model: nn.Module, layer: str | Layer, input_shape: Sequence[int] | None = None, *,
                    positions: int = 6, probes: int = 4, seed: int = 0) -> ReceptiveField:
    """Probe where the units of a conv layer look in the input (see the module's docstring).

    Runs one forward and backward of `positions * probes` random inputs, up to the layer only.
    """
    layer_map = discover_layers(model, input_shape)
    layer = layer_map.resolve(layer) if isinstance(layer, str) else layer
    shape = tuple(input_shape) if input_shape else tuple(layer_map.input_shape)
    if len(shape) != 3:
        raise UsageError(f"receptive fields need image inputs (C, H, W); this model takes {shape}")
    if len(layer.out_shape) != 3:
        raise UsageError(f"layer {layer.name} has no spatial map, so no receptive field")
    in_hw = (int(shape[1]), int(shape[2]))
    map_hw = (int(layer.out_shape[1]), int(layer.out_shape[2]))
    k = max(1, min(positions, max(map_hw)))
    pos = np.stack([np.round(np.linspace(0, map_hw[a] - 1, k)).astype(int) for a in (0, 1)], axis=1)  # [k, 2]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((k * probes, *shape), generator=gen).to(device).requires_grad_(True)
    values: dict[str, Tensor] = {}

    def keep(lay: Layer, value: Tensor) -> None:
        values["v"] = value

    stage = "pre" if layer.pre else "post"
    with frozen_eval(model), recording(model, [layer], stage, keep, stop_early=True, detach=False) as recorder:
        recorder.forward(x)
        if "v" not in values:
            raise UsageError(f"the forward pass never reached layer {layer.name}")
        v = values["v"]
        rows = torch.arange(k * probes, device=device)
        py = torch.as_tensor(np.repeat(pos[:, 0], probes), device=device)
        px = torch.as_tensor(np.repeat(pos[:, 1], probes), device=device)
        # a random positive weight per unit: no cancellation between units can hide part of the field
        weights = torch.rand((v.shape[1],), generator=gen).to(device) + 0.5
        target = (v[rows, :, py, px] * weights).sum()
        (grad,) = torch.autograd.grad(target, x)
    support = (grad.abs().sum(1) > 0).reshape(k, probes, *in_hw).any(1).cpu().numpy()  # [k, H, W]
    return _fit_field(support, pos, in_hw, map_hw)


def _fit_field(support: np.ndarray, pos: np.ndarray, in_hw: tuple[int, int], map_hw: tuple[int, int]) -> ReceptiveField:
    """Per axis, a line through the support centres; the extent from supports the border does not cut."""
    fallback = scaled_field(map_hw, in_hw)
    slope, offset, size = [], [], []
    for axis in (0, 1):
        limit = in_hw[axis]
        lines = support.any(axis=2 if axis == 0 else 1)  # [k, limit]: which rows (or columns) each position sees
        seen = lines.any(axis=1)
        lo = np.where(seen, lines.argmax(axis=1), -1)
        hi = np.where(seen, limit - 1 - lines[:, ::-1].argmax(axis=1), -1)
        whole = seen & (lo > 0) & (hi < limit - 1)
        if not whole.any():  # every support is cut by the border: the field covers the input
            slope.append(fallback.slope[axis])
            offset.append(fallback.offset[axis])
            size.append(limit)
            continue
        extent = int((hi - lo + 1)[whole].max())
        # a support cut on one side still has its other edge: centre = that edge -+ half the extent
        centre = np.where(whole, (lo + hi) / 2.0, np.where(lo > 0, lo + (extent - 1) / 2.0, hi - (extent - 1) / 2.0))
        usable = seen & ((lo > 0) | (hi < limit - 1))
        p, c = pos[usable, axis].astype(float), centre[usable]
        if np.unique(p).size < 2:
            a, b = 0.0, float(c.mean())
        else:
            a, b = np.polyfit(p, c, 1)
        slope.append(float(a))
        offset.append(float(b))
        size.append(min(extent, limit))
    return ReceptiveField((slope[0], slope[1]), (offset[0], offset[1]), (size[0], size[1]), in_hw, "gradient")


@dataclass
class DatasetExamples:
    """The top-k inputs of each unit, with crops around where the unit's map peaked.

    `index[u, j]` is the data set index of unit u's j-th best input, `value[u, j]` the maximum
    (or the mean, see `rank`) of its map there (pre-activation by default), `pos[u, j]` the
    (y, x) of the map's maximum, `boxes[u, j]` the crop (y0, x0, y1, x1) in input pixels, `crops`
    the cropped images [U, k, C, h, w] (whole images for linear units).
    """

    layer: str
    units: list[int]
    rank: str
    index: np.ndarray
    value: np.ndarray
    labels: np.ndarray
    pos: np.ndarray | None
    boxes: np.ndarray
    crops: Tensor
    field: ReceptiveField | None

    def subset(self, rows: Sequence[int]) -> DatasetExamples:
        """The examples of the units at `rows` (positions in `units`)."""
        r = np.asarray(rows, dtype=int)
        return replace(self, units=[self.units[i] for i in r], index=self.index[r], value=self.value[r],
                       labels=self.labels[r], pos=None if self.pos is None else self.pos[r], boxes=self.boxes[r],
                       crops=self.crops[torch.as_tensor(r, dtype=torch.long)])

    def to_json(self) -> dict:
        return {
            "layer": self.layer, "units": self.units, "rank": self.rank, "index": self.index, "value": self.value,
            "labels": self.labels, "pos": self.pos, "boxes": self.boxes,
            "receptive_field": None if self.field is None else {
                "slope": self.field.slope, "offset": self.field.offset, "size": self.field.size,
                "method": self.field.method},
        }


def _indexable(data) -> Dataset | Tensor:
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, (Dataset, Tensor)):
        return data
    raise UsageError("dataset examples need a Dataset, DataLoader or tensor of inputs (something indexable)")


def _fetch(source, i: int) -> tuple[Tensor, int]:
    item = source[int(i)]
    if isinstance(item, Tensor):
        return item, -1
    x = item[0]
    y = int(item[1]) if len(item) > 1 and item[1] is not None else -1
    return torch.as_tensor(x), y


def dataset_examples(model: nn.Module, layer: str, data, *, units: Sequence[int] | None = None, top_k: int = 9,
                     rank: str = "max", crop: bool = True, min_crop: int | None = None, stage: str = "pre",
                     batch_size: int = 256, max_examples: int | None = None, device: str | torch.device | None = None,
                     input_shape: Sequence[int] | None = None, show_progress: bool = True) -> DatasetExamples:
    """Top-`top_k` inputs of each unit of `layer` over `data`, cropped for conv units.

    `rank` "max" ranks inputs by the maximum of the unit's map (the strongest local response,
    which the crop shows), "mean" by its spatial mean (the statistic a channel objective
    maximizes). Crops follow the receptive field (at least `min_crop` pixels a side; default a quarter of the
    input's side, so that a 3x3 field still shows some context).
    """
    from ..capture import capture_activations

    if top_k < 1:
        raise UsageError(f"top-k must be at least 1, got {top_k}")
    if rank not in ("max", "mean"):
        raise UsageError(f"rank must be 'max' or 'mean', not {rank!r}")
    source = _indexable(data)
    dev = resolve_device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    layer_map = discover_layers(model, input_shape)
    resolved = layer_map.resolve(layer)
    chosen = list(range(resolved.units)) if units is None else [int(u) for u in units]
    bad = [u for u in chosen if not 0 <= u < resolved.units]
    if bad:
        raise UsageError(f"unit {bad[0]} is out of range: layer {resolved.name} has {resolved.units} units")
    stats = capture_activations(model, [resolved.name], data, stage=stage, reduce=rank, top_k=top_k, topk_by=rank,
                                keep_values=0, covariance=False, batch_size=batch_size, max_examples=max_examples,
                                device=dev, input_shape=input_shape, show_progress=show_progress)[resolved.name]
    sel = np.asarray(chosen, dtype=int)
    index = np.asarray(stats.topk_index)[sel]
    value = np.asarray(stats.topk_value)[sel]
    spatial = len(resolved.out_shape) == 3
    pos = np.asarray(stats.topk_pos)[sel] if spatial else None
    k = min(top_k, stats.n)
    index, value = index[:, :k], value[:, :k]
    pos = pos[:, :k] if pos is not None else None

    first, _ = _fetch(source, int(index[0, 0]))
    in_hw = (int(first.shape[-2]), int(first.shape[-1]))
    field = None
    if spatial and crop:
        try:
            field = receptive_field(model, resolved, input_shape)
        except UsageError:
            raise
        except Exception:  # a model the probe cannot differentiate: the shortcut mapping
            field = scaled_field(resolved.out_shape[1:], in_hw)
    if min_crop is None:
        min_crop = max(1, min(in_hw) // 4)
    boxes = np.zeros((len(sel), k, 4), dtype=int)
    labels = np.full((len(sel), k), -1, dtype=int)
    crops = []
    for u in range(len(sel)):
        row = []
        for j in range(k):
            x, y = _fetch(source, int(index[u, j]))
            labels[u, j] = y
            if field is not None:
                y0, x0, y1, x1 = field.box(pos[u, j], min_crop)
            else:
                y0, x0, y1, x1 = 0, 0, x.shape[-2], x.shape[-1]
            boxes[u, j] = (y0, x0, y1, x1)
            row.append(x[..., y0:y1, x0:x1].float().cpu())
        crops.append(torch.stack(row))
    return DatasetExamples(layer=resolved.name, units=chosen, rank=rank, index=index, value=value, labels=labels,
                           pos=pos, boxes=boxes, crops=torch.stack(crops), field=field)


def label_names(examples: DatasetExamples, class_names: Sequence[str] | None) -> list[list[str | None]] | None:
    """The class name of every example ([unit][rank]; None for an unlabelled one), or None
    when the data set names no classes."""
    if not class_names:
        return None
    return [[class_names[c] if 0 <= c < len(class_names) else None for c in (int(v) for v in row)]
            for row in examples.labels]


def examples_sheet(examples: DatasetExamples, renders: Tensor | None = None, *, cell: int = 80,
                   class_names: Sequence[str] | None = None, unit_names: Sequence[str] | None = None) -> np.ndarray:
    """One row per unit: its render first (when given), then its top-k crops.

    The first label of a row names the unit (with `unit_names[u]` when given, e.g. the class a
    logit stands for); every crop's label gives its value and, when the data set is labelled,
    its class.
    """
    n_units, k = examples.index.shape
    items, labels = [], []
    for u in range(n_units):
        named = unit_names[u] if unit_names is not None and u < len(unit_names) and unit_names[u] else ""
        head = f"u{examples.units[u]}{' ' + named if named else ''}: "
        if renders is not None:
            items.append(renders[u])
            labels.append(f"{head}render")
            head = ""
        for j in range(k):
            items.append(examples.crops[u, j])
            cls = int(examples.labels[u, j])
            name = ""
            if cls >= 0:
                name = class_names[cls] if class_names is not None and cls < len(class_names) else f"class {cls}"
            labels.append(f"{head if j == 0 else ''}{examples.value[u, j]:.2f} {name}".rstrip())
    ncols = k + (1 if renders is not None else 0)
    named = bool(unit_names) or bool(class_names)
    return contact_sheet(items, labels, ncols=ncols, cell=cell, title=f"{examples.layer}: top {k} dataset examples",
                         label_lines=2 if named else 1)


__all__ = ["DatasetExamples", "ReceptiveField", "dataset_examples", "examples_sheet", "label_names", "receptive_field",
           "scaled_field"]
