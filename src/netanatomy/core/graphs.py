"""Neuron graphs: nodes are units, edge weights say how strongly two units are coupled.

A `NeuronGraph` keeps its edges as blocks between layers (dense or sparse matrices), not only
as one big sparse matrix: a layered weight graph is a handful of dense blocks, and spectral
clustering uses that structure (see `spectral.py`). `adjacency()` gives the usual symmetric
scipy.sparse matrix when one is needed.

- Weight graph (Filan et al.): MLP neurons are nodes with edge |w|; conv channels are nodes with
  edge L1(kernel[j, i]); batch norm is folded into the kernels first; a linear layer that reads
  a flattened conv map gets edge sum |w| over the positions belonging to channel i.
- Activation graph (Hod et al.): edge = squared Spearman correlation of the units' per-example
  values, diagonal 0, NaN 0, zero-variance units dropped.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Union

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

from ..errors import UsageError

Matrix = Union[np.ndarray, sp.spmatrix, sp.sparray]


def as_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The graph


@dataclass(frozen=True, eq=False)
class Block:
    """Edges from the nodes of layer `src` to those of layer `dst`: weights [n_dst, n_src] >= 0.

    A block with src == dst holds edges inside one layer and must be symmetric.
    """

    src: int
    dst: int
    weights: Matrix


@dataclass(frozen=True, eq=False)
class NeuronGraph:
    """Undirected weighted graph of units, nodes grouped by layer.

    Nodes of layer i are `offsets[i]:offsets[i+1]`; node n is unit `node_unit[n]` of layer
    `layers[node_layer[n]]` (unit indices are the layer's own, so dropped units leave gaps).
    """

    layers: tuple[str, ...]
    node_layer: np.ndarray
    node_unit: np.ndarray
    blocks: tuple[Block, ...] = field(default=())

    def __post_init__(self) -> None:
        sizes = self.sizes
        for b in self.blocks:
            shape = b.weights.shape
            if shape != (sizes[b.dst], sizes[b.src]):
                raise ValueError(
                    f"block {self.layers[b.src]} -> {self.layers[b.dst]} has shape {shape}, expected "
                    f"{(sizes[b.dst], sizes[b.src])}"
                )

    # --- node bookkeeping
    @property
    def num_nodes(self) -> int:
        return int(self.node_layer.size)

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(c) for c in np.bincount(self.node_layer, minlength=len(self.layers)))

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def layer_slice(self, layer: int | str) -> slice:
        i = self.layer_index(layer)
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def layer_index(self, layer: int | str) -> int:
        if isinstance(layer, str):
            if layer not in self.layers:
                raise UsageError(f"layer {layer!r} is not in this graph; it has {', '.join(self.layers)}")
            return self.layers.index(layer)
        return int(layer)

    def units(self, nodes: Sequence[int] | np.ndarray) -> list[tuple[str, int]]:
        """(layer name, unit index) of each node."""
        nodes = np.asarray(nodes, dtype=np.int64)
        return [(self.layers[int(li)], int(u)) for li, u in zip(self.node_layer[nodes], self.node_unit[nodes])]

    # --- edges
    @cached_property
    def degrees(self) -> np.ndarray:
        """Weighted degree of every node (sum of its edge weights)."""
        deg = np.zeros(self.num_nodes)
        off = self.offsets
        for b in self.blocks:
            w = b.weights
            deg[off[b.dst]:off[b.dst + 1]] += np.asarray(w.sum(axis=1)).ravel()
            if b.src != b.dst:
                deg[off[b.src]:off[b.src + 1]] += np.asarray(w.sum(axis=0)).ravel()
        return deg

    def adjacency(self) -> sp.csr_matrix:
        """The symmetric adjacency matrix [n, n] (float64, CSR)."""
        n = self.num_nodes
        off = self.offsets
        rows, cols, vals = [], [], []
        for b in self.blocks:
            w = sp.coo_matrix(b.weights)
            r, c = w.row + off[b.dst], w.col + off[b.src]
            rows.append(r)
            cols.append(c)
            vals.append(w.data)
            if b.src != b.dst:
                rows.append(c)
                cols.append(r)
                vals.append(w.data)
        if not rows:
            return sp.csr_matrix((n, n))
        a = sp.coo_matrix((np.concatenate(vals).astype(np.float64), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n, n))
        return a.tocsr()

    def layer_neighbours(self, layer: int | str) -> list[int]:
        """Indices of the other layers joined to `layer` by a block."""
        i = self.layer_index(layer)
        out = set()
        for b in self.blocks:
            if b.src == i and b.dst != i:
                out.add(b.dst)
            elif b.dst == i and b.src != i:
                out.add(b.src)
        return sorted(out)

    def subgraph(self, layers: Sequence[int | str]) -> NeuronGraph:
        """The graph induced by some layers (in this graph's layer order)."""
        keep = sorted({self.layer_index(x) for x in layers})
        remap = {old: new for new, old in enumerate(keep)}
        mask = np.isin(self.node_layer, keep)
        node_layer = np.array([remap[int(li)] for li in self.node_layer[mask]], dtype=np.int64)
        blocks = tuple(Block(remap[b.src], remap[b.dst], b.weights) for b in self.blocks
                       if b.src in remap and b.dst in remap)
        return NeuronGraph(tuple(self.layers[i] for i in keep), node_layer, self.node_unit[mask].copy(), blocks)

    def with_weights(self, weights: Sequence[Matrix]) -> NeuronGraph:
        """The same nodes and block layout with new block weights (e.g. of a shuffled network)."""
        if len(weights) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} blocks, got {len(weights)}")
        blocks = tuple(Block(b.src, b.dst, w) for b, w in zip(self.blocks, weights))
        return NeuronGraph(self.layers, self.node_layer, self.node_unit, blocks)

    @classmethod
    def from_adjacency(cls, adjacency: Matrix, layer: str = "nodes") -> NeuronGraph:
        """A one-layer graph from a symmetric matrix (any graph, no layer structure)."""
        a = adjacency if sp.issparse(adjacency) else np.asarray(adjacency, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise UsageError(f"an adjacency matrix must be square, got shape {a.shape}")
        n = a.shape[0]
        return cls((layer,), np.zeros(n, dtype=np.int64), np.arange(n), (Block(0, 0, a),))


def layer_nodes(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """node_layer and node_unit arrays for layers of the given sizes, all units kept."""
    sizes = [int(s) for s in sizes]
    node_layer = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    node_unit = np.concatenate([np.arange(s) for s in sizes]).astype(np.int64) if sizes else np.zeros(0, np.int64)
    return node_layer, node_unit


# ---------------------------------------------------------------------------------------------
# Weight graphs


def fold_batchnorm(weight: Any, gamma: Any, running_var: Any, eps: float = 1e-5) -> np.ndarray:
    """Scale output unit j's kernel by gamma_j / sqrt(var_j + eps): the conv followed by batch
    norm acts, up to a bias, as one conv with these weights."""
    w = as_numpy(weight)
    scale = as_numpy(gamma) / np.sqrt(as_numpy(running_var) + float(eps))
    if scale.shape != (w.shape[0],):
        raise UsageError(f"batch norm has {scale.shape[0]} channels but the weight has {w.shape[0]} outputs")
    return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))


def edge_matrix(weight: Any, in_units: int | None = None, groups: int = 1) -> np.ndarray:
    """Edge strengths [out_units, in_units] >= 0 from a layer's weight tensor.

    - linear [out, F] with F == in_units: |W|.
    - linear [out, C*h*w] reading a flattened conv map of C = in_units channels (channel-major,
      as torch.flatten lays it out): sum of |W| over the positions of each channel.
    - conv [out, in/groups, *kernel]: L1 norm of each kernel; a grouped conv connects output
      channel j only to the input channels of its group.
    """
    w = np.abs(as_numpy(weight))
    if w.ndim == 2:
        if groups != 1:
            raise UsageError("a linear layer has no groups")
        features = w.shape[1]
        if in_units is None or in_units == features:
            return w
        if in_units <= 0 or features % in_units:
            raise UsageError(f"a linear layer with {features} inputs cannot read {in_units} units")
        return w.reshape(w.shape[0], in_units, features // in_units).sum(axis=2)
    if w.ndim < 3:
        raise UsageError(f"weight must be 2-D (linear) or at least 3-D (conv), got shape {w.shape}")
    per_group = w.shape[1]
    l1 = w.reshape(w.shape[0], per_group, -1).sum(axis=2)
    if in_units is not None and in_units != per_group * groups:
        raise UsageError(f"conv weight {w.shape} with groups={groups} reads {per_group * groups} channels, "
                         f"not {in_units}")
    if groups == 1:
        return l1
    out = w.shape[0]
    if out % groups:
        raise UsageError(f"{out} output channels do not split into {groups} groups")
    full = np.zeros((out, per_group * groups))
    step = out // groups
    for g in range(groups):
        full[g * step:(g + 1) * step, g * per_group:(g + 1) * per_group] = l1[g * step:(g + 1) * step]
    return full


@dataclass(frozen=True, eq=False)
class WeightEdge:
    """One layer's weight tensor (raw, batch norm already folded) and the layers it reads.

    `sources` maps ranges of the weight's input units to layers: (layer, start, stop). A
    chain has one source covering all inputs; a layer after a concatenation has one per
    joined branch; after a residual sum, several sources share the same range.
    """

    dst: str
    weight: np.ndarray
    sources: tuple[tuple[str, int, int], ...]
    groups: int = 1

    @property
    def in_units(self) -> int:
        return max(stop for _, _, stop in self.sources)


@dataclass(frozen=True, eq=False)
class WeightNetwork:
    """Layers (name -> units, in forward order) and the weight tensors between them.

    This is what clusterability shuffles: weights are permuted as whole tensors, then reduced
    to edges, so a shuffled conv kernel is reduced by the same L1 rule as the true one.
    """

    layer_sizes: Mapping[str, int]
    edges: tuple[WeightEdge, ...]

    def __post_init__(self) -> None:
        for e in self.edges:
            if e.dst not in self.layer_sizes:
                raise UsageError(f"weight edge into {e.dst!r}, which is not among the layers")
            for name, start, stop in e.sources:
                if name not in self.layer_sizes:
                    raise UsageError(f"weight edge reads layer {name!r}, which is not among the layers")
                if name == e.dst:
                    raise UsageError(f"weight edge from {name!r} to itself")
                if stop - start != self.layer_sizes[name]:
                    raise UsageError(f"layer {name!r} has {self.layer_sizes[name]} units but feeds "
                                     f"{stop - start} inputs of {e.dst!r}")

    def with_weights(self, weights: Sequence[np.ndarray]) -> WeightNetwork:
        if len(weights) != len(self.edges):
            raise ValueError(f"expected {len(self.edges)} weights, got {len(weights)}")
        return WeightNetwork(self.layer_sizes, tuple(WeightEdge(e.dst, w, e.sources, e.groups)
                                                     for e, w in zip(self.edges, weights)))

    def graph(self) -> NeuronGraph:
        """The weight graph: one node per unit of every layer, one dense block per (source, weight)."""
        names = list(self.layer_sizes)
        node_layer, node_unit = layer_nodes(self.layer_sizes.values())
        blocks = []
        for e in self.edges:
            dst = names.index(e.dst)
            m = edge_matrix(e.weight, e.in_units, e.groups)
            if m.shape[0] != self.layer_sizes[e.dst]:
                raise UsageError(f"weight into {e.dst} has {m.shape[0]} outputs, but the layer has "
                                 f"{self.layer_sizes[e.dst]} units")
            for name, start, stop in e.sources:
                blocks.append(Block(names.index(name), dst, m[:, start:stop]))
        return NeuronGraph(tuple(names), node_layer, node_unit, tuple(blocks))


def chain_network(weights: Sequence[Any], names: Sequence[str] | None = None, *, input_name: str = "input",
                  input_units: int | None = None, groups: Sequence[int] | None = None) -> WeightNetwork:
    """A feed-forward chain (MLP, plain CNN): weights[i] maps layer i-1 (or the input) to layer i.

    The input units are weights[0]'s input features (pixels of an MLP) or input channels (a
    CNN), unless `input_units` says otherwise. Names default to layer1, layer2, ...
    """
    if not weights:
        raise UsageError("need at least one weight tensor")
    ws = [as_numpy(w) for w in weights]
    names = list(names) if names is not None else [f"layer{i + 1}" for i in range(len(ws))]
    groups = list(groups) if groups is not None else [1] * len(ws)
    if len(names) != len(ws) or len(groups) != len(ws):
        raise UsageError(f"got {len(ws)} weights, {len(names)} names and {len(groups)} group counts")
    if input_name in names or len(set(names)) != len(names):
        raise UsageError("layer names must be distinct")
    first = ws[0]
    in_units = int(input_units) if input_units is not None else int(first.shape[1] * (groups[0] if first.ndim > 2 else 1))
    sizes = {input_name: in_units}
    sizes.update({n: int(w.shape[0]) for n, w in zip(names, ws)})
    chain = [input_name, *names]
    edges = tuple(WeightEdge(chain[i + 1], w, ((chain[i], 0, sizes[chain[i]]),), g)
                  for i, (w, g) in enumerate(zip(ws, groups)))
    return WeightNetwork(sizes, edges)


def weight_graph(weights: Sequence[Any], names: Sequence[str] | None = None, **kwargs: Any) -> NeuronGraph:
    """The weight graph of a feed-forward chain (see `chain_network`)."""
    return chain_network(weights, names, **kwargs).graph()


# ---------------------------------------------------------------------------------------------
# Activation graphs


def spearman_squared(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Squared Spearman correlation between the columns of values [n_examples, units].

    Returns (matrix [m, m] over the kept units, kept unit indices). Units with zero variance
    are dropped (their correlation is undefined); the diagonal is 0 and NaN becomes 0.
    """
    x = as_numpy(values)
    if x.ndim != 2:
        raise UsageError(f"activation values must be [examples, units], got shape {x.shape}")
    if x.shape[0] < 2:
        raise UsageError("need at least 2 examples to correlate units")
    finite = np.where(np.isfinite(x), x, np.nan)
    with np.errstate(invalid="ignore"):
        spread = np.nanmax(finite, axis=0) - np.nanmin(finite, axis=0) if x.size else np.zeros(x.shape[1])
    kept = np.flatnonzero(np.nan_to_num(spread, nan=0.0) > 0)
    ranks = rankdata(x[:, kept], axis=0)  # average ranks for ties; NaN inputs rank as NaN
    ranks -= ranks.mean(axis=0, keepdims=True)
    norms = np.sqrt(np.sum(ranks * ranks, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (ranks.T @ ranks) / np.outer(norms, norms)
    r2 = np.nan_to_num(corr * corr, nan=0.0, posinf=0.0, neginf=0.0)
    np.fill_diagonal(r2, 0.0)
    return np.minimum(r2, 1.0), kept


def activation_graph(values: Mapping[str, Any] | Any, layer: str = "layer") -> NeuronGraph:
    """The activation-correlation graph of one or several layers' per-example values.

    `values` maps layer names to [n_examples, units] arrays over the same examples (or is one
    array for a single layer named `layer`). Every pair of kept units gets an edge of weight
    Spearman^2; zero-variance units are not nodes.
    """
    if not isinstance(values, Mapping):
        values = {layer: values}
    names = list(values)
    arrays = [as_numpy(values[n]) for n in names]
    if len({a.shape[0] for a in arrays}) != 1:
        raise UsageError("all layers' activation values must cover the same examples")
    joint = np.concatenate(arrays, axis=1)
    layer_of = np.concatenate([np.full(a.shape[1], i) for i, a in enumerate(arrays)]).astype(np.int64)
    unit_of = np.concatenate([np.arange(a.shape[1]) for a in arrays]).astype(np.int64)
    r2, kept = spearman_squared(joint)
    node_layer, node_unit = layer_of[kept], unit_of[kept]
    bounds = np.searchsorted(node_layer, np.arange(len(names) + 1))
    blocks = []
    for i in range(len(names)):
        for j in range(i + 1):
            w = r2[bounds[i]:bounds[i + 1], bounds[j]:bounds[j + 1]]
            if w.size:
                blocks.append(Block(j, i, np.ascontiguousarray(w)))
    return NeuronGraph(tuple(names), node_layer, node_unit, tuple(blocks))
