"""The local-specialization lab: Filan et al.'s clusterability and Hod et al.'s importance and
coherence, reproduced on the Fashion-MNIST MLP (784-256x4-10).

For every seed: train `zoo:mlp` from its seeded initialization (Adam, lr 1e-3, batch 128,
constant rate, no weight decay, 20 epochs: the recipe of Filan et al.'s unpruned MLPs), build
the weight graph, cluster it into K=12 with spectral clustering and compare its n-cut with 50
networks shuffled within each layer (`layer`); lesion every sub-cluster against R random
same-size sets (importance) and score its coherence (dataset, correlation and
feature-visualization based), with Benjamini-Hochberg q-values and Fisher-combined p-values.

Everything lands in OUT/seed_N/: `model.pt` (checkpointed every epoch by the training loop,
so an interrupted run resumes mid-training), `clusters.tasks/` (the shuffled n-cuts so far,
one file each) and one JSON per completed stage (`train`, `clusters`, `importance`, `coherence`), re-used
on the next run when its settings, and those of the stages it builds on, are unchanged
(`netanatomy.labs.stages`). The results table is OUT/results.json and OUT/results.md, one row
per seed beside the published anchor.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..scale import Runner, TaskStore
from ..util.io import read_json, write_json, write_text
from ..util.progress import progress
from .stages import StageResult, fmt, machine_record, quiet, run_stage, with_overrides

MODEL = "zoo:mlp"
NUM_CLASSES = 10
ALPHA = 0.05
COHERENCE_KINDS = ("dataset", "correlation", "visualization")
COHERENCE_TESTS = ("dataset", "correlation", "visualization_entropy", "visualization_objective")

ANCHOR: dict[str, Any] = {
    "source": "Filan et al., Clusterability in Neural Networks: Fashion-MNIST MLP 784-256x4-10, unpruned, "
              "K=12, 50 'layer' shuffles",
    "ncut": [9.86, 9.91],
    "shuffled_mean": [10.06, 10.11],
    "z": [-6.0, -5.0],
    "note": "ranges over the published networks; z about -5 to -6",
}


@dataclass(frozen=True)
class LabSettings:
    """What the lab runs; `QUICK` is a smoke-test version of the default (`FULL`)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    k: int = 12
    shuffles: int = 50
    # 99 random sets: with 19 the smallest p is 1/20 = 0.05, and no test could pass BH at q < 0.05
    n_random: int = 99
    n_init: int = 25
    steps: int = 256   # render steps (feature-visualization coherence)
    top: int = 10      # top inputs (dataset coherence)
    data: str = "fashion-mnist"
    train_limit: int | None = None
    test_limit: int | None = None
    quick: bool = False

    def checked(self) -> LabSettings:
        if not self.seeds:
            raise UsageError("give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"seeds repeat: {','.join(map(str, self.seeds))}")
        if self.epochs < 1:
            raise UsageError(f"epochs must be at least 1, got {self.epochs}")
        if self.k < 2:
            raise UsageError(f"k must be at least 2, got {self.k}")
        if self.shuffles < 0:
            raise UsageError(f"shuffles must be >= 0, got {self.shuffles}")
        if self.n_random < 1:
            raise UsageError(f"need at least 1 random set per sub-cluster, got {self.n_random}")
        if self.steps < 1 or self.n_init < 1 or self.top < 1 or self.batch_size < 1 or not self.lr > 0:
            raise UsageError("steps, n_init, top and batch size must be at least 1, and lr positive")
        return self


FULL = LabSettings()
QUICK = LabSettings(seeds=(0,), epochs=1, k=12, shuffles=5, n_random=4, n_init=5, steps=16, train_limit=3000,
                    test_limit=1000, quick=True)


def train_config(settings: LabSettings, seed: int):
    """The training recipe (Filan et al.'s: Adam 1e-3, batch 128, constant rate) for one seed."""
    from ..training import TrainConfig

    return TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, optimizer="adam", lr=settings.lr,
                       weight_decay=0.0, schedule="none", warmup_epochs=0, seed=seed, channels_last=False)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class LabData:
    """The test split opened up front (every analysis needs it); the train split when asked."""

    spec: str
    test: Any
    train_limit: int | None
    note: str = ""
    _train: Any = None

    @property
    def train(self):
        if self._train is None:
            from ..data import open_dataset

            self._train = open_dataset(self.spec, "train", limit=self.train_limit)
        return self._train


