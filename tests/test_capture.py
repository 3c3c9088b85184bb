"""Activation capture agrees with a direct computation on all activations held in memory."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from netanatomy.capture import accumulator_bytes, capture_activations, layer_values
from netanatomy.core.streaming import Reservoir, StreamingMoments, reduce_units
from netanatomy.models.layout import channels_last


class Cat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class Branchy(nn.Module):
    """conv -> bn -> relu (in place), two branches joined by a concat, a residual sum, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.a = nn.Conv2d(6, 4, 1)
        self.b = nn.Conv2d(6, 2, 3, padding=1)
        self.join = Cat()
        self.res = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = self.relu(self.bn(self.stem(x)))
        j = self.join([F.relu(self.a(h)), F.relu(self.b(h))])
        r = self.res(j) + j
        return self.fc(torch.relu(r).mean((2, 3)))


def _model():
    torch.manual_seed(0)
    m = Branchy()
    with torch.no_grad():  # non-trivial batch-norm statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
    return m.eval()


def _direct(model, x):
    """All pre-activation maps computed by hand, in the layout capture uses on a CPU
    (channels-last convs round differently from NCHW ones, at the float32 level)."""
    with torch.no_grad(), channels_last(model):
        stem = model.bn(model.stem(x))
        h = F.relu(stem)
        a, b = model.a(h), model.b(h)
        j = torch.cat([F.relu(a), F.relu(b)], 1)
        r = model.res(j) + j
        fc = model.fc(torch.relu(r).mean((2, 3)))
    return {"stem": stem, "a": a, "b": b, "join": torch.cat([a, b], 1), "res": model.res(j), "add": r, "fc": fc,
            "join_post": j, "stem_post": h}


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(300, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (300,), generator=g)
    return x, y


