"""Model sources: `zoo:NAME`, `path/to/file.py:FACTORY`, `torchvision:NAME`, `timm:NAME`.

Whatever the source, the loaded module takes images in [0, 1] (N x C x H x W) and normalizes
its own input: zoo models inside `forward`; torchvision and timm models through a forward
pre-hook that applies their ImageNet mean and std. A user's factory must do the same (or be
given `normalize=`).
"""
from __future__ import annotations

import ast
import collections.abc
import importlib
import importlib.resources
import importlib.util
import inspect
import sys
import traceback
import types
import typing
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
FASHION_MNIST_SUFFIX = "-fmnist"  # zoo entries with bundled weights trained on Fashion-MNIST


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
    class_names: tuple[str, ...] | None = None   # one name per output, when known
    declared_input_shape: tuple[int, ...] | None = None  # what the model declares (before --input-shape)

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


def _takes_weights(factory: Callable) -> bool:
    try:
        return "weights" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _from_zoo(name: str, kwargs: dict[str, Any], weights: str | None = None) -> tuple[nn.Module, dict]:
    """Build a zoo entry. An entry whose factory finds its own weights (a `weights` parameter,
    e.g. the ImageNet entries) is given the user's --weights file there, where it is hash-checked;
    `info["weights_loaded"]` then says that the generic load is not needed."""
    from .zoo import get_entry

    entry = get_entry(name)
    base = get_entry(entry.base) if entry.base else entry
    passed = False
    if weights and _takes_weights(base.factory):
        if "weights" in kwargs:
            raise UsageError(f"zoo:{name} was given its weights twice (--weights and --model-arg weights=): "
                             f"give --weights FILE alone")
        kwargs = {**kwargs, "weights": str(weights)}
        passed = True
    kwargs = check_arguments(base.factory, kwargs, f"zoo:{name}")
    merged = {**base.default_kwargs, **entry.default_kwargs, **kwargs}
    if not kwargs:
        module = base.factory(**merged)  # our defaults: an exception here is a fault of ours
    else:
        try:
            module = base.factory(**merged)
        except UsageError:
            raise
        except Exception as exc:  # only the user's values differ from a build that works
            given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise UsageError(f"zoo:{name} cannot be built with {given}: {_exception_text(exc)}") from exc
    info = {"input_shape": entry.input_shape, "num_classes": entry.num_classes, "description": entry.description,
            "weights_loaded": passed}
    if entry.weights and name.endswith(FASHION_MNIST_SUFFIX):  # the bundled models trained on Fashion-MNIST
        from ..data.spec import FASHION_MNIST_CLASSES

        info["class_names"] = tuple(FASHION_MNIST_CLASSES)
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
    except UsageError:
        raise
    except Exception as exc:
        if not kwargs:
            raise
        raise UsageError(f"{library}:{name} does not take these arguments: {_exception_text(exc)}") from exc
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
    pymod = _import_user_file(path)
    factory: Callable | None = getattr(pymod, factory_name, None)
    if factory is None or not callable(factory):
        names = [n for n, v in vars(pymod).items() if callable(v) and not n.startswith("_")]
        raise UsageError(f"{path} has no function {factory_name!r}{suggest(factory_name, names)}")
    kwargs = check_arguments(factory, kwargs, source)
    try:
        module = factory(**kwargs)
    except Exception as exc:  # the user's code: say so, with the line where it failed
        raise UsageError(f"{factory_name}() in your model file {path} raised {_exception_text(exc)}"
                         f"{_user_line(exc, path)}") from exc
    if not isinstance(module, nn.Module):
        raise UsageError(f"{source} returned a {type(module).__name__}, not a torch.nn.Module")
    return module, {}


def _import_user_file(path: Path) -> types.ModuleType:
    """Import a user's model file; whatever fails there is reported as their code, not ours."""
    module_name = f"netanatomy_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path} as Python")
    pymod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = pymod
    try:
        spec.loader.exec_module(pymod)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise UsageError(f"your model file {path} has a syntax error at line {exc.lineno}: {exc.msg}") from exc
    except Exception as exc:  # ImportError, or any exception raised while the file runs
        sys.modules.pop(module_name, None)
        raise UsageError(f"your model file {path} failed to import: {_exception_text(exc)}"
                         f"{_user_line(exc, path)}") from exc
    return pymod


def _exception_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _user_line(exc: BaseException, path: Path) -> str:
    """' at line N': the last line of the user's file in the exception's traceback, or ''."""
    target = str(path.resolve())
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__)
             if Path(frame.filename).resolve().as_posix() == Path(target).as_posix()]
    return f" at line {lines[-1]}" if lines else ""


# -- model arguments: checked against the factory's signature before it runs ------------------

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false (1 or 0)", str: "a string",
               tuple: "a tuple like (1, 2)", list: "a list like [1, 2]", dict: "a dict like {'a': 1}"}
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _signature_of(func: Callable) -> tuple[inspect.Signature, dict[str, Any]] | None:
    """The signature and type hints that `func`'s keyword arguments answer to.

    A factory that only passes **kwargs on to the class it returns (`def mlp(**kw) -> MLP`)
    answers to that class's __init__.
    """
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    target: Any = func
    if all(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in sig.parameters.values()) and sig.parameters:
        ret = _hints(func).get("return")
        if isinstance(ret, type):
            try:
                sig, target = inspect.signature(ret), ret.__init__
            except (TypeError, ValueError):
                return None
    return sig, _hints(target)


