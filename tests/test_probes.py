"""Unit probes: planted units whose colour, orientation and frequency are known by construction."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from netanatomy.anatomy import probes as anatomy_probes
from netanatomy.anatomy.probes import PROBES, ProbeResult, grating_frequencies, probe_layers
from netanatomy.cli.main import run
from netanatomy.core.filters import colourfulness
from netanatomy.core.probes import (
    colour_index,
    colour_selectivity,
    colourfulness_null,
    filter_properties,
    grating_tuning,
    orientation_selectivity,
)
from netanatomy.data.probes import REC601, gratings
from netanatomy.errors import UsageError
from netanatomy.models.layers import discover_layers

SIZE, K = 32, 9


def _coords(k=K):
    c = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return yy, xx


def _gabor(theta_deg, cycles_per_pixel, sigma=2.0):
    """A cosine Gabor whose wave vector points at theta (the gratings' convention: rows down)."""
    yy, xx = _coords()
    t = math.radians(theta_deg)
    along = xx * math.cos(t) - yy * math.sin(t)
    return torch.cos(2 * math.pi * cycles_per_pixel * along) * torch.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))


def _blob(sigma):
    yy, xx = _coords()
    g = torch.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    return g / g.sum()


LUMA = torch.tensor(REC601, dtype=torch.float64)


def _grey(pattern):
    """Weights proportional to the luma weights on every channel: the unit sees luma only."""
    return LUMA[:, None, None] * pattern


PLANTED = {  # unit -> what it is
    0: "gabor 45 deg, 0.25 cycles/pixel (8 per 32 px image), grey",
    1: "gabor 0 deg, 0.125 cycles/pixel (4 per image), grey",
    2: "grey blob: weights = luma weights x a Gaussian",
    3: "colour opponent: (R - G) x a Gaussian",
    4: "centre-surround (difference of Gaussians), grey: isotropic",
}


class Planted(nn.Module):
    """conv1 (9x9, reads the image) -> ReLU -> 1x1 conv2 -> ReLU -> mean -> fc."""

    def __init__(self):
        super().__init__()
        self.netanatomy_input_shape = (3, SIZE, SIZE)
        self.conv1 = nn.Conv2d(3, 5, K, padding=K // 2, bias=False)
        self.conv2 = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4, 2)
        w = torch.stack([
            _grey(_gabor(45, 0.25)), _grey(_gabor(0, 0.125)), _grey(_blob(2.0)) * 10,
            torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)[:, None, None] * _blob(2.0) * 10,
            _grey(_blob(1.0) - _blob(2.5)) * 10,
        ])
        with torch.no_grad():
            self.conv1.weight.copy_(w.float())

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    model = Planted().eval()
    layer_map = discover_layers(model, model.netanatomy_input_shape)
    results = probe_layers(model, layer_map, ["conv1", "conv2"], show_progress=False)
    return model, layer_map, results


# ---------------------------------------------------------------------------------------------
# Core: definitions and nulls


def test_orientation_selectivity_is_the_design_definition():
    theta = np.arange(8) * 22.5
    one = np.zeros(8)
    one[3] = 2.0
    assert orientation_selectivity(one, theta) == pytest.approx(1.0)
    assert orientation_selectivity(np.ones(8), theta) == pytest.approx(0.0, abs=1e-12)
    # 1 + cos(2 theta): |sum (1 + cos 2t) e^{2it}| = 8 / 2, sum = 8
    assert orientation_selectivity(1 + np.cos(np.deg2rad(2 * theta)), theta) == pytest.approx(0.5)
    # rectified: a negative response counts as 0, not as a pull the other way
    assert orientation_selectivity(np.where(np.arange(8) == 0, 1.0, -1.0), theta) == pytest.approx(1.0)
    assert orientation_selectivity(np.zeros(8), theta) == 0.0


def test_colour_index_is_bounded_and_zero_over_zero_is_zero():
    d = colour_index(np.array([[2.0, 0.0, -1.0]]), np.array([[1.0, 0.0, 1.0]]))
    assert d.tolist() == [[pytest.approx(1 / 3), 0.0, -1.0]]


