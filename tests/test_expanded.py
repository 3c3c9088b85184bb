"""Expanded weights through the linearized model equal the analytic product of the kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netanatomy.anatomy.expanded import Linearized, expanded_weights, top_connections
from netanatomy.errors import UsageError
from netanatomy.models.layers import discover_layers


class TwoConv(nn.Module):
    """conv1 -> ReLU -> max-pool 2 -> conv2 (module ReLU and pool), 3 x 16 x 16 inputs."""

    netanatomy_input_shape = (3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.conv2(self.pool(self.relu(self.conv1(x))))


class FunctionalTwoConv(TwoConv):
    """The same net written with functional calls, TF-style -inf padding before the pool."""

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.pad(h, (0, 0, 0, 0), value=float("-inf")), 2)
        return self.conv2(h)


def analytic_from_conv1(model: TwoConv) -> torch.Tensor:
    """conv2 after a 2x2 average pool: each conv2 tap spread over a 2x2 block, a quarter each."""
    w2 = model.conv2.weight.detach()
    return 0.25 * w2.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def analytic_from_input(model: TwoConv) -> np.ndarray:
    """conv2 o avgpool o conv1: the full convolution of the pooled conv2 kernels with conv1's."""
    k2 = analytic_from_conv1(model).numpy()                             # [5, 4, 6, 6]
    w1 = model.conv1.weight.detach().numpy()                            # [4, 3, 3, 3]
    out = np.zeros((5, 3, 8, 8))
    for y in range(6):
        for x in range(6):
            for d in range(3):
                for e in range(3):
                    out[:, :, y + d, x + e] += np.einsum("jc,ci->ji", k2[:, :, y, x], w1[:, :, d, e])
    return out


@pytest.mark.parametrize("cls", [TwoConv, FunctionalTwoConv])
def test_expanded_weights_equal_the_analytic_product(cls):
    model = cls()
    layers = discover_layers(model)
    direct = expanded_weights(model, layers, "conv1", "conv2")
    assert direct.weights.shape == (5, 4, 6, 6)
    assert torch.allclose(direct.weights, analytic_from_conv1(model), atol=1e-5)
    assert direct.position == (4, 4)
    full = expanded_weights(model, layers, "input", "conv2", chunk=2)     # several chunks
    assert full.weights.shape == (5, 3, 8, 8)
    assert np.allclose(full.weights.numpy(), analytic_from_input(model), atol=1e-4)
    assert "relu" in direct.replaced and any("max_pool" in r for r in direct.replaced)


def test_adjacent_layers_give_the_kernel_itself():
    model = TwoConv()
    layers = discover_layers(model)
    res = expanded_weights(model, layers, "input", "conv1")
    assert torch.allclose(res.weights, model.conv1.weight.detach(), atol=1e-6)


def test_the_users_model_is_not_changed():
    model = TwoConv()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 16, 16)
    y0 = model(x)
    expanded_weights(model, discover_layers(model), "conv1", "conv2")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), y0)                                    # still ReLU and max-pool
    assert isinstance(model.relu, nn.ReLU) and isinstance(model.pool, nn.MaxPool2d)


def test_linearized_mode_replaces_nonlinearities():
    x = torch.randn(1, 2, 4, 4)
    with Linearized() as mode:
        assert torch.equal(F.relu(x), x)
        assert torch.equal(torch.relu(x), x)
        assert torch.equal(x.relu(), x)
        pooled = F.max_pool2d(x, 2)
        lrn = F.local_response_norm(x, 3, alpha=1e-4, beta=0.75, k=2.0)
    assert torch.allclose(pooled, F.avg_pool2d(x, 2))
    assert torch.allclose(lrn, x / 2.0 ** 0.75)
    assert {"relu", "local_response_norm"} <= mode.replaced


def test_top_connections_and_errors():
    model = TwoConv()
    layers = discover_layers(model)
    res = expanded_weights(model, layers, "conv1", "conv2")
    top = top_connections(res, 3)
    norms = res.norms()
    assert [t["norm"] for t in top] == sorted(norms.flatten().tolist(), reverse=True)[:3]
    assert len(top_connections(res, 2, per_upper=True)) == 10
    with pytest.raises(UsageError):
        expanded_weights(model, layers, "conv2", "conv1")
    with pytest.raises(UsageError):
        expanded_weights(model, layers, "conv1", "conv2", position=(40, 0))


class Branched(nn.Module):
    """Two parallel convs concatenated, read by one conv: a lower layer made of several hooks."""

    netanatomy_input_shape = (3, 10, 10)

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.up = nn.Conv2d(5, 4, 3, padding=1)

    def forward(self, x):
        return self.up(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))


def test_concatenated_lower_layer_gives_the_reading_kernel():
    model = Branched()
    layers = discover_layers(model)
    concat = next(layer.name for layer in layers.values() if layer.kind == "concat")
    res = expanded_weights(model, layers, concat, "up")
    assert torch.allclose(res.weights, model.up.weight.detach(), atol=1e-6)
