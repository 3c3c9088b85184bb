"""Spectral clustering with shuffles: netanatomy vs scikit-learn's SpectralClustering.

Graphs: the weight graph of the Fashion-MNIST MLP 784-256x4-10 (zoo:mlp) at PyTorch's default
random initialization (seeded; no training, so the benchmark runs anywhere in seconds), plus
`--shuffles` networks with its weights shuffled within each layer (`layer`). A random-init
graph is the hard case for an eigensolver: its spectrum below the top few eigenvalues is a
dense bulk. `--trained` uses the bundled trained weights (zoo:mlp-fmnist) instead.

Reference: sklearn.cluster.SpectralClustering(K, affinity="precomputed", eigen_solver="arpack",
n_init=25) fitted on each graph's sparse adjacency (building that matrix is not timed).
Ours: netanatomy.core.spectral.spectral_clustering(graph, K, n_init=25) on the same graph.
Both run on the same graphs in the same process, interleaved, so machine load hits both alike.
agree: on every graph, our n-cut <= the reference's n-cut * 1.01.

Last stdout line: one JSON object (benchmark, ours_s, reference_s, speedup, agree, ...).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def mlp_weights(widths: list[int], seed: int) -> list[np.ndarray]:
    """Weights of an MLP 784-widths-10 at PyTorch's default initialization."""
    torch.manual_seed(seed)
    sizes = [784, *widths, 10]
    return [torch.nn.Linear(sizes[i], sizes[i + 1]).weight.detach().double().numpy() for i in range(len(sizes) - 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: MLP 784-128x4-10, true + 1 shuffle")
    parser.add_argument("--shuffles", type=int, default=None, help="shuffled networks (default 5; quick 1)")
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trained", action="store_true",
                        help="use the bundled trained zoo:mlp-fmnist weights instead of the random init")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/OpenMP/torch threads for both sides (1 keeps timings stable on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import scipy.linalg  # noqa: F401  (load every BLAS before limiting their threads)
    import sklearn.cluster  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:

    from sklearn.cluster import SpectralClustering

    from netanatomy.core.clusterability import shuffle_seed, shuffled_graph
    from netanatomy.core.graphs import chain_network
    from netanatomy.core.spectral import ncut, spectral_clustering

    widths = [128] * 4 if args.quick and not args.trained else [256] * 4
    shuffles = args.shuffles if args.shuffles is not None else (1 if args.quick else 5)
    if args.trained:
        from netanatomy.models import load_model

        module = load_model("zoo:mlp-fmnist").module
        weights = [getattr(module, f"fc{i + 1}").weight.detach().double().numpy() for i in range(5)]
        model_name = "zoo:mlp-fmnist (784-256x4-10, bundled trained weights)"
    else:
        weights = mlp_weights(widths, args.seed)
        model_name = f"MLP 784-{'x'.join(map(str, widths))}-10, PyTorch default random init (seed {args.seed})"
    network = chain_network(weights, [f"fc{i + 1}" for i in range(len(widths) + 1)])
    graphs = [("true", network.graph())]
    graphs += [(f"shuffle{i}", shuffled_graph(network, "layer", shuffle_seed(args.seed, i))) for i in range(shuffles)]

    spectral_clustering(graphs[0][1], args.k, seed=args.seed)  # warm-up (imports, BLAS threads)
    ours_s = reference_s = ours_cpu = reference_cpu = 0.0
    rows = []
    for name, graph in graphs:
        c0, t0 = time.process_time(), time.perf_counter()
        ours = spectral_clustering(graph, args.k, seed=args.seed, n_init=25)
        c1, t1 = time.process_time(), time.perf_counter()
        adjacency = graph.adjacency()
        c2, t2 = time.process_time(), time.perf_counter()
        ref = SpectralClustering(args.k, affinity="precomputed", eigen_solver="arpack", n_init=25,
                                 random_state=args.seed).fit(adjacency)
        c3, t3 = time.process_time(), time.perf_counter()
        ref_ncut = ncut(graph, ref.labels_)
        ours_s += t1 - t0
        reference_s += t3 - t2
        ours_cpu += c1 - c0
        reference_cpu += c3 - c2
        rows.append({"graph": name, "ours_s": t1 - t0, "reference_s": t3 - t2, "ours_ncut": ours.ncut,
                     "reference_ncut": ref_ncut, "agree": bool(ours.ncut <= ref_ncut * 1.01)})
        print(f"{name:>10}: ours {t1 - t0:7.3f}s ncut {ours.ncut:.4f} | sklearn {t3 - t2:7.3f}s ncut {ref_ncut:.4f}",
              file=sys.stderr)

    result = {
        "benchmark": "clustering",
        "ours_s": ours_s,
        "reference_s": reference_s,
        "speedup": reference_s / ours_s if ours_s > 0 else None,
        "agree": all(r["agree"] for r in rows),
        "ours_cpu_s": ours_cpu,
        "reference_cpu_s": reference_cpu,
        "cpu_speedup": reference_cpu / ours_cpu if ours_cpu > 0 else None,
        "graphs": len(rows),
        "model": model_name,
        "nodes": graphs[0][1].num_nodes,
        "k": args.k,
        "shuffle": "layer",
        "max_ncut_ratio": max(r["ours_ncut"] / r["reference_ncut"] for r in rows),
        "threads": args.threads,
        "per_graph": rows,
    }
    print(json.dumps(result))
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
