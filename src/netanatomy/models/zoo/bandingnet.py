"""The simplified network of the Weight Banding study (Petrov et al., 2021), with its variants.

Six groups of 3x3 conv + batch norm + ReLU, separated by L2 pooling, then global average
pooling and one linear layer; banding shows in the last conv layer. Each intervention of the
study is a `variant`:

- `baseline`: as above.
- `rotate`: inputs rotated 90 degrees inside `forward` (banding turns vertical).
- `no_gap`: the linear layer sees every position (flatten; banding disappears).
- `xpool`: average over x only, so vertical position reaches the linear layer.
- `masks3`, `masks5`, `masks16`: K learned spatial masks, each a weighted global average.
- `attention`: attention pooling (a learned 1x1 score, softmax over positions).
- `mask7x7`: a learned per-channel mask the size of the last map before global average pooling.
- `coordconv`: CoordConv coordinate channels into every conv of the last two groups
  (`CoordConv2d`).
- `split16`: the last map split into 16 channel groups, each with its own fully connected
  layer (one grouped conv, `groups=16`), joined by the final linear layer.
- `maxpool4096`: global max pooling, a hidden layer (4096 units in the study; `hidden`), linear.

The study used 224 px ImageNet, 512 channels in the last map and 1001 classes
(`width=64, input_size=224, num_classes=1001`); the defaults here are a CPU-sized version.
Stride-2 L2 pools come first (as many as keep the last map at least 7 pixels wide, unless
`downsample` says otherwise); the remaining group boundaries use stride-1 L2 pools.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UsageError, suggest
from . import ZooEntry, register
from .blocks import L2Pool, check_positive, default_stats, normalizer

VARIANTS = (
    "baseline", "rotate", "no_gap", "xpool", "masks3", "masks5", "masks16",
    "attention", "mask7x7", "coordconv", "split16", "maxpool4096",
)
GROUPS = 6
WIDTH_FACTORS = (1, 2, 4, 4, 8, 8)  # channels per group, times `width` (64 -> 512 at the end)
SPLITS = 16


def _pooled_size(size: int, stride: int) -> int:
    """Output size of a 3x3 L2 pool with padding 1."""
    return (size - 1) // stride + 1


def default_downsample(input_size: int, min_size: int = 7, max_pools: int = GROUPS - 1) -> int:
    """Most stride-2 pools that keep the last map at least `min_size` wide (>= 0)."""
    d, size = 0, input_size
    while d < max_pools and _pooled_size(size, 2) >= min_size:
        size, d = _pooled_size(size, 2), d + 1
    return d


def coordinate_map(size: int) -> Tensor:
    """[1, 2, size, size]: the y and x coordinate of every position, in [-1, 1]."""
    line = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(line, line, indexing="ij")
    return torch.stack([yy, xx]).unsqueeze(0)


class CoordConv2d(nn.Conv2d):
    """A 3x3 conv whose input also carries two coordinate channels (y, x in [-1, 1]).

    Convolving the concatenation [x, coordinates] equals conv(x) + conv(coordinates), so
    `weight` is exactly a plain conv's weight (banding scores read it as usual) and
    `coord_weight` [out, 2, k, k] holds the weights on the coordinate channels. Marked
    `netanatomy_leaf`: layer discovery sees one conv layer, not a sum of two paths.
    """

    netanatomy_leaf = True

    def __init__(self, in_channels: int, out_channels: int, size: int, kernel_size: int = 3, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.coord_weight = nn.Parameter(torch.empty(out_channels, 2, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.coord_weight, a=5 ** 0.5)
        self.register_buffer("coords", coordinate_map(size), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + F.conv2d(self.coords, self.coord_weight, padding=self.padding)


class ConvGroup(nn.Module):
    """`n` x (3x3 conv, batch norm, ReLU), modules `conv1`, `bn1`, ..., `convN`, `bnN`.

    With `coord_size` (the map's side), the convs are `CoordConv2d`s.
    """

    def __init__(self, cin: int, cout: int, n: int, coord_size: int | None = None):
        super().__init__()
        self.n = n
        for i in range(1, n + 1):
            c_in = cin if i == 1 else cout
            if coord_size is None:
                conv = nn.Conv2d(c_in, cout, 3, padding=1, bias=False)
            else:
                conv = CoordConv2d(c_in, cout, coord_size)
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.n + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return x


class GlobalAvgPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


class GlobalMaxPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.amax(dim=(2, 3))


class XPool(nn.Module):
    """Average over x only: [N, C, H, W] -> [N, C*H], vertical position kept."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=3).flatten(1)


class MaskedAvgPool(nn.Module):
    """K learned spatial masks, each giving a masked global average: [N, C, H, W] -> [N, C*K]."""

    def __init__(self, masks: int, size: int):
        super().__init__()
        self.masks = nn.Parameter(torch.ones(masks, size, size))
        self.positions = size * size

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.einsum("nchw,khw->nck", x, self.masks) / self.positions
        return pooled.flatten(1)


class ChannelMaskPool(nn.Module):
    """A learned [C, H, W] mask multiplied in before global average pooling."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.mask = nn.Parameter(torch.ones(channels, size, size))

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.mask).mean(dim=(2, 3))


class AttentionPool(nn.Module):
    """Softmax over positions of a learned 1x1 score, then the weighted sum of each channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.score = nn.Conv2d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.softmax(self.score(x).flatten(2), dim=-1)  # [N, 1, H*W]
        return (x.flatten(2) * weights).sum(dim=-1)


class BandingNet(nn.Module):
    """Six conv groups `g1`..`g6` (convs `gK.convI`), L2 pools `pool1`..`pool5`, a variant head, `fc`.

    `last_conv` names the last conv module; `last_map` is its output shape (C, H, W).
    """

    def __init__(
        self,
        variant: str = "baseline",
        width: int = 16,
        convs_per_group: int = 1,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        downsample: int | None = None,
        hidden: int = 4096,
        split_hidden: int = 64,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise UsageError(f"unknown bandingnet variant {variant!r}{suggest(variant, VARIANTS)}; "
                             f"known: {', '.join(VARIANTS)}")
        check_positive(width=width, convs_per_group=convs_per_group, in_channels=in_channels,
                       num_classes=num_classes, input_size=input_size, hidden=hidden, split_hidden=split_hidden)
        if int(width) != width:
            raise UsageError(f"bandingnet width must be a whole number of channels, got {width}")
        d = default_downsample(input_size) if downsample is None else int(downsample)
        if not 0 <= d <= GROUPS - 1:
            raise UsageError(f"downsample must be between 0 and {GROUPS - 1}, got {downsample}")
        channels = [int(width) * f for f in WIDTH_FACTORS]
        if variant == "split16" and channels[-1] % SPLITS:
            raise UsageError(f"split16 needs the last map's {channels[-1]} channels divisible by {SPLITS}")
        if mean is None and std is None:
            mean, std = default_stats(in_channels)

        self.variant = variant
        self.netanatomy_input_shape = (in_channels, input_size, input_size)
        self.netanatomy_aliases: dict[str, str] = {}
        self.normalize = normalizer(in_channels, mean, std)

        size, cin = input_size, in_channels
        for g in range(1, GROUPS + 1):
            coord = size if (variant == "coordconv" and g > GROUPS - 2) else None
            setattr(self, f"g{g}", ConvGroup(cin, channels[g - 1], convs_per_group, coord_size=coord))
            cin = channels[g - 1]
            if g < GROUPS:
                stride = 2 if g <= d else 1
                setattr(self, f"pool{g}", L2Pool(3, stride))
                size = _pooled_size(size, stride)
        c, s = cin, size
        self.last_conv = f"g{GROUPS}.conv{convs_per_group}"
        self.last_map = (c, s, s)
        self._build_head(variant, c, s, num_classes, hidden, split_hidden)

    def _build_head(self, variant: str, c: int, s: int, num_classes: int, hidden: int, split_hidden: int) -> None:
        if variant in ("baseline", "rotate", "coordconv"):
            self.pool, features = GlobalAvgPool(), c
        elif variant == "no_gap":
            self.pool, features = nn.Flatten(1), c * s * s
        elif variant == "xpool":
            self.pool, features = XPool(), c * s
        elif variant.startswith("masks"):
            k = int(variant[len("masks"):])
            self.pool, features = MaskedAvgPool(k, s), c * k
        elif variant == "mask7x7":
            self.pool, features = ChannelMaskPool(c, s), c
        elif variant == "attention":
            self.pool, features = AttentionPool(c), c
        elif variant == "split16":
            # 16 fully connected layers, each on one channel group's whole map = one grouped conv.
            self.split = nn.Conv2d(c, SPLITS * split_hidden, kernel_size=s, groups=SPLITS, bias=False)
            self.split_bn = nn.BatchNorm2d(SPLITS * split_hidden)
            features = SPLITS * split_hidden
        elif variant == "maxpool4096":
            self.pool = GlobalMaxPool()
            self.fc_hidden = nn.Linear(c, hidden, bias=False)
            self.fc_hidden_bn = nn.BatchNorm1d(hidden)
            features = hidden
        else:  # pragma: no cover - VARIANTS is checked in __init__
            raise AssertionError(variant)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        if self.variant == "rotate":
            x = torch.rot90(x, 1, dims=(2, 3))
        for g in range(1, GROUPS + 1):
            x = getattr(self, f"g{g}")(x)
            if g < GROUPS:
                x = getattr(self, f"pool{g}")(x)
        if self.variant == "split16":
            x = torch.flatten(F.relu(self.split_bn(self.split(x))), 1)
        elif self.variant == "maxpool4096":
            x = F.relu(self.fc_hidden_bn(self.fc_hidden(self.pool(x))))
        else:
            x = self.pool(x)
        return self.fc(x)


def bandingnet(**kwargs) -> BandingNet:
    """Factory for `zoo:bandingnet` (kwargs as `BandingNet`)."""
    return BandingNet(**kwargs)


register(ZooEntry(
    name="bandingnet",
    factory=bandingnet,
    description=(
        "Weight Banding simplified net: 6 conv+BN groups, L2 pooling, GAP, linear; variant= "
        + "|".join(VARIANTS)
    ),
    input_shape=(3, 32, 32),
    num_classes=10,
    default_kwargs={"variant": "baseline", "width": 16, "convs_per_group": 1, "input_size": 32, "num_classes": 10},
))