def test_colour_sign_flip_null_is_calibrated_and_finds_a_planted_effect():
    rng = np.random.default_rng(1)
    grey = rng.random((60, 400)) + 0.5
    colour = grey * np.exp(rng.normal(0, 0.2, grey.shape))    # symmetric noise: colour does not matter
    colour[:, :5] = grey[:, :5] * 1.5                          # five units answer colour 1.5x
    found = colour_selectivity(colour, grey, seed=3)
    assert found.categories()["colour"][:5].all()
    assert found.selectivity[:5] == pytest.approx(0.2)
    null_p = found.p[5:]
    assert 0.02 < np.mean(null_p <= 0.05) < 0.09             # ~5 % of true nulls, as a valid test gives
    assert not found.categories()["colour"][5:].any()
    again = colour_selectivity(colour, grey, seed=3)
    assert np.array_equal(again.p, found.p)


def test_colourfulness_null_is_exact_for_gaussian_filters():
    filters = torch.randn(4000, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    c = colourfulness(filters).numpy()
    null = colourfulness_null(3, 25)
    assert sps.kstest(c, null.cdf).pvalue > 0.01
    assert null.mean() == pytest.approx(2 / 3)


def test_filter_properties_classify_planted_grey_and_colourful_filters():
    gen = torch.Generator().manual_seed(0)
    pattern = torch.randn(6, 1, 7, 7, generator=gen)
    grey = pattern.expand(-1, 3, -1, -1) + 0.02 * torch.randn(6, 3, 7, 7, generator=gen)
    opponent = pattern * torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1)
    rand = torch.randn(6, 3, 7, 7, generator=gen)
    props = filter_properties(torch.cat([grey, opponent, rand]))
    cat = props.categories()
    assert cat["grey filter"][:6].all() and not cat["grey filter"][6:].any()
    assert cat["colourful filter"][6:12].all() and not cat["colourful filter"][:6].any()
    assert not (cat["grey filter"] & cat["colourful filter"]).any()
    one_channel = filter_properties(pattern)
    assert one_channel.colourfulness is None and one_channel.categories() == {}
    assert one_channel.frequency.shape == (6,)


def test_grating_tuning_baseline_and_full_grid_check():
    images, info = gratings(16, 8, [1, 2, 4], 4, 1)
    theta = info["orientation_deg"]
    f = info["frequency"]
    drive = np.where(f == 2, np.maximum(np.cos(np.deg2rad(2 * (theta - 45))), 0) ** 4, 0.0)
    responses = np.stack([5.0 + drive, 5.0 + 0 * drive], axis=1)  # unit 1 only rests
    raw = grating_tuning(responses, info)
    based = grating_tuning(responses, info, baseline=np.array([5.0, 5.0]))
    assert raw.osi[0] < 0.1                                   # the resting level dilutes it
    assert based.osi[0] > 0.9 and based.preferred_orientation_deg[0] == 45 and based.preferred_frequency[0] == 2
    assert based.osi[1] == 0.0 and based.osi_p[1] == 1.0
    with pytest.raises(UsageError):
        grating_tuning(responses[:-1], {k: v[:-1] for k, v in info.items()})


def test_osi_null_is_calibrated_and_a_lone_oriented_unit_among_many_is_called():
    _, info = gratings(16, 8, [1, 2, 4], 4, 1)
    rng = np.random.default_rng(2)
    responses = rng.random((info["phase"].size, 300))            # orientation does not matter
    theta = info["orientation_deg"]
    responses[:, 0] = 1 + np.cos(np.deg2rad(2 * (theta - 90))) + 0.05 * rng.random(theta.size)
    found = grating_tuning(responses, info, seed=4)
    assert 0.02 < np.mean(found.osi_p[1:] <= 0.05) < 0.09
    # 999 draws alone give p >= 0.001, and BH over 300 units needs 0.05 / 300: it gets more draws
    assert found.osi_p[0] < 0.05 / 300 and found.categories()["oriented"][0]
    assert found.categories()["oriented"].sum() == 1
    assert found.preferred_orientation_deg[0] == 90


