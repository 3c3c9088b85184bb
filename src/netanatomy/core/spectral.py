"""Spectral clustering on the normalized Laplacian, n-cut, global and local clustering.

The method is scikit-learn's `SpectralClustering(affinity="precomputed")` as used by Filan et
al.: the K eigenvectors of the normalized Laplacian L = I - D^-1/2 A D^-1/2 with the smallest
eigenvalues (= the largest of M = D^-1/2 A D^-1/2), each divided by sqrt(degree), then k-means
on the rows with restarts, keeping the restart with the lowest inertia.

Why it is fast: a layered network's weight graph is bipartite (edges join layers of opposite
parity), so M = [[0, B], [B^T, 0]] and its top eigenvectors are [u; v] / sqrt(2) for the top
singular triplets (sigma, u, v) of the normalized biadjacency B. We form the Gram matrix of the
smaller side block by block (only layer pairs that share an edge block) and take its top K
eigenpairs with a dense LAPACK solver: a problem of a quarter of the nodes with no iteration,
no shift-invert factorization and no convergence worries when eigenvalues cluster (which they
do in shuffled, noise-like graphs). When the smaller side is large (AlexNet's fc layers),
Lanczos runs on B^T B applied block by block, never forming the adjacency. Graphs that are not
bipartite use a dense eigensolver when small and ARPACK (Lanczos, seeded start vector) when
large. k-means runs all restarts at once as array operations (see `kmeans`).

Isolated nodes (degree 0) are left out and labelled -1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ..errors import UsageError
from .graphs import Matrix, NeuronGraph

# Iterations after which the worse half of the k-means restarts drops out of the race.
_RACE_CHECKPOINTS = frozenset({3, 6, 12})

# Dense eigensolvers up to this many nodes (the cost grows as n^3, ARPACK's as nnz * iterations).
_DENSE_MAX_NODES = 2500


@dataclass(frozen=True)
class Clustering:
    """Cluster labels of every node (-1: isolated), the n-cut and the spectrum used."""

    labels: np.ndarray
    k: int
    ncut: float
    eigenvalues: np.ndarray  # top K eigenvalues of D^-1/2 A D^-1/2, descending (1 - Laplacian's)
    inertia: float

    def members(self) -> list[np.ndarray]:
        """Node indices of each cluster 0..k-1."""
        return [np.flatnonzero(self.labels == c) for c in range(self.k)]


# ---------------------------------------------------------------------------------------------
# n-cut


def ncut(graph: NeuronGraph | Matrix, labels: np.ndarray) -> float:
    """Normalized cut: sum over clusters of cut(C, rest) / vol(C).

    vol(C) is the sum of the degrees of C's nodes; nodes labelled < 0 are ignored (they are
    isolated); empty clusters contribute nothing.
    """
    g = graph if isinstance(graph, NeuronGraph) else NeuronGraph.from_adjacency(graph)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (g.num_nodes,):
        raise UsageError(f"need one label per node ({g.num_nodes}), got shape {labels.shape}")
    k = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    if k == 0:
        return 0.0
    valid = labels >= 0
    vol = np.bincount(labels[valid], weights=g.degrees[valid], minlength=k)
    assoc = np.zeros(k)
    off = g.offsets
    for b in g.blocks:
        ld, ls = labels[off[b.dst]:off[b.dst + 1]], labels[off[b.src]:off[b.src + 1]]
        within = _within_weight(b.weights, ld, ls, k)
        assoc += within if b.src == b.dst else 2.0 * within
    cut = vol - assoc
    nonempty = vol > 0
    return float(np.sum(cut[nonempty] / vol[nonempty]))


def _within_weight(w: Matrix, ld: np.ndarray, ls: np.ndarray, k: int) -> np.ndarray:
    """Per cluster c, the sum of w[i, j] over i with label c (rows) and j with label c (columns)."""
    if sp.issparse(w):
        coo = sp.coo_matrix(w)
        same = (ld[coo.row] == ls[coo.col]) & (ld[coo.row] >= 0)
        return np.bincount(ld[coo.row][same], weights=coo.data[same], minlength=k)
    w = np.asarray(w)
    if w.size == 0:
        return np.zeros(k)
    onehot = np.zeros((ls.size, k))
    ok = ls >= 0
    onehot[np.flatnonzero(ok), ls[ok]] = 1.0
    per_row = w @ onehot  # [n_dst, k]: weight from each row node into each cluster
    okd = ld >= 0
    return np.bincount(ld[okd], weights=per_row[np.flatnonzero(okd), ld[okd]], minlength=k)


# ---------------------------------------------------------------------------------------------
# Embedding


def spectral_embedding(graph: NeuronGraph | Matrix, k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k eigenvectors of D^-1/2 A D^-1/2 divided by sqrt(degree), rows = non-isolated nodes.

    Returns (embedding [m, k], the m non-isolated node indices, eigenvalues descending).
    `seed` only fixes ARPACK's start vector when the iterative solver is used.
    """
    g = graph if isinstance(graph, NeuronGraph) else NeuronGraph.from_adjacency(graph)
    deg = g.degrees
    if np.any(deg < 0) or not np.all(np.isfinite(deg)):
        raise UsageError("graph weights must be finite and non-negative")
    active = np.flatnonzero(deg > 0)
    m = active.size
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    if k > m:
        raise UsageError(f"cannot make {k} clusters of {m} connected nodes")
    inv_sqrt = np.zeros_like(deg)
    inv_sqrt[active] = 1.0 / np.sqrt(deg[active])
    sides = _layer_bipartition(g)
    vectors = values = None
    if sides is not None:
        vectors, values = _bipartite_top_eigs(g, inv_sqrt, sides, k, seed)
    if vectors is None:
        vectors, values = _general_top_eigs(g, inv_sqrt, active, k, seed)
    embedding = vectors[active] * inv_sqrt[active, None]
    return embedding, active, values


