"""Loading state dicts safely and strictly.

A checkpoint is data, never code: .pt/.pth files are read with `torch.load(weights_only=True)`,
which refuses pickles that would import or call anything beyond tensors and plain containers;
.safetensors files hold no code by construction. A mismatch names the missing, unexpected and
mis-shaped keys instead of failing deep inside PyTorch.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar"}
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "weights")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from .pt/.pth (weights-only) or .safetensors, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        state = _read_torch(path)
    else:
        raise UsageError(f"unknown weights format {suffix or '(no suffix)'!r} for {path}: use .pt, .pth or .safetensors")
    return _unwrap(state, path)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file: {exc}") from exc


def _read_torch(path: Path) -> object:
    try:
        with warnings.catch_warnings():  # torch's loading warnings are not the user's business
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = " ".join(str(exc).split())
        glob = re.search(r"GLOBAL ([\w.]+)", text)
        if glob is not None:
            raise UsageError(
                f"refused to load {path}: it is a pickle of Python objects ({glob.group(1)}) that would run code when "
                f"loaded, not a plain state dict; save model.state_dict() instead, or use .safetensors"
            ) from exc
        detail = text.split("WeightsUnpickler error:")[-1].split(" Check the documentation")[0].strip()
        raise UsageError(f"{path} is not a readable PyTorch state dict ({detail[:160] or type(exc).__name__})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as exc:
        detail = " ".join(str(exc).split())[:200] or ("the file is empty" if path.stat().st_size == 0
                                                     else type(exc).__name__)
        raise UsageError(f"{path} is not a readable PyTorch state dict: {detail}") from exc


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one wrapped as {'state_dict': ...} (common in training scripts)."""
    if isinstance(state, Mapping) and not _all_tensors(state):
        for key in WRAPPER_KEYS:
            inner = state.get(key)
            if isinstance(inner, Mapping) and inner and _all_tensors(inner):
                state = inner
                break
    if not isinstance(state, Mapping) or not state:
        raise UsageError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    if not _all_tensors(state):
        bad = next(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise UsageError(f"{path} is not a plain state dict: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    return {str(k): v for k, v in state.items()}


def _all_tensors(mapping: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a 'module.' prefix (DataParallel) when that makes the keys fit."""
    if state and not (set(state) & expected):
        for prefix in ("module.", "model."):
            if all(k.startswith(prefix) for k in state):
                return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys, and 'key: file shape vs model shape' for mis-shaped ones."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, misshaped


def apply_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Load `state` into `module` strictly, or raise UsageError naming every mismatch."""
    state = _strip_prefix(dict(state), set(module.state_dict()))
    missing, unexpected, misshaped = check_state_dict(module, state)
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_listing(misshaped, 3)}")
    if problems:
        raise UsageError(f"{source} does not fit the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def load_weights(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Read `path` safely and load it strictly into `module`."""
    apply_state_dict(module, read_state_dict(path), source=str(path))
    return module


def check_finite(tensors: nn.Module | Mapping[str, torch.Tensor], source: str = "the model") -> None:
    """Refuse NaN or Inf in a module's parameters and buffers (or a state dict), naming the first.

    Every method assumes finite weights; one NaN spreads through sums and SVDs and comes out as
    an error far from its cause, or as numbers that look like results.
    """
    state = tensors.state_dict(keep_vars=False) if isinstance(tensors, nn.Module) else tensors
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        finite = torch.isfinite(value)
        if bool(finite.all()):
            continue
        bad = int((~finite).sum())
        kinds = [k for k, n in (("NaN", int(torch.isnan(value).sum())), ("Inf", int(torch.isinf(value).sum()))) if n]
        raise UsageError(f"{source} has non-finite weights: {name} holds {bad} {' and '.join(kinds)} value"
                         f"{'s' if bad != 1 else ''} (of {value.numel()}); every method needs finite weights")


def save_state_dict(module_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict atomically; .safetensors or a weights-only-loadable .pt/.pth."""
    from ..util.io import atomic_open

    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else dict(module_or_state)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save

        with atomic_open(path, "wb") as handle:
            handle.write(save(state))
    else:
        with atomic_open(path, "wb") as handle:
            torch.save(state, handle)
    return path
