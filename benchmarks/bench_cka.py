"""CKA (linear and debiased) between all pairs of 8 layers of two models on 10 000 examples.

Both sides read the same features: every batch of 256 goes through both models once (timed
apart and printed, not counted on either side) and each layer's units are reduced to their
spatial mean. Ours: `core.cka.CrossMoments`, streamed over those batches: one Gram matrix of all 16 layers'
features side by side (plus the per-example norm terms of the debiased estimator) is
accumulated in float64; the 64 CKA values come from it at the end. Memory: the features
squared, whatever the number of examples.

Reference: the plain full-matrix implementation that holds every activation: each layer's
activations concatenated ([n, units] each), then per pair the
two n x n linear kernels K = X_c X_c^T and L = Y_c Y_c^T, linear CKA = <K, L> / (||K|| ||L||)
and debiased CKA from the unbiased HSIC (Song et al. 2012) written on the kernels (diagonals
zeroed, the three terms), in NumPy float64.

Models: zoo:minception with two seeds (random weights; the numbers are compared, not
interpreted), 8 layers each; data: Fashion-MNIST's 10 000 test images from Debian's package
when installed, else the bundled 2000-image sample. Agreement: every linear and debiased CKA
within 1e-6. Memory: the peak of what each side allocates (tracemalloc; the batches both read
are made before): ours at n / 5 and n examples, the reference at n / 10 and n / 5 (its peak,
the two n x n kernels and their products, grows as n^2).
--quick: 1000 examples (200 for the memory comparison).
Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np
import torch

from netanatomy.capture.hooks import layer_values
from netanatomy.core.cka import CrossMoments
from netanatomy.core.streaming import reduce_units
from netanatomy.models import load_model
from netanatomy.models.layers import discover_layers

LAYERS = ["conv1", "mixed1_1x1", "mixed1_3x3", "mixed1_5x5", "mixed1", "mixed2_3x3", "mixed2", "fc"]
BATCH = 256


def open_data(n: int) -> torch.Tensor:
    from netanatomy.data import open_dataset

    try:
        ds = open_dataset("fashion-mnist", "test")
    except Exception:  # noqa: BLE001 - no Debian package: the bundled sample
        ds = open_dataset("bundled", "test")
    x = ds.tensors()[0]
    return x[:n]


def models():
    out = []
    for seed in (0, 1):
        loaded = load_model("zoo:minception", seed=seed)
        module = loaded.module.eval()
        lm = discover_layers(module, loaded.input_shape)
        out.append((module, [lm.resolve(n) for n in LAYERS]))
    return out


def features(model, layers, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        got = layer_values(model, layers, x, stage="post")
    return [reduce_units(got[l.name], "mean").double().numpy() for l in layers]


def stream(x: torch.Tensor, nets) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Both models' reduced features, batch by batch (computed once: both sides read the same)."""
    (ma, la), (mb, lb) = nets
    return [(features(ma, la, x[i:i + BATCH]), features(mb, lb, x[i:i + BATCH])) for i in range(0, x.shape[0], BATCH)]


def ours(batches) -> dict:
    acc = None
    for va, vb in batches:
        if acc is None:
            acc = CrossMoments([v.shape[1] for v in va + vb])
        acc.update(va + vb)
    n = len(batches[0][0])
    sims = acc.similarity([(i, n + j) for i in range(n) for j in range(n)])
    return {(i, j): (sims[(i, n + j)].linear, sims[(i, n + j)].debiased) for i in range(n) for j in range(n)}


def _hsic_u(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ks, ls = k.sum(axis=1), l.sum(axis=1)
    trace = float(np.sum(k * l))
    return (trace + ks.sum() * ls.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(ks @ ls)) / (n * (n - 3))


def reference(batches) -> dict:
    xa = [np.concatenate([b[0][i] for b in batches]) for i in range(len(batches[0][0]))]
    xb = [np.concatenate([b[1][i] for b in batches]) for i in range(len(batches[0][1]))]
    out = {}
    for i, a in enumerate(xa):
        ac = a - a.mean(axis=0)
        for j, b in enumerate(xb):
            bc = b - b.mean(axis=0)
            k, l = ac @ ac.T, bc @ bc.T
            linear = float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))
            kk, ll = k.copy(), l.copy()
            deb_kl = _hsic_u(k, l)
            deb = deb_kl / np.sqrt(_hsic_u(kk, kk.copy()) * _hsic_u(ll, ll.copy()))
            out[(i, j)] = (linear, float(deb))
    return out


def timed(fn, *args):
    began = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - began


def peak_mb(fn, *args) -> float:
    tracemalloc.start()
    fn(*args)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    n = 1000 if args.quick else 10000
    x_all = open_data(n)
    n = x_all.shape[0]
    nets = models()
    batches, forward_s = timed(stream, x_all, nets)      # the forward passes, common to both sides
    mine, ours_s = timed(ours, batches)
    ref, reference_s = timed(reference, batches)
    diff = max(max(abs(mine[k][0] - ref[k][0]), abs(mine[k][1] - ref[k][1])) for k in ref)
    # peak memory at a fifth and a tenth of the examples and at all of them (the reference's
    # peak at all of them is its n x n kernels: measured at the smaller sizes, where it is quick)
    tenth, fifth = batches[: max(1, len(batches) // 10)], batches[: max(1, len(batches) // 5)]
    size = {k: sum(len(b[0][0]) for b in part) for k, part in (("tenth", tenth), ("fifth", fifth))}
    memory = {"ours_mb": {str(size["fifth"]): peak_mb(ours, fifth), str(n): peak_mb(ours, batches)},
              "reference_mb": {str(size["tenth"]): peak_mb(reference, tenth),
                               str(size["fifth"]): peak_mb(reference, fifth)}}
    print(f"{n} examples, 8 x 8 layer pairs: forward passes (common to both, not in the times) {forward_s:.2f} s; "
          f"ours (streamed) {ours_s:.2f} s, reference (held activations, n x n kernels) {reference_s:.2f} s; "
          f"largest difference {diff:.2e}")
    print(f"peak Python memory: ours {memory['ours_mb']}, reference {memory['reference_mb']} (MB)")
    print(json.dumps({"benchmark": "cka", "examples": n, "pairs": len(ref), "ours_s": ours_s,
                      "reference_s": reference_s, "speedup": reference_s / ours_s, "forward_s": forward_s,
                      "max_difference": diff, "agree": bool(diff <= 1e-6), "memory": memory}))


if __name__ == "__main__":
    main()
