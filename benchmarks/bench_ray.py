"""Ray's overhead here: a render and a lesion sweep on a local 2-worker Ray vs in this process.

Both sides run the same tasks (`netanatomy.scale`), so they give the same results (checked:
`agree` is true when the images and the lesion counts are identical, bit for bit).
- reference: the tasks in this process, one after the other, torch on every core (2 here);
- ours: the same tasks on a local Ray instance with 2 workers (one CPU and one torch thread
  each), started once for both measurements; Ray's start-up is timed and reported apart.

Workloads (`--quick` shrinks them):
- render: zoo:minception-fmnist, layer mixed2, its 80 units in tasks of 16 images, 64 steps;
- lesions: zoo:mlp-fmnist on the bundled test images, 12 weight-graph clusters, 99 random sets
  per sub-cluster (tasks of 256 masks, `specialization.importance.TASK_MASKS`).

Also measured, for the scaling estimate: Ray's cost per task (an empty task's round trip), the
time to put the model in the object store and the first task on a fresh worker (which fetches
it). With T tasks of t seconds each, W workers and per-task cost o, a run takes about
start + ceil(T / W) * (t + o); the printed table evaluates it for W = 1 to 64 from the measured
numbers (on paper: this machine has 2 cores).

Last stdout line: one JSON object (benchmark, ours_s, reference_s, speedup, agree, ...);
speedup = in-process time / Ray time over both workloads (above 1: Ray's two one-thread
workers beat one two-thread process).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch


def _render_workload(quick: bool):
    from netanatomy.models import load_model
    from netanatomy.visualize import channel

    model = load_model("zoo:minception-fmnist").module
    units = 32 if quick else 80   # mixed2 has 80
    return model, [channel("mixed2", u) for u in range(units)], (8 if quick else 64), 16


def _lesion_workload(quick: bool):
    from netanatomy.data import open_dataset
    from netanatomy.models import load_model
    from netanatomy.models.layers import discover_layers
    from netanatomy.specialization.clusters import cluster_model

    loaded = load_model("zoo:mlp-fmnist")
    layer_map = discover_layers(loaded.module, loaded.input_shape)
    clusters = cluster_model(loaded.module, layer_map, k=12, n_shuffles=0, seed=0, n_init=10).clusters
    ds = open_dataset("bundled", "test")
    x, y = ds.tensors(list(range(500 if quick else len(ds))))
    return loaded, layer_map, clusters, x, y, (9 if quick else 99)


def run_render(workload, runner):
    from netanatomy.visualize import render

    model, objectives, steps, batch = workload
    began = time.perf_counter()
    result = render(model, objectives, steps=steps, batch_size=batch, seed=0, show_progress=False, runner=runner)
    return time.perf_counter() - began, result, math.ceil(len(objectives) / batch)


def run_lesions(workload, runner):
    from netanatomy.specialization.importance import TASK_MASKS, importance

    loaded, layer_map, clusters, x, y, n_random = workload
    began = time.perf_counter()
    result = importance(loaded.module, layer_map, clusters, x, y, n_random=n_random, seed=0, num_classes=10,
                        runner=runner)
    masks = sum(len(t.random_drop) + 1 for t in result.tests)
    return time.perf_counter() - began, result, masks, TASK_MASKS


def _noop(context, item):
    return item


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: smaller render and sweep")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs of the local instance)")
    args = parser.parse_args(argv)
    try:
        import ray
    except ImportError:
        print("Ray is not installed (pip install 'netanatomy[ray]'); nothing to measure")
        print(json.dumps({"benchmark": "ray", "ours_s": None, "reference_s": None, "speedup": None,
                          "agree": True, "skipped": "ray not installed"}))
        return 0
    from netanatomy.scale import InProcess, map_tasks
    from netanatomy.scale.ray_backend import RayRunner

    os.environ.setdefault("NETANATOMY_PROGRESS", "0")
    render_work, lesion_work = _render_workload(args.quick), _lesion_workload(args.quick)
    threads = torch.get_num_threads()
    print(f"this process: {threads} torch threads; Ray: {args.workers} workers, 1 CPU and 1 torch thread each")

    r_here, img_here, n_render_tasks = run_render(render_work, InProcess())
    l_here, les_here, masks, task_masks = run_lesions(lesion_work, InProcess())

    began = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    runner = RayRunner(None)
    start_s = time.perf_counter() - began
    try:
        # Ray's own costs: the first task on fresh workers, then empty tasks' round trips
        began = time.perf_counter()
        map_tasks(_noop, list(range(args.workers)), context=render_work[0], runner=runner)
        first_s = time.perf_counter() - began
        n_noop = 50 if args.quick else 200
        began = time.perf_counter()
        map_tasks(_noop, list(range(n_noop)), context=None, runner=runner)
        per_task_s = (time.perf_counter() - began) / n_noop

        r_ray, img_ray, _ = run_render(render_work, runner)
        l_ray, les_ray, _, _ = run_lesions(lesion_work, runner)
    finally:
        ray.shutdown()

    same_images = bool(torch.equal(img_here.images, img_ray.images))
    same_counts = [t.accuracy for t in les_here.tests] == [t.accuracy for t in les_ray.tests] and all(
        np.array_equal(a.random_drop, b.random_drop) for a, b in zip(les_here.tests, les_ray.tests))
    n_lesion_tasks = sum(math.ceil(n / task_masks) for n in _masks_per_layer(les_here))
    print(f"Ray start-up {start_s:.2f} s; first task on {args.workers} fresh workers (model fetched) {first_s:.2f} s; "
          f"an empty task's round trip {per_task_s * 1e3:.2f} ms")
    print(f"render  ({len(render_work[1])} units, {render_work[2]} steps, {n_render_tasks} tasks): in-process "
          f"{r_here:.2f} s, Ray {r_ray:.2f} s -> ratio {r_ray / r_here:.2f} (Ray / in-process); identical images: "
          f"{same_images}")
    print(f"lesions ({masks} masks on {len(lesion_work[3])} images, {n_lesion_tasks} tasks): in-process "
          f"{l_here:.2f} s, Ray {l_ray:.2f} s -> ratio {l_ray / l_here:.2f}; identical counts: {same_counts}")

    # scaling on paper: start + ceil(T / W) * (t + o), t the mean task time on one worker
    print("estimated wall time with W workers (start-up + rounds of tasks; one worker = one core):")
    print(f"{'W':>4} {'render s':>9} {'lesions s':>10}")
    t_render = r_ray * args.workers / n_render_tasks
    t_lesion = l_ray * args.workers / max(n_lesion_tasks, 1)
    table = []
    for w in (1, 2, 4, 8, 16, 64):
        er = start_s + math.ceil(n_render_tasks / w) * (t_render + per_task_s)
        el = start_s + math.ceil(n_lesion_tasks / w) * (t_lesion + per_task_s)
        table.append({"workers": w, "render_s": round(er, 2), "lesions_s": round(el, 2)})
        print(f"{w:>4} {er:>9.2f} {el:>10.2f}")
    print(f"(a render scales until W = its {n_render_tasks} batches, a sweep until W = its {n_lesion_tasks} tasks; "
          "past that, smaller --batch or more random sets make more tasks)")

    ours, ref = r_ray + l_ray, r_here + l_here
    print(json.dumps({
        "benchmark": "ray", "ours_s": round(ours, 3), "reference_s": round(ref, 3), "speedup": round(ref / ours, 3),
        "agree": bool(same_images and same_counts), "workers": args.workers, "torch_threads_in_process": threads,
        "render": {"in_process_s": round(r_here, 3), "ray_s": round(r_ray, 3), "ratio": round(r_ray / r_here, 3),
                   "tasks": n_render_tasks},
        "lesions": {"in_process_s": round(l_here, 3), "ray_s": round(l_ray, 3), "ratio": round(l_ray / l_here, 3),
                    "tasks": n_lesion_tasks, "masks": masks},
        "ray_start_s": round(start_s, 3), "first_task_s": round(first_s, 3),
        "per_task_ms": round(per_task_s * 1e3, 3), "scaling_estimate": table, "quick": args.quick,
    }))
    return 0


def _masks_per_layer(result) -> list[int]:
    per: dict[str, int] = {}
    for t in result.tests:
        per[t.layer] = per.get(t.layer, 0) + len(t.random_drop) + 1
    return list(per.values())


if __name__ == "__main__":
    raise SystemExit(main())
