"""MobileNetV2 (Sandler et al. 2018), in the key layout of torchvision's ImageNet weights.

The network: a 3x3 stride-2 stem conv (32 channels), seventeen inverted-residual blocks in
seven stages of (expansion t, channels c, repeats n, first stride s), a 1x1 head conv to 1280
channels, global average pooling and a linear classifier behind dropout. Each block expands
with a 1x1 conv (skipped when t = 1), filters with a 3x3 depthwise conv, and projects with a
linear 1x1 conv; it adds its input when it keeps both resolution and width. Every conv has no
bias and is followed by batch norm; ReLU6 follows all but the projections.

State-dict keys follow torchvision (`features.N...`, `classifier.1`), so
`mobilenet_v2-b0353104.pth` (torchvision's ImageNet weights) loads strictly: 314 keys. Our
input is an image in [0, 1]; ImageNet mean/std normalization runs inside `forward`, with its
constants kept out of the state dict. `forward` returns the logits before the softmax.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ZooEntry, register
from .blocks import IMAGENET_MEAN, IMAGENET_STD, Normalize, check_positive, init_convs_and_norms

# (expansion t, output channels c, repeats n, stride of the first repeat s), per stage.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of `divisor`, never more than 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    """conv (no bias, 'same' padding for odd kernels) -> batch norm -> ReLU6; keys 0.* and 1.*."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = round(cin * expansion)
        self.use_residual = stride == 1 and cin == cout
        steps: list[nn.Module] = []
        if expansion != 1:
            steps.append(ConvBNReLU6(cin, hidden, 1))
        steps += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*steps)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's key layout.

    `width` scales every channel count (rounded to multiples of 8; 1.0 is the real network, and
    the head keeps 1280 channels below 1.0); `dropout` is the rate before the classifier.
    """

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2):
        super().__init__()
        check_positive(num_classes=num_classes, width=width)
        self.netanatomy_input_shape = (3, 224, 224)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        channels = make_divisible(STEM_CHANNELS * width)
        head = make_divisible(HEAD_CHANNELS * max(1.0, width))
        layers: list[nn.Module] = [ConvBNReLU6(3, channels, 3, stride=2)]
        aliases = {"stem": "features.0.0"}
        for expansion, c, repeats, stride in STAGES:
            cout = make_divisible(c * width)
            for i in range(repeats):
                index = len(layers)
                block = InvertedResidual(channels, cout, stride if i == 0 else 1, expansion)
                layers.append(block)
                if block.use_residual:  # the block's sum is a layer of its own
                    aliases[f"block{index}"] = f"features.{index}"
                prefix = f"features.{index}.conv"
                if expansion != 1:
                    aliases[f"block{index}_expand"] = f"{prefix}.0.0"
                step = 1 if expansion != 1 else 0
                aliases[f"block{index}_depthwise"] = f"{prefix}.{step}.0"
                aliases[f"block{index}_project"] = f"{prefix}.{step + 1}"
                channels = cout
        aliases["head"] = f"features.{len(layers)}.0"
        layers.append(ConvBNReLU6(channels, head, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head, num_classes))
        aliases["fc"] = "classifier.1"
        self.netanatomy_aliases = aliases
        self._init_weights()

    def _init_weights(self) -> None:
        init_convs_and_norms(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.normalize(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    """Factory for `zoo:mobilenet_v2` (random initialization)."""
    return MobileNetV2(num_classes=num_classes, width=width, dropout=dropout)


register(ZooEntry(
    name="mobilenet_v2",
    factory=mobilenet_v2,
    description="MobileNetV2, torchvision's key layout, random init (trained: zoo:mobilenet_v2-imagenet)",
    input_shape=(3, 224, 224),
    num_classes=1000,
))
