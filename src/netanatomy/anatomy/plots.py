"""Figures for weight analyses (matplotlib, no display needed)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.pictures import filters_to_rgb
from .svd import SVDReport

__all__ = ["svd_placement_figure"]


def svd_placement_figure(report: SVDReport) -> Any:
    """Lower units (left) and upper units (right) placed by singular vectors 0 and 1 of |W|.

    First-layer lower units are drawn as their RGB filters at their positions; others as
    points. Axis titles give each vector's share of |W|'s squared norm.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    svd = report.svd
    shares = svd.shares.tolist() + [0.0, 0.0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    for ax, coords, title in ((axes[0], svd.lower, f"{report.lower} (lower units)"),
                              (axes[1], svd.upper, f"{report.upper} (upper units)")):
        xy = coords[:, :2].numpy() if coords.shape[1] > 1 else np.c_[coords[:, 0].numpy(), np.zeros(len(coords))]
        ax.scatter(xy[:, 0], xy[:, 1], s=8, c="0.6")
        ax.set_xlabel(f"singular vector 0 ({100 * shares[0]:.1f}% of |W|^2)")
        ax.set_ylabel(f"singular vector 1 ({100 * shares[1]:.1f}%)")
        ax.set_title(title)
        ax.axhline(0, color="0.85", lw=0.8, zorder=0)
        ax.axvline(0, color="0.85", lw=0.8, zorder=0)
    if report.filters is not None:
        images = filters_to_rgb(report.filters)
        xy = svd.lower[:, :2].numpy()
        zoom = 28.0 / max(images.shape[1], 1) / 10
        for img, (x, y) in zip(images, xy):
            box = OffsetImage(np.kron(img, np.ones((4, 4, 1))), zoom=zoom * 2.5)
            axes[0].add_artist(AnnotationBbox(box, (x, y), frameon=False))
        axes[0].update_datalim(xy)
        axes[0].autoscale_view()
    fig.tight_layout()
    return fig
