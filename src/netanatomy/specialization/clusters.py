"""Clusters of a model's units and their clusterability, from the model itself.

`cluster_model` builds the weight graph (or the activation graph on data), clusters it, and
tests its n-cut against shuffled networks. For the activation graph, a shuffled network is the
model with every conv/linear weight tensor shuffled within itself, and its graph is captured
again on the same examples (biases stay).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.clusterability import Clusterability, clusterability, shuffle_seed
from ..core.graphs import NeuronGraph, activation_graph
from ..core.shuffle import METHODS, shuffle_weight
from ..errors import UsageError
from ..models.layers import LayerMap
from ..scale import Runner, TaskStore
from ..util.seeding import derive
from .extract import activation_values, weight_network
from .importance import lesionable_layers
from .subclusters import Cluster, clusters_to_json

GRAPHS = ("weights", "activations")


@dataclass
class ModelClusters:
    graph_kind: str
    graph: NeuronGraph
    result: Clusterability

    @property
    def clusters(self) -> list[Cluster]:
        labels = self.result.clustering.labels
        return [Cluster(c, tuple(self.graph.units(np.flatnonzero(labels == c)))) for c in range(self.result.clustering.k)]

    def to_json(self) -> dict[str, Any]:
        c = self.result.clustering
        return {
            "k": c.k,
            "ncut": c.ncut,
            "shuffle": self.result.shuffle.to_json(),
            "clusters": clusters_to_json(self.clusters),
            "graph": self.graph_kind,
            "nodes": self.graph.num_nodes,
            "isolated": int(np.sum(c.labels < 0)),
            "layers": dict(zip(self.graph.layers, self.graph.sizes)),
        }


def layer_display_names(layer_map: LayerMap) -> dict[str, str]:
    return {layer.module: layer.name for layer in layer_map.values() if layer.kind in ("conv", "linear")}


def cluster_model(model: nn.Module, layer_map: LayerMap, *, graph: str = "weights", data=None, k: int = 12,
                  n_shuffles: int = 50, method: str = "layer", seed: int = 0, n_init: int = 25,
                  layers: Sequence[str] | None = None, max_examples: int = 5000,
                  device: str | torch.device | None = None, runner: Runner | None = None,
                  store: TaskStore | None = None, on_result: Callable[[int, float], None] | None = None
                  ) -> ModelClusters:
    """Cluster `model`'s units into k clusters and test clusterability against n shuffles.

    The shuffles are tasks on `runner` (here by default), kept in `store` when given."""
    if graph not in GRAPHS:
        raise UsageError(f"graph must be one of {', '.join(GRAPHS)}, not {graph!r}")
    if method not in METHODS:
        raise UsageError(f"shuffle method must be one of {', '.join(METHODS)}, not {method!r}")
    if graph == "weights":
        extracted = weight_network(model, layer_map.input_shape, layer_names=layer_display_names(layer_map))
        result = clusterability(extracted.network, k, n_shuffles=n_shuffles, method=method, seed=seed, n_init=n_init,
                                runner=runner, store=store, on_result=on_result)
        return ModelClusters(graph, extracted.network.graph(), result)
    if data is None:
        raise UsageError("the activation graph needs data (--data)")
    names = activation_layers(layer_map, layers)

    shuffles = ActivationShuffles(model, method, seed, names, data, max_examples, device, layer_map.input_shape)
    true_graph = shuffles.graph_of(model)
    result = clusterability(true_graph, k, n_shuffles=n_shuffles, method=method, seed=seed, n_init=n_init,
                            make_shuffled=shuffles, runner=runner, store=store, on_result=on_result)
    return ModelClusters(graph, true_graph, result)


@dataclass
class ActivationShuffles:
    """Activation graph i of the shuffled models: the model with its weights shuffled under
    (seed, i), run on the same seeded sample of the data (plain data, so it can go to workers)."""

    model: nn.Module
    method: str
    seed: int
    layers: list[str]
    data: Any
    max_examples: int
    device: Any
    input_shape: Any

    def graph_of(self, model: nn.Module) -> NeuronGraph:
        values, _ = activation_values(model, self.layers, self.data, max_examples=self.max_examples, seed=self.seed,
                                      device=self.device, input_shape=self.input_shape, show_progress=False)
        return activation_graph(values)

    def __call__(self, i: int) -> NeuronGraph:
        return self.graph_of(shuffled_model(self.model, self.method, shuffle_seed(self.seed, i)))


def activation_layers(layer_map: LayerMap, layers: Sequence[str] | None = None) -> list[str]:
    """The layers of an activation graph: those asked for, or every hidden conv/linear layer."""
    names = list(layers) if layers else list(lesionable_layers(layer_map))
    if not names:
        raise UsageError("the model has no hidden conv or linear layers to correlate")
    return names


def activation_graph_bytes(units: int, examples: int) -> int:
    """About the most memory (bytes) that clustering an activation graph of `units` units over
    `examples` examples holds at once: the float64 values and their ranks (~9 n m doubles), the
    dense Spearman^2 matrix and its temporaries, then the spectral step (~9 m^2 doubles, with
    the true graph kept while a shuffled one is built). Measured with tracemalloc on random
    values; an upper estimate, so that a refusal is never the first sign of trouble."""
    m, n = int(units), int(examples)
    return 8 * (9 * m * m + 9 * n * m)


def shuffled_model(model: nn.Module, method: str, seed: int) -> nn.Module:
    """A copy of `model` with each conv/linear weight tensor shuffled within itself."""
    from .extract import WEIGHT_MODULES

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in clone.named_modules():
            if isinstance(m, WEIGHT_MODULES):
                w = m.weight.detach().cpu().numpy()
                shuffled = shuffle_weight(w, method, np.random.default_rng(derive(seed, name)))
                m.weight.copy_(torch.from_numpy(shuffled).to(m.weight.device))
    return clone
