"""Clusterability: is a network's graph more clusterable than the same weights shuffled?

The true graph's n-cut is compared with the n-cuts of `n` networks whose weights are shuffled
within each layer (`shuffle.py`): p = (#{shuffled n-cut <= true} + 1) / (n + 1) and
z = (true - mean) / std (population std). Low n-cut = more clusterable, so the test is
left-tailed.

Shuffle i depends only on (seed, i): the shuffles are tasks (`scale.map_tasks`) that run here
or on Ray workers in any order to the same numbers, and a `TaskStore` keeps each n-cut as it
arrives so that a stopped run resumes (and a longer run re-uses a shorter one's shuffles).
`on_result` is called with every n-cut, stored ones included, for progress.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..errors import UsageError
from ..scale import Runner, TaskStore, map_tasks
from ..util.seeding import derive
from .graphs import NeuronGraph, WeightNetwork
from .shuffle import METHODS, shuffle_weights
from .spectral import Clustering, spectral_clustering
from .stats import percentile_pvalue, zscore


@dataclass(frozen=True)
class ShuffleTest:
    method: str
    ncuts: np.ndarray  # n-cut of each shuffled network, in shuffle order
    true_ncut: float

    @property
    def n(self) -> int:
        return int(self.ncuts.size)

    @property
    def mean(self) -> float:
        return float(np.mean(self.ncuts)) if self.n else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.ncuts)) if self.n else math.nan

    @property
    def z(self) -> float:
        return float(zscore(self.true_ncut, self.ncuts)) if self.n else math.nan

    @property
    def p(self) -> float:
        return float(percentile_pvalue(self.true_ncut, self.ncuts, "left")) if self.n else math.nan

    def to_json(self) -> dict:
        return {"method": self.method, "n": self.n, "mean": self.mean, "std": self.std, "z": self.z, "p": self.p}


@dataclass(frozen=True)
class Clusterability:
    clustering: Clustering  # of the true graph
    shuffle: ShuffleTest


def shuffle_seed(seed: int, index: int) -> int:
    """The seed of shuffle `index` under a run seeded `seed` (independent of the run length)."""
    return derive(seed, "shuffle", index)


def _weight_shuffle(network: WeightNetwork, method: str, seed: int, i: int) -> NeuronGraph:
    return shuffled_graph(network, method, shuffle_seed(seed, i))


def shuffled_graph(network: WeightNetwork, method: str, seed: int) -> NeuronGraph:
    """The weight graph of `network` with every layer's weights shuffled."""
    weights = shuffle_weights([e.weight for e in network.edges], method, seed)
    return network.with_weights(weights).graph()


def _shuffle_task(context: tuple[Callable[[int], NeuronGraph], int, int, int], i: int) -> dict[str, np.ndarray]:
    make_graph, k, seed, n_init = context
    return {"ncut": np.asarray(spectral_clustering(make_graph(i), k, seed=seed, n_init=n_init).ncut, np.float64)}


def shuffle_key(i: int) -> str:
    return f"shuffle-{i:06d}"


def shuffled_ncuts(make_graph: Callable[[int], NeuronGraph], k: int, n: int, *, seed: int = 0, n_init: int = 25,
                   runner: Runner | None = None, store: TaskStore | None = None,
                   on_result: Callable[[int, float], None] | None = None) -> np.ndarray:
    """n-cuts of shuffled graphs 0..n-1, `make_graph(i)` giving graph i, each clustered with `seed`.

    The shuffles run on `runner` (default: here); with `store`, stored n-cuts are re-used and
    new ones stored as they arrive. `on_result(i, ncut)` is called for each.
    """
    if n < 0:
        raise UsageError(f"number of shuffles must be >= 0, got {n}")
    report = None if on_result is None else (lambda i, r: on_result(i, float(r["ncut"])))
    results = map_tasks(_shuffle_task, list(range(n)), context=(make_graph, k, seed, n_init), runner=runner,
                        store=store, key=shuffle_key, on_result=report)
    return np.asarray([float(r["ncut"]) for r in results], dtype=np.float64)


def clusterability(network: WeightNetwork | NeuronGraph, k: int, *, n_shuffles: int = 50, method: str = "layer",
                   seed: int = 0, n_init: int = 25, make_shuffled: Callable[[int], NeuronGraph] | None = None,
                   runner: Runner | None = None, store: TaskStore | None = None,
                   on_result: Callable[[int, float], None] | None = None) -> Clusterability:
    """Cluster the true graph and test its n-cut against `n_shuffles` shuffled networks.

    `network` is a WeightNetwork (its shuffles are made here) or a ready graph together with
    `make_shuffled(i)` (e.g. activation graphs of shuffled models, built by the caller).
    """
    if method not in METHODS:
        raise UsageError(f"unknown shuffle method {method!r}; use one of {', '.join(METHODS)}")
    if isinstance(network, WeightNetwork):
        graph = network.graph()
        if make_shuffled is None:
            make_shuffled = partial(_weight_shuffle, network, method, seed)
    else:
        graph = network
        if make_shuffled is None and n_shuffles > 0:
            raise UsageError("shuffling a bare graph needs make_shuffled (the weights are not known)")
    clustering = spectral_clustering(graph, k, seed=seed, n_init=n_init)
    ncuts = shuffled_ncuts(make_shuffled, k, n_shuffles, seed=seed, n_init=n_init, runner=runner, store=store,
                           on_result=on_result) if n_shuffles else np.zeros(0)
    return Clusterability(clustering, ShuffleTest(method, ncuts, clustering.ncut))
