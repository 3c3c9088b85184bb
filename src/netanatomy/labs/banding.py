"""The weight-banding lab (Petrov et al., Distill 2021): which choices make the last conv layer band.

The study trained a simplified network (`zoo:bandingnet`: six groups of 3x3 conv + batch norm
separated by L2 pooling, global average pooling, one linear layer) on ImageNet, and one copy
per intervention (`VARIANTS`). It found horizontal bands in the last conv layer of the
baseline, vertical bands when the inputs are rotated 90 degrees, none without global average
pooling, and bands under every other intervention.

For every data set, variant and seed this lab trains the network and measures, from its
weights alone:
- the banding score (methods.md#banding) of the last three conv layers, `g4.conv1` to
  `g6.conv1`, and of a head that reads the unpooled map (`no_gap`'s `fc`, `split16`'s 16
  heads): H, V, index H - V, orientation, p against position permutations inside each kernel,
  the effective number of kernels that carry the energy and the unweighted share with H > V;
- the test accuracy;
- NMF weight pictures of the last conv layer (unit numbers, colour key).
Across seeds it reports, per data set and variant, the mean and spread of H, V and the index,
how many seeds band which way, and whether that agrees with the article (`ANCHOR`).

Every (data set, variant, seed) is one task with its own folder OUT/DATA/VARIANT/seed_N/:
`model.pt` (checkpointed every epoch: an interrupted task resumes mid-training),
`train.json` and `measure.json` (stage results re-used when their settings are unchanged) and
`weights.png`. Tasks are independent, so `jobs` of them run at once in separate processes
(or on Ray workers, `scale`), each on one torch thread; a task's numbers do not depend on
where or with what it ran. The table is OUT/results.json and OUT/results.md, with
OUT/banding_index.png.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError, suggest
from ..models.zoo.bandingnet import VARIANTS
from ..scale import Runner
from ..util.figures import pyplot
from ..util.io import file_stem, save_figure, write_json, write_text
from .stages import StageResult, fmt, machine_record, quiet, run_stage, train_stage, with_overrides

MODEL = "zoo:bandingnet"
SCORED_GROUPS = (4, 5, 6)           # the last three conv groups (the study's 4?, 5a, 5b)
HEADS = {"no_gap": "fc", "split16": "split"}  # heads that read every position of the last map
ALPHA = 0.01                        # the banding score's own default (core.banding)

# What the article reports for each variant: the orientation expected in the scored layer.
ANCHOR: dict[str, dict[str, str]] = {
    "baseline": {"expect": "horizontal", "layer": "last",
                 "article": "horizontal bands in the last conv layer (often the two before too)"},
    "rotate": {"expect": "vertical", "layer": "last", "article": "vertical bands instead of horizontal"},
    "no_gap": {"expect": "none", "layer": "last",
               "article": "no banding (49x the parameters in the linear layer; overfit)"},
    "xpool": {"expect": "horizontal", "layer": "previous",
              "article": "bands in 5a, like the baseline's 5b; 'surprising' (our reading of the seed text)"},
    **{v: {"expect": "horizontal", "layer": "last", "article": "banding persisted"}
       for v in ("masks3", "masks5", "masks16", "attention", "mask7x7", "coordconv", "split16", "maxpool4096")},
}
SOURCE = ("Petrov, Voss, Schubert, Cammarata, Goh, Olah: Weight Banding, Distill 2021 (simplified net trained "
          "on ImageNet at 224 px, 90 epochs, 512 channels in the last 7x7 map, 1001 classes)")


@dataclass(frozen=True)
class BandingSettings:
    """What the lab runs; `QUICK` is a smoke-test version of the default (`FULL`).

    The network is the study's, scaled to a CPU: `width` 16 gives 16, 32, 64, 64, 128, 128
    channels (the study: 64 to 512), at `size` 28 px the last map is 7 x 7 as in the study
    (two stride-2 L2 pools, then stride-1 ones), one conv per group, and `hidden` units in
    maxpool4096's hidden layer. Each data spec is read at `size` px, at most `train_examples`
    and `test_examples` items (photos: as many patches are cut).
    """

    variants: tuple[str, ...] = VARIANTS
    seeds: tuple[int, ...] = (0, 1, 2)
    data: tuple[str, ...] = ("fashion-mnist", "photos")
    epochs: int = 5
    train_examples: int = 20000
    test_examples: int = 2000
    size: int = 28
    width: int = 16
    hidden: int = 4096
    batch_size: int = 128
    lr: float = 3e-3
    permutations: int = 999
    quick: bool = False

    def checked(self) -> BandingSettings:
        for name, values in (("variants", self.variants), ("seeds", self.seeds), ("data sets", self.data)):
            if not values:
                raise UsageError(f"give at least one of the {name}")
            if len(set(values)) != len(values):
                raise UsageError(f"{name} repeat: {','.join(map(str, values))}")
        for v in self.variants:
            if v not in VARIANTS:
                raise UsageError(f"unknown variant {v!r}{suggest(v, VARIANTS)}; known: {', '.join(VARIANTS)}")
        if min(self.epochs, self.train_examples, self.test_examples, self.batch_size, self.permutations,
               self.width, self.hidden) < 1:
            raise UsageError("epochs, examples, batch size, permutations, width and hidden must be at least 1")
        if self.size < 8:
            raise UsageError(f"images must be at least 8 px for the network, got {self.size}")
        if "split16" in self.variants and (self.width * 8) % 16:
            raise UsageError(f"split16 needs the last map's channels (8 x width = {self.width * 8}) divisible by 16")
        if not self.lr > 0:
            raise UsageError(f"lr must be positive, got {self.lr}")
        return self


FULL = BandingSettings()
QUICK = BandingSettings(seeds=(0,), data=("bundled",), epochs=1, train_examples=1600, test_examples=400, width=4,
                        hidden=256, batch_size=64, permutations=99, quick=True)


def model_args(settings: BandingSettings, variant: str, channels: int, classes: int) -> dict[str, Any]:
    """`zoo:bandingnet` arguments of a variant (also what a user passes as --model-arg to re-load it)."""
    args: dict[str, Any] = {"variant": variant, "width": settings.width, "in_channels": channels,
                            "input_size": settings.size, "num_classes": classes}
    if variant == "maxpool4096":
        args["hidden"] = settings.hidden
    return args


def train_config(settings: BandingSettings, seed: int):
    """Adam, linear warm-up over 0.2 epochs then cosine decay, no augmentation (flips or shifts
    would blur what position means to the last layer)."""
    from ..training import TrainConfig

    return TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, optimizer="adam", lr=settings.lr,
                       schedule="cosine", seed=seed, channels_last=True)


def recipe(settings: BandingSettings) -> str:
    return (f"Adam lr {settings.lr:g} (warm-up 0.2 epochs, cosine decay), batch {settings.batch_size}, "
            f"{settings.epochs} epochs, no augmentation; width {settings.width} (last map "
            f"{8 * settings.width} channels), {settings.size} px inputs; maxpool4096 hidden layer {settings.hidden} "
            f"units; {settings.permutations} position permutations per banding p-value")


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class LabData:
    """One data set's splits as used (the same for every variant and seed)."""

    spec: str
    train: Any
    test: Any
    classes: int

    @property
    def channels(self) -> int:
        return int(self.train.image_shape[0])


