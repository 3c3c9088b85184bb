"""The multilayer perceptron of Filan et al.'s clusterability experiments (784-256x4-10)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UsageError
from . import ZooEntry, register
from .blocks import FASHION_MNIST_MEAN, FASHION_MNIST_STD, normalizer


class MLP(nn.Module):
    """Flatten, then Linear layers `fc1`..`fcN` with ReLU between them (none after the last).

    Inputs are images in [0, 1]; with `normalize` they are standardized with the Fashion-MNIST
    mean and std first, as the published networks were trained.
    """

    def __init__(
        self,
        widths: Sequence[int] = (256, 256, 256, 256),
        num_classes: int = 10,
        in_shape: Sequence[int] = (1, 28, 28),
        normalize: bool = True,
    ):
        super().__init__()
        in_shape = tuple(int(s) for s in in_shape)
        widths = tuple(int(w) for w in widths)
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise UsageError(f"in_shape must be (C, H, W) with positive sizes, got {in_shape}")
        if any(w < 1 for w in widths) or num_classes < 1:
            raise UsageError(f"widths and num_classes must be positive, got {widths} and {num_classes}")
        self.netanatomy_input_shape = in_shape
        self.netanatomy_aliases: dict[str, str] = {}
        channels = in_shape[0]
        self.normalize = (
            normalizer(channels, FASHION_MNIST_MEAN, FASHION_MNIST_STD) if normalize else nn.Identity()
        )
        sizes = (math.prod(in_shape), *widths, num_classes)
        self.depth = len(sizes) - 1
        for i in range(self.depth):
            setattr(self, f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.normalize(x), 1)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.depth:
                x = F.relu(x)
        return x


def mlp(**kwargs) -> MLP:
    """Factory for `zoo:mlp` (kwargs as `MLP`)."""
    return MLP(**kwargs)


register(ZooEntry(
    name="mlp",
    factory=mlp,
    description="MLP 784-256x4-10 of Filan et al. (clusterability), Fashion-MNIST normalization inside",
    input_shape=(1, 28, 28),
    num_classes=10,
    default_kwargs={"widths": (256, 256, 256, 256), "num_classes": 10, "in_shape": (1, 28, 28)},
))
