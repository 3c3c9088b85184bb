"""Minception: a small Inception-style network for 28 to 64 pixel images.

Branch specialization needs parallel branches of unequal widths, like InceptionV1's mixed
layers, but InceptionV1 cannot be trained on a CPU. Minception keeps the block design (1x1,
1x1 -> 3x3, 1x1 -> 5x5 as the smallest branch, 3x3 max pool -> 1x1, joined by concatenation) in
a network that trains an epoch of Fashion-MNIST in seconds.

Module names follow InceptionV1's short names: `mixed1_1x1`, `mixed1_3x3_bottleneck`,
`mixed1_3x3`, `mixed1_5x5_bottleneck`, `mixed1_5x5`, `mixed1_pool_reduce`, the concatenation
`mixed1`; the stem is `conv1` (and `conv2`), the classifier `fc`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UsageError
from . import ZooEntry, register
from .blocks import FASHION_MNIST_MEAN, FASHION_MNIST_STD, Concat, check_positive, default_stats, normalizer

# Per mixed block: 1x1, 3x3 bottleneck, 3x3, 5x5 bottleneck, 5x5, pool reduce (before `width`).
BLOCKS = (
    (16, 12, 24, 4, 8, 8),
    (24, 16, 32, 6, 12, 12),
    (32, 24, 48, 8, 16, 16),
)


class Minception(nn.Module):
    """Stem, 1-3 mixed blocks with unequal branches, global average pooling, linear classifier.

    The stem's last conv has stride 2 and a 2x2 max pool (`pool1`) follows the first mixed block,
    so a 28 px input has its mixed blocks at 14 and 7 px. (A stride-2 conv instead of a stem max
    pool: CPU max pooling in NCHW is slow, and this keeps an epoch of Fashion-MNIST short.)
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        blocks: int = 2,
        width: float = 1.0,
        stem_convs: int = 1,
        stem_channels: int = 16,
        batch_norm: bool = False,
        normalize: bool = True,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
    ):
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels, input_size=input_size, width=width,
                       stem_channels=stem_channels)
        if not 1 <= blocks <= len(BLOCKS):
            raise UsageError(f"blocks must be between 1 and {len(BLOCKS)}, got {blocks}")
        if stem_convs not in (1, 2):
            raise UsageError(f"stem_convs must be 1 or 2, got {stem_convs}")
        if mean is None and std is None:
            if in_channels == 1:
                mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
            else:
                mean, std = default_stats(in_channels)

        def w(c: int) -> int:
            return max(1, round(c * width))

        self.netanatomy_input_shape = (in_channels, input_size, input_size)
        self.netanatomy_aliases: dict[str, str] = {}
        self.blocks = blocks
        self.stem_convs = stem_convs
        self.batch_norm = batch_norm
        self.normalize = normalizer(in_channels, mean, std) if normalize else nn.Identity()

        stem = w(stem_channels)
        self._conv("conv1", in_channels, stem, 3, stride=2 if stem_convs == 1 else 1)
        if stem_convs == 2:
            self._conv("conv2", stem, stem, 3, stride=2)
        channels = stem
        for b in range(1, blocks + 1):
            mixed = f"mixed{b}"
            b1, b3r, b3, b5r, b5, bp = (w(c) for c in BLOCKS[b - 1])
            self._conv(f"{mixed}_1x1", channels, b1, 1)
            self._conv(f"{mixed}_3x3_bottleneck", channels, b3r, 1)
            self._conv(f"{mixed}_3x3", b3r, b3, 3)
            self._conv(f"{mixed}_5x5_bottleneck", channels, b5r, 1)
            self._conv(f"{mixed}_5x5", b5r, b5, 5)
            self._conv(f"{mixed}_pool_reduce", channels, bp, 1)
            setattr(self, mixed, Concat(dim=1))
            channels = b1 + b3 + b5 + bp
            if b == 1:
                self.pool1 = nn.MaxPool2d(2)
        self.fc = nn.Linear(channels, num_classes)

    def _conv(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=not self.batch_norm)
        setattr(self, name, conv)
        if self.batch_norm:
            setattr(self, f"{name}_bn", nn.BatchNorm2d(cout))

    def _run(self, name: str, x: Tensor) -> Tensor:
        x = getattr(self, name)(x)
        if self.batch_norm:
            x = getattr(self, f"{name}_bn")(x)
        return F.relu(x)

    def _mixed(self, mixed: str, x: Tensor) -> Tensor:
        b1 = self._run(f"{mixed}_1x1", x)
        b3 = self._run(f"{mixed}_3x3", self._run(f"{mixed}_3x3_bottleneck", x))
        b5 = self._run(f"{mixed}_5x5", self._run(f"{mixed}_5x5_bottleneck", x))
        bp = self._run(f"{mixed}_pool_reduce", F.max_pool2d(x, 3, stride=1, padding=1))
        return getattr(self, mixed)([b1, b3, b5, bp])

    def forward(self, x: Tensor) -> Tensor:
        x = self._run("conv1", self.normalize(x))
        if self.stem_convs == 2:
            x = self._run("conv2", x)
        for b in range(1, self.blocks + 1):
            x = self._mixed(f"mixed{b}", x)
            if b == 1:
                x = self.pool1(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def minception(**kwargs) -> Minception:
    """Factory for `zoo:minception` (kwargs as `Minception`)."""
    return Minception(**kwargs)


register(ZooEntry(
    name="minception",
    factory=minception,
    description=(
        "Small Inception-style CNN (stem, mixed1..mixedN with 1x1/3x3/5x5/pool branches, GAP, linear) "
        "for 28-64 px images; trains on a CPU"
    ),
    input_shape=(1, 28, 28),
    num_classes=10,
    default_kwargs={"num_classes": 10, "in_channels": 1, "input_size": 28, "blocks": 2},
))
