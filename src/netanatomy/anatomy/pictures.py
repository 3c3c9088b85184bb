"""Weight pictures of a layer: NMF colours, similarity-sorted grid, and the factors as data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from ..core.nmf import WeightFactors, factorize_weights
from ..core.pictures import loadings_to_rgb, picture_grid, similarity_order

__all__ = ["LayerPictures", "layer_pictures"]


@dataclass(frozen=True)
class LayerPictures:
    """pictures [U, kh, kw, 3] in [0, 1]; order: units in grid order (similar units together);
    grid: the upscaled grid image [H, W, 3]; factors: the NMF behind the colours."""

    pictures: np.ndarray
    order: np.ndarray
    grid: np.ndarray
    factors: WeightFactors

    def factors_json(self, channel_names: list[str] | None = None) -> dict[str, Any]:
        """Factor loadings per input channel (positive and negative parts) and per-unit data."""
        f = self.factors
        colours = ["red", "green", "blue"]
        k = f.factors.shape[0]
        return {
            "mode": f.mode,
            "n_iter": f.n_iter,
            "factors": [
                {"index": j, "colour": colours[j] if j < 3 else None,
                 "positive": f.positive[j].tolist(), "negative": f.negative[j].tolist()}
                for j in range(k)
            ],
            "channel_names": channel_names,
            "grid_order": self.order.tolist(),
            "units": [
                {"unit": u, "error": float(f.error[u]),
                 "loading": f.loadings[u].sum(dim=(0, 1)).tolist(),
                 "picture": np.round(self.pictures[u], 4).tolist()}
                for u in range(self.pictures.shape[0])
            ],
        }


def layer_pictures(weights: Tensor, *, mode: str = "shared", scale: int | None = None, seed: int = 0,
                   ncols: int | None = None) -> LayerPictures:
    """NMF pictures of weights [U, C_in, kh, kw] (a conv layer, a linear layer on a map, or
    expanded weights), in a grid sorted by similarity and upscaled (default: to about 48 pixels
    per picture, nearest neighbour)."""
    factors = factorize_weights(weights, mode=mode, seed=seed)          # type: ignore[arg-type]
    pictures = loadings_to_rgb(factors.loadings)
    order = similarity_order(pictures.reshape(len(pictures), -1))
    kh, kw = pictures.shape[1:3]
    scale = scale or max(1, 48 // max(kh, kw))
    grid = picture_grid(pictures, order=order, scale=scale, ncols=ncols, pad=max(1, scale // 4))
    return LayerPictures(pictures, order, grid, factors)
