"""Planted structure shared by the graph tests: weights built so that the answer is known."""
from __future__ import annotations

import numpy as np


def block_diagonal_weights(sizes: tuple[int, ...], modules: int, cross: float,
                           seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Chain weights [out, in] whose strong links join unit i of a layer to unit j of the next
    when i % modules == j % modules, plus weak links (at most `cross`) everywhere, random signs.
    Returns the weights and every node's module in layer order."""
    rng = np.random.default_rng(seed)
    ws = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        same = (np.arange(b)[:, None] % modules) == (np.arange(a)[None, :] % modules)
        strength = np.where(same, rng.uniform(0.5, 1.0, (b, a)), cross * rng.uniform(0, 1, (b, a)))
        ws.append(strength * rng.choice([-1.0, 1.0], (b, a)))
    truth = np.concatenate([np.arange(s) % modules for s in sizes])
    return ws, truth
