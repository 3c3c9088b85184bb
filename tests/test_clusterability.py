import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from netanatomy.core.clusterability import clusterability, shuffle_key, shuffle_seed, shuffled_graph
from netanatomy.core.graphs import chain_network
from netanatomy.core.shuffle import shuffle_weight, shuffle_weights
from netanatomy.errors import UsageError
from netanatomy.scale import TaskStore
from planted import block_diagonal_weights


def planted_network(sizes=(48, 40, 40, 40, 8), modules=4, cross=0.05, seed=0):
    """An MLP whose layers are block-diagonal (4 modules) plus weak links everywhere."""
    ws, truth = block_diagonal_weights(sizes, modules, cross, seed)
    return chain_network(ws), truth


def iid_network(sizes=(48, 40, 40, 40, 8), seed=0):
    rng = np.random.default_rng(seed)
    return chain_network([rng.normal(size=(b, a)) for a, b in zip(sizes[:-1], sizes[1:])])


def test_planted_modules_are_recovered_and_far_more_clusterable():
    net, truth = planted_network()
    result = clusterability(net, 4, n_shuffles=39, method="layer", seed=0)
    assert adjusted_rand_score(truth, result.clustering.labels) > 0.9
    s = result.shuffle
    assert s.n == 39
    assert s.p == pytest.approx(1 / 40)  # the true n-cut is below every shuffle
    assert s.z < -10
    assert result.clustering.ncut < s.ncuts.min()
    json = s.to_json()
    assert set(json) == {"method", "n", "mean", "std", "z", "p"}


def test_iid_network_is_not_clusterable():
    result = clusterability(iid_network(seed=3), 4, n_shuffles=39, method="layer", seed=0)
    assert result.shuffle.p > 0.05
    assert abs(result.shuffle.z) < 3
    # An i.i.d. network is exchangeable with its shuffles, so p is uniform over networks: not
    # small across the board.
    ps = [clusterability(iid_network(seed=s), 4, n_shuffles=19, seed=0).shuffle.p for s in range(5)]
    assert np.median(ps) > 0.2


def test_layer_nonzero_shuffle_on_pruned_planted_network():
    net, _ = planted_network()
    pruned = net.with_weights([np.where(np.abs(e.weight) > 0.04, e.weight, 0.0) for e in net.edges])
    result = clusterability(pruned, 4, n_shuffles=19, method="layer_nonzero", seed=1)
    assert result.shuffle.p == pytest.approx(1 / 20)


def test_same_seed_same_numbers_and_resume(tmp_path):
    net = iid_network(seed=3)
    a = clusterability(net, 3, n_shuffles=6, seed=11)
    b = clusterability(net, 3, n_shuffles=6, seed=11)
    np.testing.assert_array_equal(a.clustering.labels, b.clustering.labels)
    np.testing.assert_array_equal(a.shuffle.ncuts, b.shuffle.ncuts)
    assert a.shuffle.p == b.shuffle.p and a.shuffle.z == b.shuffle.z
    c = clusterability(net, 3, n_shuffles=6, seed=12)
    assert not np.array_equal(a.shuffle.ncuts, c.shuffle.ncuts)
    # resume: the first shuffles stored, the rest computed, same numbers; on_result sees every one
    store = TaskStore(tmp_path / "tasks", {"run": "a"})
    for i in range(4):
        store.put(shuffle_key(i), {"ncut": np.asarray(a.shuffle.ncuts[i])})
    seen = []
    resumed = clusterability(net, 3, n_shuffles=6, seed=11, store=store, on_result=lambda i, v: seen.append(i))
    np.testing.assert_array_equal(resumed.shuffle.ncuts, a.shuffle.ncuts)
    assert sorted(seen) == [0, 1, 2, 3, 4, 5] and store.done() == 6
    # a stored value is used as it is (it is not recomputed)
    store.put(shuffle_key(0), {"ncut": np.asarray(a.shuffle.ncuts[0] + 1.0)})
    planted = clusterability(net, 3, n_shuffles=6, seed=11, store=store)
    assert planted.shuffle.ncuts[0] == a.shuffle.ncuts[0] + 1.0


def test_shuffles_keep_each_layers_weights():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 5))
    w[w < 0] = 0.0
    s = shuffle_weight(w, "layer", 0)
    np.testing.assert_array_equal(np.sort(s.ravel()), np.sort(w.ravel()))
    assert not np.array_equal(s, w)
    nz = shuffle_weight(w, "layer_nonzero", 0)
    np.testing.assert_array_equal(nz != 0, w != 0)  # the sparsity pattern stays
    np.testing.assert_array_equal(np.sort(nz[nz != 0]), np.sort(w[w != 0]))
    conv = rng.normal(size=(4, 3, 3, 3))
    s1, s2 = shuffle_weights([conv, w], "layer", 5), shuffle_weights([conv, w], "layer", 5)
    np.testing.assert_array_equal(s1[0], s2[0])
    assert s1[0].shape == conv.shape
    with pytest.raises(UsageError):
        shuffle_weights([w], "global", 0)


