"""Banding scores (H, V, index, orientation, permutation p-values) for every layer of InceptionV1.

Ours: `banding_score` on each layer's weights, 999 permutations (p resolution 0.001).
Reference: the straightforward implementation, one kernel at a time in NumPy: each kernel's
row / column / total sums of squares, and for the null the same kernel shuffled by 999 fresh
permutations (vectorized over the permutations of that kernel only), summed into the layer's
null replicates. Both run on one CPU thread (torch and BLAS threads limited to 1).

Weights: the zoo's InceptionV1 (random initialization; pass --weights for trained ones) with
horizontal stripes planted in mixed5b_3x3 and mixed4a_5x5 and vertical stripes in
mixed4e_3x3 and mixed4c_5x5, so that all three orientations occur. --quick scores five
small layers only (the reference is slow: about 0.2 ms per kernel).

Large kernels: a linear layer reading an unpooled 28x28 map is scored on its weights reshaped
to [units, C, 28, 28]; the script also times such a layer ([10, 16, 28, 28], 160 kernels of
784 positions; [10, 4, 28, 28] with --quick) against the same per-kernel reference. Ours
gathers the permuted kernels there (O(positions)); the pairwise tables used for small kernels
took 29 s and 5.4 GB on it at 99 permutations.

Agreement: H and V equal within 1e-9, the same orientation for every layer, and p-values
within 0.05 of each other (Monte Carlo error at 999 permutations is at most about 0.016), or
both at the resolution limit.
Last stdout line: one JSON object (benchmark, ours_s, reference_s, speedup, agree, ...).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from netanatomy.core.banding import banding_score, orientation

N_PERM = 999

# (layer, units, input channels, kernel) of InceptionV1's layers with a spatial kernel, for when
# the zoo is not importable; 1x1 layers are skipped by both sides anyway.
INCEPTION_SHAPES = [
    ("conv2d0", 64, 3, 7), ("conv2d2", 192, 64, 3), ("mixed3a_3x3", 128, 96, 3), ("mixed3a_5x5", 32, 16, 5),
    ("mixed3b_3x3", 192, 128, 3), ("mixed3b_5x5", 96, 32, 5), ("mixed4a_3x3", 204, 96, 3),
    ("mixed4a_5x5", 48, 16, 5), ("mixed4b_3x3", 224, 112, 3), ("mixed4b_5x5", 64, 24, 5),
    ("mixed4c_3x3", 256, 128, 3), ("mixed4c_5x5", 64, 24, 5), ("mixed4d_3x3", 288, 144, 3),
    ("mixed4d_5x5", 64, 32, 5), ("mixed4e_3x3", 320, 160, 3), ("mixed4e_5x5", 128, 32, 5),
    ("mixed5a_3x3", 320, 160, 3), ("mixed5a_5x5", 128, 32, 5), ("mixed5b_3x3", 384, 192, 3),
    ("mixed5b_5x5", 128, 48, 5),
]


def inception_layers(weights: str | None, seed: int) -> dict[str, torch.Tensor]:
    """Every conv layer's weights, by layer name (the zoo model, or random ones of its shapes)."""
    try:
        from netanatomy.models import load_model

        module = load_model("zoo:inceptionv1", weights=weights).module
        layers = {name[: -len("_pre_relu_conv")]: m.weight.detach().clone()
                  for name, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)}
    except ImportError:
        gen = torch.Generator().manual_seed(seed)
        layers = {name: torch.randn(u, c, k, k, generator=gen) for name, u, c, k in INCEPTION_SHAPES}
    gen = torch.Generator().manual_seed(seed)
    for name, turn in (("mixed5b_3x3", 0), ("mixed4a_5x5", 0), ("mixed4e_3x3", 1), ("mixed4c_5x5", 1)):
        w = layers[name]
        scale = float(w.std())
        stripes = torch.randn(w.shape[0], w.shape[1], w.shape[2], 1, generator=gen).expand_as(w) * scale
        layers[name] = w + torch.rot90(stripes, turn, dims=(2, 3))
    return layers


