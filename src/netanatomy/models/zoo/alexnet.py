"""The original two-tower AlexNet (Krizhevsky, Sutskever and Hinton, 2012).

The network was split over two GPUs: conv1 and conv2 of one tower cannot see the other tower's
channels until conv3, and conv4 and conv5 are split again. Here that is `groups=2` on conv2,
conv4 and conv5 and a per-tower local response normalization; conv1's first half of channels
feeds only tower 0 and its second half only tower 1 (layer discovery splits conv1 accordingly).
This split is what makes the first layer specialize into black-and-white Gabor filters in one
tower and low-frequency colour in the other (Branch Specialization).

`small=True` keeps the topology but shrinks kernels, strides and widths for 32 to 64 pixel
colour images, so the branch-emergence experiment trains on a CPU; it also pools before the
normalization (CaffeNet's order), which makes the LRN 4x cheaper on the large first map.

`towers=1` is the same network unsplit (no groups anywhere, one LRN over all channels, the same
widths): the control of the branch-emergence experiment, whose conv1 -> conv2 weights show by
their SVD whether the split is latent without branches. `stride1` overrides conv1's stride (2 on
32 px images: a 16 x 16 first map, and everything after it, at about a quarter of the cost of
stride 1).

`conv1_std` draws conv1's weights from N(0, std^2) with zero biases, the paper's initialization
(0.01 for every layer) applied to the first layer alone; None keeps PyTorch's default
(uniform, +-1/sqrt(fan_in): std 0.067 for a 5x5x3 kernel). A short training moves first-layer
weights little, so at the default scale the random draw still dominates the filters; at 0.01
what they show is what was learned.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UsageError
from . import ZooEntry, register
from .blocks import GroupedLRN, check_positive, conv_out, default_stats, normalizer

TOWERS = 2
# Paper's LRN: b = a / (k + alpha * sum of squares over n channels)^beta with k=2, n=5,
# alpha=1e-4, beta=0.75. PyTorch divides alpha by n, so pass alpha * n.
LRN = {"size": 5, "alpha": 1e-4 * 5, "beta": 0.75, "k": 2.0}

FULL = {"channels": (96, 256, 384, 384, 256), "hidden": 4096, "kernel1": 11, "kernel2": 5}
SMALL = {"channels": (64, 128, 192, 192, 128), "hidden": 512, "kernel1": 5, "kernel2": 5}


class AlexNet(nn.Module):
    """Two-tower AlexNet: conv1..conv5 (conv2, conv4, conv5 grouped in 2), fc6..fc8."""

    def __init__(
        self,
        num_classes: int = 1000,
        width: float = 1.0,
        small: bool = False,
        input_size: int | None = None,
        in_channels: int = 3,
        dropout: float = 0.5,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        towers: int = TOWERS,
        stride1: int | None = None,
        conv1_std: float | None = None,
    ):
        super().__init__()
        check_positive(num_classes=num_classes, width=width, in_channels=in_channels)
        if towers not in (1, TOWERS):
            raise UsageError(f"towers must be 1 (unsplit) or {TOWERS}, got {towers}")
        if stride1 is not None and stride1 < 1:
            raise UsageError(f"stride1 must be at least 1, got {stride1}")
        if conv1_std is not None and not conv1_std > 0:
            raise UsageError(f"conv1_std must be positive, got {conv1_std}")
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {dropout}")
        spec = SMALL if small else FULL
        size = int(input_size if input_size is not None else (32 if small else 224))
        if stride1 is None:
            stride1 = (2 if size >= 64 else 1) if small else 4
        pad1 = 2
        # Spatial sizes: conv1, pool1, conv2 (same), pool2, conv3-5 (same), pool5.
        s = conv_out(size, spec["kernel1"], stride1, pad1)
        for _ in range(3):
            s = conv_out(s, 3, 2)
        if s < 1:
            raise UsageError(f"input_size {size} is too small for AlexNet{' (small)' if small else ''}")

        c1, c2, c3, c4, c5 = (TOWERS * max(1, round(c * width / TOWERS)) for c in spec["channels"])
        hidden = max(1, round(spec["hidden"] * width))
        if mean is None and std is None:
            mean, std = default_stats(in_channels)
        self.netanatomy_input_shape = (in_channels, size, size)
        self.netanatomy_aliases: dict[str, str] = {}
        self.towers = towers
        self.pool_before_norm = small

        self.normalize = normalizer(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, c1, spec["kernel1"], stride=stride1, padding=pad1)
        if conv1_std is not None:
            nn.init.normal_(self.conv1.weight, 0.0, conv1_std)
            nn.init.zeros_(self.conv1.bias)
        self.norm1 = GroupedLRN(c1, towers, **LRN)
        self.pool1 = nn.MaxPool2d(3, 2)
        self.conv2 = nn.Conv2d(c1, c2, spec["kernel2"], padding=spec["kernel2"] // 2, groups=towers)
        self.norm2 = GroupedLRN(c2, towers, **LRN)
        self.pool2 = nn.MaxPool2d(3, 2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1, groups=towers)
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1, groups=towers)
        self.pool5 = nn.MaxPool2d(3, 2)
        self.drop6 = nn.Dropout(dropout)
        self.fc6 = nn.Linear(c5 * s * s, hidden)
        self.drop7 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        if self.pool_before_norm:
            x = self.norm1(self.pool1(F.relu(self.conv1(x))))
            x = self.norm2(self.pool2(F.relu(self.conv2(x))))
        else:
            x = self.pool1(self.norm1(F.relu(self.conv1(x))))
            x = self.pool2(self.norm2(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = self.pool5(F.relu(self.conv5(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc6(self.drop6(x)))
        x = F.relu(self.fc7(self.drop7(x)))
        return self.fc8(x)


def alexnet(**kwargs) -> AlexNet:
    """Factory for `zoo:alexnet` (kwargs as `AlexNet`)."""
    return AlexNet(**kwargs)


register(ZooEntry(
    name="alexnet",
    factory=alexnet,
    description=(
        "Original two-tower AlexNet (groups=2 on conv2/4/5, per-tower LRN); small=True for 32-64 px "
        "colour images (branch emergence); towers=1 unsplit, stride1=N conv1's stride, conv1_std=S "
        "conv1's Gaussian init"
    ),
    input_shape=(3, 224, 224),
    num_classes=1000,
    default_kwargs={"num_classes": 1000},
))
