"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant for mobile accelerators).

Lite0 is EfficientNet-B0 with three changes: no squeeze-and-excitation, ReLU6 in place of
swish, and (at this width) the same 32-channel stem and 1280-channel head. The network: a 3x3
stride-2 stem conv, sixteen mobile inverted-bottleneck blocks in seven stages of (repeats,
kernel, first stride, expansion, output channels), a 1x1 head conv, global average pooling,
dropout and a linear classifier. A block expands with a 1x1 conv (skipped at expansion 1),
filters with a depthwise k x k conv, and projects with a linear 1x1 conv, adding its input
when it keeps resolution and width. Convs have no bias and are followed by batch norm
(eps 1e-3, as trained in TensorFlow).

Convs pad like TensorFlow's "SAME": the output is ceil(input / stride) and an odd total
padding puts the extra row and column after. `SameConv2d` is an `nn.Conv2d` subclass that
computes that padding from each input (for 224 px inputs it equals the "static same" padding
fixed at construction in the `efficientnet_lite_pytorch` port), so layer discovery sees it as
a conv.

State-dict keys follow that port (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...,
`_conv_head`, `_bn1`, `_fc`), so `efficientnet-lite0-57934424.pth` loads strictly: 296 keys.
Our input is an image in [0, 1]; the network expects (255 x - 127) / 128, the Lite models'
TensorFlow preprocessing, applied inside `forward` with its constants out of the state dict.
`forward` returns the logits before the softmax.
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from . import ZooEntry, register
from .blocks import Normalize, check_positive, init_convs_and_norms

# (repeats, kernel, stride of the first repeat, expansion, output channels), per stage.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN = {"eps": 1e-3, "momentum": 0.01}
# (255 x - 127) / 128 as a per-channel mean and std on [0, 1] inputs.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding so that the output is ceil(size / stride), TensorFlow style."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def pad_same(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> Tensor:
    """Zero-pad the last two dims of `x` for a TensorFlow "SAME" conv (one opaque step under torch.fx)."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom))
    return x


torch.fx.wrap("pad_same")  # a plain symbolic_trace keeps the shape-dependent padding as one call


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TensorFlow "SAME" padding computed from the input's height and width."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvLite(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation, ReLU6 activations."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.has_expand = expansion != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, **BN)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, **BN)
        self._project_conv = SameConv2d(hidden, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, **BN)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return x + out if self.use_residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the key layout of the `efficientnet_lite_pytorch` port."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        check_positive(num_classes=num_classes)
        self.netanatomy_input_shape = (3, 224, 224)
        self.normalize = Normalize(LITE_MEAN, LITE_STD)
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, **BN)
        aliases = {"stem": "_conv_stem"}
        blocks: list[nn.Module] = []
        channels = STEM_CHANNELS
        for repeats, kernel, stride, expansion, cout in STAGES:
            for i in range(repeats):
                index = len(blocks)
                block = MBConvLite(channels, cout, kernel, stride if i == 0 else 1, expansion)
                blocks.append(block)
                if block.use_residual:  # the block's sum is a layer of its own
                    aliases[f"block{index}"] = f"_blocks.{index}"
                if expansion != 1:
                    aliases[f"block{index}_expand"] = f"_blocks.{index}._expand_conv"
                aliases[f"block{index}_depthwise"] = f"_blocks.{index}._depthwise_conv"
                aliases[f"block{index}_project"] = f"_blocks.{index}._project_conv"
                channels = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(channels, HEAD_CHANNELS, 1)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, **BN)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        aliases.update(head="_conv_head", fc="_fc")
        self.netanatomy_aliases = aliases
        self._init_weights()

    def _init_weights(self) -> None:
        init_convs_and_norms(self)
        bound = 1.0 / math.sqrt(HEAD_CHANNELS)
        nn.init.uniform_(self._fc.weight, -bound, bound)
        nn.init.zeros_(self._fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(self.normalize(x))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite0(num_classes: int = 1000, dropout: float = 0.2) -> EfficientNetLite0:
    """Factory for `zoo:efficientnet_lite0` (random initialization)."""
    return EfficientNetLite0(num_classes=num_classes, dropout=dropout)


register(ZooEntry(
    name="efficientnet_lite0",
    factory=efficientnet_lite0,
    description="EfficientNet-Lite0, key layout of efficientnet_lite_pytorch, random init "
                "(trained: zoo:efficientnet_lite0-imagenet)",
    input_shape=(3, 224, 224),
    num_classes=1000,
))
