"""Layer and branch discovery on architectures it was not written for."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netanatomy.capture import layer_values
from netanatomy.errors import UsageError
from netanatomy.models.layers import discover_layers


class BasicBlock(nn.Module):
    """torchvision-style: one in-place ReLU module used twice, optional projection shortcut."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(x.mean((2, 3)))


class Join(nn.Module):
    def forward(self, parts):
        return torch.cat(parts, 1)


class FlatInception(nn.Module):
    """Lucent-port style: branch convs at the root and a bare torch.cat in forward.

    The untraceable variant joins with a module: without fx, a concatenation is visible only
    where some module returns it.
    """

    def __init__(self, untraceable=False):
        super().__init__()
        self.untraceable = untraceable
        self.join = Join()
        self.stem_pre_relu_conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mixed1_1x1_pre_relu_conv = nn.Conv2d(8, 6, 1)
        self.mixed1_3x3_bottleneck_pre_relu_conv = nn.Conv2d(8, 4, 1)
        self.mixed1_3x3_pre_relu_conv = nn.Conv2d(4, 10, 3, padding=1)
        self.mixed1_pool_reduce_pre_relu_conv = nn.Conv2d(8, 2, 1)
        self.head = nn.Linear(18, 5)

    def forward(self, x):
        s = F.relu(self.stem_pre_relu_conv(x))
        if self.untraceable and bool(s.sum() > -1e9):  # data-dependent: torch.fx cannot trace this
            s = s * 1.0
        a = F.relu(self.mixed1_1x1_pre_relu_conv(s))
        b = F.relu(self.mixed1_3x3_pre_relu_conv(F.relu(self.mixed1_3x3_bottleneck_pre_relu_conv(s))))
        c = F.relu(self.mixed1_pool_reduce_pre_relu_conv(F.max_pool2d(s, 3, 1, 1)))
        m = self.join([a, b, c]) if self.untraceable else torch.cat([a, b, c], 1)
        side = torch.cat([m, m], 2)  # a concatenation along space is not a branch join
        return self.head(side.mean((2, 3)))


def test_residual_blocks_found_with_their_summands():
    model = TinyResNet().eval()
    lm = discover_layers(model, (3, 16, 16))
    assert lm.method == "fx"
    block0, block1 = lm.resolve("layer1.0"), lm.resolve("layer1.1")
    assert block0.kind == block1.kind == "residual"
    assert [b.name for b in block0.branches] == ["layer1.0.conv2", "layer1.0.shortcut"]
    assert [b.name for b in block1.branches] == ["layer1.1.conv2", "layer1.1.downsample.0"]
    assert block1.units == 16 and all((b.start, b.stop) == (0, 16) for b in block1.branches)
    assert block0.activation == "relu"
    # pre-activation of a conv followed by batch norm is the batch norm's output
    assert lm.resolve("layer1.0.conv1").pre[0].module == "layer1.0.bn1"


def test_residual_values_are_the_sum_before_the_shared_inplace_relu():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
    lm = discover_layers(model, (3, 16, 16))
    x = torch.rand(4, 3, 16, 16)
    got = layer_values(model, [lm.resolve("layer1.0"), lm.resolve("layer1.1")], x, stage="pre")
    post = layer_values(model, [lm.resolve("layer1.0")], x, stage="post")
    with torch.no_grad():
        h = F.relu(model.bn1(model.conv1(x)))
        blk = model.layer1[0]
        s0 = blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(h))))) + h
        h1 = F.relu(s0)
        blk = model.layer1[1]
        s1 = blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(h1))))) + blk.downsample(h1)
    torch.testing.assert_close(got["layer1.0"], s0)
    torch.testing.assert_close(got["layer1.1"], s1)
    torch.testing.assert_close(post["layer1.0"], h1)


