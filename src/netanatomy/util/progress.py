"""Progress on stderr, off when NETANATOMY_PROGRESS=0 (tests) or when asked.

On a terminal (or in a notebook) it is a tqdm bar. When stderr is not a terminal (a log
file, a pipe, a batch job) bars would write a carriage-return frame per refresh into the
log, so progress is plain lines instead: one line when a stage ends, with its count and
elapsed time, and while it runs at most one line every `NETANATOMY_PROGRESS_INTERVAL`
seconds (default 30). NETANATOMY_PROGRESS=plain or =bar forces one or the other.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_OFF = ("0", "false", "no", "")
DEFAULT_INTERVAL = 30.0
_now = time.monotonic  # the clock (a module attribute, so tests can set it)


def enabled() -> bool:
    return os.environ.get("NETANATOMY_PROGRESS", "1").lower() not in _OFF


def _interactive(stream: Any) -> bool:
    """A terminal, or a Jupyter kernel's stream (which tqdm.auto draws as a widget)."""
    mode = os.environ.get("NETANATOMY_PROGRESS", "1").lower()
    if mode in ("plain", "bar"):
        return mode == "bar"
    if type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("NETANATOMY_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


class PlainProgress:
    """The part of tqdm's interface the project uses, as plain lines (see the module docstring).

    `update`, `close`, `set_postfix`, `set_postfix_str`, `set_description`, iteration, and use
    as a context manager; `n` and `total` as in tqdm.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, desc: str = "", total: int | None = None,
                 unit: str = "it", initial: int = 0, file: Any = None, interval: float | None = None,
                 **_ignored: Any) -> None:
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.desc, self.total, self.unit, self.n = desc, total, unit, int(initial)
        self.file = sys.stderr if file is None else file
        self.interval = _interval() if interval is None else interval
        self.postfix = ""
        self.start = self.last = _now()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress has no iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _line(self, state: str) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        elapsed = _now() - self.start
        label = f"{self.desc}: " if self.desc else ""
        return f"{label}{state}{count} {self.unit} in {elapsed:.1f} s{self.postfix}"

    def _write(self, line: str) -> None:
        try:
            print(line, file=self.file, flush=True)
        except (ValueError, OSError):  # stderr closed under us: progress is not worth a crash
            pass

    def update(self, n: int | float = 1) -> None:
        self.n += int(n)
        now = _now()
        if not self.closed and now - self.last >= self.interval and (self.total is None or self.n < self.total):
            self.last = now
            self._write(self._line(""))

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = (", " + ", ".join(f"{k}={v}" for k, v in items.items())) if items else ""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = f", {s}" if s else ""

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(self._line("done, "))


def progress(iterable: Iterable[T] | None = None, *, desc: str = "", total: int | None = None,
             unit: str = "it", leave: bool = False, disable: bool | None = None, **kwargs: Any) -> Any:
    """Progress on stderr around any loop a user may wait on: a tqdm bar on a terminal, plain
    lines otherwise (see the module docstring); a pass-through when disabled."""
    if disable is None:
        disable = not enabled()
    if not disable and not _interactive(sys.stderr):
        return PlainProgress(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, **kwargs)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                disable=disable, dynamic_ncols=True, **kwargs)


def iterate(iterable: Iterable[T], **kwargs: Any) -> Iterator[T]:
    yield from progress(iterable, **kwargs)
