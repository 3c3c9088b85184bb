"""Progress bars on stderr, off when NETANATOMY_PROGRESS=0 (tests) or when asked."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("NETANATOMY_PROGRESS", "1") not in ("0", "false", "no", "")


def progress(iterable: Iterable[T] | None = None, *, desc: str = "", total: int | None = None,
             unit: str = "it", leave: bool = False, disable: bool | None = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr; use it around any loop a user may wait on."""
    if disable is None:
        disable = not enabled()
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                disable=disable, dynamic_ncols=True, **kwargs)


def iterate(iterable: Iterable[T], **kwargs: Any) -> Iterator[T]:
    yield from progress(iterable, **kwargs)
