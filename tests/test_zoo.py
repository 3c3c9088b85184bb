"""The zoo architectures: shapes, key layouts, and the structure the analyses rely on."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from netanatomy.errors import UsageError
from netanatomy.models.layers import discover_layers
from netanatomy.models.zoo import entries, get_entry
from netanatomy.models.zoo.alexnet import AlexNet
from netanatomy.models.zoo.bandingnet import VARIANTS, BandingNet, CoordConv2d, MaskedAvgPool, XPool, coordinate_map
from netanatomy.models.zoo.blocks import Concat, GroupedLRN, L2Pool
from netanatomy.models.zoo.inceptionv1 import InceptionV1
from netanatomy.models.zoo.minception import Minception
from netanatomy.models.zoo.mlp import MLP

OURS = ("mlp", "minception", "bandingnet", "alexnet", "inceptionv1")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

# inception5h.pth, as read from the public PyTorch port (Lucent's InceptionV1):
# per mixed layer: 1x1, 3x3 bottleneck, 3x3, 5x5 bottleneck, 5x5, pool reduce; input channels.
PORT_MIXED = {
    "mixed3a": (192, 64, 96, 128, 16, 32, 32),
    "mixed3b": (256, 128, 128, 192, 32, 96, 64),
    "mixed4a": (480, 192, 96, 204, 16, 48, 64),
    "mixed4b": (508, 160, 112, 224, 24, 64, 64),
    "mixed4c": (512, 128, 128, 256, 24, 64, 64),
    "mixed4d": (512, 112, 144, 288, 32, 64, 64),
    "mixed4e": (528, 256, 160, 320, 32, 128, 128),
    "mixed5a": (832, 256, 160, 320, 48, 128, 128),
    "mixed5b": (832, 384, 192, 384, 48, 128, 128),
}
PORT_LRN = {"size": 9, "alpha": 9.99999974738e-05, "beta": 0.5, "k": 1.0}


def port_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of inception5h.pth with its shape."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}_pre_relu_conv.weight"] = (cout, cin, k, k)
        shapes[f"{name}_pre_relu_conv.bias"] = (cout,)

    conv("conv2d0", 3, 64, 7)
    conv("conv2d1", 64, 64, 1)
    conv("conv2d2", 64, 192, 3)
    for m, (cin, b1, b3r, b3, b5r, b5, bp) in PORT_MIXED.items():
        conv(f"{m}_1x1", cin, b1, 1)
        conv(f"{m}_3x3_bottleneck", cin, b3r, 1)
        conv(f"{m}_5x5_bottleneck", cin, b5r, 1)
        conv(f"{m}_pool_reduce", cin, bp, 1)
        conv(f"{m}_3x3", b3r, b3, 3)
        conv(f"{m}_5x5", b5r, b5, 5)
    shapes["softmax2_pre_activation_matmul.weight"] = (1008, 1024)
    shapes["softmax2_pre_activation_matmul.bias"] = (1008,)
    return shapes


def port_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The port's forward, step by step, on a state dict (pre-softmax logits)."""

    def conv(name, t, pad=None, stride=1):
        if pad is not None:
            t = F.pad(t, pad)
        w, b = sd[f"{name}_pre_relu_conv.weight"], sd[f"{name}_pre_relu_conv.bias"]
        return F.relu(F.conv2d(t, w, b, stride=stride))

    def pool(t, pad, stride):
        return F.max_pool2d(F.pad(t, pad, value=float("-inf")), (3, 3), stride=stride)

    def lrn(t):
        return F.local_response_norm(t, **PORT_LRN)

    t = x * 255 - 117
    t = conv("conv2d0", t, (2, 3, 2, 3), stride=2)
    t = lrn(pool(t, (0, 1, 0, 1), 2))
    t = conv("conv2d1", t)
    t = lrn(conv("conv2d2", t, (1, 1, 1, 1)))
    t = pool(t, (0, 1, 0, 1), 2)
    for m in PORT_MIXED:
        if m in ("mixed4a", "mixed5a"):
            t = pool(t, (0, 1, 0, 1), 2)
        a = conv(f"{m}_1x1", t)
        b = conv(f"{m}_3x3", conv(f"{m}_3x3_bottleneck", t), (1, 1, 1, 1))
        c = conv(f"{m}_5x5", conv(f"{m}_5x5_bottleneck", t), (2, 2, 2, 2))
        d = conv(f"{m}_pool_reduce", pool(t, (1, 1, 1, 1), 1))
        t = torch.cat([a, b, c, d], 1)
    t = F.avg_pool2d(t, (7, 7), stride=(1, 1)).reshape(-1, t.shape[1])
    return F.linear(t, sd["softmax2_pre_activation_matmul.weight"], sd["softmax2_pre_activation_matmul.bias"])


