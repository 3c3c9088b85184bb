"""Rotation families: Gabor filters at 8 orientations, exact quarter turns, mapped channels."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from netanatomy.core.equivariance import (
    quarter_turn_map,
    quarter_turn_scores,
    rotate_filters,
    rotation_families,
    rotation_families_quarter,
)


def gabor(theta_deg: float, freq: float = 0.2, k: int = 11, sigma: float = 2.5, phase: float = 0.0) -> torch.Tensor:
    """A Gabor whose stripes run at theta_deg, counter-clockwise as displayed (row 0 on top)."""
    c = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    t = math.radians(theta_deg)
    u = x * math.cos(t) - y * math.sin(t)
    return torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2)) * torch.cos(2 * math.pi * freq * u + phase)


def first_layer(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tint = torch.tensor([1.0, 0.6, -0.3], dtype=torch.float64)[:, None, None]
    family = [gabor(22.5 * i) * tint for i in range(8)]                           # the planted family
    other = [gabor(45.0 * i + 10, freq=0.38, sigma=1.6).expand(3, 11, 11) for i in range(4)]
    noise = [torch.randn(3, 11, 11, generator=g, dtype=torch.float64) for _ in range(6)]
    units = family + other + noise
    order = torch.randperm(len(units), generator=g)
    return torch.stack([units[i] for i in order]), order


def test_rotation_by_quarter_turns_equals_rot90():
    w = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    rotated = rotate_filters(w, [90.0, 180.0, 270.0])
    for i, k in enumerate((1, 2, 3)):
        assert torch.allclose(rotated[:, i], torch.rot90(w, k, dims=(2, 3)), atol=1e-12)
    # a Gabor at 0 degrees rotated by 30 looks like the Gabor at 30 (inside the disc)
    g0, g30 = gabor(0.0)[None, None], gabor(30.0)[None, None]
    r = rotate_filters(g0, [30.0])[0, 0, 0]
    mask = torch.linspace(-1, 1, 11)[:, None] ** 2 + torch.linspace(-1, 1, 11)[None, :] ** 2 <= 1
    a, b = r[mask], g30[0, 0][mask]
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.97


def test_gabors_at_eight_orientations_form_one_family_22_5_degrees_apart():
    filters, order = first_layer()
    families = rotation_families(filters)
    planted = {int(j) for j in np.flatnonzero(order.numpy() < 8)}
    family = next(f for f in families if set(f.units) & planted)
    assert set(family.units) == planted
    angles = np.sort(np.asarray(family.angles) % 180.0)
    assert len(angles) == 8
    gaps = np.diff(np.r_[angles, angles[0] + 180.0])
    assert np.allclose(gaps, 22.5, atol=1.5)
    assert family.period == 180.0                                        # an even Gabor repeats after half a turn
    assert min(family.scores) > 0.9
    # the angles say which unit is which orientation
    ref_orientation = 22.5 * int(order[family.reference])
    for unit, angle in zip(family.units, family.angles):
        truth = (22.5 * int(order[unit]) - ref_orientation) % 180.0
        assert min(abs(angle - truth), 180 - abs(angle - truth)) < 1.5
    # the second family (4 orientations at another frequency) is separate; noise joins nothing
    noise = {int(j) for j in np.flatnonzero(order.numpy() >= 12)}
    assert all(not (set(f.units) & noise) for f in families)
    second = [f for f in families if set(f.units) <= {int(j) for j in np.flatnonzero((order.numpy() >= 8) & (order.numpy() < 12))}]
    assert len(second) == 1 and len(second[0].units) == 4


def test_odd_gabors_have_period_360():
    filters = torch.stack([gabor(45.0 * i, phase=math.pi / 2) for i in range(8)])[:, None]
    (family,) = rotation_families(filters)
    assert family.period == 360.0 and len(family.units) == 8
    assert np.allclose(np.diff(np.sort(family.angles)), 45.0, atol=1.5)


def _edge(k: int = 5) -> torch.Tensor:
    e = torch.zeros(k, k, dtype=torch.float64)
    e[:, : k // 2] = -1.0
    e[:, k // 2 + 1:] = 1.0
    e[0, 0] = 0.5                                                        # break the mirror symmetry
    return e


def test_quarter_turn_families_with_mapped_input_channels():
    """Layer 1: an edge at 4 quarter turns and a blob; layer 2: two units that are quarter turns."""
    edge = _edge()
    blob = torch.ones(5, 5, dtype=torch.float64)
    layer1 = torch.stack([torch.rot90(edge, r).expand(3, 5, 5) for r in range(4)] + [blob.expand(3, 5, 5)])
    imap = quarter_turn_map(layer1)
    assert imap.shape == (4, 5)
    assert imap[1].tolist() == [1, 2, 3, 0, 4]                           # edge r -> edge r+1, blob -> blob
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)        # a unit over the 5 channels
    turned = torch.zeros_like(base)
    for c in range(5):
        turned[int(imap[1, c])] = torch.rot90(base[c], 1)
    other = torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64)
    layer2 = torch.cat([base[None], other[:1], turned[None], other[1:]])
    scores = quarter_turn_scores(layer2, imap)
    assert float(scores[0, 2, 1]) == pytest.approx(1.0)
    families = rotation_families_quarter(layer2, imap)
    assert len(families) == 1
    (fam,) = families
    assert set(fam.units) == {0, 2}
    angle_of = dict(zip(fam.units, fam.angles))
    assert (angle_of[2] - angle_of[0]) % 360 in (90.0, 270.0)
    # without the channel map the copies are not found
    assert rotation_families_quarter(layer2) == []
    # a 90-degree map alone is composed into 180 and 270
    assert torch.equal(quarter_turn_scores(layer2, imap[1]), scores)


def test_bad_shapes():
    with pytest.raises(ValueError):
        rotate_filters(torch.randn(2, 3, 5, 7), [10.0])
    with pytest.raises(ValueError):
        quarter_turn_scores(torch.randn(2, 3, 3, 3), torch.zeros(5, dtype=torch.int64))


def test_model_level_families_map_channels_from_the_first_layer_up():
    from torch import nn

    from netanatomy.anatomy import layer_rotation_families
    from netanatomy.models.layers import discover_layers

    edge = _edge()
    layer1 = torch.stack([torch.rot90(edge, r).expand(3, 5, 5) for r in range(4)]
                         + [torch.ones(5, 5, dtype=torch.float64).expand(3, 5, 5)])
    imap = quarter_turn_map(layer1)
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    turned = torch.zeros_like(base)
    for c in range(5):
        turned[int(imap[1, c])] = torch.rot90(base[c], 1)
    layer2 = torch.stack([base, torch.randn(5, 3, 3, generator=g, dtype=torch.float64), turned])

    net = nn.Sequential(nn.Conv2d(3, 5, 5, padding=2), nn.ReLU(), nn.Conv2d(5, 3, 3, padding=1))
    with torch.no_grad():
        net[0].weight.copy_(layer1)
        net[2].weight.copy_(layer2)
    net.netanatomy_input_shape = (3, 12, 12)
    layers = discover_layers(net)
    first, second = [name for name, layer in layers.items() if layer.kind == "conv"]
    res = layer_rotation_families(net, layers, second)
    assert res["mode"] == "quarter turns" and "mapped" in res["note"]
    assert res["input_map_90"] == imap[1].tolist()
    assert [sorted(f["units"]) for f in res["families"]] == [[0, 2]]
    top = layer_rotation_families(net, layers, first)
    assert top["mode"] == "any angle"
    fam = top["families"][0]
    assert sorted(fam["units"]) == [0, 1, 2, 3] and sorted(round(a) % 360 for a in fam["angles"]) == [0, 90, 180, 270]
