"""Weight anatomy as real CNNs need it: depthwise kernels drawn as they are, SVD pointed at the useful
question (and through expanded weights), colour left out where the model reads grey images."""
import pytest
import torch
from torch import nn

from netanatomy.anatomy import layer_pictures, layer_svd, layer_weights
from netanatomy.errors import UsageError
from netanatomy.models.layers import discover_layers


def _mobile_like(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.ReLU6(),
        nn.Conv2d(8, 16, 1), nn.ReLU6(),
    ).eval()


def test_depthwise_kernels_are_drawn_as_they_are():
    model = _mobile_like()
    with torch.no_grad():                       # planted: unit u's kernel lights up row u % 3
        model[2].weight.zero_()
        for u in range(8):
            model[2].weight[u, 0, u % 3, :] = 1.0
    layers = discover_layers(model, (3, 16, 16))
    lw = layer_weights(model, layers, "2")
    assert tuple(lw.weights.shape) == (8, 1, 3, 3) and "depthwise" in lw.note
    pics = layer_pictures(lw.weights, seed=0)
    bright = pics.pictures.max(axis=-1)           # [U, kh, kw]
    for u in range(8):
        assert bright[u, u % 3].min() > 0.5        # the planted row shows
        assert bright[u].sum() == pytest.approx(bright[u, u % 3].sum(), abs=1e-6)   # and nothing else


def test_svd_of_depthwise_layer_says_diagonal_and_points_to_through():
    model = _mobile_like()
    layers = discover_layers(model, (3, 16, 16))
    with pytest.raises(UsageError, match="depthwise.*diagonal.*--through"):
        layer_svd(model, layers, "2")


def test_svd_through_expanded_weights_finds_a_planted_split():
    """Stem units 0-3 feed (through the depthwise conv) only pointwise units 0-7, stem units
    4-7 only units 8-15: singular vector 0 or 1 of the expanded |W| separates the two halves."""
    model = _mobile_like()
    with torch.no_grad():
        pw = model[4].weight
        pw.zero_()
        pw[:8, :4] = torch.rand(8, 4, 1, 1) + 0.5
        pw[8:, 4:] = 3 * (torch.rand(8, 4, 1, 1) + 0.5)
    layers = discover_layers(model, (3, 16, 16))
    report = layer_svd(model, layers, "4", lower="0", through=True)
    assert report.lower == "0" and "expanded" in report.note
    assert tuple(report.svd.lower.shape[:1]) == (8,)
    split = [v for v in (report.svd.lower[:, 0], report.svd.lower[:, 1])
             if (v[:4].abs().max() < 1e-6 or v[4:].abs().max() < 1e-6)]
    assert split, "no singular vector isolates one half of the stem"
    # the stem reads the image: colour and frequency correlations are reported
    assert set(report.correlations) == {"vector_0", "vector_1"}


def test_svd_on_a_grey_model_leaves_colour_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.ReLU()).eval()
    layers = discover_layers(model, (1, 12, 12))
    report = layer_svd(model, layers, "2")
    assert "colourfulness" not in report.properties and "frequency" in report.properties
    assert "colour does not apply" in report.note
    for vector in report.correlations.values():
        assert "colourfulness" not in vector
        assert all(v == v for stats in vector.values() for v in stats.values())        # no NaN