def test_a_statistic_no_shuffle_can_change_gets_p_1():
    _, info = gratings(16, 8, [1, 2], 4, 1)
    one = np.zeros((info["phase"].size, 1))
    one[7] = 3.0                                                  # one (orientation, phase) slot only
    found = grating_tuning(one, info)
    assert found.osi[0] == pytest.approx(1.0) and found.osi_p[0] == 1.0  # every shuffle gives OSI 1 too


# ---------------------------------------------------------------------------------------------
# probe_layers on planted units


def test_planted_gabors_are_found_at_their_orientation_and_frequency(planted):
    _, _, results = planted
    v, cat = results["conv1"].values, results["conv1"].categories
    assert v["preferred_orientation_deg"][0] == 45 and v["preferred_frequency"][0] == 8
    assert v["preferred_orientation_deg"][1] == 0 and v["preferred_frequency"][1] == 4
    assert v["osi"][0] > 0.5 and v["osi"][1] > 0.5
    assert cat["oriented"][[0, 1]].all()
    assert cat["high frequency"][0] and not cat["low frequency"][0]       # 8 of 1, 2, 4, 8 cycles
    assert cat["high frequency"][1]                                       # 4 > sqrt(8)


def test_isotropic_unit_is_not_oriented(planted):
    _, _, results = planted
    r = results["conv1"]
    assert r.values["osi"][4] < 0.2 and not r.categories["oriented"][4]
    assert not r.categories["oriented"][2]                                 # the blob either


def test_grey_unit_has_no_colour_selectivity_and_opponent_unit_has(planted):
    _, _, results = planted
    r = results["conv1"]
    assert abs(r.values["colour_selectivity"][2]) < 1e-3
    assert not r.categories["colour"][2] and not r.categories["prefers grey"][2]
    # grey(x) gives R = G, so r(grey x) = 0 and each image's index is 1 (it answers) or 0 (it does not)
    assert r.values["colour_selectivity"][3] > 0.1 and r.categories["colour"][3]
    assert not r.categories["colour"][[0, 1, 4]].any()                    # luma-only Gabors and DoG


def test_filter_probe_on_the_first_layer_only(planted):
    _, _, results = planted
    first, second = results["conv1"], results["conv2"]
    assert first.categories["grey filter"][[0, 1, 2, 4]].all()            # luma-weighted: greyer than chance
    assert first.categories["colourful filter"][3] and not first.categories["grey filter"][3]
    assert first.values["filter_frequency"][0] > first.values["filter_frequency"][2]
    assert "filter" not in second.probes and "filter_colourfulness" not in second.values
    assert any("does not read the input image" in n for n in second.notes)


def test_one_capture_pass_per_stimulus_set(monkeypatch):
    calls = []
    real = anatomy_probes.capture_activations

    def counting(model, layers, data, **kw):
        calls.append([layer.name for layer in layers])
        return real(model, layers, data, **kw)

    monkeypatch.setattr(anatomy_probes, "capture_activations", counting)
    model = Planted().eval()
    layer_map = discover_layers(model, model.netanatomy_input_shape)
    data = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    probe_layers(model, layer_map, ["conv1", "conv2", "conv1"], data=data, show_progress=False)
    assert calls == [["conv1", "conv2"], ["conv1", "conv2"]]


def test_any_submodule_and_one_channel_models():
    class Grey(nn.Module):
        def __init__(self):
            super().__init__()
            self.netanatomy_input_shape = (1, 16, 16)
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(x)).mean((2, 3))

    model = Grey().eval()
    layer_map = discover_layers(model, model.netanatomy_input_shape)
    results = probe_layers(model, layer_map, ["act", "conv"], show_progress=False)
    act, conv = results["act"], results["conv"]
    assert act.probes == ("orientation",) and conv.probes == ("orientation", "filter")
    assert any(n.startswith("colour: not applicable") for n in act.notes)
    assert "filter_frequency" in conv.values and "filter_colourfulness" not in conv.values
    doc = json.loads(json.dumps(conv.to_json()))
    assert set(doc) >= {"layer", "units", "rules", "categories", "units_table"}
    with pytest.raises(UsageError, match="unknown probe"):
        probe_layers(model, layer_map, ["conv"], ["orientatoin"], show_progress=False)