def data_folder(spec: str) -> str:
    """The folder name of a data spec's results."""
    return file_stem(spec.replace("?", "_").replace("=", "-").replace(":", "_"))


def open_lab_data(spec: str, settings: BandingSettings) -> LabData:
    """Both splits of `spec` at the lab's size, refused (UsageError) unless labelled, 2+ classes."""
    from .lab_data import class_count, open_split

    train = open_split(spec, "train", size=settings.size, examples=settings.train_examples, lab="banding")
    test = open_split(spec, "test", size=settings.size, examples=settings.test_examples, lab="banding")
    classes = class_count(train)
    if classes < 2:
        raise UsageError(f"data {spec!r} has one class: nothing to learn")
    return LabData(spec, train, test, classes)


@lru_cache(maxsize=4)
def _cached_data(spec: str, settings: BandingSettings) -> LabData:
    """A worker process opens each data set once, for all the tasks it runs."""
    return open_lab_data(spec, settings)


# ---------------------------------------------------------------------------------------------
# Measurements (pure functions of a trained module)


def scored_layers(module: torch.nn.Module, variant: str) -> tuple[list[str], str | None]:
    """The last three conv layers (in order) and the head that reads the unpooled map, if any."""
    n = module.g6.n
    return [f"g{g}.conv{n}" for g in SCORED_GROUPS], HEADS.get(variant)