def open_lab_data(settings: LabSettings) -> LabData:
    """Fashion-MNIST (Debian's files); in quick mode only, the bundled sample when they are missing."""
    from ..data import open_dataset

    try:
        test = open_dataset(settings.data, "test", limit=settings.test_limit)
        return LabData(settings.data, test, settings.train_limit)
    except UsageError as exc:
        if not (settings.quick and settings.data == "fashion-mnist"):
            raise
        note = f"{settings.data} is not available ({exc}); --quick used the bundled Fashion-MNIST sample"
        test = open_dataset("bundled", "test", limit=settings.test_limit)
        return LabData("bundled", test, settings.train_limit, note)


# ---------------------------------------------------------------------------------------------
# Stages of one seed


@dataclass
class SeedRun:
    seed: int
    folder: Path
    stages: dict[str, StageResult] = field(default_factory=dict)


def _train_stage(run: SeedRun, settings: LabSettings, data: LabData, device: torch.device, show: bool,
                 log: Callable[[str], None]) -> StageResult:
    from ..models import load_model
    from ..training import train

    cfg = train_config(settings, run.seed)
    weights = run.folder / "model.pt"
    stage_settings = {"model": MODEL, "data": data.spec, "train_limit": settings.train_limit,
                      "test_limit": settings.test_limit, "config": asdict(cfg)}
    marker = run.folder / "model.settings.json"

    def compute() -> dict[str, Any]:
        # resume a checkpoint only if it was made with these settings (else start over)
        resume = read_json(marker) == _plain(stage_settings)
        write_json(marker, stage_settings)
        log(f"seed {run.seed}: training {MODEL} for {settings.epochs} epochs on {len(data.train)} {data.spec} "
            "examples" + (" (resuming)" if resume else ""))
        model = load_model(MODEL, seed=run.seed).module
        result = train(model, data.train, data.test, cfg, weights, device=device, resume=resume,
                       meta={"model": MODEL, "data": data.spec}, num_classes=NUM_CLASSES, show_progress=show)
        return {"test_accuracy": result.test_accuracy, "per_class_accuracy": result.per_class_accuracy,
                "epochs": result.epochs_done, "resumed_from": result.resumed_from, "history": result.history,
                "train_examples": len(data.train), "test_examples": len(data.test)}

    return run_stage(run.folder, "train", stage_settings, compute, requires=[weights])


def _cluster_stage(run: SeedRun, settings: LabSettings, module, layer_map, show: bool,
                   log: Callable[[str], None]) -> StageResult:
    from ..specialization.clusters import cluster_model

    stage_settings = {"after": run.stages["train"].key, "graph": "weights", "k": settings.k,
                      "shuffles": settings.shuffles, "method": "layer", "n_init": settings.n_init, "seed": run.seed}
    # a shuffle's n-cut does not depend on how many there are: a longer run re-uses a shorter one's
    store = TaskStore(run.folder / "clusters.tasks", {k: v for k, v in stage_settings.items() if k != "shuffles"})

    def compute() -> dict[str, Any]:
        done = store.done()
        log(f"seed {run.seed}: clustering (k={settings.k}) and {settings.shuffles} shuffled networks"
            + (f", {done} done before" if done else ""))
        bar = progress(total=settings.shuffles, desc="shuffles", unit="net", disable=None if show else True)
        try:
            result = cluster_model(module, layer_map, graph="weights", k=settings.k, n_shuffles=settings.shuffles,
                                   method="layer", seed=run.seed, n_init=settings.n_init,
                                   store=store, on_result=lambda i, v: bar.update(1))
        finally:
            bar.close()
        return {**result.to_json(), "ncuts": result.result.shuffle.ncuts}

    stage = run_stage(run.folder, "clusters", stage_settings, compute)
    store.clear()
    return stage


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _importance_stage(run: SeedRun, settings: LabSettings, data: LabData, module, layer_map, clusters,
                      device: torch.device, log: Callable[[str], None]) -> StageResult:
    from ..specialization.importance import importance

    stage_settings = {"after": run.stages["clusters"].key, "random": settings.n_random, "seed": run.seed}

    def compute() -> dict[str, Any]:
        log(f"seed {run.seed}: lesions of every sub-cluster and {settings.n_random} random sets each")
        x, y = data.test.tensors()
        result = importance(module, layer_map, clusters, x, y, n_random=settings.n_random, seed=run.seed,
                            num_classes=NUM_CLASSES, device=device)
        return result.to_json()

    return run_stage(run.folder, "importance", stage_settings, compute)


