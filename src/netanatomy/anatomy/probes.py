"""Probes on a model: categories of units without hand labels (colour, orientation, frequency,
first-layer filter colour), for any layer `LayerMap.resolve` accepts.

The adapter between a model and `core/probes.py`: it makes the stimuli (`data/probes.py`),
captures every requested layer in one pass per stimulus set (`capture_activations`), reads
first-layer weights (`anatomy/weights.py`), and hands plain arrays to the core.

Responses are **post-activation spatial means**: the nonlinearity's output averaged over the
unit's map. Rectified responses are what the OSI is defined on, and a linear response to a
full-field grating averages to about zero over space (a sinusoid has mean zero), so before the
nonlinearity the spatial mean would show no tuning at all. A layer with no nonlinearity after
it (a linear bottleneck, a logit) has post = pre; its result says so in a note.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..capture.activations import capture_activations
from ..core.probes import colour_selectivity, filter_properties, grating_tuning
from ..data.probes import gratings, to_grey
from ..errors import UsageError, suggest
from ..models.layers import Layer, LayerMap
from ..util.seeding import derive
from .graph import INPUT, feeding_layer
from .weights import layer_weights

__all__ = ["DEFAULT_PHOTOS", "ORIENTATIONS", "PHASES", "PROBES", "REDUCE", "STAGE", "ProbeResult",
           "check_probes", "default_photos_spec", "grating_frequencies", "not_applicable", "probe_layers"]

PROBES = ("colour", "orientation", "filter")


def default_probes(channels: int) -> tuple[str, ...]:
    """The probes worth running on a model that reads `channels`-channel images (colour needs RGB;
    filter skips itself, with a note, on layers that do not read the image)."""
    return PROBES if channels == 3 else tuple(p for p in PROBES if p != "colour")
STAGE, REDUCE = "post", "mean"
DEFAULT_PHOTOS = 128  # photo patches of the default colour probe: 2 x 128 forwards of a 224 px model
ORIENTATIONS, PHASES = 12, 4  # 15-degree steps
MAX_CYCLES_PER_PIXEL = 0.3    # highest grating frequency: a period of 3.3 pixels, well below Nyquist (0.5)


@dataclass(frozen=True)
class ProbeResult:
    """What the probes found in one layer: per-unit values, categories as masks, their rules."""

    layer: str
    units: int
    values: dict[str, np.ndarray]
    categories: dict[str, np.ndarray]
    rules: dict[str, str]
    stage: str = STAGE
    reduce: str = REDUCE
    probes: tuple[str, ...] = ()   # the probes that ran on this layer
    notes: tuple[str, ...] = ()    # what did not apply, and why
    stimuli: dict[str, Any] = field(default_factory=dict)

    def members(self, category: str) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.categories[category])]

    def unit_categories(self, unit: int) -> list[str]:
        return [name for name, mask in self.categories.items() if mask[unit]]

    def to_json(self) -> dict:
        table = [{"unit": u, **{k: _scalar(v[u]) for k, v in self.values.items()},
                  "categories": self.unit_categories(u)} for u in range(self.units)]
        return {
            "layer": self.layer, "units": self.units, "stage": self.stage, "reduce": self.reduce,
            "probes": list(self.probes), "notes": list(self.notes), "stimuli": self.stimuli, "rules": self.rules,
            "counts": {name: int(mask.sum()) for name, mask in self.categories.items()},
            "categories": {name: self.members(name) for name in self.categories},
            "units_table": table,
        }


def _scalar(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and not np.isfinite(value) else value


# ---------------------------------------------------------------------------------------------
# What applies where


def check_probes(probes: Sequence[str]) -> tuple[str, ...]:
    """The probe names, checked (a typo gets the nearest name), in PROBES order, no repeats."""
    chosen = [p.strip() for p in probes if p.strip()]
    for name in chosen:
        if name not in PROBES:
            raise UsageError(f"unknown probe {name!r}{suggest(name, PROBES)}; probes are {', '.join(PROBES)}")
    if not chosen:
        raise UsageError(f"name at least one probe: {', '.join(PROBES)}")
    return tuple(p for p in PROBES if p in chosen)


def _image_shape(layer_map: LayerMap) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in layer_map.input_shape)
    if len(shape) != 3:
        raise UsageError(f"probes show the model images; this model takes inputs shaped {shape}, not C,H,W")
    return shape  # type: ignore[return-value]


def not_applicable(module: nn.Module, layer_map: LayerMap, layer: Layer | str, probe: str) -> str | None:
    """Why `probe` does not apply to `layer`, in one sentence, or None when it does."""
    layer = layer_map.resolve(layer)
    channels = _image_shape(layer_map)[0]
    if probe == "colour" and channels != 3:
        return f"colour: not applicable: the model reads {channels}-channel images, and grey versions need RGB"
    if probe == "filter":
        if layer.kind != "conv":
            return f"filter: not applicable: {layer.name} is a {layer.kind} layer, not a conv that reads the image"
        below = feeding_layer(module, layer_map, layer)
        if below != INPUT:
            reads = f"it reads {below}" if below else "what it reads cannot be told"
            return f"filter: not applicable: {layer.name} does not read the input image ({reads})"
    return None


# ---------------------------------------------------------------------------------------------
# Stimuli


def default_photos_spec(side: int) -> str:
    return f"photos?n={DEFAULT_PHOTOS}&size={int(side)}"


def _image_batches(data, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size]
        return
    from ..data import ImageDataset, make_loader

    loader = make_loader(data, batch_size=batch_size) if isinstance(data, ImageDataset) \
        else DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in loader:
        yield batch[0] if isinstance(batch, (list, tuple)) else batch


class _ColourAndGrey:
    """Batches of images followed by their grey versions, indexed i and N + i: one pass, with
    the grey twins made batch by batch instead of a second copy of the data in memory."""

    def __init__(self, data, count: int, batch_size: int):
        self.data, self.count, self.batch_size = data, count, max(1, batch_size // 2)

    def __len__(self) -> int:
        return 2 * self.count

    def __iter__(self):
        start = 0
        for x in _image_batches(self.data, self.batch_size):
            x = x.float()
            if x.dim() != 4 or x.shape[1] != 3:
                raise UsageError(f"the colour probe needs RGB images [N, 3, H, W], got a batch {tuple(x.shape)}")
            n = x.shape[0]
            index = torch.arange(start, start + n)
            yield torch.cat([x, to_grey(x)]), torch.full((2 * n,), -1), torch.cat([index, index + self.count])
            start += n


def _dataset_length(data) -> int:
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return len(data)
    raise UsageError("data for the colour probe must be a tensor of images [N, 3, H, W] or a Dataset")


# ---------------------------------------------------------------------------------------------
# Passes


def _capture(module, layers: list[Layer], data, count: int, layer_map: LayerMap, device, batch_size: int,
             show_progress: bool) -> dict[str, np.ndarray]:
    """Post-activation spatial means of every layer for every stimulus, [count, units], in order."""
    stats = capture_activations(module, layers, data, stage=STAGE, reduce=REDUCE, top_k=0, keep_values=count,
                                covariance=False, batch_size=batch_size, device=device,
                                input_shape=layer_map.input_shape, show_progress=show_progress)
    return {name: s.values.astype(np.float64) for name, s in stats.items()}


def _colour_pass(module, layers, layer_map, data, device, batch_size, show_progress, seed) -> dict[str, Any]:
    count = _dataset_length(data)
    if count < 1:
        raise UsageError("the colour probe's data set is empty")
    values = _capture(module, layers, _ColourAndGrey(data, count, batch_size), 2 * count, layer_map, device,
                      batch_size, show_progress)
    return {name: colour_selectivity(v[:count], v[count:], seed=derive(seed, "probe-colour", name))
            for name, v in values.items()}


def grating_frequencies(side: int) -> list[float]:
    """Octaves 1, 2, 4, ... cycles per image below MAX_CYCLES_PER_PIXEL of the side: up to
    64 cycles (0.29 per pixel) at 224 px, 8 at 28 or 32 px. `data.probes.default_frequencies`
    stops at a quarter of the side (32 cycles = 0.14 per pixel at 224 px), below where the 3x3
    filters of a first layer respond best."""
    out, f = [], 1.0
    while f < MAX_CYCLES_PER_PIXEL * side:
        out.append(f)
        f *= 2
    return out or [1.0]


def _grating_pass(module, layers, layer_map, side, device, batch_size, show_progress, seed):
    """Gratings and, last, one blank image of their mean luminance (0.5): its response is each
    unit's baseline, subtracted from its grating responses (see core.probes.grating_tuning)."""
    channels = _image_shape(layer_map)[0]
    images, info = gratings(side, ORIENTATIONS, grating_frequencies(side), PHASES, channels=channels)
    stimuli = torch.cat([images, torch.full((1, channels, side, side), 0.5)])
    values = _capture(module, layers, stimuli, stimuli.shape[0], layer_map, device, batch_size, show_progress)
    found = {name: grating_tuning(v[:-1], info, baseline=v[-1], seed=derive(seed, "probe-orientation", name))
             for name, v in values.items()}
    shown = {"gratings": int(images.shape[0]), "size": side, "orientations": ORIENTATIONS, "phases": PHASES,
             "frequencies": sorted(set(info["frequency"].tolist())), "baseline": "uniform 0.5 image"}
    return found, shown


