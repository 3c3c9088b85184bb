import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score

from netanatomy.core.graphs import NeuronGraph, activation_graph, weight_graph
from netanatomy.core.spectral import kmeans, local_clustering, ncut, spectral_clustering, spectral_embedding
from netanatomy.errors import UsageError
from planted import block_diagonal_weights


def planted_mlp(sizes=(40, 32, 32, 32, 8), modules=4, cross=0.02, seed=0):
    """Block-diagonal layers plus weak links everywhere; returns weights and node modules."""
    return block_diagonal_weights(sizes, modules, cross, seed)


def brute_force_ncut(a: np.ndarray, labels: np.ndarray) -> float:
    total = 0.0
    for c in set(labels.tolist()) - {-1}:
        inside = labels == c
        cut = sum(a[i, j] for i in np.flatnonzero(inside) for j in np.flatnonzero(~inside))
        vol = sum(a[i].sum() for i in np.flatnonzero(inside))
        total += cut / vol
    return total


def test_ncut_equals_brute_force_on_tiny_graph():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(7, 7))
    a = np.triu(a, 1)
    a = a + a.T
    for labels in (np.array([0, 0, 1, 1, 2, 2, 2]), np.array([1, 0, 1, 0, 1, 0, 0])):
        assert ncut(a, labels) == pytest.approx(brute_force_ncut(a, labels), rel=1e-12)
        assert ncut(sp.csr_matrix(a), labels) == pytest.approx(brute_force_ncut(a, labels), rel=1e-12)
    # layered graph: blocks give the same n-cut as the assembled matrix
    ws, truth = planted_mlp((6, 5, 4), modules=2)
    g = weight_graph(ws)
    labels = truth.copy()
    labels[3] = 1 - labels[3]
    assert ncut(g, labels) == pytest.approx(brute_force_ncut(g.adjacency().toarray(), labels), rel=1e-12)


def test_isolated_nodes_are_labelled_minus_one():
    ws, truth = planted_mlp((20, 16, 8), modules=2)
    ws[0][:, [3, 7]] = 0.0  # input units 3 and 7 lose every edge
    g = weight_graph(ws)
    c = spectral_clustering(g, 2, seed=0)
    assert c.labels[3] == -1 and c.labels[7] == -1
    assert np.all(np.delete(c.labels, [3, 7]) >= 0)
    assert ncut(g, c.labels) == pytest.approx(c.ncut)


def test_planted_modules_recovered_and_sklearn_agrees():
    ws, truth = planted_mlp()
    g = weight_graph(ws)
    ours = spectral_clustering(g, 4, seed=0)
    assert adjusted_rand_score(truth, ours.labels) == pytest.approx(1.0)
    ref = SpectralClustering(4, affinity="precomputed", eigen_solver="arpack", n_init=25, random_state=0)
    ref_labels = ref.fit(g.adjacency()).labels_
    assert adjusted_rand_score(ref_labels, ours.labels) == pytest.approx(1.0)
    assert ours.ncut == pytest.approx(ncut(g, ref_labels))


def test_bipartite_fast_path_equals_general_path():
    rng = np.random.default_rng(5)
    ws = [rng.normal(size=(30, 50)), rng.normal(size=(30, 30)), rng.normal(size=(10, 30))]
    g = weight_graph(ws)
    emb_fast, active_fast, vals_fast = spectral_embedding(g, 6)
    plain = NeuronGraph.from_adjacency(g.adjacency())  # one layer: no bipartite structure to use
    emb_gen, active_gen, vals_gen = spectral_embedding(plain, 6)
    np.testing.assert_allclose(vals_fast, vals_gen, atol=1e-10)
    np.testing.assert_array_equal(active_fast, active_gen)
    # same subspace: the projections onto the two bases agree
    q1, _ = np.linalg.qr(emb_fast)
    q2, _ = np.linalg.qr(emb_gen)
    np.testing.assert_allclose(np.abs(np.linalg.svd(q1.T @ q2, compute_uv=False)), 1.0, atol=1e-8)


