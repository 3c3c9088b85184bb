"""matplotlib's pyplot on the file-only Agg backend: figures are written, never shown, and no
display is needed (CI, servers, notebooks over SSH)."""
from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot`, with the Agg backend chosen unless one was set already."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
