"""Model sources: `zoo:NAME`, `path/to/file.py:FACTORY`, `torchvision:NAME`, `timm:NAME`.

Whatever the source, the loaded module takes images in [0, 1] (N x C x H x W) and normalizes
its own input: zoo models inside `forward`; torchvision and timm models through a forward
pre-hook that applies their ImageNet mean and std. A user's factory must do the same (or be
given `normalize=`).
"""
from __future__ import annotations

import ast
import importlib
import importlib.resources
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError, suggest
from ..util.devices import resolve_device
from .weights import apply_state_dict, load_weights, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LoadedModel:
    """A model ready for analysis: in eval mode, on its device, with what we know about it."""

    module: nn.Module
    source: str
    input_shape: tuple[int, ...] | None
    num_classes: int | None = None
    weights: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    description: str = ""

    @property
    def device(self) -> torch.device:
        for tensor in self.module.parameters():
            return tensor.device
        return torch.device("cpu")


def parse_model_args(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """'key=value' strings to a dict; values are Python literals when they parse as one."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"model argument {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key.isidentifier():
            raise UsageError(f"model argument name {key!r} is not a valid identifier")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def split_source(source: str) -> tuple[str, str]:
    """('zoo'|'torchvision'|'timm'|'file', rest)."""
    source = source.strip()
    for scheme in ("zoo", "torchvision", "timm"):
        if source.startswith(scheme + ":"):
            return scheme, source[len(scheme) + 1:]
    if ".py:" in source:
        return "file", source
    if source.endswith(".py"):
        raise UsageError(f"model {source!r} names a file but no factory: use {source}:FACTORY")
    raise UsageError(
        f"cannot read model {source!r}: use zoo:NAME, torchvision:NAME, timm:NAME or path/to/file.py:FACTORY"
    )


class _Normalize:
    """A forward pre-hook that maps [0, 1] images to a model's expected mean/std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        std = self.std.to(device=x.device, dtype=x.dtype)
        return ((x - mean) / std,) + tuple(args[1:])


def add_normalization(module: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Make `module` take [0, 1] images: subtract mean, divide by std before its forward."""
    module.register_forward_pre_hook(_Normalize(mean, std))
    module.netanatomy_normalize = (tuple(mean), tuple(std))
    return module


def _from_zoo(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    from .zoo import get_entry

    entry = get_entry(name)
    base = get_entry(entry.base) if entry.base else entry
    merged = {**base.default_kwargs, **entry.default_kwargs, **kwargs}
    try:
        module = base.factory(**merged)
    except TypeError as exc:
        raise UsageError(f"zoo:{name} does not take these arguments: {exc}") from exc
    info = {"input_shape": entry.input_shape, "num_classes": entry.num_classes, "description": entry.description}
    if entry.weights:
        resource = importlib.resources.files("netanatomy") / "resources" / "models" / entry.weights
        with importlib.resources.as_file(resource) as path:
            if not Path(path).is_file():
                raise UsageError(f"bundled weights {entry.weights} for zoo:{name} are missing from the package")
            if kwargs:
                raise UsageError(f"zoo:{name} has bundled trained weights; model arguments would not fit them")
            apply_state_dict(module, read_state_dict(path), source=f"bundled weights of zoo:{name}")
        info["weights"] = f"bundled:{entry.weights}"
    return module, info


def _from_hub(library: str, name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    try:
        lib = importlib.import_module(library)
    except Exception as exc:  # ImportError, or a broken install that fails on import
        raise UsageError(f"{library}:{name} needs the {library} package, which does not import here "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); use zoo: or a file:FACTORY") from exc
    try:
        if library == "torchvision":
            known = lib.models.list_models()
            if name not in known:
                raise UsageError(f"torchvision has no model {name!r}{suggest(name, known)}")
            module = lib.models.get_model(name, weights=None, **kwargs)
        else:
            known = lib.list_models()
            if name not in known:
                raise UsageError(f"timm has no model {name!r}{suggest(name, known)}")
            module = lib.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise UsageError(f"{library}:{name} does not take these arguments: {exc}") from exc
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if library == "timm":
        cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))
        shape = tuple(cfg.get("input_size", (3, 224, 224)))
    else:
        shape = (3, 224, 224)
    add_normalization(module, mean, std)
    return module, {"input_shape": shape, "num_classes": kwargs.get("num_classes")}


def _from_file(source: str, kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    path_text, factory_name = source.rsplit(":", 1)
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UsageError(f"model file not found: {path}")
    if not factory_name.isidentifier():
        raise UsageError(f"{factory_name!r} is not a Python function name (in {source})")
    module_name = f"netanatomy_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path} as Python")
    pymod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = pymod
    try:
        spec.loader.exec_module(pymod)
    except SyntaxError as exc:
        raise UsageError(f"{path} has a syntax error at line {exc.lineno}: {exc.msg}") from exc
    factory: Callable | None = getattr(pymod, factory_name, None)
    if factory is None or not callable(factory):
        names = [n for n, v in vars(pymod).items() if callable(v) and not n.startswith("_")]
        raise UsageError(f"{path} has no function {factory_name!r}{suggest(factory_name, names)}")
    try:
        module = factory(**kwargs)
    except TypeError as exc:
        raise UsageError(f"{source} does not take these arguments: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise UsageError(f"{source} returned a {type(module).__name__}, not a torch.nn.Module")
    return module, {}


def load_model(source: str, *, weights: str | None = None, model_args: Sequence[str] | Mapping[str, Any] | None = None,
               device: str | torch.device = "cpu", normalize: tuple[Sequence[float], Sequence[float]] | None = None,
               seed: int | None = 0) -> LoadedModel:
    """Build the model named by `source`, load `weights` strictly, and put it in eval mode on `device`.

    Random initialization runs under `seed` (without touching the global random state), so a
    model without weights is the same model for the same seed. `normalize=(mean, std)` adds
    input normalization to a user's model that expects it.
    """
    kwargs = parse_model_args(model_args)
    scheme, rest = split_source(source)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if scheme == "zoo":
            module, info = _from_zoo(rest, kwargs)
        elif scheme in ("torchvision", "timm"):
            module, info = _from_hub(scheme, rest, kwargs)
        else:
            module, info = _from_file(rest, kwargs)
    if weights:
        load_weights(module, weights)
        info["weights"] = str(weights)
    if normalize is not None:
        add_normalization(module, *normalize)
    module.eval()
    module.to(resolve_device(device))
    input_shape = getattr(module, "netanatomy_input_shape", None) or info.get("input_shape")
    aliases = dict(getattr(module, "netanatomy_aliases", {}) or {})
    return LoadedModel(
        module=module,
        source=source,
        input_shape=tuple(input_shape) if input_shape else None,
        num_classes=info.get("num_classes") or _guess_classes(module),
        weights=info.get("weights"),
        aliases=aliases,
        description=info.get("description", ""),
    )


def _guess_classes(module: nn.Module) -> int | None:
    last = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            last = sub
    return last.out_features if last is not None else None
