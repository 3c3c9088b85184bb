"""What a GPU's TF32 convolutions would do to renders and lesion counts, simulated on the CPU.

PyTorch lets cuDNN run float32 convolutions in TF32 (inputs rounded to a 10-bit mantissa, sums
in float32). Here every float32 convolution's input and weight (and, in renders, its gradient)
is rounded so, and the result is set beside plain float32:

- render: 8 units of zoo:minception-fmnist `mixed2`, 16 steps (the GPU test's render): the
  largest objective gap and the mean pixel gap, beside another seed's pixel gap;
- lesions: 200 random masks of `conv1` on 1000 bundled test images, with the float64
  refinement of "sampled" mode: how many (mask, class) counts differ from the float32 ones,
  and how many disagreements the float64 check sample saw.

It is why lesions run under `util.devices.ieee_float32` on CUDA and why the GPU render test
compares pictures only under it (docs/methods.md, Scale).

    python scripts/simulate_tf32.py        # about a minute on 2 cores
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from netanatomy.data import open_dataset
from netanatomy.models import load_model
from netanatomy.models.layers import discover_layers
from netanatomy.specialization.lesion import LesionEvaluator
from netanatomy.visualize import channel, render


def tf32(t: torch.Tensor) -> torch.Tensor:
    """t rounded to TF32's 10-bit mantissa; other dtypes (the float64 twin) untouched."""
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class _Round(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return tf32(x)

    @staticmethod
    def backward(ctx, grad):
        return tf32(grad)


@contextmanager
def tf32_convolutions():
    conv = nn.Conv2d._conv_forward
    nn.Conv2d._conv_forward = lambda self, x, w, b: conv(self, _Round.apply(x), _Round.apply(w), b)
    try:
        yield
    finally:
        nn.Conv2d._conv_forward = conv


def renders() -> None:
    objs = [channel("mixed2", u) for u in range(8)]

    def go(seed: int):
        return render(load_model("zoo:minception-fmnist").module, objs, steps=16, seed=seed, show_progress=False)

    exact, other = go(0), go(1)
    with tf32_convolutions():
        rounded = go(0)
    gap = max(abs(float(a) - float(b)) for a, b in zip(rounded.values, exact.values))
    print(f"render, 8 units of mixed2, 16 steps: objective within {gap:.3f} of float32's; mean pixel gap "
          f"{float((rounded.images - exact.images).abs().mean()):.3f} (another seed: "
          f"{float((other.images - exact.images).abs().mean()):.3f})")


def lesions() -> None:
    loaded = load_model("zoo:minception-fmnist")
    model = loaded.module.eval()
    layer = discover_layers(model, loaded.input_shape).resolve("conv1")
    data = open_dataset("bundled", "test")
    x, y = data.tensors(list(range(min(1000, len(data)))))
    masks = (torch.rand(200, layer.units, generator=torch.Generator().manual_seed(0)) > 0.3).float()

    def counts():
        ev = LesionEvaluator(model, layer, x, y, num_classes=10, refine=True)
        return ev.correct(masks), ev.precision

    exact, _ = counts()
    with tf32_convolutions():
        rounded, precision = counts()
    print(f"lesions, 200 masks of conv1 x {x.shape[0]} images: {int((rounded != exact).sum())} of {exact.numel()} "
          f"(mask, class) counts differ, by {int((rounded - exact).abs().sum())} in all; the float64 check saw "
          f"{precision['disagreements']} disagreements in {precision['checked_rows']} rows")


if __name__ == "__main__":
    os.environ.setdefault("NETANATOMY_PROGRESS", "0")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    renders()
    lesions()