_KEPT = ("horizontal", "vertical", "index", "orientation", "p_value", "p_horizontal", "p_vertical", "expected_h",
         "expected_v", "effective_kernels", "share_h_over_v", "mean_h", "mean_v", "n_kernels", "kernel", "skipped",
         "axis")


def direction(record: dict[str, Any], alpha: float = ALPHA) -> str:
    """Which way a layer bands by the axis test (core.banding.axis_test): 'horizontal' when
    H - V > 0 at p <= alpha against unit transposes, 'vertical' when H - V < 0, else 'none'.

    Why beside `orientation`: the orientation rule also asks the excess over chance to differ
    by 0.1 (clear, strong bands, as in the article's ImageNet nets); a small net trained for
    minutes bands more weakly, and the axis test says whether the preference is there at all.
    """
    axis = record.get("axis") or {}
    if axis.get("p") is None or axis["p"] > alpha:
        return "none"
    return "horizontal" if axis["index"] > 0 else "vertical"


def measure(module: torch.nn.Module, variant: str, *, permutations: int, seed: int, layer_map=None) -> dict[str, Any]:
    """Banding records of the scored layers and the head (see `scored_layers`)."""
    from ..anatomy.banding import model_banding

    layer_map = layer_map or _layer_map(module)
    layers, head = scored_layers(module, variant)
    records = model_banding(module, layer_map, layers + ([head] if head else []), n_permutations=permutations,
                            seed=seed, alpha=ALPHA, show_progress=False)
    by_name = {r["layer"]: {**{k: r.get(k) for k in _KEPT}, "direction": direction(r)} for r in records}
    return {"layers": {name: by_name[name] for name in layers}, "last": layers[-1],
            "head": {"layer": head, **by_name[head]} if head else None}


def _layer_map(module: torch.nn.Module):
    from ..models.layers import discover_layers

    return discover_layers(module, module.netanatomy_input_shape)


def weights_picture(module: torch.nn.Module, layer: str, record: dict[str, Any], caption: str, seed: int,
                    layer_map=None) -> Any:
    """NMF weight pictures of `layer`, titled with its banding record (as `measure` gives it)."""
    from ..anatomy import layer_pictures, layer_weights
    from ..anatomy.plots import weights_figure

    lw = layer_weights(module, layer_map or _layer_map(module), layer)
    pics = layer_pictures(lw.weights, seed=seed)
    axis = record.get("axis") or {}
    note = (f"{caption}\nH {record['horizontal']:.3f}, V {record['vertical']:.3f} (chance {record['expected_h']:.3f} "
            f"each); H - V {fmt(record['index'], '+.3f')}, axis test p {fmt(axis.get('p'), '.2g')}: "
            f"{record['direction']}; orientation rule: {record['orientation']}")
    return weights_figure(pics, layer, note=note)


# ---------------------------------------------------------------------------------------------
# One task: train and measure one variant on one data set with one seed


@dataclass(frozen=True)
class Task:
    data: str
    variant: str
    seed: int

    def folder(self, out: Path) -> Path:
        return out / data_folder(self.data) / self.variant / f"seed_{self.seed}"

    @property
    def what(self) -> str:
        return f"{self.data} {self.variant} seed {self.seed}"


def tasks_of(settings: BandingSettings) -> list[Task]:
    """Every task, data set by data set, seed by seed, variant by variant (so a partial run has
    every variant of the first seed before the second seed)."""
    return [Task(d, v, s) for d in settings.data for s in settings.seeds for v in settings.variants]


def run_task(out: str | Path, task: Task, settings: BandingSettings, *, device: str = "cpu",
             show_progress: bool = False, log: Callable[[str], None] | None = None,
             data: LabData | None = None) -> dict[str, Any]:
    """Train and measure one task (re-using what is stored), and return its table row.

    Runs torch on one thread (two threads on two shared cores wait for each other at every op
    of these small maps), and gives the caller's thread count back.
    """
    from ..util.devices import one_thread, resolve_device

    say = log or quiet
    out = Path(out)
    data = data or _cached_data(task.data, settings)
    dev = resolve_device(device)
    folder = task.folder(out)
    with one_thread():
        args = model_args(settings, task.variant, data.channels, data.classes)
        trained = train_stage(folder, model=MODEL, model_args=args, seed=task.seed, data=data,
                              config=train_config(settings, task.seed), device=dev, show_progress=show_progress,
                              log=say, what=task.what, extra={"size": settings.size})
        measured = _measure_stage(folder, task, settings, trained, say)
    return task_row(task, trained, measured)


