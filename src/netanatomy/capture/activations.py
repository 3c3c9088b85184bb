"""Stream a data set through a model and keep per-unit statistics, never all activations.

For each requested layer: mean and variance, the unit-by-unit covariance (float64), the top-k
examples per unit with the position of each map's maximum, and a seeded reservoir of per-example
values (all of them while the data set is no longer than `keep_values`) for Spearman
correlations and activation graphs. Memory is O(units^2 + units*k + keep_values*units) per
layer, whatever the length of the stream.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..core.streaming import (
    REDUCTIONS,
    Reservoir,
    StreamingMoments,
    StreamingTopK,
    UnitStats,
    argmax_positions,
    reduce_units,
)
from ..errors import UsageError
from ..models.layers import Layer, discover_layers
from ..models.layout import channels_last, prefers_channels_last
from ..util.devices import resolve_device
from ..util.progress import progress
from .hooks import recording

LayerStats = UnitStats


class _LayerAccumulator:
    def __init__(self, layer: Layer, reduce: str, top_k: int, topk_by: str, keep_values: int,
                 covariance: bool, seed: int, device: torch.device):
        self.layer = layer
        self.reduce = reduce
        self.topk_by = topk_by
        self.moments = StreamingMoments(layer.units, covariance=covariance, device=device)
        self.topk = StreamingTopK(layer.units, top_k, max(len(layer.out_shape) - 1, 0), device=device)
        self.reservoir = Reservoir(layer.units, keep_values, seed=seed)
        self.spatial: tuple[int, ...] = tuple(layer.out_shape[1:])

    def update(self, value: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> None:
        value = value.detach()
        self.spatial = tuple(value.shape[2:])
        reduced = reduce_units(value, self.reduce)
        self.moments.update(reduced)
        if self.topk.k > 0:
            scores = reduced if self.topk_by == self.reduce else reduce_units(value, self.topk_by)
            self.topk.update(scores, index, argmax_positions(value))
        if self.reservoir.capacity > 0:
            self.reservoir.update(reduced.float().cpu().numpy(), index.cpu().numpy(), labels.cpu().numpy())

    def result(self, stage: str) -> UnitStats:
        m = self.moments
        values = index = labels = None
        if self.reservoir.capacity > 0:
            values, index, labels = self.reservoir.sample()
        has_topk = self.topk.k > 0
        return UnitStats(
            layer=self.layer.name, stage=stage, reduce=self.reduce, n=m.n,
            mean=m.mean.cpu().numpy(), var=m.variance().cpu().numpy(),
            cov=m.covariance().cpu().numpy() if m.comoment is not None else None,
            values=values, value_index=index, labels=labels,
            topk_value=self.topk.values.cpu().numpy() if has_topk else None,
            topk_index=self.topk.index.cpu().numpy() if has_topk else None,
            topk_pos=self.topk.pos.cpu().numpy() if has_topk else None,
            spatial=self.spatial,
        )

    def nbytes(self) -> int:
        return self.moments.nbytes() + self.topk.nbytes() + self.reservoir.nbytes()


def _batches(data, batch_size: int) -> Iterable:
    if isinstance(data, torch.Tensor):  # a tensor of inputs: consecutive batches of it
        return (data[i:i + batch_size] for i in range(0, data.shape[0], batch_size))
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        from ..data import ImageDataset, make_loader

        if isinstance(data, ImageDataset):  # batches are sliced from memory, not collated item by item
            return make_loader(data, batch_size=batch_size, shuffle=False)
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


def _split_batch(batch, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, labels, data set indices) from a batch given as x, (x, y) or (x, y, index)."""
    if isinstance(batch, torch.Tensor):
        x, y, idx = batch, None, None
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        idx = batch[2] if len(batch) > 2 else None
    else:
        raise UsageError("data must yield tensors x, (x, y) or (x, y, index)")
    n = x.shape[0]
    labels = torch.as_tensor(y).long().reshape(-1) if y is not None else torch.full((n,), -1, dtype=torch.long)
    index = torch.as_tensor(idx).long().reshape(-1) if idx is not None else torch.arange(start, start + n)
    return x, labels, index


