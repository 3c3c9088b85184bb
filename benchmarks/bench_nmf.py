"""NMF weight pictures for every unit of a layer: one batched fit vs scikit-learn once per unit.

Both sides factor the same sign-split weights of every unit (positions x 2*C_in, k = 3) from
the same NNDSVDa start, on one CPU thread each (torch and BLAS threads limited to 1), so the
ratio measures the method, not the thread count. Ours: `nmf` on the whole [units, positions,
2*C_in] batch with its defaults, then the RGB pictures; the reference:
`sklearn.decomposition.NMF(3, init="nndsvda", solver="cd", tol=1e-4, max_iter=200)` fitted on
each unit in a loop, then the same pictures. For information the full per-unit mode of
`factorize_weights` (which adds one shared fit of the layer and the factor alignment) and
the default shared mode are timed too (`per_unit_mode_s`, `shared_mode_s`).

Agreement: our mean relative Frobenius error ||X - LF|| / ||X|| over units must be at most
the reference's times (1 + 0.001), i.e. no worse within 0.1%.
Last stdout line: one JSON object (benchmark, ours_s, reference_s, speedup, agree, errors).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

from netanatomy.core.nmf import factorize_weights, nmf, sign_split
from netanatomy.core.pictures import loadings_to_rgb

TOLERANCE = 1e-3


def planted_layer(units: int, channels: int, k: int, seed: int) -> torch.Tensor:
    """Conv weights with structure like a trained layer: a few spatial patterns mixed sparsely
    over the input channels, plus noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((6, k * k))
    out = np.empty((units, channels, k * k), dtype=np.float32)
    for u in range(units):
        mix = rng.standard_normal((channels, 6)) * (rng.random((channels, 6)) < 0.2)
        out[u] = mix @ patterns + 0.5 * rng.standard_normal((channels, k * k))
    return torch.from_numpy(out.reshape(units, channels, k, k))


def reference(rows: np.ndarray, kernel: int) -> tuple[float, np.ndarray]:
    from sklearn.decomposition import NMF

    errors = np.empty(len(rows))
    loadings = np.empty((len(rows), rows.shape[1], 3), dtype=np.float32)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                  # max_iter warnings
        for u, x in enumerate(rows):
            model = NMF(3, init="nndsvda", solver="cd", tol=1e-4, max_iter=200, random_state=0)
            loadings[u] = model.fit_transform(x)
            errors[u] = np.linalg.norm(x - loadings[u] @ model.components_) / np.linalg.norm(x)
    loadings_to_rgb(loadings.reshape(len(rows), kernel, kernel, 3))
    return time.perf_counter() - start, errors


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 units instead of 1024, for a smoke run")
    parser.add_argument("--units", type=int, default=None)
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument("--kernel", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="ours is timed this many times (best kept)")
    args = parser.parse_args()
    units = args.units or (128 if args.quick else 1024)
    channels = args.channels or 832

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    weights = planted_layer(units, channels, args.kernel, args.seed)
    rows = sign_split(weights).permute(0, 2, 3, 1).reshape(units, args.kernel ** 2, 2 * channels).numpy()
    rows_t = torch.from_numpy(rows)
    k = args.kernel

    def ours():
        fit = nmf(rows_t, 3, seed=args.seed)
        loadings_to_rgb(fit.loadings.reshape(units, k, k, 3))
        return fit

    with threadpool_limits(1):
        nmf(rows_t[:8], 3)                                               # warm-up
        ours_s, fit = timed(ours, args.repeats)
        per_unit_s, _ = timed(lambda: factorize_weights(weights, mode="per_unit", seed=args.seed), 1)
        shared_s, _ = timed(lambda: factorize_weights(weights, seed=args.seed), 1)
        reference_s, ref_errors = reference(rows, k)
    ours_error = float(fit.error.mean())
    ref_error = float(ref_errors.mean())
    result = {
        "benchmark": "nmf",
        "ours_s": round(ours_s, 4),
        "reference_s": round(reference_s, 4),
        "speedup": round(reference_s / ours_s, 2),
        "agree": bool(ours_error <= ref_error * (1 + TOLERANCE)),
        "ours_error": round(ours_error, 6),
        "reference_error": round(ref_error, 6),
        "tolerance": f"ours mean relative error <= reference * (1 + {TOLERANCE})",
        "per_unit_mode_s": round(per_unit_s, 4), "shared_mode_s": round(shared_s, 4),
        "units": units, "channels": channels, "kernel": args.kernel, "n_iter": fit.n_iter,
        "threads": 1,
    }
    print(f"ours {ours_s:.3f} s (error {ours_error:.5f}), scikit-learn per unit {reference_s:.3f} s "
          f"(error {ref_error:.5f}): {reference_s / ours_s:.1f}x")
    print(json.dumps(result))
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
