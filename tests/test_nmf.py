"""NMF weight pictures: batched NMF quality, shared colours, per-unit alignment, visible stripes."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from netanatomy.core.nmf import align_factors, factorize_weights, nmf, sign_split
from netanatomy.core.pictures import loadings_to_rgb, picture_grid, similarity_order, upscale
from netanatomy.util.io import save_png


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small batched matmuls: on a shared 2-core machine a second thread only adds wake-up waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def banded_layer(units: int = 32, channels: int = 24, k: int = 5, seed: int = 0) -> torch.Tensor:
    """Each unit: a few horizontal stripe patterns (constant along x) mixed over input channels."""
    g = _gen(seed)
    patterns = torch.randn(units, 3, k, 1, generator=g).expand(units, 3, k, k)       # per unit, 3 row profiles
    mix = torch.randn(units, channels, 3, generator=g)
    w = torch.einsum("ucp,upyx->ucyx", mix, patterns)
    return w + 0.05 * torch.randn(units, channels, k, k, generator=g)


def test_sign_split_is_lossless():
    w = torch.randn(4, 3, 2, 2, generator=_gen(0))
    x = sign_split(w)
    assert x.shape == (4, 6, 2, 2) and bool((x >= 0).all())
    assert torch.equal(x[:, :3] - x[:, 3:], w)


def test_reconstruction_no_worse_than_sklearn():
    from sklearn.decomposition import NMF

    g = _gen(1)
    w = torch.randn(12, 40, 3, 3, generator=g) + torch.randn(12, 40, 1, 1, generator=g)
    x = sign_split(w).permute(0, 2, 3, 1).reshape(12, 9, 80)
    ours = nmf(x, 3, seed=0)
    ref = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for u in range(12):
            model = NMF(3, init="nndsvda", solver="cd", max_iter=200, tol=1e-4, random_state=0)
            a = model.fit_transform(x[u].numpy())
            ref.append(np.linalg.norm(x[u].numpy() - a @ model.components_) / np.linalg.norm(x[u].numpy()))
    assert float(ours.error.mean()) <= float(np.mean(ref)) * 1.001
    recon = ours.loadings @ ours.factors
    direct = (x - recon).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert torch.allclose(direct, ours.error, atol=1e-5)
    assert bool((ours.loadings >= 0).all()) and bool((ours.factors >= 0).all())
    assert torch.allclose(ours.factors.norm(dim=2), torch.ones(12, 3), atol=1e-5)


def test_nmf_recovers_an_exact_factorization_and_is_deterministic():
    g = _gen(2)
    a = torch.rand(5, 20, 3, generator=g)
    h = torch.rand(5, 3, 30, generator=g)
    x = a @ h
    fit = nmf(x, 3, max_iter=500, tol=0)
    assert float(fit.error.max()) < 1e-2
    again = nmf(x, 3, max_iter=500, tol=0)
    assert torch.equal(fit.loadings, again.loadings) and torch.equal(fit.factors, again.factors)
    with pytest.raises(ValueError):
        nmf(-x, 3)


def test_reported_error_is_the_direct_error_for_good_and_poor_fits():
    """The error comes from the loop's identity where that is exact enough and is recomputed
    directly below 5%: both kinds in one batch must match the direct formula."""
    g = _gen(3)
    exact = torch.rand(3, 20, 2, generator=g) @ torch.rand(3, 2, 30, generator=g)   # rank 2 < k
    noisy = torch.rand(3, 20, 30, generator=g)
    x = torch.cat([exact, noisy])
    fit = nmf(x, 3, max_iter=300, tol=0)
    direct = (x - fit.loadings @ fit.factors).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert float(direct[:3].max()) < 0.05 < float(direct[3:].min())
    assert torch.allclose(fit.error, direct, rtol=1e-3, atol=1e-6)


def test_banded_layer_pictures_show_stripes(tmp_path: Path):
    w = banded_layer()
    fac = factorize_weights(w)
    pics = loadings_to_rgb(fac.loadings)                                # [U, k, k, 3]
    assert pics.shape == (32, 5, 5, 3) and pics.min() >= 0 and pics.max() <= 1
    row_var = pics.mean(axis=2).var(axis=1).sum()                      # variation between rows
    col_var = pics.mean(axis=1).var(axis=1).sum()                      # variation between columns
    assert row_var > 20 * col_var
    order = similarity_order(pics.reshape(32, -1))
    assert sorted(order.tolist()) == list(range(32))
    grid = picture_grid(pics, order=order, scale=8)
    out = save_png(grid, tmp_path / "banded.png")
    from PIL import Image

    back = np.asarray(Image.open(out))                                  # the picture, as written
    assert back.shape == grid.shape and back.dtype == np.uint8
    assert np.abs(back / 255.0 - grid).max() <= 0.5 / 255 + 1e-9


def test_shared_factors_give_consistent_colours():
    """Two unit types on disjoint input channels get different colours; same type, same colour."""
    g = _gen(3)
    units, channels, k = 20, 16, 3
    profile_a = torch.cat([torch.rand(8, generator=g) + 0.5, torch.zeros(8)])
    profile_b = torch.cat([torch.zeros(8), torch.rand(8, generator=g) + 0.5])
    blob = torch.rand(units, 1, k, k, generator=g) + 0.5                 # each unit its own spatial pattern
    w = torch.cat([blob[:10] * profile_a[None, :, None, None], blob[10:] * profile_b[None, :, None, None]])
    w = w + 0.01 * torch.randn(w.shape, generator=g)
    fac = factorize_weights(w)
    colour = fac.loadings.sum(dim=(1, 2)).argmax(dim=1)                 # dominant factor per unit
    assert len(set(colour[:10].tolist())) == 1 and len(set(colour[10:].tolist())) == 1
    assert colour[0] != colour[10]
    assert fac.positive.shape == (3, channels) and fac.negative.shape == (3, channels)
    fa, fb = fac.positive[colour[0]], fac.positive[colour[10]]
    assert float(fa[:8].sum()) > 10 * float(fa[8:].sum())              # A's colour is A's channels
    assert float(fb[8:].sum()) > 10 * float(fb[:8].sum())


def test_per_unit_fits_align_to_shared_order():
    g = _gen(4)
    channels = 18
    truth = torch.zeros(3, 2 * channels)
    for j in range(3):
        truth[j, 6 * j:6 * j + 6] = torch.rand(6, generator=g) + 0.5   # disjoint channel sets
    # every position dominated by one factor (separable data: the factorization is unique)
    pure = torch.stack([torch.randperm(9, generator=g) % 3 for _ in range(16)])
    loads = torch.nn.functional.one_hot(pure, 3).float() * (torch.rand(16, 9, 1, generator=g) + 0.5)
    loads = loads + 0.02 * torch.rand(16, 9, 3, generator=g)
    rows = loads @ truth                                                # [U, positions, 2C]
    w = rows[:, :, :channels] - rows[:, :, channels:]
    w = w.permute(0, 2, 1).reshape(16, channels, 3, 3)
    fac = factorize_weights(w, mode="per_unit")
    assert fac.unit_factors is not None and fac.mode == "per_unit"
    unit = fac.unit_factors / fac.unit_factors.norm(dim=2, keepdim=True)
    shared = fac.factors / fac.factors.norm(dim=1, keepdim=True)
    cos = torch.einsum("ujm,jm->uj", unit, shared)
    assert float(cos.min()) > 0.95
    assert float(fac.error.mean()) < 0.05
    # alignment is a permutation that undoes a shuffle
    shuffled = fac.unit_factors[:, [2, 0, 1]]
    perm = align_factors(shuffled, fac.factors)
    assert torch.equal(perm, torch.tensor([[1, 2, 0]] * 16))


def test_grid_and_upscale_shapes():
    pics = np.random.default_rng(0).random((5, 3, 3, 3))
    assert upscale(pics, 4).shape == (5, 12, 12, 3)
    grid = picture_grid(pics, ncols=5, scale=2, pad=1)
    assert grid.shape == (1 * 7 + 1, 5 * 7 + 1, 3)
