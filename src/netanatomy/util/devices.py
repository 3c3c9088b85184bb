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
