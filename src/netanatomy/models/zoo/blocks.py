"""Parameter-free building blocks shared by the zoo models.

They exist so that the structure netanatomy looks for is visible in a torch.fx trace: a
`Concat` held under a layer's name puts the `torch.cat` of an Inception block inside a module
named after that block, and a `GroupedLRN` marked `netanatomy_transparent` is one opaque
channel-preserving step instead of a reshape-and-normalize sequence.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


class Concat(nn.Module):
    """Concatenate parallel paths along channels; hold it under the joined layer's name."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, parts: Sequence[Tensor]) -> Tensor:
        return torch.cat(list(parts), self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Normalize(nn.Module):
    """(x - mean) / std per channel, with constants kept out of the state dict.

    Zoo models take images in [0, 1] and normalize inside `forward`, so weights trained on
    normalized inputs work on any data set reader without a separate transform. Marked
    transparent: it keeps channels, so the walks that find a first layer pass through it.
    """

    netanatomy_transparent = True

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(tuple(mean), dtype=torch.float32)
        std_t = torch.as_tensor(tuple(std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape:
            raise UsageError(f"mean and std must be sequences of equal length, got {tuple(mean)} and {tuple(std)}")
        if bool((std_t <= 0).any()):
            raise UsageError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def normalizer(
    channels: int,
    mean: Sequence[float] | float | None,
    std: Sequence[float] | float | None,
) -> nn.Module:
    """A `Normalize` for `channels` channels (scalars broadcast), or Identity when both are None."""
    if mean is None and std is None:
        return nn.Identity()
    mean_s = _per_channel(0.0 if mean is None else mean, channels, "mean")
    std_s = _per_channel(1.0 if std is None else std, channels, "std")
    return Normalize(mean_s, std_s)


def default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for 3 channels; their grey-level average for any other count."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.449,) * channels, (0.226,) * channels


def _per_channel(value: Sequence[float] | float, channels: int, what: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * channels
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise UsageError(f"{what} has {len(values)} values but the model has {channels} input channels")
    return values


class GroupedLRN(nn.Module):
    """Local response normalization across channels, separately inside each of `groups` groups.

    AlexNet's two towers lived on two GPUs, so each normalized only its own channels. Same
    formula and zero padding as `nn.LocalResponseNorm`: x / (k + alpha/size * S)^beta, S the sum
    of squares over the `size` neighbouring channels of the same group. S is one 1x1 conv of
    x^2 with a fixed banded block-diagonal matrix, several times faster than pooling over a 5-D
    view. Marked transparent: layer discovery treats it as one channel-preserving step.
    """

    netanatomy_transparent = True

    def __init__(
        self, channels: int, groups: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0,
    ):
        super().__init__()
        if groups < 1 or channels % groups:
            raise UsageError(f"{channels} channels cannot be split into {groups} groups")
        self.channels, self.groups, self.size = channels, groups, size
        self.alpha, self.beta, self.k = alpha, beta, k
        self.register_buffer("window", _lrn_window(channels, groups, size), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        summed = F.conv2d(x * x, self.window)
        return x / (self.k + (self.alpha / self.size) * summed).pow(self.beta)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, size={self.size}, alpha={self.alpha}, " \
               f"beta={self.beta}, k={self.k}"


def _lrn_window(channels: int, groups: int, size: int) -> Tensor:
    """[C, C, 1, 1]: 1 where input channel i is in output channel o's window and group."""
    idx = torch.arange(channels)
    offset = idx.view(1, -1) - idx.view(-1, 1)  # i - o
    in_window = (offset >= -(size // 2)) & (offset <= (size - 1) // 2)
    group = idx // (channels // groups)
    same_group = group.view(-1, 1) == group.view(1, -1)
    return (in_window & same_group).float().view(channels, channels, 1, 1)


class L2Pool(nn.Module):
    """sqrt(mean of squares) over each window: the pooling of the Weight Banding network.

    `eps` keeps the gradient finite where a whole window is zero (common after a ReLU).
    Marked transparent (it keeps channels); its nearest linear map, used for expanded weights,
    is the average pool over the same window.
    """

    netanatomy_transparent = True

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean_sq = F.avg_pool2d(x * x, self.kernel_size, self.stride, self.padding, count_include_pad=False)
        return torch.sqrt(mean_sq + self.eps)

    def netanatomy_linear(self, x: Tensor) -> Tensor:
        """The nearest linear map: at equal inputs, sqrt(mean(x^2)) moves like mean(x)."""
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, count_include_pad=False)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial output size of a conv or pool (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def check_positive(**values: float) -> None:
    """UsageError naming the first argument that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise UsageError(f"{name} must be > 0, got {value!r}")


def init_convs_and_norms(model: nn.Module) -> None:
    """He (fan-out) initialization of every conv and unit-scale, zero-shift batch norms, as
    torchvision's mobile models start."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
