"""Two models on the same inputs: layer similarity (CKA), unit matching with a null, module recurrence.

One pass over the data runs model A, model B and `null_models` copies of B with random weights
on every batch, reduces each layer's units to one value per example (spatial mean by default)
and streams them into `core.cka.CrossMoments` accumulators: one over A's and B's layers
(CKA of every pair, unit correlations of any pair) and one per null model over A's layers and
the null's (the correlations a best match reaches by chance). Memory does not grow with the
number of examples, except for a bounded subsample (`knn_examples`) kept for the mutual k-NN
metric and for showing matched units' top examples.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.cka import CrossMoments, mutual_knn
from ..core.matching import best_matches, counterpart_tests, match_units, module_recurrence
from ..core.streaming import reduce_units
from ..errors import UsageError
from ..models.layers import discover_layers
from ..util.progress import progress
from ..util.seeding import derive

__all__ = ["compare_models", "recurrence_between", "reinitialized"]


def reinitialized(module: nn.Module, seed: int) -> nn.Module:
    """A copy of `module` with every parameter drawn afresh by its layer's own initializer
    (`reset_parameters`; batch norm statistics reset too): the same architecture, no training.
    The draws run on the CPU's generator, so a seed gives the same null model on any device."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    fresh = copy.deepcopy(module).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return fresh.to(device).eval()


def _values(module: nn.Module, layers: Sequence, x: torch.Tensor, stage: str, reduce: str) -> list[np.ndarray]:
    from ..capture.hooks import layer_values

    got = layer_values(module, layers, x, stage=stage)
    return [reduce_units(got[layer.name], reduce).double().cpu().numpy() for layer in layers]


