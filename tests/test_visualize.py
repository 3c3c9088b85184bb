"""Feature visualization: planted units render what they were built to detect, reproducibly, batched."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from netanatomy.cli.main import run
from netanatomy.errors import UsageError
from netanatomy.visualize import (
    NO_TRANSFORMS,
    TransformConfig,
    apply_transforms,
    channel,
    custom,
    direction,
    diversity,
    draw_params,
    image_param,
    objective_values,
    parse_objective,
    render,
    unit,
    units,
)
from netanatomy.visualize.objectives import LinearTerm
from netanatomy.visualize.param import COLOR_CORRELATION, spectrum_scale
from netanatomy.visualize.sheet import contact_sheet, to_hwc

# ---------------------------------------------------------------------------------------------
# planted models


class Planted(nn.Module):
    """`colour`: unit 0 = R - G - B, unit 1 = G - R - B (3x3, positive on one channel only).
    `stripes`: relu of a vertical cosine filter (period 4 px) and of its negative, summed by a 1x1:
    its spatial mean is largest for horizontal stripes of period 4."""

    def __init__(self, channels: int = 3, size: int = 32):
        super().__init__()
        self.netanatomy_input_shape = (channels, size, size)
        self.colour = nn.Conv2d(channels, 2, 3, padding=1)
        self.edges = nn.Conv2d(channels, 2, (8, 5), padding=(4, 2), bias=False)
        self.stripes = nn.Conv2d(2, 1, 1, bias=False)
        self.head = nn.Linear(3, 4)
        with torch.no_grad():
            self.colour.bias.zero_()
            self.colour.weight.fill_(-1.0 / 9)
            if channels >= 2:
                self.colour.weight[0, 0] = 1.0 / 9
                self.colour.weight[1, 1] = 1.0 / 9
            wave = torch.cos(2 * math.pi * torch.arange(8) / 4)[:, None].expand(8, 5) / 20
            self.edges.weight.zero_()
            self.edges.weight[0, :] = wave / channels
            self.edges.weight[1, :] = -wave / channels
            self.stripes.weight.fill_(1.0)

    def forward(self, x):
        c = self.colour(x)
        s = self.stripes(torch.relu(self.edges(x)))
        pooled = torch.cat([c.mean((2, 3)), s.mean((2, 3))], 1)
        return self.head(torch.relu(pooled))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from a second thread, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    return Planted().eval()


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _orientation_energy(grey: torch.Tensor, near: float | None = None) -> tuple[float, float, float]:
    """Spectral power of frequencies that vary mostly along y, mostly along x, and in total.

    With `near`, only frequencies within 1/16 of `near` cycles per pixel along that axis and
    within 1/16 of zero along the other count.
    """
    power = torch.fft.fft2(grey - grey.mean()).abs() ** 2
    fy = torch.fft.fftfreq(grey.shape[0]).abs()[:, None].expand_as(power)
    fx = torch.fft.fftfreq(grey.shape[1]).abs()[None, :].expand_as(power)
    if near is None:
        along_y, along_x = fy > fx, fx > fy
    else:
        along_y = ((fy - near).abs() <= 1 / 16) & (fx <= 1 / 16)
        along_x = ((fx - near).abs() <= 1 / 16) & (fy <= 1 / 16)
    return float(power[along_y].sum()), float(power[along_x].sum()), float(power.sum())


# ---------------------------------------------------------------------------------------------
# parameterization and transforms


def test_fourier_param_shapes_range_and_colour_matrix():
    for channels, size in ((3, (32, 32)), (1, (17, 23)), (4, (8, 5))):
        img = image_param([1, 2], channels, size)().detach()
        assert img.shape == (2, channels, *size)
        assert float(img.min()) > 0 and float(img.max()) < 1
        # initial sd 0.01 in Fourier space: a near-grey start
        assert abs(float(img.mean()) - 0.5) < 0.05
    pix = image_param([1], 1, 9, kind="pixel")()
    assert pix.shape == (1, 1, 9, 9)
    norms = COLOR_CORRELATION.norm(dim=0)
    assert float(norms.max()) == pytest.approx(1.0) and bool((norms <= 1 + 1e-6).all())
    scale = spectrum_scale(16, 16)
    # 1/f: the bin at f = 1/16 and the DC bin (floored to 1/16) share the largest factor; f = 1/2 is 8x smaller
    assert float(scale[0, 0]) == pytest.approx(float(scale[0, 1]))
    assert float(scale[0, 1] / scale[8, 0]) == pytest.approx(8.0)
    with pytest.raises(UsageError):
        image_param([1], 3, 8, kind="wavelet")


def test_param_start_depends_only_on_its_seed():
    a = image_param([5, 6, 7], 3, 12)()
    b = image_param([6], 3, 12)()
    assert torch.equal(a[1], b[0])


def test_transforms_identity_shift_and_rotation():
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(apply_transforms(x, draw_params([1, 2], 1, NO_TRANSFORMS)[:, 0], NO_TRANSFORMS), x)
    # a pure 2-pixel shift down and 1 right (via the second jitter), padded with 0.5
    params = torch.tensor([[0.0, 0.0, 1.0, 0.0, -2.0, -1.0]])
    shift_cfg = TransformConfig(jitter=0, jitter2=4, scale=(1.0, 1.0), angle=(0.0, 0.0))
    shifted = apply_transforms(x[:1], params, shift_cfg)
    assert torch.allclose(shifted[0, :, 2:, 1:], x[0, :, :-2, :-1], atol=1e-5)
    assert torch.allclose(shifted[0, :, :2], torch.full_like(shifted[0, :, :2], 0.5), atol=1e-5)
    # a 90 degree rotation of a square image is a quarter turn (some direction), exactly
    rot = apply_transforms(x[:1], torch.tensor([[0.0, 0.0, 1.0, 90.0, 0.0, 0.0]]), shift_cfg)
    turns = [torch.rot90(x[:1], k, dims=(2, 3)) for k in (1, 3)]
    assert min(float((rot - t).abs().max()) for t in turns) < 1e-4


def test_transforms_are_per_image_seeded_and_differentiable():
    cfg = TransformConfig()
    p = draw_params([11, 12], 50, cfg)
    q = draw_params([12], 50, cfg)
    assert torch.equal(p[1], q[0])
    assert float(p[:, :, 2].min()) >= 0.9 and float(p[:, :, 2].max()) <= 1.1
    assert float(p[:, :, 3].abs().max()) <= 10.0
    assert set(torch.unique(p[:, :, 0]).tolist()) <= {-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0}
    x = torch.rand(2, 3, 20, 20, requires_grad=True)
    apply_transforms(x, p[:, 3], cfg).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------
# objectives


def test_objective_algebra_and_names():
    a, b = channel("conv", 1), channel("fc2", 3)
    combo = 2 * a - b / 4 + 0.5 * unit("conv", 2)
    assert [w for w, _ in combo.terms] == [2.0, -0.25, 0.5]
    assert combo.layers == ("conv", "fc2")
    assert (-a).terms[0][0] == -1.0 and (a * 3).terms[0][0] == 3.0
    assert sum([a, b]).layers == ("conv", "fc2")
    o = parse_objective("mixed4a:97")
    assert o.name == "mixed4a:97" and o.terms[0][1].units == (97,) and o.terms[0][1].where == "mean"
    s = parse_objective("conv1:0-3,7")
    term = s.terms[0][1]
    assert isinstance(term, LinearTerm) and term.units == (0, 1, 2, 3, 7)
    assert torch.allclose(term.dense(8), torch.tensor([0.2, 0.2, 0.2, 0.2, 0, 0, 0, 0.2]))
    u = parse_objective("block.conv@1:5@center")
    assert u.terms[0][1].layer == "block.conv@1" and u.terms[0][1].where == "center"
    assert parse_objective("c:5@2,3").terms[0][1].where == (2, 3)
    for bad in ("conv", "conv:x", ":3", "conv:1,2@center", "conv:3@up", "conv:-1"):
        with pytest.raises(UsageError):
            parse_objective(bad)
    with pytest.raises(UsageError):
        units("conv", [])
    with pytest.raises(UsageError):
        channel("conv", 1.5)


def test_objective_values_match_a_direct_computation(planted):
    x = torch.rand(3, 3, 32, 32)
    objs = [channel("colour", 0), unit("colour", 1), direction("colour", [0.5, -2.0]) + channel("stripes", 0)]
    got = objective_values(planted, objs, x)
    with torch.no_grad():
        c = planted.colour(x)
        s = planted.stripes(torch.relu(planted.edges(x)))
    want = [c[0, 0].mean(), c[1, 1, 16, 16], (0.5 * c[2, 0] - 2.0 * c[2, 1]).mean() + s[2, 0].mean()]
    assert np.allclose(got, [float(w) for w in want], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# rendering planted units


def test_red_unit_renders_red(planted):
    result = render(planted, [channel("colour", 0), channel("colour", 1)], steps=160, seed=0)
    red, green = result.images[0], result.images[1]
    r, g, b = red.mean((1, 2)).tolist()
    assert r > g + 0.3 and r > b + 0.3, (r, g, b)
    r2, g2, b2 = green.mean((1, 2)).tolist()
    assert g2 > r2 + 0.1 and g2 > b2 + 0.1, (r2, g2, b2)
    # from the grey start (R - G - B = -0.5) to a positive value: red beats green and blue together
    assert result.history[:4, 0].mean() < -0.4
    assert result.values[0] > 0.05 and result.history[-8:, 0].mean() > 0.0


def test_stripe_unit_renders_horizontal_stripes(planted):
    result = render(planted, channel("stripes", 0), steps=160, seed=1)
    grey = result.images[0].mean(0)
    along_y, along_x, _ = _orientation_energy(grey)
    assert along_y > 2 * along_x, (along_y, along_x)
    # at the filter's frequency (1/4 cycle per pixel): stripes across y, hardly any across x
    band_y, band_x, total = _orientation_energy(grey, near=0.25)
    assert band_y > 5 * band_x and band_y > 0.15 * total, (band_y, band_x, total)
    # horizontal stripes: rows differ from each other more than columns do
    assert float(grey.mean(1).var()) > 2 * float(grey.mean(0).var())


def test_same_seed_same_images_and_batched_equals_single(planted):
    objs = [channel("colour", 0), channel("stripes", 0), unit("colour", 1)]
    first = render(planted, objs, steps=24, seed=3)
    again = render(planted, objs, steps=24, seed=3)
    assert torch.equal(first.images, again.images)
    other = render(planted, objs, steps=24, seed=4)
    assert not torch.allclose(first.images, other.images)
    alone = render(planted, channel("stripes", 0), steps=24, seed=3)
    chunked = render(planted, objs, steps=24, seed=3, batch_size=2)
    assert float((alone.images[0] - first.images[1]).abs().max()) < 1e-3
    assert float((chunked.images - first.images).abs().max()) < 1e-3
    # two copies of one objective start apart
    twins = render(planted, [channel("colour", 0)] * 2, steps=2, seed=3)
    assert not torch.allclose(twins.images[0], twins.images[1])


def test_hooks_flags_and_mode_restored_also_after_errors(planted):
    before = _hooks(planted)
    planted.train()
    planted.head.weight.requires_grad_(True)
    planted.colour.weight.requires_grad_(False)
    for i in range(6):
        render(planted, [channel("colour", i % 2)], steps=2, seed=i)
    assert _hooks(planted) == before == 0
    with pytest.raises(UsageError):  # a direction of the wrong length fails mid-render
        render(planted, [direction("colour", [1.0, 2.0, 3.0])], steps=2)
    with pytest.raises(UsageError):
        render(planted, [channel("colour", 7)], steps=2)

    def explode(values):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        render(planted, [custom("colour", explode)], steps=2)
    assert _hooks(planted) == 0
    assert all(not m._forward_hooks for m in planted.modules())
    assert planted.training
    assert planted.head.weight.requires_grad and not planted.colour.weight.requires_grad
    planted.eval()
    planted.colour.weight.requires_grad_(True)


def test_grey_odd_sizes_linear_and_module_layers():
    torch.manual_seed(0)
    grey = Planted(channels=1, size=21).eval()
    result = render(grey, [channel("stripes", 0), channel("head", 2), channel("edges", 0)], steps=4, size=(19, 26))
    assert result.images.shape == (3, 1, 19, 26)
    assert np.isfinite(result.values).all() and result.history.shape == (4, 3)
    # a submodule that is not a layer of the map is hooked at its output
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    seq.netanatomy_input_shape = (1, 12, 12)
    assert render(seq, [channel("1", 3)], steps=3).images.shape == (1, 1, 12, 12)
    with pytest.raises(UsageError):
        render(seq, [channel("nonexistent", 0)], steps=1)
    with pytest.raises(UsageError):
        render(seq, [unit("2", 0, (50, 50))], steps=1)
    with pytest.raises(UsageError, match="built for"):  # a linear head fixes the input size
        render(grey, [channel("head", 0)], steps=1, channels=3)
    for bad in ({"steps": 0}, {"lr": 0.0}, {"batch_size": 0}, {"stage": "mid"}, {"param": "wavelet"}):
        with pytest.raises(UsageError):
            render(seq, [channel("2", 0)], **bad)


def test_diversity_makes_copies_differ():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    seq.netanatomy_input_shape = (3, 20, 20)

    def gram_similarity(images):
        with torch.no_grad():
            a = seq[0](images).flatten(2)
        g = torch.nn.functional.normalize(torch.bmm(a, a.transpose(1, 2)).flatten(1), dim=1)
        return float((g @ g.t())[0, 1])

    plain = render(seq, [channel("2", 0)] * 2, steps=48, seed=2)
    obj = channel("2", 0) + 10 * diversity("0")
    varied = render(seq, [obj] * 2, steps=48, seed=2)
    (value,) = varied.diversity.values()
    assert value == pytest.approx(-gram_similarity(varied.images), abs=1e-4)
    assert gram_similarity(varied.images) < gram_similarity(plain.images) - 0.05


# ---------------------------------------------------------------------------------------------
# contact sheets and the CLI


def test_contact_sheet_layout():
    imgs = torch.rand(5, 1, 7, 9)
    sheet = contact_sheet(imgs, [f"u{i}" for i in range(5)], ncols=3, cell=40, gap=2, font_size=10)
    assert sheet.dtype == np.uint8 and sheet.shape[2] == 3
    assert sheet.shape[1] == 3 * 42 + 2
    assert to_hwc(torch.rand(4, 6, 6)).shape == (6, 6, 3)
    with pytest.raises(UsageError):
        contact_sheet([], None)


MODEL_FILE = '''
import math, torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.netanatomy_input_shape = (3, 16, 16)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))

def build():
    torch.manual_seed(0)
    return Net()
'''


def test_render_cli(tmp_path, capsys):
    model = tmp_path / "net.py"
    model.write_text(MODEL_FILE)
    out = tmp_path / "out"
    code = run(["render", f"{model}:build", "--layer", "conv2", "--units", "0-2", "--steps", "6", "--batch", "2",
                "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["units"] == [0, 1, 2] and len(summary["values"]) == 3
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "render.json", "unit_0000.png",
                                                    "unit_0001.png", "unit_0002.png"]
    assert json.loads((out / "render.json").read_text())["files"][0] == "unit_0000.png"
    code = run(["render", f"{model}:build", "--objective", "conv2:1", "--objective", "fc:0-1", "--steps", "3",
                "--out", str(tmp_path / "o2")])
    assert code == 0
    assert (tmp_path / "o2" / "001_fc_0-1.png").is_file()
    capsys.readouterr()
    assert run(["render", f"{model}:build", "--layer", "conv9", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert run(["render", f"{model}:build", "--layer", "conv2", "--units", "0-9", "--out", str(tmp_path / "x")]) == 2
    assert run(["render", f"{model}:build", "--out", str(tmp_path / "x")]) == 2


def test_render_leaves_weight_layout_and_values_untouched():
    from torch import nn

    from netanatomy.visualize import channel, render

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    model.netanatomy_input_shape = (3, 16, 16)
    before = [(p.data_ptr(), p.is_contiguous(), p.detach().clone()) for p in model.parameters()]
    render(model, [channel("2", 0)], steps=3, show_progress=False)
    after = list(model.parameters())
    assert [(p.data_ptr(), p.is_contiguous()) for p in after] == [(ptr, c) for ptr, c, _ in before]
    assert all(torch.equal(p, v) for p, (_, _, v) in zip(after, before))


def _simulation():
    """scripts/simulate_tf32.py, whose TF32 rounding of convolutions the test below uses."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "simulate_tf32.py"
    spec = importlib.util.spec_from_file_location("simulate_tf32", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_render_in_tf32_reaches_the_same_objective():
    """What a GPU's default does to a render (cuDNN runs float32 convolutions in TF32): the
    objective values stay within the GPU test's tolerance of the float32 render."""
    from netanatomy.models import load_model

    objs = [channel("mixed2", u) for u in range(8)]
    exact = render(load_model("zoo:minception-fmnist").module, objs, steps=16, seed=0, show_progress=False)
    other = render(load_model("zoo:minception-fmnist").module, objs, steps=16, seed=1, show_progress=False)
    with _simulation().tf32_convolutions():
        rounded = render(load_model("zoo:minception-fmnist").module, objs, steps=16, seed=0, show_progress=False)
    assert not torch.equal(rounded.images, exact.images)   # the rounding took effect
    np.testing.assert_allclose(rounded.values, exact.values, rtol=0.02, atol=0.02)
    # the pictures drift, but stay nearer to the float32 render than another seed's
    assert float((rounded.images - exact.images).abs().mean()) < 0.6 * float((other.images - exact.images).abs().mean())