def _hints(func: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(func)
    except Exception:  # an annotation that does not resolve: check nothing against it
        return {}


def check_arguments(func: Callable, kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """`kwargs` checked against `func`'s parameters and their types, with bool words converted.

    A name the function does not take, or a value of the wrong type (width=abc for an int),
    is the user's input, named in one UsageError before any user code runs.
    """
    if not kwargs:
        return kwargs
    found = _signature_of(func)
    if found is None:
        return kwargs
    sig, hints = found
    params = sig.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    out = {}
    for key, value in kwargs.items():
        param = params.get(key)
        if param is None or param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            if takes_any:
                out[key] = value
                continue
            raise UsageError(f"{what} takes no argument {key!r}{suggest(key, named)}; "
                             f"it takes: {', '.join(named) or 'none'}")
        expected = hints.get(key, inspect.Parameter.empty)
        if expected is inspect.Parameter.empty and param.default is not inspect.Parameter.empty:
            expected = _from_default(param.default)
        if expected is inspect.Parameter.empty:
            out[key] = value
            continue
        ok, converted = _fit(value, expected)
        if not ok:
            raise UsageError(f"--model-arg {key}={_show(value)}: {what} expects {_describe(expected)} "
                             f"for {key}, not {type(value).__name__} {_show(value)}")
        out[key] = converted
    return out


def _from_default(default: Any) -> Any:
    """A loose type for an unannotated parameter, from its default: numbers stay numbers (an int
    default may be given 0.5), None is always allowed, and anything else is not checked."""
    if isinstance(default, bool):
        return bool | None
    if isinstance(default, (int, float)):
        return float | None
    if isinstance(default, str):
        return str | None
    if isinstance(default, (tuple, list)):
        return tuple | list | None
    return inspect.Parameter.empty


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fit(value: Any, tp: Any) -> tuple[bool, Any]:
    """(does `value` fit the annotation `tp`, the value to pass); unknown annotations fit anything."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True, value
    if tp is None or tp is type(None):
        return value is None, value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        # exact matches first, so that 1 stays an int in int | bool
        for member in args:
            if _exact(value, member):
                return True, value
        for member in args:
            ok, converted = _fit(value, member)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if tp is bool:
        if isinstance(value, bool):
            return True, value
        if isinstance(value, int) and value in (0, 1):
            return True, bool(value)
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return True, value.lower() in _TRUE
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if tp is str:
        if isinstance(value, str):
            return True, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)  # variant=5 parses as a number
        return False, value
    container = origin or tp
    if container in (tuple, list, collections.abc.Sequence, collections.abc.Iterable,
                     collections.abc.Collection, typing.Sequence):
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            return False, value
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                return False, value
            return all(_fit(v, a)[0] for v, a in zip(value, args)), value
        item = args[0] if args else Any
        return all(_fit(v, item)[0] for v in value), value
    if container in (dict, collections.abc.Mapping, typing.Mapping):
        return isinstance(value, dict), value
    if isinstance(tp, type) and tp in _TYPE_NAMES:
        return isinstance(value, tp), value
    return True, value  # a class, a callable, a protocol: nothing a command line can check


def _exact(value: Any, tp: Any) -> bool:
    if tp is None or tp is type(None):
        return value is None
    return isinstance(tp, type) and tp in _TYPE_NAMES and type(value) is tp


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(dict.fromkeys(parts))
        return text + (" (or None)" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    container = origin or tp
    if container in (tuple, list, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection):
        item = args[0] if args else None
        return "a tuple like (1, 2)" if item is None else f"a tuple of {_plural(item)} like (1, 2)"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, _describe(tp))


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
            module, info = _from_zoo(rest, kwargs, weights)
        elif scheme in ("torchvision", "timm"):
            module, info = _from_hub(scheme, rest, kwargs)
        else:
            module, info = _from_file(rest, kwargs)
    if weights:
        if not info.get("weights_loaded"):
            load_weights(module, weights)
        info["weights"] = str(weights)
    if normalize is not None:
        add_normalization(module, *normalize)
    module.eval()
    module.to(resolve_device(device))
    input_shape = getattr(module, "netanatomy_input_shape", None) or info.get("input_shape")
    aliases = dict(getattr(module, "netanatomy_aliases", {}) or {})
    names = getattr(module, "netanatomy_class_names", None) or info.get("class_names")
    return LoadedModel(
        module=module,
        source=source,
        input_shape=tuple(input_shape) if input_shape else None,
        num_classes=info.get("num_classes") or _guess_classes(module),
        weights=info.get("weights"),
        aliases=aliases,
        description=info.get("description", ""),
        class_names=tuple(str(n) for n in names) if names else None,
        declared_input_shape=tuple(input_shape) if input_shape else None,
    )


def class_name(loaded: LoadedModel, index: int) -> str:
    """The name of output class `index` of `loaded` ('Egyptian cat'), or '' when it has none."""
    names = loaded.class_names
    return names[int(index)] if names and 0 <= int(index) < len(names) else ""


def logits_layer(loaded: LoadedModel, layer_map) -> str | None:
    """The name of the layer whose units are `loaded`'s named classes: the last conv or linear
    layer, when it has one unit per class name; None otherwise (no names, or another width)."""
    if not loaded.class_names:
        return None
    last = None
    for layer in layer_map.values():
        if layer.kind in ("conv", "linear"):
            last = layer
    return last.name if last is not None and last.units == len(loaded.class_names) else None


def _guess_classes(module: nn.Module) -> int | None:
    last = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            last = sub
    return last.out_features if last is not None else None