@pytest.mark.parametrize("reduce", ["mean", "l1", "max", "center"])
def test_moments_cov_and_topk_match_direct(data, reduce):
    x, y = data
    model = _model()
    names = ["stem", "a", "join", "add", "fc"]
    stats = capture_activations(model, names, DataLoader(TensorDataset(x, y), batch_size=37), reduce=reduce,
                                top_k=5, topk_by=reduce, input_shape=(3, 8, 8))
    direct = _direct(model, x)
    for name in names:
        full = direct[name]
        values = reduce_units(full, reduce).double().numpy()
        s = stats[name]
        assert s.n == 300
        np.testing.assert_allclose(s.mean, values.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(s.var, values.var(0, ddof=1), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(s.cov, np.cov(values, rowvar=False), rtol=1e-5, atol=1e-8)
        # kept values (all 300 < 5000) and labels in data set order
        np.testing.assert_allclose(s.values, values.astype(np.float32), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(s.value_index, np.arange(300))
        np.testing.assert_array_equal(s.labels, y.numpy())
        # top-5 examples per unit, ties towards the earlier example
        order = np.argsort(-values, axis=0, kind="stable")[:5].T
        np.testing.assert_array_equal(s.topk_index, order)
        np.testing.assert_allclose(s.topk_value, np.take_along_axis(values.T, order, 1), rtol=1e-5, atol=1e-6)


def test_pearson_and_spearman_match_scipy(data):
    x, y = data
    model = _model()
    s = capture_activations(model, ["join"], TensorDataset(x, y), input_shape=(3, 8, 8))["join"]
    values = reduce_units(_direct(model, x)["join"], "mean").double().numpy()
    np.testing.assert_allclose(s.pearson(), np.corrcoef(values, rowvar=False), atol=1e-6)
    np.testing.assert_allclose(s.spearman(), spearmanr(values).statistic, atol=1e-6)


def test_post_activation_and_positions(data):
    x, _ = data
    model = _model()
    s = capture_activations(model, ["join", "stem"], x, stage="post", reduce="max", top_k=3, input_shape=(3, 8, 8),
                            batch_size=64)
    direct = _direct(model, x)
    for name, key in (("join", "join_post"), ("stem", "stem_post")):
        full = direct[key]
        np.testing.assert_allclose(s[name].mean, full.amax((2, 3)).double().mean(0).numpy(), rtol=1e-6)
        # the recorded position holds the map's maximum
        for unit in range(full.shape[1]):
            for rank in range(3):
                ex = s[name].topk_index[unit, rank]
                yy, xx = s[name].topk_pos[unit, rank]
                assert full[ex, unit, yy, xx] == pytest.approx(full[ex, unit].max().item())


def test_layer_values_full_maps_and_hooks_removed(data):
    x, _ = data
    model = _model()
    from netanatomy.models.layers import discover_layers

    lm = discover_layers(model, (3, 8, 8))
    out = layer_values(model, [lm.resolve("join"), lm.resolve("add")], x[:10])
    direct = _direct(model, x[:10])
    torch.testing.assert_close(out["join"], direct["join"])
    torch.testing.assert_close(out["add"], direct["add"])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_on_error(data):
    x, _ = data
    model = _model()

    class Boom:
        def __iter__(self):
            yield x[:4]
            raise RuntimeError("loader failed")

    with pytest.raises(RuntimeError, match="loader failed"):
        capture_activations(model, ["a"], Boom(), input_shape=(3, 8, 8))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_streaming_moments_stable_with_large_offset():
    rng = np.random.default_rng(0)
    rows = rng.normal(1e6, 1.0, size=(5000, 3))
    m = StreamingMoments(3)
    for chunk in np.array_split(rows, 17):
        m.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(m.variance().numpy(), rows.var(0, ddof=1), rtol=1e-8)
    np.testing.assert_allclose(m.covariance().numpy(), np.cov(rows, rowvar=False), rtol=1e-6, atol=1e-6)


def test_reservoir_is_uniform_and_seeded():
    counts = np.zeros(100)
    for seed in range(400):
        r = Reservoir(1, 10, seed=seed)
        for start in range(0, 100, 7):
            idx = np.arange(start, min(start + 7, 100))
            r.update(idx[:, None].astype(np.float32), idx, idx)
        _, index, _ = r.sample()
        counts[index] += 1
    # each of 100 items is kept with probability 1/10: 40 expected per item over 400 runs
    assert counts.sum() == 4000
    assert 20 < counts.min() and counts.max() < 65
    a, b = Reservoir(1, 5, seed=3), Reservoir(1, 5, seed=3)
    for r in (a, b):
        idx = np.arange(50)
        r.update(idx[:, None].astype(np.float32), idx, idx)
    np.testing.assert_array_equal(a.sample()[1], b.sample()[1])


def test_state_size_does_not_grow_with_stream():
    """The accumulators hold the same bytes after 200 rows as after 20 000."""
    from netanatomy.core.streaming import StreamingTopK

    sizes = []
    for n in (200, 20000):
        moments, topk, reservoir = StreamingMoments(6), StreamingTopK(6, 10, 2), Reservoir(6, 100, seed=0)
        g = torch.Generator().manual_seed(0)
        for start in range(0, n, 100):
            rows = torch.randn(100, 6, generator=g)
            idx = torch.arange(start, start + 100)
            moments.update(rows.double())
            topk.update(rows, idx, torch.zeros(100, 6, 2, dtype=torch.long))
            reservoir.update(rows.numpy(), idx.numpy(), idx.numpy())
        sizes.append((moments.nbytes(), topk.nbytes(), reservoir.nbytes()))
    assert sizes[0] == sizes[1]
    # 6 units: moments + 6x6 covariance + 5000-row reservoir, in a few hundred kB
    assert accumulator_bytes(_model(), "join", input_shape=(3, 8, 8)) < 300_000


def test_bad_inputs_are_usage_errors(data):
    from netanatomy.errors import UsageError

    model = _model()
    with pytest.raises(UsageError, match="did you mean"):
        capture_activations(model, ["jion"], data[0], input_shape=(3, 8, 8))
    with pytest.raises(UsageError):
        capture_activations(model, ["a"], data[0], reduce="median", input_shape=(3, 8, 8))


@pytest.mark.slow
def test_memory_bounded_on_long_stream(tmp_path):
    """Peak memory of a 40k-example stream stays within a few MB of a 2k-example one.

    Holding every activation map of that stream would take 40000 x 32 x 32 x 32 x 4 B = 5.2 GB.
    """
    script = textwrap.dedent("""
        import resource, sys, torch
        from torch import nn
        from netanatomy.capture import capture_activations
        torch.set_num_threads(1)
        n = int(sys.argv[1])
        model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU()).eval()
        def stream():
            g = torch.Generator().manual_seed(0)
            for start in range(0, n, 500):
                yield torch.rand(500, 1, 32, 32, generator=g)
        stats = capture_activations(model, ["0"], stream(), input_shape=(1, 32, 32), top_k=10, keep_values=1000)
        assert stats["0"].n == n
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    path = tmp_path / "stream.py"
    path.write_text(script)
    peaks = []
    for n in (2000, 40000):
        out = subprocess.run([sys.executable, str(path), str(n)], capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.strip().splitlines()[-1]))
    growth_mb = (peaks[1] - peaks[0]) / 1024
    assert growth_mb < 50, f"peak RSS grew by {growth_mb:.1f} MB over a 20x longer stream"


def test_channels_last_reaches_activations_after_a_one_channel_conv_and_is_undone():
    """Weights alone would leave every activation NCHW behind a 1-channel first conv; the
    layout hooks make the pooled maps channels-last, and everything is put back afterwards."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.MaxPool2d(2)).eval()
    weights = [p.data for p in model.parameters()]
    seen = []
    model[3].register_forward_pre_hook(lambda m, a: seen.append(
        a[0].is_contiguous(memory_format=torch.channels_last) and not a[0].is_contiguous()))
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        plain = model(x)
        with channels_last(model):
            laid_out = model(x)
        again = model(x)
    assert seen == [False, True, False]
    torch.testing.assert_close(laid_out, plain)
    assert torch.equal(again, plain)
    assert all(p.data_ptr() == w.data_ptr() and p.stride() == w.stride()
               for p, w in zip(model.parameters(), weights))
    assert [len(m._forward_hooks) for m in model.modules()] == [0] * 5
