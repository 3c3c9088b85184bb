"""SVD of |W| and filter properties: a planted colour / grey split is singular vector 0."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from netanatomy.core.filters import colourfulness, spatial_frequency
from netanatomy.core.svd import abs_svd, abs_weight_matrix, correlate_components


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gabor(theta: float, freq: float, k: int = 7, sigma: float = 1.8) -> torch.Tensor:
    c = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    u = x * math.cos(theta) - y * math.sin(theta)
    return torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2)) * torch.cos(2 * math.pi * freq * u)


def planted_pair(n_colour: int = 24, n_grey: int = 40, upper: int = 48, seed: int = 0):
    """A first layer of colour blobs and grey Gabors, and a second layer wired by that split."""
    g = _gen(seed)
    k = 7
    c = torch.arange(k, dtype=torch.float64) - 3
    blob = torch.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / 8)
    colour = []
    for _ in range(n_colour):
        hue = torch.randn(3, generator=g, dtype=torch.float64)
        hue = hue - hue.mean()                                           # opponent colours, off the grey axis
        colour.append(hue[:, None, None] * blob * (0.5 + torch.rand(1, generator=g, dtype=torch.float64)))
    grey = []
    for i in range(n_grey):
        f = gabor(math.pi * i / n_grey, 0.15 + 0.25 * float(torch.rand(1, generator=g)))
        grey.append(f.expand(3, k, k) * (0.5 + torch.rand(1, generator=g, dtype=torch.float64)))
    first = torch.stack(colour + grey)                                   # [64, 3, 7, 7]
    first = first + 0.01 * torch.randn(first.shape, generator=g, dtype=torch.float64)
    second = 0.05 * torch.randn(upper, first.shape[0], 3, 3, generator=g, dtype=torch.float64)
    half = upper // 2                                                    # colour feeds the first half, strongly
    second[:half, :n_colour] += torch.randn(half, n_colour, 3, 3, generator=g, dtype=torch.float64)
    second[half:, n_colour:] += 0.5 * torch.randn(upper - half, n_grey, 3, 3, generator=g, dtype=torch.float64)
    is_colour = np.r_[np.ones(n_colour), np.zeros(n_grey)]
    return first, second, is_colour


def test_colourfulness_definition():
    base = torch.randn(1, 1, 5, 5, generator=_gen(1), dtype=torch.float64)
    grey = base.expand(1, 3, 5, 5)
    single = torch.cat([base, torch.zeros(1, 2, 5, 5, dtype=torch.float64)], dim=1)
    opponent = torch.cat([base, -base, torch.zeros(1, 1, 5, 5, dtype=torch.float64)], dim=1)
    got = colourfulness(torch.cat([grey, single, opponent]))
    assert got.tolist() == pytest.approx([0.0, 2 / 3, 1.0], abs=1e-12)
    assert colourfulness(torch.zeros(1, 3, 3, 3)).item() == 0.0


def test_spatial_frequency_tracks_the_grating():
    filters = torch.stack([gabor(0.3, f, k=15, sigma=3.0) for f in (0.05, 0.15, 0.3)])[:, None]
    freq = spatial_frequency(filters)
    assert freq[0] < freq[1] < freq[2]
    assert float(freq[2]) == pytest.approx(0.3, abs=0.05)
    flat = torch.ones(1, 3, 7, 7)
    assert float(spatial_frequency(flat)) == pytest.approx(0.0, abs=1e-12)
    assert float(spatial_frequency(flat, size=28)) > 0.05               # the window's leakage when padded


def test_singular_vector_zero_separates_colour_from_grey():
    first, second, is_colour = planted_pair()
    res = abs_svd(second)
    colour = colourfulness(first)
    assert np.corrcoef(colour.numpy(), is_colour)[0, 1] > 0.95
    corr = correlate_components(res.lower, {"colourfulness": colour, "frequency": spatial_frequency(first)})
    assert abs(corr["vector_0"]["colourfulness"]["pearson"]) > 0.9
    assert corr["vector_0"]["colourfulness"]["pearson"] > 0                # colour is the strong block here
    assert abs(corr["vector_0"]["colourfulness"]["spearman"]) > 0.5
    assert set(corr) == {"vector_0", "vector_1"}
    # ordering by vector 0 puts the colour units first
    assert set(res.lower_order[:24].tolist()) == set(range(24))


def test_svd_bookkeeping_and_sign_convention():
    _, second, _ = planted_pair(seed=2)
    res = abs_svd(second)
    m = abs_weight_matrix(second)
    assert m.shape == (48, 64)
    recon = res.upper @ torch.diag(res.singular_values) @ res.lower.T
    assert torch.allclose(recon, m, atol=1e-9)
    assert float(res.shares.sum()) == pytest.approx(1.0)
    assert res.shares.tolist() == sorted(res.shares.tolist(), reverse=True)
    assert bool((res.lower[:, 0] >= 0).all()) and bool((res.upper[:, 0] >= 0).all())
    flipped = abs_svd(-second)                                           # |W| ignores signs
    assert torch.allclose(flipped.lower, res.lower) and torch.equal(flipped.lower_order, res.lower_order)
    assert sorted(res.upper_order.tolist()) == list(range(48))
    centred = abs_svd(second, center=True)
    assert centred.centered and not res.centered
    doc = res.to_dict()
    assert doc["share_definition"].startswith("s_i^2") and len(doc["lower_vectors"]) == 2


def test_constant_property_gives_nan():
    _, second, _ = planted_pair(seed=3)
    corr = correlate_components(abs_svd(second).lower, {"flat": np.ones(64)})
    assert math.isnan(corr["vector_0"]["flat"]["pearson"])
    with pytest.raises(ValueError):
        correlate_components(abs_svd(second).lower, {"short": np.ones(3)})
