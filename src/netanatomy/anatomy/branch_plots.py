"""Figures of branch statistics: the unit correlation matrix by branch and category shares."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..util.figures import pyplot
from .branch_stats import LayerBranchStats
from .plots import _BRANCH_COLOURS

__all__ = ["branch_figures", "category_share_figure", "correlation_figure"]



def correlation_figure(stats: LayerBranchStats) -> Any:
    """The unit-by-unit Pearson correlation of activations, units ordered by branch, with the
    branch boundaries drawn and the within- vs between-branch test in the title."""
    plt = pyplot()
    pop, corr = stats.population, stats.corr
    fig, ax = plt.subplots(figsize=(7.5, 6.6))
    image = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    for p in pop.parts[1:]:
        ax.axhline(p.start - 0.5, color="k", lw=0.9)
        ax.axvline(p.start - 0.5, color="k", lw=0.9)
    centres = [(p.start + p.stop - 1) / 2 for p in pop.parts]
    names = [f"{p.name}\n({p.size})" for p in pop.parts]
    small = len(pop.parts) > 6
    ax.set_xticks(centres, names, fontsize=6 if small else 7, rotation=90 if small else 30,
                  ha="center" if small else "right")
    ax.set_yticks(centres, names, fontsize=6 if small else 7)
    ax.set_xlabel("unit, grouped by branch (branch name, units)")
    ax.set_ylabel("unit, grouped by branch")
    c = stats.correlation
    test = (f"mean |r| within {c.within:.3f}, between {c.between:.3f}; p {c.p:.3g} "
            f"({c.n_permutations} relabellings)" if c is not None else "")
    ax.set_title(f"{pop.layer}: correlation of units' activations ({corr.shape[0]} units)\n{test}", fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("Pearson r of spatial-mean pre-activations over the data")
    fig.tight_layout()
    return fig


def _stars(q: float) -> str:
    return "***" if q < 0.001 else "**" if q < 0.01 else "*" if q < 0.05 else ""


def category_share_figure(stats: LayerBranchStats, *, max_categories: int = 12) -> Any:
    """Share of each branch's units in each category (bars), the layer's share as the chance
    level (black tick), and BH-adjusted significance of enrichment as stars."""
    plt = pyplot()
    pop = stats.population
    by = {(t.branch, t.category): t for t in stats.tests}
    cats = sorted(stats.categories, key=lambda c: -int(stats.categories[c].sum()))[:max_categories]
    n_b = len(pop.parts)
    width = 0.8 / max(n_b, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cats) * max(1, n_b / 3) + 2), 4.6))
    x = np.arange(len(cats))
    for i, p in enumerate(pop.parts):
        shares = [by[(p.name, c)].in_both / p.size if (p.name, c) in by else 0.0 for c in cats]
        xs = x - 0.4 + width * (i + 0.5)
        ax.bar(xs, shares, width=width * 0.95, color=_BRANCH_COLOURS[i % len(_BRANCH_COLOURS)],
               label=f"{p.name} ({p.size} units)")
        for xi, c, s in zip(xs, cats, shares):
            t = by.get((p.name, c))
            if t is not None and _stars(t.q):
                ax.text(xi, s + 0.01, _stars(t.q), ha="center", va="bottom", fontsize=7)
    for xi, c in zip(x, cats):
        chance = float(stats.categories[c].mean())
        ax.plot([xi - 0.42, xi + 0.42], [chance, chance], color="k", lw=1.2)
    ax.set_xticks(x, [f"{c}\n({int(stats.categories[c].sum())})" for c in cats], fontsize=7,
                  rotation=20 if len(cats) > 5 else 0)
    ax.set_ylabel("share of the branch's units in the category")
    ax.set_xlabel("category (units in the layer)")
    ax.set_ylim(0, min(1.08, max(0.2, ax.get_ylim()[1] + 0.05)))
    ax.set_title(f"{pop.layer}: categories by branch\nblack line: the layer's share (chance); "
                 "stars: enriched in the branch, BH q < 0.05 / 0.01 / 0.001 (hypergeometric tail)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n_b <= 12 else 2,
              title="branch (units)", title_fontsize=7)
    fig.tight_layout()
    return fig


def branch_figures(module, layer_map, stats: LayerBranchStats, out_dir) -> dict[str, str]:
    """Correlation matrix, category shares and (where a conv reads or is the layer) the SVD of |W|."""
    import matplotlib.pyplot as plt

    from ..util.io import file_stem
    from ..util.io import save_figure

    stem = file_stem(stats.population.layer)
    files = {}
    if stats.corr is not None:
        fig = correlation_figure(stats)
        files["correlation"] = str(save_figure(fig, out_dir / f"{stem}_correlation.png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
    if stats.tests:
        fig = category_share_figure(stats)
        files["categories"] = str(save_figure(fig, out_dir / f"{stem}_categories.png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
    fig = _svd_figure(module, layer_map, stats.population)
    if fig is not None:
        files["svd"] = str(save_figure(fig, out_dir / f"{stem}_svd.png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
    return files


def _svd_figure(module, layer_map, pop):
    """SVD of |W| with this layer's units coloured by branch: as the lower units of the conv that
    reads the layer, else as the upper units of the grouped conv itself; None for residual sums."""
    from ..errors import UsageError
    from .graph import feeding_layer
    from .plots import svd_placement_figure
    from .svd import layer_svd

    if pop.kind == "residual":
        return None
    labels, names = pop.branch_of_unit(), [p.name for p in pop.parts]
    for reader in layer_map.values():
        if reader.kind == "conv" and not reader.depthwise and feeding_layer(module, layer_map, reader) == pop.layer:
            try:
                report = layer_svd(module, layer_map, reader.name)
            except UsageError:
                continue
            if report.svd.lower.shape[0] == pop.units:
                return svd_placement_figure(report, groups={"lower": (labels, names)})
    layer = layer_map.resolve(pop.layer)
    if layer.kind == "conv" and layer.groups > 1:
        try:
            report = layer_svd(module, layer_map, layer.name)
        except UsageError:
            return None
        return svd_placement_figure(report, groups={"upper": (labels, names)})
    return None
