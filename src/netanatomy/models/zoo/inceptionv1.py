"""InceptionV1 (GoogLeNet as in TensorFlow's `inception5h`), the model of the Circuits work.

The layout follows the public PyTorch port used by Lucent (`inception5h.pth`): every conv is a
flat attribute `<layer>_pre_relu_conv`, the classifier is `softmax2_pre_activation_matmul`,
padding is explicit and TensorFlow-style ("SAME": the extra row and column go after), max-pool
padding is -inf, and local response normalization uses the port's constants. The port carries
no auxiliary heads, so neither does this model: `inception5h.pth` loads strictly (116 keys).

Our input is an image in [0, 1]; the network expects x * 255 - 117, applied inside `forward`.
`forward` returns the 1008-way logits before the softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ZooEntry, register
from .blocks import Concat, check_positive

# Branch widths per mixed layer: 1x1, 3x3 bottleneck, 3x3, 5x5 bottleneck, 5x5, pool reduce.
MIXED = {
    "mixed3a": (64, 96, 128, 16, 32, 32),
    "mixed3b": (128, 128, 192, 32, 96, 64),
    "mixed4a": (192, 96, 204, 16, 48, 64),
    "mixed4b": (160, 112, 224, 24, 64, 64),
    "mixed4c": (128, 128, 256, 24, 64, 64),
    "mixed4d": (112, 144, 288, 32, 64, 64),
    "mixed4e": (256, 160, 320, 32, 128, 128),
    "mixed5a": (256, 160, 320, 48, 128, 128),
    "mixed5b": (384, 192, 384, 48, 128, 128),
}
# Mixed layers preceded by a stride-2 max pool (named as in the port).
POOL_BEFORE = {"mixed4a": "maxpool4", "mixed5a": "maxpool10"}
# Stem convs: name, out channels, kernel, stride.
STEM = (("conv2d0", 64, 7, 2), ("conv2d1", 64, 1, 1), ("conv2d2", 192, 3, 1))

# Local response normalization of inception5h (TF depth_radius 4 -> size 9).
LRN = {"size": 9, "alpha": 9.99999974738e-05, "beta": 0.5, "k": 1.0}
CONV = "_pre_relu_conv"
CLASSIFIER = "softmax2_pre_activation_matmul"


def _same_pad(kernel: int) -> tuple[int, int, int, int]:
    """TensorFlow 'SAME' padding for stride 1 (odd kernels: symmetric)."""
    p = kernel // 2
    return (p, p, p, p)


def _tf_max_pool(x: Tensor, stride: int) -> Tensor:
    """3x3 max pool with TF 'SAME' padding: stride 2 pads one after, stride 1 one on each side."""
    pad = (0, 1, 0, 1) if stride == 2 else (1, 1, 1, 1)
    return F.max_pool2d(F.pad(x, pad, value=float("-inf")), 3, stride)


class InceptionV1(nn.Module):
    """InceptionV1 with the key layout of `inception5h.pth`.

    `width` scales every channel count (1.0 is the real network; smaller values give a fast
    model with the same topology for tests); `num_classes` defaults to the 1008 of inception5h.
    """

    def __init__(self, num_classes: int = 1008, width: float = 1.0):
        super().__init__()
        check_positive(num_classes=num_classes, width=width)

        def w(c: int) -> int:
            return max(1, round(c * width))

        self.netanatomy_input_shape = (3, 224, 224)
        self.netanatomy_aliases: dict[str, str] = {}
        self.localresponsenorm0 = nn.LocalResponseNorm(**LRN)
        self.localresponsenorm1 = nn.LocalResponseNorm(**LRN)

        channels = 3
        for name, cout, kernel, stride in STEM:
            self._conv(name, channels, w(cout), kernel, stride)
            channels = w(cout)
        for mixed, widths in MIXED.items():
            b1, b3r, b3, b5r, b5, bp = (w(c) for c in widths)
            self._conv(f"{mixed}_1x1", channels, b1, 1)
            self._conv(f"{mixed}_3x3_bottleneck", channels, b3r, 1)
            self._conv(f"{mixed}_5x5_bottleneck", channels, b5r, 1)
            self._conv(f"{mixed}_pool_reduce", channels, bp, 1)
            self._conv(f"{mixed}_3x3", b3r, b3, 3)
            self._conv(f"{mixed}_5x5", b5r, b5, 5)
            setattr(self, mixed, Concat(dim=1))
            channels = b1 + b3 + b5 + bp
        self.softmax2_pre_activation_matmul = nn.Linear(channels, num_classes)
        self.netanatomy_aliases["softmax2"] = CLASSIFIER
        self._init_weights()

    def _conv(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        setattr(self, name + CONV, nn.Conv2d(cin, cout, kernel, stride=stride))
        self.netanatomy_aliases[name] = name + CONV

    def _init_weights(self) -> None:
        # He initialization keeps activations at a steady scale through the 22 ReLU layers, so
        # analyses of a random model see signal in every layer, not a decayed one.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # The stem sees x * 255 - 117 (std about 64 on natural images), not unit-scale input.
        with torch.no_grad():
            self.conv2d0_pre_relu_conv.weight.div_(64.0)
        nn.init.normal_(self.softmax2_pre_activation_matmul.weight, std=0.01)
        nn.init.zeros_(self.softmax2_pre_activation_matmul.bias)

    def _apply_conv(self, name: str, x: Tensor, kernel: int) -> Tensor:
        if kernel > 1:
            x = F.pad(x, _same_pad(kernel))
        return F.relu(getattr(self, name + CONV)(x))

    def _mixed(self, mixed: str, x: Tensor) -> Tensor:
        b1 = self._apply_conv(f"{mixed}_1x1", x, 1)
        b3 = self._apply_conv(f"{mixed}_3x3", self._apply_conv(f"{mixed}_3x3_bottleneck", x, 1), 3)
        b5 = self._apply_conv(f"{mixed}_5x5", self._apply_conv(f"{mixed}_5x5_bottleneck", x, 1), 5)
        bp = self._apply_conv(f"{mixed}_pool_reduce", _tf_max_pool(x, 1), 1)
        return getattr(self, mixed)([b1, b3, b5, bp])

    def forward(self, x: Tensor) -> Tensor:
        x = x * 255.0 - 117.0
        x = F.relu(self.conv2d0_pre_relu_conv(F.pad(x, (2, 3, 2, 3))))
        x = self.localresponsenorm0(_tf_max_pool(x, 2))
        x = self._apply_conv("conv2d1", x, 1)
        x = self.localresponsenorm1(self._apply_conv("conv2d2", x, 3))
        x = _tf_max_pool(x, 2)
        for mixed in MIXED:
            if mixed in POOL_BEFORE:
                x = _tf_max_pool(x, 2)
            x = self._mixed(mixed, x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.softmax2_pre_activation_matmul(x)


def inceptionv1(**kwargs) -> InceptionV1:
    """Factory for `zoo:inceptionv1` (kwargs as `InceptionV1`)."""
    return InceptionV1(**kwargs)


register(ZooEntry(
    name="inceptionv1",
    factory=inceptionv1,
    description=(
        "InceptionV1 of the Circuits work, layout of Lucent's inception5h.pth (load it with --weights); "
        "returns 1008 logits"
    ),
    input_shape=(3, 224, 224),
    num_classes=1008,
    default_kwargs={"num_classes": 1008},
))