def _measure_stage(folder: Path, task: Task, settings: BandingSettings, trained: StageResult,
                   log: Callable[[str], None]) -> StageResult:
    picture = folder / "weights.png"
    stage_settings = {"after": trained.key, "permutations": settings.permutations, "seed": task.seed, "figure": 2}

    def compute() -> dict[str, Any]:
        from ..models import load_model

        log(f"{task.what}: banding of the last three conv layers")
        module = load_model(MODEL, weights=str(folder / "model.pt"), model_args=trained.result["model_args"]).module
        layer_map = _layer_map(module)
        result = measure(module, task.variant, permutations=settings.permutations, seed=task.seed,
                         layer_map=layer_map)
        last = result["last"]
        fig = weights_picture(module, last, result["layers"][last],
                              f"{task.data}, {task.variant}, seed {task.seed}, test accuracy "
                              f"{fmt(trained.result['test_accuracy'], '.3f')}", task.seed, layer_map=layer_map)
        try:
            save_figure(fig, picture, dpi=100, bbox_inches="tight")
        finally:
            pyplot().close(fig)
        return result

    return run_stage(folder, "measure", stage_settings, compute, requires=[picture])


def task_row(task: Task, trained: StageResult, measured: StageResult) -> dict[str, Any]:
    """One row of the results table (plain JSON values)."""
    m = measured.result
    history = trained.result.get("history") or [{}]
    return {"data": task.data, "variant": task.variant, "seed": task.seed,
            "test_accuracy": trained.result["test_accuracy"], "train_accuracy": history[-1].get("train_accuracy"),
            "train_loss": history[-1].get("train_loss"),
            "layers": m["layers"], "last": m["last"], "head": m["head"],
            "picture": f"{data_folder(task.data)}/{task.variant}/seed_{task.seed}/weights.png",
            "reused": {"train": trained.reused, "measure": measured.reused},
            "seconds": {"train": trained.seconds, "measure": measured.seconds}}


# ---------------------------------------------------------------------------------------------
# The whole lab


def _lab_task(context: tuple[str, BandingSettings, str, dict[str, LabData], bool, Callable[[str], None]],
              task: Task) -> dict[str, Any]:
    out, settings, device, data, show_progress, log = context
    return run_task(out, task, settings, device=device, show_progress=show_progress, log=log, data=data[task.data])


def run_banding(out: str | Path, settings: BandingSettings = FULL, *, device: str = "cpu", jobs: int = 1,
                show_progress: bool = True, log: Callable[[str], None] | None = None, command: str | None = None,
                data: dict[str, LabData] | None = None, runner: Runner | None = None) -> dict[str, Any]:
    """Run (or resume) the lab into `out` and return the results document (also written there).

    `jobs` > 1 runs that many tasks at once in worker processes; `runner` (Ray) runs them there
    instead, each worker writing its networks into `out`, which the workers must share. `data`
    maps a spec to its opened splits when the caller has opened them to check them first.
    """
    from ..scale import make_runner, map_tasks, runs_here
    from ..util.progress import progress

    settings = settings.checked()
    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, got {jobs}")
    say = log or quiet
    began = time.perf_counter()
    data = dict(data or {})
    for spec in settings.data:
        if spec not in data:
            data[spec] = open_lab_data(spec, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = tasks_of(settings)
    bar = progress(total=len(tasks), desc="lab banding", unit="net", disable=None if show_progress else True)
    runner = runner or make_runner(jobs=jobs)
    here = runs_here(runner)   # bars and log lines only from this process
    context = (str(out), settings, str(device), data, show_progress and here, say if here else quiet)
    try:
        ordered = map_tasks(_lab_task, tasks, context=context, runner=runner, on_result=lambda t, r: bar.update(1))
    finally:
        bar.close()
    reused = sum(1 for r in ordered if r["reused"]["train"] and r["reused"]["measure"])
    if reused:
        say(f"re-used {reused} of {len(ordered)} finished networks from {out}")
    doc = {
        "lab": "banding",
        "command": command,
        "settings": {**asdict(settings), "model": MODEL, "recipe": recipe(settings)},
        "data": {spec: {"train_examples": len(d.train), "test_examples": len(d.test), "classes": d.classes,
                        "channels": d.channels, "folder": data_folder(spec)} for spec, d in data.items()},
        "anchor": {"source": SOURCE, "variants": ANCHOR},
        "rows": ordered,
        "variants": summarize(ordered, settings),
        "machine": machine_record(device, 1),
        "jobs": jobs,
        "runner": runner.name,
        "wall_s": time.perf_counter() - began,
        "compute_s": sum(sum(r["seconds"].values()) for r in ordered),
        "out": str(out),
    }
    doc["summary"] = summary_lines(doc)
    _save_index_figure(doc, out / "banding_index.png")
    write_json(out / "results.json", doc)
    write_text(out / "results.md", results_markdown(doc))
    return doc


# ---------------------------------------------------------------------------------------------
# Across seeds (pure functions of rows)


def _stats(values: Sequence[float | None]) -> dict[str, float | None]:
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "sd": None}
    return {"mean": float(np.mean(xs)), "sd": float(np.std(xs, ddof=1)) if len(xs) > 1 else None}


