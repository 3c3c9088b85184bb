"""Rendering every unit of InceptionV1's mixed layers at 224 px: the time users compare.

Model: zoo:inceptionv1 (the Circuits layout; random weights unless `--weights` gives Lucent's
inception5h.pth: rendering costs the same whatever the weights). For each mixed layer, `--units`
of its units render in one batch for `--steps` steps at 224 px with Lucid's recipe (Fourier
parameterization, decorrelated colour, transforms, Adam lr 0.05); the measured image-steps
per second of each layer give the estimate for all of its units at 512 steps, and the sum over
mixed3a..mixed5b is `all_units_512_steps_s`, an extrapolation from the sample
(stated in the JSON).

ours: those batches. reference: the same render one image at a time (batch of one), for
`--reference-units` units of mixed4a, extrapolated per unit to the same work.
agree: each reference unit reaches the same objective batched and alone within 1% (on CUDA,
whose cuDNN runs float32 convolutions in TF32 by default: within 2% or 0.02, as the GPU test).

Meant for a GPU (`--device cuda`, as benchmarks/gpu_check.sh runs it); on a CPU use --quick.
Last stdout line: one JSON object (benchmark, ours_s, reference_s, speedup, agree, ...).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from netanatomy.util.devices import synchronize

MIXED = ("mixed3a", "mixed3b", "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e", "mixed5a", "mixed5b")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--units", type=int, default=128, help="units rendered per layer in the sample")
    parser.add_argument("--steps", type=int, default=32, help="steps of the sample")
    parser.add_argument("--reference-units", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--weights", default=None, help="Lucent's inception5h.pth, if you have it")
    parser.add_argument("--quick", action="store_true", help="2 layers, 4 units, 2 steps, 64 px (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.units, args.steps, args.reference_units, args.size = 4, 2, 1, 64
    layers = MIXED[2:4] if args.quick else MIXED

    from netanatomy.models import load_model
    from netanatomy.models.layers import discover_layers
    from netanatomy.visualize import channel, render

    loaded = load_model("zoo:inceptionv1", weights=args.weights, device=args.device)
    model = loaded.module
    layer_map = discover_layers(model, loaded.input_shape)
    render(model, [channel("mixed4a", 0)], steps=2, size=args.size, device=args.device, show_progress=False)
    total_units, per_layer, sample_s = 0, [], 0.0
    for name in layers:
        units = layer_map.resolve(name).units
        n = min(args.units, units)
        objs = [channel(name, u) for u in range(n)]
        synchronize(args.device)
        began = time.perf_counter()
        render(model, objs, steps=args.steps, size=args.size, device=args.device, show_progress=False)
        synchronize(args.device)
        seconds = time.perf_counter() - began
        sample_s += seconds
        rate = n * args.steps / seconds
        full = units * 512 / rate
        total_units += units
        per_layer.append({"layer": name, "units": units, "sampled_units": n, "image_steps_per_s": round(rate, 1),
                          "all_units_512_steps_s": round(full, 1)})
        print(f"{name:<8} {units:>5} units: {rate:9.1f} image-steps/s -> all units, 512 steps: {full:8.1f} s")
    estimate = sum(p["all_units_512_steps_s"] for p in per_layer)
    print(f"every unit of {', '.join(layers)} ({total_units} units), 512 steps, {args.size} px on {args.device}: "
          f"about {estimate:.0f} s ({estimate / 60:.1f} min), extrapolated from {args.units} units x {args.steps} "
          "steps per layer")

    # batched vs one image at a time on mixed4a
    objs = [channel("mixed4a", u) for u in range(args.reference_units)]
    synchronize(args.device)
    began = time.perf_counter()
    singles = [render(model, [o], steps=args.steps, size=args.size, device=args.device, show_progress=False)
               for o in objs]
    synchronize(args.device)
    ref_per_unit = (time.perf_counter() - began) / len(objs)
    batch = min(args.units, layer_map.resolve("mixed4a").units)
    mixed4a = next(p for p in per_layer if p["layer"] == "mixed4a")
    ours_s = batch * args.steps / mixed4a["image_steps_per_s"]
    reference_s = ref_per_unit * batch
    together = render(model, [channel("mixed4a", u) for u in range(batch)], steps=args.steps, size=args.size,
                      device=args.device, show_progress=False)
    rel = max(abs(float(s.values[0]) - float(together.values[i])) / max(abs(float(s.values[0])), 1e-6)
              for i, s in enumerate(singles))
    gap = max(abs(float(s.values[0]) - float(together.values[i])) for i, s in enumerate(singles))
    agree = rel < 0.01 or (str(args.device).startswith("cuda") and (rel < 0.02 or gap < 0.02))
    print(f"mixed4a, {batch} units: batched {ours_s:.2f} s vs one at a time {reference_s:.2f} s "
          f"(extrapolated from {len(objs)}): {reference_s / ours_s:.1f}x; objective batched vs alone within {rel:.1e}")
    print(json.dumps({
        "benchmark": "render_inception", "ours_s": round(ours_s, 3), "reference_s": round(reference_s, 3),
        "speedup": round(reference_s / ours_s, 2), "agree": bool(agree), "device": args.device,
        "size": args.size, "sample_units": args.units, "sample_steps": args.steps, "layers": per_layer,
        "all_units_512_steps_s": round(estimate, 1), "all_units": total_units, "extrapolated": True,
        "weights": args.weights or "random (same cost)", "sample_s": round(sample_s, 2),
        "gpu": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else None,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
