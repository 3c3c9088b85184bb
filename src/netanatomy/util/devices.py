"""Device selection: a parameter everywhere, never hard-coded."""
from __future__ import annotations

import torch

from ..errors import UsageError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' picks CUDA when present; anything else must name an available device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but CUDA is not available here")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"device {device!r} asked for, but MPS is not available here")
    return dev
