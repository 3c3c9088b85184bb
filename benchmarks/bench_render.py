"""Feature visualization: 64 units rendered in one batch vs one at a time, same settings.

Model: zoo:minception (stem, two Inception-style mixed blocks), random weights (seeded;
rendering costs the same whatever the weights), in two input configurations, each measured:
  1x28x28  its native Fashion-MNIST shape (the primary result: the last line's top-level fields)
  3x64x64  colour images at 64 px (`--configs` picks; e.g. --configs 3x64x64)
Layer `mixed2`, units 0-63, channel objectives, Lucid's recipe (Fourier parameterization,
decorrelated colour, sigmoid, pad/jitter/scale/rotate, Adam lr 0.05), `--steps` steps.

Ours: `netanatomy.visualize.render` with all 64 objectives in one batch.
Reference: the same function called once per unit (a batch of one), for `--reference-units`
units (default 8); its time is extrapolated per unit to 64 units (reference_s = per-unit time
x 64). Both run in the same process, reference first, one torch thread by default (a second
thread helps neither side on a shared 2-core machine and makes timings erratic).

Both sides run the engine as it is (on a CPU it lays conv weights, images and conv outputs out
channels-last for the duration of a render, which helps large batches more than a batch of one).

Batching gains what a batch of one wastes (per-call overheads, kernels that run poorly on one
image); it cannot remove arithmetic. On a CPU the gain therefore shrinks as the per-image
work grows (larger images); on a GPU it is far larger.

agree: each image's start and random transforms depend only on (seed, objective, copy), and the
loss is a sum over images, so a unit's batched image is mathematically its one-at-a-time image.
Numerically, batched kernels round differently, and hundreds of Adam steps (which normalize
away the size of tiny gradients) let those differences grow: identical to 1e-7 after 8 steps,
a few hundredths of a pixel value after 64. So agree = every reference unit reaches the same
objective value within 1% batched and alone; max and mean |pixel difference| are reported. On
CUDA, whose cuDNN runs float32 convolutions in TF32 by default (kept: it is what users time),
within 2% or 0.02, the GPU test's rule (docs/methods.md, Scale).

Last stdout line: one JSON object (benchmark, ours_s, reference_s, speedup, agree, configs).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def measure(shape: tuple[int, int, int], units: int, n_ref: int, steps: int, seed: int, device: str) -> dict:
    from netanatomy.models import load_model
    from netanatomy.visualize import channel, render

    channels, size = shape[0], shape[1]
    torch.manual_seed(seed)
    model = load_model("zoo:minception", model_args={"in_channels": channels, "input_size": size},
                       device=device).module
    objectives = [channel("mixed2", u) for u in range(units)]
    render(model, objectives[:2], steps=2, seed=seed, show_progress=False)  # warm-up: layer map, kernels

    started = time.perf_counter()
    singles = [render(model, [obj], steps=steps, seed=seed, show_progress=False) for obj in objectives[:n_ref]]
    ref_time = time.perf_counter() - started
    started = time.perf_counter()
    batched = render(model, objectives, steps=steps, seed=seed, show_progress=False)
    ours_s = time.perf_counter() - started

    ref_per_unit = ref_time / n_ref
    reference_s = ref_per_unit * units
    diff = max(float((s.images[0] - batched.images[i]).abs().max()) for i, s in enumerate(singles))
    mean_diff = max(float((s.images[0] - batched.images[i]).abs().mean()) for i, s in enumerate(singles))
    value_rel = max(abs(float(s.values[0]) - float(batched.values[i])) / max(abs(float(s.values[0])), 1e-6)
                    for i, s in enumerate(singles))
    value_abs = max(abs(float(s.values[0]) - float(batched.values[i])) for i, s in enumerate(singles))
    agree = value_rel < 0.01 or (str(device).startswith("cuda") and (value_rel < 0.02 or value_abs < 0.02))
    name = "x".join(map(str, shape))
    print(f"zoo:minception {name}, layer mixed2, {units} units, {steps} steps")
    print(f"  batched:       {ours_s:7.2f} s = {ours_s / units:.3f} s/unit; {steps / ours_s:.2f} batch steps/s "
          f"= {steps * units / ours_s:.1f} image steps/s")
    print(f"  one at a time: {ref_time:7.2f} s for {n_ref} units = {ref_per_unit:.3f} s/unit "
          f"(x{units} = {reference_s:.2f} s); {steps / ref_per_unit:.1f} image steps/s")
    print(f"  speedup per unit {reference_s / ours_s:.1f}x; batched vs single: max |pixel diff| {diff:.1e} "
          f"(mean {mean_diff:.1e}), max relative objective diff {value_rel:.1e}")
    return {
        "config": name, "ours_s": round(ours_s, 4), "reference_s": round(reference_s, 4),
        "speedup": round(reference_s / ours_s, 2), "agree": bool(agree), "max_abs_diff": diff,
        "mean_abs_diff": mean_diff,
        "max_rel_value_diff": value_rel, "ours_image_steps_per_s": round(steps * units / ours_s, 2),
        "reference_image_steps_per_s": round(steps / ref_per_unit, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 steps, 2 reference units")
    parser.add_argument("--configs", default="1x28x28,3x64x64", help="input shapes CxHxW, comma separated")
    parser.add_argument("--steps", type=int, default=None, help="optimization steps (default 64; quick 8)")
    parser.add_argument("--units", type=int, default=64, help="units rendered in the batch")
    parser.add_argument("--reference-units", type=int, default=None, help="units rendered one at a time (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (8 if args.quick else 64)
    n_ref = args.reference_units or (2 if args.quick else 8)
    shapes = []
    for text in args.configs.split(","):
        c, h, w = (int(v) for v in text.lower().split("x"))
        if h != w:
            parser.error(f"zoo:minception takes square inputs, not {text}")
        shapes.append((c, h, w))
    print(f"{args.threads} torch thread(s), device {args.device}")
    results = [measure(shape, args.units, n_ref, steps, args.seed, args.device) for shape in shapes]
    primary = results[0]
    print(json.dumps({
        "benchmark": "render", "ours_s": primary["ours_s"], "reference_s": primary["reference_s"],
        "speedup": primary["speedup"], "agree": all(r["agree"] for r in results),
        "agree_rule": "objective value of each unit batched == alone (same seed) within 1% "
                      "(on CUDA, TF32: within 2% or 0.02)",
        "primary": primary["config"], "configs": results, "units": args.units, "reference_units": n_ref,
        "reference_extrapolated": True, "steps": steps, "threads": args.threads, "device": args.device,
    }))
    return 0 if all(r["agree"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