def expected_layer(variant: str, layers: Sequence[str]) -> str:
    """The layer whose orientation the article's finding for `variant` is about."""
    return layers[-2] if ANCHOR[variant]["layer"] == "previous" else layers[-1]


def summarize(rows: Sequence[dict[str, Any]], settings: BandingSettings) -> list[dict[str, Any]]:
    """Per data set and variant: H, V and index of every scored layer over seeds, orientation
    counts, accuracy, and agreement with the article (a majority of seeds with the expected
    orientation in the layer the finding is about)."""
    out = []
    for spec in settings.data:
        for variant in settings.variants:
            mine = [r for r in rows if r["data"] == spec and r["variant"] == variant]
            if not mine:
                continue
            layers = list(mine[0]["layers"])
            per_layer = {}
            for name in layers:
                recs = [r["layers"][name] for r in mine]
                per_layer[name] = {
                    "horizontal": _stats([x["horizontal"] for x in recs]),
                    "vertical": _stats([x["vertical"] for x in recs]),
                    "index": _stats([x["index"] for x in recs]),
                    "effective_kernels": _stats([x["effective_kernels"] for x in recs]),
                    "share_h_over_v": _stats([x["share_h_over_v"] for x in recs]),
                    "orientations": [x["orientation"] for x in recs],
                    "directions": [x["direction"] for x in recs],
                }
            target = expected_layer(variant, layers)
            expect = ANCHOR[variant]["expect"]
            matching = sum(1 for o in per_layer[target]["directions"] if o == expect)
            heads = [r["head"] for r in mine if r["head"]]
            out.append({
                "data": spec, "variant": variant, "seeds": [r["seed"] for r in mine],
                "test_accuracy": _stats([r["test_accuracy"] for r in mine]),
                "train_accuracy": _stats([r.get("train_accuracy") for r in mine]),
                "layers": per_layer, "last": layers[-1], "target_layer": target, "expect": expect,
                "matching_seeds": matching, "agrees": matching * 2 > len(mine),
                "head": {"layer": heads[0]["layer"], "index": _stats([h["index"] for h in heads]),
                         "directions": [h["direction"] for h in heads]} if heads else None,
            })
    return out


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """Per data set: which variants agree with the article, and the baseline vs rotate contrast."""
    lines = []
    for spec in doc["settings"]["data"]:
        mine = [v for v in doc["variants"] if v["data"] == spec]
        agree = [v["variant"] for v in mine if v["agrees"]]
        differ = [v["variant"] for v in mine if not v["agrees"]]
        lines.append(f"{spec}: agrees with the article in {len(agree)} of {len(mine)} variants"
                     + (f"; differs in {', '.join(differ)}" if differ else ""))
        for v in mine:
            last = v["layers"][v["last"]]
            lines.append(f"{spec} {v['variant']}: last conv H - V {fmt(last['index']['mean'], '+.3f')} "
                         f"(sd {fmt(last['index']['sd'], '.3f')}), axis test {', '.join(last['directions'])}, orientation rule "
                         f"{', '.join(last['orientations'])}; "
                         f"article: {v['expect']} in the {'previous' if v['target_layer'] != v['last'] else 'last'} "
                         "layer")
    return lines


# ---------------------------------------------------------------------------------------------
# Figures and the page


ORIENTATION_COLOURS = {"horizontal": "tab:blue", "vertical": "tab:orange", "none": "tab:grey"}