# ---------------------------------------------------------------------------------------------
# Assembly


def _stage_note(layer: Layer) -> tuple[str, ...]:
    if layer.activation:
        return ()
    return (f"no nonlinearity follows {layer.name}: post-activation = pre-activation, so its responses are "
            f"not rectified (the OSI rectifies the tuning)",)


def _result(layer: Layer, notes: list[str], colour, tuning, filters,
            stimuli: dict[str, Any]) -> ProbeResult:
    values: dict[str, np.ndarray] = {}
    categories: dict[str, np.ndarray] = {}
    rules: dict[str, str] = {}
    ran = []
    if colour is not None:
        ran.append("colour")
        values.update(colour_selectivity=colour.selectivity, colour_p=colour.p, colour_q=colour.q)
        categories.update(colour.categories())
        rules.update(colour.rules())
    if tuning is not None:
        ran.append("orientation")
        values.update(preferred_orientation_deg=tuning.preferred_orientation_deg,
                      preferred_frequency=tuning.preferred_frequency,
                      preferred_cycles_per_pixel=tuning.preferred_cycles_per_pixel, osi=tuning.osi,
                      osi_p=tuning.osi_p, osi_q=tuning.osi_q, frequency_modulation=tuning.frequency_modulation,
                      grating_drive=tuning.peak)
        categories.update(tuning.categories())
        rules.update(tuning.rules())
    if filters is not None:
        ran.append("filter")
        if filters.colourfulness is not None:
            values.update(filter_colourfulness=filters.colourfulness, filter_grey_p=filters.grey_p,
                          filter_grey_q=filters.grey_q)
        else:
            notes.append(f"filter colour: not applicable: {layer.name} reads {filters.channels}-channel images; "
                         f"only the filter frequency is given")
        values["filter_frequency"] = filters.frequency
        categories.update(filters.categories())
        rules.update(filters.rules())
    shown = {k: v for k, v in stimuli.items() if k in ran}
    return ProbeResult(layer.name, layer.units, values, categories, rules, probes=tuple(ran),
                       notes=tuple(notes) + (_stage_note(layer) if colour is not None or tuning is not None else ()),
                       stimuli=shown)


