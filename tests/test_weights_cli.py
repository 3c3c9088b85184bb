"""CLI commands of weight anatomy on a small planted model: one JSON document, files, exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from netanatomy.cli.main import run

MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    netanatomy_input_shape = (3, 12, 12)

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16 * 6 * 6, 10)
        with torch.no_grad():
            rows = torch.randn(16, 8, 3, 1, generator=g)               # horizontal bands in conv2
            self.conv2.weight.copy_(rows.expand(16, 8, 3, 3) + 0.1 * torch.randn(16, 8, 3, 3, generator=g))

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = nn.functional.max_pool2d(self.mix(x), 2)
        return self.fc(x.flatten(1))


def build():
    return Net()
'''


@pytest.fixture(scope="module")
def model_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "planted.py"
    path.write_text(MODEL)
    return f"{path}:build"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _json(capsys, argv: list[str]) -> dict:
    code = run(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)                                              # exactly one document


def test_banding_json(model_spec, capsys):
    doc = _json(capsys, ["banding", model_spec, "--json", "--permutations", "199"])
    by_layer = {r["layer"]: r for r in doc["layers"]}
    for r in doc["layers"]:
        assert {"layer", "horizontal", "vertical", "index", "orientation", "p_value"} <= set(r)
        assert r["orientation"] in ("horizontal", "vertical", "none")
    assert by_layer["conv2"]["orientation"] == "horizontal" and by_layer["conv2"]["p_value"] == pytest.approx(0.005)
    assert "1x1" in by_layer["mix"]["skipped"]
    assert by_layer["fc"]["kernel"] == [6, 6] and "reshaped" in by_layer["fc"]["note"]
    again = _json(capsys, ["banding", model_spec, "--json", "--permutations", "199", "--layer", "conv2"])
    assert [r["layer"] for r in again["layers"]] == ["conv2"]
    assert again["layers"][0]["p_value"] == by_layer["conv2"]["p_value"]


def test_weights_writes_grid_and_factors(model_spec, capsys, tmp_path: Path):
    doc = _json(capsys, ["weights", model_spec, "--layer", "conv2", "--out", str(tmp_path), "--json"])
    from PIL import Image

    with Image.open(doc["grid"]) as grid:                                 # a picture of the 16 units' 3x3 kernels
        assert grid.mode == "RGB" and grid.size[0] >= 3 * 4 and grid.size[1] >= 3 * 4
    factors = json.loads(Path(doc["factors"]).read_text())
    assert len(factors["factors"]) == 3 and len(factors["factors"][0]["positive"]) == 8
    assert len(factors["units"]) == 16 and sorted(factors["grid_order"]) == list(range(16))
    per_unit = _json(capsys, ["weights", model_spec, "--layer", "fc", "--out", str(tmp_path), "--mode", "per-unit",
                              "--json"])
    assert per_unit["kernel"] == [6, 6] and per_unit["mode"] == "per_unit"


def test_svd_of_the_second_layer_reads_the_first(model_spec, capsys, tmp_path: Path):
    doc = _json(capsys, ["svd", model_spec, "--layer", "conv2", "--json", "--out", str(tmp_path)])
    assert doc["upper"] == "conv2" and doc["lower"] == "conv1"
    # against NumPy's SVD of M = sum over kh, kw of |W| of the model's conv2, computed here
    namespace: dict = {}
    exec(MODEL, namespace)
    m = namespace["build"]().conv2.weight.detach().double().abs().sum(dim=(2, 3)).numpy()
    s = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(doc["singular_values"], s, rtol=1e-5)
    np.testing.assert_allclose(doc["shares"], s ** 2 / (s ** 2).sum(), rtol=1e-5)
    assert set(doc["correlations"]["vector_0"]) == {"colourfulness", "frequency"}
    assert Path(doc["figure"]).exists()


def test_equivariance_and_expanded(model_spec, capsys, tmp_path: Path):
    doc = _json(capsys, ["equivariance", model_spec, "--layer", "conv1", "--json"])
    assert doc["mode"] == "any angle" and doc["families"] == []          # random filters: no rotated copies
    deep = _json(capsys, ["equivariance", model_spec, "--layer", "conv2", "--json"])
    assert deep["mode"] == "quarter turns" and len(deep["input_map_90"]) == 8
    exp = _json(capsys, ["expanded", model_spec, "--lower", "conv1", "--upper", "mix", "--json", "--top", "4",
                         "--out", str(tmp_path)])
    assert exp["shape"] == [16, 8, 3, 3] and len(exp["top"]) == 4 and "relu" in exp["replaced"]
    assert Path(exp["tensor"]).exists()


def test_bad_input_is_exit_2_with_one_line(model_spec, capsys, tmp_path: Path):
    assert run(["banding", model_spec, "--layer", "conv3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and len(err.strip().splitlines()) == 1
    assert run(["svd", model_spec, "--layer", "conv1"]) == 2               # reads the input: no lower layer
    capsys.readouterr()
    assert run(["expanded", model_spec, "--lower", "mix", "--upper", "conv1"]) == 2
    capsys.readouterr()


def test_linear_on_a_map_and_batchnorm_folding():
    from torch import nn

    from netanatomy.anatomy import fold_batchnorm, layer_weights, linear_as_map
    from netanatomy.models.layers import discover_layers

    x = torch.randn(2, 4, 3, 5)
    lin = nn.Linear(60, 7)
    mapped = linear_as_map(lin.weight.detach(), (4, 3, 5))
    # the reshaped weights act on the map exactly as the linear layer acts on its flattening
    direct = lin(x.flatten(1)) - lin.bias
    assert torch.allclose(torch.einsum("nchw,uchw->nu", x, mapped), direct, atol=1e-5)

    conv, bn = nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.normal_()
        bn.weight.uniform_(0.5, 1.5)
    bn.eval()
    folded = nn.Conv2d(3, 6, 3, bias=False)
    with torch.no_grad():
        folded.weight.copy_(fold_batchnorm(conv.weight.detach(), bn))
    img = torch.randn(1, 3, 8, 8)
    shift = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(bn(conv(img)), folded(img) + shift[None, :, None, None], atol=1e-5)

    seq = nn.Sequential(conv, bn, nn.ReLU())
    seq.netanatomy_input_shape = (3, 8, 8)
    layers = discover_layers(seq)
    got = layer_weights(seq, layers, next(iter(layers)), fold_bn=True)
    assert torch.allclose(got.weights, folded.weight.detach()) and "folded" in got.note


def test_weights_writes_a_labelled_figure_with_a_colour_key(tmp_path, capsys):
    import json

    from PIL import Image

    from netanatomy.cli.main import run

    assert run(["weights", "zoo:minception-fmnist", "--layer", "mixed1_3x3", "--out", str(tmp_path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    with Image.open(r["figure"]) as im:
        w, h = im.size
    # 24 units in 16 columns: two rows of tiles plus the title and the key, wider than the raw grid
    with Image.open(r["grid"]) as grid:
        assert w > grid.size[0] // 2 and h > 200
