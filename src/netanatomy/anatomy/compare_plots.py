"""Figures of `netanatomy compare`: the CKA heatmaps, best matches against the null, matched units."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..util.figures import pyplot

__all__ = ["cka_figure", "matched_examples_figure", "matching_figure"]


def cka_figure(doc: dict[str, Any], name_a: str, name_b: str) -> Any:
    """Linear and debiased CKA of every (A layer, B layer), side by side, values written in."""
    plt = pyplot()
    rows = [l["name"] for l in doc["layers_a"]]
    cols = [l["name"] for l in doc["layers_b"]]
    grids = {kind: np.full((len(rows), len(cols)), np.nan) for kind in ("linear", "debiased")}
    for c in doc["cka"]:
        for kind in grids:
            grids[kind][rows.index(c["layer_a"]), cols.index(c["layer_b"])] = c[kind]
    cell = 0.55
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(4.0, cell * len(cols) + 2.2), max(3.5, cell * len(rows) + 2.2)))
    for ax, (kind, grid) in zip(axes, grids.items()):
        image = ax.imshow(grid, cmap="magma", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=7)
        ax.set_xlabel(f"layer of B ({name_b})", fontsize=8)
        ax.set_ylabel(f"layer of A ({name_a})", fontsize=8)
        ax.set_title(f"{kind} CKA", fontsize=9)
        if len(rows) * len(cols) <= 196:
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
        bar.set_label("CKA: 0 unrelated, 1 the same up to rotation and scale", fontsize=7)
    fig.suptitle(f"Layer similarity of A and B on {doc['examples']} examples ({doc['reduce']} over space, "
                 f"{doc['stage']}-activation); debiased = unbiased HSIC", fontsize=9.5)
    fig.tight_layout()
    return fig


def matching_figure(match: dict[str, Any]) -> Any:
    """Best-match r of A's units against the same for random-weight copies of B."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    observed = np.asarray(match["best"]["r"])
    null = np.concatenate([np.asarray(x) for x in match["null_best_r"]])
    bins = np.linspace(min(observed.min(), null.min(), 0.0), 1.0, 41)
    ax.hist(null, bins=bins, density=True, alpha=0.55, color="tab:grey",
            label=f"null: B with random weights ({len(match['null_best_r'])} copies, {null.size} best matches)")
    ax.hist(observed, bins=bins, density=True, alpha=0.7, color="tab:blue",
            label=f"A's {observed.size} units vs trained B")
    for q, style in (("95", "--"), ("99", ":")):
        ax.axvline(match["null_quantiles"][q], color="black", linestyle=style, linewidth=1,
                   label=f"null {q}th percentile ({match['null_quantiles'][q]:.2f})")
    ax.set_xlabel("best-match correlation r of a unit of A with any unit of B (Pearson)", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.set_title(f"{match['layer_a']} (A) vs {match['layer_b']} (B): {match['counterparts']} of {observed.size} units "
                 f"have a counterpart (BH q <= {match['alpha']:g});\none-to-one mean r {match['mean_matched_r']:.3f}, "
                 f"null {np.mean(match['null_mean_matched_r']):.3f} (p {match['p']:.2g})", fontsize=8.5)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def matched_examples_figure(match: dict[str, Any], kept: dict[str, Any], images: Any, *, pairs: int = 6,
                            top: int = 5) -> Any:
    """The best one-to-one pairs, each unit shown by its top examples in the kept subsample.

    `images(indices)` returns those data items' images as [k, C, H, W] in [0, 1].
    """
    plt = pyplot()
    best = sorted(match["pairs"], key=lambda p: -p[2])[:pairs]
    va, vb = kept["a"][match["layer_a"]], kept["b"][match["layer_b"]]
    index = kept["index"]
    fig, axes = plt.subplots(len(best), 2 * top, figsize=(1.05 * 2 * top + 0.5, 1.25 * len(best) + 0.9), squeeze=False)
    for row, (ua, ub, r) in enumerate(best):
        for side, (unit, values) in enumerate(((ua, va), (ub, vb))):
            order = np.argsort(-values[:, unit], kind="stable")[:top]
            pics = np.asarray(images(index[order]))
            for k in range(top):
                ax = axes[row, side * top + k]
                ax.axis("off")
                if k < len(pics):
                    pic = pics[k].transpose(1, 2, 0)
                    ax.imshow(pic[..., 0] if pic.shape[-1] == 1 else pic, cmap="gray" if pic.shape[-1] == 1 else None,
                              vmin=0, vmax=1)
                if k == 0:
                    ax.set_title(f"{'A' if side == 0 else 'B'} unit {unit}" + (f"  (r {r:.2f})" if side == 0 else ""),
                                 fontsize=7, loc="left")
    fig.suptitle(f"Matched units, {match['layer_a']} (A, left) and {match['layer_b']} (B, right): each unit's top "
                 f"{top} examples among the first {len(index)}, the {len(best)} best pairs", fontsize=8.5)
    fig.tight_layout()
    return fig