def _coherence_stage(run: SeedRun, settings: LabSettings, data: LabData, module, layer_map, clusters,
                     device: torch.device, show: bool, log: Callable[[str], None]) -> StageResult:
    from ..specialization.coherence import RENDER_LR, coherence, unit_scales
    from ..specialization.extract import activation_values
    from ..specialization.importance import lesionable_layers
    from ..util.io import save_png
    from ..visualize.sheet import contact_sheet

    stage_settings = {"after": run.stages["clusters"].key, "random": settings.n_random, "seed": run.seed,
                      "top": settings.top, "steps": settings.steps, "lr": RENDER_LR, "kinds": list(COHERENCE_KINDS)}
    layers = [name for name in lesionable_layers(layer_map) if any(layer == name for c in clusters
                                                                    for layer, _ in c.units)]

    def compute() -> dict[str, Any]:
        log(f"seed {run.seed}: coherence of every sub-cluster (dataset, correlation, {settings.steps}-step "
            "renders in one batch)")
        values, labels = activation_values(module, layers, data.test, max_examples=None, seed=run.seed,
                                           device=device, show_progress=False)
        scales = unit_scales(module, layers, data.test, max_examples=None, seed=run.seed, device=device)
        result = coherence(values, labels, clusters, n_random=settings.n_random, seed=run.seed, top=settings.top,
                           kinds=COHERENCE_KINDS, num_classes=NUM_CLASSES, model=module, unit_scale=scales,
                           steps=settings.steps, device=device, show_progress=show)
        if result.renderings:
            names = [f"c{c}/{layer}" for c, layer in result.renderings]
            sheet = contact_sheet(torch.stack(list(result.renderings.values())), names, cell=84,
                                  title=f"seed {run.seed}: sub-cluster feature visualizations")
            save_png(sheet, run.folder / "renders.png")
        return result.to_json()

    return run_stage(run.folder, "coherence", stage_settings, compute)


# ---------------------------------------------------------------------------------------------
# The whole lab


def record_data_used(settings: LabSettings, data: LabData, command: str | None) -> tuple[LabSettings, str | None]:
    """The settings and command line as run: when --quick fell back to the bundled sample,
    `data` (and the command's `--data`) name the bundled sample, not the files that were
    missing, so that the recorded command reproduces the results. The note says why."""
    if data.spec == settings.data:
        return settings, command
    if command is not None:
        parts = command.split(" ")
        if "--data" in parts[:-1]:
            parts[parts.index("--data") + 1] = data.spec
        else:
            parts += ["--data", data.spec]
        command = " ".join(parts)
    return replace(settings, data=data.spec), command


def _seed_task(context: tuple[Path, LabSettings, LabData, Any, bool, Callable[[str], None]], seed: int
               ) -> dict[str, Any]:
    """Every stage of one seed (re-using what is stored) and its table row."""
    from ..models import load_model
    from ..models.layers import discover_layers
    from ..specialization.subclusters import clusters_from_json
    from ..util.devices import resolve_device

    out, settings, data, device, show_progress, say = context
    dev = resolve_device(device)
    run = SeedRun(seed, out / f"seed_{seed}")
    run.stages["train"] = _train_stage(run, settings, data, dev, show_progress, say)
    loaded = load_model(MODEL, weights=str(run.folder / "model.pt"), device=dev)
    module = loaded.module
    layer_map = discover_layers(module, loaded.input_shape)
    run.stages["clusters"] = _cluster_stage(run, settings, module, layer_map, show_progress, say)
    clusters = clusters_from_json(run.stages["clusters"].result, f"seed {seed} clusters")
    run.stages["importance"] = _importance_stage(run, settings, data, module, layer_map, clusters, dev, say)
    run.stages["coherence"] = _coherence_stage(run, settings, data, module, layer_map, clusters, dev,
                                               show_progress, say)
    reused = [name for name, s in run.stages.items() if s.reused]
    if reused:
        say(f"seed {seed}: re-used {', '.join(reused)} from {run.folder}")
    return seed_row(seed, run.stages)


