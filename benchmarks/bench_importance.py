"""Lesion importance: netanatomy's split-and-batch evaluator vs the plain way.

Model: zoo:mlp-fmnist (the bundled Fashion-MNIST MLP 784-256x4-10, trained weights; the random
init of zoo:mlp if the bundled weights are missing). Data: the Fashion-MNIST test set (10,000
images) from /usr/share/datasets/fashion-mnist through netanatomy.data (the bundled sample if
that is missing). Clusters: K=16 spectral clusters of the model's weight graph; every
sub-cluster in a hidden layer (size >= 2, <= 99% of the layer) plus 19 random same-size sets
of its layer, each one lesion (units' outputs set to 0).

Reference (the plain way, as the issue describes it), one lesion at a time: copy the model,
zero the lesioned units' weights and biases, run the whole network on the whole test set
through a standard torch DataLoader over the test Dataset (batches of 256).
Also reported, for transparency: an in-memory reference that skips the data pipeline (the
test set as one tensor, batches of 1000). Against it, what is left is pure arithmetic: most
sub-clusters sit in fc1, whose lesions must still run fc2..fc5 in full, which caps the gain
near 3.5x for this network.
Ours (timed from the Dataset, so loading the test set once is included), as `importance` runs
it: netanatomy.specialization.lesion.LesionEvaluator, one per layer, all of the layer's lesions
at once: the prefix below the layer runs once (in float64, rounded to float32), the linear
layer after it is updated by z - W[:, S] h[S], and the rest runs on masks x examples rows in
the model's float32 with a rigorous per-row error bound; the predictions the bound cannot
certify are recomputed in float64, and 64 certified rows per batch are re-checked in float64
("certified" mixed precision, see specialization/lesion.py).
Threads: both sides run with the same number of torch/BLAS threads, by default all of the
machine's cores (torch's default); `--threads 1` compares one core against one core.
agree: the per-class correct counts of every lesion are identical to both references, which
compute in float64 (in float32, two valid evaluation orders can round a near-tie of two logits
apart, so exact agreement is defined in float64).

Last stdout line: one JSON object (benchmark, ours_s, reference_s, speedup, agree, ...).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import numpy as np
import torch


def lesioned_copy(model: torch.nn.Module, module_name: str, units: np.ndarray) -> torch.nn.Module:
    """The model copied, with the lesioned units' weights and biases set to zero."""
    lesioned = copy.deepcopy(model)
    layer = lesioned.get_submodule(module_name)
    with torch.no_grad():
        layer.weight[torch.as_tensor(units)] = 0.0
        if layer.bias is not None:
            layer.bias[torch.as_tensor(units)] = 0.0
    return lesioned


def plain_reference_counts(model: torch.nn.Module, module_name: str, units: np.ndarray, ds, classes: int,
                           batch: int = 256) -> torch.Tensor:
    """The plain way: copy, zero the weights, DataLoader over the Dataset, whole network."""
    from torch.utils.data import DataLoader

    lesioned = lesioned_copy(model, module_name, units)
    with torch.no_grad():
        correct = torch.zeros(classes, dtype=torch.long)
        for xb, yb in DataLoader(ds, batch_size=batch, shuffle=False):
            right = lesioned(xb.double()).argmax(dim=1) == yb
            correct += torch.bincount(yb[right], minlength=classes)
    return correct


def load(quick: bool):
    from netanatomy.data import open_dataset
    from netanatomy.errors import UsageError
    from netanatomy.models import load_model

    try:
        loaded, model_name = load_model("zoo:mlp-fmnist"), "zoo:mlp-fmnist (bundled trained weights)"
    except UsageError:
        loaded, model_name = load_model("zoo:mlp"), "zoo:mlp (random init, seed 0)"
    limit = 1000 if quick else None
    try:
        ds, data_name = open_dataset("fashion-mnist", "test", limit=limit), "fashion-mnist test"
    except UsageError:
        ds, data_name = open_dataset("bundled", "test", limit=limit), "bundled Fashion-MNIST sample (test)"
    return loaded, model_name, ds, data_name