def compare_models(model_a: nn.Module, model_b: nn.Module, layers_a: Sequence[str], layers_b: Sequence[str], data, *,
                   input_shape_a: Sequence[int] | None = None, input_shape_b: Sequence[int] | None = None,
                   pairs: Sequence[tuple[str, str]] | None = None, null_models: int = 3, seed: int = 0,
                   stage: str = "post", reduce: str = "mean", batch_size: int = 64, max_examples: int | None = None,
                   knn_examples: int = 1000, knn_k: int = 10, device: str | torch.device = "cpu",
                   show_progress: bool = True, checkpoint: str | Path | None = None,
                   checkpoint_key: str = "", checkpoint_every: int = 20) -> dict[str, Any]:
    """CKA of every (A layer, B layer), and unit matching of `pairs` (default: the i-th layers
    of A and B when both lists are as long, else each A layer with its most similar B layer by
    debiased CKA), with counterparts tested against `null_models` random-weight copies of B.

    Returns the JSON document of `netanatomy compare` (without figures) and, under "_kept",
    the subsample's per-layer values and data indices (for figures; not JSON).

    With `checkpoint` (a .npz path) the streamed statistics are saved there every
    `checkpoint_every` batches (atomically, arrays only); a later call with the same
    `checkpoint_key` (the caller's hash of every setting) skips the examples already seen and
    goes on from them, so an interrupted pass resumes. The file is removed when the pass ends.
    """
    from ..capture.activations import example_batches
    from ..models.layout import channels_last, prefers_channels_last
    from ..util.devices import resolve_device

    dev = resolve_device(device)
    map_a, map_b = discover_layers(model_a, input_shape_a), discover_layers(model_b, input_shape_b)
    la = [map_a.resolve(n) for n in layers_a]
    lb = [map_b.resolve(n) for n in layers_b]
    if not la or not lb:
        raise UsageError("give at least one layer of each model")
    if null_models < 1:
        raise UsageError("the counterpart test needs at least one null model")
    model_a.eval().to(dev)
    model_b.eval().to(dev)
    nulls = [reinitialized(model_b, derive(seed, "null model", r)).to(dev) for r in range(null_models)]
    dims_a, dims_b = [layer.units for layer in la], [layer.units for layer in lb]
    main = CrossMoments(dims_a + dims_b)
    null_acc = [CrossMoments(dims_a + dims_b) for _ in nulls]
    kept_a: list[list[np.ndarray]] = [[] for _ in la]
    kept_b: list[list[np.ndarray]] = [[] for _ in lb]
    kept_index: list[np.ndarray] = []
    total = len(data) if hasattr(data, "__len__") else None
    if max_examples is not None:
        total = min(total or max_examples, max_examples)
    seen = _restore(checkpoint, checkpoint_key, main, null_acc, kept_a, kept_b, kept_index)
    layouts = [channels_last(m, enabled=prefers_channels_last(m, dev)) for m in (model_a, model_b, *nulls)]
    bar = progress(total=total, initial=seen, desc="compare", unit="ex", disable=None if show_progress else True)
    skip = seen
    try:
        for layout in layouts:
            layout.__enter__()
        with torch.no_grad():
            for batch_no, (x, _, index) in enumerate(example_batches(data, batch_size, max_examples)):
                if skip >= x.shape[0]:          # seen before the checkpoint
                    skip -= x.shape[0]
                    continue
                x, index = x[skip:], index[skip:]
                skip = 0
                x = x.to(dev)
                va, vb = _values(model_a, la, x, stage, reduce), _values(model_b, lb, x, stage, reduce)
                main.update(va + vb)
                for acc, null in zip(null_acc, nulls):
                    acc.update(va + _values(null, lb, x, stage, reduce))
                room = knn_examples - sum(len(i) for i in kept_index)
                if room > 0:
                    for store, values in ((kept_a, va), (kept_b, vb)):
                        for i, v in enumerate(values):
                            store[i].append(v[:room])
                    kept_index.append(index[:room].numpy())
                seen += x.shape[0]
                bar.update(x.shape[0])
                if checkpoint is not None and (batch_no + 1) % checkpoint_every == 0:
                    _save(checkpoint, checkpoint_key, seen, main, null_acc, kept_a, kept_b, kept_index)
    finally:
        bar.close()
        for layout in reversed(layouts):
            layout.__exit__(None, None, None)
    if seen < 4:
        raise UsageError(f"CKA needs at least 4 examples; the data gave {seen}")
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)

    na = len(la)
    sims = main.similarity([(i, na + j) for i in range(na) for j in range(len(lb))])
    ka = [np.concatenate(k) for k in kept_a]
    kb = [np.concatenate(k) for k in kept_b]
    k = min(knn_k, ka[0].shape[0] - 1)
    cka = []
    for i, a in enumerate(la):
        for j, b in enumerate(lb):
            s = sims[(i, na + j)]
            cka.append({"layer_a": a.name, "layer_b": b.name, "linear": s.linear, "debiased": s.debiased,
                        "mutual_knn": mutual_knn(ka[i], kb[j], k=k) if k >= 1 else None})
    chosen = _pairs(pairs, la, lb, cka)
    matching = []
    for a_name, b_name in chosen:
        i = [layer.name for layer in la].index(a_name)
        j = [layer.name for layer in lb].index(b_name)
        matching.append(_match(main, null_acc, i, na + j, a_name, b_name))
    return {
        "examples": seen, "stage": stage, "reduce": reduce, "null_models": null_models, "seed": seed,
        "layers_a": [{"name": layer.name, "units": layer.units} for layer in la],
        "layers_b": [{"name": layer.name, "units": layer.units} for layer in lb],
        "cka": cka, "matching": matching, "knn": {"examples": int(ka[0].shape[0]), "k": k},
        "_kept": {"a": dict(zip([l.name for l in la], ka)), "b": dict(zip([l.name for l in lb], kb)),
                  "index": np.concatenate(kept_index), "moments": main, "offset_b": na},
    }


def _save(path, key: str, seen: int, main: CrossMoments, nulls: Sequence[CrossMoments], kept_a, kept_b,
          kept_index) -> None:
    from ..util.io import atomic_open

    arrays = {"key": np.array(key), "seen": np.array(seen), **main.state("main")}
    for r, acc in enumerate(nulls):
        arrays.update(acc.state(f"null{r}"))
    for side, kept in (("a", kept_a), ("b", kept_b)):
        for i, parts in enumerate(kept):
            arrays[f"kept_{side}{i}"] = np.concatenate(parts) if parts else np.zeros((0, 0))
    arrays["kept_index"] = np.concatenate(kept_index) if kept_index else np.zeros(0, dtype=np.int64)
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _restore(path, key: str, main: CrossMoments, nulls: Sequence[CrossMoments], kept_a, kept_b, kept_index) -> int:
    """Examples already seen according to the checkpoint at `path` (0 if none fits `key`)."""
    if path is None or not Path(path).is_file():
        return 0
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if str(arrays["key"]) != key:
                return 0
            main.restore(arrays, "main")
            for r, acc in enumerate(nulls):
                acc.restore(arrays, f"null{r}")
            for side, kept in (("a", kept_a), ("b", kept_b)):
                for i in range(len(kept)):
                    part = arrays[f"kept_{side}{i}"]
                    kept[i] = [part] if part.size else []
            index = arrays["kept_index"]
            kept_index[:] = [index] if index.size else []
            return int(arrays["seen"])
    except (OSError, KeyError, ValueError):   # unreadable or of other settings: start over
        main.__init__(main.dims)
        for acc in nulls:
            acc.__init__(acc.dims)
        for kept in (kept_a, kept_b):
            kept[:] = [[] for _ in kept]
        kept_index.clear()
        return 0