def index_figure(doc: dict[str, Any]) -> Any:
    """The last conv layer's H - V of every seed, per variant, one panel per data set."""
    plt = pyplot()
    specs = doc["settings"]["data"]
    variants = doc["settings"]["variants"]
    fig, axes = plt.subplots(len(specs), 1, figsize=(max(7.0, 0.75 * len(variants) + 2), 3.2 * len(specs)),
                             squeeze=False)
    for ax, spec in zip(axes[:, 0], specs):
        for i, variant in enumerate(variants):
            rows = [r for r in doc["rows"] if r["data"] == spec and r["variant"] == variant]
            for j, r in enumerate(rows):
                rec = r["layers"][r["last"]]
                x = i + (j - (len(rows) - 1) / 2) * 0.12
                ax.scatter([x], [rec["index"]], s=30, color=ORIENTATION_COLOURS[rec["direction"]], zorder=3,
                           edgecolor="black", linewidth=0.4)
            if rows:
                ax.hlines(np.mean([r["layers"][r["last"]]["index"] for r in rows]), i - 0.3, i + 0.3,
                          color="black", linewidth=1.2)
            expect = ANCHOR[variant]["expect"] + (" (5a)" if ANCHOR[variant]["layer"] == "previous" else "")
            ax.text(i, 1.02, expect, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=6.5,
                    color=ORIENTATION_COLOURS[ANCHOR[variant]["expect"]], rotation=0)
        ax.axhline(0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("H - V of the last conv layer\n(share of kernel SS)", fontsize=8)
        ax.set_title(f"{spec}: banding index per seed (dots), mean (bar); article's finding above each variant",
                     fontsize=9, pad=14)
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", label=o)
               for o, c in ORIENTATION_COLOURS.items()]
    fig.legend(handles=handles, title="direction: H - V against random unit transposes, p <= 0.01", loc="lower center",
               ncol=3, fontsize=8,
               title_fontsize=8, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("Weight banding lab: horizontal (H > V) vs vertical (V > H) bands in the last conv layer; "
                 "0 = no preference", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig


def _save_index_figure(doc: dict[str, Any], path: Path) -> None:
    fig = index_figure(doc)
    try:
        save_figure(fig, path, dpi=110)
    finally:
        pyplot().close(fig)


def _hv(layer: dict[str, Any]) -> str:
    return (f"{fmt(layer['horizontal']['mean'], '.3f')} / {fmt(layer['vertical']['mean'], '.3f')} / "
            f"{fmt(layer['index']['mean'], '+.3f')} ± {fmt(layer['index']['sd'], '.3f')}")


def _calls(calls: Sequence[str]) -> str:
    """'h h none' style: one letter per seed."""
    return " ".join({"horizontal": "H", "vertical": "V"}.get(c, "-") for c in calls)


def _idx(record: dict[str, Any]) -> str:
    axis = record.get("axis") or {}
    return f"{fmt(record['index'], '+.3f')} ({fmt(axis.get('p'), '.2g')})"


def _where(doc: dict[str, Any]) -> str:
    return "Ray workers" if doc.get("runner") == "ray" else f"{doc['jobs']} job(s)"


def results_markdown(doc: dict[str, Any]) -> str:
    """The results page: per data set one row per variant beside the article, per-seed rows, pictures."""
    s = doc["settings"]
    lines = ["# Weight banding lab: the simplified net and the article's interventions", ""]
    if doc.get("command"):
        lines += [f"Command: `{doc['command']}`", ""]
    lines += [
        f"Network: `{s['model']}`, recipe: {s['recipe']}. Seeds {', '.join(map(str, s['seeds']))}. "
        f"Article: {doc['anchor']['source']}.",
        f"Compute time of the results: {doc['compute_s']:.0f} s (all tasks, whenever they ran); wall time of this "
        f"invocation: {doc['wall_s']:.0f} s with {_where(doc)} on {doc['machine']['cpus']} CPUs (1 torch "
        f"thread a job, {doc['machine']['device']}).",
        "",
        "H and V: shares of the kernels' sum of squares in row and column variation, energy-weighted over the "
        "layer (chance 0.25 each for 3x3 kernels); index = H - V. Axis test, one letter per seed: H when "
        "H - V > 0 at p <= 0.01 against random transposes of whole units (two-sided, 9999 draws), V when "
        "H - V < 0, - otherwise. Orientation rule (the `banding` command's): H when H is above chance at "
        "p <= 0.01 (position permutations inside each kernel) and its excess over chance beats V's by 0.1, V "
        "likewise (strong, clear bands). Eff. kernels: (sum SS)^2 / sum SS^2; share H>V: unweighted share of "
        "kernels with their own H above their own V. Values are means over seeds (± sd of the index). Agrees: "
        "a majority of seeds shows, by the axis test, what the article reports, in the layer it reports on.",
        "",
        "![banding index per variant and seed](banding_index.png)",
        "",
    ]
    for spec in s["data"]:
        d = doc["data"][spec]
        lines += [f"## {spec}", "",
                  f"{d['train_examples']} training and {d['test_examples']} test images, {d['classes']} classes, "
                  f"{d['channels']} channel(s), {s['size']} px.", "",
                  "| variant | article | train / test acc. | g6 (last conv) H / V / index | g6 axis test | g5 H / V / index | "
                  "g5 axis test | g4 index, axis test | g6 orientation rule | eff. kernels (g6) | share H>V (g6) | "
                  "head index, axis test | agrees |",
                  "|:--|:--|---:|:--|:--|:--|:--|:--|:--|---:|---:|:--|:--|"]
        for v in (x for x in doc["variants"] if x["data"] == spec):
            names = list(v["layers"])
            g6, g5, g4 = (v["layers"][n] for n in (names[-1], names[-2], names[-3]))
            head = v["head"]
            kernels = next(r for r in doc["rows"] if r["data"] == spec)["layers"][names[-1]]["n_kernels"]
            lines.append(
                f"| {v['variant']} | {ANCHOR[v['variant']]['article']} | {fmt(v['train_accuracy']['mean'], '.3f')} / "
                f"{fmt(v['test_accuracy']['mean'], '.3f')} | "
                f"{_hv(g6)} | {_calls(g6['directions'])} | {_hv(g5)} | {_calls(g5['directions'])} | "
                f"{fmt(g4['index']['mean'], '+.3f')}, {_calls(g4['directions'])} | {_calls(g6['orientations'])} | "
                f"{fmt(g6['effective_kernels']['mean'], '.0f')} of {kernels} | "
                f"{fmt(g6['share_h_over_v']['mean'], '.2f')} | "
                + (f"{head['layer']}: {fmt(head['index']['mean'], '+.3f')}, {_calls(head['directions'])}"
                   if head else "") +
                f" | {'yes' if v['agrees'] else 'no'} ({v['matching_seeds']} of {len(v['seeds'])} in "
                f"{v['target_layer']}) |")
        lines += ["", "Pictures (NMF of the last conv layer's weights, seed by seed): " + "; ".join(
            f"{v} " + ", ".join(f"[{r['seed']}]({r['picture']})" for r in doc["rows"]
                                if r["data"] == spec and r["variant"] == v)
            for v in s["variants"]), ""]
    lines += ["## Findings", ""] + [f"- {line}" for line in doc["summary"]]
    lines += ["", "## Every network", "",
              "| data | variant | seed | test acc. | g6 H | g6 V | g6 H - V (axis p) | g6 | g5 H - V (axis p) | g5 | "
              "g4 H - V (axis p) | g4 |", "|:--|:--|---:|---:|---:|---:|:--|:--|:--|:--|:--|:--|"]
    for r in doc["rows"]:
        names = list(r["layers"])
        g6, g5, g4 = (r["layers"][n] for n in (names[-1], names[-2], names[-3]))
        lines.append(f"| {r['data']} | {r['variant']} | {r['seed']} | {fmt(r['test_accuracy'], '.3f')} | "
                     f"{g6['horizontal']:.3f} | {g6['vertical']:.3f} | {_idx(g6)} | {g6['direction']} | {_idx(g5)} | "
                     f"{g5['direction']} | {_idx(g4)} | {g4['direction']} |")
    return "\n".join(lines) + "\n"


def table(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The results rows without where and how long they ran: what two runs of the same settings
    must agree on, however they were interrupted or split over processes."""
    return [{k: v for k, v in r.items() if k not in ("reused", "seconds")} for r in doc["rows"]]


__all__ = ["ANCHOR", "FULL", "QUICK", "BandingSettings", "LabData", "Task", "index_figure", "measure", "model_args",
           "open_lab_data", "results_markdown", "run_banding", "run_task", "scored_layers", "summarize", "table",
           "tasks_of", "train_config", "with_overrides"]