def example_batches(data, batch_size: int, max_examples: int | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, labels, data set indices) batch by batch, the first `max_examples` examples at most."""
    seen = 0
    for batch in _batches(data, batch_size):
        x, labels, index = _split_batch(batch, seen)
        if max_examples is not None and seen + x.shape[0] > max_examples:
            keep = max_examples - seen
            x, labels, index = x[:keep], labels[:keep], index[:keep]
        if x.shape[0] == 0:
            return
        yield x, labels, index
        seen += x.shape[0]
        if max_examples is not None and seen >= max_examples:
            return


def capture_activations(model: nn.Module, layers: Sequence[str | Layer], data, *, stage: str = "pre",
                        reduce: str = "mean", top_k: int = 10, topk_by: str = "max", keep_values: int = 5000,
                        covariance: bool = True, max_examples: int | None = None, batch_size: int = 256,
                        device: str | torch.device | None = None, seed: int = 0, input_shape: Sequence[int] | None = None,
                        show_progress: bool = True) -> dict[str, UnitStats]:
    """Per-unit statistics of `layers` over `data` (a Dataset, DataLoader or iterable of batches).

    `stage` "pre" gives the input of each layer's nonlinearity (after batch norm), "post" its
    output. Conv units are reduced over space by `reduce` ("mean", "l1" = sum of |x|, "max",
    "center"); top-k examples are ranked by `topk_by` and carry the position of the map's
    maximum. The model is put in eval mode; hooks are removed whatever happens.
    """
    if reduce not in REDUCTIONS or topk_by not in REDUCTIONS:
        raise UsageError(f"reduction must be one of {', '.join(REDUCTIONS)}")
    if stage not in ("pre", "post"):
        raise UsageError(f"stage must be 'pre' or 'post', not {stage!r}")
    dev = resolve_device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    layer_map = discover_layers(model, input_shape)
    chosen = [layer_map.resolve(name) for name in layers]
    if not chosen:
        raise UsageError("no layers to capture")
    for layer in chosen:
        layer.terms(stage)  # fails early, with a clear message, if a layer cannot be captured
    accumulators = {
        layer.name: _LayerAccumulator(layer, reduce, top_k, topk_by, keep_values, covariance, seed, dev)
        for layer in chosen
    }
    state = {"labels": None, "index": None}

    def on_layer(layer: Layer, value: torch.Tensor) -> None:
        accumulators[layer.name].update(value, state["index"], state["labels"])

    if isinstance(data, torch.Tensor):
        total = data.shape[0]
    elif isinstance(data, DataLoader):
        total = len(data.dataset) if hasattr(data.dataset, "__len__") else None
    else:
        total = len(data) if hasattr(data, "__len__") else None
    seen = 0
    # the layout's conv hooks go in before the recorder's, so the recorder sees laid-out values
    with torch.no_grad(), channels_last(model, enabled=prefers_channels_last(model, dev)), \
            recording(model, chosen, stage, on_layer, stop_early=True) as recorder:
        bar = progress(total=max_examples or total, desc="capture", unit="ex", disable=None if show_progress else True)
        try:
            for x, labels, index in example_batches(data, batch_size, max_examples):
                state["labels"], state["index"] = labels.to(dev), index.to(dev)
                recorder.forward(x.to(dev, non_blocking=True))
                seen += x.shape[0]
                bar.update(x.shape[0])
        finally:
            bar.close()
    if seen == 0:
        raise UsageError("the data set is empty: nothing to capture")
    return {name: acc.result(stage) for name, acc in accumulators.items()}


def accumulator_bytes(model: nn.Module, layer: str | Layer, *, top_k: int = 10, keep_values: int = 5000,
                      covariance: bool = True, input_shape: Sequence[int] | None = None) -> int:
    """Bytes of state kept for one layer: independent of how many examples stream through."""
    resolved = discover_layers(model, input_shape).resolve(layer)
    acc = _LayerAccumulator(resolved, "mean", top_k, "max", keep_values, covariance, 0, torch.device("cpu"))
    return acc.nbytes()


__all__ = ["LayerStats", "UnitStats", "accumulator_bytes", "capture_activations"]