def reference_counts(model: torch.nn.Module, module_name: str, units: np.ndarray, x: torch.Tensor, y: torch.Tensor,
                     classes: int, batch: int = 1000) -> torch.Tensor:
    lesioned = lesioned_copy(model, module_name, units)
    with torch.no_grad():
        correct = torch.zeros(classes, dtype=torch.long)
        for start in range(0, x.shape[0], batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            right = lesioned(xb).argmax(dim=1) == yb
            correct += torch.bincount(yb[right], minlength=classes)
    return correct


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1000 test images, K=6, 4 random sets")
    parser.add_argument("--k", type=int, default=None, help="clusters (default 16; quick 6)")
    parser.add_argument("--random", type=int, default=None, help="random sets per sub-cluster (default 19; quick 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/BLAS threads for both sides (default: torch's default, all cores, as "
                             "users run it; 1 for the per-core comparison)")
    args = parser.parse_args(argv)
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    import scipy.linalg  # noqa: F401  (load every BLAS before limiting their threads)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    from netanatomy.core.spectral import spectral_clustering
    from netanatomy.models.layers import discover_layers
    from netanatomy.specialization.extract import weight_network
    from netanatomy.specialization.importance import lesionable_layers
    from netanatomy.specialization.lesion import LesionEvaluator
    from netanatomy.specialization.subclusters import Cluster, keep_masks, random_sets, sub_clusters

    k = args.k or (6 if args.quick else 16)
    n_random = args.random or (4 if args.quick else 19)
    loaded, model_name, ds, data_name = load(args.quick)
    model32 = loaded.module.eval()
    model = copy.deepcopy(model32).double().eval()
    classes = int(ds.targets.max()) + 1
    layer_map = discover_layers(model, loaded.input_shape)
    names = {layer.module: layer.name for layer in layer_map.values() if layer.kind in ("conv", "linear")}
    extracted = weight_network(model, loaded.input_shape, layer_names=names)
    graph = extracted.network.graph()
    labels = spectral_clustering(graph, k, seed=args.seed).labels
    clusters = [Cluster(c, tuple(graph.units(np.flatnonzero(labels == c)))) for c in range(k)]
    subs = sub_clusters(clusters, lesionable_layers(layer_map))
    lesions = []  # (layer, units) in evaluation order
    for sub in subs:
        lesions.append((sub.layer, sub.units))
        lesions += [(sub.layer, row) for row in random_sets(sub, n_random, args.seed)]
    print(f"{model_name}, {data_name}: {len(ds)} images, {len(subs)} sub-clusters, {len(lesions)} lesions",
          file=sys.stderr)

    t0 = time.perf_counter()
    x, y = ds.tensors()
    ours: dict[int, torch.Tensor] = {}
    refined = checked = disagreements = 0
    modes = set()
    for layer_name in dict.fromkeys(layer for layer, _ in lesions):
        index = [i for i, (layer, _) in enumerate(lesions) if layer == layer_name]
        layer = layer_map.resolve(layer_name)
        masks = np.concatenate([keep_masks(lesions[i][1][None, :], layer.units) for i in index])
        evaluator = LesionEvaluator(model32, layer, x, y, num_classes=classes, batch_size=2000, refine=True)
        counts = evaluator.correct(torch.from_numpy(masks))
        refined += evaluator.refined_rows
        checked += evaluator.checked_rows
        disagreements += evaluator.disagreements
        modes.add(evaluator.precision_mode)
        ours.update({i: counts[j] for j, i in enumerate(index)})
    ours_s = time.perf_counter() - t0
    print(f"ours: {ours_s:.2f}s ({evaluator.method}, {'/'.join(sorted(modes))}; {refined} of "
          f"{len(lesions) * len(ds)} predictions recomputed in float64, {checked} more checked in float64, "
          f"{disagreements} disagreements)", file=sys.stderr)
    x = x.double()

    t0 = time.perf_counter()
    plain = [plain_reference_counts(model, layer_map.resolve(layer).module, units, ds, classes)
             for layer, units in lesions]
    reference_s = time.perf_counter() - t0
    print(f"reference (plain): {reference_s:.2f}s", file=sys.stderr)

    t0 = time.perf_counter()
    in_memory = [reference_counts(model, layer_map.resolve(layer).module, units, x, y, classes)
                 for layer, units in lesions]
    in_memory_s = time.perf_counter() - t0
    print(f"reference (in memory): {in_memory_s:.2f}s", file=sys.stderr)

    mismatches = [i for i in range(len(lesions))
                  if not (torch.equal(ours[i], plain[i]) and torch.equal(ours[i], in_memory[i]))]
    result = {
        "benchmark": "importance",
        "ours_s": ours_s,
        "reference_s": reference_s,
        "speedup": reference_s / ours_s if ours_s > 0 else None,
        "reference_in_memory_s": in_memory_s,
        "speedup_vs_in_memory": in_memory_s / ours_s if ours_s > 0 else None,
        "agree": not mismatches,
        "mismatched_lesions": len(mismatches),
        "lesions": len(lesions),
        "sub_clusters": len(subs),
        "k": k,
        "random_sets": n_random,
        "model": model_name,
        "data": f"{data_name}, {len(ds)} images",
        "dtype": "ours float32 with float64 prefix, certified by error bounds (uncertified rows in float64); "
                 "references float64",
        "precision": sorted(modes),
        "refined_predictions": refined,
        "checked_predictions": checked,
        "check_disagreements": disagreements,
        "threads": args.threads,
    }
    print(json.dumps(result))
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