def _layer_bipartition(g: NeuronGraph) -> np.ndarray | None:
    """Side (0/1) of each layer when every block joins layers of opposite sides, else None."""
    n = len(g.layers)
    side = np.full(n, -1)
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for b in g.blocks:
        if b.src == b.dst:
            if _nnz(b.weights):
                return None
            continue
        neighbours[b.src].append(b.dst)
        neighbours[b.dst].append(b.src)
    for start in range(n):
        if side[start] >= 0:
            continue
        side[start] = 0
        stack = [start]
        while stack:
            i = stack.pop()
            for j in neighbours[i]:
                if side[j] < 0:
                    side[j] = 1 - side[i]
                    stack.append(j)
                elif side[j] == side[i]:
                    return None
    return side


def _nnz(w: Matrix) -> int:
    return int(w.count_nonzero()) if sp.issparse(w) else int(np.count_nonzero(w))


def _dense(w: Matrix) -> np.ndarray:
    return w.toarray() if sp.issparse(w) else np.asarray(w, dtype=np.float64)


def _bipartite_top_eigs(g: NeuronGraph, inv_sqrt: np.ndarray, side: np.ndarray, k: int, seed: int = 0
                        ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Top-k eigenpairs of M from the Gram matrix of the smaller side of the bipartite graph.

    With B = D_t^-1/2 W D_s^-1/2 (t: big side, s: small side), B^T B = D_s^-1/2 W^T D_t^-1 W
    D_s^-1/2, assembled from products of the edge blocks that meet in each big-side layer (or,
    for a big small side, applied block by block inside Lanczos). Returns (None, None) when
    the fast path does not apply.
    """
    off = g.offsets
    sizes = np.asarray(g.sizes)
    small = 0 if sizes[side == 0].sum() <= sizes[side == 1].sum() else 1
    s_layers = np.flatnonzero(side == small)
    n_s = int(sizes[s_layers].sum())
    if n_s == 0 or k >= n_s:
        return None, None
    s_pos = np.zeros(len(g.layers) + 1, dtype=np.int64)  # where each small-side layer starts in the Gram
    s_pos[s_layers] = np.concatenate([[0], np.cumsum(sizes[s_layers])[:-1]])

    def span(layer: int) -> slice:
        return slice(int(s_pos[layer]), int(s_pos[layer] + sizes[layer]))

    # The blocks seen from each big-side layer t: (small-side layer, matrix [n_t, n_s]).
    seen: dict[int, list[tuple[int, np.ndarray]]] = {}
    for b in g.blocks:
        if side[b.dst] != small:
            seen.setdefault(b.dst, []).append((b.src, _dense(b.weights)))
        else:
            seen.setdefault(b.src, []).append((b.dst, _dense(b.weights).T))
    inv_sqrt_s = np.concatenate([inv_sqrt[off[s]:off[s + 1]] for s in s_layers])
    if n_s <= _DENSE_MAX_NODES:
        gram = np.zeros((n_s, n_s))
        for t, parts in seen.items():
            inv_deg_t = inv_sqrt[off[t]:off[t + 1]] ** 2
            for a, (sa, ma) in enumerate(parts):
                scaled = ma * inv_deg_t[:, None]
                for b in range(a, len(parts)):
                    sb, mb = parts[b]
                    prod = mb.T @ scaled  # W_b^T D_t^-1 W_a: [n_sb, n_sa]
                    gram[span(sb), span(sa)] += prod
                    if b != a:
                        gram[span(sa), span(sb)] += prod.T
        gram *= inv_sqrt_s[:, None]
        gram *= inv_sqrt_s[None, :]
        sq, v = sla.eigh(gram, subset_by_index=[n_s - k, n_s - 1], driver="evr")
    else:  # too big to form: Lanczos on B^T B applied block by block
        def gram_times(x: np.ndarray) -> np.ndarray:
            x = x.reshape(n_s, -1) * inv_sqrt_s[:, None]
            out = np.zeros_like(x)
            for t, parts in seen.items():
                u = sum(m @ x[span(s)] for s, m in parts) * (inv_sqrt[off[t]:off[t + 1], None] ** 2)
                for s, m in parts:
                    out[span(s)] += m.T @ u
            return out * inv_sqrt_s[:, None]

        op = spla.LinearOperator((n_s, n_s), matvec=gram_times, matmat=gram_times, dtype=np.float64)
        v0 = np.random.default_rng(seed).uniform(-1.0, 1.0, n_s)
        sq, v = spla.eigsh(op, k=k, which="LA", v0=v0, tol=0.0)
        order = np.argsort(sq)
        sq, v = sq[order], v[:, order]
    sq, v = sq[::-1], v[:, ::-1]
    sigma = np.sqrt(np.maximum(sq, 0.0))
    if sigma[-1] <= 1e-10 * max(sigma[0], 1e-300):
        return None, None  # K reaches into the null space: the pairing with u is lost
    vectors = np.zeros((g.num_nodes, k))
    v_scaled = v * inv_sqrt_s[:, None]
    for s in s_layers:
        vectors[off[s]:off[s + 1]] = v[span(s)]
    for t, parts in seen.items():
        u = sum(m @ v_scaled[span(s)] for s, m in parts)
        vectors[off[t]:off[t + 1]] = u * (inv_sqrt[off[t]:off[t + 1], None] / sigma[None, :])
    return vectors / math.sqrt(2.0), sigma


def _general_top_eigs(g: NeuronGraph, inv_sqrt: np.ndarray, active: np.ndarray, k: int, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    a = g.adjacency()[active][:, active]
    d = sp.diags(inv_sqrt[active])
    mat = (d @ a @ d).tocsr()
    m = active.size
    if m <= _DENSE_MAX_NODES:
        dense = mat.toarray()
        vals, vecs = sla.eigh(dense, subset_by_index=[m - k, m - 1], driver="evr")
    else:
        v0 = np.random.default_rng(seed).uniform(-1.0, 1.0, m)
        vals, vecs = spla.eigsh(mat, k=k, which="LA", v0=v0, tol=0.0)
    order = np.argsort(vals)[::-1]
    full = np.zeros((g.num_nodes, k))
    full[active] = vecs[:, order]
    return full, vals[order]


# ---------------------------------------------------------------------------------------------
# k-means with all restarts at once


def kmeans(x: np.ndarray, k: int, *, n_init: int = 25, seed: int = 0, max_iter: int = 300, tol: float = 1e-4,
           race: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means from `n_init` greedy k-means++ starts, run together; best inertia wins.

    Returns (labels [n], centers [k, d], inertia). A restart stops when no point changes
    cluster or its centers move (squared) less than tol * mean feature variance, as in
    scikit-learn; empty clusters are re-seeded at the point farthest from its center.

    Why it is fast: all live restarts share one matrix product per iteration; Lloyd runs in
    float32 on centred data (k-means is translation invariant; centring avoids cancellation
    in |x|^2 - 2 x.c + |c|^2) and the final labels and inertias are evaluated in float64; and
    with `race` the restarts race: after iterations 3, 6 and 12 the worse half (by current
    inertia, which Lloyd only lowers) stops, down to n_init/8 finishers. On the MLP weight
    graphs of the clustering benchmark this halves the work and changes the n-cut by well
    under 1%; `race=False` runs every restart to convergence.
    """
    x64 = np.asarray(x, dtype=np.float64)
    n, d = x64.shape
    if not 1 <= k <= n:
        raise UsageError(f"k-means needs 1 <= k <= {n} points, got k={k}")
    if n_init < 1:
        raise UsageError(f"n_init must be at least 1, got {n_init}")
    rng = np.random.default_rng(seed)
    mean = x64.mean(axis=0)
    x64 = x64 - mean
    sq64 = np.einsum("ij,ij->i", x64, x64)
    aug64 = np.ascontiguousarray(np.vstack([x64.T, np.ones((1, n))]))  # [d + 1, n]
    x32, aug32 = x64.astype(np.float32), aug64.astype(np.float32)
    centers = _kmeanspp(x32, sq64.astype(np.float32), aug32, k, n_init, rng)
    threshold = tol * float(np.mean(np.var(x64, axis=0)))
    active = np.arange(n_init)    # restarts still iterating
    alive = np.arange(n_init)     # restarts still in the race (iterating or converged)
    score = np.full(n_init, np.inf)
    min_alive = max(1, -(-n_init // 8))
    for it in range(1, max_iter + 1):
        c = centers[active]
        dist = _distances(aug32, c)
        low = dist.min(axis=1, keepdims=True)
        score[active] = low.sum(axis=(1, 2), dtype=np.float64)
        new = _means(x32, dist, low, c)
        # Unchanged memberships give unchanged centers (shift 0), so this also stops a
        # restart whose labels no longer change.
        shift = np.sum((new.astype(np.float64) - c) ** 2, axis=(1, 2))
        centers[active] = new
        active = active[shift > threshold]
        if race and it in _RACE_CHECKPOINTS and alive.size > min_alive:
            keep = max(min_alive, -(-alive.size // 2))
            alive = np.sort(alive[np.argsort(score[alive], kind="stable")[:keep]])
            active = np.intersect1d(active, alive)
        if active.size == 0:
            break
    centers = centers[alive]
    dist = _distances(aug64, centers.astype(np.float64))
    labels = np.argmin(dist, axis=1)
    inertia = np.take_along_axis(dist, labels[:, None, :], axis=1)[:, 0, :].sum(axis=1) + sq64.sum()
    best = int(np.argmin(inertia))
    return labels[best], centers[best].astype(np.float64) + mean, float(max(inertia[best], 0.0))


def _distances(x_aug: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """|c|^2 - 2 x.c for every restart, center and point: [R, k, n], in one matrix product.

    This is the squared distance less |x|^2, which does not change any argmin.
    """
    r, k, d = centers.shape
    c_aug = np.concatenate([-2.0 * centers, np.einsum("rkd,rkd->rk", centers, centers)[..., None]], axis=2)
    return (c_aug.reshape(r * k, d + 1).astype(x_aug.dtype) @ x_aug).reshape(r, k, -1)


def _means(x: np.ndarray, dist: np.ndarray, low: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Assign every point to its nearest center and return the new centers (cluster means).

    The nearest center comes from a min and one compare (numpy's argmin over a short middle
    axis is several times slower); the rare exact ties are given to the lowest index after
    the counts show them. Means for all restarts come from one batched product.
    """
    r, k, n = dist.shape
    onehot = dist == low
    weights = onehot.astype(x.dtype)
    counts = weights.sum(axis=2)
    tied = np.flatnonzero(counts.sum(axis=1) != n)
    for ri in tied:
        first = np.argmax(onehot[ri], axis=0)
        weights[ri] = np.arange(k)[:, None] == first[None, :]
        counts[ri] = weights[ri].sum(axis=1)
    new = np.matmul(weights, x)
    new /= np.maximum(counts, 1.0)[..., None]
    empty = counts == 0
    if np.any(empty):  # rare: re-seed an empty cluster at the point farthest from its center
        new[empty] = centers[empty]
        sq = np.einsum("ij,ij->i", x, x)
        for ri, ci in zip(*np.nonzero(empty)):
            own = (dist[ri] * weights[ri]).sum(axis=0) + sq
            new[ri, ci] = x[int(np.argmax(own))]
    return new


def _kmeanspp(x: np.ndarray, sq: np.ndarray, x_aug: np.ndarray, k: int, n_init: int,
              rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (2 + log k candidates per step), for all restarts at once."""
    n, d = x.shape
    trials = 2 + int(math.log(k))
    rows = np.arange(n_init)
    centers = np.empty((n_init, k, d), dtype=x.dtype)
    first = rng.integers(0, n, size=n_init)
    centers[:, 0] = x[first]
    closest = np.maximum(_distances(x_aug, centers[:, :1])[:, 0] + sq, 0.0)  # [R, n]
    for c in range(1, k):
        cum = np.cumsum(closest, axis=1, dtype=np.float64)
        draws = rng.random((n_init, trials)) * cum[:, -1:]
        cand = np.empty((n_init, trials), dtype=np.int64)
        for r in range(n_init):
            cand[r] = np.searchsorted(cum[r], draws[r], side="right")
        np.minimum(cand, n - 1, out=cand)
        cand_dist = np.maximum(_distances(x_aug, x[cand]) + sq, 0.0)  # [R, trials, n]
        np.minimum(cand_dist, closest[:, None, :], out=cand_dist)
        best = np.argmin(cand_dist.sum(axis=2), axis=1)
        closest = cand_dist[rows, best]
        centers[:, c] = x[cand[rows, best]]
    return centers


# ---------------------------------------------------------------------------------------------
# Clustering


def spectral_clustering(graph: NeuronGraph | Matrix, k: int, *, seed: int = 0, n_init: int = 25,
                        max_iter: int = 300, tol: float = 1e-4) -> Clustering:
    """Cluster a graph's nodes into k clusters (isolated nodes -1); same seed, same labels."""
    g = graph if isinstance(graph, NeuronGraph) else NeuronGraph.from_adjacency(graph)
    embedding, active, values = spectral_embedding(g, k, seed=seed)
    labels_active, _, inertia = kmeans(embedding, k, n_init=n_init, seed=seed, max_iter=max_iter, tol=tol)
    labels = np.full(g.num_nodes, -1, dtype=np.int64)
    labels[active] = labels_active
    return Clustering(labels=labels, k=k, ncut=ncut(g, labels), eigenvalues=values, inertia=inertia)


def local_clustering(graph: NeuronGraph, k: int, *, neighbours: bool = True, seed: int = 0,
                     n_init: int = 25) -> dict[str, np.ndarray]:
    """Cluster each layer's units separately; returns layer name -> labels of its nodes.

    With `neighbours`, a layer is clustered on the subgraph of itself and the layers joined to
    it by edges (its two neighbours in a chain); without, on its own edges (activation
    correlations within the layer). Layers with fewer than k connected units get all -1.
    """
    out = {}
    for i, name in enumerate(graph.layers):
        keep = [i, *graph.layer_neighbours(i)] if neighbours else [i]
        sub = graph.subgraph(keep)
        j = sub.layers.index(name)
        labels = np.full(graph.sizes[i], -1, dtype=np.int64)
        connected = int(np.count_nonzero(sub.degrees > 0))
        if connected >= k:
            full = spectral_clustering(sub, k, seed=seed, n_init=n_init).labels
            labels = full[sub.layer_slice(j)]
        out[name] = labels
    return out