def small_kwargs(name: str) -> dict:
    """Fast configurations of each architecture, for tracing tests."""
    return {
        "inceptionv1": {"width": 0.125, "num_classes": 12},
        "alexnet": {"small": True, "width": 0.25, "num_classes": 7},
    }.get(name, {})


# ---------------------------------------------------------------------------------------------
# every entry


def test_entries_are_registered_with_their_shapes():
    zoo = entries()
    for name in OURS:
        entry = zoo[name]
        assert entry.description and entry.num_classes and len(entry.input_shape) == 3
        model = entry.factory(**entry.default_kwargs)
        assert tuple(model.netanatomy_input_shape) == entry.input_shape


@pytest.mark.parametrize("name", OURS)
def test_entry_runs_on_zeros(name):
    entry = get_entry(name)
    model = entry.factory(**entry.default_kwargs).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *entry.input_shape))
    assert out.shape == (2, entry.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", OURS)
def test_fx_trace_reproduces_forward(name):
    entry = get_entry(name)
    model = entry.factory(**{**entry.default_kwargs, **small_kwargs(name)}).eval()
    traced = fx.symbolic_trace(model)
    x = torch.rand(2, *model.netanatomy_input_shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", OURS)
def test_state_dict_holds_only_parameters_and_batchnorm_statistics(name):
    entry = get_entry(name)
    model = entry.factory(**{**entry.default_kwargs, **small_kwargs(name)})
    extra = set(model.state_dict()) - {n for n, _ in model.named_parameters()}
    assert all(key.endswith(BN_BUFFERS) for key in extra), extra


@pytest.mark.parametrize("name", OURS)
def test_aliases_name_existing_modules(name):
    model = get_entry(name).factory(**small_kwargs(name))
    modules = dict(model.named_modules())
    for short, full in model.netanatomy_aliases.items():
        assert full in modules, (short, full)


# ---------------------------------------------------------------------------------------------
# InceptionV1


def test_inceptionv1_state_dict_is_exactly_the_port_layout():
    model = InceptionV1()
    expected = port_shapes()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(got) == 116
    assert got == expected
    assert list(got) == list(expected)  # same order as the port's modules
    assert got["conv2d0_pre_relu_conv.weight"] == (64, 3, 7, 7)
    assert got["softmax2_pre_activation_matmul.weight"] == (1008, 1024)
    fake_file = {k: torch.zeros(s) for k, s in expected.items()}
    model.load_state_dict(fake_file, strict=True)


def test_inceptionv1_branch_widths_and_concat_modules():
    model = InceptionV1()
    for m, (_cin, b1, _b3r, b3, _b5r, b5, bp) in PORT_MIXED.items():
        widths = [getattr(model, f"{m}_{b}_pre_relu_conv").out_channels for b in ("1x1", "3x3", "5x5", "pool_reduce")]
        assert widths == [b1, b3, b5, bp]
        assert isinstance(getattr(model, m), Concat)
    aliases = model.netanatomy_aliases
    assert aliases["mixed3a_5x5"] == "mixed3a_5x5_pre_relu_conv"
    assert aliases["conv2d0"] == "conv2d0_pre_relu_conv"
    assert aliases["softmax2"] == "softmax2_pre_activation_matmul"
    assert len(aliases) == 3 + 9 * 6 + 1


def test_inceptionv1_forward_matches_the_port_step_by_step():
    torch.manual_seed(1)
    model = InceptionV1(width=0.125).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases too, so every padding and pooling choice shows
            p.normal_(0, 0.05)
        x = torch.rand(2, 3, 224, 224)
        torch.testing.assert_close(model(x), port_forward(model.state_dict(), x), rtol=1e-4, atol=1e-4)


def test_inceptionv1_random_init_keeps_signal_in_deep_layers():
    model = InceptionV1(width=0.25).eval()
    seen = {}
    hook = model.mixed5b_5x5_pre_relu_conv.register_forward_hook(lambda m, i, o: seen.update(out=o))
    try:
        with torch.no_grad():
            model(torch.rand(2, 3, 224, 224))
    finally:
        hook.remove()
    assert seen["out"].std() > 0.1


# ---------------------------------------------------------------------------------------------
# AlexNet


def test_alexnet_two_towers():
    model = AlexNet()
    assert [getattr(model, f"conv{i}").groups for i in range(1, 6)] == [1, 2, 1, 2, 2]
    assert model.conv1.weight.shape == (96, 3, 11, 11)
    assert model.conv2.weight.shape == (256, 48, 5, 5)
    assert model.conv3.weight.shape == (384, 256, 3, 3)
    assert model.conv4.weight.shape == (384, 192, 3, 3)
    assert model.conv5.weight.shape == (256, 192, 3, 3)
    assert model.fc6.in_features == 256 * 6 * 6
    assert (model.fc6.out_features, model.fc7.out_features, model.fc8.out_features) == (4096, 4096, 1000)
    assert isinstance(model.norm1, GroupedLRN) and model.norm1.groups == 2


def test_alexnet_towers_do_not_talk_before_conv3():
    model = AlexNet(small=True, width=0.5).eval()
    half = model.conv1.out_channels // 2
    h = torch.rand(1, model.conv1.out_channels, 15, 15)
    bumped = h.clone()
    bumped[:, :half] += torch.rand(1, half, 15, 15)  # change only tower 0's conv1 units

    def tower_stage(t):
        return model.norm2(model.pool2(F.relu(model.conv2(t))))

    with torch.no_grad():
        delta = (tower_stage(bumped) - tower_stage(h)).abs().amax(dim=(0, 2, 3))
    out_half = model.conv2.out_channels // 2
    assert delta[:out_half].min() > 0
    assert delta[out_half:].max() == 0


@pytest.mark.parametrize("size", [32, 48, 64])
def test_alexnet_small_runs_on_small_colour_images(size):
    model = AlexNet(small=True, input_size=size, num_classes=10, width=0.25).eval()
    assert model.netanatomy_input_shape == (3, size, size)
    with torch.no_grad():
        assert model(torch.rand(3, 3, size, size)).shape == (3, 10)


def test_grouped_lrn_is_lrn_inside_each_group():
    x = torch.randn(2, 12, 5, 6) * 3
    lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    grouped = GroupedLRN(12, 2, size=5, alpha=5e-4, beta=0.75, k=2.0)
    torch.testing.assert_close(grouped(x), torch.cat([lrn(x[:, :6]), lrn(x[:, 6:])], 1))
    torch.testing.assert_close(GroupedLRN(12, 1, size=5, alpha=5e-4, beta=0.75, k=2.0)(x), lrn(x))
    with pytest.raises(UsageError):
        GroupedLRN(10, 3)


# ---------------------------------------------------------------------------------------------
# BandingNet


@pytest.mark.parametrize("variant", VARIANTS)
def test_bandingnet_variant_runs_and_traces(variant):
    model = BandingNet(variant=variant, width=4, num_classes=5).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(fx.symbolic_trace(model)(x), out)
    assert out.shape == (3, 5)
    assert isinstance(model.get_submodule(model.last_conv), nn.Conv2d)
    assert model.get_submodule(model.last_conv).out_channels == model.last_map[0]


def test_bandingnet_layout_and_heads():
    base = BandingNet(width=4, convs_per_group=2, input_size=32)
    assert base.last_conv == "g6.conv2"
    assert base.last_map == (32, 8, 8)  # 4 * 8 channels; 32 -> 16 -> 8 with two stride-2 pools
    assert [getattr(base, f"pool{i}").stride for i in range(1, 6)] == [2, 2, 1, 1, 1]
    assert isinstance(base.pool3, L2Pool)
    c, h, w = base.last_map
    assert base.fc.in_features == c
    assert BandingNet("no_gap", width=4).fc.in_features == c * h * w
    assert BandingNet("xpool", width=4).fc.in_features == c * h
    for k in (3, 5, 16):
        assert BandingNet(f"masks{k}", width=4).fc.in_features == c * k
    split = BandingNet("split16", width=4, split_hidden=3)
    assert split.split.groups == 16 and split.split.kernel_size == (h, w)
    assert split.fc.in_features == 16 * 3
    assert BandingNet("maxpool4096", width=4, hidden=50).fc_hidden.out_features == 50
    assert BandingNet("mask7x7", width=4).pool.mask.shape == (c, h, w)
    assert BandingNet(input_size=224, width=2).last_map[1:] == (7, 7)


def test_bandingnet_rotate_is_baseline_on_rotated_inputs():
    baseline = BandingNet("baseline", width=4).eval()
    rotate = BandingNet("rotate", width=4).eval()
    rotate.load_state_dict(baseline.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rotate(x), baseline(torch.rot90(x, 1, dims=(2, 3))))
        assert not torch.allclose(rotate(x), baseline(x))


def test_coordconv_equals_conv_on_concatenated_coordinates():
    model = BandingNet("coordconv", width=4)
    convs = [m for n, m in model.named_modules() if isinstance(m, CoordConv2d)]
    assert [n for n, m in model.named_modules() if isinstance(m, CoordConv2d)] == ["g5.conv1", "g6.conv1"]
    conv = convs[0]
    x = torch.rand(2, conv.in_channels, 8, 8)
    coords = coordinate_map(8).expand(2, -1, -1, -1)
    expected = F.conv2d(torch.cat([x, coords], 1), torch.cat([conv.weight, conv.coord_weight], 1), padding=1)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected)


def test_pool_heads():
    x = torch.rand(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(MaskedAvgPool(3, 5)(x), x.mean((2, 3)).repeat_interleave(3, dim=1))
        torch.testing.assert_close(XPool()(x[..., torch.randperm(5)]), XPool()(x))  # x position is gone
        assert not torch.allclose(XPool()(x[..., torch.randperm(5), :]), XPool()(x))  # y position stays


def test_l2_pool_is_root_mean_square():
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0] = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = L2Pool(kernel_size=2, stride=2, padding=0, eps=0.0)(x)
    torch.testing.assert_close(out, torch.tensor([[[[2.5]]]]))  # sqrt((9 + 16 + 0 + 0) / 4)
    const = torch.full((1, 2, 6, 6), 2.0)
    torch.testing.assert_close(L2Pool(3, 2, eps=0.0)(const), torch.full((1, 2, 3, 3), 2.0))
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    L2Pool()(F.relu(x)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bandingnet_rejects_bad_arguments():
    with pytest.raises(UsageError, match="did you mean"):
        BandingNet("mask7")
    with pytest.raises(UsageError):
        BandingNet(width=0)
    with pytest.raises(UsageError):
        BandingNet(downsample=6)


# ---------------------------------------------------------------------------------------------
# MLP and Minception


def test_mlp_default_layout():
    model = MLP()
    layers = [(m.in_features, m.out_features) for n, m in model.named_children() if n.startswith("fc")]
    assert layers == [(784, 256), (256, 256), (256, 256), (256, 256), (256, 10)]
    assert model.netanatomy_input_shape == (1, 28, 28)
    assert MLP(widths=(7,), in_shape=(3, 4, 4), num_classes=2).fc1.in_features == 48


def test_mlp_normalizes_with_fashion_mnist_statistics():
    model, raw = MLP().eval(), MLP(normalize=False).eval()
    raw.load_state_dict(model.state_dict())
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw((x - 0.2860) / 0.3530))


def test_minception_blocks_have_unequal_branches():
    model = Minception(blocks=3)
    for b in (1, 2, 3):
        widths = {br: getattr(model, f"mixed{b}_{br}").out_channels for br in ("1x1", "3x3", "5x5", "pool_reduce")}
        assert widths["5x5"] == min(widths.values())
        assert len(set(widths.values())) > 1
        assert isinstance(getattr(model, f"mixed{b}"), Concat)
        assert getattr(model, f"mixed{b}_5x5_bottleneck").out_channels < getattr(model, f"mixed{b}_5x5").out_channels


@pytest.mark.parametrize("kwargs,shape", [
    ({}, (1, 28, 28)),
    ({"in_channels": 3, "input_size": 32, "blocks": 3, "stem_convs": 2}, (3, 32, 32)),
    ({"in_channels": 3, "input_size": 64, "width": 0.5, "batch_norm": True}, (3, 64, 64)),
])
def test_minception_configurations(kwargs, shape):
    model = Minception(**kwargs).eval()
    assert model.netanatomy_input_shape == shape
    with torch.no_grad():
        assert model(torch.rand(256, *shape)).shape == (256, 10)
    with pytest.raises(UsageError):
        Minception(blocks=4)


# ---------------------------------------------------------------------------------------------
# what layer discovery makes of them


def test_discovery_sees_branches_and_towers():
    layers = discover_layers(Minception())
    mixed1 = layers.resolve("mixed1")
    assert mixed1.kind == "concat"
    assert [(b.start, b.stop) for b in mixed1.branches] == [(0, 16), (16, 40), (40, 48), (48, 56)]
    towers = discover_layers(AlexNet(small=True, width=0.25))
    assert len(towers.resolve("conv1").branches) == 2
    assert len(towers.resolve("conv2").branches) == 2
    coord = discover_layers(BandingNet("coordconv", width=4))
    assert not coord.of_kind("residual")
