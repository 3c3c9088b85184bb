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


def _gabor(theta_deg: float, k: int = 5, freq: float = 0.25, sigma: float = 1.5) -> torch.Tensor:
    """Stripes running at theta_deg (counter-clockwise from horizontal, row 0 on top)."""
    import math

    c = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    t = math.radians(theta_deg + 90.0)                 # the wave runs across the stripes
    u = x * math.cos(t) - y * math.sin(t)
    return torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2)) * torch.cos(2 * math.pi * freq * u)


def test_orientation_of_small_kernels():
    from netanatomy.core.equivariance import filter_orientation

    vline = torch.tensor([[-1.0, 2.0, -1.0]] * 3, dtype=torch.float64)
    diag = torch.eye(3, dtype=torch.float64) * 3 - 1            # a line from top left to bottom right
    blob = torch.tensor([[-1.0, -1, -1], [-1, 8, -1], [-1, -1, -1]], dtype=torch.float64)
    filters = torch.stack([vline, vline.T, diag, blob])[:, None].expand(-1, 3, -1, -1)
    angle, coherence = filter_orientation(filters)
    assert angle[:3].tolist() == pytest.approx([90.0, 0.0, 135.0], abs=1e-6)
    assert coherence[:3].min() > 0.99 and coherence[3] < 1e-6
    gabors = torch.stack([_gabor(a, k=7) for a in (30.0, 75.0, 120.0)])[:, None]
    angle, coherence = filter_orientation(gabors)
    assert angle.tolist() == pytest.approx([30.0, 75.0, 120.0], abs=5.0) and coherence.min() > 0.5


def test_small_kernel_families_have_orientations_duplicates_and_coarse_angles():
    from netanatomy.core.equivariance import angle_resolution, rotation_families

    assert [angle_resolution(k) for k in (3, 5, 7, 11)] == [45.0, 22.5, 15.0, 11.25]
    vline = torch.tensor([[-1.0, 2.0, -1.0]] * 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(3, 3, 3, generator=g, dtype=torch.float64)
    filters = torch.stack([vline, vline.T, 2.0 * vline])[:, None].expand(-1, 3, -1, -1)
    filters = torch.cat([filters, noise[:, None].expand(-1, 3, -1, -1)])
    (family,) = rotation_families(filters)
    assert sorted(family.units) == [0, 1, 2]
    assert family.period == 180.0 and family.orientation in (0.0, 90.0)       # oriented, not "no orientation"
    assert family.resolution == 45.0 and all(a % 45.0 == 0 for a in family.angles)
    assert family.kind == "rotated" and len(family.duplicates) == 1          # 0 and 2 are one filter
    # copies only: called duplicates
    (copies,) = rotation_families(torch.stack([_gabor(20.0), 1.5 * _gabor(20.0)])[:, None])
    assert copies.kind == "duplicates" and copies.angles == [0.0, 0.0]


def test_3x3_kernels_turn_on_their_ring_and_random_ones_form_no_family():
    from netanatomy.core.equivariance import ring_rotate_3x3, rotation_families

    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    assert torch.equal(ring_rotate_3x3(w, 2), torch.rot90(w, 1, dims=(-2, -1)))
    vline = torch.tensor([[0.0, 1.0, 0.0]] * 3)
    assert torch.equal(ring_rotate_3x3(vline, 1), torch.eye(3))           # | turned 45 degrees CCW is \
    g = torch.Generator().manual_seed(5)
    assert rotation_families(torch.randn(24, 3, 3, 3, generator=g, dtype=torch.float64)) == []


def test_direct_svd_behind_a_depthwise_layer_describes_the_stem_filters():
    model = _mobile_like()
    layers = discover_layers(model, (3, 16, 16))
    report = layer_svd(model, layers, "4")                 # the pointwise conv reads the depthwise layer
    assert report.lower == "2" and "depthwise" in report.note
    assert report.filters is not None and tuple(report.filters.shape) == (8, 3, 3, 3)
    assert torch.equal(report.filters, model[0].weight.detach())
    assert set(report.correlations) == {"vector_0", "vector_1"}


def test_rotation_families_of_a_depthwise_layer_follow_its_channels():
    """Stem units 0-3: an edge at four quarter turns; depthwise units 0 and 1 filter them with a
    kernel and its quarter turn, so they are one family at 90 degrees."""
    from netanatomy.anatomy import layer_rotation_families

    model = _mobile_like()
    edge = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0], [-1.0, 0.5, 1.0]])
    kernel = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.3, 1.0, 0.0]])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(8, 3, 3, 3, generator=g))
        model[2].weight.copy_(torch.randn(8, 1, 3, 3, generator=g))
        for r in range(4):
            model[0].weight[r] = torch.rot90(edge, r).expand(3, 3, 3)
        model[2].weight[0, 0] = kernel
        model[2].weight[1, 0] = torch.rot90(kernel, 1)
    layers = discover_layers(model, (3, 16, 16))
    result = layer_rotation_families(model, layers, "2")
    assert result["mode"] == "quarter turns"
    assert [sorted(f["units"]) for f in result["families"]] == [[0, 1]]
    family = result["families"][0]
    angle_of = dict(zip(family["units"], family["angles"]))
    assert (angle_of[1] - angle_of[0]) % 360 in (90.0, 270.0)


def test_banding_says_how_many_kernels_carry_the_score():
    """Ten loud horizontally banded kernels among 990 quiet vertically banded ones: the energy-
    weighted score is horizontal, carried by about ten kernels, while most kernels lean vertical."""
    from netanatomy.core.banding import banding_score

    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1).expand(10, 3, 3) * 10.0        # equal energy, constant along x
    cols = torch.randn(990, 1, 3, generator=g).expand(990, 3, 3) * 0.1                  # constant along y
    kernels = torch.cat([rows, cols]) + 0.01 * torch.randn(1000, 3, 3, generator=g)
    score = banding_score(kernels, n_permutations=99)
    assert score.orientation == "horizontal" and score.horizontal > 0.9
    assert 8.0 < score.effective_kernels < 12.0
    assert score.share_h_over_v == pytest.approx(0.01, abs=0.01)
    assert score.mean_v > 0.9 > score.mean_h