def reference_score(weights: np.ndarray, rng: np.random.Generator) -> dict:
    """One kernel at a time."""
    units, channels, kh, kw = weights.shape
    row_total = col_total = total = 0.0
    null_row = np.zeros(N_PERM)
    null_col = np.zeros(N_PERM)
    for o in range(units):
        for c in range(channels):
            k = weights[o, c]
            centred = k - k.mean()
            row_total += kw * ((centred.mean(axis=1)) ** 2).sum()
            col_total += kh * ((centred.mean(axis=0)) ** 2).sum()
            total += (centred ** 2).sum()
            shuffled = rng.permuted(np.broadcast_to(centred.ravel(), (N_PERM, kh * kw)), axis=1)
            shuffled = shuffled.reshape(N_PERM, kh, kw)
            null_row += kw * (shuffled.mean(axis=2) ** 2).sum(axis=1)
            null_col += kh * (shuffled.mean(axis=1) ** 2).sum(axis=1)
    h, v = row_total / total, col_total / total
    p_h = (np.sum(null_row / total >= h) + 1) / (N_PERM + 1)
    p_v = (np.sum(null_col / total >= v) + 1) / (N_PERM + 1)
    return {"horizontal": h, "vertical": v, "p_horizontal": p_h, "p_vertical": p_v,
            "orientation": orientation(h, v, p_h, p_v, kh, kw)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few layers only, for a smoke run")
    parser.add_argument("--weights", default=None, help="InceptionV1 state dict to score instead of random weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="ours is timed this many times (best kept)")
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    layers = inception_layers(args.weights, args.seed)
    if args.quick:
        keep = ("conv2d0", "mixed3a_5x5", "mixed4a_5x5", "mixed4c_5x5", "mixed5b_pool_reduce")
        layers = {k: v for k, v in layers.items() if k in keep}
    with threadpool_limits(1):
        banding_score(layers[next(iter(layers))], n_permutations=N_PERM)      # warm-up
        ours_s = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours = {name: banding_score(w, n_permutations=N_PERM, seed=args.seed) for name, w in layers.items()}
            ours_s = min(ours_s, time.perf_counter() - start)
        rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        ref = {name: reference_score(w.double().numpy(), rng) for name, w in layers.items()
               if w.shape[-1] * w.shape[-2] > 1}
        reference_s = time.perf_counter() - start

    large_shape = (10, 4, 28, 28) if args.quick else (10, 16, 28, 28)
    large = torch.randn(*large_shape, generator=torch.Generator().manual_seed(args.seed))
    large[:, : large_shape[1] // 2] += torch.randn(large_shape[0], large_shape[1] // 2, 28, 1,
                                                   generator=torch.Generator().manual_seed(args.seed + 1))
    with threadpool_limits(1):
        large_ours_s = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours["large_28x28"] = banding_score(large, n_permutations=N_PERM, seed=args.seed)
            large_ours_s = min(large_ours_s, time.perf_counter() - start)
        start = time.perf_counter()
        ref["large_28x28"] = reference_score(large.double().numpy(), np.random.default_rng(args.seed))
        large_reference_s = time.perf_counter() - start

    agree, rows = True, []
    for name, res in ours.items():
        if res.skipped:
            agree &= name not in ref
            continue
        r = ref[name]
        same_hv = abs(res.horizontal - r["horizontal"]) < 1e-9 and abs(res.vertical - r["vertical"]) < 1e-9
        floor = 1.5 / (N_PERM + 1)
        same_p = all(abs(a - b) <= 0.05 or (a <= floor and b <= floor)
                     for a, b in ((res.p_horizontal, r["p_horizontal"]), (res.p_vertical, r["p_vertical"])))
        same = same_hv and same_p and res.orientation == r["orientation"]
        agree &= same
        rows.append((name, res.horizontal, res.vertical, res.orientation, res.p_value, same))
    for name, h, v, o, p, same in rows:
        print(f"{name:16s} H {h:.3f} V {v:.3f} {o:10s} p {p:.3f} {'' if same else '(differs from reference)'}")
    scored = sum(1 for k, r in ours.items() if not r.skipped and k != "large_28x28")
    kernels = sum(r.n_kernels for k, r in ours.items() if not r.skipped and k != "large_28x28")
    print(f"large kernel {list(large_shape)}: ours {large_ours_s:.3f} s, per-kernel reference "
          f"{large_reference_s:.3f} s: {large_reference_s / large_ours_s:.1f}x")
    print(f"ours {ours_s:.3f} s for {len(ours) - 1} layers ({scored} scored, {kernels} kernels), "
          f"per-kernel reference {reference_s:.3f} s: {reference_s / ours_s:.1f}x")
    print(json.dumps({
        "benchmark": "banding",
        "ours_s": round(ours_s, 4),
        "reference_s": round(reference_s, 4),
        "speedup": round(reference_s / ours_s, 2),
        "agree": bool(agree),
        "large_kernel": {"shape": list(large_shape), "ours_s": round(large_ours_s, 4),
                         "reference_s": round(large_reference_s, 4),
                         "speedup": round(large_reference_s / large_ours_s, 2)},
        "layers": len(ours) - 1, "scored_layers": scored, "kernels": kernels, "permutations": N_PERM,
        "orientations": {o: sum(1 for k, r in ours.items() if r.orientation == o and k != "large_28x28") for o in ("horizontal", "vertical", "none")},
        "tolerance": "H, V within 1e-9; same orientation; p within 0.05 or both at the resolution limit",
        "threads": 1,
    }))
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