def _filters(module, layer_map, layer: Layer):
    weights = layer_weights(module, layer_map, layer, dense_groups=True).weights
    if weights.shape[0] != layer.units:
        return None, f"filter: not applicable: {layer.name} has {layer.units} units and {weights.shape[0]} filters"
    return filter_properties(weights), None


def probe_layers(module: nn.Module, layer_map: LayerMap, layers: Sequence[str], probes: Sequence[str] = PROBES, *,
                 data=None, size: int | None = None, device=None, seed: int = 0, batch_size: int = 64,
                 show_progress: bool = True) -> dict[str, ProbeResult]:
    """Run `probes` on `layers` of `module`: one capture pass for the colour images and their
    grey versions, one for the gratings, all layers at once.

    `data`: colour images in [0, 1] (a tensor [N, 3, H, W] or a Dataset) for the colour probe;
    default: `DEFAULT_PHOTOS` photo patches at `size`. `size`: side of the gratings and default
    photos (default: the model's input side). A probe that does not apply to a layer (colour
    on a model that reads 1-channel images; filter on a layer that does not read the image) is
    skipped with a note in that layer's result.
    """
    probes = check_probes(probes)
    chosen = list({layer.name: layer for layer in map(layer_map.resolve, layers)}.values())
    if not chosen:
        raise UsageError("name at least one layer to probe")
    channels, height, width = _image_shape(layer_map)
    if size is None and height != width:
        raise UsageError(f"the model takes {height}x{width} images; probes make square ones: give size=")
    side = int(size or height)
    notes = {layer.name: [] for layer in chosen}
    wanted = {p: [] for p in probes}
    for layer in chosen:
        for p in probes:
            reason = not_applicable(module, layer_map, layer, p)
            if reason:
                notes[layer.name].append(reason)
            else:
                wanted[p].append(layer)
    stimuli: dict[str, Any] = {}
    colour = {}
    if wanted.get("colour"):
        if data is None:
            from ..data import open_dataset

            spec = default_photos_spec(side)
            data = open_dataset(spec, seed=seed, default_size=side)
            stimuli["colour"] = {"data": spec, "images": len(data)}
        else:
            stimuli["colour"] = {"data": getattr(data, "spec", "given"), "images": _dataset_length(data)}
        colour = _colour_pass(module, wanted["colour"], layer_map, data, device, batch_size, show_progress, seed)
    tuning = {}
    if wanted.get("orientation"):
        tuning, stimuli["orientation"] = _grating_pass(module, wanted["orientation"], layer_map, side, device,
                                                       batch_size, show_progress, seed)
    filters = {}
    for layer in wanted.get("filter", []):
        found, reason = _filters(module, layer_map, layer)
        if found is None:
            notes[layer.name].append(reason)
        else:
            filters[layer.name] = found
    return {layer.name: _result(layer, notes[layer.name], colour.get(layer.name), tuning.get(layer.name),
                                filters.get(layer.name), stimuli) for layer in chosen}