@pytest.mark.parametrize("untraceable", [False, True])
def test_flat_concat_named_by_common_prefix_and_fallback_agrees(untraceable):
    torch.manual_seed(0)
    model = FlatInception(untraceable=untraceable).eval()
    model.netanatomy_aliases = {n.replace("_pre_relu_conv", ""): n for n, _ in model.named_modules() if n.endswith("conv")}
    lm = discover_layers(model, (3, 8, 8))
    assert lm.method == ("modules" if untraceable else "fx")
    concat = lm.of_kind("concat")
    assert len(concat) == 1, [layer.name for layer in lm.values()]
    layer = concat[0]
    assert layer.name == ("join" if untraceable else "mixed1")
    assert [(b.name, b.start, b.stop) for b in layer.branches] == [
        ("mixed1_1x1", 0, 6), ("mixed1_3x3", 6, 16), ("mixed1_pool_reduce", 16, 18)]
    assert lm.resolve("mixed1_3x3").module == "mixed1_3x3_pre_relu_conv"
    x = torch.rand(3, 3, 8, 8)
    pre = layer_values(model, [layer], x, stage="pre")[layer.name]
    post = layer_values(model, [layer], x, stage="post")[layer.name]
    with torch.no_grad():
        s = F.relu(model.stem_pre_relu_conv(x))
        a = model.mixed1_1x1_pre_relu_conv(s)
        b = model.mixed1_3x3_pre_relu_conv(F.relu(model.mixed1_3x3_bottleneck_pre_relu_conv(s)))
        c = model.mixed1_pool_reduce_pre_relu_conv(F.max_pool2d(s, 3, 1, 1))
    torch.testing.assert_close(pre, torch.cat([a, b, c], 1))
    torch.testing.assert_close(post, F.relu(torch.cat([a, b, c], 1)))


def test_fallback_finds_residual_and_same_param_layers():
    model = TinyResNet().eval()
    fx_map = discover_layers(model, (3, 16, 16), method="fx")
    mod_map = discover_layers(model, (3, 16, 16), method="modules")
    param = lambda lm: [(l.name, l.units) for l in lm.values() if l.kind in ("conv", "linear")]  # noqa: E731
    assert param(fx_map) == param(mod_map)
    residual = {l.name for l in mod_map.of_kind("residual")}
    assert residual == {"layer1.0", "layer1.1"}


def test_unknown_layer_suggests_names():
    model = TinyResNet().eval()
    lm = discover_layers(model, (3, 16, 16))
    with pytest.raises(UsageError, match=r"did you mean: layer1\.0\.conv1"):
        lm.resolve("layer1.0.cnov1")


def test_input_shape_is_guessed_for_plain_models():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    lm = discover_layers(model)
    assert lm.input_shape == (1, 28, 28)
    assert [l.name for l in lm.values()] == ["1", "3"]
    assert lm.resolve("1").activation == "relu"


def test_zoo_alexnet_towers_are_branches():
    pytest.importorskip("netanatomy.models.zoo.alexnet")
    from netanatomy.models import load_model

    loaded = load_model("zoo:alexnet")
    lm = discover_layers(loaded.module, loaded.input_shape)
    for name in ("conv1", "conv2", "conv4", "conv5"):
        layer = lm.resolve(name)
        assert len(layer.branches) == 2, name
        assert layer.branches[0].size == layer.branches[1].size == layer.units // 2
    # conv3 reads both towers, but each half of its units feeds only its own tower's conv4
    assert [b.kind for b in lm.resolve("conv3").branches] == ["group", "group"]
    assert lm.resolve("fc6").branches == ()


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project, identity sum."""

    def __init__(self, c, expand=6):
        super().__init__()
        hidden = c * expand
        self.conv = nn.Sequential(
            nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return x + self.conv(x)


def test_depthwise_convs_are_layers_not_per_channel_branches():
    from netanatomy.models.layers import layers_summary

    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6(), InvertedResidual(16), InvertedResidual(16),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    layers = discover_layers(model, (3, 32, 32))
    dw = layers.resolve("2.conv.3")
    assert dw.depthwise and dw.groups == 96 and dw.branches == ()
    expand = layers.resolve("2.conv.0")       # feeds only the depthwise conv: not split either
    assert not expand.depthwise and expand.branches == ()
    assert all(len(layer.branches) <= 2 for layer in layers.values())
    text = layers_summary(layers)
    assert len(text.splitlines()) < 16 and max(len(line) for line in text.splitlines()) < 140
    assert "3x3 dw" in text


def test_grouped_conv_branches_stay_and_long_lists_are_summarized():
    from netanatomy.models.layers import layers_summary

    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, groups=32),
                          nn.ReLU()).eval()
    layers = discover_layers(model, (3, 8, 8))
    grouped = layers.resolve("2")
    assert len(grouped.branches) == 32 and {b.size for b in grouped.branches} == {2}
    assert len(layers.resolve("0").branches) == 32          # it feeds only the grouped conv
    assert "32 groups of 2 units" in layers_summary(layers)
