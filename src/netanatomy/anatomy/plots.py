"""Figures for weight analyses (matplotlib, no display needed)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.pictures import filters_to_rgb
from ..util.figures import pyplot
from .svd import SVDReport

__all__ = ["kernel_energy_figure", "svd_placement_figure", "weights_figure"]

# distinguishable colours for up to ten branches (matplotlib's tab10)
_BRANCH_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf"]


def svd_placement_figure(report: SVDReport, *, groups: dict[str, tuple[np.ndarray, list[str]]] | None = None) -> Any:
    """Lower units (left) and upper units (right) placed by singular vectors 0 and 1 of |W|.

    First-layer lower units are drawn as their RGB filters at their positions; others as
    points. Axis titles give each vector's share of |W|'s squared norm. `groups` colours the
    points of a side ("lower" / "upper") by a label per unit (e.g. its branch) with a legend.
    """
    plt = pyplot()
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    svd = report.svd
    shares = svd.shares.tolist() + [0.0, 0.0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    for ax, coords, title in ((axes[0], svd.lower, f"{report.lower} (lower units)"),
                              (axes[1], svd.upper, f"{report.upper} (upper units)")):
        xy = coords[:, :2].numpy() if coords.shape[1] > 1 else np.c_[coords[:, 0].numpy(), np.zeros(len(coords))]
        side = "lower" if ax is axes[0] else "upper"
        if groups and side in groups and len(groups[side][0]) == len(xy):
            labels, names = groups[side]
            for g, gname in enumerate(names):
                pick = np.asarray(labels) == g
                ax.scatter(xy[pick, 0], xy[pick, 1], s=14, color=_BRANCH_COLOURS[g % len(_BRANCH_COLOURS)],
                           label=f"{gname} ({int(pick.sum())})", zorder=3)
            ax.legend(fontsize=7, title="branch (units)", title_fontsize=7, loc="best")
        else:
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
    through = "expanded weights" in (report.note or "")
    matrix = f"expanded weights {report.lower} -> {report.upper}" if through else f"{report.upper}'s |W|"
    fig.suptitle(f"SVD of |W| ({matrix}, summed over positions{', centred' if svd.centered else ''}): "
                 f"units placed by singular vectors 0 and 1", fontsize=11)
    caption = "points: units, coloured by branch; " if groups else "grey points: units; "
    if report.filters is not None:
        caption = (f"left: each {report.lower} unit drawn as its filter, as the RGB image it responds to most "
                   "(grey = 0, per filter 0.5 + w / 2 max|w|); ")
    caption += "coordinates: the unit's entry in each singular vector (sign fixed so the largest entry is positive)"
    fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    return fig


def kernel_energy_figure(kernels: Any, units: Any, *, title: str, subtitle: str = "", columns: int = 8) -> Any:
    """The kernels [N, kh, kw] of the given units drawn on one shared diverging scale, each
    labelled with its unit number, its share of the layer's energy and its own H and V (the
    banding score's row and column shares): which kernels carry a layer's banding score."""
    plt = pyplot()

    k = np.asarray(kernels, dtype=np.float64)
    n = k.shape[0]
    centred = k - k.mean(axis=(1, 2), keepdims=True)
    total = (centred ** 2).sum(axis=(1, 2))
    rows = centred.sum(axis=2) ** 2 / k.shape[2]
    cols = centred.sum(axis=1) ** 2 / k.shape[1]
    h = rows.sum(axis=1) / np.maximum(total, 1e-300)
    v = cols.sum(axis=1) / np.maximum(total, 1e-300)
    share = np.asarray(units.get("share")) if isinstance(units, dict) else None
    labels = units["units"] if isinstance(units, dict) else list(units)
    columns = min(columns, n)
    grid_rows = -(-n // columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(1.35 * columns + 1.2, 1.55 * grid_rows + 1.1), squeeze=False)
    scale = float(np.abs(k).max()) or 1.0
    image = None
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        image = ax.imshow(k[i], cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
        energy = f"{100 * share[i]:.1f}% " if share is not None else ""
        ax.set_title(f"unit {labels[i]}\n{energy}H {h[i]:.2f} V {v[i]:.2f}", fontsize=7.5)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02)
        bar.set_label("weight (batch norm folded), shared scale", fontsize=8)
    return fig


def weights_figure(pictures: Any, layer: str, *, max_units: int = 256, columns: int = 16,
                   channel_names: list[str] | None = None, note: str = "") -> Any:
    """The NMF weight pictures of a layer as a figure a reader can use: every tile labelled with
    its unit number (grid in similarity order), and a colour key saying which input channels
    (excitatory +, inhibitory -) each of the three colours stands for."""
    plt = pyplot()

    pics, order, f = pictures.pictures, pictures.order, pictures.factors
    shown = [int(u) for u in order[:max_units]]
    n = len(shown)
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    more = f" (first {n} of {len(order)} in similarity order)" if n < len(order) else " (similarity order)"
    kh, kw = pics.shape[1:3]
    title = (f"{layer}: NMF weight pictures, {kh}x{kw} kernels, unit numbers above each{more}"
             + (f"\n{note}" if note else ""))
    head = 0.25 + 0.2 * (title.count("\n") + 1)                     # inches kept for the title above the tiles
    height = 0.66 * rows + 1.45 + head
    fig = plt.figure(figsize=(max(7.0, 0.62 * columns + 0.6), height))
    grid = fig.add_gridspec(rows + 1, columns, height_ratios=[1.0] * rows + [1.6], hspace=0.3, wspace=0.08,
                            top=1 - head / height, bottom=0.02)
    for i, u in enumerate(shown):
        ax = fig.add_subplot(grid[i // columns, i % columns])
        ax.imshow(pics[u], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(str(u), fontsize=6, pad=1.5)
    key = fig.add_subplot(grid[rows, :])
    key.axis("off")
    names = channel_names or [f"in {c}" for c in range(f.positive.shape[1])]
    lines = []
    for j, colour in enumerate(("red", "green", "blue")[: f.factors.shape[0]]):
        pos, neg = f.positive[j].numpy(), f.negative[j].numpy()
        scored = sorted([(float(v), f"+{names[c]}") for c, v in enumerate(pos)] +
                        [(float(v), f"-{names[c]}") for c, v in enumerate(neg)], reverse=True)
        top = ", ".join(f"{name} ({v:.2f})" for v, name in scored[:4] if v > 0)
        lines.append(f"{colour}: {top}")
    key.text(0.0, 1.0, "Colour key (NMF factor -> strongest input channels, + excitatory / - inhibitory, "
             "loading):\n" + "\n".join(lines) + "\nBrightness: how strongly a position uses the factor (per unit, "
             "scaled to its own maximum).", va="top", ha="left", fontsize=7.5, family="monospace",
             transform=key.transAxes)
    fig.suptitle(title, fontsize=9.5, y=1 - 0.08 / height, va="top")
    return fig
