"""Device selection: a parameter everywhere, never hard-coded."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import UsageError


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch in one thread, and give the caller's count back.

    On a CPU shared with other jobs, two torch threads on two cores wait for each other at
    every operation of small tensors (7 to 25 times slower on the labs' small maps than one
    thread), and LAPACK's threaded eigensolver stalls (1.5 s vs 3 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def synchronize(device: str | torch.device | None) -> None:
    """Wait for a CUDA device's queued work (before reading a clock: its calls return at once)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def ieee_float32(device: str | torch.device | None) -> Iterator[None]:
    """Full IEEE float32 in cuDNN's convolutions and cuBLAS's products while inside, on CUDA.

    PyTorch lets cuDNN run float32 convolutions in TF32 (a 10-bit mantissa) by default: errors
    of about 1e-3 of a logit, the size of the lesion counts' near-tie tolerance. Counts that
    must equal float64's need IEEE float32. Uses the fp32_precision settings where torch has
    them (mixing them with the older allow_tf32 flags is an error there), else those flags."""
    if device is None or torch.device(device).type != "cuda":
        yield
        return
    backends = torch.backends
    conv = getattr(backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = conv.fp32_precision, backends.cuda.matmul.fp32_precision
        conv.fp32_precision, backends.cuda.matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, backends.cuda.matmul.fp32_precision = saved
        return
    saved_legacy = backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32
    backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = False, False
    try:
        yield
    finally:
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = saved_legacy