def test_same_seed_same_clusters():
    rng = np.random.default_rng(6)
    g = weight_graph([rng.normal(size=(40, 60)), rng.normal(size=(40, 40)), rng.normal(size=(10, 40))])
    a = spectral_clustering(g, 5, seed=3)
    b = spectral_clustering(g, 5, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.ncut == b.ncut
    others = [spectral_clustering(g, 5, seed=s, n_init=1).labels for s in range(4)]
    assert any(not np.array_equal(others[0], o) for o in others[1:])


def test_kmeans_finds_separated_blobs_and_is_seeded():
    rng = np.random.default_rng(7)
    centers = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    truth = np.repeat(np.arange(4), 50)
    x = centers[truth] + rng.normal(scale=0.5, size=(200, 2)) + 100.0  # far from the origin
    labels, found, inertia = kmeans(x, 4, seed=1)
    assert adjusted_rand_score(truth, labels) == 1.0
    assert inertia == pytest.approx(sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in range(4)))
    again = kmeans(x, 4, seed=1)
    np.testing.assert_array_equal(labels, again[0])
    no_race = kmeans(x, 4, seed=1, race=False)
    assert adjusted_rand_score(labels, no_race[0]) == 1.0
    with pytest.raises(UsageError):
        kmeans(x, 0)


def test_kmeans_handles_duplicate_points():
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]), 10, axis=0)
    labels, _, inertia = kmeans(x, 3, seed=0)
    assert len(set(labels.tolist())) == 3 and inertia == pytest.approx(0.0, abs=1e-12)


def test_local_clustering_of_planted_layers():
    ws, truth = planted_mlp()
    g = weight_graph(ws, ["h1", "h2", "h3", "out"])
    local = local_clustering(g, 4, seed=0)
    assert set(local) == {"input", "h1", "h2", "h3", "out"}
    for name in ("h1", "h2", "h3"):
        units = np.arange(32)
        assert adjusted_rand_score(units % 4, local[name]) == pytest.approx(1.0)


def test_activation_graph_clustering_finds_correlated_groups():
    rng = np.random.default_rng(8)
    sources = rng.normal(size=(300, 3))
    values = np.repeat(sources, 4, axis=1) + 0.3 * rng.normal(size=(300, 12))
    g = activation_graph(values)
    c = spectral_clustering(g, 3, seed=0)
    assert adjusted_rand_score(np.repeat(np.arange(3), 4), c.labels) == pytest.approx(1.0)
    alone = local_clustering(g, 3, neighbours=False, seed=0)["layer"]
    assert adjusted_rand_score(np.repeat(np.arange(3), 4), alone) == pytest.approx(1.0)


def test_bad_k():
    g = weight_graph([np.ones((3, 2))])
    with pytest.raises(UsageError):
        spectral_clustering(g, 9)
    with pytest.raises(UsageError):
        spectral_clustering(g, 0)


def test_ncut_known_values_by_hand():
    # two nodes joined by weight 2: together, nothing is cut; apart, each side cuts 2 of its volume 2
    a = np.array([[0.0, 2.0], [2.0, 0.0]])
    assert ncut(a, np.array([0, 0])) == 0.0 and ncut(a, np.array([1, 1])) == 0.0
    assert ncut(a, np.array([0, 1])) == pytest.approx(2.0) and ncut(a, np.array([1, 0])) == pytest.approx(2.0)
    # a path 0 -1- 1 -3- 2 split {0} | {1, 2}: cut 1 over vol 1, plus cut 1 over vol (1 + 3) + 3
    path = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
    assert ncut(path, np.array([0, 1, 1])) == pytest.approx(1.0 + 1.0 / 7.0)


def test_large_bipartite_graphs_use_lanczos_with_the_same_result(monkeypatch):
    import netanatomy.core.spectral as spectral

    rng = np.random.default_rng(9)
    g = weight_graph([rng.normal(size=(60, 80)), rng.normal(size=(70, 60)), rng.normal(size=(30, 70))])
    emb_dense, _, vals_dense = spectral_embedding(g, 6)
    monkeypatch.setattr(spectral, "_DENSE_MAX_NODES", 10)  # force the block-wise Lanczos path
    emb_lanczos, _, vals_lanczos = spectral_embedding(g, 6)
    np.testing.assert_allclose(vals_lanczos, vals_dense, atol=1e-10)
    q1, _ = np.linalg.qr(emb_dense)
    q2, _ = np.linalg.qr(emb_lanczos)
    np.testing.assert_allclose(np.linalg.svd(q1.T @ q2, compute_uv=False), 1.0, atol=1e-8)