def test_grating_frequencies_reach_first_layer_scales():
    assert grating_frequencies(224) == [1, 2, 4, 8, 16, 32, 64]
    assert grating_frequencies(32) == [1, 2, 4, 8] and grating_frequencies(28)[-1] == 8


# ---------------------------------------------------------------------------------------------
# CLI


def test_probe_cli_json_on_a_one_channel_zoo_model(tmp_path, capsys):
    out = tmp_path / "probe.json"
    code = run(["probe", "zoo:minception-fmnist", "--layer", "conv1", "--layer", "mixed1", "--json",
                "--out", str(out)])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == doc
    conv1, mixed1 = doc["layers"]["conv1"], doc["layers"]["mixed1"]
    for layer in (conv1, mixed1):
        assert set(layer) >= {"layer", "units", "rules", "categories", "units_table", "notes", "stage"}
        assert len(layer["units_table"]) == layer["units"]
        assert layer["stage"] == "post"
        assert any(n.startswith("colour: not applicable") for n in layer["notes"])
    assert conv1["units"] == 16 and mixed1["units"] == 56
    row = conv1["units_table"][0]
    assert {"unit", "osi", "osi_p", "preferred_orientation_deg", "preferred_frequency", "filter_frequency",
            "categories"} <= set(row)
    assert set(conv1["categories"]) == {"oriented", "low frequency", "high frequency"}


COLOUR_MODEL = ["zoo:alexnet", "--model-arg", "small=True", "--model-arg", "width=0.25"]


def test_probe_cli_text_on_a_colour_model(capsys):
    code = run(["probe", *COLOUR_MODEL, "--layer", "conv1", "--layer", "fc7", "--data", "photos?n=12"])
    assert code == 0
    text = capsys.readouterr().out
    assert "conv1: 16 units" in text and "colourful filter" in text and "rules:" in text
    assert "top by OSI" in text                                          # fc7 has 128 units: compact
    assert "12 images of photos?n=12" in text


@pytest.mark.parametrize("args, message", [
    (["zoo:minception-fmnist", "--layer", "conv7"], "no layer named"),
    (["zoo:minception-fmnist", "--layer", "conv1", "--probe", "color"], "unknown probe"),
    (["zoo:minception-fmnist", "--layer", "conv1", "--probe", "colour"], "1-channel"),
    (["zoo:minception-fmnist", "--layer", "conv1", "--data", "bundled"], "--data feeds only the colour probe"),
    (["zoo:minception-fmnist", "--layer", "mixed1_1x1", "--probe", "filter"], "does not read the input image"),
    ([*COLOUR_MODEL, "--layer", "conv1", "--data", "bundled"], "bundled"),
    ([*COLOUR_MODEL, "--layer", "conv1", "--probe", "orientation", "--data", "photos"], "--data feeds only"),
    (["zoo:minception-fmnist", "--layer", "conv1", "--out", "/proc/no/probe.json"], "out"),
])
def test_probe_cli_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path):
    assert run(["probe", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err


def test_probes_tuple_and_result_shape():
    assert PROBES == ("colour", "orientation", "filter")
    r = ProbeResult("l", 2, {"osi": np.array([0.5, np.nan])}, {"oriented": np.array([True, False])},
                    {"oriented": "rule"})
    doc = r.to_json()
    assert doc["categories"] == {"oriented": [0]} and doc["units_table"][1]["osi"] is None
    assert doc["units_table"][0]["categories"] == ["oriented"]


def test_colour_index_ignores_rounding_noise_of_a_grey_blind_unit():
    """A unit blind to grey answers grey images with float32 noise around 0; that noise must not
    turn the images it ignores into +-1 votes (0/0 is 0)."""
    from netanatomy.core.probes import colour_index

    colour = np.array([[2.0], [0.0], [0.0], [1.5]])
    grey = np.array([[3e-8], [2e-8], [0.0], [-1e-8]])
    idx = colour_index(colour, grey)[:, 0]
    assert idx.tolist() == [1.0, 0.0, 0.0, 1.0]