def _pairs(pairs, la, lb, cka) -> list[tuple[str, str]]:
    names_a, names_b = [l.name for l in la], [l.name for l in lb]
    if pairs is not None:
        out = []
        for a, b in pairs:
            if a not in names_a or b not in names_b:
                raise UsageError(f"matched pair {a}/{b} must name one of the compared layers of each model")
            out.append((a, b))
        return out
    if len(la) == len(lb):
        return list(zip(names_a, names_b))
    out = []
    for a in names_a:
        rows = [c for c in cka if c["layer_a"] == a]
        best = max(rows, key=lambda c: (np.nan_to_num(c["debiased"], nan=-np.inf)))
        out.append((a, best["layer_b"]))
    return out


def _match(main: CrossMoments, nulls: Sequence[CrossMoments], i: int, j: int, a: str, b: str) -> dict[str, Any]:
    r = main.correlation(i, j)
    best_j, best_r = best_matches(r)
    one_to_one = match_units(r)
    null_best, null_mean = [], []
    for acc in nulls:
        rn = acc.correlation(i, j)
        null_best.append(best_matches(rn)[1])
        null_mean.append(match_units(rn).mean_r)
    tests = counterpart_tests(best_r, null_best)
    exceed = int(np.sum(np.asarray(null_mean) >= one_to_one.mean_r))
    return {"layer_a": a, "layer_b": b, "pairs": [[x, y, v] for x, y, v in one_to_one.pairs],
            "mean_matched_r": one_to_one.mean_r, "null_mean_matched_r": [float(v) for v in null_mean],
            "p": (exceed + 1) / (len(nulls) + 1),
            "best": {"unit_b": best_j.tolist(), "r": best_r.tolist(), "p": tests["p"], "q": tests["q"]},
            "counterparts": tests["counterparts"], "counterpart_share": tests["share"], "alpha": tests["alpha"],
            "null_best_r": [x.tolist() for x in null_best], "null_quantiles": tests["null_quantiles"]}


def recurrence_between(main: CrossMoments, offset_b: int, layers_a: Sequence[str], layers_b: Sequence[str],
                       clusters_a, clusters_b, widths_a: dict[str, int], widths_b: dict[str, int], *,
                       permutations: int = 999, seed: int = 0) -> dict[str, Any]:
    """Module recurrence of A's clusters in B's (`core.matching.module_recurrence`) over the
    layers both cluster sets cover, each matched one-to-one by activation correlation.

    `clusters_*` are `specialization.subclusters` clusters (each with `.units`, (layer, unit)
    pairs); a unit in no cluster is labelled -1.
    """
    covered = [l for l in dict.fromkeys(layer for c in clusters_a for layer, _ in c.units if layer != "input")
               if any(layer == l for c in clusters_b for layer, _ in c.units)]
    if not covered:
        raise UsageError("the two cluster files cover no layer in common")
    labels_a, labels_b, matchings = [], [], []
    for layer in covered:
        if layer not in layers_a or layer not in layers_b:
            raise UsageError(f"clustered layer {layer} must be among the compared layers of both models")
        for labels, clusters, widths in ((labels_a, clusters_a, widths_a), (labels_b, clusters_b, widths_b)):
            lab = np.full(widths[layer], -1, dtype=np.int64)
            for cid, c in enumerate(clusters):
                for l, u in c.units:
                    if l == layer:
                        lab[u] = cid
            labels.append(lab)
        i = list(layers_a).index(layer)
        j = offset_b + list(layers_b).index(layer)
        matchings.append(match_units(main.correlation(i, j)).pairs)
    result = module_recurrence(labels_a, labels_b, matchings, permutations=permutations, seed=seed)
    result["layers"] = covered
    return result