def run_specialization(out: str | Path, settings: LabSettings = FULL, *, device: str | torch.device = "cpu",
                       show_progress: bool = True, log: Callable[[str], None] | None = None,
                       command: str | None = None, runner: Runner | None = None) -> dict[str, Any]:
    """Run (or resume) the lab into `out` and return the results document (also written there).

    `command` is the command line to record in the results (the CLI passes its spelled-out form).
    Seeds are tasks on `runner` (default: here, one after the other); elsewhere (Ray) each seed
    runs on one worker and writes its stages into `out`, which the workers must share.
    """
    from ..scale import map_tasks, runs_here
    from ..util.devices import resolve_device

    settings = settings.checked()
    dev = resolve_device(device)
    say = log or quiet
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    data = open_lab_data(settings)
    if data.note:
        say(data.note)
    settings, command = record_data_used(settings, data, command)
    here = runs_here(runner)
    context = (out, settings, data, str(dev), show_progress and here, say if here else quiet)
    rows = map_tasks(_seed_task, list(settings.seeds), context=context, runner=runner)
    doc = {
        "lab": "specialization",
        "command": command,
        "settings": {**asdict(settings), "model": MODEL, "recipe": _recipe(settings)},
        "data": {"spec": data.spec, "test_examples": len(data.test), "note": data.note},
        "anchor": ANCHOR,
        "rows": rows,
        "summary": summary_lines(rows),
        "machine": machine_record(dev, torch.get_num_threads()),
        "wall_s": time.perf_counter() - began,
        "compute_s": sum(sum(r["seconds"].values()) for r in rows),
        "out": str(out),
    }
    write_json(out / "results.json", doc)
    write_text(out / "results.md", results_markdown(doc))
    return doc


def _recipe(settings: LabSettings) -> str:
    return (f"Adam lr {settings.lr:g}, batch {settings.batch_size}, {settings.epochs} epochs, constant rate, no weight "
            f"decay; weight graph, spectral clustering K={settings.k} (k-means with {settings.n_init} restarts), "
            f"{settings.shuffles} 'layer' shuffles; {settings.n_random} random sets per sub-cluster; "
            f"{settings.steps}-step renders")


# ---------------------------------------------------------------------------------------------
# The table (pure functions of stage results)


def _significant(q: Any) -> bool:
    return q is not None and np.isfinite(q) and q < ALPHA


def _at_floor(p: Any, floor: float) -> bool:
    """p is the smallest a percentile test can give: more extreme than every random set."""
    return p is not None and np.isfinite(p) and p <= floor * (1 + 1e-9)


def seed_row(seed: int, stages: dict[str, StageResult]) -> dict[str, Any]:
    """One row of the results table from a seed's stage results (plain JSON values)."""
    train, clusters = stages["train"].result, stages["clusters"].result
    imp, coh = stages["importance"].result, stages["coherence"].result
    shuffle = clusters["shuffle"]
    subs = imp["sub_clusters"]
    tests = coh["tests"]
    coherent = {kind: sum(1 for t in tests if t["kind"] == kind and _significant(t["q"])) for kind in COHERENCE_TESTS}
    per_sub: dict[tuple[int, str], bool] = {}
    for t in tests:
        key = (t["cluster"], t["layer"])
        per_sub[key] = per_sub.get(key, False) or _significant(t["q"])
    floor_imp, floor_coh = 1.0 / (imp["random"] + 1), 1.0 / (coh["random"] + 1)
    beats_all = {"importance_drop": sum(1 for s in subs if _at_floor(s["p_drop"], floor_imp)),
                 "importance_specificity": sum(1 for s in subs if _at_floor(s["p_specificity"], floor_imp))}
    beats_all.update({kind: sum(1 for t in tests if t["kind"] == kind and _at_floor(t["p"], floor_coh))
                      for kind in COHERENCE_TESTS})
    fisher = {"importance_drop": imp["fisher"]["drop"], "importance_specificity": imp["fisher"]["specificity"]}
    fisher.update({f"coherence_{k}": coh["fisher"].get(k) for k in COHERENCE_TESTS})
    return {
        "seed": seed,
        "test_accuracy": train["test_accuracy"],
        "epochs": train["epochs"],
        "ncut": clusters["ncut"],
        "shuffled_mean": shuffle["mean"],
        "shuffled_std": shuffle["std"],
        "z": shuffle["z"],
        "p": shuffle["p"],
        "shuffles": shuffle["n"],
        "k": clusters["k"],
        "isolated": clusters["isolated"],
        "sub_clusters": len(subs),
        "important": sum(1 for s in subs if _significant(s["q_drop"])),
        "class_specific": sum(1 for s in subs if _significant(s["q_specificity"])),
        "coherent": {**coherent, "any": sum(per_sub.values())},
        "beats_all_random": beats_all,
        "fisher": fisher,
        "reused": {name: s.reused for name, s in stages.items()},
        "seconds": {name: s.seconds for name, s in stages.items()},
    }



