"""Weight shuffles within each layer: the null networks of clusterability.

A shuffle keeps each layer's multiset of weights (so its overall strength and the
distribution of |w|) and destroys who connects to whom. Two variants (Filan et al.):
- `layer`: permute all entries of each weight tensor;
- `layer_nonzero`: permute only the non-zero entries among the non-zero positions, keeping the
  sparsity pattern (the null for pruned networks).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UsageError
from ..util.seeding import derive, rng as make_rng

METHODS = ("layer", "layer_nonzero")


def shuffle_weight(weight: np.ndarray, method: str, rng: np.random.Generator | int) -> np.ndarray:
    """A shuffled copy of one weight tensor (same shape and dtype)."""
    w = np.asarray(weight)
    gen = make_rng(rng)
    flat = w.reshape(-1)
    if method == "layer":
        return flat[gen.permutation(flat.size)].reshape(w.shape)
    if method == "layer_nonzero":
        where = np.flatnonzero(flat)
        out = np.zeros_like(flat)
        out[where] = flat[where][gen.permutation(where.size)]
        return out.reshape(w.shape)
    raise UsageError(f"unknown shuffle method {method!r}; use one of {', '.join(METHODS)}")


def shuffle_weights(weights: Sequence[Any], method: str, seed: int) -> list[np.ndarray]:
    """Shuffle every layer's weights independently; the same seed gives the same shuffle."""
    if method not in METHODS:
        raise UsageError(f"unknown shuffle method {method!r}; use one of {', '.join(METHODS)}")
    return [shuffle_weight(np.asarray(w), method, np.random.default_rng(derive(seed, i))) for i, w in enumerate(weights)]