def test_shuffled_graph_is_seeded():
    net = iid_network(seed=1)
    g1 = shuffled_graph(net, "layer", shuffle_seed(0, 2))
    g2 = shuffled_graph(net, "layer", shuffle_seed(0, 2))
    np.testing.assert_array_equal(g1.blocks[0].weights, g2.blocks[0].weights)
    g3 = shuffled_graph(net, "layer", shuffle_seed(0, 3))
    assert not np.array_equal(g1.blocks[0].weights, g3.blocks[0].weights)


# --- from models ---------------------------------------------------------------------------

import torch  # noqa: E402
from torch import nn  # noqa: E402

from netanatomy.models.layers import discover_layers  # noqa: E402
from netanatomy.specialization.clusters import cluster_model, layer_display_names  # noqa: E402
from netanatomy.specialization.extract import weight_network  # noqa: E402


def test_weight_network_of_a_planted_mlp_module_is_clustered_like_its_weights():
    net, truth = planted_network()
    sizes = list(net.layer_sizes.values())
    model = nn.Sequential(nn.Flatten(), *[m for a, b in zip(sizes[:-1], sizes[1:])
                                          for m in (nn.Linear(a, b), nn.ReLU())][:-1])
    with torch.no_grad():
        linears = [m for m in model if isinstance(m, nn.Linear)]
        for lin, e in zip(linears, net.edges):
            lin.weight.copy_(torch.from_numpy(e.weight))
    layer_map = discover_layers(model, (sizes[0],))
    extracted = weight_network(model, (sizes[0],), layer_names=layer_display_names(layer_map))
    assert list(extracted.network.layer_sizes.values()) == sizes
    result = cluster_model(model, layer_map, k=4, n_shuffles=9, seed=0)
    assert adjusted_rand_score(truth, result.result.clustering.labels) > 0.9
    assert result.result.shuffle.p == pytest.approx(0.1)
    doc = result.to_json()
    assert sum(len(c["units"]) for c in doc["clusters"]) == sum(sizes)


class Branchy(nn.Module):
    """conv -> BN -> ReLU, two branches joined by cat, a residual sum, flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.a = nn.Conv2d(4, 2, 1)
        self.b = nn.Conv2d(4, 3, 3, padding=1)
        self.mix = nn.Conv2d(5, 5, 1)
        self.head = nn.Linear(5 * 2 * 2, 6)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        joined = torch.cat([torch.relu(self.a(s)), torch.relu(self.b(s))], dim=1)
        y = torch.relu(self.mix(joined)) + joined
        return self.head(torch.flatten(nn.functional.max_pool2d(y, 2), 1))


def test_weight_network_follows_cat_residual_flatten_and_folds_batchnorm():
    torch.manual_seed(0)
    model = Branchy().eval()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.weight.data.uniform_(0.5, 2.0)
    net = weight_network(model, (3, 4, 4)).network
    assert dict(net.layer_sizes) == {"input": 3, "stem": 4, "a": 2, "b": 3, "mix": 5, "head": 6}
    edges = {e.dst: e for e in net.edges}
    assert edges["mix"].sources == (("a", 0, 2), ("b", 2, 5))
    assert set(edges["head"].sources) == {("mix", 0, 5), ("a", 0, 2), ("b", 2, 5)}
    # written out here rather than with the library's own fold_batchnorm / edge_matrix
    with torch.no_grad():
        scale = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
        folded = (model.stem.weight * scale[:, None, None, None]).numpy()
        head_l1 = model.head.weight.abs().reshape(6, 5, 2, 2).sum(dim=(2, 3)).numpy()  # channel-major flatten
    np.testing.assert_allclose(edges["stem"].weight, folded, rtol=1e-6)
    g = net.graph()
    head = [b for b in g.blocks if g.layers[b.dst] == "head" and g.layers[b.src] == "a"][0]
    np.testing.assert_allclose(head.weights, head_l1[:, 0:2], rtol=1e-6)
    stem = [b for b in g.blocks if g.layers[b.dst] == "stem"][0]
    np.testing.assert_allclose(stem.weights, np.abs(folded).sum(axis=(2, 3)), rtol=1e-6)   # L1 per kernel


def test_shuffles_keep_depthwise_wiring():
    """A depthwise conv joins channel i only to unit i; shuffling within its [U, 1, k, k] tensor
    keeps that diagonal, so the null networks share the architecture's wiring and the test
    measures what training did on top of it (docs/results/imagenet.md relies on this)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6), nn.ReLU(), nn.Conv2d(6, 4, 1))
    network = weight_network(model, (3, 12, 12)).network
    dw = next(e for e in network.edges if e.groups == 6)
    assert dw.weight.shape == (6, 1, 3, 3)

    def depthwise_block(graph):
        i_src, i_dst = graph.layers.index(dw.sources[0][0]), graph.layers.index(dw.dst)
        return next(b.weights for b in graph.blocks if (b.src, b.dst) == (i_src, i_dst))

    true_block = np.asarray(depthwise_block(network.graph()))
    assert np.count_nonzero(true_block - np.diag(np.diag(true_block))) == 0
    for i in range(5):
        block = np.asarray(depthwise_block(shuffled_graph(network, "layer", shuffle_seed(0, i))))
        assert np.count_nonzero(block - np.diag(np.diag(block))) == 0   # still diagonal
        assert not np.allclose(np.diag(block), np.diag(true_block))     # but the strengths moved
        assert np.diag(block).sum() > 0