def summary_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per network: significant sub-clusters after BH (q < 0.05) and Fisher-combined p-values."""
    lines = []
    for r in rows:
        c, f = r["coherent"], r["fisher"]
        lines.append(
            f"seed {r['seed']}: n-cut {fmt(r['ncut'], '.3f')} vs shuffled {fmt(r['shuffled_mean'], '.3f')} "
            f"(z {fmt(r['z'], '.2f')}, p {fmt(r['p'])}); of {r['sub_clusters']} sub-clusters, important "
            f"{r['important']} (class-specific {r['class_specific']}), coherent by dataset {c['dataset']}, "
            f"correlation {c['correlation']}, visualization entropy {c['visualization_entropy']}, objective "
            f"{c['visualization_objective']} (q < {ALPHA}); Fisher p: importance {fmt(f['importance_drop'])}, "
            f"specificity {fmt(f['importance_specificity'])}, dataset {fmt(f['coherence_dataset'])}, "
            f"correlation {fmt(f['coherence_correlation'])}, visualization entropy "
            f"{fmt(f['coherence_visualization_entropy'])}, objective {fmt(f['coherence_visualization_objective'])}")
    return lines


def results_markdown(doc: dict[str, Any]) -> str:
    """The results table as Markdown: one row per seed, the published anchor below."""
    s = doc["settings"]
    a = doc["anchor"]
    lines = [
        "# Local specialization lab: Fashion-MNIST MLP 784-256x4-10",
        "",
        *([f"Command: `{doc['command']}`", ""] if doc.get("command") else []),
        f"Recipe: {s['recipe']}. Data: {doc['data']['spec']} ({doc['data']['test_examples']} test examples)."
        + (f" Note: {doc['data']['note']}." if doc["data"]["note"] else ""),
        f"Compute time of the results: {doc['compute_s']:.0f} s (all stages, whenever they ran); wall time of "
        f"this invocation: {doc['wall_s']:.0f} s, on {doc['machine']['cpus']} CPUs ({doc['machine']['torch_threads']} "
        f"torch threads, {doc['machine']['device']}).",
        "",
        "| seed | test acc. | n-cut | shuffled mean | shuffled std | z | p | sub-clusters | important | "
        "class-specific | coherent: dataset / correlation / vis. entropy / vis. objective |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|",
    ]
    for r in doc["rows"]:
        c = r["coherent"]
        lines.append(
            f"| {r['seed']} | {fmt(r['test_accuracy'], '.4f')} | {fmt(r['ncut'], '.3f')} | "
            f"{fmt(r['shuffled_mean'], '.3f')} | {fmt(r['shuffled_std'], '.3f')} | {fmt(r['z'], '.2f')} | "
            f"{fmt(r['p'], '.3g')} | {r['sub_clusters']} | {r['important']} | {r['class_specific']} | "
            f"{c['dataset']} / {c['correlation']} / {c['visualization_entropy']} / {c['visualization_objective']} |")
    lines.append(f"| anchor | | {a['ncut'][0]:.2f} to {a['ncut'][1]:.2f} | {a['shuffled_mean'][0]:.2f} to "
                 f"{a['shuffled_mean'][1]:.2f} | | about {a['z'][0]:.0f} to {a['z'][1]:.0f} | | | | | |")
    floor = 1 / (s["n_random"] + 1)
    lines += ["", f"Anchor: {a['source']} ({a['note']}).", "",
              f"Counts are sub-clusters significant after Benjamini-Hochberg (q < {ALPHA}) across each network's "
              f"tests; p-values are percentiles against {s['n_random']} random same-size sets (+1 rule), so the "
              f"smallest is {floor:.3g}."
              + (f" With {s['n_random']} random sets no single test can reach q < {ALPHA}: read the Fisher "
                 "p-values and the counts below." if floor >= ALPHA else ""),
              "", f"Sub-clusters more extreme than every random set (p = {floor:.3g}, before correction):", "",
              "| seed | damage | class specificity | dataset | correlation | vis. entropy | vis. objective |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        b = r.get("beats_all_random") or {}
        lines.append(f"| {r['seed']} | " + " | ".join(str(b.get(k, "n/a")) for k in (
            "importance_drop", "importance_specificity", *COHERENCE_TESTS)) + " |")
    lines += ["", "## Per network", ""]
    lines += [f"- {line}" for line in doc["summary"]]
    return "\n".join(lines) + "\n"



__all__ = ["ANCHOR", "FULL", "QUICK", "LabSettings", "open_lab_data", "record_data_used", "results_markdown",
           "run_specialization",
           "seed_row", "summary_lines", "train_config", "with_overrides"]
