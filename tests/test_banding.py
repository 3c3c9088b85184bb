"""Weight banding score: planted stripes, rotations, noise, skips, and the permutation null."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from netanatomy.core.banding import anova_ss, banding_score, expected_shares, orientation


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small tensor ops: on a shared 2-core machine a second thread only adds wake-up waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def striped(units: int = 24, channels: int = 12, k: int = 3, noise: float = 0.3, seed: int = 0) -> torch.Tensor:
    """Kernels constant along x and varying along y (horizontal bands), plus noise."""
    g = _gen(seed)
    rows = torch.randn(units, channels, k, 1, generator=g).expand(units, channels, k, k)
    return rows + noise * torch.randn(units, channels, k, k, generator=g)


def test_horizontal_stripes_are_horizontal_with_small_p():
    res = banding_score(striped())
    assert res.orientation == "horizontal"
    assert res.p_value == pytest.approx(1 / 1000)          # the smallest p 999 permutations can give
    assert res.resolution == pytest.approx(1 / 1000)
    assert res.horizontal > 0.8 and res.vertical < res.expected_v
    assert res.index == pytest.approx(res.horizontal - res.vertical)
    assert res.z_horizontal > 20


def test_rotated_stripes_are_vertical():
    w = striped()
    res = banding_score(torch.rot90(w, 1, dims=(2, 3)))
    ref = banding_score(w)
    assert res.orientation == "vertical"
    assert res.p_value <= 0.01
    assert res.vertical == pytest.approx(ref.horizontal)
    assert res.horizontal == pytest.approx(ref.vertical)


def test_iid_kernels_are_none_near_chance():
    w = torch.randn(64, 32, 3, 3, generator=_gen(1))
    res = banding_score(w)
    eh, ev = expected_shares(3, 3)
    assert res.orientation == "none"
    assert res.expected_h == pytest.approx(0.25) and res.expected_v == pytest.approx(0.25)
    assert abs(res.horizontal - eh) < 0.01 and abs(res.vertical - ev) < 0.01
    assert res.p_value > 0.01


def test_non_square_chance_values():
    w = torch.randn(32, 16, 3, 5, generator=_gen(2))
    res = banding_score(w)
    assert res.expected_h == pytest.approx(2 / 14) and res.expected_v == pytest.approx(4 / 14)
    assert abs(res.horizontal - 2 / 14) < 0.02 and abs(res.vertical - 4 / 14) < 0.02
    assert res.orientation == "none"


def test_one_by_one_layer_is_skipped_with_a_reason():
    res = banding_score(torch.randn(16, 8, 1, 1))
    assert res.skipped is not None and "1x1" in res.skipped
    assert res.horizontal is None and res.p_value is None and res.orientation == "none"
    line = banding_score(torch.randn(16, 8, 1, 7))
    assert line.skipped is not None and "single row" in line.skipped


def test_anova_decomposition_matches_a_direct_loop():
    w = torch.randn(5, 4, 3, 4, generator=_gen(3), dtype=torch.float64)
    row, col, total = anova_ss(w)
    i = 0
    for o in range(5):
        for c in range(4):
            k = w[o, c].numpy()
            m = k.mean()
            assert row[i] == pytest.approx(4 * ((k.mean(axis=1) - m) ** 2).sum())
            assert col[i] == pytest.approx(3 * ((k.mean(axis=0) - m) ** 2).sum())
            assert total[i] == pytest.approx(((k - m) ** 2).sum())
            i += 1
    res = banding_score(w)
    assert res.horizontal == pytest.approx(float(row.sum() / total.sum()))
    assert res.vertical == pytest.approx(float(col.sum() / total.sum()))


def test_permutation_null_agrees_with_brute_force_shuffles():
    """Weak banding: our p-value and z agree with independent per-kernel shuffles done naively."""
    g = _gen(4)
    x = torch.randn(40, 3, 3, generator=g, dtype=torch.float64) + 0.5 * torch.linspace(-1, 1, 3, dtype=torch.float64)[:, None]
    res = banding_score(x, n_permutations=1999)
    flat = x.reshape(40, 9).numpy()
    rng = np.random.default_rng(1)
    null = []
    for _ in range(1999):
        perm = np.argsort(rng.random((40, 9)), axis=1)
        y = np.take_along_axis(flat, perm, axis=1).reshape(40, 3, 3)
        y = y - y.mean(axis=(1, 2), keepdims=True)
        null.append(3 * (y.mean(axis=2) ** 2).sum() / (y ** 2).sum())
    null = np.asarray(null)
    p_brute = ((null >= res.horizontal).sum() + 1) / (len(null) + 1)
    assert abs(res.p_horizontal - p_brute) < 0.02
    assert np.mean(null) == pytest.approx(0.25, abs=0.01)                 # E[H] under the null
    assert res.z_horizontal == pytest.approx((res.horizontal - 0.25) / null.std(), rel=0.15)


def test_same_seed_same_numbers_and_normal_method():
    w = striped(noise=3.0, seed=5)
    a, b = banding_score(w, seed=7), banding_score(w, seed=7)
    assert a == b
    normal = banding_score(w, method="normal")
    assert normal.n_permutations == 0 and normal.resolution is None
    assert normal.horizontal == pytest.approx(a.horizontal)
    assert normal.z_horizontal == pytest.approx(a.z_horizontal, rel=0.2)


def test_orientation_rule_needs_significance_and_margin():
    assert orientation(0.5, 0.2, 0.001, 0.9, 3, 3) == "horizontal"
    assert orientation(0.5, 0.2, 0.2, 0.9, 3, 3) == "none"                 # not significant
    assert orientation(0.45, 0.42, 0.001, 0.001, 3, 3) == "none"           # smooth, isotropic
    assert orientation(0.2, 0.5, 0.9, 0.001, 3, 3) == "vertical"


def test_three_dimensional_input_and_bad_shape():
    w = striped()
    assert banding_score(w.reshape(-1, 3, 3)).horizontal == pytest.approx(banding_score(w).horizontal)
    with pytest.raises(ValueError):
        banding_score(torch.randn(3, 3))


def test_p_values_are_calibrated_under_the_null():
    """i.i.d. layers: p is uniform, so about 10% fall at or below 0.1."""
    g = _gen(6)
    ps = []
    for r in range(60):
        res = banding_score(torch.randn(8, 8, 3, 3, generator=g), n_permutations=99, seed=r)
        ps += [res.p_horizontal, res.p_vertical]
    ps = np.asarray(ps)
    assert 0.02 <= (ps <= 0.1).mean() <= 0.22
    assert 0.4 <= ps.mean() <= 0.6


def test_gather_path_gives_the_pairwise_numbers():
    """Kernels above 7x7 gather the permuted kernels (O(positions)); on a size both ways can
    do, they give the same p-values from the same seed, and H, V, z up to float32 rounding."""
    for shape in [(12, 6, 6, 6), (10, 8, 9, 7)]:
        w = torch.randn(*shape, generator=_gen(7))
        w[:4] += torch.linspace(-1, 1, shape[2])[:, None]                 # some horizontal banding
        a = banding_score(w, n_permutations=499, seed=3, _path="pairwise")
        b = banding_score(w, n_permutations=499, seed=3, _path="gather")
        assert (a.p_horizontal, a.p_vertical, a.orientation) == (b.p_horizontal, b.p_vertical, b.orientation)
        assert b.horizontal == pytest.approx(a.horizontal, rel=1e-12)
        assert b.z_horizontal == pytest.approx(a.z_horizontal, rel=1e-5)
        assert b.z_vertical == pytest.approx(a.z_vertical, rel=1e-5)
        na = banding_score(w, method="normal", seed=3, _path="pairwise")
        nb = banding_score(w, method="normal", seed=3, _path="gather")
        assert nb.z_horizontal == pytest.approx(na.z_horizontal, rel=1e-5)


def test_large_kernel_is_fast_and_right():
    """A linear layer reading an unpooled 28x28 map: 29 s and 5.4 GB with pairwise tables,
    a fraction of a second now. Planted stripes are found; the null matches naive shuffles."""
    import time

    g = _gen(8)
    rows = torch.randn(10, 16, 28, 1, generator=g).expand(10, 16, 28, 28)
    w = rows + torch.randn(10, 16, 28, 28, generator=g)
    start = time.perf_counter()
    res = banding_score(w, n_permutations=99)
    assert time.perf_counter() - start < 5.0
    assert res.orientation == "horizontal" and res.p_value == pytest.approx(1 / 100)
    noise = torch.randn(10, 16, 28, 28, generator=g, dtype=torch.float64)
    res = banding_score(noise, n_permutations=199, seed=1)
    flat = noise.reshape(160, 784).numpy()
    rng = np.random.default_rng(2)
    null = []
    for _ in range(199):
        y = rng.permuted(flat, axis=1).reshape(160, 28, 28)
        y = y - y.mean(axis=(1, 2), keepdims=True)
        null.append(28 * (y.mean(axis=2) ** 2).sum() / (y ** 2).sum())
    null = np.asarray(null)
    assert np.mean(null) == pytest.approx(27 / 783, rel=0.01)              # E[H] = (kh-1)/(kh*kw-1)
    assert res.z_horizontal == pytest.approx((res.horizontal - 27 / 783) / null.std(), abs=0.3)
    p_brute = ((null >= res.horizontal).sum() + 1) / 200
    assert abs(res.p_horizontal - p_brute) < 0.12


def test_progress_on_a_large_layer(monkeypatch, capsys):
    import netanatomy.core.banding as banding

    monkeypatch.setenv("NETANATOMY_PROGRESS", "1")
    monkeypatch.setattr(banding, "_PROGRESS_MIN_WORK", 1)
    banding_score(torch.randn(4, 4, 12, 12, generator=_gen(9)), n_permutations=9, show_progress=True)
    err = capsys.readouterr().err
    assert "banding 12x12" in err and "16" in err
    banding_score(torch.randn(4, 4, 12, 12, generator=_gen(9)), n_permutations=9)   # off by default
    assert capsys.readouterr().err == ""
