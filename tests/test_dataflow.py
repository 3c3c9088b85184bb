"""The one data-flow walker: every analysis that follows tensors sees a model the same way."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netanatomy.anatomy.graph import INPUT, feeding_layer
from netanatomy.capture import capture_activations
from netanatomy.cli.main import run
from netanatomy.errors import UsageError
from netanatomy.models.dataflow import DataFlow, Step
from netanatomy.models.layers import discover_layers
from netanatomy.specialization.extract import weight_network


class StaticSameConv(nn.Conv2d):
    """A conv subclass defined outside torch.nn with its own forward: "static same" padding
    fixed at construction for one image size, as the EfficientNet-Lite port does."""

    def __init__(self, cin, cout, k, stride=1, image_size=16):
        super().__init__(cin, cout, k, stride, padding=0)
        ph = max((math.ceil(image_size / stride) - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((ph // 2, ph - ph // 2, ph // 2, ph - ph // 2))

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Normalized(nn.Module):
    """Input normalization written in forward with buffers, a same-padding stem, a named ReLU
    module (`det`), a two-branch concatenation and a residual sum."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.stem = StaticSameConv(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.det = nn.ReLU()
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 6, 3, padding=1)
        self.mix = nn.Conv2d(10, 10, 1)
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = self.det(self.bn(self.stem(x)))
        joined = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], 1)
        x = joined + self.mix(joined)
        return self.head(x.mean((2, 3)))


def test_conv_subclass_with_own_forward_is_a_conv_layer():
    model = Normalized().eval()
    layers = discover_layers(model, (3, 16, 16))
    assert layers.method == "fx"
    stem = layers.resolve("stem")
    assert (stem.kind, stem.units, stem.kernel_size, stem.stride) == ("conv", 8, (3, 3), (2, 2))
    assert stem.out_shape == (8, 8, 8)
    # pre-activation after the batch norm, post after the named ReLU
    assert stem.pre[0].module == "bn" and stem.post[0].module == "det"


def test_every_walker_sees_the_same_wiring():
    model = Normalized().eval()
    layers = discover_layers(model, (3, 16, 16))
    concat = next(layer for layer in layers.values() if layer.kind == "concat")
    assert [b.module for b in concat.branches] == ["left", "right"]
    assert [(b.start, b.stop) for b in concat.branches] == [(0, 4), (4, 10)]
    # wiring of weight analyses: normalization with buffers does not hide the input
    assert feeding_layer(model, layers, "stem") == INPUT
    assert feeding_layer(model, layers, "left") == "stem"
    assert feeding_layer(model, layers, "mix") == concat.name
    # weight graph: the same sources, with the concatenation's channel offsets
    net = weight_network(model, (3, 16, 16)).network
    sources = {e.dst: e.sources for e in net.edges}
    assert sources["stem"] == (("input", 0, 3),)
    assert sources["left"] == (("stem", 0, 8),)
    assert sources["mix"] == (("left", 0, 4), ("right", 4, 10))
    assert set(sources["head"]) == {("left", 0, 4), ("right", 4, 10), ("mix", 0, 10)}


def test_step_kinds():
    model = Normalized().eval()
    flow = DataFlow(model, (3, 16, 16))
    kinds = {n.name: flow.step(n) for n in flow.nodes}
    assert kinds["sub"] is Step.SCALE and kinds["truediv"] is Step.SCALE        # x - buffer, / buffer
    assert kinds["stem"] is Step.LAYER and kinds["bn"] is Step.AFFINE and kinds["det"] is Step.ACTIVATION
    assert kinds["cat"] is Step.CONCAT and kinds["add"] is Step.ELEMENTWISE
    assert kinds["mean"] is Step.CONSTANT                                      # the buffer
    spatial_mean = next(n for n in flow.nodes if n.op == "call_method" and n.target == "mean")
    assert flow.step(spatial_mean) is Step.CHANNELWISE


def test_any_module_output_is_a_layer():
    model = Normalized().eval()
    layers = discover_layers(model, (3, 16, 16))
    det = layers.resolve("det")
    assert (det.kind, det.units, det.out_shape, det.activation) == ("module", 8, (8, 8, 8), "relu")
    x = torch.rand(5, 3, 16, 16)
    stats = capture_activations(model, ["det"], [(x, torch.zeros(5, dtype=torch.long))], reduce="mean")
    with torch.no_grad():
        expected = F.relu(model.bn(model.stem((x - model.mean) / model.std))).mean((2, 3))
    assert torch.allclose(torch.as_tensor(stats["det"].mean), expected.double().mean(0), atol=1e-6)
    with pytest.raises(UsageError, match="no layer named"):
        layers.resolve("nothere")


def test_module_called_twice_is_named_by_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 3, 3, padding=1)
            self.b = nn.Conv2d(3, 5, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x))))

    model = Shared().eval()          # the layer map holds the model weakly: keep it alive
    layers = discover_layers(model, (1, 8, 8))
    assert layers.resolve("relu").units == 3
    assert layers.resolve("relu@1").units == 5
    with pytest.raises(UsageError, match="called 2 time"):
        layers.resolve("relu@2")


MODEL_FILE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 5, padding=2)
        self.det = nn.ReLU()
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(self.det(self.conv(x)).mean((2, 3)))


def build():
    net = Net()
    net.netanatomy_input_shape = (1, 28, 28)
    return net
'''


def test_render_a_relu_module_by_name(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    out = tmp_path / "out"
    rc = run(["render", f"{path}:build", "--layer", "det", "--units", "0-2", "--steps", "4", "--out", str(out),
              "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    assert result["layer"] == "det" and len(result["units"]) == 3
    assert len(list(Path(out).glob("*.png"))) >= 3


def test_one_list_of_step_kinds_in_the_source():
    """The modules a walk passes are listed once (models/dataflow.py); no other module keeps its
    own copy of the activation list (the drift that made the two lesion paths disagree)."""
    src = Path(__import__("netanatomy").__file__).parent
    holders = [p.relative_to(src).as_posix() for p in src.rglob("*.py")
               if "nn.ReLU6, nn.LeakyReLU" in p.read_text()]
    assert holders == ["models/dataflow.py"]
