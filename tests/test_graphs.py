import numpy as np
import pytest
import scipy.stats as sps
import torch
import torch.nn.functional as F

from netanatomy.core.graphs import (
    NeuronGraph,
    activation_graph,
    chain_network,
    edge_matrix,
    fold_batchnorm,
    spearman_squared,
    weight_graph,
)
from netanatomy.errors import UsageError


def test_edge_matrix_linear_conv_and_flattened_conv():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 7))
    np.testing.assert_allclose(edge_matrix(w), np.abs(w))
    conv = rng.normal(size=(4, 3, 3, 3))
    expected = np.array([[np.abs(conv[j, i]).sum() for i in range(3)] for j in range(4)])
    np.testing.assert_allclose(edge_matrix(conv, 3), expected)
    # A linear layer reading a flattened [C=3, 2, 2] map: channel i owns features 4i..4i+3.
    lin = rng.normal(size=(6, 12))
    expected = np.stack([np.abs(lin[:, 4 * i:4 * i + 4]).sum(axis=1) for i in range(3)], axis=1)
    np.testing.assert_allclose(edge_matrix(lin, 3), expected)
    with pytest.raises(UsageError):
        edge_matrix(lin, 5)


def test_edge_matrix_grouped_conv_is_block_diagonal():
    conv = np.ones((4, 3, 1, 1))  # 4 outputs, 6 inputs, 2 groups of 3
    m = edge_matrix(conv, 6, groups=2)
    assert m.shape == (4, 6)
    np.testing.assert_array_equal(m[:2, 3:], 0)
    np.testing.assert_array_equal(m[2:, :3], 0)
    np.testing.assert_array_equal(m[:2, :3], 1)


def test_fold_batchnorm_matches_conv_then_batchnorm():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, bias=False)
    bn = torch.nn.BatchNorm2d(5).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(-2, 2)
    bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    folded = torch.tensor(fold_batchnorm(conv.weight, bn.weight, bn.running_var, bn.eps), dtype=torch.float32)
    bias = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(F.conv2d(x, folded, bias), bn(conv(x)), rtol=1e-4, atol=1e-5)


def test_weight_graph_structure():
    rng = np.random.default_rng(1)
    ws = [rng.normal(size=(4, 6)), rng.normal(size=(3, 4))]
    g = weight_graph(ws, ["h", "out"])
    assert g.layers == ("input", "h", "out") and g.sizes == (6, 4, 3) and g.num_nodes == 13
    a = g.adjacency().toarray()
    np.testing.assert_allclose(a, a.T)
    np.testing.assert_allclose(a[6:10, :6], np.abs(ws[0]))
    np.testing.assert_allclose(a[10:, 6:10], np.abs(ws[1]))
    assert np.count_nonzero(a[:6, :6]) == 0 and np.count_nonzero(a[:6, 10:]) == 0
    np.testing.assert_allclose(g.degrees, a.sum(axis=1))
    assert g.units([0, 7, 12]) == [("input", 0), ("h", 1), ("out", 2)]
    sub = g.subgraph(["h", "out"])
    assert sub.layers == ("h", "out") and len(sub.blocks) == 1
    np.testing.assert_allclose(sub.adjacency().toarray(), a[6:, 6:])


def test_cnn_chain_with_flatten():
    rng = np.random.default_rng(2)
    net = chain_network([rng.normal(size=(4, 3, 3, 3)), rng.normal(size=(10, 4 * 5 * 5))], ["conv", "fc"])
    g = net.graph()
    assert g.sizes == (3, 4, 10)
    assert g.blocks[1].weights.shape == (10, 4)


def test_spearman_squared_matches_scipy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5))
    x[:, 3] = x[:, 0] ** 3 + 0.1 * rng.normal(size=40)  # monotone relation
    x[5, 2] = x[6, 2]  # a tie
    r2, kept = spearman_squared(x)
    expected = sps.spearmanr(x).statistic ** 2
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(r2, expected, atol=1e-12)
    np.testing.assert_array_equal(kept, np.arange(5))


def test_activation_graph_drops_constant_units_and_zeroes_nan():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(30, 4))
    a[:, 1] = 2.0  # zero variance: dropped
    b = rng.normal(size=(30, 3))
    b[3, 0] = np.nan  # this unit's correlations are undefined: edges 0
    g = activation_graph({"a": a, "b": b})
    assert g.layers == ("a", "b")
    assert list(g.node_unit) == [0, 2, 3, 0, 1, 2]
    adj = g.adjacency().toarray()
    assert np.all(np.isfinite(adj)) and np.all(np.diag(adj) == 0)
    np.testing.assert_array_equal(adj[3], 0)  # unit b:0 has a NaN value
    r2 = sps.spearmanr(a[:, [0, 2]]).statistic ** 2
    assert adj[0, 1] == pytest.approx(r2)


def test_from_adjacency_roundtrip():
    a = np.array([[0, 1, 0], [1, 0, 2], [0, 2, 0]], dtype=float)
    g = NeuronGraph.from_adjacency(a)
    np.testing.assert_allclose(g.adjacency().toarray(), a)
    np.testing.assert_allclose(g.degrees, [1, 3, 2])
    with pytest.raises(UsageError):
        NeuronGraph.from_adjacency(np.zeros((2, 3)))
